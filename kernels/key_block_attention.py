"""Key-block-major exact attention for per-token block selections (VMoBA's exact rule, inference).

The block-sparse kernel (:mod:`mixdit.kernels.block_sparse_attention`) walks *query tiles*: a tile of 128
queries computes every key tile that any of its rows selected and masks the rest per row. With VMoBA's
per-token selections that union covers 52-58% of the key tiles in 2D/3D layers against an exact density of
~16% (``benchmarks/vmoba_tile_union.py``), so 3.4x the FLOP floor is computed. This module turns the loop
around, as MoBA's reference does with flash-attn varlen, but on the GPU with no duplicated queries:

1. ``_pair_count_kernel``: from the per-row bitmask ``row_select [B, H, Sq, W]`` (bit c = block c), per
   (sample, head) the number of blocks each query selected and, per row tile, how many rows selected each
   block.
2. Exclusive cumsums (torch) give every (query, block) *pair* two places: its slot in the list of queries of
   its block (key-major) and its slot among the query's own pairs (query-major).
3. ``_pair_fill_kernel`` writes the key-major lists: query row and query-major slot of every pair.
4. ``_key_block_attn_kernel``: one program per tile of up to ``BLOCK_M`` queries of one block's list; it
   gathers their q rows, walks the block's keys (contiguous in VMoBA's padded layout) and stores the
   normalised partial output (input dtype) and its log-sum-exp (fp32) at the pairs' query-major slots. Every
   computed (query, key) product is a selected one: the work is the FLOP floor plus the last tile's padding.
5. ``_pair_merge_kernel``: per query, the log-sum-exp merge of its partials (contiguous), in fp32.

Cost beyond the floor: the partials are written and read once (``pairs x (2 D + 4)`` bytes), which matters
in 3D layers (96-token blocks: ~50 k FLOPs per pair). When the pair buffers would exceed ``max_pair_bytes``
the (sample, head) pairs are processed in chunks. One host sync per call (the pair count sizes the buffers;
:class:`KeyBlockPlan` lets a caller queue other GPU work before it waits), so the call cannot be captured in a CUDA
graph; it has no backward kernel of its own (see :func:`exact_attention_with_grad`).

:func:`hybrid_block_attention` combines the two forms per (query tile, block) pair: the blocks most rows of a
query tile selected go to the query-tile kernel (whole tiles, per-row masks, no partials), the rest through the
key-block kernel above, whose merge takes the query-tile result as one more partial.

:func:`exact_attention_with_grad` makes either differentiable. Attention's backward needs only the inputs, the output
and its log-sum-exp, whichever kernel computed them, and is a sum over the selected (query, key) pairs, so it splits
like the forward (:func:`hybrid_backward`, the default ``EXACT_BACKWARD = "split"``): the full (query tile, block)
pairs through the query-tile kernel's backward (per-row masks), the rest key-block-major
(:func:`key_block_backward`: dQ per list tile with fp32 atomics, dK/dV per block walking its whole list, rows read
through the pair lists), both parts accumulating in fp32. ``"union"``: the query-tile backward over the tile union of
the whole selection (what training used before; 1.4x slower in 2D/3D layers, ``benchmarks/NOTES.md``, session 16).

Layout conventions are those of :mod:`mixdit.kernels.block_router`: ``q [B, Sq, H, D]`` in block order,
``k``/``v`` ``[B, Sk_pad, H, D]`` with block c owning key tiles ``block_tile_start[c] .. + block_tile_count[c]``
of ``kv_tile`` rows, of which the first ``kv_tile_len[t]`` are real.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .block_router import _store_query_tile_tiles
from .block_sparse_attention import _LOG2E, _f32_dot, _mm, backward_delta

__all__ = ["EXACT_BACKWARD", "KeyBlockPlan", "attention_with_grads", "exact_attention_with_grad", "hybrid_backward",
           "hybrid_block_attention", "key_block_attention", "key_block_backward", "key_block_plan",
           "split_by_tile_fill"]

# Test hook (as in block_sparse_attention): fill the outputs and the pair buffers with NaN / -1 before the
# kernels run, so a test proves every element is written.
_POISON_OUTPUTS = False
# merge launch (rows per program, warps, loop stages). Its loop loads each row's next partial; pipelined over 3
# stages the loads overlap (H200, Wan-1.3B hybrid at min_fill 0.375: merge 3D 0.98 -> 0.59 ms, spatial 0.39 ->
# 0.26; of 11 launches (32, 4, 1) the old default, (16, 2, 3) 0.62 / 0.26, unpipelined 0.79-1.22 / 0.32-0.49)
_MERGE_LAUNCH = (8, 1, 3)
# queries per attention program (a block's list is cut into tiles of this many; the plan counts them)
DEFAULT_BLOCK_M = 128


@triton.jit
def _row_words(RS, bh, rows, row_ok, Sq, W, NB_PAD: tl.constexpr):
    # [rows, NB_PAD // 32] int32: the words of row_select[bh, rows] (W = ceil(NB / 32) of them need not fill NB_PAD;
    # the last one may hold bits past NB: callers clear them)
    wcols = tl.arange(0, NB_PAD // 32)
    return tl.load(RS + (bh.to(tl.int64) * Sq + rows[:, None]) * W + wcols[None, :],
                   mask=row_ok[:, None] & (wcols < W)[None, :], other=0)


@triton.jit
def _spread_words(x, BM: tl.constexpr, NB_PAD: tl.constexpr):
    # [BM, NB_PAD // 32] -> [BM, NB_PAD]: each word's value repeated over its 32 bit columns (on chip: loading a word
    # once per column made the pair count and the split 2-6x slower, H200 session 14)
    return tl.reshape(tl.broadcast_to(x[:, :, None], [BM, NB_PAD // 32, 32]), [BM, NB_PAD])


@triton.jit
def _row_bits(RS, bh, rows, row_ok, Sq, W, NB, BM: tl.constexpr, NB_PAD: tl.constexpr):
    # [BM, NB_PAD] int32 0/1: bit c of row_select[bh, row] (word c // 32); 0 past NB
    cols = tl.arange(0, NB_PAD)
    word_c = _spread_words(_row_words(RS, bh, rows, row_ok, Sq, W, NB_PAD), BM, NB_PAD)
    return tl.where((cols < NB)[None, :], (word_c >> (cols % 32)[None, :]) & 1, 0)


@triton.jit
def _pair_count_kernel(RS, ROW_CNT, COL_CNT, bh0, Sq, W, NB, n_rt,
                       BM: tl.constexpr, NB_PAD: tl.constexpr):
    rt = tl.program_id(0)
    j = tl.program_id(1)  # (sample, head) within the chunk
    rows = rt * BM + tl.arange(0, BM)
    row_ok = rows < Sq
    cols = tl.arange(0, NB_PAD)
    bits = _row_bits(RS, bh0 + j, rows, row_ok, Sq, W, NB, BM, NB_PAD)
    tl.store(ROW_CNT + j.to(tl.int64) * Sq + rows, tl.sum(bits, axis=1), mask=row_ok)
    # [chunk, NB, n_rt]: flattened, its exclusive cumsum orders the pairs by (head, block, row tile)
    tl.store(COL_CNT + (j.to(tl.int64) * NB + cols) * n_rt + rt, tl.sum(bits, axis=0), mask=cols < NB)


@triton.jit
def _popcount(x):
    """Set bits of each int32 (the SWAR sum of bit fields: one POPC on sm_90, LLVM recognises it)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _pair_fill_kernel(RS, ROW_OFF, COL_OFF, PAIR_Q, PAIR_DST, bh0, Sq, W, NB, n_rt,
                      BM: tl.constexpr, NB_PAD: tl.constexpr):
    rt = tl.program_id(0)
    j = tl.program_id(1)
    rows = rt * BM + tl.arange(0, BM)
    row_ok = rows < Sq
    cols = tl.arange(0, NB_PAD)
    words = _row_words(RS, bh0 + j, rows, row_ok, Sq, W, NB_PAD)
    n_valid = NB - tl.arange(0, NB_PAD // 32) * 32  # bits past NB cleared (the counts skip them too)
    words = words & tl.where(n_valid >= 32, -1, (1 << tl.minimum(tl.maximum(n_valid, 0), 31)) - 1)[None, :]
    # a pair's slot among its row's pairs: the set bits of the row's earlier words, then of its own word's lower
    # bits (a scan over the 512 bit columns instead took 255 registers and 2.5x the instructions, sm_90)
    pc = _popcount(words)
    word_c = _spread_words(words, BM, NB_PAD)
    before_c = _spread_words(tl.cumsum(pc, axis=1) - pc, BM, NB_PAD)
    bit = (cols % 32)[None, :]
    bits = (word_c >> bit) & 1
    slot = before_c + _popcount(word_c & ((1 << bit) - 1))
    rank = tl.cumsum(bits, axis=0) - bits  # rows of this tile before it that selected the block
    base = tl.load(COL_OFF + (j.to(tl.int64) * NB + cols) * n_rt + rt, mask=cols < NB, other=0)
    row_off = tl.load(ROW_OFF + j.to(tl.int64) * Sq + rows, mask=row_ok, other=0)
    pos = base[None, :] + rank
    take = bits != 0
    tl.store(PAIR_Q + pos, rows[:, None] + rank * 0, mask=take)
    tl.store(PAIR_DST + pos, row_off[:, None] + slot, mask=take)


@triton.jit
def _list_block(lst, bh0, NB, H, TILE_START, TILE_COUNT, KV_TILE: tl.constexpr):
    # list lst = (head in chunk) * NB + block: its (sample * H + head), block, sample, head and the block's key rows
    bh = bh0 + lst // NB
    c = lst % NB
    r0 = tl.load(TILE_START + c) * KV_TILE
    return bh, bh // H, bh % H, r0, r0 + tl.load(TILE_COUNT + c) * KV_TILE


@triton.jit
def _block_keys(kr, r1, KV_TILE_LEN, KV_TILE: tl.constexpr):
    # key rows kr of a block ending at r1: inside the block, and real (not a tile's padding)
    in_blk = kr < r1
    tile = kr // KV_TILE
    return in_blk, in_blk & ((kr - tile * KV_TILE) < tl.load(KV_TILE_LEN + tile, mask=in_blk, other=0))


@triton.jit
def _key_block_attn_kernel(Q, K, V, PAIR_Q, PAIR_DST, LIST_START, LIST_LEN, TILE_LIST, TILE_J,
                           TILE_START, TILE_COUNT, KV_TILE_LEN, O_PART, LSE_PART,
                           stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh,
                           stride_vb, stride_vs, stride_vh, bh0, H, NB, qk_scale,
                           F32_DOT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_TILE: tl.constexpr):
    t = tl.program_id(0)
    lst = tl.load(TILE_LIST + t)
    jt = tl.load(TILE_J + t)
    bh, b, h, r0, r1 = _list_block(lst, bh0, NB, H, TILE_START, TILE_COUNT, KV_TILE)
    start = tl.load(LIST_START + lst)
    n = tl.load(LIST_LEN + lst)
    i = jt * BLOCK_M + tl.arange(0, BLOCK_M)
    ok = i < n
    offs_d = tl.arange(0, D)
    qrow = tl.load(PAIR_Q + start + i, mask=ok, other=0)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + qrow.to(tl.int64)[:, None] * stride_qs
                + offs_d[None, :], mask=ok[:, None], other=0.0)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for r in range(r0, r1, BLOCK_N):
        kr = r + tl.arange(0, BLOCK_N)
        in_blk, real = _block_keys(kr, r1, KV_TILE_LEN, KV_TILE)
        kt = tl.load(k_base + kr.to(tl.int64)[None, :] * stride_ks + offs_d[:, None], mask=in_blk[None, :], other=0.0)
        s = _mm(q, kt, F32_DOT) * qk_scale
        s = tl.where(real[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # every block's first tile has a real key: finite
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v_base + kr.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=in_blk[:, None], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(vt.dtype), vt, F32_DOT)
        m_i = m_new
    o = acc / l_i[:, None]
    lse = (m_i + tl.math.log2(l_i)) * 0.6931471805599453  # natural log, scale included
    dst = tl.load(PAIR_DST + start + i, mask=ok, other=0).to(tl.int64)
    tl.store(O_PART + dst[:, None] * D + offs_d[None, :], o.to(O_PART.dtype.element_ty), mask=ok[:, None])
    tl.store(LSE_PART + dst, lse, mask=ok)


@triton.jit
def _pair_merge_kernel(O_PART, LSE_PART, ROW_OFF, ROW_CNT, OUT, LSE_OUT, BASE_O, BASE_LSE, bh0, H, Sq,
                       stride_ob, stride_os, stride_oh, stride_bb, stride_bs, stride_bh,
                       D: tl.constexpr, BM: tl.constexpr, HAS_BASE: tl.constexpr, STAGES: tl.constexpr):
    rt = tl.program_id(0)
    j = tl.program_id(1)
    bh = bh0 + j
    b = bh // H
    h = bh % H
    rows = rt * BM + tl.arange(0, BM)
    row_ok = rows < Sq
    offs_d = tl.arange(0, D)
    off = tl.load(ROW_OFF + j.to(tl.int64) * Sq + rows, mask=row_ok, other=0).to(tl.int64)
    cnt = tl.load(ROW_CNT + j.to(tl.int64) * Sq + rows, mask=row_ok, other=0)
    if HAS_BASE:  # one more partial per row, from the query-tile kernel (lse -inf: the row had none there)
        m = tl.load(BASE_LSE + bh.to(tl.int64) * Sq + rows, mask=row_ok, other=float("-inf"))
        l_ = tl.where(m == float("-inf"), 0.0, 1.0)
        acc = tl.load(BASE_O + b.to(tl.int64) * stride_bb + h * stride_bh + rows.to(tl.int64)[:, None] * stride_bs
                      + offs_d[None, :], mask=row_ok[:, None], other=0.0).to(tl.float32) * l_[:, None]
    else:
        m = tl.full([BM], float("-inf"), dtype=tl.float32)
        l_ = tl.zeros([BM], dtype=tl.float32)
        acc = tl.zeros([BM, D], dtype=tl.float32)
    for s in tl.range(0, tl.max(cnt, axis=0), num_stages=STAGES):
        take = row_ok & (s < cnt)
        lse = tl.load(LSE_PART + off + s, mask=take, other=float("-inf"))
        o = tl.load(O_PART + (off + s)[:, None] * D + offs_d[None, :], mask=take[:, None], other=0.0)
        m_new = tl.maximum(m, lse)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse - m_safe)
        l_ = l_ * alpha + w
        acc = acc * alpha[:, None] + o.to(tl.float32) * w[:, None]
        m = m_new
    tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + rows.to(tl.int64)[:, None] * stride_os
             + offs_d[None, :], (acc / l_[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None])
    tl.store(LSE_OUT + bh.to(tl.int64) * Sq + rows, m + tl.log(l_), mask=row_ok)


