"""Naive PyTorch references for the kernels in this package.

They define the exact semantics the Triton kernels must reproduce; tests compare against them.
Everything here is plain, slow, memory-hungry PyTorch: never call it on large shapes.

Block-sparse layout (shared by the kernels, the router and VMoBA)
-----------------------------------------------------------------
* ``q``: ``[B, Sq, H, D]``, ``k``/``v``: ``[B, Sk, H, D]`` (diffusers' dispatcher layout).
* Queries are cut into *query tiles* of ``q_tile`` rows, keys into *key tiles* of ``kv_tile`` rows
  (the last tile of each may be ragged).
* ``kv_count[b, h, qt]`` (int32) key tiles visited by query tile ``qt``; their indices are
  ``kv_index[b, h, qt, :kv_count]`` (int32, distinct; entries past the count are ignored).
* ``kv_tile_len[t]`` (optional, int32): only the first ``kv_tile_len[t]`` keys of key tile ``t`` are
  real, the rest is padding (VMoBA pads each block to whole tiles). Default: every key < Sk is real.
* ``row_select`` (optional, int32 ``[B, H, Sq, W]``) with ``kv_tile_group`` (int32 ``[n_kv_tiles]``):
  a per-query-token bitmask over key *groups* (VMoBA blocks). Key tile ``t`` is seen by query row
  ``i`` only if bit ``kv_tile_group[t]`` of ``row_select[b, h, i]`` is set (bit g lives in word
  g // 32, bit g % 32). Compute is still skipped per tile; the bitmask makes the per-token rule exact.
* ``kv_full`` (optional, int32 ``[B, H, n_q_tiles]``, with ``row_select``): a promise that the first
  ``kv_full`` visited tiles of a query tile are selected by every one of its rows; the kernel then skips their
  row masks. It changes no result (the reference ignores it); a wrong promise gives wrong outputs.
* Output ``out [B, Sq, H, D]`` in the input dtype, ``lse [B, H, Sq]`` float32 (natural log of the
  softmax denominator, including ``scale``). A row that sees no key gets ``out = 0``, ``lse = -inf``.
"""

from __future__ import annotations

import math

import torch


def visited_index(kv_count: torch.Tensor, kv_index: torch.Tensor) -> torch.Tensor:
    """``kv_index`` with the entries past ``kv_count`` set to -1: the part of a layout that means
    something (routers may leave the rest unwritten), for comparing two layouts."""
    slot = torch.arange(kv_index.shape[-1], device=kv_index.device)
    return torch.where(slot < kv_count.unsqueeze(-1), kv_index, -1)


def tile_key_mask(Sq: int, Sk: int, kv_count, kv_index, q_tile: int, kv_tile: int,
                  kv_tile_len=None, row_select=None, kv_tile_group=None) -> torch.Tensor:
    """Boolean ``[B, H, Sq, Sk]`` mask of which keys each query row attends to under the layout."""
    B, H, n_qt = kv_count.shape
    device = kv_count.device
    n_kt = (Sk + kv_tile - 1) // kv_tile
    # tile-level visit matrix [B, H, n_qt, n_kt]; slots past the count go to a spare column n_kt
    idx = visited_index(kv_count, kv_index).long()
    visit = torch.zeros(B, H, n_qt, n_kt + 1, dtype=torch.bool, device=device)
    visit.scatter_(3, torch.where(idx < 0, n_kt, idx), True)
    visit = visit[..., :n_kt]
    q_tile_of_row = torch.arange(Sq, device=device) // q_tile
    k_tile_of_col = torch.arange(Sk, device=device) // kv_tile
    mask = visit[:, :, q_tile_of_row][:, :, :, k_tile_of_col]  # [B, H, Sq, Sk]
    pos_in_tile = torch.arange(Sk, device=device) % kv_tile
    if kv_tile_len is not None:
        mask = mask & (pos_in_tile < kv_tile_len.long()[k_tile_of_col]).view(1, 1, 1, Sk)
    if row_select is not None:
        group = kv_tile_group.long()[k_tile_of_col]  # [Sk]
        words = row_select.long()[..., group // 32]  # [B, H, Sq, Sk]
        bits = (words >> (group % 32).view(1, 1, 1, Sk)) & 1
        mask = mask & bits.bool()
    return mask


def block_sparse_attention_reference(q, k, v, kv_count, kv_index, *, q_tile: int = 128,
                                     kv_tile: int = 128, scale: float | None = None,
                                     kv_tile_len=None, row_select=None, kv_tile_group=None,
                                     upcast: bool = True, kv_full=None):
    """Reference for :func:`mixdit.kernels.block_sparse_attention` (see the module docstring).

    With ``upcast`` the math runs in float32 (the "fp32 reference"); without it in the input dtype
    (the "same-dtype PyTorch" reference used to size tolerances).
    """
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    mask = tile_key_mask(Sq, Sk, kv_count, kv_index, q_tile, kv_tile, kv_tile_len, row_select, kv_tile_group)
    dt = torch.float32 if upcast else q.dtype
    qh, kh, vh = (t.to(dt).transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s.float(), dim=-1)  # [B, H, Sq]
    p = torch.exp(s.float() - lse.unsqueeze(-1)).nan_to_num(0.0).to(dt)
    out = (p @ vh).transpose(1, 2)
    out = torch.where(torch.isinf(lse).transpose(1, 2).unsqueeze(-1), torch.zeros_like(out), out)
    return out.to(q.dtype), lse


def dense_layout(B: int, H: int, Sq: int, Sk: int, q_tile: int = 128, kv_tile: int = 128, device=None):
    """A layout that visits every key tile from every query tile (equals dense attention)."""
    n_qt, n_kt = (Sq + q_tile - 1) // q_tile, (Sk + kv_tile - 1) // kv_tile
    kv_index = torch.arange(n_kt, device=device, dtype=torch.int32).expand(B, H, n_qt, n_kt).contiguous()
    kv_count = torch.full((B, H, n_qt), n_kt, device=device, dtype=torch.int32)
    return kv_count, kv_index


def random_layout(B: int, H: int, Sq: int, Sk: int, density: float, q_tile: int = 128, kv_tile: int = 128,
                  device=None, generator=None, keep_diagonal: bool = True):
    """A random layout with about ``density`` of the key tiles per query tile (diagonal kept)."""
    n_qt, n_kt = (Sq + q_tile - 1) // q_tile, (Sk + kv_tile - 1) // kv_tile
    keep = torch.rand(B, H, n_qt, n_kt, device=device, generator=generator) < density
    if keep_diagonal:
        diag = (torch.arange(n_qt, device=device) * q_tile // kv_tile).clamp(max=n_kt - 1)
        keep[:, :, torch.arange(n_qt, device=device), diag] = True
    # indices of kept tiles first (stable order), counts per row
    order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)
    kv_index = order.to(torch.int32).contiguous()
    kv_count = keep.sum(-1).to(torch.int32)
    return kv_count, kv_index
