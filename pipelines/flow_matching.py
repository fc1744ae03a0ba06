"""The flow-matching (rectified flow) objective shared by mixdit's trainers.

``x_t = (1 − σ)·x0 + σ·ε`` and the network predicts the velocity ``ε − x0``, as in diffusers'
SD3 / FLUX / Wan training scripts and their ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

from typing import Callable

import torch


def flow_matching_loss(predict: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, sigmas: torch.Tensor,
                       generator: torch.Generator, weighting: torch.Tensor | None = None) -> torch.Tensor:
    """Mean (optionally weighted) squared error of ``predict(x_t)`` against ``ε − x0``.

    ``sigmas``: one noise level in [0, 1] per sample; ``generator`` draws ``ε`` on its own device (a
    CPU generator makes a run reproducible on any device, a CUDA one saves the copy); ``weighting``
    broadcasts against ``x0`` (e.g. diffusers' ``compute_loss_weighting_for_sd3``).
    """
    b = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=generator.device).to(x0.device)
    s = sigmas.to(x0.device).view(b, *([1] * (x0.ndim - 1)))
    x_t = (1.0 - s) * x0 + s * noise
    err = (predict(x_t).float() - (noise - x0).float()) ** 2
    if weighting is not None:
        err = weighting.float() * err
    return err.mean()


def _shift_key(config) -> str | None:
    """Where a scheduler config keeps its static noise-level shift: Wan's UniPC ``flow_shift``, SD3's
    FlowMatchEuler ``shift``; None without one (e.g. FLUX's dynamic shifting)."""
    if config.get("use_dynamic_shifting"):
        return None
    return "flow_shift" if "flow_shift" in config else "shift" if "shift" in config else None


def scheduler_shift(scheduler) -> float | None:
    """The scheduler's static shift, or None when it has none."""
    key = _shift_key(scheduler.config)
    value = scheduler.config[key] if key else None
    return None if value is None else float(value)


def with_sampling_shift(scheduler, shift: float):
    """``scheduler`` with its static shift set to ``shift``; the same object when it already has it.
    Raises ``ValueError`` for schedulers without one."""
    key = _shift_key(scheduler.config)
    if key is None:
        raise ValueError(f"{type(scheduler).__name__} has no static shift to set")
    if scheduler_shift(scheduler) == float(shift):
        return scheduler
    return type(scheduler).from_config(scheduler.config, **{key: float(shift)})
