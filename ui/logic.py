"""What the web UI does, as plain functions (no gradio import): testable without a browser.

* :func:`model_info` — family, image/video and default settings of a model name or folder, without
  loading it (zoo / testbed defaults, the folder's ``model_index.json``).
* :class:`Form` — the UI's input values under the names the CLI uses; :func:`build_request` turns it
  into a validated :class:`~mixdit.generate.GenerationRequest`. Feature configs are built by the
  CLI's own ``features_from_args`` (``attention/vmoba_cli.py``, ``guidance/cli.py``), so the UI
  validates exactly like ``mixdit generate``.
* :class:`Runner` — a cache of loaded pipelines keyed by (model, device, dtype) and one lock that
  serialises generations; per request it applies the features, runs
  :func:`~mixdit.generate.run_generation`, removes the features again (``mixdit.remove``) and saves
  through :func:`~mixdit.pipelines.output.save_result`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mixdit.attention.vmoba import VMoBAConfig
from mixdit.cli import DEFAULT_MODEL
from mixdit.errors import ConfigError
from mixdit.generate import GenerationRequest
from mixdit.guidance.perturbation import GuidanceConfig

DEFAULT_OUTPUTS = "outputs"
DEFAULT_PROMPT = "a red square moving right on a white background"

# families of the tiny built-ins, used only before their cache folder exists (then its model_index.json is read)
_TINY_FAMILIES = {"tiny-sd3": "sd3", "tiny-flux": "flux", "tiny-wan": "wan", "tiny-wan22": "wan"}


# --------------------------------------------------------------------------------------------
# models: family, image/video, defaults
# --------------------------------------------------------------------------------------------
@dataclass
class ModelInfo:
    name: str
    family: str | None = None  # None: not known until the pipeline is loaded
    is_video: bool | None = None
    defaults: dict = field(default_factory=dict)  # steps, guidance_scale, height, width, frames (those known)

    @property
    def supports_vmoba(self) -> bool:
        """VMoBA panel shown: a video family VMoBA supports, or a family not known yet."""
        return self.family is None or self.family in vmoba_families()

    @property
    def show_video_fields(self) -> bool:
        return self.is_video is not False

    def describe(self) -> str:
        if self.family is None:
            return (f"`{self.name}`: model family not known until it is loaded (video settings are ignored for "
                    "image models; empty fields use the pipeline's own defaults)")
        kind = "video" if self.is_video else "image"
        extra = "; VMoBA available" if self.family in vmoba_families() else ""
        return f"`{self.name}`: {_FAMILY_NAMES.get(self.family, self.family)} {kind} model{extra}"


_FAMILY_NAMES = {"sd3": "SD3", "flux": "FLUX.1", "wan": "Wan", "hunyuan_video": "HunyuanVideo",
                 "cogvideox": "CogVideoX"}


def vmoba_families() -> tuple[str, ...]:
    from mixdit.api import FEATURES, _load_builtin_features

    _load_builtin_features()
    return tuple(FEATURES["vmoba"].supported_families or ())


def _family_of_index(path: Path) -> str | None:
    """The adapter family of a diffusers ``model_index.json`` (by its transformer class)."""
    from mixdit.pipelines.adapters import ADAPTERS

    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    for key in ("transformer", "transformer_2"):
        entry = data.get(key)
        if isinstance(entry, (list, tuple)) and len(entry) == 2 and entry[1]:
            for adapter in ADAPTERS.values():
                if adapter.transformer_class == entry[1]:
                    return adapter.family
    return None


def _index_file(name: str) -> Path | None:
    """Where ``model_index.json`` of ``name`` can be read without loading or downloading anything."""
    from mixdit.pipelines.testbed.load import TESTBED_MODELS, testbed_path
    from mixdit.pipelines.zoo import BUILTIN_MODELS, builtin_cache_dir

    if name in TESTBED_MODELS:
        folder = testbed_path(name)
        return folder / "model_index.json" if folder is not None else None
    if name in BUILTIN_MODELS:
        candidate = builtin_cache_dir(name) / "model_index.json"
        return candidate if candidate.is_file() else None
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder / "model_index.json"
    if name.count("/") == 1:  # a hub id: only the local hub cache, never the network
        try:
            from huggingface_hub import try_to_load_from_cache

            hit = try_to_load_from_cache(name, "model_index.json")
        except Exception:  # an invalid repo id and the like
            return None
        return Path(hit) if isinstance(hit, str) else None
    return None


def _folder_defaults(folder: Path) -> dict:
    """A trained testbed folder's own settings; {} for other folders."""
    from mixdit.pipelines.testbed.load import folder_defaults

    try:
        return folder_defaults(folder)
    except Exception:  # not a testbed folder we understand: the pipeline's defaults apply
        return {}


