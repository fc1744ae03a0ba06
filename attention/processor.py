"""The one attention processor mixdit installs.

It wraps the module's own diffusers processor (so projections, norms, RoPE, I2V branches and every
other family detail stay diffusers' code) and, for the duration of that processor's call, catches
its ``scaled_dot_product_attention`` with a :class:`torch.overrides.TorchFunctionMode`. Features
then compute the attention (VMoBA) and/or transform its per-head output (head perturbation, MoH).

The wrapped copy of the processor is pinned to diffusers' ``native`` backend so that the attention
call really is ``torch.nn.functional.scaled_dot_product_attention``; the user's original processor
object is kept untouched and put back by ``mixdit.remove``.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from mixdit.errors import UnsupportedModelError
from mixdit.pipelines.context import ForwardContext, current_context

if TYPE_CHECKING:  # pragma: no cover
    from mixdit.pipelines.adapters import AttentionSite


@dataclass
class AttentionCall:
    """One attention call as a feature sees it. Tensors are ``[B, H, S, D]`` (SDPA layout)."""

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    attn_mask: torch.Tensor | None
    scale: float | None
    ctx: ForwardContext
    site: "AttentionSite"
    extra: dict[str, Any]

    def dense(self) -> torch.Tensor:
        """Plain SDPA on the original inputs (what diffusers would have computed)."""
        return F.scaled_dot_product_attention(self.query, self.key, self.value, attn_mask=self.attn_mask,
                                              scale=self.scale, **self.extra)


class _CatchSDPA(TorchFunctionMode):
    def __init__(self, processor: "MixditAttnProcessor", ctx: ForwardContext, active: list):
        super().__init__()
        self.processor, self.ctx, self.active = processor, ctx, active

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        q, k, v = bound.pop("query"), bound.pop("key"), bound.pop("value")
        attn_mask, scale = bound.pop("attn_mask", None), bound.pop("scale", None)
        extra = {k_: v_ for k_, v_ in bound.items() if v_ not in (None, False, 0.0)}
        call = AttentionCall(q, k, v, attn_mask, scale, self.ctx, self.processor.site, extra)
        return self.processor.session.run_attention(call, self.active)


def parallelism_unsupported(what: str) -> UnsupportedModelError:
    """The error for a denoiser sharded by diffusers' ``enable_parallelism``: with context parallelism each rank holds
    a slice of the sequence and the processors exchange the rest, which the wrapped copy (pinned to the native
    backend) would skip, attending within the slice; tensor parallelism is untested with mixdit."""
    return UnsupportedModelError(
        f"{what} is sharded by diffusers' enable_parallelism (context or tensor parallelism), which mixdit's features "
        "do not support: mixdit.remove() gives diffusers' own processors back; or apply mixdit to an unsharded model "
        "(mixdit batch spreads whole generations over GPUs instead)")


class MixditAttnProcessor:
    """Wraps one module's diffusers processor; see the module docstring."""

    def __init__(self, original, site: "AttentionSite", session):
        self.original = original
        self.site = site
        self.session = session
        self.inner = copy.copy(original)
        if hasattr(self.inner, "_attention_backend"):
            self.inner._attention_backend = "native"
        # diffusers' legacy `Attention.forward` drops keyword arguments (e.g. HunyuanVideo's
        # `image_rotary_emb`) that `inspect.signature(processor.__call__)` does not list: expose the
        # wrapped processor's signature on the instance (calls still go through the class method).
        def signature_proxy(*args, **kwargs):
            return type(self).__call__(self, *args, **kwargs)

        try:
            signature_proxy.__signature__ = inspect.signature(original.__call__)
        except (TypeError, ValueError):
            pass
        self.__dict__["__call__"] = signature_proxy

    # eager inside a compiled model (a graph break per patched module): dynamo tracing the caught SDPA call gave
    # wrong outputs, and the features' kernels have data-dependent shapes and host syncs
    @torch.compiler.disable
    def __call__(self, attn, *args, **kwargs):
        ctx = current_context()
        active = self.session.active_features(self.site, ctx) if ctx is not None else []
        if not active:
            return self.original(attn, *args, **kwargs)
        if getattr(self.original, "_parallel_config", None) is not None:  # sharded after mixdit.apply
            raise parallelism_unsupported(f"the denoiser of {self.site.name}")
        ctx.layer_index = self.site.layer_index
        with _CatchSDPA(self, ctx, active):
            return self.inner(attn, *args, **kwargs)

    def __setattr__(self, name, value):
        # diffusers' enable_parallelism after mixdit.apply configures the processor it finds, this wrapper: the original
        # keeps the setting (remove() hands it back configured), and calls with an active feature refuse it
        if name == "_parallel_config":
            setattr(self.original, name, value)
        else:
            object.__setattr__(self, name, value)

    def __getattr__(self, name):  # diffusers inspects processor attributes (e.g. signature checks)
        if name in ("original", "inner", "site", "session"):
            raise AttributeError(name)
        return getattr(self.original, name)