@triton.jit
def _gathered_rows(Q, DO, LSE, DELTA, PAIR_Q, start, i, n, b, h, bh, Sq, stride_qb, stride_qs, stride_qh,
                   stride_db, stride_ds, stride_dh, D: tl.constexpr):
    # the q and dO rows of pairs start + i of a block's list (zeros past n), their lse (log2 units) and delta
    ok = i < n
    offs_d = tl.arange(0, D)
    qrow = tl.load(PAIR_Q + start + i, mask=ok, other=0).to(tl.int64)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + qrow[:, None] * stride_qs + offs_d[None, :],
                mask=ok[:, None], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * stride_db + h * stride_dh + qrow[:, None] * stride_ds + offs_d[None, :],
                 mask=ok[:, None], other=0.0)
    lse2 = tl.load(LSE + bh.to(tl.int64) * Sq + qrow, mask=ok, other=float("inf")) * 1.4426950408889634
    delta = tl.load(DELTA + bh.to(tl.int64) * Sq + qrow, mask=ok, other=0.0)
    return qrow, ok, q, do, lse2, delta


@triton.jit
def _key_block_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, PAIR_Q, LIST_START, LIST_LEN, TILE_LIST, TILE_J,
                         TILE_START, TILE_COUNT, KV_TILE_LEN, stride_qb, stride_qs, stride_qh,
                         stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                         stride_db, stride_ds, stride_dh, stride_gb, stride_gs, stride_gh, bh0, H, NB, Sq, scale,
                         qk_scale, F32_DOT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, KV_TILE: tl.constexpr):
    # dQ of one tile of a block's list against the block's keys, added to the rows' fp32 dQ (a row's pairs sit in
    # different programs: atomics)
    t = tl.program_id(0)
    lst = tl.load(TILE_LIST + t)
    bh, b, h, r0, r1 = _list_block(lst, bh0, NB, H, TILE_START, TILE_COUNT, KV_TILE)
    i = tl.load(TILE_J + t) * BLOCK_M + tl.arange(0, BLOCK_M)
    qrow, ok, q, do, lse2, delta = _gathered_rows(Q, DO, LSE, DELTA, PAIR_Q, tl.load(LIST_START + lst), i,
                                                  tl.load(LIST_LEN + lst), b, h, bh, Sq, stride_qb, stride_qs,
                                                  stride_qh, stride_db, stride_ds, stride_dh, D)
    offs_d = tl.arange(0, D)
    k_base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = V + b.to(tl.int64) * stride_vb + h * stride_vh
    dq = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for r in range(r0, r1, BLOCK_N):
        kr = r + tl.arange(0, BLOCK_N)
        in_blk, real = _block_keys(kr, r1, KV_TILE_LEN, KV_TILE)
        kt = tl.load(k_base + kr.to(tl.int64)[:, None] * stride_ks + offs_d[None, :], mask=in_blk[:, None], other=0.0)
        vt = tl.load(v_base + kr.to(tl.int64)[:, None] * stride_vs + offs_d[None, :], mask=in_blk[:, None], other=0.0)
        p = tl.math.exp2(_mm(q, tl.trans(kt), F32_DOT) * qk_scale - lse2[:, None])
        p = tl.where(real[None, :], p, 0.0)
        ds = p * (_mm(do, tl.trans(vt), F32_DOT) - delta[:, None])
        dq += _mm(ds.to(kt.dtype), kt, F32_DOT)
    dst = DQ + b.to(tl.int64) * stride_gb + h * stride_gh + qrow[:, None] * stride_gs + offs_d[None, :]
    tl.atomic_add(dst, dq * scale, mask=ok[:, None])


