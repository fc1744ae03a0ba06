"""Head-level perturbation guidance (PAG / SoftPAG / SoftUG / SoftSEG on chosen attention heads).

    import mixdit
    from mixdit.guidance.perturbation import GuidanceConfig
    mixdit.apply(pipe, guidance=GuidanceConfig(heads="L13H18,L14H*,L2", scale=3.0, softpag=0.5))
    image = pipe(prompt, guidance_scale=5.0).images[0]      # the pipeline's own, unmodified __call__

Guided prediction: ``eps = eps_u + w (eps_c - eps_u) + s (eps_c - eps_p)``, where ``eps_p`` is the
conditional prediction with the chosen heads' attention map ``A`` replaced by ``(1-u) A + u P``:

* ``identity``       ``P = I`` over the whole joint sequence (the HeadHunter paper's PAG); linear in A,
                     so the perturbed head output is ``(1-u) softmax(QK^T)V + u V`` (no N x N map);
* ``identity_image`` diffusers' SD3 PAG semantics: image queries attend only to their own image key
                     and to all text keys (image x image block = identity, softmax over the rest); text
                     rows untouched. Computed from an image x text score block, never an N x N map;
* ``uniform``        ``P = 1/N`` (SoftUG): ``(1-u) out + u mean(V)``;
* ``mean_query``     ``P`` = every row ``softmax(mean(Q) K^T)`` (SoftSEG, the infinite-blur limit of
                     smoothed energy guidance): one extra query row, no N x N map.

How it rides in the pipeline's batch: ``pre_forward`` appends, for every ``cond`` row of the denoiser
call, one perturbed copy (``ctx.row_roles`` names them); the perturbed heads' attention output is
transformed on diffusers' SDPA path; ``post_forward`` splits the perturbed rows off and folds the
perturbation into the conditional prediction: ``eps_c <- eps_c + (s / w)(eps_c - eps_p)`` when the
pipeline will apply CFG with scale ``w`` (``w = 1`` when it applies none), so the pipeline's own CFG
combine yields the formula above.

Shared prefix: conditional and perturbed rows are identical up to the first perturbed layer. Blocks
before it run once on the original rows only (a pre-hook slices the per-row block arguments); the
block holding the first perturbed layer expands them again (appending copies of the cond rows).
"""

from __future__ import annotations

import contextlib
import inspect
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mixdit.api import Feature, register_feature, session_of
from mixdit.errors import ConfigError
from mixdit.guidance.config import MODES, GuidanceConfig
from mixdit.guidance.heads import format_heads, head_counts, resolve_heads
from mixdit.pipelines.context import ForwardContext, current_context

PLAN_KEY = "guidance"


# ------------------------------------------------------------------------------------------------
# attention math (shared by the feature and the tests' references)
# ------------------------------------------------------------------------------------------------
def image_query_slice(seq_len: int, text_len: int, text_position: str) -> slice:
    """Where the image/video tokens sit in a self-attention sequence of ``seq_len`` tokens."""
    if text_position == "after" and text_len:
        return slice(0, seq_len - text_len)
    if text_position == "before" and text_len:
        return slice(text_len, seq_len)
    return slice(0, seq_len)


def _additive(mask: torch.Tensor | None, dtype) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def perturbation_target(q, k, v, mode: str, *, attn_mask=None, scale=None, text_len: int = 0,
                        text_position: str = "none") -> tuple[torch.Tensor, slice]:
    """``P @ V`` for the perturbed map ``P`` of ``mode``, for rows ``[R, H, S, D]``.

    Returns (target, query slice): target is ``[R, H, S_sel or 1, D]`` for the queries in the slice
    (broadcast over them when its dim 2 is 1)."""
    S = q.shape[2]
    if mode == "identity":
        return v, slice(0, S)
    if mode == "uniform":
        if attn_mask is None:
            return v.mean(dim=2, keepdim=True), slice(0, S)
        return F.scaled_dot_product_attention(torch.zeros_like(q), k, v, attn_mask=attn_mask), slice(0, S)
    if mode == "mean_query":
        qm = q.float().mean(dim=2, keepdim=True).to(q.dtype)
        if attn_mask is None:
            return F.scaled_dot_product_attention(qm, k, v, scale=scale), slice(0, S)
        return F.scaled_dot_product_attention(qm.expand_as(q), k, v, attn_mask=attn_mask, scale=scale), slice(0, S)
    if mode == "identity_image":
        img = image_query_slice(S, text_len, text_position)
        sc = scale if scale is not None else 1.0 / math.sqrt(q.shape[-1])
        qi, ki, vi = q[:, :, img].float(), k[:, :, img].float(), v[:, :, img].float()
        diag = (qi * ki).sum(-1, keepdim=True) * sc  # [R, H, N, 1]: each image query with its own key
        txt = [i for i in range(S) if not (img.start <= i < img.stop)]
        add = _additive(attn_mask, torch.float32)
        if add is not None:
            add = add.expand(q.shape[0], q.shape[1], S, k.shape[2])
            diag = diag + add[:, :, img, img].diagonal(dim1=-2, dim2=-1).unsqueeze(-1)
        if txt:
            t = slice(txt[0], txt[-1] + 1)
            kt, vt = k[:, :, t].float(), v[:, :, t].float()
            logits = torch.cat([diag, (qi @ kt.transpose(-1, -2)) * sc
                                + (add[:, :, img, t] if add is not None else 0)], dim=-1)
            p = torch.softmax(logits, dim=-1)
            target = p[..., :1] * vi + p[..., 1:] @ vt
        else:
            target = vi
        return target.to(v.dtype), img
    raise ConfigError("guidance.mode", mode, "one of " + ", ".join(MODES))


