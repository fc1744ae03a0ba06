"""One generation path shared by the CLI, the batch runner and the UI.

``GenerationRequest`` holds every user-visible field under the same names the CLI flags, the
UI controls and the output metadata use, so a PNG's ``mixdit`` chunk can reproduce its run.
"""

from __future__ import annotations

import dataclasses
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mixdit.config import check_number
from mixdit.errors import ConfigError


@dataclass
class GenerationRequest:
    prompt: str
    model: str = "tiny-sd3"
    negative_prompt: str = ""
    steps: int | None = None  # None: the model's default
    seed: int = 0
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    fps: int = 16
    guidance_scale: float | None = None
    device: str = "auto"
    dtype: str | None = None
    features: dict[str, Any] = field(default_factory=dict)  # keyword -> feature config

    def validate(self) -> None:
        if not isinstance(self.prompt, str):
            raise ConfigError("prompt", self.prompt, "a string")
        if self.steps is not None:
            check_number("steps", self.steps, 1, 1000, integer=True)
        check_number("seed", self.seed, 0, 2**63 - 1, integer=True)
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, 16, 8192, integer=True)
                if value % 16:
                    raise ConfigError(name, value, "a multiple of 16 between 16 and 8192")
        if self.frames is not None:
            check_number("frames", self.frames, 1, 1025, integer=True)
        check_number("fps", self.fps, 1, 240, integer=True)
        if self.guidance_scale is not None:
            check_number("guidance_scale", self.guidance_scale, 0.0, 100.0)


def model_defaults(pipe) -> dict:
    """Small, fast defaults for built-in tiny/testbed models; diffusers' defaults otherwise."""
    from mixdit.pipelines.zoo import generation_defaults

    defaults = generation_defaults(getattr(pipe, "mixdit_model_name", None))
    defaults.update(getattr(pipe, "_mixdit_defaults", None) or {})  # a trained testbed folder's own settings
    return defaults


def pipeline_kwargs(pipe, family: str, is_video: bool, request: GenerationRequest) -> dict:
    """Map a request onto the pipeline's ``__call__`` arguments (only those it accepts)."""
    import torch

    defaults = model_defaults(pipe)
    params = inspect.signature(pipe.__call__).parameters
    device = getattr(pipe, "_execution_device", None) or "cpu"
    gen_device = "cpu" if str(device).startswith("mps") else device
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "generator": torch.Generator(device=gen_device).manual_seed(request.seed),
    }
    wanted = {
        "negative_prompt": request.negative_prompt or None,
        "num_inference_steps": request.steps or defaults.get("steps"),
        "height": request.height or defaults.get("height"),
        "width": request.width or defaults.get("width"),
        "guidance_scale": request.guidance_scale if request.guidance_scale is not None else defaults.get("guidance_scale"),
    }
    if is_video:
        frames = request.frames or defaults.get("frames")
        # their VAEs pack 4 frames per latent frame after the first; other counts lose frames silently
        if frames is not None and family in ("wan", "hunyuan_video", "cogvideox") and (frames - 1) % 4:
            raise ConfigError("frames", frames, "4k+1 frames for this model (e.g. 9, 17, 33, 81)")
        wanted["num_frames"] = frames
    elif request.frames not in (None, 1):
        raise ConfigError("frames", request.frames, "1 (or unset) for an image model")
    for key, value in wanted.items():
        if value is not None and key in params:
            kwargs[key] = value
    if "output_type" in params:
        kwargs["output_type"] = "np" if is_video else "pil"
    return kwargs


def run_generation(pipe, request: GenerationRequest, callback=None):
    """Run one request on an already-loaded pipeline; returns (result, metadata, seconds).

    ``result`` is a list of PIL images (image models) or a ``[F, H, W, 3]`` float array in [0, 1]
    (video models). ``callback(step, num_steps)`` is called after each denoising step.
    """
    import mixdit
    from mixdit.config import config_to_dict
    from mixdit.pipelines.adapters import adapter_for

    request.validate()
    adapter = adapter_for(pipe)
    if request.features:
        mixdit.apply(pipe, **request.features)
    else:
        mixdit.remove(pipe)
    kwargs = pipeline_kwargs(pipe, adapter.family, adapter.is_video, request)
    if callback is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
        total = kwargs.get("num_inference_steps")

        def _on_step_end(p, i, t, callback_kwargs):
            callback(i + 1, total)
            return callback_kwargs

        kwargs["callback_on_step_end"] = _on_step_end
    start = time.perf_counter()
    out = pipe(**kwargs)
    seconds = time.perf_counter() - start
    result = out.frames[0] if adapter.is_video else out.images
    meta = {
        "prompt": request.prompt,
        "negative_prompt": request.negative_prompt,
        "model": request.model,
        "steps": kwargs.get("num_inference_steps"),
        "seed": request.seed,
        "height": kwargs.get("height"),
        "width": kwargs.get("width"),
        "guidance_scale": kwargs.get("guidance_scale"),
        "scheduler": type(pipe.scheduler).__name__,
        "device": request.device,
        "dtype": request.dtype,
        "mixdit_version": mixdit.__version__,
        "seconds": round(seconds, 3),
        "features": {k: (config_to_dict(v) if dataclasses.is_dataclass(v) else v) for k, v in request.features.items()},
    }
    if adapter.is_video:
        meta["frames"] = kwargs.get("num_frames")
        meta["fps"] = request.fps
    meta["summary"] = mixdit.summary(pipe).get("features", {})
    return result, meta, seconds


def default_output_path(request: GenerationRequest, is_video: bool, out_dir: str = "outputs") -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in request.prompt.lower())[:40].strip("-") or "output"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(out_dir) / f"{stamp}-{slug}-{request.seed}.{'mp4' if is_video else 'png'}"
