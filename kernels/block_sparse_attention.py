"""Block-sparse flash attention (forward + backward) in Triton.

Semantics and layout are defined in :mod:`mixdit.kernels.reference` (``block_sparse_attention_reference``):
each query tile visits ``kv_count`` key tiles listed in ``kv_index``; optional per-key padding
(``kv_tile_len``) and a per-query-row bitmask over key groups (``row_select`` + ``kv_tile_group``).

Design (see benchmarks/NOTES.md for the measurements behind it):
* forward: one program per (query block, batch*head); it walks the visited key tiles in one flat loop
  (slot, sub-block) so Triton's software pipeliner can prefetch the gathered K/V; online softmax in
  base 2 with log2(e) folded into the scale; fully masked rows never produce NaN.
* backward: FA2-style. ``delta = rowsum(dO * O) - dlse`` (so gradients through ``lse`` are exact),
  a dK/dV kernel that loops over the query tiles visiting its key tile (a transposed layout built on
  the GPU with no host sync), and either a dQ kernel that loops over the visited key tiles like the
  forward ("split", the default) or dQ accumulated inside the dK/dV kernel by fp32 atomics ("atomic":
  5 tile matmuls per (query tile, key tile) pair instead of 7; ``MIXDIT_BWD_DQ=atomic``).
  As in the forward, the gathered tiles (Q/dO in dK/dV, K/V in dQ) come by TMA on Hopper, and lse/delta are
  padded to whole query tiles so the loops carry no per-element masks for ragged lengths. One prologue
  launch computes delta, the padded lse, the transposed layout and (atomic) zeroes the dQ accumulator.
* No host synchronisation anywhere: loop bounds are read inside the kernels, so the forward can be
  captured in a CUDA graph. Eager calls go through an ``autograd.Function`` (little host work per call);
  under ``torch.compile`` / tracing both directions are ``torch.library`` custom ops.
* ``MIXDIT_BWD_DQ`` (split | atomic) and ``MIXDIT_BWD_TMA`` (0: the old backward kernels, for A/B runs) are
  read once, when this module is imported; a call's ``dq_mode`` argument overrides the first.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = [
    "block_sparse_attention",
    "block_sparse_attention_forward",
    "block_sparse_attention_backward",
    "backward_delta",
    "BlockSparseAttentionFunction",
    "transpose_layout",
]

_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453

# Test hook: when True, launchers fill their outputs with NaN before the kernels run, so a test can
# prove every element is written (torch.empty could hide a missed write by reusing old memory).
_POISON_OUTPUTS = False


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mm(a, b, F32_DOT: tl.constexpr):
    # Triton's CPU interpreter multiplies bf16 operands wrongly; there the (already rounded) operands
    # are widened to fp32, which gives the same products the tensor cores compute exactly.
    if F32_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    else:
        return tl.dot(a, b)


@triton.jit
def _tile_meta(kt, slot, KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts, row_ok, row_bit,
               HAS_LEN: tl.constexpr, HAS_SEL: tl.constexpr, SLOT_MASKS: tl.constexpr):
    """What the masks need of visited slot ``slot`` (key tile ``kt``): the tile's real length and, per row, a
    word and a bit position such that the row selects the tile iff that bit of the word is set (zeros where
    unused). ``row_select`` words: the length and the group come through ``kt`` and the row word through the
    group (a chain of dependent loads); per-slot masks (``SLOT_MASKS``, see slot_masks): the bit is the row's and
    the word and the length sit in the slot's entry, so every address depends on the slot alone."""
    kl = 0
    shift = 0
    word = 0
    if SLOT_MASKS:
        if HAS_LEN:
            kl = tl.load(slot_len + slot * s_ts)
        if HAS_SEL:
            word = tl.load(slot_base + slot * s_ts, mask=row_ok, other=0)
            shift = row_bit
    else:
        if HAS_LEN:
            kl = tl.load(KV_LEN + kt)
        if HAS_SEL:
            g = tl.load(KV_GROUP + kt)
            word = tl.load(sel_base + g // 32, mask=row_ok, other=0)
            shift = g % 32
    return kl, shift, word


@triton.jit
def _slot_meta(idx_base, slot, count, s_ii, KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts, row_ok, row_bit,
               HAS_LEN: tl.constexpr, HAS_SEL: tl.constexpr, SLOT_MASKS: tl.constexpr):
    """_tile_meta of visited slot ``slot`` (past ``count``: of slot 0 / tile 0, in bounds and unused)."""
    ok = slot < count
    kt = 0
    if not SLOT_MASKS:
        kt = tl.load(idx_base + slot * s_ii, mask=ok, other=0)
    return _tile_meta(kt, tl.where(ok, slot, 0), KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts, row_ok,
                      row_bit, HAS_LEN, HAS_SEL, SLOT_MASKS)


@triton.jit
def _masked_scores(s, key_ok, shift, word, HAS_SEL: tl.constexpr):
    """Scores of keys that do not exist (``key_ok`` false) or that a row does not select (bit ``shift`` of the
    row's ``word``, see _tile_meta) -> -inf."""
    if HAS_SEL:
        bit = ((word >> shift) & 1) != 0
        return tl.where(key_ok[None, :] & bit[:, None], s, float("-inf"))
    else:
        return tl.where(key_ok[None, :], s, float("-inf"))


@triton.jit
def _slot_masks_kernel(ROW_SEL, KV_COUNT, KV_INDEX, KV_GROUP, KV_LEN, SLOT_SEL, H, Sq, n_qt, cap,
                       s_rb, s_rh, s_rs, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii,
                       Q_TILE: tl.constexpr, ROWS_PER_WORD: tl.constexpr, SC: tl.constexpr, HAS_LEN: tl.constexpr):
    # SLOT_SEL[b, h, qt, slot, w < NW] bit r = row qt * Q_TILE + w * ROWS_PER_WORD + r selects the group of the
    # slot's key tile; SLOT_SEL[..., NW] = that tile's kv_tile_len (see slot_masks).
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    NW: tl.constexpr = Q_TILE // ROWS_PER_WORD
    count = tl.load(KV_COUNT + b * s_cb + h * s_ch + qt * s_cq)
    r = tl.arange(0, Q_TILE)
    rows = qt * Q_TILE + r
    row_ok = rows < Sq
    rs_base = ROW_SEL + b * s_rb + h * s_rh + rows.to(tl.int64) * s_rs
    out_base = SLOT_SEL + (bh.to(tl.int64) * n_qt + qt) * cap * (NW + 1)
    weight = (1 << (r % ROWS_PER_WORD))[:, None]
    for s0 in range(0, count, SC):
        slots = s0 + tl.arange(0, SC)
        s_ok = slots < count
        kt = tl.load(KV_INDEX + b * s_ib + h * s_ih + qt * s_iq + slots * s_ii, mask=s_ok, other=0)
        g = tl.load(KV_GROUP + kt, mask=s_ok, other=0)
        x = tl.load(rs_base[:, None] + (g // 32)[None, :], mask=row_ok[:, None] & s_ok[None, :], other=0)
        bits = ((x >> (g % 32)[None, :]) & 1) * weight  # [Q_TILE, SC], distinct powers of two per word
        words = tl.sum(tl.reshape(bits, (NW, ROWS_PER_WORD, SC)), axis=1)  # sum of distinct bits = their OR
        tl.store(out_base + slots[None, :] * (NW + 1) + tl.arange(0, NW)[:, None], words, mask=s_ok[None, :])
        if HAS_LEN:
            tl.store(out_base + slots * (NW + 1) + NW, tl.load(KV_LEN + kt, mask=s_ok, other=0), mask=s_ok)


@triton.jit
def _fwd_steps(lo, hi, count, m_i, l_i, acc, q, k_base, v_base, k_desc, v_desc, idx_base, s_ii, s_ks, s_vs,
               KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts, row_ok, row_bit, offs_n, offs_d, Sk, qk_scale,
               KV_TILE: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEN: tl.constexpr, HAS_SEL: tl.constexpr,
               SLOT_MASKS: tl.constexpr, EVEN_K: tl.constexpr, F32_DOT: tl.constexpr, USE_TMA: tl.constexpr,
               WARP_SPEC: tl.constexpr, TAIL_ONLY_MASK: tl.constexpr):
    """The forward's online softmax over flat steps ``[lo, hi)`` of (visited slot, sub-block of BLOCK_N keys);
    ``HAS_SEL`` False: no row masks (slots every row of the tile selects). Returns the new (m_i, l_i, acc)."""
    SUB: tl.constexpr = KV_TILE // BLOCK_N
    NEED_MASK: tl.constexpr = HAS_LEN or HAS_SEL or (not EVEN_K)
    # rows can stay at m = -inf after a block only with per-row/per-key masks or an all-padding sub-block
    SAFE_MAX: tl.constexpr = HAS_LEN or HAS_SEL or ((not EVEN_K) and SUB > 1)
    last_kt = (Sk - 1) // KV_TILE
    # The masks' per-tile data (length, group, row bits) of 128-key tiles is loaded one step ahead: loaded in the
    # step that uses it, the chain slot -> tile -> length stalled every step (H200, Wan-14B 720p
    # query_tile layouts: spatial 42.3 -> 39.2 ms, temporal 52.3 -> 48.1 ms). With 32-key tiles (3D layers) the same
    # prefetch made the loop 25% slower (50.3 -> 63.1 ms): there it stays in the step, unless it comes from
    # per-slot masks, whose loads need no tile index. Two steps ahead (session 13): 3D hybrid 8.61 -> 8.51 ms at the
    # old 128-row launch but slower at the 64-row one, and 1.3-1.4x slower at 128-key steps; not kept.
    PREFETCH_META: tl.constexpr = (HAS_LEN or HAS_SEL) and (BLOCK_N >= 128 or SLOT_MASKS)
    kl_next, shift_next, word_next = 0, 0, 0
    if PREFETCH_META:
        kl_next, shift_next, word_next = _slot_meta(idx_base, lo // SUB, count, s_ii, KV_LEN, KV_GROUP, sel_base,
                                                    slot_base, slot_len, s_ts, row_ok, row_bit, HAS_LEN, HAS_SEL,
                                                    SLOT_MASKS)
    # one flat loop over (visited tile, sub-block of BLOCK_N keys): a single loop pipelines better
    for it in tl.range(lo, hi, warp_specialize=WARP_SPEC):
        slot = it // SUB
        sub = it % SUB
        kt = tl.load(idx_base + slot * s_ii)  # Triton pipelines this one (loading it a step ahead gained nothing)
        if PREFETCH_META:
            kl, shift, word = kl_next, shift_next, word_next
            kl_next, shift_next, word_next = _slot_meta(idx_base, (it + 1) // SUB, count, s_ii, KV_LEN, KV_GROUP,
                                                        sel_base, slot_base, slot_len, s_ts, row_ok, row_bit, HAS_LEN,
                                                        HAS_SEL, SLOT_MASKS)
        offs_k = kt * KV_TILE + sub * BLOCK_N + offs_n
        if USE_TMA:
            k = k_desc.load([kt * KV_TILE + sub * BLOCK_N, 0])
            v = v_desc.load([kt * KV_TILE + sub * BLOCK_N, 0])
        else:
            k_ptrs = k_base + offs_k[:, None] * s_ks + offs_d[None, :]
            v_ptrs = v_base + offs_k[:, None] * s_vs + offs_d[None, :]
            if EVEN_K:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=(offs_k < Sk)[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=(offs_k < Sk)[:, None], other=0.0)
        s = _mm(q, tl.trans(k), F32_DOT)
        if TAIL_ONLY_MASK and not (HAS_LEN or HAS_SEL) and (USE_TMA or not EVEN_K):
            # only the last key tile is ragged: skip the per-element select on every other tile. On the TMA
            # path the branch stays even when Sk divides (then the select is a no-op): with no branch in the
            # loop Triton pipelines K/V with two buffers instead of three (164 vs 229 KB of shared memory on
            # sm_90) and the forward was 9% slower (H200, Wan-1.3B shape at 32,768 tokens: 6.93 -> 6.31 ms).
            if kt == last_kt:
                s = tl.where((offs_k < Sk)[None, :], s, float("-inf"))
        elif TAIL_ONLY_MASK and HAS_LEN and not HAS_SEL and BLOCK_N >= 128:
            # VMoBA's padded blocks: only a block's last key tile is partial, mask just those sub-blocks
            # (H200: 4-6% faster with 128-key tiles; with 32-key tiles the branch made the loop 1.3x slower)
            partial = sub * BLOCK_N + BLOCK_N > kl
            if not EVEN_K:
                partial = partial | (kt == last_kt)
            if partial:
                key_ok = (offs_k < Sk) & ((sub * BLOCK_N + offs_n) < kl)
                s = tl.where(key_ok[None, :], s, float("-inf"))
        elif NEED_MASK:
            if not PREFETCH_META:
                kl, shift, word = _tile_meta(kt, slot, KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts, row_ok,
                                             row_bit, HAS_LEN, HAS_SEL, SLOT_MASKS)
            key_ok = offs_k < Sk
            if HAS_LEN:
                key_ok = key_ok & ((sub * BLOCK_N + offs_n) < kl)
            s = _masked_scores(s, key_ok, shift, word, HAS_SEL)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        if SAFE_MAX:
            # a row that has seen only masked keys keeps m = -inf; use 0 so no (-inf) - (-inf)
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32_DOT)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _fwd_kernel(
    Q, K, V, O, LSE, KV_COUNT, KV_INDEX, KV_LEN, ROW_SEL, KV_GROUP, SLOT_SEL, KV_FULL,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii, s_rb, s_rh, s_rs, s_tb, s_th, s_tq, s_ts,
    H, Sq, Sk, qk_scale,
    Q_TILE: tl.constexpr, KV_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_SEL: tl.constexpr, SLOT_MASKS: tl.constexpr, HAS_FULL: tl.constexpr,
    EVEN_M: tl.constexpr, EVEN_K: tl.constexpr, F32_DOT: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPEC: tl.constexpr,
    TAIL_ONLY_MASK: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qt = (pid_m * BLOCK_M) // Q_TILE
    SUB: tl.constexpr = KV_TILE // BLOCK_N

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq

    q_ptrs = Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :]
    if EVEN_M:
        q = tl.load(q_ptrs)
    else:
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if USE_TMA:  # Hopper bulk copies of each gathered [BLOCK_N, D] tile; rows past Sk read as zeros
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, HEAD_DIM], strides=[s_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, HEAD_DIM], strides=[s_vs, 1], block_shape=[BLOCK_N, HEAD_DIM])
    else:
        k_desc, v_desc = k_base, v_base  # unused

    count = tl.load(KV_COUNT + b * s_cb + h * s_ch + qt * s_cq)
    idx_base = KV_INDEX + b * s_ib + h * s_ih + qt * s_iq
    sel_base = ROW_SEL + b * s_rb + h * s_rh + offs_m * s_rs  # read only when HAS_SEL (row words)
    row_in_tile = offs_m % Q_TILE
    row_bit = row_in_tile % 32
    slot_len = SLOT_SEL + b * s_tb + h * s_th + qt * s_tq + (Q_TILE + 31) // 32  # read only with SLOT_MASKS
    slot_base = SLOT_SEL + b * s_tb + h * s_th + qt * s_tq + row_in_tile // 32

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n_full = 0
    if HAS_FULL:
        # the first n_full visited slots are selected by every row of the tile (kv_full): no row masks there
        n_full = tl.minimum(tl.load(KV_FULL + pid_bh.to(tl.int64) * tl.cdiv(Sq, Q_TILE) + qt), count)
        m_i, l_i, acc = _fwd_steps(0, n_full * SUB, count, m_i, l_i, acc, q, k_base, v_base, k_desc, v_desc, idx_base,
                                   s_ii, s_ks, s_vs, KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts, row_ok,
                                   row_bit, offs_n, offs_d, Sk, qk_scale, KV_TILE, BLOCK_N, HAS_LEN, False, SLOT_MASKS,
                                   EVEN_K, F32_DOT, USE_TMA, WARP_SPEC, TAIL_ONLY_MASK)
    m_i, l_i, acc = _fwd_steps(n_full * SUB, count * SUB, count, m_i, l_i, acc, q, k_base, v_base, k_desc, v_desc,
                               idx_base, s_ii, s_ks, s_vs, KV_LEN, KV_GROUP, sel_base, slot_base, slot_len, s_ts,
                               row_ok, row_bit, offs_n, offs_d, Sk, qk_scale, KV_TILE, BLOCK_N, HAS_LEN, HAS_SEL,
                               SLOT_MASKS, EVEN_K, F32_DOT, USE_TMA, WARP_SPEC, TAIL_ONLY_MASK)

    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    o_ptrs = O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :]
    lse_ptrs = LSE + pid_bh.to(tl.int64) * Sq + offs_m
    if EVEN_M:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty))
        tl.store(lse_ptrs, lse)
    else:
        tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=row_ok[:, None])
        tl.store(lse_ptrs, lse, mask=row_ok)


