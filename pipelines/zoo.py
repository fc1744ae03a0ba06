"""The model zoo: one ``load_pipeline(name)`` for hub ids, local folders and built-in models.

Every kind of name gives back an ordinary diffusers pipeline:

* a built-in name (see :func:`list_builtin_models`):

  - ``tiny-sd3``, ``tiny-flux``, ``tiny-wan``, ``tiny-wan22``, ``tiny-hunyuan-video``, ``tiny-cogvideox``: tiny
    real architectures with random weights from a fixed seed and tokenizers built in code
    (:mod:`mixdit.pipelines.tiny`). They are
    built once, written with ``save_pretrained`` into ``$MIXDIT_CACHE/<name>`` (default
    ``~/.cache/mixdit/<name>``) and always loaded back with plain
    ``DiffusionPipeline.from_pretrained(folder)``; a missing, stale or unreadable folder is rebuilt.
  - ``random:<arch>``: a full-size published transformer with random weights created directly on
    the target device, inside its real pipeline class with small stand-in text encoders and VAE
    (:mod:`mixdit.pipelines.random_models`). Meant for GPU benchmarks.

* an existing local folder: ``DiffusionPipeline.from_pretrained(folder)``;
* anything else is tried as a hub id with ``DiffusionPipeline.from_pretrained(name)`` (one attempt;
  with ``HF_HUB_OFFLINE=1`` only the local hub cache is looked at).

Failures raise one :class:`~mixdit.errors.ModelNotFoundError` naming what was tried and listing
the built-in names; the original exception is kept as ``__cause__``.

More built-ins (e.g. the trained testbed models) plug in with :func:`register_builtin_model`; a
builder is ``builder(device: torch.device, dtype: torch.dtype, **kwargs) -> DiffusionPipeline``,
and :func:`cached_builder` turns a CPU ``build() -> pipeline`` function into one that goes through
the cache folder and ``from_pretrained``.
"""

from __future__ import annotations

import difflib
import json
import os
import shutil
import threading
import uuid
from pathlib import Path
from typing import Callable

import torch

from mixdit.errors import ConfigError, ModelNotFoundError

Builder = Callable[..., "object"]  # (device: torch.device, dtype: torch.dtype, **kwargs) -> DiffusionPipeline

BUILTIN_MODELS: dict[str, Builder] = {}
"""Built-in model name -> builder ``(device, dtype, **kwargs) -> DiffusionPipeline``."""

MARKER_FILE = "mixdit_builtin.json"

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}
_DTYPE_ALLOWED = "None, a torch dtype or one of 'float32'/'fp32', 'bfloat16'/'bf16', 'float16'/'fp16'"


# --------------------------------------------------------------------------------------------
# device and dtype
# --------------------------------------------------------------------------------------------
def resolve_device(device="auto") -> torch.device:
    """``"auto"`` (CUDA if available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a ``torch.device``."""
    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device.strip().lower() if isinstance(device, str) else device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError("device", device, "'auto', 'cpu', 'cuda', 'cuda:<index>' or a torch.device") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", device, "'auto' or 'cpu' (CUDA is not available on this machine)")
    return dev