def blend_perturbation(out, q, k, v, weight, mode: str, **kw) -> torch.Tensor:
    """``(1 - w) out + w (P V)`` for rows ``[R, H, S, D]`` with per-(row, head) ``weight [R, H]``
    (``u`` times the head mask); rows/heads with weight 0 are returned unchanged."""
    target, sel = perturbation_target(q, k, v, mode, **kw)
    w = weight.to(out.dtype)[:, :, None, None]
    res = out.clone()
    o = out[:, :, sel]
    res[:, :, sel] = o + w * (target - o)
    return res


def explicit_perturbed_attention(q, k, v, weight, mode: str, *, scale=None, text_len: int = 0,
                                 text_position: str = "none") -> torch.Tensor:
    """Naive reference with explicit N x N maps: ``((1 - w) A + w P) V`` (tests only; fp32)."""
    q, k, v = q.double(), k.double(), v.double()
    R, H, S, D = q.shape
    sc = scale if scale is not None else 1.0 / math.sqrt(D)
    A = torch.softmax((q @ k.transpose(-1, -2)) * sc, dim=-1)
    if mode == "identity":
        P = torch.eye(S, dtype=q.dtype).expand(R, H, S, S)
    elif mode == "uniform":
        P = torch.full((R, H, S, S), 1.0 / S, dtype=q.dtype)
    elif mode == "mean_query":
        P = torch.softmax((q.mean(2, keepdim=True) @ k.transpose(-1, -2)) * sc, dim=-1).expand(R, H, S, S)
    elif mode == "identity_image":
        img = image_query_slice(S, text_len, text_position)
        bias = torch.zeros(S, S, dtype=q.dtype)
        bias[img, img] = float("-inf")
        bias[img, img] = bias[img, img].fill_diagonal_(0)
        P = torch.softmax((q @ k.transpose(-1, -2)) * sc + bias, dim=-1)
    else:
        raise ValueError(mode)
    w = weight.double()[:, :, None, None]
    return (((1 - w) * A + w * P) @ v)


# ------------------------------------------------------------------------------------------------
# hooks
# ------------------------------------------------------------------------------------------------
_SIG_CACHE: dict[type, list[str]] = {}


def _param_names(module: torch.nn.Module) -> list[str]:
    cls = type(module)
    if cls not in _SIG_CACHE:
        params = list(inspect.signature(cls.forward).parameters)
        _SIG_CACHE[cls] = params[1:]  # drop self
    return _SIG_CACHE[cls]


def _map_row_args(module, args, kwargs, names, fn):
    """Apply ``fn`` to the per-row tensor arguments ``names`` of a call (positional or keyword)."""
    params = _param_names(module)
    args = list(args)
    for name in names:
        if name in kwargs:
            if torch.is_tensor(kwargs[name]):
                kwargs[name] = fn(kwargs[name])
        elif name in params:
            i = params.index(name)
            if i < len(args) and torch.is_tensor(args[i]):
                args[i] = fn(args[i])
    return tuple(args), kwargs


@dataclass
class _Plan:
    """What one denoiser call perturbs (stored in ``ctx.extras["guidance"]``)."""

    base: int  # rows of the call as the pipeline made it
    src: torch.Tensor  # cond row copied by each perturbed row
    head_sets: list[frozenset]  # perturbed heads of each perturbed row
    layers: set[int]
    fork: int  # first perturbed layer
    cfg_scale: float
    shared: bool
    softpag: float
    mode: str
    weights: dict = field(default_factory=dict)

    @property
    def num_perturbed(self) -> int:
        return len(self.head_sets)

    def weight(self, layer: int, num_heads: int, device) -> torch.Tensor | None:
        """Per-(perturbed row, head) weight ``[P, H]`` on ``device``; None when no head of ``layer`` is
        perturbed (decided on the host: no device sync)."""
        key = (layer, str(device))
        if key not in self.weights:
            w = torch.zeros(len(self.head_sets), num_heads, dtype=torch.float32)
            for r, hs in enumerate(self.head_sets):
                for (l_, h) in hs:
                    if l_ == layer and h < num_heads:
                        w[r, h] = self.softpag
            self.weights[key] = w.to(device) if bool((w > 0).any()) else None
        return self.weights[key]

    def expand(self, t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t, t.index_select(0, self.src.to(t.device))], dim=0)


