"""VMoBA: mixture-of-block attention for video DiTs (config, block partition, functional attention).

Rules follow the reference implementation (KwaiVGI/VMoBA ``src/vmoba.py``, ported in
hao-ai-lab/FastVideo ``fastvideo/attention/backends/vmoba.py``):

* Layer -> partition: ``(layer_index - layer_cycle_start) % 3`` = 0: 1D temporal chunks of
  ``temporal_block`` whole latent frames, 1: 2D spatial tubes ``spatial_block = (h, w)`` through
  all frames, 2: 3D cubes ``spatiotemporal_block = (t, h, w)`` (FastVideo: ``moba_layer =
  layer_idx - first_full_layer``, one layer of each type, published ``first_full_layer = 0``).
* Blocks are ordered (block-frame, block-row, block-col); inside a block tokens keep raster order
  (frame, row, col) — the reference's ``rearrange`` order. Non-dividing grids get partial blocks
  at the high end of each axis (the reference asserts divisibility for 2D/3D and keeps a short last
  chunk in 1D).
* Gate, own block, threshold / top-k / global selection: see :mod:`mixdit.kernels.router_reference`.
  Selection is strictly per sample (the reference's global mode mixes the CFG halves).
* Text tokens (joint attention models): every pair involving a text token is dense; video queries
  merge their sparse video part and dense text part exactly through log-sum-exp.

Public API: :class:`VMoBAConfig`, :func:`vmoba_attention`, :func:`vmoba_should_run_dense`,
:func:`layer_type_for`, :func:`get_partition` / :class:`VMoBAPartition`, :class:`VMoBAStats`.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from mixdit.attention.vmoba_config import (  # noqa: F401  (re-exported: the settings live there, torch-free)
    GRANULARITIES, HYBRID_LAUNCH, LAYER_TYPES, SELECTIONS, SORTED_QUERY_MAX_BLOCKS, VMoBAConfig, layer_type_for,
    vmoba_dense_reason, vmoba_fallback_reason, vmoba_should_run_dense,
)
from mixdit.config import check_choice
from mixdit.errors import ConfigError
from mixdit.pipelines.context import keeping_attention, kept


# ----------------------------------------------------------------------------------------------
# partition
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VMoBAPartition:
    """Index maps between raster token order and VMoBA's block layouts (all on one device).

    ``q_perm[p]``: raster token at block-order position ``p`` (block-contiguous, unpadded);
    ``q_inv[r]``: block-order position of raster token ``r`` (``out_raster = out_block[:, q_inv]``);
    ``kv_inv[r]``: padded key position of raster token ``r`` (its real row, not a pad copy);
    ``q_block[p]``: block of the query at position ``p`` (its own block);
    ``kv_perm[j]``: raster token at padded key position ``j`` (each block starts on a key-tile
    boundary; pad rows repeat the block's first token and are masked by ``kv_tile_len``);
    ``kv_tile_len[t]``/``kv_tile_group[t]``: real rows / block of key tile ``t``;
    ``block_tile_start[c]``/``block_tile_count[c]``: the key tiles of block ``c``;
    ``block_start[c]``/``block_size[c]``: block ``c`` in the unpadded block order.
    """

    layer_type: str
    grid: tuple
    block_shape: tuple  # clipped to the grid
    blocks_per_axis: tuple
    kv_tile: int
    q_perm: torch.Tensor
    q_inv: torch.Tensor
    q_block: torch.Tensor
    kv_perm: torch.Tensor
    kv_inv: torch.Tensor
    kv_tile_len: torch.Tensor
    kv_tile_group: torch.Tensor
    block_tile_start: torch.Tensor
    block_tile_count: torch.Tensor
    block_start: torch.Tensor
    block_size: torch.Tensor
    q_is_identity: bool
    kv_is_identity: bool

    @property
    def num_blocks(self) -> int:
        return self.block_size.numel()

    @property
    def num_kv_tiles(self) -> int:
        return self.kv_tile_len.numel()

    @property
    def max_block_tiles(self) -> int:
        """Key tiles of the largest block (a full one), from the shapes alone: no host sync."""
        return -(-math.prod(self.block_shape) // self.kv_tile)


def get_partition(grid, layer_type: str, block_shape, kv_tile: int = 128, device=None) -> VMoBAPartition:
    """Partition of a ``(frames, rows, cols)`` grid into blocks of ``block_shape`` (cached)."""
    grid = tuple(int(g) for g in grid)
    block_shape = tuple(int(b) for b in block_shape)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    return _partition_cached(grid, layer_type, block_shape, int(kv_tile), str(dev))


@functools.lru_cache(maxsize=64)
def _partition_cached(grid, layer_type, block_shape, kv_tile, device) -> VMoBAPartition:
    Fg, Hg, Wg = grid
    if min(grid) < 1:
        raise ConfigError("vmoba.grid", grid, "three integers >= 1")
    bt, bh, bw = (min(b, g) for b, g in zip(block_shape, grid))
    nbt, nbh, nbw = -(-Fg // bt), -(-Hg // bh), -(-Wg // bw)
    S = Fg * Hg * Wg
    f = torch.arange(Fg).view(-1, 1, 1).expand(grid)
    y = torch.arange(Hg).view(1, -1, 1).expand(grid)
    x = torch.arange(Wg).view(1, 1, -1).expand(grid)
    block = ((f // bt) * nbh + (y // bh)) * nbw + (x // bw)
    block = block.reshape(-1)
    NB = nbt * nbh * nbw
    raster = torch.arange(S)
    q_perm = torch.argsort(block * S + raster)  # block-major, raster inside a block
    q_inv = torch.empty_like(q_perm)
    q_inv[q_perm] = torch.arange(S)
    q_block = block[q_perm]
    block_size = torch.bincount(block, minlength=NB)
    block_start = torch.cumsum(block_size, 0) - block_size
    tiles = -(-block_size // kv_tile)
    block_tile_start = torch.cumsum(tiles, 0) - tiles
    n_kt = int(tiles.sum())
    kv_tile_group = torch.repeat_interleave(torch.arange(NB), tiles)
    local_tile = torch.arange(n_kt) - block_tile_start[kv_tile_group]
    kv_tile_len = (block_size[kv_tile_group] - local_tile * kv_tile).clamp(max=kv_tile)
    # padded key positions: block c's token number o sits at block_tile_start[c]*kv_tile + o
    local = torch.arange(S) - block_start[q_block]
    padded_pos = block_tile_start[q_block] * kv_tile + local
    kv_perm = q_perm[block_start[kv_tile_group].repeat_interleave(kv_tile)]  # block's first token
    kv_perm[padded_pos] = q_perm
    q_is_identity = bool(torch.equal(q_perm, raster))
    kv_is_identity = q_is_identity and n_kt * kv_tile == S

    def to(t):
        return t.to(device=device, dtype=torch.int32).contiguous()

    return VMoBAPartition(
        layer_type=layer_type, grid=grid, block_shape=(bt, bh, bw), blocks_per_axis=(nbt, nbh, nbw),
        kv_tile=kv_tile, q_perm=q_perm.to(device).contiguous(), q_inv=q_inv.to(device).contiguous(),
        q_block=to(q_block), kv_perm=kv_perm.to(device).contiguous(),
        kv_inv=padded_pos[q_inv].to(device).contiguous(), kv_tile_len=to(kv_tile_len),
        kv_tile_group=to(kv_tile_group), block_tile_start=to(block_tile_start),
        block_tile_count=to(tiles), block_start=to(block_start), block_size=to(block_size),
        q_is_identity=q_is_identity, kv_is_identity=kv_is_identity)


def partition_for_layer(grid, layer_index: int, config: VMoBAConfig, device=None) -> VMoBAPartition:
    lt = layer_type_for(layer_index, config)
    kv_tile = config.kv_tile
    if lt == "spatiotemporal" and config.kv_tile_spatiotemporal is not None:
        kv_tile = config.kv_tile_spatiotemporal
    return get_partition(grid, lt, config.block_shape(lt, grid), kv_tile, device)


# ----------------------------------------------------------------------------------------------
# stats
# ----------------------------------------------------------------------------------------------
@dataclass
class VMoBAStats:
    """Achieved density per layer type, accumulated as device tensors (no host sync until read).

    ``density``: selected key tokens / all video key tokens (what VMoBA's rule keeps);
    ``tile_density``: visited key tiles / all key tiles (what the kernel computes, incl. padding
    and the per-query-tile union). Dense calls are counted under ``"dense"``.
    """

    sums: dict = field(default_factory=dict)
    tile_sums: dict = field(default_factory=dict)
    counts: dict = field(default_factory=dict)

    def record(self, layer_type: str, density, tile_density=None) -> None:
        self.counts[layer_type] = self.counts.get(layer_type, 0) + 1
        for store, val in ((self.sums, density), (self.tile_sums, tile_density)):
            if val is None:
                continue
            val = val.detach() if torch.is_tensor(val) else torch.tensor(float(val))
            store[layer_type] = store[layer_type] + val if layer_type in store else val

    def as_dict(self) -> dict:
        """``{layer_type: {"calls", "density", "tile_density"}}`` (host sync happens here)."""
        out = {}
        for lt, n in self.counts.items():
            row = {"calls": n}
            if lt in self.sums:
                row["density"] = float(self.sums[lt]) / n
            if lt in self.tile_sums:
                row["tile_density"] = float(self.tile_sums[lt]) / n
            out[lt] = row
        return out

    def reset(self) -> None:
        self.sums.clear()
        self.tile_sums.clear()
        self.counts.clear()


def _stats_object(stats):
    if stats is None or isinstance(stats, VMoBAStats):
        return stats
    if isinstance(stats, dict):
        return stats.setdefault("vmoba", VMoBAStats())
    raise TypeError("stats must be a VMoBAStats, a dict or None")


# ----------------------------------------------------------------------------------------------
# kernels dispatch
# ----------------------------------------------------------------------------------------------
def _kernel_inputs(q, k, v):
    """q, k, v in the kernels' contract: head dim zero-padded to a power of two >= 16 (scores unchanged; slice
    the output back), fp32/fp64 computed in bf16 (the kernels run fp16/bf16 only)."""
    D = q.shape[-1]
    Dp = max(16, 1 << (D - 1).bit_length())
    dt = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.bfloat16
    if Dp != D:
        q, k, v = (F.pad(t, (0, Dp - D)) for t in (q, k, v))
    return q.to(dt), k.to(dt), v.to(dt)


def _kernel_attention(q, k, v, kv_count, kv_index, *, scale, **kw):
    """Block-sparse call adapted to the kernel's contract.

    * CUDA: the Triton kernel on :func:`_kernel_inputs`.
    * CPU with ``TRITON_INTERPRET=1`` and fp16/bf16 inputs: the same kernel, interpreted.
    * Any other CPU call (e.g. a tiny fp32 model): the exact fp32 PyTorch reference, which is
      O(S^2) memory and therefore only meant for small CPU runs.
    """
    if not _kernel_runs(q):
        from mixdit.kernels.reference import block_sparse_attention_reference
        return block_sparse_attention_reference(q, k, v, kv_count, kv_index, scale=scale, **kw)
    if keeping_attention() and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        out, lse = _kept_block_sparse(*_kernel_inputs(q, k, v), kv_count, kv_index, scale=scale, **kw)
    else:
        from mixdit.kernels import block_sparse_attention

        out, lse = block_sparse_attention(*_kernel_inputs(q, k, v), kv_count, kv_index, scale=scale, **kw)
    return out[..., :q.shape[-1]].to(q.dtype), lse


def _kept_block_sparse(q, k, v, kv_count, kv_index, *, scale, **kw):
    """The block-sparse kernel with gradients inside a checkpointed call that keeps attention: the forward's output
    is handed back to the recomputation (:func:`mixdit.pipelines.context.kept`), the backward is the kernel's."""
    from mixdit.kernels.block_sparse_attention import block_sparse_attention_backward, block_sparse_attention_forward
    from mixdit.kernels.key_block_attention import attention_with_grads

    def run(q_, k_, v_):
        return kept("vmoba.block_sparse",
                    lambda: (*block_sparse_attention_forward(q_, k_, v_, kv_count, kv_index, scale=scale, **kw), None))

    bwd = {name: val for name, val in kw.items() if name != "kv_full"}  # the backward does not use it

    def grads(grad_out, q_, k_, v_, out, lse, grad_lse):
        return block_sparse_attention_backward(grad_out, q_, k_, v_, out, lse, kv_count, kv_index, scale=scale,
                                               grad_lse=grad_lse, **bwd)

    out, lse, _ = attention_with_grads(q, k, v, run, grads)
    return out, lse


def _kernel_runs(q) -> bool:
    """Whether the Triton kernels take this call (CUDA, or fp16/bf16 under ``TRITON_INTERPRET=1``)."""
    return q.is_cuda or (q.dtype in (torch.float16, torch.bfloat16) and _triton_usable(q))


def attention_path(config: VMoBAConfig, part: VMoBAPartition, qb, kb, vb) -> str:
    """How :func:`vmoba_attention` computes a sparse call: ``"query_tiles"`` (one key set per query tile:
    ``granularity="query_tile"`` or ``tile_union_only``, or the exact rule in block order), ``"sorted_query_tiles"``
    (the exact rule, queries sorted by selection: layers of at most ``SORTED_QUERY_MAX_BLOCKS`` blocks),
    ``"hybrid"`` (:func:`mixdit.kernels.key_block_attention.hybrid_block_attention`: ``"auto"`` in layers of more
    blocks, or ``exact_kernel="hybrid"``) or ``"key_blocks"`` (:func:`~mixdit.kernels.key_block_attention.
    key_block_attention`, ``exact_kernel="key_blocks"``). The last two need Triton (CUDA or the interpreter) and
    sync the host once per call; with gradients their forward runs as is and the backward is split the same way
    (:func:`~mixdit.kernels.key_block_attention.exact_attention_with_grad`)."""
    if config.granularity != "token" or config.tile_union_only:
        return "query_tiles"
    few_blocks = part.num_blocks <= SORTED_QUERY_MAX_BLOCKS
    kernel = config.exact_kernel
    if kernel == "auto":
        kernel = "query_tiles" if few_blocks else "hybrid"
    if kernel in ("hybrid", "key_blocks") and _kernel_runs(qb):
        return kernel
    return "sorted_query_tiles" if few_blocks else "query_tiles"


def selection_word_order(row_select: torch.Tensor) -> torch.Tensor:
    """Per (sample, head), the query rows sorted by their selection as one int32 word (``row_select [B, H, Sq, 1]``,
    at most ``SORTED_QUERY_MAX_BLOCKS`` blocks): equal sets adjacent, block order kept among equals (stable)."""
    return torch.argsort(row_select[..., 0], dim=-1, stable=True)


def _sorted_query_tile_call(qb, kb, vb, row_select, part: VMoBAPartition, config: VMoBAConfig, scale: float):
    """The exact rule through the query-tile kernel, each (sample, head)'s queries sorted by their selection word.

    A query tile computes the union of its rows' blocks; in block order the rows of a tile select different sets
    (1D at Wan-1.3B: the union is 54% of the key tiles against 22% selected), sorted equal sets share tiles (28%).
    Exact: only the order changes (per-row masks as usual; output and lse are put back in block order).
    Needs ``num_blocks <= 32`` (the selection is one int32 word). Returns ``(out, lse, tile_density)``."""
    from mixdit.kernels.router_reference import row_select_to_selection, tile_layout_from_selection

    B, Sq, H, D = qb.shape
    order = selection_word_order(row_select)
    rs = torch.gather(row_select, 2, order.unsqueeze(-1))
    # the blocks every row of a tile selects go first, unmasked (kv_full): sorted, ~70% of the steps at Wan-1.3B
    if _kernel_runs(qb):  # one Triton launch (the PyTorch form's ~25 small ops left an isolated call host-bound)
        from mixdit.kernels.block_router import sorted_tile_layout

        kv_count, kv_index, kv_full = sorted_tile_layout(rs, part.block_tile_start, part.block_tile_count,
                                                         part.num_kv_tiles, part.max_block_tiles, config.q_tile)
    else:
        kv_count, kv_index, kv_full = tile_layout_from_selection(row_select_to_selection(rs, part.num_blocks),
                                                                 part.kv_tile_group, config.q_tile, full_first=True)
    # q as a [B, Sq, H, D] view of [B, H, Sq, D] storage (the kernel takes strided rows)
    qs = torch.gather(qb.transpose(1, 2), 2, order.unsqueeze(-1).expand(B, H, Sq, D)).transpose(1, 2)
    out_s, lse_s = _kernel_attention(qs, kb, vb, kv_count, kv_index, q_tile=config.q_tile, kv_tile=part.kv_tile,
                                     scale=scale, kv_tile_len=part.kv_tile_len, row_select=rs,
                                     kv_tile_group=part.kv_tile_group, kv_full=kv_full)
    inv = torch.empty_like(order).scatter_(-1, order, torch.arange(Sq, device=qb.device).expand_as(order))
    out = torch.gather(out_s.transpose(1, 2), 2, inv.unsqueeze(-1).expand(B, H, Sq, D)).transpose(1, 2)
    work = kv_count.sum(dtype=torch.float32) / float(kv_count.numel() * part.num_kv_tiles)
    return out, torch.gather(lse_s, 2, inv), work


def _union_backward(path: str, qb, kb, vb) -> bool:
    """Whether this call's gradients come from the query-tile backward on the router's tile layout (the key-block /
    hybrid forward with ``key_block_attention.EXACT_BACKWARD = "union"``), so the router must build that layout."""
    if path not in ("key_blocks", "hybrid") or not (torch.is_grad_enabled()
                                                     and any(t.requires_grad for t in (qb, kb, vb))):
        return False
    from mixdit.kernels import key_block_attention

    return key_block_attention.EXACT_BACKWARD == "union"


def _key_block_call(qb, kb, vb, r, part: VMoBAPartition, config: VMoBAConfig, scale: float, fp32_out: bool,
                    hybrid: bool):
    """The key-block or (``hybrid``) the hybrid kernel on the router output ``r``; differentiable
    (:func:`mixdit.kernels.key_block_attention.exact_attention_with_grad`: the backward split like the forward, or
    the query-tile backward on ``r``'s tile layout). ``fp32_out``: keep the output in fp32 (text parts are merged
    into it before the one final rounding)."""
    from mixdit.kernels.key_block_attention import exact_attention_with_grad

    kw = dict(out_dtype=torch.float32 if fp32_out else None)
    if hybrid:
        kw.update(max_block_tiles=part.max_block_tiles, **hybrid_launch(part, config))
    out, lse, work = exact_attention_with_grad(
        *_kernel_inputs(qb, kb, vb), r.row_select, hybrid=hybrid,
        backward_layout=None if r.kv_count is None else (r.kv_count, r.kv_index),
        q_tile_backward=config.q_tile, kv_tile_group=part.kv_tile_group, block_tile_start=part.block_tile_start,
        block_tile_count=part.block_tile_count, kv_tile_len=part.kv_tile_len, kv_tile=part.kv_tile, scale=scale,
        memo=functools.partial(kept, "vmoba.exact"), **kw)
    return out[..., :qb.shape[-1]].to(torch.float32 if fp32_out else qb.dtype), lse, work


def hybrid_launch(part: VMoBAPartition, config: VMoBAConfig) -> dict:
    """The hybrid kernel's ``q_tile`` and ``min_fill`` for this layer (``HYBRID_LAUNCH``, tiles at most
    ``config.q_tile``)."""
    q_tile, min_fill = HYBRID_LAUNCH[part.layer_type]
    return dict(q_tile=min(q_tile, config.q_tile), min_fill=min_fill)


def _triton_usable(t: torch.Tensor) -> bool:
    return t.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"


def route_query_tiles(qb: torch.Tensor, kb: torch.Tensor, part: VMoBAPartition, config: VMoBAConfig):
    """APPROXIMATE router (``granularity="query_tile"``): one selection per (sample, head, query
    tile) from the tile's mean query against the block key means, with the same threshold / global
    / top-k rules; every block the tile's queries belong to is kept.

    On CUDA (or under ``TRITON_INTERPRET=1``) the fused Triton router
    (:func:`mixdit.kernels.block_router.route_query_tiles_fused`: block means, tile means, one route
    kernel; no host sync); otherwise :func:`route_query_tiles_reference` (same selection)."""
    if _triton_usable(qb):
        from mixdit.kernels.block_router import route_query_tiles_fused

        return route_query_tiles_fused(
            qb, kb, q_block=part.q_block, block_size=part.block_size, block_tile_start=part.block_tile_start,
            block_tile_count=part.block_tile_count, kv_tile_len=part.kv_tile_len,
            max_block_tiles=part.max_block_tiles,
            selection=config.selection, threshold=config.threshold, topk=config.topk_for(part.layer_type),
            q_tile=config.q_tile, kv_tile=part.kv_tile)
    return route_query_tiles_reference(qb, kb, part, config)


def route_query_tiles_reference(qb: torch.Tensor, kb: torch.Tensor, part: VMoBAPartition, config: VMoBAConfig):
    """PyTorch reference of :func:`route_query_tiles` (small ops on tensors of ``[B, H,
    n_query_tiles, n_blocks]``, no host sync, no per-token work; 83 CUDA kernels per call, ≈ 1.5-3 ms
    at Wan2.1-1.3B 480p on an H100, against ≈ 0.2-0.3 ms and 5 kernels for the fused router).

    Ties (fp32 scores): threshold / global take every other block equal to the cut value; top-k
    keeps the lower block index among equal scores (stable sort). ``kv_index``: the selected key
    tiles ascending, then the unselected ones ascending."""
    from mixdit.kernels.block_router import RouterOutput
    from mixdit.kernels.router_reference import threshold_rule

    B, Sq, H, D = qb.shape
    qt, C, dev = config.q_tile, part.num_blocks, qb.device
    n_qt = (Sq + qt - 1) // qt
    n_full = Sq // qt
    rows = torch.full((n_qt,), float(qt), device=dev)
    rows[-1] = Sq - (n_qt - 1) * qt
    # tile sums read q once in its own dtype and accumulate in fp32 (no fp32 copy of q)
    qsum = qb[:, :n_full * qt].unflatten(1, (n_full, qt)).sum(2, dtype=torch.float32)
    if n_full < n_qt:
        qsum = torch.cat([qsum, qb[:, n_full * qt:].sum(1, keepdim=True, dtype=torch.float32)], 1)
    qmean = qsum / rows.view(1, -1, 1, 1)  # [B, n_qt, H, D]
    if _triton_usable(kb):
        from mixdit.kernels.block_router import block_key_means

        means_t = block_key_means(kb, part.block_tile_start, part.block_tile_count, part.kv_tile_len, part.block_size,
                                  part.kv_tile, max_block_tiles=part.max_block_tiles)  # [B*H, D_PAD, NB_PAD]
        kmeans = means_t.view(B, H, means_t.shape[1], means_t.shape[2])[:, :, :D, :C].permute(0, 3, 1, 2)
    else:
        real = _real_key_rows(part, dev)
        key_block = part.kv_tile_group.to(dev).long().repeat_interleave(part.kv_tile)[real]
        kmeans = torch.zeros(B, C, H, D, device=dev, dtype=torch.float32).index_add_(1, key_block, kb[:, real].float())
        kmeans = kmeans / part.block_size.to(dev).float().view(1, -1, 1, 1)
    gate = torch.einsum("bthd,bchd->bhtc", qmean, kmeans)  # [B, H, n_qt, C]
    own = torch.zeros(n_qt, C, dtype=torch.bool, device=dev)
    own[torch.arange(Sq, device=dev) // qt, part.q_block.to(dev).long()] = True
    own = own.expand(B, H, n_qt, C)
    if config.selection == "topk":
        k_eff = min(config.topk_for(part.layer_type), C)
        # stable sort, not topk: among equal scores the lower block index wins (topk's pick is unspecified)
        amplified = torch.where(own, torch.full_like(gate, float("inf")), gate)
        idx = torch.sort(amplified, dim=-1, descending=True, stable=True).indices[..., :k_eff]
        sel = torch.zeros_like(own).scatter(-1, idx, True) | own
    elif config.threshold >= 1.0:
        sel = torch.ones_like(own)
    else:
        dims = (-1,) if config.selection == "threshold" else (-2, -1)
        mn, mx = gate.amin(dim=dims, keepdim=True), gate.amax(dim=dims, keepdim=True)
        den = torch.where(mx - mn <= 1e-6, torch.ones_like(mx), mx - mn)
        sel = threshold_rule((gate - mn) / den, own, config.threshold, dims)
    tiles = sel[..., part.kv_tile_group.to(dev).long()]  # [B, H, n_qt, n_kv_tiles]
    kv_count = tiles.sum(-1, dtype=torch.int32)
    kv_index = torch.argsort((~tiles).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    keys = (sel.float() * part.block_size.to(dev).float()).sum(-1)  # selected keys per tile row
    density = (keys * rows).sum() / (float(B * H * Sq) * float(part.block_size.sum()))
    tile_density = kv_count.sum().float() / float(B * H * n_qt * part.num_kv_tiles)
    return RouterOutput(None, kv_count, kv_index, density, tile_density)


def route(qb: torch.Tensor, kb: torch.Tensor, part: VMoBAPartition, config: VMoBAConfig, tile_layout: bool = True):
    """Router on block-ordered ``qb`` and padded ``kb``: the fused Triton router on CUDA (or under
    ``TRITON_INTERPRET=1``); on plain CPU tensors the naive reference (same rules). ``tile_layout=False``
    (per-token granularity): the Triton router skips the query-tile layout (only ``row_select`` and the density)."""
    if config.granularity == "query_tile":
        return route_query_tiles(qb, kb, part, config)
    topk = config.topk_for(part.layer_type)
    if _triton_usable(qb):
        from mixdit.kernels.block_router import route_blocks
        return route_blocks(
            qb, kb, q_block=part.q_block, block_size=part.block_size,
            block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
            kv_tile_len=part.kv_tile_len, kv_tile_group=part.kv_tile_group, max_block_tiles=part.max_block_tiles,
            selection=config.selection, threshold=config.threshold, topk=topk,
            q_tile=config.q_tile, kv_tile=part.kv_tile, precision=config.router_precision, tile_layout=tile_layout)
    return route_reference(qb, kb, part, config)


def route_reference(qb, kb, part: VMoBAPartition, config: VMoBAConfig):
    """Same outputs as the Triton router, from :mod:`mixdit.kernels.router_reference`."""
    from mixdit.kernels.block_router import RouterOutput
    from mixdit.kernels import router_reference as rr
    real = _real_key_rows(part, kb.device)
    sel = rr.select_blocks_reference(
        qb, kb[:, real], part.q_block, part.kv_tile_group.long().repeat_interleave(part.kv_tile)[real],
        part.num_blocks, selection=config.selection, threshold=config.threshold,
        topk=config.topk_for(part.layer_type), dtype=torch.float32)
    kv_count, kv_index = rr.tile_layout_from_selection(sel, part.kv_tile_group, config.q_tile)
    B, H, Sq, _ = sel.shape
    n_qt = kv_count.shape[-1]
    return RouterOutput(
        rr.selection_to_row_select(sel), kv_count, kv_index,
        rr.selected_key_fraction(sel, part.block_size),
        kv_count.sum().float() / float(B * H * n_qt * part.num_kv_tiles))


def _real_key_rows(part: VMoBAPartition, device) -> torch.Tensor:
    pos = torch.arange(part.num_kv_tiles * part.kv_tile, device=device)
    return pos % part.kv_tile < part.kv_tile_len.to(device).long().repeat_interleave(part.kv_tile)


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------
def _sdpa(q, k, v, scale, key_mask=None):
    """Dense attention in the ``[B, S, H, D]`` layout; ``key_mask [B, Sk]`` (bool) hides keys."""
    mask = None if key_mask is None else key_mask[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         attn_mask=mask, scale=scale)
    return out.transpose(1, 2)


def _masked_dense_with_lse(q, k, v, scale, key_mask, chunk: int = 4096):
    """Dense attention + log-sum-exp over a short, masked key set (text tokens), in fp32 chunks of
    queries so the score tile stays small. ``key_mask [B, Sk]``: True = visible."""
    B, Sq, H, _ = q.shape
    out = torch.empty_like(q)
    lse = torch.empty(B, H, Sq, device=q.device, dtype=torch.float32)
    kf, vf = k.float().transpose(1, 2), v.float().transpose(1, 2)  # [B, H, Sk, D]
    hide = ~key_mask[:, None, None, :]
    for start in range(0, Sq, chunk):
        qc = q[:, start:start + chunk].float().transpose(1, 2)  # [B, H, c, D]
        s = (qc @ kf.transpose(-1, -2)) * scale
        s = s.masked_fill(hide, float("-inf"))
        l_ = torch.logsumexp(s, dim=-1)
        p = torch.exp(s - l_.unsqueeze(-1)).nan_to_num(0.0)
        out[:, start:start + chunk] = (p @ vf).transpose(1, 2).to(q.dtype)
        lse[:, :, start:start + chunk] = l_
    return out, lse


def _dense_with_lse(q, k, v, scale, q_tile, kv_tile):
    """Dense attention that also returns the log-sum-exp ``[B, H, Sq]`` (block-sparse kernel with
    a layout that visits every key tile)."""
    from mixdit.kernels.reference import dense_layout
    B, Sq, H, _ = q.shape
    kv_count, kv_index = dense_layout(B, H, Sq, k.shape[1], q_tile, kv_tile, device=q.device)
    return _kernel_attention(q, k, v, kv_count, kv_index, q_tile=q_tile, kv_tile=kv_tile, scale=scale)


def merge_attention_lse(out_a, lse_a, out_b, lse_b):
    """Exact merge of two attention parts over disjoint key sets (``out [B,S,H,D]``, ``lse [B,H,S]``)."""
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    wa, wb = torch.exp(lse_a - m), torch.exp(lse_b - m)
    den = wa + wb
    wa = (wa / den).transpose(1, 2).unsqueeze(-1)
    wb = (wb / den).transpose(1, 2).unsqueeze(-1)
    out = out_a.float() * wa + out_b.float() * wb
    return out.to(out_a.dtype), m + torch.log(den)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` for ``[B, S, H, D]``, contiguous. Done as one row gather over the flattened batch:
    on an H200 at Wan2.1-1.3B 480p ``x[:, index]`` took 1.97 ms for q, k, v and the output at B = 2 against
    0.23 ms at B = 1, and ``index_select(1, ...)`` 1.28 ms (benchmarks/NOTES.md)."""
    B, S = x.shape[:2]
    if B == 1:
        return x.index_select(1, index)
    flat = (torch.arange(B, device=x.device, dtype=index.dtype).view(B, 1) * S + index.view(1, -1)).view(-1)
    return x.reshape(B * S, *x.shape[2:]).index_select(0, flat).view(B, index.numel(), *x.shape[2:])


class _Reorder(torch.autograd.Function):
    """:func:`_gather_tokens` whose gradient is gathered back through ``inverse`` (``inverse[r]``: the position that
    took row ``r``) instead of scatter-added into zeros (the backward of ``index_select``): H200, Wan-1.3B 480p,
    the three inputs' and the output's ``index_add`` took 1.7 ms per layer. Exact when each row is taken once, or
    when only the copy at ``inverse`` gets a gradient: VMoBA's padded keys repeat a block's first token in its
    last tile's pad rows, which every kernel masks (zero gradient)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.inverse = inverse  # a cached partition tensor: no saved-tensor bookkeeping (checkpointing) needed
        return _gather_tokens(x, index)

    @staticmethod
    def backward(ctx, grad):
        return _gather_tokens(grad, ctx.inverse), None, None


def _reorder(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """``x[:, index]`` (:func:`_gather_tokens`), differentiable by the inverse gather (:class:`_Reorder`)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _Reorder.apply(x, index, inverse)
    return _gather_tokens(x, index)


def vmoba_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid, layer_index: int,
                    config: VMoBAConfig | None = None, scale: float | None = None, text_len: int = 0,
                    text_position: str = "none", stats=None, step_index: int | None = None,
                    num_steps: int | None = None, text_key_mask: torch.Tensor | None = None) -> torch.Tensor:
    """VMoBA self-attention. ``q, k, v``: ``[B, S, H, D]``; ``S = F*Hh*W`` video tokens in raster
    order (frame, row, col) for ``grid = (F, Hh, W)``, plus ``text_len`` text tokens placed
    ``"before"`` or ``"after"`` them (``text_position="none"``: no text). Returns ``[B, S, H, D]``.

    Video x video pairs use the partition of ``layer_index``, the router and the block-sparse
    kernel; pairs involving text are dense and merged through log-sum-exp. Runs fully dense per
    :func:`vmoba_should_run_dense` (``step_index``/``num_steps`` optional). ``stats``: a
    :class:`VMoBAStats` (or a dict that gets one under ``"vmoba"``) accumulating the density.
    ``text_key_mask``: optional boolean ``[B, S]`` key mask (HunyuanVideo hides padded text tokens);
    it may only hide text keys.
    """
    config = config or VMoBAConfig()
    check_choice("vmoba.text_position", text_position, ("none", "before", "after"))
    B, S, H, D = q.shape
    Fg, Hg, Wg = (int(g) for g in grid)
    Sv = Fg * Hg * Wg
    T = int(text_len) if text_position != "none" else 0
    if Sv + T != S:
        raise ConfigError("vmoba.grid", tuple(grid), f"F*H*W + text_len == sequence length {S} (got {Sv} + {T})")
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    st = _stats_object(stats)
    if vmoba_should_run_dense(config, step_index, num_steps, layer_index, Sv):
        if st is not None:
            st.record("dense", 1.0, 1.0)
        return _sdpa(q, k, v, scale, text_key_mask)

    if text_position == "before":
        vid = slice(T, S)
        txt = slice(0, T)
    else:
        vid = slice(0, Sv)
        txt = slice(Sv, S)
    qv, kv_, vv = q[:, vid], k[:, vid], v[:, vid]
    part = partition_for_layer(grid, layer_index, config, q.device)
    qb = qv if part.q_is_identity else _reorder(qv, part.q_perm, part.q_inv)
    if part.kv_is_identity:
        kb, vb = kv_, vv
    else:
        kb, vb = _reorder(kv_, part.kv_perm, part.kv_inv), _reorder(vv, part.kv_perm, part.kv_inv)
    qb, kb, vb = qb.contiguous(), kb.contiguous(), vb.contiguous()
    path = attention_path(config, part, qb, kb, vb)
    tile_layout = path == "query_tiles" or _union_backward(path, qb, kb, vb)
    with torch.no_grad():  # the selection is not differentiable; kept for gradient checkpointing's recomputation
        r = kept("vmoba.route", lambda: route(qb, kb, part, config, tile_layout=tile_layout))
    if path in ("key_blocks", "hybrid"):
        out_b, lse_b, work = _key_block_call(qb, kb, vb, r, part, config, scale, fp32_out=T > 0,
                                             hybrid=path == "hybrid")
    elif path == "sorted_query_tiles":
        out_b, lse_b, work = _sorted_query_tile_call(qb, kb, vb, r.row_select, part, config, scale)
    else:
        per_tile = r.row_select is None or config.tile_union_only  # one key set per query tile
        out_b, lse_b = _kernel_attention(
            qb, kb, vb, r.kv_count, r.kv_index, q_tile=config.q_tile, kv_tile=part.kv_tile, scale=scale,
            kv_tile_len=part.kv_tile_len, row_select=None if per_tile else r.row_select,
            kv_tile_group=None if per_tile else part.kv_tile_group)
        work = r.tile_density
    if st is not None:
        st.record(part.layer_type, r.density, work)
    if T:
        if text_key_mask is None:
            out_t, lse_t = _dense_with_lse(qb, k[:, txt].contiguous(), v[:, txt].contiguous(), scale,
                                           config.q_tile, config.kv_tile)
        else:
            out_t, lse_t = _masked_dense_with_lse(qb, k[:, txt], v[:, txt], scale, text_key_mask[:, txt])
        out_b = merge_attention_lse(out_b, lse_b, out_t, lse_t)[0].to(q.dtype)
    out_v = out_b if part.q_is_identity else _reorder(out_b, part.q_inv, part.q_perm)
    if not T:
        return out_v.contiguous()
    out_txt = _sdpa(q[:, txt], k, v, scale, text_key_mask)
    parts = (out_txt, out_v) if text_position == "before" else (out_v, out_txt)
    return torch.cat(parts, dim=1)


__all__ = [
    "VMoBAConfig", "VMoBAPartition", "VMoBAStats", "get_partition", "layer_type_for", "partition_for_layer",
    "vmoba_attention", "attention_path", "selection_word_order", "vmoba_should_run_dense", "vmoba_dense_reason",
    "vmoba_fallback_reason", "merge_attention_lse",
    "route", "route_reference",
    "route_query_tiles", "route_query_tiles_reference",
    "LAYER_TYPES", "SELECTIONS",
]
