"""Load the trained testbed models (``mixdit-shapes-video``, ``mixdit-shapes-image``) for the zoo.

A trained model is an ordinary diffusers pipeline folder written by
``mixdit train testbed`` (plus ``testbed_config.json``). Folders are looked up, first hit wins, in

1. ``$MIXDIT_TESTBED_DIR/<name>``
2. ``pipelines/testbed/weights/<name>`` (the weights shipped with mixdit, package data)
3. ``$MIXDIT_CACHE/<name>`` (default ``~/.cache/mixdit/<name>``)

The zoo registers them with ``register_builtin_model(name, TESTBED_BUILDERS[name])``.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from mixdit.errors import ModelNotFoundError

TESTBED_MODELS = {"mixdit-shapes-video": "video", "mixdit-shapes-image": "image"}
SHIPPED_WEIGHTS = Path(__file__).resolve().parent / "weights"


def candidate_paths(name: str) -> list[Path]:
    out = []
    if os.environ.get("MIXDIT_TESTBED_DIR"):
        out.append(Path(os.environ["MIXDIT_TESTBED_DIR"]).expanduser() / name)
    out.append(SHIPPED_WEIGHTS / name)
    out.append(Path(os.environ.get("MIXDIT_CACHE", "~/.cache/mixdit")).expanduser() / name)
    return out


def testbed_path(name: str) -> Path | None:
    """The folder holding trained testbed model ``name``, or None if it has not been trained."""
    for path in candidate_paths(name):
        if (path / "model_index.json").is_file():
            return path
    return None


def train_command(name: str) -> str:
    kind = TESTBED_MODELS[name]
    return f"mixdit train testbed --model {kind} --out pipelines/testbed/weights/{name} --steps 100000 --max-minutes 8"


def load_testbed(name: str, device="cpu", dtype=None, **kwargs):
    """The trained testbed pipeline ``name`` on ``device`` in ``dtype`` (a ``WanPipeline`` for
    ``mixdit-shapes-video``, a ``StableDiffusion3Pipeline`` for ``mixdit-shapes-image``), with
    ``pipe._mixdit_defaults`` (steps, guidance scale, size, frames) set from the training config.

    Raises :class:`~mixdit.errors.ModelNotFoundError` (saying how to train it) when no folder exists."""
    from diffusers import DiffusionPipeline

    import mixdit.pipelines.testbed.codec  # noqa: F401  (registers the codec class for from_pretrained)
    from mixdit.pipelines.zoo import resolve_device, resolve_dtype

    if name not in TESTBED_MODELS:
        raise ModelNotFoundError(f"{name!r} is not a testbed model (known: {', '.join(TESTBED_MODELS)})")
    path = testbed_path(name)
    if path is None:
        tried = ", ".join(str(p) for p in candidate_paths(name))
        raise ModelNotFoundError(
            f"the testbed model {name!r} has not been trained here (looked in: {tried}). Train it on a GPU with "
            f"`{train_command(name)}` (or set MIXDIT_TESTBED_DIR to the folder that holds {name}/).")
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=dtype, **kwargs).to(device)
    set_testbed_defaults(pipe, path)
    return pipe


def generation_defaults(config: dict) -> dict:
    """Steps, guidance scale, size (and frames) a testbed config was trained and tuned for."""
    defaults = {"steps": config["default_steps"], "guidance_scale": config["default_guidance_scale"],
                "height": config["height"], "width": config["width"]}
    if config["kind"] == "video":
        defaults["frames"] = config["num_frames"]
    return defaults


def folder_defaults(folder) -> dict:
    """Steps, guidance scale, size (and frames) from a trained folder's ``testbed_config.json``; {} for
    other folders. Reads one small file: nothing is loaded."""
    from mixdit.pipelines.testbed.config import TestbedConfig
    from mixdit.pipelines.testbed.train import read_testbed_config

    config = read_testbed_config(folder).get("config", {})
    return generation_defaults(TestbedConfig.from_dict(config).to_dict()) if config else {}


def set_testbed_defaults(pipe, folder) -> dict:
    """Set ``pipe._mixdit_defaults`` from :func:`folder_defaults` (no-op for other folders); returns them."""
    defaults = folder_defaults(folder)
    if defaults:
        object.__setattr__(pipe, "_mixdit_defaults", defaults)
    return defaults


TESTBED_BUILDERS = {name: functools.partial(load_testbed, name) for name in TESTBED_MODELS}


def testbed_generation_defaults() -> dict[str, dict]:
    """For ``zoo.GENERATION_DEFAULTS``: each testbed model's defaults, from its preset."""
    from mixdit.pipelines.testbed.config import PRESETS

    return {name: generation_defaults(PRESETS[kind].to_dict()) for name, kind in TESTBED_MODELS.items()}
