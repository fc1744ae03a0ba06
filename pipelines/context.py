"""The per-forward context that attention code reads.

One :class:`ForwardContext` is built by a ``diffusers.hooks`` hook on each denoiser call (see
``mixdit.api``) and made current for the duration of that call; attention processors installed
by mixdit read it through :func:`current_context` instead of re-deriving anything.
"""

from __future__ import annotations

import contextlib
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


class AttentionKeep:
    """Attention results of one checkpointed call, kept from its forward for its recomputation.

    Gradient checkpointing runs a block's forward twice: once without keeping activations, once more in the
    backward to rebuild them. Attention is the costly part and its backward needs only q, k, v, the output and
    its lse, so :func:`kept` stores what a kernel call computed (and the router's selection) in the first pass
    and hands it back, in call order, in the second: q, k, v are recomputed by the cheap projections, the
    attention kernels do not run again. One instance per checkpointed call (``torch.utils.checkpoint``'s
    ``context_fn``); its entries are dropped when the recomputation ends."""

    def __init__(self):
        self.entries: list = []
        self.replay_at: int | None = None  # next entry to hand back; None while recording

    @contextlib.contextmanager
    def _scope(self, replay: bool):
        token = _KEEP.set(self)
        self.replay_at = 0 if replay else None
        try:
            yield
        finally:
            _KEEP.reset(token)
            if replay:
                self.entries.clear()

    def recording(self):
        return self._scope(replay=False)

    def replaying(self):
        return self._scope(replay=True)


_KEEP: contextvars.ContextVar[AttentionKeep | None] = contextvars.ContextVar("mixdit_attention_keep", default=None)


def kept(kind: str, compute):
    """``compute()``, except inside a checkpointed call that keeps attention (:class:`AttentionKeep`): there the
    forward's result is stored and the recomputation gets it back instead of computing it again. ``kind`` names
    the call site (a recomputation that takes another path computes as usual). ``compute`` must not build an
    autograd graph of its own (kernel forwards inside an ``autograd.Function``, routers): what it returns is
    handed back as is."""
    keep = _KEEP.get()
    if keep is None:
        return compute()
    if keep.replay_at is None:
        result = compute()
        keep.entries.append((kind, _detached(result)))
        return result
    if keep.replay_at < len(keep.entries) and keep.entries[keep.replay_at][0] == kind:
        keep.replay_at += 1
        return _detached(keep.entries[keep.replay_at - 1][1])
    return compute()


def _detached(result):
    # fresh tensor objects on the same storage: an autograd.Function returning them attaches its node to these,
    # never to the kept ones (which would then hold the graph alive)
    if type(result) is tuple:  # plain tuples only (a NamedTuple or dataclass is handed back as it is)
        return tuple(_detached(x) for x in result)
    return result.detach() if hasattr(result, "detach") and hasattr(result, "grad_fn") else result


def keeping_attention() -> bool:
    """Whether a call now runs inside a checkpointed call that keeps attention results."""
    return _KEEP.get() is not None


# dense attention kept the same way through PyTorch's selective checkpointing: these ops' outputs are saved
_SDPA_OPS = ("_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")


def _keep_contexts():
    """``context_fn`` of ``torch.utils.checkpoint``: (forward, recomputation) contexts that keep mixdit's attention
    kernels' results (:func:`kept`) and PyTorch's SDPA outputs (selective checkpointing) for the recomputation."""
    import torch
    from torch.utils.checkpoint import create_selective_checkpoint_contexts

    ops = [getattr(torch.ops.aten, name).default for name in _SDPA_OPS if hasattr(torch.ops.aten, name)]
    sac_forward, sac_recompute = create_selective_checkpoint_contexts(ops)
    keep = AttentionKeep()

    @contextlib.contextmanager
    def both(a, b):
        with a, b:
            yield

    return both(sac_forward, keep.recording()), both(sac_recompute, keep.replaying())


def checkpoint_keeping_context(module, *args, keep_attention: bool = True):
    """``torch.utils.checkpoint`` (non-reentrant) whose recomputation runs under the same mixdit
    forward context as the forward did, so mixdit's features (e.g. VMoBA, not dense attention) are
    recomputed. Needed because the context is a context variable and autograd recomputes in its own
    thread. Pass it to ``model.enable_gradient_checkpointing(checkpoint_keeping_context)``.

    ``keep_attention`` (default): the recomputation does not compute attention again — mixdit's kernels hand
    back the forward's outputs and selections (:func:`kept`), PyTorch's SDPA its saved outputs — at the memory
    of one attention output (+ lse and the selection) per checkpointed block; the backward is unchanged.
    False: everything is recomputed (the least memory)."""
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

    if keep_attention:
        return checkpoint(run, *args, use_reentrant=False, context_fn=_keep_contexts)
    return checkpoint(run, *args, use_reentrant=False)