@triton.jit
def _preprocess_rows(
    pid_m, pid_bh, O, DO, DLSE, DELTA, LSE, LSE2, DQACC, s_ob, s_os, s_oh, s_db, s_ds, s_dh, H, Sq, Sq_pad,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, PAD: tl.constexpr, ZERO_ACC: tl.constexpr,
):
    # delta = rowsum(dO * O) - dlse: the lse gradient enters ds exactly like -delta does.
    # PAD: rows are Sq_pad long (whole query tiles); also writes lse * log2(e), with +inf / 0 past Sq,
    # so the dK/dV and dQ loops read both with no mask (p = 0 on padding rows).
    # ZERO_ACC: zero the fp32 dQ accumulator rows ([B*H, Sq_pad, D]) of the atomic-dQ backward.
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = offs_m < Sq
    o = tl.load(O + b * s_ob + h * s_oh + offs_m[:, None] * s_os + offs_d[None, :], mask=ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_ds + offs_d[None, :], mask=ok[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=ok, other=0.0)
    if PAD:
        st = offs_m < Sq_pad
        lse2 = tl.load(LSE + pid_bh.to(tl.int64) * Sq + offs_m, mask=ok, other=float("inf")) * 1.4426950408889634
        tl.store(LSE2 + pid_bh.to(tl.int64) * Sq_pad + offs_m, lse2, mask=st)
        tl.store(DELTA + pid_bh.to(tl.int64) * Sq_pad + offs_m, delta, mask=st)  # 0 past Sq: o = do = 0
        if ZERO_ACC:
            rows = pid_bh.to(tl.int64) * Sq_pad + offs_m
            tl.store(DQACC + rows[:, None] * HEAD_DIM + offs_d[None, :], tl.zeros([BLOCK_M, HEAD_DIM], tl.float32),
                     mask=st[:, None])
    else:
        tl.store(DELTA + pid_bh.to(tl.int64) * Sq + offs_m, delta, mask=ok)


@triton.jit
def _transpose_tiles(
    pid_t, pid_bh, KV_COUNT, KV_INDEX, QBUF, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii, H, n_qt, n_kt,
    BT: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr, TPP: tl.constexpr,
):
    # The transposed layout of BT key tiles: QBUF[b, h, t] = (count, query tiles visiting t in ascending order),
    # rows of n_qt + 1 int32. Query tiles are scanned in chunks of BQ, their visited lists in chunks of BS;
    # a key tile is hit by a query tile if any live slot names it (duplicates count once).
    # TPP > 1: rows per group of TPP consecutive key tiles (n_kt counts groups): the query tiles visiting any of
    # them, each entry qt << TPP | (bit j: it visits the group's tile j).
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_t = pid_t * BT + tl.arange(0, BT)
    t_ok = offs_t < n_kt
    row = QBUF + (pid_bh.to(tl.int64) * n_kt + offs_t) * (n_qt + 1)
    c_base = KV_COUNT + b * s_cb + h * s_ch
    i_base = KV_INDEX + b * s_ib + h * s_ih
    cnt = tl.zeros([BT], dtype=tl.int32)
    for q0 in range(0, n_qt, BQ):
        offs_q = q0 + tl.arange(0, BQ)
        c = tl.load(c_base + offs_q * s_cq, mask=offs_q < n_qt, other=0)
        hit = tl.zeros([BT, BQ], dtype=tl.int32)
        for s0 in range(0, tl.max(c, 0), BS):
            offs_s = s0 + tl.arange(0, BS)
            idx = tl.load(i_base + offs_q[:, None] * s_iq + offs_s[None, :] * s_ii, mask=offs_s[None, :] < c[:, None],
                          other=-1)
            for j in tl.static_range(TPP):  # bit j: the group's tile j is visited (TPP = 1: the tile)
                eq = (idx[None, :, :] == offs_t[:, None, None] * TPP + j).to(tl.int32)  # [BT, BQ, BS]
                hit = hit | (tl.max(eq, 2) << j)
        seen = (hit != 0).to(tl.int32)
        pos = cnt[:, None] + tl.cumsum(seen, 1) - seen
        entry = offs_q[None, :] + tl.zeros([BT, BQ], dtype=tl.int32)
        if TPP > 1:  # the query tile and which of the group's tiles it visits
            entry = (entry << TPP) | hit
        tl.store(row[:, None] + 1 + pos, entry, mask=(hit != 0) & t_ok[:, None])
        cnt += tl.sum(seen, 1)
    tl.store(row, cnt, mask=t_ok)


@triton.jit
def _bwd_prologue_kernel(
    O, DO, DLSE, DELTA, LSE, LSE2, DQACC, KV_COUNT, KV_INDEX, QBUF,
    s_ob, s_os, s_oh, s_db, s_ds, s_dh, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii,
    H, Sq, Sq_pad, n_pre, n_qt, n_kt,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, HAS_DLSE: tl.constexpr, PAD: tl.constexpr,
    ZERO_ACC: tl.constexpr, BT: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr, TPP: tl.constexpr,
):
    # one launch for the backward's small jobs: programs [0, n_pre) preprocess BLOCK_M query rows each,
    # the rest transpose the layout for BT key tiles (or groups of TPP tiles) each (disjoint buffers)
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    if pid < n_pre:
        _preprocess_rows(pid, pid_bh, O, DO, DLSE, DELTA, LSE, LSE2, DQACC, s_ob, s_os, s_oh, s_db, s_ds, s_dh,
                         H, Sq, Sq_pad, HEAD_DIM, BLOCK_M, HAS_DLSE, PAD, ZERO_ACC)
    else:
        _transpose_tiles(pid - n_pre, pid_bh, KV_COUNT, KV_INDEX, QBUF, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii,
                         H, n_qt, n_kt, BT, BQ, BS, TPP)


@triton.jit
def _transpose_kernel(
    KV_COUNT, KV_INDEX, QBUF, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii, H, n_qt, n_kt,
    BT: tl.constexpr, BQ: tl.constexpr, BS: tl.constexpr,
):
    _transpose_tiles(tl.program_id(0), tl.program_id(1), KV_COUNT, KV_INDEX, QBUF, s_cb, s_ch, s_cq, s_ib, s_ih, s_iq,
                     s_ii, H, n_qt, n_kt, BT, BQ, BS, 1)


@triton.jit
def _bwd_dq_cast_kernel(
    ACC, DQ, s_qb, s_qs, s_qh, H, Sq, Sq_pad, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # atomic-dQ epilogue: dq = sm_scale * acc in the output dtype and the [B, Sq, H, D] layout
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    ok = (offs_m < Sq)[:, None]
    acc = tl.load(ACC + (pid_bh.to(tl.int64) * Sq_pad + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], mask=ok, other=0.0)
    tl.store(DQ + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :], (acc * sm_scale).to(DQ.dtype.element_ty),
             mask=ok)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, QBUF, KV_LEN, ROW_SEL, KV_GROUP, DQACC,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh,
    s_dkb, s_dks, s_dkh, s_dvb, s_dvs, s_dvh, s_rb, s_rh, s_rs,
    H, Sq, Sk, n_kt, n_qt, sm_scale, qk_scale,
    Q_TILE: tl.constexpr, KV_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TPP: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_SEL: tl.constexpr, F32_DOT: tl.constexpr,
    PADDED: tl.constexpr, USE_TMA: tl.constexpr, EVEN_Q: tl.constexpr,
    DQ_ATOMIC: tl.constexpr, DQ_TMA: tl.constexpr,
):
    # one program owns BLOCK_N keys of key tile kt and loops over the query tiles that visit kt
    # (QBUF: the transposed layout, rows of n_qt + 1 int32 = count, then the query tiles).
    # TPP = 2 (not with DQ_ATOMIC): the program owns the two key tiles kt, kt + 1 (BLOCK_N = 2 KV_TILE) and QBUF
    # has a row per pair (n_kt counts pairs), entries qt << 2 | (bit j: qt visits tile kt + j); a key's p is
    # zero for a query tile that does not visit its tile.
    # Padding keys past Sk need no mask: their dK/dV rows are never stored.
    # PADDED: LSE holds lse*log2(e) and DELTA delta, both n_qt*Q_TILE rows long with p = 0 past Sq, so the
    # loop needs no row masks; a key past kv_tile_len only touches its own dK/dV row, zeroed once at the end.
    # DQ_ATOMIC (needs PADDED): also dQ += dS K for the visited query rows, fp32 atomics into DQACC
    # ([B*H, n_qt*Q_TILE, D], zeroed before, scaled and cast after); keys past kv_tile_len or Sk are masked
    # out of p there, since their dS would reach dQ (p = exp(-lse) on a padding key can overflow ds to inf).
    # DQ_TMA: the atomics as TMA reduce-adds (Hopper, not interpreted).
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    kt = (pid_n * BLOCK_N) // KV_TILE
    SUB: tl.constexpr = Q_TILE // BLOCK_M
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    key_ok = offs_n < Sk
    tail = pid_n * BLOCK_N + BLOCK_N > Sk  # this program holds keys past Sk
    k = tl.load(K + b * s_kb + h * s_kh + offs_n[:, None] * s_ks + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    v = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vs + offs_d[None, :], mask=key_ok[:, None], other=0.0)
    if HAS_LEN:  # each key against its own tile's length (one tile, kt, unless TPP > 1)
        kt_n = offs_n // KV_TILE
        key_ok = key_ok & ((offs_n - kt_n * KV_TILE) < tl.load(KV_LEN + kt_n, mask=offs_n < Sk, other=0))
    if HAS_SEL:
        g = tl.load(KV_GROUP + kt)
        sel_base = ROW_SEL + b * s_rb + h * s_rh + g // 32
        if TPP > 1:
            g_hi = tl.load(KV_GROUP + kt + 1, mask=(kt + 1) * KV_TILE < Sk, other=0)
            sel_hi = ROW_SEL + b * s_rb + h * s_rh + g_hi // 32
    if TPP > 1:
        hi_key = offs_n >= (kt + 1) * KV_TILE  # the pair's second tile

    q_base = Q + b * s_qb + h * s_qh
    do_base = DO + b * s_db + h * s_dh
    if PADDED:
        row_base = pid_bh.to(tl.int64) * n_qt * Q_TILE
    else:
        row_base = pid_bh.to(tl.int64) * Sq
    if USE_TMA:  # bulk copies of each gathered [BLOCK_M, D] tile; rows past Sq read as zeros
        q_desc = tl.make_tensor_descriptor(q_base, shape=[Sq, HEAD_DIM], strides=[s_qs, 1], block_shape=[BLOCK_M, HEAD_DIM])
        do_desc = tl.make_tensor_descriptor(do_base, shape=[Sq, HEAD_DIM], strides=[s_ds, 1], block_shape=[BLOCK_M, HEAD_DIM])
    lay = (pid_bh.to(tl.int64) * n_kt + kt // TPP) * (n_qt + 1)
    count = tl.load(QBUF + lay)
    idx_base = QBUF + lay + 1
    if DQ_ATOMIC:
        acc_base = DQACC + row_base * HEAD_DIM
        if DQ_TMA:
            acc_desc = tl.make_tensor_descriptor(acc_base, shape=[n_qt * Q_TILE, HEAD_DIM], strides=[HEAD_DIM, 1],
                                                 block_shape=[BLOCK_M, HEAD_DIM])

    dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
    for it in range(0, count * SUB):
        qt = tl.load(idx_base + it // SUB)
        if TPP > 1:
            vis = (tl.where(hi_key, qt >> 1, qt) & 1) != 0  # [BLOCK_N]: this query tile visits the key's tile
            qt = qt >> TPP
        m0 = qt * Q_TILE + (it % SUB) * BLOCK_M
        offs_m = m0 + offs_mb
        row_ok = offs_m < Sq
        if USE_TMA:
            q = q_desc.load([m0, 0])
            do = do_desc.load([m0, 0])
        elif PADDED and EVEN_Q:
            q = tl.load(q_base + offs_m[:, None] * s_qs + offs_d[None, :])
            do = tl.load(do_base + offs_m[:, None] * s_ds + offs_d[None, :])
        else:
            q = tl.load(q_base + offs_m[:, None] * s_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            do = tl.load(do_base + offs_m[:, None] * s_ds + offs_d[None, :], mask=row_ok[:, None], other=0.0)
        if PADDED:
            lse2 = tl.load(LSE + row_base + offs_m)
            delta = tl.load(DELTA + row_base + offs_m)
        else:
            # lse = +inf past Sq makes p = 0 there; delta = 0 there
            lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
            delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
        sT = _mm(k, tl.trans(q), F32_DOT)
        pT = tl.exp2(sT * qk_scale - lse2[None, :])
        if HAS_SEL:
            word = tl.load(sel_base + offs_m * s_rs, mask=row_ok, other=0)
            sel = (((word >> (g % 32)) & 1) != 0)[None, :]
            if TPP > 1:
                word_hi = tl.load(sel_hi + offs_m * s_rs, mask=row_ok, other=0)
                sel = tl.where(hi_key[:, None], (((word_hi >> (g_hi % 32)) & 1) != 0)[None, :], sel)
        if PADDED:
            if HAS_SEL:
                ok = sel
                if DQ_ATOMIC:
                    ok = ok & key_ok[:, None]
                if TPP > 1:
                    ok = ok & vis[:, None]
                pT = tl.where(ok, pT, 0.0)
            elif TPP > 1:
                pT = tl.where(vis[:, None], pT, 0.0)
            elif DQ_ATOMIC and (HAS_LEN or tail):
                pT = tl.where(key_ok[:, None], pT, 0.0)
        elif HAS_LEN or HAS_SEL or TPP > 1:
            ok = key_ok[:, None]
            if HAS_SEL:
                ok = ok & sel
            if TPP > 1:
                ok = ok & vis[:, None]
            pT = tl.where(ok, pT, 0.0)
        dv += _mm(pT.to(do.dtype), do, F32_DOT)
        dpT = _mm(v, tl.trans(do), F32_DOT)
        dsT = (pT * (dpT - delta[None, :])).to(q.dtype)
        dk += _mm(dsT, q, F32_DOT)
        if DQ_ATOMIC:
            dq = _mm(tl.trans(dsT), k, F32_DOT)  # [BLOCK_M, D], unscaled
            if DQ_TMA:
                acc_desc.atomic_add([m0, 0], dq)
            else:
                tl.atomic_add(acc_base + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq, sem="relaxed")

    dk = dk * sm_scale
    if PADDED and HAS_LEN:
        dk = tl.where(key_ok[:, None], dk, 0.0)
        dv = tl.where(key_ok[:, None], dv, 0.0)
    st_ok = (offs_n < Sk)[:, None]
    tl.store(DK + b * s_dkb + h * s_dkh + offs_n[:, None] * s_dks + offs_d[None, :], dk.to(DK.dtype.element_ty), mask=st_ok)
    tl.store(DV + b * s_dvb + h * s_dvh + offs_n[:, None] * s_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=st_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, KV_COUNT, KV_INDEX, KV_LEN, ROW_SEL, KV_GROUP,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_db, s_ds, s_dh, s_dqb, s_dqs, s_dqh,
    s_cb, s_ch, s_cq, s_ib, s_ih, s_iq, s_ii, s_rb, s_rh, s_rs,
    H, Sq, Sk, n_qt, sm_scale, qk_scale,
    Q_TILE: tl.constexpr, KV_TILE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_LEN: tl.constexpr, HAS_SEL: tl.constexpr, F32_DOT: tl.constexpr,
    PADDED: tl.constexpr, USE_TMA: tl.constexpr, EVEN_K: tl.constexpr,
):
    # one program owns BLOCK_M query rows and walks their visited key tiles like the forward.
    # Padding keys past Sk load as k = v = 0 but have s = 0, so p = exp(-lse): for a row whose lse is very
    # negative, ds overflows to inf in fp16/bf16 and inf * 0 is NaN in dQ. The exponent is clamped (below).
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    qt = (pid_m * BLOCK_M) // Q_TILE
    SUB: tl.constexpr = KV_TILE // BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < Sq
    q = tl.load(Q + b * s_qb + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(DO + b * s_db + h * s_dh + offs_m[:, None] * s_ds + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    if PADDED:  # lse * log2(e) and delta, padded to whole query tiles
        row_base = pid_bh.to(tl.int64) * n_qt * Q_TILE
        lse2 = tl.load(LSE + row_base + offs_m)
        delta = tl.load(DELTA + row_base + offs_m)
    else:
        row_base = pid_bh.to(tl.int64) * Sq
        lse2 = tl.load(LSE + row_base + offs_m, mask=row_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + row_base + offs_m, mask=row_ok, other=0.0)
    k_base = K + b * s_kb + h * s_kh
    v_base = V + b * s_vb + h * s_vh
    if USE_TMA:  # bulk copies of each gathered [BLOCK_N, D] tile; rows past Sk read as zeros
        k_desc = tl.make_tensor_descriptor(k_base, shape=[Sk, HEAD_DIM], strides=[s_ks, 1], block_shape=[BLOCK_N, HEAD_DIM])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[Sk, HEAD_DIM], strides=[s_vs, 1], block_shape=[BLOCK_N, HEAD_DIM])
    count = tl.load(KV_COUNT + b * s_cb + h * s_ch + qt * s_cq)
    idx_base = KV_INDEX + b * s_ib + h * s_ih + qt * s_iq
    sel_base = ROW_SEL + b * s_rb + h * s_rh + offs_m * s_rs  # read only when HAS_SEL

    dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for it in range(0, count * SUB):
        kt = tl.load(idx_base + (it // SUB) * s_ii)
        sub = it % SUB
        n0 = kt * KV_TILE + sub * BLOCK_N
        offs_k = n0 + offs_n
        if USE_TMA:
            k = k_desc.load([n0, 0])
            v = v_desc.load([n0, 0])
        elif PADDED and EVEN_K:
            k = tl.load(k_base + offs_k[:, None] * s_ks + offs_d[None, :])
            v = tl.load(v_base + offs_k[:, None] * s_vs + offs_d[None, :])
        else:
            kmask = (offs_k < Sk)[:, None]
            k = tl.load(k_base + offs_k[:, None] * s_ks + offs_d[None, :], mask=kmask, other=0.0)
            v = tl.load(v_base + offs_k[:, None] * s_vs + offs_d[None, :], mask=kmask, other=0.0)
        s = _mm(q, tl.trans(k), F32_DOT)
        if EVEN_K:
            p = tl.exp2(s * qk_scale - lse2[:, None])
        else:
            # real keys have exponent <= 0; the clamp only bounds padding keys (p <= 2^8, so ds stays finite
            # and ds * k = 0). A select or a tail-tile branch here made Triton keep q/dO in shared memory
            # (256 KB at 128x128x3 stages: over Hopper's 227 KB); the clamp does not.
            p = tl.exp2(tl.minimum(s * qk_scale - lse2[:, None], 8.0))
        if HAS_LEN or HAS_SEL:
            # in the step: loading the masks' data a step ahead, as the forward does, changed nothing here (H200)
            kl, shift, word = _tile_meta(kt, 0, KV_LEN, KV_GROUP, sel_base, sel_base, sel_base, 0, row_ok, 0,
                                         HAS_LEN, HAS_SEL, False)
            ok = tl.full([BLOCK_M, BLOCK_N], 1, tl.int1)
            if HAS_LEN:
                ok = ok & ((sub * BLOCK_N + offs_n) < kl)[None, :]
            if HAS_SEL:
                ok = ok & (((word >> shift) & 1) != 0)[:, None]
            p = tl.where(ok, p, 0.0)
        dp = _mm(do, tl.trans(v), F32_DOT)
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, F32_DOT)

    dq = dq * sm_scale
    tl.store(DQ + b * s_dqb + h * s_dqh + offs_m[:, None] * s_dqs + offs_d[None, :], dq.to(DQ.dtype.element_ty), mask=row_ok[:, None])


# ----------------------------------------------------------------------------------------------
# configs: a small fixed table keyed on head_dim (measured on H100, see benchmarks/NOTES.md)
# ----------------------------------------------------------------------------------------------
# (BLOCK_M, BLOCK_N, num_warps, num_stages); BLOCK_M/BLOCK_N are clipped to the layout tiles.
_FWD_CONFIGS = {64: (128, 128, 8, 3), 128: (128, 128, 8, 3)}
# key tiles <= this (VMoBA's 3D layers) take the *_SMALL_KV tables and the paired dK/dV programs below
_SMALL_KV_TILE = 32
# layouts of key tiles <= _SMALL_KV_TILE: 64-row programs of 4 warps, 3 stages with row masks and 2 without.
# H200, Wan-1.3B 3D layer with the router (session 13, results/fwd-config-sweep-session13-*.json): exact rule
# (per-slot masks) 10.92 -> 10.02 ms against 128 x 32 with 8 warps, 3 stages (2 stages: 10.15); query_tile
# granularity (lengths only) 3.10 -> 2.96 ms (3 stages: 3.19). 128-key layouts keep the table above (64-row or
# 64-key launches were 2% faster in the exact spatial layers and 10-25% slower everywhere else).
_FWD_CONFIGS_SMALL_KV = {"row_masks": {64: (64, 32, 4, 3), 128: (64, 32, 4, 3)},
                         "lengths_only": {64: (64, 32, 4, 2), 128: (64, 32, 4, 2)}}
_DKDV_CONFIGS = {64: (64, 64, 4, 3), 128: (64, 64, 4, 3)}  # (BLOCK_M queries, BLOCK_N keys, ...)
# key tiles <= _SMALL_KV_TILE: each dK/dV program takes a pair of neighbouring key tiles and walks the union of
# the query tiles visiting either (the transposed layout says which of the two each visits; p = 0 for the other):
# 32-key programs made M = 32 MMAs (no wgmma on Hopper). _BWD_OPTS["pair_tiles"] switches it (A/B).
# H200, Wan-1.3B 3D layer, the exact rule's forward + split backward: 32.3 -> 29.4 ms, and 28.4-28.9 with 2 stages
# (session 17, results/vmoba-train-sweep-pairs-session17-*.json)
_DKDV_CONFIGS_PAIRS = {64: (64, 64, 4, 2), 128: (64, 64, 4, 2)}
_DQ_CONFIGS = {64: (128, 128, 8, 3), 128: (128, 128, 8, 3)}
# dQ over key tiles <= _SMALL_KV_TILE: 4 warps. H200, Wan-1.3B 3D layer, the exact rule's forward + split
# backward: 39.9 -> 34.1 ms against the table above clipped to 64 x 32 with 8 warps (session 17,
# results/vmoba-train-sweep-*.json)
_DQ_CONFIGS_SMALL_KV = {64: (64, 32, 4, 3), 128: (64, 32, 4, 3)}
# the backward's TMA path (Hopper) uses the same tables; "dkdv"/"dq" overrides apply to either path
# the dK/dV kernel that also accumulates dQ by atomics (not yet measured on a GPU): whole 128-key tiles per
# program, so each (query row, key tile) pair adds its dQ row once (half the atomic bytes of 64-key programs)
_DKDV_ATOMIC_CONFIGS = {64: (64, 128, 8, 2), 128: (64, 128, 8, 2)}
_INTERPRET_CONFIG = (64, 64, 4, 1)
# the backward prologue: preprocess rows per program; transposed-layout chunk (key tiles, query tiles, slots)
_PRE_BLOCK_M = 64
_TR_BLOCKS = (16, 16, 32)

# optional overrides used by the benchmark's config sweeps: {"fwd"|"dkdv"|"dq"|"dkdv_atomic": (BM, BN, warps, stages)}
_CONFIG_OVERRIDE: dict = {}
# extra launch options for the forward, set only by the sweep (e.g. {"maxnreg": 128}: two 8-warp CTAs per SM)
_FWD_LAUNCH_EXTRA: dict = {}


def _env_dq_mode() -> str:
    return os.environ.get("MIXDIT_BWD_DQ", "split").strip().lower() or "split"


# forward code-path switches (measured in benchmarks/NOTES.md); the benchmark's sweep flips them
# TMA + masking only the ragged last tile: 454 -> 548 TFLOP/s dense, 438 -> 526 at 25% (Wan-1.3B, H100).
# tail_only_mask also covers kv_tile_len without row masks (VMoBA's padded blocks) at BLOCK_N >= 128: only the
# partial tiles are masked (VMoBA 1D/2D layers 1-6% faster; at BLOCK_N = 32 it was 1.3x slower, so not there).
# warp_specialize on Hopper (triton 3.6) measured slower: off.
# A lazy rescale (acc rescaled only when a row max grows by > 2^8, FlashAttention-4's trick) as one branch per
# tile was 8-10% slower (H200: 6.42 -> 6.93 ms at 25%): the branch breaks the loop's pipelining. Not kept.
# exp2_group (one softmax exp2 in 4 / 8 on the FMA pipe by inline PTX) and group_small_tiles (32-key tiles taken 128
# keys per online-softmax step) were measured and removed in session 8 (NOTES: mixed / slower; code in f9270e7).
# prefetch_index (the visited tile's index loaded a step ahead, like the masks' data) was timed and dropped in
# session 8: d = 0.25 unchanged, d = 1 2.5% slower.
# slot_masks_below: forward steps of fewer keys than this take row_select (and kv_tile_len) through per-slot masks
# (slot_masks), loaded a step ahead with no tile index behind them; the row words' chain tile -> group -> word is
# loaded a step ahead only at BLOCK_N >= 128 (see _fwd_kernel). H200, Wan-1.3B 3D layer (32-key steps), the hybrid's
# query-tile part: 4.87 -> 3.97 ms, building them included; at 128-key steps no change. The masks take
# (q_tile / 32 + 1) x the bytes of kv_index: above _SLOT_MASKS_MAX_BYTES the row words are read as before (the
# hybrid cuts its layout to the most tiles a query tile visits first, so Wan-14B 720p 3D layers fit: slot_masks_fit).
_FWD_OPTS = {"tma": True, "warp_specialize": False, "tail_only_mask": True, "slot_masks_below": 128}
_SLOT_MASKS_MAX_BYTES = 1 << 29


@contextlib.contextmanager
def _tables_restored(*tables: dict):
    """Every table as it was on entry, again on leaving (also on an error)."""
    saved = [dict(t) for t in tables]
    try:
        yield
    finally:
        for table, old in zip(tables, saved):
            table.clear()
            table.update(old)


@contextlib.contextmanager
def forward_variant(switches: dict | None = None, config=None, launch_extra: dict | None = None):
    """A/B hook of the benchmarks: inside, the forward runs with these ``_FWD_OPTS`` switches over the
    defaults, this ``(BLOCK_M, BLOCK_N, warps, stages)`` config and these extra launch options; everything
    is restored on leaving (also on an error)."""
    with _tables_restored(_FWD_OPTS, _CONFIG_OVERRIDE, _FWD_LAUNCH_EXTRA):
        _FWD_OPTS.update(switches or {})
        if config is not None:
            _CONFIG_OVERRIDE["fwd"] = config
        _FWD_LAUNCH_EXTRA.update(launch_extra or {})
        yield


# backward switches: "tma" = descriptors for the gathered Q/dO (dK/dV) and K/V (dQ) tiles; "padded" = lse/delta
# padded to whole query tiles so the loops carry no row masks. MIXDIT_BWD_TMA=0 selects the old kernels (A/B).
# "dq": "split" = FA2-style dK/dV kernel + dQ kernel; "atomic" = dQ accumulated by fp32 atomics inside the dK/dV
# kernel (5 tile matmuls per pair instead of 7; always padded). MIXDIT_BWD_DQ=atomic|split, or the launcher's
# dq_mode argument. "dq_tma_reduce": the atomic path's adds as TMA reduce-adds (Hopper only; a sweep option).
_BWD_OPTS = {"tma": os.environ.get("MIXDIT_BWD_TMA", "1") != "0", "padded": os.environ.get("MIXDIT_BWD_TMA", "1") != "0",
             "dq": _env_dq_mode(), "dq_tma_reduce": False, "pair_tiles": True}
_DQ_MODES = ("split", "atomic")


@contextlib.contextmanager
def backward_variant(switches: dict | None = None, configs: dict | None = None):
    """A/B hook of the benchmarks: inside, the backward runs with these ``_BWD_OPTS`` switches over the
    defaults and, when ``configs`` is given ({"dkdv"|"dq"|"dkdv_atomic": (BLOCK_M, BLOCK_N, warps, stages)}), with
    exactly those config overrides; both tables are restored on leaving (also on an error)."""
    with _tables_restored(_BWD_OPTS, _CONFIG_OVERRIDE):
        _BWD_OPTS.update(switches or {})
        if configs is not None:
            _CONFIG_OVERRIDE.clear()
            _CONFIG_OVERRIDE.update(configs)
        yield

# Triton picks the interpreter when a kernel is decorated (at import), so this is fixed for the process.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_CAPABILITY: dict = {}  # CUDA device index -> compute capability major


def _scratch(size: int, align: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _use_tma(k, v) -> bool:
    return bool(_FWD_OPTS["tma"]) and _tma_ok(k, v)


def _tma_ok(*ts) -> bool:
    # device-side TMA descriptors: Hopper+, 16-byte aligned bases and (non-zero) strides
    k = ts[0]
    if _INTERPRET or not k.is_cuda:
        return False
    dev = k.get_device()
    major = _CAPABILITY.get(dev)
    if major is None:
        major = _CAPABILITY[dev] = torch.cuda.get_device_capability(dev)[0]
    if major < 9:
        return False
    for t in ts:
        st, esz = t.stride(), t.element_size()
        if t.data_ptr() % 16 or st[1] == 0 or (st[0] * esz) % 16 or (st[1] * esz) % 16 or (st[2] * esz) % 16:
            return False
    # Descriptors created in-kernel need a small global scratch buffer. Triton keeps the allocator in a
    # context variable, i.e. per thread: set it on every call, since autograd's backward thread (gradient
    # checkpointing recomputes the forward there) does not inherit the main thread's.
    triton.set_allocator(_scratch)
    return True


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)  # triton.cdiv is a @jit function: ~10 us per host call


def _pick(kind: str, table: dict, D: int, q_tile: int, kv_tile: int):
    cfg = _CONFIG_OVERRIDE.get(kind)
    if cfg is None:
        cfg = _INTERPRET_CONFIG if _INTERPRET else table.get(D) or (table[128] if D > 64 else table[64])
    bm, bn, warps, stages = cfg
    bm, bn = min(bm, q_tile), min(bn, kv_tile)
    if D > 128:  # keep registers in check for large heads
        bm, bn = min(bm, 64), min(bn, 64)
    return bm, bn, warps, stages


def _dq_mode(mode) -> str:
    mode = _BWD_OPTS["dq"] if mode is None else mode
    if mode not in _DQ_MODES:
        raise ValueError(f"dq mode (MIXDIT_BWD_DQ / dq_mode) must be one of {_DQ_MODES}, got {mode!r}")
    return mode


def _check(q, k, v, q_tile, kv_tile):
    qs, ks = q.shape, k.shape
    if len(qs) != 4 or ks != v.shape or qs[0] != ks[0] or qs[2:] != ks[2:]:
        raise ValueError(f"expected q [B,Sq,H,D], k/v [B,Sk,H,D]; got {tuple(qs)}, {tuple(ks)}, {tuple(v.shape)}")
    D = qs[3]
    if D < 16 or D & (D - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {D}")
    dt = q.dtype
    if (dt is not torch.float16 and dt is not torch.bfloat16) or k.dtype is not dt or v.dtype is not dt:
        raise ValueError(f"q, k, v must share dtype float16 or bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q_tile < 16 or q_tile & (q_tile - 1) or kv_tile < 16 or kv_tile & (kv_tile - 1):
        raise ValueError(f"q_tile/kv_tile must be powers of two >= 16, got {q_tile}, {kv_tile}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        # sample and head offsets are int64 in the kernels, row offsets (token x stride) int32
        span = (t.shape[1] - 1) * abs(t.stride(1)) + (t.shape[3] - 1) * abs(t.stride(3)) + 1
        if span >= 2 ** 31:
            raise ValueError(f"{name} {tuple(t.shape)}: one head of one sample spans {span} elements, over the kernels' "
                             f"int32 row offsets (< 2^31); pass [B, S, H, D] views of [B, H, S, D] storage "
                             f"(x.transpose(1, 2)), whose rows are D apart, or a shorter sequence")


def _last_contig(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _int32(t):
    return t if t is None or t.dtype is torch.int32 else t.to(torch.int32)


def _int32_contig(t):
    if t is None:
        return None
    if t.dtype is not torch.int32:
        t = t.to(torch.int32)
    return t if t.is_contiguous() else t.contiguous()


def _check_layout(q, k, kv_count, kv_index, q_tile, kv_tile, kv_tile_len, row_select, kv_tile_group, kv_full=None):
    # the kernels index these by (b, h, tile) with no bounds checks: a layout built for other tiles reads garbage
    B, Sq, H, _ = q.shape
    n_qt, n_kt = _cdiv(Sq, q_tile), _cdiv(k.shape[1], kv_tile)
    expect = {"kv_count": (kv_count, (B, H, n_qt)), "kv_tile_len": (kv_tile_len, (n_kt,)),
              "kv_tile_group": (kv_tile_group, (n_kt,)), "kv_full": (kv_full, (B, H, n_qt))}
    for name, (t, shape) in expect.items():
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape} for q_tile={q_tile}, kv_tile={kv_tile} "
                             f"(Sq={Sq}, Sk={k.shape[1]}), got {tuple(t.shape)}")
    if kv_index.ndim != 4 or tuple(kv_index.shape[:3]) != (B, H, n_qt) or kv_index.shape[3] < 1:
        raise ValueError(f"kv_index must have shape ({B}, {H}, {n_qt}, capacity >= 1), got {tuple(kv_index.shape)}")
    if row_select is not None:
        if row_select.ndim != 4 or tuple(row_select.shape[:3]) != (B, H, Sq):
            raise ValueError(f"row_select must have shape ({B}, {H}, {Sq}, words), got {tuple(row_select.shape)}")
        if kv_tile_group is None:
            raise ValueError("row_select needs kv_tile_group (the group of each key tile)")
    for name, t in (("kv_count", kv_count), ("kv_index", kv_index), ("kv_tile_len", kv_tile_len),
                    ("row_select", row_select), ("kv_tile_group", kv_tile_group), ("kv_full", kv_full)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}: the layout must live with the inputs")


def _normalise(q, k, v, kv_count, kv_index, q_tile, kv_tile, kv_tile_len, row_select, kv_tile_group, kv_full=None):
    """Check the inputs once and bring them to what the kernels read (the autograd forward saves the result;
    ``kv_full``, a forward-only hint, is checked here and normalised by the forward launcher)."""
    _check(q, k, v, q_tile, kv_tile)
    _check_layout(q, k, kv_count, kv_index, q_tile, kv_tile, kv_tile_len, row_select, kv_tile_group, kv_full)
    rs = None
    if row_select is not None:
        rs = _int32(row_select)
        if rs.stride(-1) != 1:
            rs = rs.contiguous()
    return (_last_contig(q), _last_contig(k), _last_contig(v), _int32(kv_count), _int32(kv_index),
            _int32_contig(kv_tile_len), rs, _int32_contig(kv_tile_group))


def _f32_dot(q) -> bool:
    return _INTERPRET and q.dtype is torch.bfloat16


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------
def _forward(q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_len, rs, grp, kv_full=None):
    # inputs as _normalise returns them; scale a float; kv_full: see block_sparse_attention (ignored without rs)
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty((B, H, Sq), device=q.device, dtype=torch.float32)
    if _POISON_OUTPUTS:
        out.fill_(float("nan"))
        lse.fill_(float("nan"))
    small = _FWD_CONFIGS_SMALL_KV["lengths_only" if rs is None else "row_masks"]
    table = small if kv_tile <= _SMALL_KV_TILE else _FWD_CONFIGS
    bm, bn, warps, stages = _pick("fwd", table, D, q_tile, kv_tile)
    sq, sk, sv, so, sc, si = q.stride(), k.stride(), v.stride(), out.stride(), kv_count.stride(), kv_index.stride()
    srs = (0, 0, 0) if rs is None else rs.stride()
    slots = None
    if rs is not None and bn < _FWD_OPTS["slot_masks_below"] and slot_masks_fit(kv_index, q_tile):
        slots = slot_masks(rs, kv_count, kv_index, grp, q_tile, kv_len)
    sts = (0, 0, 0, 0) if slots is None else slots.stride()[:4]
    full = None if rs is None else _int32_contig(kv_full)
    _fwd_kernel[(_cdiv(Sq, bm), B * H)](
        q, k, v, out, lse, kv_count, kv_index, kv_count if kv_len is None else kv_len,
        q if rs is None else rs, q if grp is None else grp,  # dummies are never read (HAS_LEN/HAS_SEL False)
        q if slots is None else slots, kv_count if full is None else full,
        sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], so[0], so[1], so[2],
        sc[0], sc[1], sc[2], si[0], si[1], si[2], si[3], srs[0], srs[1], srs[2], *sts,
        H, Sq, Sk, scale * _LOG2E,
        Q_TILE=q_tile, KV_TILE=kv_tile, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        HAS_LEN=kv_len is not None, HAS_SEL=rs is not None, SLOT_MASKS=slots is not None, HAS_FULL=full is not None,
        EVEN_M=Sq % bm == 0, EVEN_K=Sk % kv_tile == 0, F32_DOT=_f32_dot(q), USE_TMA=_use_tma(k, v),
        WARP_SPEC=bool(_FWD_OPTS["warp_specialize"]) and not _INTERPRET, TAIL_ONLY_MASK=bool(_FWD_OPTS["tail_only_mask"]),
        num_warps=warps, num_stages=stages, **_FWD_LAUNCH_EXTRA,
    )
    return out, lse


def _slot_mask_words(q_tile: int) -> int:
    """Row-bit words per slot entry of :func:`slot_masks` (the length word follows them)."""
    return _cdiv(q_tile, 32)


def slot_masks_fit(kv_index: torch.Tensor, q_tile: int) -> bool:
    """Whether the forward may build :func:`slot_masks` for this layout (they take ``q_tile / 32 + 1`` times the
    bytes of ``kv_index``, capped at ``_SLOT_MASKS_MAX_BYTES``; a caller that can afford a host sync may pass
    ``kv_index[..., :kv_count.max()]`` instead of a layout sized for every key tile)."""
    return kv_index.numel() * (_slot_mask_words(q_tile) + 1) * 4 <= _SLOT_MASKS_MAX_BYTES


def slot_masks(row_select: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor,
               kv_tile_group: torch.Tensor, q_tile: int, kv_tile_len: torch.Tensor | None = None) -> torch.Tensor:
    """``row_select`` transposed to the visited slots: int32 ``[B, H, n_qt, capacity, NW + 1]``, NW =
    ``ceil(q_tile / 32)``: at ``[b, h, qt, slot]``, bit ``r`` of word ``w < NW`` says whether row
    ``qt * q_tile + 32 w + r`` selects the group of key tile ``kv_index[b, h, qt, slot]``, and word ``NW`` holds
    that tile's ``kv_tile_len`` (0 without one). Slots past ``kv_count`` are not written. With these every
    address the forward's masks read in a step depends on the slot alone, so they load a step ahead with no
    chain tile -> group -> row word behind them (see ``_fwd_kernel``)."""
    B, H, n_qt, cap = kv_index.shape
    Sq = row_select.shape[2]
    out = torch.empty(B, H, n_qt, cap, _slot_mask_words(q_tile) + 1, device=kv_index.device, dtype=torch.int32)
    if _POISON_OUTPUTS:
        out.fill_(0x55555555)
    sr, sc, si = row_select.stride(), kv_count.stride(), kv_index.stride()
    _slot_masks_kernel[(n_qt, B * H)](row_select, kv_count, kv_index, kv_tile_group,
                                      kv_count if kv_tile_len is None else kv_tile_len, out, H, Sq, n_qt, cap,
                                      sr[0], sr[1], sr[2], sc[0], sc[1], sc[2], si[0], si[1], si[2], si[3],
                                      Q_TILE=q_tile, ROWS_PER_WORD=min(32, q_tile), SC=32, HAS_LEN=kv_tile_len is not None,
                                      num_warps=4)
    return out


def block_sparse_attention_forward(q, k, v, kv_count, kv_index, q_tile: int = 128, kv_tile: int = 128,
                                   scale: Optional[float] = None, kv_tile_len=None, row_select=None,
                                   kv_tile_group=None, kv_full=None):
    """Launch the forward kernel; returns ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``. No autograd."""
    args = _normalise(q, k, v, kv_count, kv_index, q_tile, kv_tile, kv_tile_len, row_select, kv_tile_group, kv_full)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _forward(*args[:5], q_tile, kv_tile, scale, *args[5:], kv_full)


def transpose_layout(kv_count, kv_index, n_kv_tiles: int):
    """Per key tile, the query tiles that visit it: ``(q_count [B,H,n_kt], q_index [B,H,n_kt,n_qt])``.

    One Triton kernel (no host sync); the query tiles of each key tile come in ascending order. Both are views
    of one int32 buffer ``[B, H, n_kt, 1 + n_qt]`` (count, then indices): index rows are contiguous, entries past
    the count are unspecified.
    """
    kv_count, kv_index = _int32(kv_count), _int32(kv_index)
    B, H, n_qt = kv_count.shape
    qbuf = torch.empty((B, H, n_kv_tiles, n_qt + 1), device=kv_index.device, dtype=torch.int32)
    sc, si = kv_count.stride(), kv_index.stride()
    bt, bq, bs = _TR_BLOCKS
    _transpose_kernel[(_cdiv(n_kv_tiles, bt), B * H)](
        kv_count, kv_index, qbuf, sc[0], sc[1], sc[2], si[0], si[1], si[2], si[3], H, n_qt, n_kv_tiles,
        BT=bt, BQ=bq, BS=bs, num_warps=4,
    )
    return qbuf[..., 0], qbuf[..., 1:]


def _backward(grad_out, q, k, v, out, lse, kv_count, kv_index, q_tile, kv_tile, scale, kv_len, rs, grp, grad_lse,
              dq_mode, grad_dtype=None):
    # inputs as _normalise returns them; grad_out in q's dtype with a unit last stride, lse / grad_lse fp32
    # contiguous; scale a float. Launches: prologue (delta, padded lse, transposed layout, zeroed dQ accumulator),
    # dK/dV (+ dQ atomics), then the dQ kernel (split) or the dQ cast (atomic).
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    n_kt, n_qt = _cdiv(Sk, kv_tile), _cdiv(Sq, q_tile)
    atomic = _dq_mode(dq_mode) == "atomic"
    padded = atomic or bool(_BWD_OPTS["padded"])
    use_tma = bool(_BWD_OPTS["tma"]) and _tma_ok(q, k, v, grad_out)
    dev = q.device
    # padded: lse*log2(e) (+inf past Sq) and delta (0 past Sq) over whole query tiles; else delta only
    Sq_pad = n_qt * q_tile if padded else Sq
    delta = torch.empty((B, H, Sq_pad), device=dev, dtype=torch.float32)
    lse_arg = torch.empty_like(delta) if padded else lse
    # dK/dV programs over pairs of small key tiles (_DKDV_CONFIGS_PAIRS)
    tpp = 2 if (not atomic and kv_tile <= _SMALL_KV_TILE and _BWD_OPTS["pair_tiles"]) else 1
    n_kp = _cdiv(n_kt, tpp)  # rows of the transposed layout: key tiles, or pairs of them
    qbuf = torch.empty((B, H, n_kp, n_qt + 1), device=dev, dtype=torch.int32)
    acc = torch.empty((B * H, Sq_pad, D), device=dev, dtype=torch.float32) if atomic else delta
    dq = torch.empty_like(q, dtype=grad_dtype)
    dk = torch.empty_like(k, dtype=grad_dtype)
    dv = torch.empty_like(v, dtype=grad_dtype)
    if _POISON_OUTPUTS:  # the prologue's buffers too: a row it misses shows up as NaN
        for t in (dq, dk, dv, delta, lse_arg, acc) if padded else (dq, dk, dv):
            t.fill_(float("nan"))

    pre_bm = _PRE_BLOCK_M
    n_pre = _cdiv(Sq_pad, pre_bm)
    bt, bq, bs = _TR_BLOCKS
    so, sd, sc, si = out.stride(), grad_out.stride(), kv_count.stride(), kv_index.stride()
    _bwd_prologue_kernel[(n_pre + _cdiv(n_kp, bt), B * H)](
        out, grad_out, delta if grad_lse is None else grad_lse, delta, lse, lse_arg, acc, kv_count, kv_index, qbuf,
        so[0], so[1], so[2], sd[0], sd[1], sd[2], sc[0], sc[1], sc[2], si[0], si[1], si[2], si[3],
        H, Sq, Sq_pad, n_pre, n_qt, n_kp,
        HEAD_DIM=D, BLOCK_M=pre_bm, HAS_DLSE=grad_lse is not None, PAD=padded, ZERO_ACC=atomic,
        BT=bt, BQ=bq, BS=bs, TPP=tpp, num_warps=4,
    )

    kv_len_arg = kv_count if kv_len is None else kv_len
    rs_arg = q if rs is None else rs
    grp_arg = q if grp is None else grp
    srs = (0, 0, 0) if rs is None else rs.stride()
    has_len, has_sel, f32_dot = kv_len is not None, rs is not None, _f32_dot(q)
    sq, sk, sv = q.stride(), k.stride(), v.stride()
    if atomic:
        bm, bn, warps, stages = _pick("dkdv_atomic", _DKDV_ATOMIC_CONFIGS, D, q_tile, kv_tile)
    else:
        bm, bn, warps, stages = _pick("dkdv", _DKDV_CONFIGS_PAIRS if tpp > 1 else _DKDV_CONFIGS, D, q_tile,
                                      kv_tile * tpp)
        if tpp > 1:  # a program owns its whole pair (also under a sweep's config override)
            bn = kv_tile * tpp
    sdk, sdv = dk.stride(), dv.stride()
    _bwd_dkdv_kernel[(_cdiv(Sk, bn), B * H)](
        q, k, v, grad_out, lse_arg, delta, dk, dv, qbuf, kv_len_arg, rs_arg, grp_arg, acc,
        sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], sd[0], sd[1], sd[2],
        sdk[0], sdk[1], sdk[2], sdv[0], sdv[1], sdv[2], srs[0], srs[1], srs[2],
        H, Sq, Sk, n_kp, n_qt, scale, scale * _LOG2E,
        Q_TILE=q_tile, KV_TILE=kv_tile, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, TPP=tpp,
        HAS_LEN=has_len, HAS_SEL=has_sel, F32_DOT=f32_dot,
        PADDED=padded, USE_TMA=use_tma, EVEN_Q=Sq % q_tile == 0,
        DQ_ATOMIC=atomic, DQ_TMA=atomic and use_tma and bool(_BWD_OPTS["dq_tma_reduce"]),
        num_warps=warps, num_stages=stages,
    )

    sdq = dq.stride()
    if atomic:
        _bwd_dq_cast_kernel[(_cdiv(Sq, pre_bm), B * H)](
            acc, dq, sdq[0], sdq[1], sdq[2], H, Sq, Sq_pad, scale, HEAD_DIM=D, BLOCK_M=pre_bm, num_warps=4,
        )
        return dq, dk, dv
    dq_table = _DQ_CONFIGS_SMALL_KV if kv_tile <= _SMALL_KV_TILE else _DQ_CONFIGS
    bm, bn, warps, stages = _pick("dq", dq_table, D, q_tile, kv_tile)
    sc, si = kv_count.stride(), kv_index.stride()
    _bwd_dq_kernel[(_cdiv(Sq, bm), B * H)](
        q, k, v, grad_out, lse_arg, delta, dq, kv_count, kv_index, kv_len_arg, rs_arg, grp_arg,
        sq[0], sq[1], sq[2], sk[0], sk[1], sk[2], sv[0], sv[1], sv[2], sd[0], sd[1], sd[2], sdq[0], sdq[1], sdq[2],
        sc[0], sc[1], sc[2], si[0], si[1], si[2], si[3], srs[0], srs[1], srs[2],
        H, Sq, Sk, n_qt, scale, scale * _LOG2E,
        Q_TILE=q_tile, KV_TILE=kv_tile, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn,
        HAS_LEN=has_len, HAS_SEL=has_sel, F32_DOT=f32_dot,
        PADDED=padded, USE_TMA=use_tma, EVEN_K=Sk % kv_tile == 0, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv


def backward_delta(out: torch.Tensor, grad_out: torch.Tensor,
                   grad_lse: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The backward's row term ``delta = rowsum(dO * O) - dL/dlse``, fp32 ``[B, H, Sq]``, computed by the backward
    prologue's row programs (on chip, no fp32 copies of O and dO); for backward kernels outside this module.
    ``out`` / ``grad_out`` ``[B, Sq, H, D]`` with a unit last stride, ``grad_lse`` fp32 ``[B, H, Sq]`` contiguous."""
    B, Sq, H, D = out.shape
    delta = torch.empty((B, H, Sq), device=out.device, dtype=torch.float32)
    no_layout = torch.zeros(1, device=out.device, dtype=torch.int32)  # (the prologue's layout half is not launched)
    so, sd = out.stride(), grad_out.stride()
    n_pre = _cdiv(Sq, _PRE_BLOCK_M)
    bt, bq, bs = _TR_BLOCKS
    _bwd_prologue_kernel[(n_pre, B * H)](
        out, grad_out, delta if grad_lse is None else grad_lse, delta, delta, delta, delta, no_layout, no_layout,
        no_layout, so[0], so[1], so[2], sd[0], sd[1], sd[2], 0, 0, 0, 0, 0, 0, 0, H, Sq, Sq, n_pre, 0, 0,
        HEAD_DIM=D, BLOCK_M=_PRE_BLOCK_M, HAS_DLSE=grad_lse is not None, PAD=False, ZERO_ACC=False,
        BT=bt, BQ=bq, BS=bs, TPP=1, num_warps=4,
    )
    return delta


def _grads_in(grad_out, grad_lse, out):
    # autograd's incoming gradients as the kernels read them (no copies when they already are)
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    else:
        if grad_out.dtype is not out.dtype:
            grad_out = grad_out.to(out.dtype)
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
    if grad_lse is not None and (grad_lse.dtype is not torch.float32 or not grad_lse.is_contiguous()):
        grad_lse = grad_lse.float().contiguous()
    return grad_out, grad_lse


def block_sparse_attention_backward(grad_out, q, k, v, out, lse, kv_count, kv_index, q_tile: int = 128,
                                    kv_tile: int = 128, scale: Optional[float] = None, kv_tile_len=None,
                                    row_select=None, kv_tile_group=None, grad_lse=None, dq_mode: Optional[str] = None,
                                    grad_dtype: Optional[torch.dtype] = None):
    """Launch the backward kernels; returns ``(dq, dk, dv)``. ``grad_lse`` (optional) is dL/dlse. ``grad_dtype``:
    of the gradients (default the inputs'; fp32 for a caller that adds more parts before rounding).

    ``dq_mode``: ``"split"`` (a separate dQ kernel) or ``"atomic"`` (dQ by fp32 atomics in the dK/dV kernel);
    default ``_BWD_OPTS["dq"]`` (env ``MIXDIT_BWD_DQ``, else split).
    """
    q, k, v, kc, ki, kv_len, rs, grp = _normalise(q, k, v, kv_count, kv_index, q_tile, kv_tile, kv_tile_len,
                                                  row_select, kv_tile_group)
    out = _last_contig(out)
    if lse.dtype is not torch.float32 or not lse.is_contiguous():
        lse = lse.float().contiguous()
    grad_out, grad_lse = _grads_in(grad_out, grad_lse, out)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _backward(grad_out, q, k, v, out, lse, kc, ki, q_tile, kv_tile, scale, kv_len, rs, grp, grad_lse, dq_mode,
                     grad_dtype)


# ----------------------------------------------------------------------------------------------
# autograd: an autograd.Function for eager calls (cheap on the host), torch.library custom ops for
# torch.compile / tracing (the public function picks one per call)
# ----------------------------------------------------------------------------------------------
class BlockSparseAttentionFunction(torch.autograd.Function):
    """Autograd wrapper around the launchers; the eager path of :func:`block_sparse_attention`.

    The forward checks and normalises the inputs once and saves the normalised tensors for the backward.
    """

    @staticmethod
    def forward(ctx, q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len, row_select, kv_tile_group,
                kv_full=None):
        q, k, v, kc, ki, kv_len, rs, grp = _normalise(q, k, v, kv_count, kv_index, q_tile, kv_tile, kv_tile_len,
                                                      row_select, kv_tile_group, kv_full)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        out, lse = _forward(q, k, v, kc, ki, q_tile, kv_tile, scale, kv_len, rs, grp, kv_full)
        ctx.set_materialize_grads(False)  # an unused lse gets no zero-filled gradient
        ctx.save_for_backward(q, k, v, out, lse, kc, ki, kv_len, rs, grp)
        ctx.cfg = (q_tile, kv_tile, scale)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        if grad_out is None and grad_lse is None:
            return (None,) * 12
        q, k, v, out, lse, kc, ki, kv_len, rs, grp = ctx.saved_tensors
        q_tile, kv_tile, scale = ctx.cfg
        grad_out, grad_lse = _grads_in(grad_out, grad_lse, out)
        dq, dk, dv = _backward(grad_out, q, k, v, out, lse, kc, ki, q_tile, kv_tile, scale, kv_len, rs, grp,
                               grad_lse, None)
        return dq, dk, dv, None, None, None, None, None, None, None, None, None


@torch.library.custom_op("mixdit::block_sparse_attn_fwd", mutates_args=())
def _fwd_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor,
            q_tile: int, kv_tile: int, scale: float, kv_tile_len: Optional[torch.Tensor],
            row_select: Optional[torch.Tensor], kv_tile_group: Optional[torch.Tensor],
            kv_full: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return block_sparse_attention_forward(q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len,
                                          row_select, kv_tile_group, kv_full)


@_fwd_op.register_fake
def _(q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len, row_select, kv_tile_group, kv_full=None):
    B, Sq, H, _ = q.shape  # strides as the real op allocates them (inputs made last-dim contiguous)
    return torch.empty_like(_last_contig(q)), q.new_empty((B, H, Sq), dtype=torch.float32)


@torch.library.custom_op("mixdit::block_sparse_attn_bwd", mutates_args=())
def _bwd_op(grad_out: torch.Tensor, grad_lse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
            v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor,
            q_tile: int, kv_tile: int, scale: float, kv_tile_len: Optional[torch.Tensor],
            row_select: Optional[torch.Tensor], kv_tile_group: Optional[torch.Tensor]
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return block_sparse_attention_backward(grad_out, q, k, v, out, lse, kv_count, kv_index, q_tile, kv_tile,
                                           scale, kv_tile_len, row_select, kv_tile_group, grad_lse)


@_bwd_op.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len,
      row_select, kv_tile_group):
    return torch.empty_like(_last_contig(q)), torch.empty_like(_last_contig(k)), torch.empty_like(_last_contig(v))


def _setup_context(ctx, inputs, output):
    q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len, row_select, kv_tile_group, _ = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kv_count, kv_index)
    ctx.extra = (kv_tile_len, row_select, kv_tile_group)
    ctx.cfg = (q_tile, kv_tile, scale)


def _backward_op(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kv_count, kv_index = ctx.saved_tensors
    kv_tile_len, row_select, kv_tile_group = ctx.extra
    q_tile, kv_tile, scale = ctx.cfg
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = _bwd_op(grad_out, grad_lse, q, k, v, out, lse, kv_count, kv_index, q_tile, kv_tile, scale,
                         kv_tile_len, row_select, kv_tile_group)
    return dq, dk, dv, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward_op, setup_context=_setup_context)

_Tensor = torch.Tensor


def _eager(q, k, v) -> bool:
    # plain tensors, no compiler and no dispatch mode (fake tensors, make_fx, ...): the autograd.Function path;
    # anything else goes through the custom op, which has fake kernels and never traces into the launchers
    return (not torch.compiler.is_compiling() and type(q) is _Tensor and type(k) is _Tensor and type(v) is _Tensor
            and torch._C._len_torch_dispatch_stack() == 0)


def block_sparse_attention(q, k, v, kv_count, kv_index, *, q_tile: int = 128, kv_tile: int = 128,
                           scale: Optional[float] = None, kv_tile_len=None, row_select=None, kv_tile_group=None,
                           kv_full=None):
    """Block-sparse attention over ``[B, S, H, D]`` tensors; returns ``(out [B,Sq,H,D], lse [B,H,Sq] fp32)``.

    The layout (``kv_count [B,H,n_q_tiles]``, ``kv_index [B,H,n_q_tiles,max_tiles]`` int32, optional
    ``kv_tile_len``, ``row_select`` + ``kv_tile_group``, ``kv_full``) is documented in
    :mod:`mixdit.kernels.reference`; ``kv_full [B,H,n_q_tiles]`` (with ``row_select`` only) promises that the first
    ``kv_full`` visited tiles of each query tile are selected by all its rows, so the forward skips their row masks
    (the backward does not need it).
    Differentiable in q, k, v (gradients through ``lse`` too); no host synchronisation; traceable by
    ``torch.compile(fullgraph=True)``. ``scale`` defaults to ``1/sqrt(D)``. Eager calls take the
    ``autograd.Function`` path (or no autograd at all when no gradient is needed); traced calls take the
    ``torch.library`` custom ops. The backward's dQ strategy: ``MIXDIT_BWD_DQ=split|atomic``.
    """
    if (row_select is None) != (kv_tile_group is None):
        raise ValueError("row_select and kv_tile_group go together")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q_tile, kv_tile = int(q_tile), int(kv_tile)
    if _eager(q, k, v):
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            return BlockSparseAttentionFunction.apply(q, k, v, kv_count, kv_index, q_tile, kv_tile, scale,
                                                      kv_tile_len, row_select, kv_tile_group, kv_full)
        return block_sparse_attention_forward(q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len,
                                              row_select, kv_tile_group, kv_full)
    return _fwd_op(q, k, v, kv_count, kv_index, q_tile, kv_tile, scale, kv_tile_len, row_select, kv_tile_group,
                   kv_full)