def resolve_dtype(dtype=None, device="cpu") -> torch.dtype:
    """None -> float32 on CPU, bfloat16 on CUDA; a floating ``torch.dtype``; or a name
    (``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``)."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() == "auto"):
        return torch.bfloat16 if resolve_device(device).type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ConfigError("dtype", dtype, _DTYPE_ALLOWED)
        return dtype
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key in _DTYPES:
            return _DTYPES[key]
    raise ConfigError("dtype", dtype, _DTYPE_ALLOWED)


# --------------------------------------------------------------------------------------------
# registry and cache
# --------------------------------------------------------------------------------------------
def register_builtin_model(name: str, builder: Builder, *, overwrite: bool = False) -> None:
    """Add a built-in name. ``builder(device, dtype, **kwargs)`` returns a diffusers pipeline."""
    if name in BUILTIN_MODELS and not overwrite:
        raise ValueError(f"built-in model {name!r} is already registered")
    BUILTIN_MODELS[name] = builder


def list_builtin_models() -> list[str]:
    """Built-in names: ``tiny-*`` first, then ``random:*``, then others, each group sorted."""
    def key(n: str):
        return (0 if n.startswith("tiny-") else 1 if n.startswith("random:") else 2, n)

    return sorted(BUILTIN_MODELS, key=key)


def cache_root() -> Path:
    """``$MIXDIT_CACHE`` if set, else ``~/.cache/mixdit``."""
    env = os.environ.get("MIXDIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mixdit"


def builtin_cache_dir(name: str) -> Path:
    """The folder a cached built-in model is saved in (``<cache_root>/<name>``)."""
    return cache_root() / name.replace(":", "_").replace("/", "_")


def _marker(name: str, version) -> dict:
    import diffusers
    import transformers

    return {"name": name, "version": version, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__}


def _marker_ok(folder: Path, expected: dict) -> bool:
    try:
        return json.loads((folder / MARKER_FILE).read_text()) == expected and (folder / "model_index.json").is_file()
    except (OSError, ValueError):
        return False


_build_lock = threading.Lock()


def ensure_cached(name: str, build: Callable[[], object], version=1, *, force: bool = False) -> Path:
    """Make sure ``<cache>/<name>`` holds ``build()``'s pipeline (saved with ``save_pretrained``).

    The folder is (re)built when missing, written by another builder version or library
    version, or when ``force``. Writes go to a temporary folder renamed into place, so a
    crashed or concurrent build never leaves a half-written folder behind.
    """
    folder = builtin_cache_dir(name)
    expected = _marker(name, version)
    with _build_lock:
        if not force and _marker_ok(folder, expected):
            return folder
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            pipe = build()
            pipe.save_pretrained(tmp, safe_serialization=True)
            (tmp / MARKER_FILE).write_text(json.dumps(expected, indent=2))
            if folder.exists():
                if not force and _marker_ok(folder, expected):  # another process won the race
                    return folder
                shutil.rmtree(folder, ignore_errors=True)
            try:
                os.replace(tmp, folder)
            except OSError:
                if not _marker_ok(folder, expected):
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def cached_builder(name: str, build: Callable[[], object], version=1) -> Builder:
    """Builder for a small CPU-buildable model: cache folder + ``DiffusionPipeline.from_pretrained``."""

    def builder(device: torch.device, dtype: torch.dtype, **kwargs):
        from diffusers import DiffusionPipeline

        folder = ensure_cached(name, build, version)
        try:
            pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, **kwargs)
        except Exception:  # unreadable (e.g. truncated weights): rebuild once, then load for real
            folder = ensure_cached(name, build, version, force=True)
            pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype, **kwargs)
        return pipe.to(device)

    builder.__doc__ = build.__doc__
    builder.cache_name = name
    return builder


def _random_builder(arch: str) -> Builder:
    def builder(device: torch.device, dtype: torch.dtype, seed: int = 0):
        from mixdit.pipelines.random_models import random_pipeline

        return random_pipeline(arch, device, dtype, seed=seed)

    return builder


GENERATION_DEFAULTS: dict[str, dict] = {
    # small, fast settings for the offline models; `mixdit generate` flags override them
    "tiny-sd3": dict(steps=4, height=64, width=64, guidance_scale=4.0),
    "tiny-flux": dict(steps=4, height=64, width=64, guidance_scale=3.5),
    "tiny-wan": dict(steps=4, height=64, width=64, frames=9, guidance_scale=4.0),
    "tiny-wan22": dict(steps=4, height=64, width=64, frames=9, guidance_scale=4.0),
    "tiny-hunyuan-video": dict(steps=4, height=64, width=64, frames=9, guidance_scale=6.0),  # embedded guidance
    "tiny-cogvideox": dict(steps=4, height=64, width=64, frames=9, guidance_scale=6.0),
    "random:sd3.5-medium": dict(steps=28, height=1024, width=1024, guidance_scale=4.5),
    "random:flux.1-dev": dict(steps=28, height=1024, width=1024, guidance_scale=3.5),
    "random:wan2.1-1.3b": dict(steps=50, height=480, width=832, frames=81, guidance_scale=5.0),
    "random:wan2.1-14b": dict(steps=50, height=720, width=1280, frames=81, guidance_scale=5.0),
}


def generation_defaults(name: str | None) -> dict:
    """Default ``steps``/``height``/``width``/``frames``/``guidance_scale`` for a built-in model
    (empty for hub ids and folders: the pipeline's own defaults apply)."""
    return dict(GENERATION_DEFAULTS.get(name or "", {}))


def _register_defaults() -> None:
    from mixdit.pipelines import random_models, tiny

    for name, build in tiny.TINY_BUILDERS.items():
        register_builtin_model(name, cached_builder(name, build, tiny.TINY_VERSION), overwrite=True)
    for arch in random_models.RANDOM_ARCHS:
        register_builtin_model(f"random:{arch}", _random_builder(arch), overwrite=True)
    # mixdit's own trained testbed models (weights trained by `mixdit train testbed`)
    from mixdit.pipelines.testbed.load import TESTBED_BUILDERS, testbed_generation_defaults

    for name, builder in TESTBED_BUILDERS.items():
        register_builtin_model(name, builder, overwrite=True)
    for name, defaults in testbed_generation_defaults().items():
        GENERATION_DEFAULTS.setdefault(name, dict(defaults))


_register_defaults()


# --------------------------------------------------------------------------------------------
# load_pipeline
# --------------------------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    if name.startswith(("./", "../", "/", "~", ".\\", "..\\")) or name in (".", ".."):
        return True
    seps = [os.sep] + ([os.altsep] if os.altsep else [])
    if os.sep != "/" and any(s in name for s in seps):
        return True
    # "owner/repo" is a hub id; more slashes, or a trailing one, is a path
    return name.count("/") > 1 or name.endswith("/")


def _short(exc: BaseException, limit: int = 200) -> str:
    """First clause of the message, plus the first chained cause (e.g. the network error)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    for cut in (" (", ". "):
        if cut in text[20:]:
            text = text[: text.index(cut, 20)]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    cause = exc.__cause__ or exc.__context__
    if cause is not None:
        msg = " ".join(str(cause).split())[:120]
        if msg and msg not in text:
            text += f"; caused by {type(cause).__name__}: {msg}"
    return text


def _builtins_line(name: str | None = None) -> str:
    names = list_builtin_models()
    hint = ""
    if name:
        close = difflib.get_close_matches(name, names, n=1, cutoff=0.75)
        if close:
            hint = f" Did you mean {close[0]!r}?"
    return f"{hint} Built-in names: {', '.join(names)}."


def _hub_error_types() -> tuple[type, ...]:
    types: list[type] = [OSError]
    try:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        types += [HfHubHTTPError, HFValidationError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def load_pipeline(name: str, device="cpu", dtype=None, **kwargs):
    """Load ``name`` as a diffusers ``DiffusionPipeline`` on ``device`` in ``dtype``.

    ``name``: a built-in name (``tiny-sd3``, ``tiny-flux``, ``tiny-wan``, ``tiny-wan22``, ``tiny-hunyuan-video``,
    ``tiny-cogvideox``,
    ``random:sd3.5-medium``, ``random:flux.1-dev``, ``random:wan2.1-1.3b``, ``random:wan2.1-14b``,
    ... see :func:`list_builtin_models`), a local diffusers folder, or a hub id.
    ``device``: ``"auto"`` | ``"cpu"`` | ``"cuda"`` | ``torch.device``.
    ``dtype``: None (float32 on CPU, bfloat16 on CUDA) | ``torch.dtype`` | ``"fp32"``/``"bf16"``/``"fp16"``/...
    ``kwargs`` go to ``DiffusionPipeline.from_pretrained`` (hub, folder, ``tiny-*``) or to the
    builder (``random:*`` takes ``seed``).

    Returns the pipeline, with ``pipe.mixdit_model_name`` set to ``name``. Raises
    :class:`ModelNotFoundError` when nothing matches, :class:`ConfigError` for a bad device/dtype.
    """
    if not isinstance(name, (str, os.PathLike)):
        raise ConfigError("model", name, "a built-in name, a local folder or a hub id (a string)")
    name = os.fspath(name)
    dev = resolve_device(device)
    if dtype is None and "torch_dtype" in kwargs:  # diffusers' older spelling
        dtype = kwargs.pop("torch_dtype")
    dt = resolve_dtype(dtype, dev)

    if name in BUILTIN_MODELS:
        pipe = BUILTIN_MODELS[name](dev, dt, **kwargs)
    elif name.startswith("random:"):
        from mixdit.pipelines.random_models import RANDOM_ARCHS

        known = ", ".join(f"random:{k}" for k in RANDOM_ARCHS)
        raise ModelNotFoundError(f"could not load {name!r}: unknown random architecture (known: {known})."
                                 + _builtins_line(name))
    else:
        pipe = _load_folder_or_hub(name, dt, kwargs).to(dev)
    try:
        pipe.mixdit_model_name = name
    except Exception:  # pragma: no cover - a pipeline class that forbids new attributes
        pass
    return pipe


def _load_folder_or_hub(name: str, dtype: torch.dtype, kwargs: dict):
    from diffusers import DiffusionPipeline

    import mixdit.pipelines.testbed.codec  # noqa: F401  (registers mixdit's codec class for saved testbed folders)

    local = Path(name).expanduser()
    if local.is_dir():
        try:
            return DiffusionPipeline.from_pretrained(str(local), dtype=dtype, **kwargs)
        except _hub_error_types() + (ValueError, KeyError) as exc:
            raise ModelNotFoundError(
                f"could not load {name!r}: local folder {str(local.resolve())!r} is not a loadable diffusers "
                f"pipeline: {_short(exc)}." + _builtins_line()) from exc
    if _looks_like_path(name):
        raise ModelNotFoundError(
            f"could not load {name!r}: folder not found ({str(local.resolve())!r})." + _builtins_line(name)
        ) from FileNotFoundError(str(local))
    if _hub_offline():
        kwargs = {"local_files_only": True, **kwargs}
    try:
        return DiffusionPipeline.from_pretrained(name, dtype=dtype, **kwargs)
    except _hub_error_types() as exc:
        where = "hub cache (HF_HUB_OFFLINE is set)" if _hub_offline() else "hub"
        raise ModelNotFoundError(
            f"could not load {name!r}: not a built-in name, not a local folder, {where} load of {name!r} "
            f"failed: {_short(exc)}." + _builtins_line(name)) from exc


# --------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------
def detect_family(pipe) -> str:
    """``"sd3"``, ``"flux"``, ``"wan"``, ``"hunyuan_video"`` or ``"cogvideox"`` (see
    :func:`mixdit.pipelines.adapters.detect_family`, the one place that knows the families)."""
    from mixdit.pipelines.adapters import detect_family as _detect

    return _detect(pipe)