@triton.jit
def _key_block_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, PAIR_Q, LIST_START, LIST_LEN,
                           TILE_START, TILE_COUNT, KV_TILE_LEN, stride_qb, stride_qs, stride_qh,
                           stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                           stride_db, stride_ds, stride_dh, stride_gb, stride_gs, stride_gh, bh0, H, NB, Sq, scale,
                           qk_scale, F32_DOT: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                           BLOCK_N: tl.constexpr, KV_TILE: tl.constexpr):
    # dK/dV of BLOCK_N keys of one block against its whole list of queries; those keys belong to no other program
    # of this launch, so the fp32 accumulators are updated without atomics
    lst = tl.program_id(0)
    bh, b, h, r0, r1 = _list_block(lst, bh0, NB, H, TILE_START, TILE_COUNT, KV_TILE)
    kr = r0 + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    if r0 + tl.program_id(1) * BLOCK_N < r1:
        in_blk, real = _block_keys(kr, r1, KV_TILE_LEN, KV_TILE)
        offs_d = tl.arange(0, D)
        kt = tl.load(K + b.to(tl.int64) * stride_kb + h * stride_kh + kr.to(tl.int64)[:, None] * stride_ks
                     + offs_d[None, :], mask=in_blk[:, None], other=0.0)
        vt = tl.load(V + b.to(tl.int64) * stride_vb + h * stride_vh + kr.to(tl.int64)[:, None] * stride_vs
                     + offs_d[None, :], mask=in_blk[:, None], other=0.0)
        start = tl.load(LIST_START + lst)
        n = tl.load(LIST_LEN + lst)
        dk = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, D], dtype=tl.float32)
        for m0 in range(0, n, BLOCK_M):
            i = m0 + tl.arange(0, BLOCK_M)
            qrow, ok, q, do, lse2, delta = _gathered_rows(Q, DO, LSE, DELTA, PAIR_Q, start, i, n, b, h, bh, Sq,
                                                          stride_qb, stride_qs, stride_qh, stride_db, stride_ds,
                                                          stride_dh, D)
            p = tl.math.exp2(_mm(q, tl.trans(kt), F32_DOT) * qk_scale - lse2[:, None])
            p = tl.where(ok[:, None] & real[None, :], p, 0.0)
            dv += _mm(tl.trans(p.to(do.dtype)), do, F32_DOT)
            ds = p * (_mm(do, tl.trans(vt), F32_DOT) - delta[:, None])
            dk += _mm(tl.trans(ds.to(q.dtype)), q, F32_DOT)
        off = b.to(tl.int64) * stride_gb + h * stride_gh + kr.to(tl.int64)[:, None] * stride_gs + offs_d[None, :]
        tl.store(DK + off, tl.load(DK + off, mask=in_blk[:, None]) + dk * scale, mask=in_blk[:, None])
        tl.store(DV + off, tl.load(DV + off, mask=in_blk[:, None]) + dv, mask=in_blk[:, None])


