"""Naive PyTorch reference for the VMoBA block router (:mod:`mixdit.kernels.block_router`).

Plain, slow and memory-hungry (it materialises the ``[B, H, Sq, num_blocks]`` gate): tests and
tiny CPU runs only. It follows KwaiVGI/VMoBA's ``moba_attn_varlen`` gate and selection rules
(``_select_threshold_query_head``, ``_select_threshold_head_global`` and the top-k branch), done
strictly per sample (the reference packs the batch, so its "head_global" mode mixes CFG halves).

Gate
    ``mean[b, h, c] = mean of the keys of block c`` (fp32, real tokens only) and
    ``gate[b, h, i, c] = q[b, i, h] . mean[b, h, c]`` (fp32/fp64, no softmax scale: every rule
    below is invariant to a positive scale).

Rules (``own`` = the block that contains query token ``i``; it is always selected)
    threshold (per query token and head):
        ``norm = (gate - min_c gate) / (max_c gate - min_c gate)`` (denominator 1 when <= 1e-6),
        ``total = sum_c norm``, ``remain = max(tau - norm[own] / (total + 1e-6), 0)``;
        the other blocks sorted by ``norm`` descending are taken while
        ``cumsum / (total + 1e-6) < remain`` plus the one that reaches it (so at least one other
        block is always taken); if the cumulative share never reaches ``remain`` all are taken.
    global (per sample and head, over all (query, block) pairs at once):
        the same rule with min, max, own share and the cumulative cut taken over every pair of
        the head (at least one other *pair* per head, the own block per token).
    topk: the own block plus the ``k - 1`` other blocks with the largest gate (``k`` clipped to
        the number of blocks).
    ``tau >= 1`` selects every block (in fp32 the reference's ``+1e-6`` can round away and drop
    the minimum block; the intent of "cover the whole mass" is all blocks).

Ties: where the reference sorts equal values it picks an arbitrary order; here every value equal
to the cut value is taken. Tests skip rows whose decision sits within float noise of a tie.
"""

from __future__ import annotations

import torch

EPS = 1e-6


def block_key_means_reference(k: torch.Tensor, k_block: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """``[B, H, num_blocks, D]`` float32 mean of the keys of each block.

    ``k``: ``[B, Sk, H, D]`` (any order), ``k_block``: ``[Sk]`` block id of each key.
    """
    B, Sk, H, D = k.shape
    kb = k_block.long().to(k.device)
    sums = torch.zeros(B, num_blocks, H, D, dtype=torch.float64, device=k.device)
    sums.index_add_(1, kb, k.double())
    counts = torch.bincount(kb, minlength=num_blocks).clamp(min=1).double()
    return (sums / counts.view(1, -1, 1, 1)).permute(0, 2, 1, 3).float().contiguous()


def block_gate_reference(q: torch.Tensor, k: torch.Tensor, k_block: torch.Tensor, num_blocks: int,
                         dtype=torch.float64) -> torch.Tensor:
    """``[B, H, Sq, num_blocks]`` gate scores (query token . block key mean)."""
    means = block_key_means_reference(k, k_block, num_blocks)  # [B, H, C, D] fp32
    return torch.einsum("bshd,bhcd->bhsc", q.to(dtype), means.to(dtype))


def threshold_rule(norm: torch.Tensor, own_mask: torch.Tensor, threshold: float, dims) -> torch.Tensor:
    """Shared threshold rule. ``norm`` holds min-max normalised gates; ``dims`` are the dims
    reduced together (``(-1,)`` per query-head, ``(-2, -1)`` per head)."""
    total = norm.sum(dim=dims, keepdim=True)
    own = (norm * own_mask).sum(dim=dims, keepdim=True)
    remain = (threshold - own / (total + EPS)).clamp(min=0.0)
    others = torch.where(own_mask, torch.full_like(norm, -1.0), norm)  # own never ranked
    shape = others.shape
    flat = others.flatten(start_dim=len(shape) - len(dims))
    srt, idx = torch.sort(flat, dim=-1, descending=True)
    srt_pos = srt.clamp(min=0.0)
    ratio = srt_pos.cumsum(-1) / (total.flatten(start_dim=len(shape) - len(dims)) + EPS)
    cond = (ratio >= remain.flatten(start_dim=len(shape) - len(dims))) & (srt >= 0)
    n_others = (srt >= 0).sum(-1, keepdim=True)
    any_cond = cond.any(-1, keepdim=True)
    first = torch.where(any_cond, cond.float().argmax(-1, keepdim=True), n_others - 1)
    cut_value = torch.gather(srt, -1, first.clamp(min=0))  # value of the last taken block
    take_sorted = torch.arange(flat.shape[-1], device=norm.device) <= first
    taken = torch.zeros_like(flat, dtype=torch.bool).scatter(-1, idx, take_sorted)
    taken = taken | ((flat >= cut_value) & (flat >= 0))  # ties with the cut value: take all
    return taken.view(shape) | own_mask


def select_blocks_reference(q: torch.Tensor, k: torch.Tensor, q_block: torch.Tensor, k_block: torch.Tensor,
                            num_blocks: int, *, selection: str = "threshold", threshold: float = 0.25,
                            topk: int = 3, dtype=torch.float64) -> torch.Tensor:
    """Boolean ``[B, H, Sq, num_blocks]``: the blocks each query token and head attends to.

    ``q``: ``[B, Sq, H, D]``, ``k``: ``[B, Sk, H, D]`` (any token order), ``q_block``/``k_block``:
    block id of each query/key token. ``dtype``: the precision of the gate and the rule.
    """
    gate = block_gate_reference(q, k, k_block, num_blocks, dtype=dtype)  # [B, H, Sq, C]
    B, H, Sq, C = gate.shape
    own_mask = torch.zeros(Sq, C, dtype=torch.bool, device=gate.device)
    own_mask[torch.arange(Sq, device=gate.device), q_block.long().to(gate.device)] = True
    own_mask = own_mask.expand(B, H, Sq, C)
    if selection == "topk":
        k_eff = min(int(topk), C)
        amplified = torch.where(own_mask, torch.full_like(gate, float("inf")), gate)
        idx = torch.topk(amplified, k_eff, dim=-1).indices
        return torch.zeros_like(own_mask).scatter(-1, idx, True)
    if selection == "threshold":
        mn = gate.amin(-1, keepdim=True)
        mx = gate.amax(-1, keepdim=True)
        dims = (-1,)
    elif selection == "global":
        mn = gate.amin(dim=(-2, -1), keepdim=True)
        mx = gate.amax(dim=(-2, -1), keepdim=True)
        dims = (-2, -1)
    else:
        raise ValueError(f"unknown selection {selection!r}")
    den = mx - mn
    den = torch.where(den <= EPS, torch.ones_like(den), den)
    norm = (gate - mn) / den
    if threshold >= 1.0:  # cover the whole mass: every block (robust to the +eps rounding)
        return torch.ones_like(own_mask)
    return threshold_rule(norm, own_mask, threshold, dims)


def selection_to_row_select(selected: torch.Tensor) -> torch.Tensor:
    """Pack a boolean ``[B, H, Sq, C]`` selection into ``row_select [B, H, Sq, ceil(C/32)]`` int32."""
    B, H, Sq, C = selected.shape
    W = (C + 31) // 32
    bits = torch.zeros(B, H, Sq, W * 32, dtype=torch.int64, device=selected.device)
    bits[..., :C] = selected.long()
    shifts = torch.arange(32, device=selected.device, dtype=torch.int64)
    words = (bits.view(B, H, Sq, W, 32) << shifts).sum(-1)  # < 2**32
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words)
    return words.to(torch.int32)


