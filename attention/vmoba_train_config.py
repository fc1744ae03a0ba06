"""Settings of ``mixdit train vmoba`` (:class:`TrainConfig`) and their checks, without torch: the CLI builds its
options from these defaults without loading torch. The trainer is :mod:`mixdit.attention.vmoba_train`, which
re-exports these names.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mixdit.config import check_choice, check_number
from mixdit.errors import ConfigError

EXPERTS = ("transformer", "transformer_2")
MIXED_PRECISIONS = ("no", "bf16", "fp16")
TIMESTEP_SAMPLINGS = ("uniform", "logit_normal", "mode")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@dataclass
class TrainConfig:
    """Settings of one VMoBA training run (CLI flags use the same names with dashes).

    model: built-in name / pipeline folder / hub id / transformer-only folder, or a diffusers
        pipeline or transformer object (Python only).
    data: ``synthetic:N``, a folder of latent files, or a folder of videos (see the module doc).
    vmoba: a :class:`~mixdit.attention.vmoba.VMoBAConfig`, a dict of its fields, ``True``
        (defaults) or ``None``/``False`` (dense training, the baseline).
    height / width / frames: pixel size of the clips (videos and ``synthetic:N``); default: the
        model's built-in defaults (the zoo's or a testbed folder's, as `mixdit generate` uses) or Wan's 480 x 832 x 81.
    steps: optimizer steps; each consumes ``batch_size x gradient_accumulation_steps`` samples
        per process.
    save_every: also save ``OUT/checkpoint-<step>/<expert>`` every this many steps (0: only at
        the end).
    gradient_checkpointing: recompute each transformer block in the backward instead of keeping its
        activations; attention is not computed again (its output, lse and VMoBA's selection are kept,
        one attention output per block) unless ``recompute_attention`` (the least memory).
    flow_shift: shift of the training sigmas; None: the pipeline scheduler's ``flow_shift`` /
        ``shift`` (3.0 if it has neither).
    record_samples: debug: per-rank JSON with the sample indices each rank saw and a checksum of
        its final weights; ``{rank}`` in the path is replaced, else ``.rank<r>`` is inserted
        before the suffix.
    """

    model: Any = "tiny-wan"
    data: str = "synthetic:16"
    out: str = "outputs/train-vmoba"
    expert: str = "transformer"
    steps: int = 100
    learning_rate: float = 1e-5
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 0
    height: int | None = None
    width: int | None = None
    frames: int | None = None
    vmoba: Any = True
    save_every: int = 0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    recompute_attention: bool = False
    weight_decay: float = 1e-4
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    flow_shift: float | None = None
    max_sequence_length: int = 226
    cache_dir: str | None = None
    cpu: bool = False
    num_workers: int = 0
    record_samples: str | None = None
    progress: bool = True
    save: bool = True

    def validate(self) -> None:
        """Check every field a user can get wrong (before any model is loaded)."""
        check_choice("expert", self.expert, EXPERTS)
        check_number("steps", self.steps, 1, integer=True)
        check_number("learning_rate", self.learning_rate, 0.0, lo_open=True)
        check_number("batch_size", self.batch_size, 1, integer=True)
        check_number("gradient_accumulation_steps", self.gradient_accumulation_steps, 1, integer=True)
        check_number("seed", self.seed, 0, integer=True)
        check_number("save_every", self.save_every, 0, integer=True)
        check_choice("mixed_precision", self.mixed_precision, MIXED_PRECISIONS)
        check_choice("timestep_sampling", self.timestep_sampling, TIMESTEP_SAMPLINGS)
        check_number("weight_decay", self.weight_decay, 0.0)
        check_number("adam_beta1", self.adam_beta1, 0.0, 1.0)
        check_number("adam_beta2", self.adam_beta2, 0.0, 1.0)
        check_number("adam_epsilon", self.adam_epsilon, 0.0, lo_open=True)
        check_number("max_grad_norm", self.max_grad_norm, 0.0)
        check_number("logit_std", self.logit_std, 0.0, lo_open=True)
        check_number("max_sequence_length", self.max_sequence_length, 1, integer=True)
        check_number("num_workers", self.num_workers, 0, integer=True)
        if self.flow_shift is not None:
            check_number("flow_shift", self.flow_shift, 0.0, lo_open=True)
        if self.recompute_attention and not self.gradient_checkpointing:
            raise ConfigError("recompute_attention", True, "only with gradient_checkpointing (nothing is recomputed without it)")
        for name in ("height", "width"):
            value = getattr(self, name)
            if value is not None:
                check_number(name, value, 16, integer=True)
                if value % 16:
                    raise ConfigError(name, value, "a multiple of 16 (VAE factor 8 x patch 2)")
        if self.frames is not None:
            check_number("frames", self.frames, 1, integer=True)
            if (self.frames - 1) % 4:
                raise ConfigError("frames", self.frames, "4k + 1 frames (1, 5, 9, ..., 81): the Wan VAE packs 4 frames per latent frame")
        if self.mixed_precision == "fp16" and (self.cpu or not _cuda_available()):
            raise ConfigError("mixed_precision", self.mixed_precision, "'no' or 'bf16' on CPU (fp16 needs a GPU)")
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise ConfigError("out", self.out, "an output folder path")
        parse_data_spec(self.data)  # raises ConfigError
        self.vmoba = resolve_vmoba_config(self.vmoba)


# what training changes in VMoBAConfig's defaults: every layer stays sparse (the inference-speed
# dense-fallback rule is off) unless the user sets the field
TRAINING_VMOBA_DEFAULTS = {"max_tile_density": 1.0}


def resolve_vmoba_config(vmoba):
    """``True`` -> default ``VMoBAConfig``; dict -> ``VMoBAConfig(**dict)``; None/False -> None.

    Training keeps every layer sparse: the inference-speed dense-fallback rule
    (``max_tile_density``) is off (1.0) unless the dict sets it."""
    if vmoba is None or vmoba is False:
        return None
    from mixdit.attention.vmoba_config import VMoBAConfig

    if vmoba is True:
        return VMoBAConfig(**TRAINING_VMOBA_DEFAULTS)
    if isinstance(vmoba, dict):
        vmoba = {**TRAINING_VMOBA_DEFAULTS, **vmoba}
        known = {f.name for f in dataclasses.fields(VMoBAConfig)}
        unknown = sorted(set(vmoba) - known)
        if unknown:
            raise ConfigError(f"vmoba.{unknown[0]}", vmoba[unknown[0]], "a field of VMoBAConfig: " + ", ".join(sorted(known)))
        return VMoBAConfig(**vmoba)
    if isinstance(vmoba, VMoBAConfig):
        vmoba.validate()
        return vmoba
    raise ConfigError("vmoba", vmoba, "a VMoBAConfig, a dict of its fields, True or None")


def parse_data_spec(data) -> tuple[str, Any]:
    """``("synthetic", N)`` or ``("folder", Path)``; ConfigError for anything else."""
    if not isinstance(data, (str, os.PathLike)) or not str(data):
        raise ConfigError("data", data, "synthetic:N or a folder of videos / latent files")
    text = os.fspath(data)
    if text.startswith("synthetic:"):
        count = text.split(":", 1)[1]
        if not count.isdigit() or int(count) < 1:
            raise ConfigError("data", text, "synthetic:N with N >= 1 (e.g. synthetic:64)")
        return "synthetic", int(count)
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ConfigError("data", text, "an existing folder of videos (.mp4/.gif/...) or latent files "
                                        "(.pt/.safetensors), or synthetic:N (folder not found)")
    return "folder", path