@triton.jit
def _tile_fill_split_kernel(RS, DENSE_RS, SPARSE_RS, UNION, TILE_START, TILE_COUNT, KV_COUNT, KV_INDEX,
                            Sq, W, NB, n_qt, n_kt, max_tc, min_fill,
                            Q_TILE: tl.constexpr, R: tl.constexpr, NB_PAD: tl.constexpr, W_PAD: tl.constexpr,
                            LAYOUT: tl.constexpr):
    # Program (query tile, b*h): per block, how many of the tile's rows selected it; the blocks at least min_fill
    # of the rows selected are the tile's dense set (UNION, int8; with LAYOUT instead as the query-tile kernel's
    # layout KV_COUNT / KV_INDEX); every row's words split into the bits of the dense set (DENSE_RS) and the rest
    # (SPARSE_RS).
    t = tl.program_id(0)
    bh = tl.program_id(1)
    r0 = t * Q_TILE
    cols = tl.arange(0, NB_PAD)
    cnt = tl.zeros([NB_PAD], dtype=tl.int32)
    for r in range(0, Q_TILE, R):
        rows = r0 + r + tl.arange(0, R)
        cnt += tl.sum(_row_bits(RS, bh, rows, rows < Sq, Sq, W, NB, R, NB_PAD), axis=0)
    n_rows = tl.minimum(Q_TILE, Sq - r0).to(tl.float32)
    dense = (cnt > 0) & (cnt.to(tl.float32) >= min_fill * n_rows)
    row = bh.to(tl.int64) * n_qt + t
    if LAYOUT:  # the dense set's key tiles (blocks own contiguous tile ranges in block order)
        c_ok = cols < NB
        tc = tl.load(TILE_COUNT + cols, mask=c_ok, other=0)
        start = tl.load(TILE_START + cols, mask=c_ok, other=0)
        n = _store_query_tile_tiles(KV_INDEX, row, n_kt, dense, tl.zeros([1], dtype=tl.int32), start, tc, max_tc)
        tl.store(KV_COUNT + row + tl.arange(0, 1), n)
    else:
        tl.store(UNION + row * NB_PAD + cols, dense.to(tl.int8))
    # distinct bits: their sum is their OR (bit 31 wraps to the sign, as in the router's words)
    dense_words = tl.sum(tl.reshape(dense.to(tl.int32) << (cols % 32), [W_PAD, 32]), axis=1)
    wcols = tl.arange(0, W_PAD)
    for r in range(0, Q_TILE, R):
        rows = r0 + r + tl.arange(0, R)
        ok = (rows < Sq)[:, None] & (wcols < W)[None, :]
        offs = (bh.to(tl.int64) * Sq + rows[:, None]) * W + wcols[None, :]
        words = tl.load(RS + offs, mask=ok, other=0)
        tl.store(DENSE_RS + offs, words & dense_words[None, :], mask=ok)
        tl.store(SPARSE_RS + offs, words & ~dense_words[None, :], mask=ok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _count_tile_rows(nb_pad: int) -> int:
    # rows per count/fill program: ~8 K bits of [rows, NB_PAD] on chip (4 K bits, 8 rows: fill 0.71 -> 0.55 ms but
    # the 3D hybrid no faster, spatial count 0.085 -> 0.12 ms; 16 K / 32 K bits: fill 14x / 19x slower; session 12)
    return max(16, min(128, 8192 // nb_pad))


class KeyBlockPlan:
    """The pair counts of a selection (:func:`key_block_plan`): ``row_cnt [B*H, Sq]``, ``col_cnt [B*H, NB, n_rt]``
    (per tile of ``rows_per_tile`` rows, the tiling the fill kernel must use too) and ``list_len [B*H, NB]`` on the
    device, and per (sample, head) the pair and list-tile (``block_m`` queries) totals, copied to the host
    asynchronously: :meth:`per_head` waits for that copy only (the call's one host sync), so work queued after the
    plan (the hybrid's query-tile kernel) keeps the GPU busy while the host waits and then launches the rest."""

    def __init__(self, row_cnt: torch.Tensor, col_cnt: torch.Tensor, rows_per_tile: int, block_m: int):
        self.row_cnt, self.col_cnt, self.rows_per_tile, self.block_m = row_cnt, col_cnt, rows_per_tile, block_m
        self.list_len = col_cnt.sum(-1)
        totals = torch.stack([row_cnt.sum(1, dtype=torch.int64),
                              ((self.list_len + block_m - 1) // block_m).sum(1, dtype=torch.int64)], 1)
        self._event = None
        if totals.is_cuda:
            self._totals = totals.to("cpu", non_blocking=True)  # pinned (PyTorch's caching host allocator)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._totals = totals

    def per_head(self) -> tuple[list, list]:
        """``(pairs_per_head, tiles_per_head)`` as host lists."""
        if self._event is not None:
            self._event.synchronize()
        rows = self._totals.tolist()
        return [p[0] for p in rows], [p[1] for p in rows]


def key_block_plan(row_select: torch.Tensor, num_blocks: int, block_m: int = DEFAULT_BLOCK_M) -> KeyBlockPlan:
    """Count the (query, block) pairs of a selection (one Triton kernel and a few reductions; no host sync until
    :meth:`KeyBlockPlan.per_head`)."""
    B, H, Sq, W = row_select.shape
    NB_PAD = max(32, _next_pow2(num_blocks))
    if W * 32 < num_blocks:
        raise ValueError(f"row_select has {W} words for {num_blocks} blocks")
    BM = _count_tile_rows(NB_PAD)
    n_rt = triton.cdiv(Sq, BM)
    dev = row_select.device
    row_cnt = torch.empty(B * H, Sq, device=dev, dtype=torch.int32)
    col_cnt = torch.empty(B * H, num_blocks, n_rt, device=dev, dtype=torch.int32)
    _pair_count_kernel[(n_rt, B * H)](row_select, row_cnt, col_cnt, 0, Sq, W, num_blocks, n_rt,
                                      BM=BM, NB_PAD=NB_PAD, num_warps=4)
    return KeyBlockPlan(row_cnt, col_cnt, BM, block_m)


def _chunks(pairs_per_head: list, limit: int):
    """Consecutive (first, count) groups of heads with at most ``limit`` pairs each (a single head may exceed it)."""
    out, first, total = [], 0, 0
    for i, p in enumerate(pairs_per_head):
        if i > first and total + p > limit:
            out.append((first, i - first))
            first, total = i, 0
        total += p
    out.append((first, len(pairs_per_head) - first))
    return out


def _pair_lists(row_select: torch.Tensor, plan: KeyBlockPlan, h0: int, nh: int, n_pairs: int):
    """The (query, block) pairs of the flattened (sample, head)s ``h0 .. h0 + nh - 1`` of ``row_select`` (``n_pairs``,
    the plan's count): ``pair_q`` (each pair's query row, key-major: by head, block, row), ``pair_dst`` (its slot in
    query-major order), ``row_off [nh * Sq]`` (each row's first query-major slot), ``list_start`` / ``list_len``
    ``[nh * NB]`` (each (head, block)'s list in ``pair_q``)."""
    Sq, W = row_select.shape[2:]
    NB, n_rt = plan.col_cnt.shape[1:]
    dev = row_select.device
    rc = plan.row_cnt[h0:h0 + nh].reshape(-1)
    row_off = (torch.cumsum(rc, 0, dtype=torch.int64) - rc).to(torch.int32)
    col_flat = plan.col_cnt[h0:h0 + nh].reshape(-1)
    col_off = (torch.cumsum(col_flat, 0, dtype=torch.int64) - col_flat).to(torch.int32)
    list_len = plan.list_len[h0:h0 + nh].reshape(-1)
    list_start = col_off.view(nh * NB, n_rt)[:, 0].contiguous()
    pair_q = torch.empty(n_pairs, device=dev, dtype=torch.int32)
    pair_dst = torch.empty(n_pairs, device=dev, dtype=torch.int32)
    if _POISON_OUTPUTS:
        pair_q.fill_(-1)
        pair_dst.fill_(-1)
    _pair_fill_kernel[(n_rt, nh)](row_select, row_off, col_off, pair_q, pair_dst, h0, Sq, W, NB, n_rt,
                                  BM=plan.rows_per_tile, NB_PAD=max(32, _next_pow2(NB)), num_warps=4)
    return pair_q, pair_dst, row_off, list_start, list_len


def _list_tiles(list_len: torch.Tensor, block_m: int, n_tiles: int):
    """Each list cut into tiles of ``block_m`` pairs: per tile its list and its index in the list (int32)."""
    dev = list_len.device
    list_tiles = (list_len + block_m - 1) // block_m
    tile_list = torch.repeat_interleave(torch.arange(list_len.numel(), device=dev, dtype=torch.int32), list_tiles,
                                        output_size=n_tiles)
    first_tile = torch.cumsum(list_tiles, 0) - list_tiles
    tile_j = (torch.arange(n_tiles, device=dev) - first_tile[tile_list.long()]).to(torch.int32)
    return tile_list, tile_j


def key_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_select: torch.Tensor, *,
                        block_tile_start: torch.Tensor, block_tile_count: torch.Tensor, kv_tile_len: torch.Tensor,
                        kv_tile: int, scale: float | None = None, block_m: int = DEFAULT_BLOCK_M, block_n: int = 32,
                        max_pair_bytes: int = 2 << 30, num_warps: int = 4, num_stages: int = 3,
                        return_work: bool = False, out_dtype: torch.dtype | None = None, base=None,
                        plan: KeyBlockPlan | None = None):
    """Exact attention of every query row over the keys of its selected blocks (see the module docstring).

    ``q`` ``[B, Sq, H, D]``, ``k``/``v`` ``[B, Sk_pad, H, D]`` (fp16/bf16, last dim contiguous, ``D`` a power of
    two >= 16), ``row_select`` int32 ``[B, H, Sq, W]``. Returns ``out [B, Sq, H, D]`` (input dtype) and
    ``lse [B, H, Sq]`` (fp32, natural log incl. ``scale``) — the contract of
    :func:`mixdit.kernels.block_sparse_attention` with ``row_select`` and ``kv_tile_group`` = block of each tile.
    Every row must select at least one block (VMoBA always selects the query's own block), or have keys in
    ``base = (out, lse)``: attention over other keys of the same rows (``lse`` -inf where a row had none), merged
    in as one more partial (what :func:`hybrid_block_attention` passes from the query-tile kernel).
    ``block_n`` / ``num_warps`` / ``num_stages``: key rows per step / warps / pipeline stages; the defaults (128
    queries x 32 keys, 4 warps) were the fastest of six launches in every layer type at Wan-1.3B and 14B (H200,
    ``vmoba_attention.py --key-blocks``); 3 stages (session 13, inside the hybrid, model q/k: 3D 7.65 -> 7.56 ms,
    spatial 4.98 -> 4.91) against 2, and 64-query or 8-warp launches 2-20% slower. ``return_work``: also return the
    computed (query row, key tile) pairs as a share of all (0-d tensor; like the query-tile kernel's tile density,
    key-tile padding included; the query padding of each list's last tile is not counted).
    ``out_dtype``: of ``out`` (default the input dtype; fp32 when the caller merges more parts into it).
    ``plan``: :func:`key_block_plan` of ``row_select`` with this ``block_m``, made earlier by the caller so that
    its host copy overlaps other GPU work (default: made here)."""
    B, Sq, H, D = q.shape
    if q.dtype not in (torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError("key_block_attention runs fp16/bf16 q, k, v of one dtype")
    if D < 16 or D & (D - 1):
        raise ValueError(f"head dim {D} must be a power of two >= 16 (pad it)")
    if k.stride(-1) != 1 or v.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("q, k, v need a contiguous last dim")
    NB = block_tile_start.numel()
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    dev = q.device
    if plan is None:
        plan = key_block_plan(row_select, NB, block_m)
    elif plan.block_m != block_m:  # its list-tile totals count tiles of plan.block_m queries
        raise ValueError(f"plan was made for block_m={plan.block_m}, the call has block_m={block_m}")
    row_cnt, list_len_all = plan.row_cnt, plan.list_len
    pairs, tiles = plan.per_head()
    work = None
    if return_work:  # as the query-tile kernel counts it: key tiles (padding included) over all key tiles
        padded_keys = block_tile_count.to(torch.float32).view(1, NB)
        work = (list_len_all.to(torch.float32) * padded_keys).sum() / (float(B * H * Sq) * kv_tile_len.numel())
    out = torch.empty(q.shape, device=dev, dtype=out_dtype or q.dtype)
    lse_out = torch.empty(B, H, Sq, device=dev, dtype=torch.float32)
    if _POISON_OUTPUTS:
        out.fill_(float("nan"))
        lse_out.fill_(float("nan"))
    base_o, base_lse = (out, lse_out) if base is None else base  # dummies when there is no base (never read)
    if base is not None and (base_o.shape != q.shape or base_o.stride(-1) != 1 or base_lse.shape != (B, H, Sq)
                             or not base_lse.is_contiguous()):
        raise ValueError("base must be (out [B, Sq, H, D] with a contiguous last dim, lse [B, H, Sq] contiguous)")
    base_strides = (base_o.stride(0), base_o.stride(1), base_o.stride(2))
    limit = max(1, max_pair_bytes // (D * q.element_size() + 12))
    for h0, nh in _chunks(pairs, limit):
        n_pairs, n_tiles = sum(pairs[h0:h0 + nh]), sum(tiles[h0:h0 + nh])
        rc = row_cnt[h0:h0 + nh]
        pair_q, pair_dst, row_off, list_start, list_len = _pair_lists(row_select, plan, h0, nh, n_pairs)
        tile_list, tile_j = _list_tiles(list_len, block_m, n_tiles)
        o_part = torch.empty(n_pairs, D, device=dev, dtype=q.dtype)
        lse_part = torch.empty(n_pairs, device=dev, dtype=torch.float32)
        if _POISON_OUTPUTS:
            for t in (o_part, lse_part):
                t.fill_(float("nan"))
        if n_tiles:
            _key_block_attn_kernel[(n_tiles,)](
                q, k, v, pair_q, pair_dst, list_start, list_len.to(torch.int32), tile_list, tile_j,
                block_tile_start, block_tile_count, kv_tile_len, o_part, lse_part,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), h0, H, NB, scale * _LOG2E,
                F32_DOT=_f32_dot(q), D=D, BLOCK_M=block_m, BLOCK_N=block_n, KV_TILE=kv_tile,
                num_warps=num_warps, num_stages=num_stages)
        BMm, m_warps, m_stages = _MERGE_LAUNCH
        _pair_merge_kernel[(triton.cdiv(Sq, BMm), nh)](
            o_part, lse_part, row_off, rc, out, lse_out, base_o, base_lse, h0, H, Sq,
            out.stride(0), out.stride(1), out.stride(2), *base_strides, D=D, BM=BMm, HAS_BASE=base is not None,
            STAGES=m_stages, num_warps=m_warps)
    return (out, lse_out, work) if return_work else (out, lse_out)


def split_by_tile_fill(row_select: torch.Tensor, num_blocks: int, q_tile: int, min_fill: float, block_tiles=None):
    """Split a per-row selection by how full each (query tile, block) pair is.

    For each tile of ``q_tile`` consecutive rows of a (sample, head), the blocks that at least ``min_fill`` of
    its rows selected form the tile's *dense set*. Returns ``(dense_rs, sparse_rs, dense_union, layout)``: the rows'
    bits inside their tile's dense set, the remaining bits (``dense_rs | sparse_rs == row_select``, disjoint),
    and the dense sets: without ``block_tiles`` as bool ``[B, H, n_query_tiles, num_blocks]`` (layout None); with
    ``block_tiles = (block_tile_start, block_tile_count, num_kv_tiles, max_block_tiles)`` (block ``c`` owns key tiles
    ``start[c] .. + count[c] - 1``) as the query-tile kernel's layout ``(kv_count, kv_index)`` instead (union None),
    written by the same kernel: what ``compact_tiles`` makes of the union, entries past the count unwritten."""
    B, H, Sq, W = row_select.shape
    if row_select.dtype != torch.int32 or not row_select.is_contiguous():
        raise ValueError("row_select must be a contiguous int32 [B, H, Sq, words] tensor")
    if W * 32 < num_blocks:
        raise ValueError(f"row_select has {W} words for {num_blocks} blocks")
    if q_tile & (q_tile - 1):
        raise ValueError(f"q_tile {q_tile} must be a power of two")
    W_PAD = _next_pow2(W)
    NB_PAD = 32 * W_PAD
    n_qt = triton.cdiv(Sq, q_tile)
    dense = torch.empty_like(row_select)
    sparse = torch.empty_like(row_select)
    R = max(1, min(q_tile, 8192 // NB_PAD))
    if block_tiles is None:
        union = torch.empty(B * H, n_qt, NB_PAD, device=row_select.device, dtype=torch.int8)
        start = count = kv_count = kv_index = union  # (pointers the kernel does not read without the layout)
        n_kt = max_tc = 0
    else:
        start, count, n_kt, max_tc = block_tiles
        kv_count = torch.empty(B, H, n_qt, device=row_select.device, dtype=torch.int32)
        kv_index = torch.empty(B, H, n_qt, n_kt, device=row_select.device, dtype=torch.int32)
        union = kv_count  # (not written with the layout)
    _tile_fill_split_kernel[(n_qt, B * H)](row_select, dense, sparse, union, start, count, kv_count, kv_index,
                                           Sq, W, num_blocks, n_qt, int(n_kt), int(max_tc), float(min_fill),
                                           Q_TILE=q_tile, R=R, NB_PAD=NB_PAD, W_PAD=W_PAD,
                                           LAYOUT=block_tiles is not None, num_warps=4)
    if block_tiles is not None:
        return dense, sparse, None, (kv_count, kv_index)
    return dense, sparse, union.view(B, H, n_qt, NB_PAD)[..., :num_blocks].bool(), None


def hybrid_block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_select: torch.Tensor, *,
                           block_tile_start: torch.Tensor, block_tile_count: torch.Tensor, kv_tile_len: torch.Tensor,
                           kv_tile_group: torch.Tensor, kv_tile: int, min_fill: float, scale: float | None = None,
                           q_tile: int = 128, return_work: bool = False, out_dtype: torch.dtype | None = None,
                           max_block_tiles: int | None = None, **key_block_kw):
    """Exact attention over per-row block selections, each (query tile, block) pair computed where it is cheaper.

    A block that many rows of a query tile selected is cheapest in the query-tile kernel (whole tiles, masked per
    row: no gathers, no partial outputs); one that few rows selected, in the key-block kernel (only the selected
    rows, at the price of a partial output per pair). :func:`split_by_tile_fill` sends every pair whose block at
    least ``min_fill`` of its tile's rows selected to the first; the query-tile kernel's output and lse enter the
    key-block merge as one more partial. Exact like both (every selected key once, no other key).
    Arguments and returns as :func:`key_block_attention` (``return_work``: key tiles computed by both kernels as a
    share of all, padding included); ``kv_tile_group`` the block of each key tile; ``q`` in block order;
    ``min_fill`` has no default here: VMoBA's measured values are ``mixdit.attention.vmoba_config.HYBRID_LAUNCH``.
    ``max_block_tiles``: the largest ``block_tile_count`` (known from the block shape; None: read from the tensor, one
    more host sync)."""
    from .block_sparse_attention import block_sparse_attention_forward, slot_masks_fit

    B, Sq, H, _ = q.shape
    NB = block_tile_start.numel()
    if max_block_tiles is None:
        max_block_tiles = int(block_tile_count.max())
    dense_rs, sparse_rs, _, (kv_count, kv_index) = split_by_tile_fill(
        row_select, NB, q_tile, min_fill, (block_tile_start, block_tile_count, kv_tile_group.numel(), max_block_tiles))
    # the key-block plan first: its host copy completes while the query-tile kernel, queued next, runs
    plan = key_block_plan(sparse_rs, NB, key_block_kw.get("block_m", DEFAULT_BLOCK_M))
    if not slot_masks_fit(kv_index, q_tile):
        # a layout sized for every key tile is too large for per-slot masks (Wan-14B 720p 3D layers: 1.1 GB); cut to
        # the most tiles a query tile visits, which fits: one host sync, after the plan's copy was queued
        kv_index = kv_index[..., :max(1, int(kv_count.max()))]
    base = block_sparse_attention_forward(q, k, v, kv_count, kv_index, q_tile=q_tile, kv_tile=kv_tile, scale=scale,
                                          kv_tile_len=kv_tile_len, row_select=dense_rs, kv_tile_group=kv_tile_group)
    res = key_block_attention(q, k, v, sparse_rs, block_tile_start=block_tile_start, block_tile_count=block_tile_count,
                              kv_tile_len=kv_tile_len, kv_tile=kv_tile, scale=scale, return_work=return_work,
                              out_dtype=out_dtype, base=base, plan=plan, **key_block_kw)
    if not return_work:
        return res
    dense_work = kv_count.sum(dtype=torch.float32) / float(kv_count.numel() * kv_tile_group.numel())
    return res[0], res[1], res[2] + dense_work


# the exact rule's backward: "split" (like the hybrid forward: full (query tile, block) pairs through the query-tile
# backward, the rest key-block-major, hybrid_backward) or "union" (the query-tile backward over the tile union of the
# whole selection, per-row masks). H200, Wan2.1-1.3B's own q/k/v, forward + backward per layer: spatial 25.0 ms split
# vs 33.2 union, 3D 42.6 vs 56.5 (dense cuDNN 41.4-42.1); training step 0.418 vs 0.367 samples/s (NOTES, session 16);
# with the launches tuned (session 17) spatial 21.4, 3D 33.5 ms, training 0.446 samples/s.
EXACT_BACKWARD = "split"
# the split backward takes the forward's split (the hybrid's q_tile and min_fill; key blocks: every pair
# key-block-major); the benchmark's sweeps set {"q_tile": .., "min_fill": ..} here to try others
_SPLIT_BACKWARD_OVERRIDE: dict = {}
# key-block backward launches: (BLOCK_M queries, BLOCK_N keys, warps) of the dQ and the dK/dV kernels. H200,
# Wan-1.3B, forward + split backward, each against (64, 32, 4): dQ 128 x 32 spatial 23.3 -> 22.8 ms, 3D 39.9 -> 39.4;
# dK/dV 64 x 64 spatial 23.3 -> 21.8, 3D 39.9 -> 39.4 (session 17, results/vmoba-train-sweep-*.json)
_KB_BWD_DQ_LAUNCH = (128, 32, 4)
_KB_BWD_DKDV_LAUNCH = (64, 64, 4)
_KB_BWD_MAX_PAIR_BYTES = 1 << 30  # pair lists (12 bytes a pair) per chunk of (sample, head)s


def key_block_backward(grad_out, q, k, v, out, lse, row_select, *, block_tile_start, block_tile_count, kv_tile_len,
                       kv_tile: int, scale: float, grad_lse=None, dq=None, dk=None, dv=None,
                       max_block_tiles: int | None = None):
    """Gradients of the (query, block) pairs of ``row_select`` given the attention's final ``out`` / ``lse`` (over
    however many more keys), added into fp32 ``dq``, ``dk``, ``dv`` (``[B, S, H, D]``; zeros when None); returns
    them. Per list tile of a block's selecting queries one program adds their dQ against the block's keys (fp32
    atomics: a row's pairs are in different programs); per (block, ``BLOCK_N`` keys) one program walks the block's
    whole list for dK and dV (no other program has those keys). Rows are read through the pair lists: no gathered
    copies. One host sync (the pair counts; one more without ``max_block_tiles``, the largest block's tile count)."""
    B, Sq, H, D = q.shape
    NB = block_tile_start.numel()
    dev = q.device
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out = grad_out.to(q.dtype)
    if grad_out.stride(-1) != 1:
        grad_out = grad_out.contiguous()
    out = out if out.stride(-1) == 1 else out.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    delta = backward_delta(out, grad_out, grad_lse)
    lse = lse.float().contiguous()
    dq = torch.zeros(q.shape, device=dev, dtype=torch.float32) if dq is None else dq
    dk = torch.zeros(k.shape, device=dev, dtype=torch.float32) if dk is None else dk
    dv = torch.zeros(v.shape, device=dev, dtype=torch.float32) if dv is None else dv
    if dk.stride() != dv.stride():
        raise ValueError("dk and dv must have the same strides (the dK/dV kernel addresses both with one offset)")
    qm, qn, q_warps = _KB_BWD_DQ_LAUNCH
    km, kn, k_warps = _KB_BWD_DKDV_LAUNCH
    plan = key_block_plan(row_select, NB, qm)
    pairs, tiles = plan.per_head()
    max_tc = int(block_tile_count.max()) if max_block_tiles is None else int(max_block_tiles)
    f32_dot = _f32_dot(q)
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), grad_out.stride(0), grad_out.stride(1), grad_out.stride(2))
    for h0, nh in _chunks(pairs, max(1, _KB_BWD_MAX_PAIR_BYTES // 12)):
        n_pairs, n_tiles = sum(pairs[h0:h0 + nh]), sum(tiles[h0:h0 + nh])
        if not n_pairs:
            continue
        pair_q, _, _, list_start, list_len = _pair_lists(row_select, plan, h0, nh, n_pairs)
        list_len = list_len.to(torch.int32)
        tile_list, tile_j = _list_tiles(list_len, qm, n_tiles)
        common = (h0, H, NB, Sq, scale, scale * _LOG2E)
        _key_block_dq_kernel[(n_tiles,)](
            q, k, v, grad_out, lse, delta, dq, pair_q, list_start, list_len, tile_list, tile_j,
            block_tile_start, block_tile_count, kv_tile_len, *strides, dq.stride(0), dq.stride(1), dq.stride(2),
            *common, F32_DOT=f32_dot, D=D, BLOCK_M=qm, BLOCK_N=min(qn, kv_tile), KV_TILE=kv_tile, num_warps=q_warps)
        bn = min(kn, _next_pow2(max_tc * kv_tile))
        _key_block_dkdv_kernel[(nh * NB, triton.cdiv(max_tc * kv_tile, bn))](
            q, k, v, grad_out, lse, delta, dk, dv, pair_q, list_start, list_len,
            block_tile_start, block_tile_count, kv_tile_len, *strides, dk.stride(0), dk.stride(1), dk.stride(2),
            *common, F32_DOT=f32_dot, D=D, BLOCK_M=km, BLOCK_N=bn, KV_TILE=kv_tile, num_warps=k_warps)
    return dq, dk, dv


def hybrid_backward(grad_out, q, k, v, out, lse, row_select, *, block_tile_start, block_tile_count, kv_tile_len,
                    kv_tile_group, kv_tile: int, q_tile: int, min_fill: float, scale: float, grad_lse=None,
                    max_block_tiles: int | None = None):
    """Gradients ``(dq, dk, dv)`` of exact attention over per-row block selections from its ``out`` / ``lse``, split
    as :func:`hybrid_block_attention` splits the forward: the (query tile, block) pairs at least ``min_fill`` of the
    tile's rows selected through the query-tile kernel's backward (that layout, per-row masks), the others through
    :func:`key_block_backward`; ``min_fill > 1``: all of them the second way. Both parts accumulate in fp32, rounded
    once."""
    from .block_sparse_attention import block_sparse_attention_backward

    NB = block_tile_start.numel()
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grad_out, out = grad_out.to(q.dtype), out.to(q.dtype)
    tiles = dict(block_tile_start=block_tile_start, block_tile_count=block_tile_count, kv_tile_len=kv_tile_len,
                 kv_tile=kv_tile, scale=scale)
    acc = dict(dq=None, dk=None, dv=None)
    sparse_rs = row_select
    if max_block_tiles is None:
        max_block_tiles = int(block_tile_count.max())
    if min_fill <= 1:
        dense_rs, sparse_rs, _, (kv_count, kv_index) = split_by_tile_fill(
            row_select, NB, q_tile, min_fill,
            (block_tile_start, block_tile_count, kv_tile_group.numel(), max_block_tiles))
        parts = block_sparse_attention_backward(grad_out, q, k, v, out, lse, kv_count, kv_index, q_tile=q_tile,
                                                kv_tile=kv_tile, scale=scale, kv_tile_len=kv_tile_len,
                                                row_select=dense_rs, kv_tile_group=kv_tile_group, grad_lse=grad_lse,
                                                grad_dtype=torch.float32)
        acc = dict(zip(("dq", "dk", "dv"), parts))
    dq, dk, dv = key_block_backward(grad_out, q, k, v, out, lse, sparse_rs, grad_lse=grad_lse,
                                    max_block_tiles=max_block_tiles, **tiles, **acc)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _ExactGrad(torch.autograd.Function):
    """Forward by ``run(q, k, v) -> (out, lse, work)`` (no autograd of its own; ``work`` a tensor or None);
    backward by ``grads(grad_out, q, k, v, out, lse, grad_lse) -> (dq, dk, dv)``."""

    @staticmethod
    def forward(ctx, q, k, v, run, grads):
        out, lse, work = run(q, k, v)
        ctx.set_materialize_grads(False)
        if work is not None:
            ctx.mark_non_differentiable(work)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.grads = grads
        return out, lse, work

    @staticmethod
    def backward(ctx, grad_out, grad_lse, _grad_work):
        if grad_out is None and grad_lse is None:
            return (None,) * 5
        q, k, v, out, lse = ctx.saved_tensors
        return (*ctx.grads(grad_out, q, k, v, out, lse, grad_lse), None, None)


def attention_with_grads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, run, grads):
    """``run(q, k, v) -> (out, lse, work)`` made differentiable in q, k, v (and through ``lse``) by ``grads(grad_out,
    q, k, v, out, lse, grad_lse) -> (dq, dk, dv)``: attention's backward needs only the inputs, the output and
    its lse, whichever kernel (or earlier pass: gradient checkpointing's kept results) computed them."""
    return _ExactGrad.apply(q, k, v, run, grads)


def exact_attention_with_grad(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_select: torch.Tensor, *,
                              hybrid: bool, backward_layout: tuple | None, q_tile_backward: int,
                              kv_tile_group: torch.Tensor, block_tile_start: torch.Tensor,
                              block_tile_count: torch.Tensor, kv_tile_len: torch.Tensor, kv_tile: int,
                              scale: float | None = None, backward: str | None = None, memo=None, **kw):
    """:func:`hybrid_block_attention` (``hybrid``) or :func:`key_block_attention`, differentiable in q, k, v (and
    through ``lse``). Returns ``(out, lse, work)`` as they do with ``return_work=True``.

    Attention's backward needs only the inputs, the output and its lse, whichever kernel computed them.
    ``backward`` (default :data:`EXACT_BACKWARD`): ``"union"``: the query-tile kernel's backward
    (:func:`mixdit.kernels.block_sparse_attention_backward`) with ``backward_layout = (kv_count, kv_index)``, a
    query-tile layout over ``q_tile_backward``-row tiles covering every selected (query, key tile) pair (the
    router's), and the per-row ``row_select`` masks; ``"split"``: :func:`hybrid_backward` with the forward's split
    (key blocks: every pair key-block-major). Both exact: every selected pair, no other.
    ``memo(compute)``: with gradients, the forward runs as ``memo(lambda: forward)`` (gradient checkpointing hands
    the first pass's result back to its recomputation: :func:`mixdit.pipelines.context.kept`).
    Other keyword arguments go to the forward kernel (``min_fill``, ``q_tile``, ``max_block_tiles`` for the hybrid,
    ``out_dtype``, launch settings)."""
    D = q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    tiles = dict(block_tile_start=block_tile_start, block_tile_count=block_tile_count, kv_tile_len=kv_tile_len,
                 kv_tile=kv_tile, scale=scale)

    def run(q_, k_, v_):
        if hybrid:
            return hybrid_block_attention(q_, k_, v_, row_select, kv_tile_group=kv_tile_group, return_work=True,
                                          **tiles, **kw)
        return key_block_attention(q_, k_, v_, row_select, return_work=True, **tiles, **kw)

    if not (torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))):
        return run(q, k, v)
    if memo is not None:
        compute = run

        def run(q_, k_, v_):
            return memo(lambda: compute(q_, k_, v_))
    backward = EXACT_BACKWARD if backward is None else backward
    if backward == "split":
        split = dict(q_tile=kw.get("q_tile", 128), min_fill=kw["min_fill"]) if hybrid else dict(q_tile=128,
                                                                                                min_fill=2.0)
        split.update(_SPLIT_BACKWARD_OVERRIDE)

        def grads(grad_out, q_, k_, v_, out, lse, grad_lse):
            return hybrid_backward(grad_out, q_, k_, v_, out, lse, row_select, kv_tile_group=kv_tile_group,
                                   grad_lse=grad_lse, max_block_tiles=kw.get("max_block_tiles"), **split, **tiles)
    elif backward == "union":
        from .block_sparse_attention import block_sparse_attention_backward

        if backward_layout is None:
            raise ValueError("the 'union' backward needs backward_layout (the router's query-tile layout)")
        kv_count, kv_index = backward_layout

        def grads(grad_out, q_, k_, v_, out, lse, grad_lse):
            # an fp32 output (out_dtype, for callers merging more parts) enters in q's dtype: the backward reads
            # it only for delta = rowsum(dO * O), as FlashAttention's does from its rounded output
            return block_sparse_attention_backward(
                None if grad_out is None else grad_out.to(q_.dtype), q_, k_, v_, out.to(q_.dtype), lse, kv_count,
                kv_index, q_tile=int(q_tile_backward), kv_tile=kv_tile, scale=scale, kv_tile_len=kv_tile_len,
                row_select=row_select, kv_tile_group=kv_tile_group, grad_lse=grad_lse)
    else:
        raise ValueError(f"backward must be 'union' or 'split', got {backward!r}")
    return attention_with_grads(q, k, v, run, grads)