# ------------------------------------------------------------------------------------------------
# the feature
# ------------------------------------------------------------------------------------------------
@register_feature
class PerturbationGuidance(Feature):
    """``mixdit.apply(pipe, guidance=GuidanceConfig(...))``; see the module docstring."""

    keyword, config_class = "guidance", GuidanceConfig

    def __init__(self, config: GuidanceConfig, adapter, pipe):
        super().__init__(config, adapter, pipe)
        self.heads_by_denoiser: dict[str, tuple] = {}
        for name, model in adapter.denoisers(pipe):  # range-check now: nothing is installed yet
            counts = head_counts(adapter, model)
            self.heads_by_denoiser[name] = resolve_heads(config.heads, len(counts), counts,
                                                         family=adapter.family)
        #: search mode: perturbed head set of each cond row (None = ``config.heads`` for every row)
        self.row_head_sets: list[frozenset] | None = None
        self._layout_override: tuple[tuple[str, ...], float] | None = None
        self._perturb_in_place = False  # guider mode: every row is the perturbed pass, no extra rows
        self._handles: list = []
        self.stats = {"perturbed_calls": 0, "perturbed_rows": 0, "last_fork_layer": None}

    # -- installation ------------------------------------------------------------------------
    def sites(self, model, denoiser_name):
        sites = self.adapter.attention_sites(model)
        layers = {l_ for l_, _ in self.heads_by_denoiser.get(denoiser_name, ())}
        if self.row_head_sets is not None:
            layers |= {l_ for hs in self.row_head_sets for l_, _ in hs}
        return [s for s in sites if s.layer_index in layers]

    def install(self, session) -> None:
        for name, model in self.adapter.denoisers(self.pipe):
            for layer, block in self.adapter.blocks(model):
                self._handles.append(block.register_forward_pre_hook(self._block_pre_hook(layer, model),
                                                                     with_kwargs=True))

    def uninstall(self, session) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- per call ----------------------------------------------------------------------------
    def _step(self, ctx: ForwardContext) -> tuple[int | None, int | None]:
        # the forward context knows the step inside any pipeline's denoising loop (mixdit.api)
        return ctx.step_index, ctx.num_steps

    def _in_window(self, ctx: ForwardContext) -> bool:
        if tuple(self.config.window) == (0.0, 1.0):
            return True
        step, num = self._step(ctx)
        if step is None or not num:
            return True
        frac = step / num
        start, stop = self.config.window
        return start <= frac < stop

    def pre_forward(self, ctx, model, args, kwargs):
        B = ctx.batch_size
        if self._layout_override is not None:
            roles, w = self._layout_override
        else:  # the forward context knows the rows' roles and the pipeline's CFG scale (mixdit.api)
            roles, w = ctx.row_roles or (), ctx.extras.get("cfg_scale", 1.0)
        if self.config.cfg_scale is not None and w != 1.0:
            w = float(self.config.cfg_scale)
        if len(roles) != B:
            return args, kwargs
        ctx.row_roles = tuple(roles)
        if (self.config.scale == 0 or self.config.softpag == 0 or kwargs.get("skip_layers") is not None
                or not self._in_window(ctx)):
            return args, kwargs
        cond = [i for i, r in enumerate(roles) if r == "cond"]
        if self._perturb_in_place:
            cond = list(range(B))
        if not cond:
            return args, kwargs
        if self.row_head_sets is not None:
            if len(self.row_head_sets) != len(cond):
                raise ValueError(f"guidance search: {len(self.row_head_sets)} head sets for {len(cond)} cond rows")
            head_sets = [frozenset(hs) for hs in self.row_head_sets]
        else:
            head_sets = [frozenset(self.heads_by_denoiser.get(ctx.denoiser_name, ()))] * len(cond)
        layers = {l_ for hs in head_sets for l_, _ in hs}
        if not layers:
            return args, kwargs
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        plan = _Plan(base=B, src=torch.tensor(cond, dtype=torch.long, device=hidden.device), head_sets=head_sets,
                     layers=layers, fork=min(layers), cfg_scale=max(float(w), 1e-12),
                     shared=self.config.shared_prefix and not self._perturb_in_place,
                     softpag=float(self.config.softpag), mode=self.config.mode)
        self.stats["perturbed_calls"] += 1
        self.stats["perturbed_rows"] += len(cond)
        self.stats["last_fork_layer"] = plan.fork
        ctx.extras[PLAN_KEY] = plan
        if self._perturb_in_place:  # every row is perturbed, in place: mark all rows and add none
            plan.base = 0
            ctx.row_roles = ("perturbed",) * B
            return args, kwargs
        names = [n for n in self.adapter.row_args]

        def expand(t):
            return plan.expand(t) if t.ndim >= 1 and t.shape[0] == B else t

        args, kwargs = _map_row_args(model, args, kwargs, names, expand)
        ctx.row_roles = tuple(roles) + ("perturbed",) * len(cond)
        ctx.batch_size = B + len(cond)
        return args, kwargs

    def _block_pre_hook(self, layer: int, model):
        names = self.adapter.block_row_args

        def hook(block, args, kwargs):
            ctx = current_context()
            plan = None if ctx is None else ctx.extras.get(PLAN_KEY)
            if plan is None or not plan.shared or plan.fork == 0:
                return None
            B, total = plan.base, plan.base + plan.num_perturbed
            if layer < plan.fork:  # prefix: the perturbed rows equal their cond rows, run the originals only
                fn = (lambda t: t[:B] if t.ndim >= 1 and t.shape[0] == total else t)
            else:  # first block at/after the fork: append the perturbed copies
                fn = (lambda t: plan.expand(t) if t.ndim >= 1 and t.shape[0] == B else t)
            return _map_row_args(block, args, dict(kwargs), names, fn)

        return hook

    def post_forward(self, ctx, model, output):
        plan = ctx.extras.pop(PLAN_KEY, None) if ctx is not None else None
        if plan is None or plan.base == 0:
            return output
        sample = output[0] if isinstance(output, tuple) else output.sample
        B = plan.base
        main, pert = sample[:B], sample[B:]
        cond = main.index_select(0, plan.src).float()
        coef = self.config.scale / plan.cfg_scale
        guided = cond + coef * (cond - pert.float())
        main = main.clone()
        main.index_copy_(0, plan.src, guided.to(main.dtype))
        ctx.batch_size = B
        ctx.row_roles = ctx.row_roles[:B] if ctx.row_roles else ctx.row_roles
        if isinstance(output, tuple):
            return (main,) + tuple(output[1:])
        output.sample = main
        return output

    # -- attention ---------------------------------------------------------------------------
    def wants(self, site, ctx):
        plan = ctx.extras.get(PLAN_KEY)
        return plan is not None and site.layer_index in plan.layers

    def transform(self, call, out):
        plan = call.ctx.extras.get(PLAN_KEY)
        if plan is None:
            return out
        B, P = plan.base, plan.num_perturbed
        if out.shape[0] != B + P:
            return out
        weight = plan.weight(call.site.layer_index, out.shape[1], out.device)
        if weight is None:
            return out
        mask = call.attn_mask
        if mask is not None and mask.ndim == 4 and mask.shape[0] == B + P:
            mask = mask[B:]
        ctx = call.ctx
        out[B:] = blend_perturbation(out[B:], call.query[B:], call.key[B:], call.value[B:], weight, plan.mode,
                                     attn_mask=mask, scale=call.scale, text_len=ctx.text_len,
                                     text_position=ctx.text_position)
        return out

    def summary(self) -> dict:
        d = self.config.to_dict()
        d["heads"] = {name: format_heads(h) for name, h in self.heads_by_denoiser.items()}
        d.update(self.stats)
        return d


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def guidance_feature(pipe) -> PerturbationGuidance | None:
    """The installed guidance feature of ``pipe`` (after ``mixdit.apply(pipe, guidance=...)``)."""
    session = session_of(pipe)
    if session is None:
        return None
    for f in session.features:
        if isinstance(f, PerturbationGuidance):
            return f
    return None


@contextlib.contextmanager
def row_layout(pipe_or_model, roles, cfg_scale: float = 1.0):
    """Name the rows of bare denoiser calls (benchmarks, tests): e.g. ``("uncond", "cond")`` with the
    CFG scale the caller will apply. Pipelines need nothing: their adapter knows the layout."""
    feature = guidance_feature(pipe_or_model)
    if feature is None:
        raise ConfigError("guidance", None, "mixdit.apply(pipe_or_model, guidance=GuidanceConfig(...)) first")
    old = feature._layout_override
    feature._layout_override = (tuple(roles), float(cfg_scale))
    try:
        yield feature
    finally:
        feature._layout_override = old