def model_info(name: str, pipe=None) -> ModelInfo:
    """Family, image/video and generation defaults of ``name`` (a built-in name, a folder or a hub
    id) without loading it; ``pipe`` (already loaded) is the authority when given."""
    from mixdit.pipelines.adapters import ADAPTERS
    from mixdit.pipelines.zoo import generation_defaults

    name = (name or "").strip()
    info = ModelInfo(name=name, defaults=generation_defaults(name))
    if pipe is not None:
        from mixdit.generate import model_defaults
        from mixdit.pipelines.adapters import adapter_for

        info.family = adapter_for(pipe).family
        info.defaults.update(model_defaults(pipe))
    elif name.startswith("random:"):
        from mixdit.pipelines.random_models import RANDOM_ARCHS

        arch = RANDOM_ARCHS.get(name[len("random:"):])
        info.family = arch.family if arch is not None else None
    else:
        index = _index_file(name)
        if index is not None:
            info.family = _family_of_index(index)
            if not info.defaults:
                info.defaults = _folder_defaults(index.parent)
        if info.family is None:
            info.family = _TINY_FAMILIES.get(name)
    if info.family is not None:
        info.is_video = ADAPTERS[info.family].is_video
    if info.is_video is False:
        info.defaults.pop("frames", None)
    return info


# --------------------------------------------------------------------------------------------
# the form -> a validated GenerationRequest
# --------------------------------------------------------------------------------------------
@dataclass
class Form:
    """The UI's inputs (empty number fields are None: the model's default / the feature's default).
    Defaults come from the CLI and the config classes, so the form starts where `mixdit generate` does."""

    model: str = DEFAULT_MODEL
    model_path: str = ""  # a local folder or hub id; overrides ``model`` when not empty
    prompt: str = DEFAULT_PROMPT
    negative_prompt: str = ""
    seed: int | float | None = GenerationRequest.seed
    random_seed: bool = False
    steps: int | float | None = None
    guidance_scale: float | None = None
    width: int | float | None = None
    height: int | float | None = None
    frames: int | float | None = None
    fps: int | float | None = GenerationRequest.fps
    vmoba: bool = False
    vmoba_threshold: float | None = VMoBAConfig.threshold
    vmoba_dense_steps: float | None = VMoBAConfig.dense_steps
    vmoba_selection: str | None = VMoBAConfig.selection
    vmoba_granularity: str | None = VMoBAConfig.granularity
    guidance: bool = False
    heads: str = ""
    heads_preset: str | None = None  # path of an uploaded HeadHunter preset JSON
    perturb_scale: float | None = GuidanceConfig.scale
    softpag: float | None = GuidanceConfig.softpag
    perturb_mode: str | None = GuidanceConfig.mode
    device: str = "auto"
    dtype: str | None = None

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def model_name(self) -> str:
        return (self.model_path or "").strip() or (self.model or "").strip()


