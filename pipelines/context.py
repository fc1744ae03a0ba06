"""The per-forward context that attention code reads.

One :class:`ForwardContext` is built by a ``diffusers.hooks`` hook on each denoiser call (see
``mixdit.api``) and made current for the duration of that call; attention processors installed
by mixdit read it through :func:`current_context` instead of re-deriving anything.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Any

@dataclass
class ForwardContext:
    """What attention code may know about the current denoiser forward.

    ``grid`` is the latent grid after patchify as (frames, height, width) (images: frames = 1).
    ``text_position``: where text tokens sit in the self-attention sequence: ``"before"`` the
    image/video tokens (FLUX, CogVideoX), ``"after"`` them (SD3, HunyuanVideo), or ``"cross"``
    (text only enters through cross-attention: Wan). ``row_roles`` names each batch row
    (``uncond``/``cond``/``perturbed``). ``step_index``/``num_steps`` are None when the denoiser is
    called outside a pipeline's denoising loop (then step-based rules such as dense warm-up are off).
    """

    family: str
    denoiser_name: str = "transformer"
    step_index: int | None = None
    num_steps: int | None = None
    timestep: float | None = None
    grid: tuple[int, int, int] | None = None
    text_len: int = 0
    text_position: str = "none"
    batch_size: int = 1
    row_roles: tuple[str, ...] | None = None
    num_layers: int = 0
    layer_index: int | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def num_visual_tokens(self) -> int:
        f, h, w = self.grid or (0, 0, 0)
        return f * h * w


_CURRENT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("mixdit_forward_context", default=None)


def current_context() -> ForwardContext | None:
    """The context of the denoiser forward now running, or None outside one."""
    return _CURRENT.get()


def set_context(ctx: ForwardContext | None):
    """Make ``ctx`` current; returns a token for :func:`reset_context`."""
    return _CURRENT.set(ctx)


def reset_context(token) -> None:
    _CURRENT.reset(token)


def checkpoint_keeping_context(module, *args):
    """``torch.utils.checkpoint`` (non-reentrant) whose recomputation runs under the same mixdit
    forward context as the forward did, so mixdit's features (e.g. VMoBA, not dense attention) are
    recomputed. Needed because the context is a context variable and autograd recomputes in its own
    thread. Pass it to ``model.enable_gradient_checkpointing(checkpoint_keeping_context)``."""
    from torch.utils.checkpoint import checkpoint

    ctx = current_context()

    def run(*a):
        if ctx is None or current_context() is ctx:
            return module(*a)
        token = set_context(ctx)
        try:
            return module(*a)
        finally:
            reset_context(token)

    return checkpoint(run, *args, use_reentrant=False)