def row_select_to_selection(row_select: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Inverse of :func:`selection_to_row_select`: boolean ``[B, H, Sq, num_blocks]``."""
    g = torch.arange(num_blocks, device=row_select.device)
    words = row_select.to(torch.int32)[..., g // 32]  # int32 shifts: no int64 copy (the sorted-query path runs this)
    return ((words >> (g % 32).to(torch.int32)) & 1).bool()


def tile_layout_from_selection(selected: torch.Tensor, kv_tile_group: torch.Tensor, q_tile: int,
                               full_first: bool = False):
    """Per-query-tile union of a per-token selection, expanded to key tiles.

    Returns ``kv_count [B, H, n_qt]`` and ``kv_index [B, H, n_qt, n_kv_tiles]`` (int32; visited
    tiles first in increasing order, zeros after the count). With ``full_first`` also ``kv_full
    [B, H, n_qt]``: the tiles of the groups every row of the query tile selected come first (each part in
    increasing order) and ``kv_full`` counts them (the block-sparse kernel's ``kv_full``).
    """
    B, H, Sq, C = selected.shape
    n_qt = (Sq + q_tile - 1) // q_tile
    pad = n_qt * q_tile - Sq
    sel = torch.nn.functional.pad(selected, (0, 0, 0, pad)) if pad else selected
    tiles = sel.view(B, H, n_qt, q_tile, C)
    union = tiles.any(3)  # [B, H, n_qt, C]
    if not full_first:
        return compact_tiles(union, kv_tile_group)
    if pad:  # rows past Sq select everything, so they never make a group partial
        real = (torch.arange(n_qt * q_tile, device=selected.device) < Sq).view(n_qt, q_tile, 1)
        tiles = tiles | ~real
    return compact_tiles(union, kv_tile_group, tiles.all(3))


def compact_tiles(block_union: torch.Tensor, kv_tile_group: torch.Tensor, block_full: torch.Tensor | None = None):
    """``block_union [B, H, n_qt, C]`` (bool) -> ``kv_count``, ``kv_index`` over key tiles. With ``block_full``
    (bool, same shape, within the union) its tiles come first and ``kv_full`` (their count) is returned too."""
    n_kt = kv_tile_group.numel()
    grp = kv_tile_group.long()
    tile_sel = block_union[..., grp]  # [B, H, n_qt, n_kt]
    kv_count = tile_sel.sum(-1, dtype=torch.int32)
    if block_full is None:
        pos = tile_sel.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1
    else:
        full = block_full[..., grp] & tile_sel
        part = tile_sel & ~full
        kv_full = full.sum(-1, dtype=torch.int32)
        pos = torch.where(full, full.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1,
                          kv_full.unsqueeze(-1) + part.to(torch.int32).cumsum(-1, dtype=torch.int32) - 1)
    dst = torch.where(tile_sel, pos, torch.full_like(pos, n_kt)).long()
    src = torch.arange(n_kt, dtype=torch.int32, device=block_union.device).expand_as(pos)
    out = torch.zeros(*pos.shape[:-1], n_kt + 1, dtype=torch.int32, device=block_union.device)
    out.scatter_(-1, dst, src)
    if block_full is None:
        return kv_count, out[..., :n_kt].contiguous()
    return kv_count, out[..., :n_kt].contiguous(), kv_full


def selected_key_fraction(selected: torch.Tensor, block_size: torch.Tensor) -> torch.Tensor:
    """Mean over (batch, head, query) of selected key tokens / all key tokens (a 0-d tensor)."""
    bs = block_size.to(selected.device, torch.float64)
    return ((selected.double() * bs).sum(-1) / bs.sum()).mean().float()