def _int_field(name: str, value, allowed: str):
    """Gradio numbers arrive as floats (or None when the box is empty): whole numbers -> int."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ConfigError(name, value, allowed)
    if isinstance(value, float):
        if not value.is_integer():
            raise ConfigError(name, value, allowed)
        return int(value)
    if isinstance(value, int):
        return value
    raise ConfigError(name, value, allowed)


def _float_field(name: str, value, allowed: str):
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(name, value, allowed)
    return float(value)


def random_seed() -> int:
    return random.SystemRandom().randrange(2**32)


def _cli_args(cli_module, **values) -> argparse.Namespace:
    """The namespace ``mixdit generate`` would parse for this feature's flags: every flag at its CLI default, then
    ``values``. So a flag the CLI gains needs no edit here (the UI's form sets only the fields it shows)."""
    parser = argparse.ArgumentParser(add_help=False)
    cli_module.add_generate_arguments(parser)
    args = parser.parse_args([])
    for name, value in values.items():
        if not hasattr(args, name):
            raise AttributeError(f"{cli_module.__name__} has no flag for {name!r}")
        setattr(args, name, value)
    return args


def build_features(form: Form) -> dict:
    """Feature configs through the CLI's own ``features_from_args`` (same classes, same validation)."""
    from mixdit.attention import vmoba_cli
    from mixdit.guidance import cli as guidance_cli

    features: dict[str, Any] = {}
    if form.vmoba:
        features.update(vmoba_cli.features_from_args(_cli_args(
            vmoba_cli, vmoba=True,
            vmoba_threshold=_float_field("vmoba.threshold", form.vmoba_threshold, "a number in [0, 1]"),
            vmoba_dense_steps=_float_field("vmoba.dense_steps", form.vmoba_dense_steps,
                                           "a fraction in [0, 1] or a whole number of steps"),
            vmoba_selection=form.vmoba_selection or None,
            vmoba_granularity=form.vmoba_granularity or None)))
    if form.guidance:
        heads = (form.heads or "").strip() or (form.heads_preset or None)
        if heads is None:
            raise ConfigError("guidance.heads", "", "a head spec like 'L13H18,L14H*,L2' or an uploaded preset JSON")
        features.update(guidance_cli.features_from_args(_cli_args(
            guidance_cli, heads=heads,
            perturb_scale=_float_field("guidance.scale", form.perturb_scale, "a number in [0, 1000]"),
            softpag=_float_field("guidance.softpag", form.softpag, "a number in [0, 1]"),
            perturb_mode=form.perturb_mode or None)))
    return features


def build_request(form: Form, is_video: bool | None = None):
    """A validated :class:`GenerationRequest` from the form (seed drawn here when ``random_seed``).
    ``is_video=False`` drops frames (an image model); None keeps them until the model is loaded."""
    model = form.model_name()
    if not model:
        raise ConfigError("model", model, "a built-in name, a local folder or a hub id")
    seed = random_seed() if form.random_seed else _int_field("seed", form.seed, "a whole number >= 0")
    fps = _int_field("fps", form.fps, "a whole number of frames per second in [1, 240]")
    request = GenerationRequest(
        prompt=form.prompt, model=model, negative_prompt=form.negative_prompt or "",
        steps=_int_field("steps", form.steps, "a whole number in [1, 1000]"),
        seed=0 if seed is None else seed,
        height=_int_field("height", form.height, "a multiple of 16 between 16 and 8192"),
        width=_int_field("width", form.width, "a multiple of 16 between 16 and 8192"),
        frames=None if is_video is False else _int_field("frames", form.frames, "a whole number of frames"),
        fps=GenerationRequest.fps if fps is None else fps,
        guidance_scale=_float_field("guidance_scale", form.guidance_scale, "a number in [0, 100]"),
        device=form.device or "auto", dtype=form.dtype or None,
        features=build_features(form))
    request.validate()
    return request


# --------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------
@dataclass
class GenerationResult:
    path: Path  # the image or video
    files: list[Path]  # every file written (video: plus its JSON sidecar)
    metadata: dict  # as read back from the saved file
    seconds: float  # denoising + decoding
    load_seconds: float  # 0 when the pipeline came from the cache
    is_video: bool
    summary: str


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(1, 10_000):
        candidate = path.with_name(f"{path.stem}-{i}{path.suffix}")
        if not candidate.exists():
            return candidate
    raise FileExistsError(path)  # pragma: no cover


def _fmt(x: float) -> str:
    return f"{x:.2f}"


def vmoba_summary(vmoba: dict) -> str:
    """One line from ``mixdit.summary(pipe)["features"]["vmoba"]``: density per layer type, dense calls."""
    density = vmoba.get("density") or {}
    parts = [f"{lt} {_fmt(row['density'])}" for lt, row in density.items() if "density" in row]
    dense = {k: v for k, v in (vmoba.get("dense_calls") or {}).items() if v}
    text = "VMoBA density " + ", ".join(parts) if parts else "VMoBA: every attention call ran dense"
    if dense:
        text += " (dense calls: " + ", ".join(f"{k} {v}" for k, v in dense.items()) + ")"
    return text


def summary_line(meta: dict, seconds: float, load_seconds: float = 0.0) -> str:
    size = f"{meta.get('width')}×{meta.get('height')}"
    if meta.get("frames") is not None:
        size += f", {meta['frames']} frames"
    parts = [f"{seconds:.1f} s", f"seed {meta.get('seed')}", f"{meta.get('steps')} steps", size,
             f"CFG {meta.get('guidance_scale')}"]
    if load_seconds:
        parts.append(f"model loaded in {load_seconds:.1f} s")
    features = meta.get("summary") or {}
    if "vmoba" in features:
        parts.append(vmoba_summary(features["vmoba"]))
    if "guidance" in features:
        g = features["guidance"]
        heads = g.get("heads")
        heads = ", ".join(heads.values()) if isinstance(heads, dict) else heads
        parts.append(f"head guidance {heads} (s={g.get('scale')}, u={g.get('softpag')}, {g.get('mode')})")
    return " · ".join(parts)


class Runner:
    """Loaded pipelines cached per (model, device, dtype), at most ``max_pipelines`` (least recently
    used dropped first), and one lock: one generation at a time. Features live only for the
    request that asked for them: ``mixdit.remove`` runs after every generation, failed or not."""

    def __init__(self, outputs_dir: str | os.PathLike = DEFAULT_OUTPUTS, max_pipelines: int = 1,
                 load: Callable | None = None):
        from mixdit.config import check_number

        check_number("max_pipelines", max_pipelines, 1, integer=True)
        self.outputs_dir = Path(outputs_dir)
        self.max_pipelines = max_pipelines
        self._load = load
        self._pipes: OrderedDict[tuple, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0  # how many pipelines were loaded (tests: the cache works)

    @staticmethod
    def key(model: str, device="auto", dtype=None) -> tuple:
        from mixdit.pipelines.zoo import resolve_device, resolve_dtype

        dev = resolve_device(device)
        folder = Path(model).expanduser()
        name = str(folder.resolve()) if folder.is_dir() else model
        return (name, str(dev), str(resolve_dtype(dtype, dev)))

    def cached(self, model: str, device="auto", dtype=None):
        """The loaded pipeline for this key, or None (never loads)."""
        try:
            return self._pipes.get(self.key(model, device, dtype))
        except ConfigError:
            return None

    def pipeline(self, model: str, device="auto", dtype=None) -> tuple[Any, float]:
        """(pipeline, seconds spent loading it: 0 from the cache). Call with the lock held."""
        key = self.key(model, device, dtype)
        if key in self._pipes:
            self._pipes.move_to_end(key)
            return self._pipes[key], 0.0
        while len(self._pipes) >= self.max_pipelines:  # free memory before loading the next one
            self._pipes.popitem(last=False)
            _free_memory()
        if self._load is None:
            from mixdit.pipelines.zoo import load_pipeline as load
        else:
            load = self._load
        start = time.perf_counter()
        pipe = load(model, device=device, dtype=dtype)
        self.loads += 1
        self._pipes[key] = pipe
        return pipe, time.perf_counter() - start

    def generate(self, form: Form, progress: Callable[[float | tuple, str], None] | None = None) -> GenerationResult:
        """Validate (before any loading), load or reuse the pipeline, generate, save, report."""
        import mixdit
        from mixdit.generate import default_output_path, run_generation
        from mixdit.pipelines.adapters import adapter_for
        from mixdit.pipelines.output import read_metadata, save_result, sidecar

        def report(value, desc):
            if progress is not None:
                progress(value, desc)

        info = model_info(form.model_name())
        request = build_request(form, is_video=info.is_video)
        with self._lock:
            report(0.0, f"loading {request.model}")
            pipe, load_seconds = self.pipeline(request.model, request.device, request.dtype)
            is_video = adapter_for(pipe).is_video
            if not is_video and request.frames is not None:
                request = dataclasses.replace(request, frames=None)
            report((0, None), "denoising")
            try:
                result, meta, seconds = run_generation(
                    pipe, request, callback=lambda step, total: report((step, total), "denoising"))
            finally:
                mixdit.remove(pipe)  # this request's features never reach the next one
            report(1.0, "saving")
            path = _unique(default_output_path(request, is_video, str(self.outputs_dir)))
            written = save_result(result, path, meta, fps=request.fps if is_video else None)
        files = []
        for w in written:
            files.append(Path(w))
            if sidecar(w).is_file():
                files.append(sidecar(w))
        metadata = read_metadata(written[0])
        return GenerationResult(path=Path(written[0]), files=files, metadata=metadata, seconds=seconds,
                                load_seconds=load_seconds, is_video=is_video,
                                summary=summary_line(meta, seconds, load_seconds))


def _free_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover
        pass
