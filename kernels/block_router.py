"""Fused VMoBA block router (Triton) and its launchers.

Naive reference: :mod:`mixdit.kernels.router_reference` (same rules, explicit per-token sorts).

Inputs are already in VMoBA's block layout (see :mod:`mixdit.attention.vmoba`):

* ``q``: ``[B, Sq, H, D]`` queries in block-contiguous order (unpadded), ``q_block[Sq]`` the block
  of each query row.
* ``k``: ``[B, Sk_pad, H, D]`` keys in the padded block layout: block ``c`` owns key tiles
  ``block_tile_start[c] .. + block_tile_count[c]``; only the first ``kv_tile_len[t]`` rows of tile
  ``t`` are real; ``kv_tile_group[t]`` is the block of tile ``t``.

Kernels
-------
1. ``_block_means_kernel``: fp32 mean of the real keys of each (sample, head, block), stored
   transposed ``[B*H, D_PAD, NB_PAD]`` (zeros in the padding).
2. Threshold rule (the default), ``_token_threshold_kernel``: the fp32 gate ``q . mean`` of every (row, block)
   comes from ``_token_gate_kernel`` (chunks of (sample, head), ``[rows, NB]`` fp32 from exact tensor-core products
   of q with the means split into bf16 / TF32 parts, about fp32 accuracy; the fp32 cuBLAS batched matmul it
   replaced took 1.3 ms of a 3D layer's 3.1 ms router); one
   warp per program applies the rule to a few rows: min-max normalise over the blocks, ``remain = max(tau -
   own/(sum+eps), 0)``, then the reference's cut value found bit by bit on the fp32 patterns of the others'
   normalised gates (up to 30 masked row sums, no sort; ties with the cut all taken; the search stops once the
   remaining bits cannot change the selection). On one warp a row's reductions
   are shuffles; the earlier on-chip version (gate by ``tl.dot``, 26 float bisection steps on ``[16, 512]``
   tiles over 8 warps, reductions through shared memory) took 3.9 / 8.1 ms per 2D / 3D layer at Wan-1.3B.
3. ``_route_kernel`` (top-k and global): for a tile of ``BLOCK_M`` query rows of one (sample, head) it computes
   the gate against every block on chip (``[BLOCK_M, NB_PAD]`` fp32 in registers) and selects blocks per row:

   * top-k: own block plus the ``k - 1`` best others (iterated row max);
   * global: the same threshold rule per (sample, head) over all (query, block) pairs: a
     min/max pass, then ``GLOBAL_PASSES`` passes of a 16-way search for the cut value (each pass
     sums, per program, the normalised values above 16 candidate cuts; a tiny torch reduction
     narrows the interval 16x), then the selection pass. Nothing is sorted or materialised.

   Outputs per row: the bitmask ``row_select [B, H, Sq, W]`` (bit ``c`` of word ``c // 32``),
   per program the union of the selected blocks (int8, later OR-ed per query tile and expanded
   to key tiles) and the number of selected key tokens (for the density statistic).

4. ``_tile_query_means_kernel`` + ``_tile_route_kernel`` (:func:`route_query_tiles_fused`): VMoBA's
   approximate ``granularity="query_tile"`` router, one selection per (sample, head, query tile) from
   the tile's mean query. The gate ``[B*H, query tiles, NB_PAD]`` comes from ``_token_gate_kernel`` (3xTF32); the route
   kernel takes up to 16 tiles per program (:func:`_tile_route_shape`) and applies the rule on chip
   (threshold: the reference's cut value found exactly, bit by bit on the fp32 patterns of the
   normalised gates; top-k: iterated arg-max), then writes the visited part of ``kv_index`` directly
   from per-block tile ranges (exclusive cumsum over blocks; no gather, no sort).

Everything stays on the device: no ``.item()``, no ``nonzero``, no data-dependent Python branch.
``max_tiles`` of ``kv_index`` is the static number of key tiles.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .router_reference import EPS, compact_tiles

MODE_TOPK = 1
MODE_GLOBAL_SELECT = 2
MODE_GLOBAL_MINMAX = 3
MODE_GLOBAL_SUMS = 4

# the threshold rule's cut search stops once the remaining bits cannot change the selection (_threshold_rule, checked
# from _rule_first_check's round on), in the per-token and the query-tile router; False: all 30 bits (the A/B)
_RULE_EARLY_EXIT = True
# token gate launch: rows x blocks per step, warps (H200, Wan-1.3B's q/k: benchmarks/NOTES.md, session 11)
_GATE_TILES = (128, 64)
_GATE_WARPS = 8

GLOBAL_CANDIDATES = 16  # candidates per global search pass
GLOBAL_PASSES = 7  # 15**-7 ~ 6e-9 resolution on the normalised cut value


@triton.jit
def _block_means_kernel(K, MEANS_T, TILE_START, TILE_COUNT, TILE_LEN, BLOCK_SIZE,
                        stride_kb, stride_ks, stride_kh, stride_kd, H, NB_PAD, SPLIT,
                        D: tl.constexpr, D_PAD: tl.constexpr, KV_TILE: tl.constexpr, ROWS: tl.constexpr):
    # Program (block, split, b*h) sums rows split*ROWS, (split+SPLIT)*ROWS, ... of the block's padded key
    # range in ROWS-row chunks (whatever the key tile: a 96-token block in 32-row tiles is one chunk), pad
    # rows masked by TILE_LEN, and stores its share of the mean: MEANS_T[b*h, split] (summed after if SPLIT > 1).
    # blocks fastest across programs: their transposed stores (one column of MEANS_T each) then share
    # cache lines; heads fastest read better in 1D layers (71 -> 67 us) but 3D got slower (81 -> 93 us, H200)
    blk = tl.program_id(0)
    sp = tl.program_id(1)
    bh = tl.program_id(2)
    b = bh // H
    h = bh % H
    r_begin = tl.load(TILE_START + blk) * KV_TILE
    r_end = r_begin + tl.load(TILE_COUNT + blk) * KV_TILE
    offs_r = tl.arange(0, ROWS)
    offs_d = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    for r0 in range(r_begin + sp * ROWS, r_end, SPLIT * ROWS):
        rows = r0 + offs_r
        in_blk = rows < r_end
        tile = rows // KV_TILE
        ok = in_blk & ((rows - tile * KV_TILE) < tl.load(TILE_LEN + tile, mask=in_blk, other=0))
        ptrs = base + rows.to(tl.int64)[:, None] * stride_ks + offs_d[None, :] * stride_kd
        x = tl.load(ptrs, mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    n = tl.load(BLOCK_SIZE + blk).to(tl.float32)
    out = MEANS_T + (bh.to(tl.int64) * SPLIT + sp) * D_PAD * NB_PAD
    tl.store(out + offs_d * NB_PAD + blk, acc / n)


@triton.jit
def _store_selection(sel, bh, rt, rows, row_ok, cols, c_ok, Sq, n_rt, BLOCK_SIZE, ROW_SELECT, UNION, SEL_TOKENS,
                     ROWS: tl.constexpr, NB_PAD: tl.constexpr, W: tl.constexpr, STORE_UNION: tl.constexpr):
    """A router program's outputs for its ``ROWS`` rows' selection ``sel [ROWS, NB_PAD]``: the per-row bitmask
    ``row_select`` (bit c of word c // 32), with ``STORE_UNION`` the union of the rows' blocks (int8, OR-ed per
    query tile into the query-tile layout after), and the selected key tokens (the density statistic)."""
    shifted = sel.to(tl.int32) << (cols % 32)[None, :]
    words = tl.sum(tl.reshape(shifted, [ROWS, W, 32]), axis=2)
    wcols = tl.arange(0, W)
    tl.store(ROW_SELECT + ((bh.to(tl.int64) * Sq + rows[:, None]) * W + wcols[None, :]), words, mask=row_ok[:, None])
    if STORE_UNION:
        tl.store(UNION + (bh.to(tl.int64) * n_rt + rt) * NB_PAD + cols, tl.max(sel.to(tl.int32), axis=0).to(tl.int8))
    bsize = tl.load(BLOCK_SIZE + cols).to(tl.float32)  # zero-padded to NB_PAD by route_blocks: vector loads
    tl.store(SEL_TOKENS + bh.to(tl.int64) * n_rt + rt, tl.sum(tl.sum(tl.where(sel, bsize[None, :], 0.0), axis=1), axis=0))


@triton.jit
def _route_kernel(Q, MEANS_T, Q_BLOCK, BLOCK_SIZE, ROW_SELECT, UNION, SEL_TOKENS,
                  G_MIN, G_DEN, G_LO, G_STEP, PARTIAL,
                  stride_qb, stride_qs, stride_qh, stride_qd,
                  Sq, H, NB, n_rt, threshold,
                  MODE: tl.constexpr, TOPK: tl.constexpr, NB_PAD: tl.constexpr, W: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                  NCAND: tl.constexpr, PRECISION: tl.constexpr, STORE_UNION: tl.constexpr):
    rt = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    rows = rt * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < Sq
    cols = tl.arange(0, NB_PAD)
    col_ok = cols < NB

    # ---- gate [BLOCK_M, NB_PAD] = q . mean, accumulated over chunks of the head dim ----
    q_base = Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qs
    m_base = MEANS_T + bh.to(tl.int64) * D_PAD * NB_PAD
    s = tl.zeros([BLOCK_M, NB_PAD], dtype=tl.float32)
    for d0 in tl.static_range(0, D_PAD, D_CHUNK):
        dd = d0 + tl.arange(0, D_CHUNK)
        qc = tl.load(q_base + dd[None, :] * stride_qd, mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
        mc = tl.load(m_base + dd[:, None] * NB_PAD + cols[None, :])
        s = tl.dot(qc.to(tl.float32), mc, s, input_precision=PRECISION)

    if MODE == 3:  # global pass 1: min / max of the gate over this program's (row, block) pairs
        valid = row_ok[:, None] & col_ok[None, :]
        mn = tl.min(tl.min(tl.where(valid, s, float("inf")), axis=1), axis=0)
        mx = tl.max(tl.max(tl.where(valid, s, float("-inf")), axis=1), axis=0)
        own0 = tl.load(Q_BLOCK + rows, mask=row_ok, other=0)
        oth = valid & (cols[None, :] != own0[:, None])
        top = tl.max(tl.max(tl.where(oth, s, float("-inf")), axis=1), axis=0)
        pbase = PARTIAL + (bh.to(tl.int64) * n_rt + rt) * 3
        tl.store(pbase, mn)
        tl.store(pbase + 1, mx)
        tl.store(pbase + 2, top)
        return

    own = tl.load(Q_BLOCK + rows, mask=row_ok, other=0)
    is_own = (cols[None, :] == own[:, None]) & col_ok[None, :]
    is_other = col_ok[None, :] & (cols[None, :] != own[:, None])

    if MODE == 1:  # top-k: own block + (TOPK - 1) best others
        work = tl.where(is_other, s, float("-inf"))
        sel = is_own
        for _ in tl.static_range(TOPK - 1):
            best = tl.max(work, axis=1)
            pick = (work == best[:, None]) & (best[:, None] > float("-inf"))
            sel = sel | pick
            work = tl.where(pick, float("-inf"), work)
    else:  # MODE 2 / 4: global rule, per-(sample, head) min / den (and cut) given
        gmin = tl.load(G_MIN + bh)
        gden = tl.load(G_DEN + bh)
        valid = row_ok[:, None] & col_ok[None, :]
        norm = tl.where(valid, (s - gmin) / gden, 0.0)
        others = tl.where(is_other & row_ok[:, None], norm, -2.0)
        if MODE == 4:  # partial sums: own, total, share above NCAND candidate cuts
            lo = tl.load(G_LO + bh)
            step = tl.load(G_STEP + bh)
            pbase = PARTIAL + (bh.to(tl.int64) * n_rt + rt) * (NCAND + 2)
            tl.store(pbase, tl.sum(tl.sum(tl.where(is_own & row_ok[:, None], norm, 0.0), axis=1), axis=0))
            tl.store(pbase + 1, tl.sum(tl.sum(norm, axis=1), axis=0))
            for j in tl.static_range(NCAND):
                c = lo + step * j
                part = tl.sum(tl.sum(tl.where(others >= c, others, 0.0), axis=1), axis=0)
                tl.store(pbase + 2 + j, part)
            return
        cut = tl.load(G_LO + bh)
        sel = is_own | (is_other & (others >= cut))

    _store_selection(sel & row_ok[:, None], bh, rt, rows, row_ok, cols, col_ok, Sq, n_rt, BLOCK_SIZE, ROW_SELECT,
                     UNION, SEL_TOKENS, BLOCK_M, NB_PAD, W, STORE_UNION)


@triton.jit
def _threshold_rule(s, valid, is_own, threshold, ROWS: tl.constexpr, EARLY_EXIT: tl.constexpr):
    """VMoBA's threshold rule on fp32 gates ``s [ROWS, NB_PAD]`` (one row per query or query tile): min-max
    normalise over the valid blocks, ``remain = max(tau - own/(sum+eps), 0)``, then the reference's cut value = the
    largest other value v whose "others >= v" share reaches remain, found bit by bit on the fp32 patterns (exact, no
    sort; ties with v are all taken, as in the reference). If even all others miss the share no candidate passes,
    the cut stays 0 and every other block is taken (the reference's "last sorted position")."""
    oth = valid & ~is_own
    mn = tl.min(tl.where(valid, s, float("inf")), axis=1)
    mx = tl.max(tl.where(valid, s, float("-inf")), axis=1)
    den = mx - mn
    den = tl.where(den <= 1e-6, 1.0, den)
    norm = tl.where(valid, tl.math.div_rn(s - mn[:, None], den[:, None] + tl.zeros_like(s)), 0.0)
    te = tl.sum(norm, axis=1) + 1e-6
    remain = tl.maximum(threshold - tl.math.div_rn(tl.sum(tl.where(is_own, norm, 0.0), axis=1), te), 0.0)
    # one live [ROWS, NB_PAD] tensor through the search (fewer registers: no spills on sm_90 at 512 blocks): the
    # others' fp32 bit patterns (norm >= 0: int order == float order), -1 elsewhere, so "bits >= cut" (cut >= 0)
    # picks others only and the values come back by a bitcast
    bits = tl.where(oth, norm.to(tl.int32, bitcast=True), -1)
    top_bits = tl.max(bits, axis=1)
    # Bits 29..0 (TILE_CUT_BITS), three per round. After a round the cut lies in [prefix, prefix + 2^b - 1]; once
    # that interval holds at most one other value in every row the remaining bits cannot change the selected set
    # (the one value is the cut itself, or the cut is below it), so "bits >= prefix" is already the final set and
    # the search stops: ~half the rounds at Wan sizes, and the result is bit-identical to the full search.
    prefix = tl.zeros([ROWS], dtype=tl.int32)
    b = tl.program_id(0) * 0 + 30  # bits left, as a tensor: the while loop carries it (and open_rows, > 0 to start)
    open_rows = b
    while (b > 0) & (open_rows > 0):
        for i in tl.static_range(3):
            cand = prefix | (1 << (b - 1 - i))
            take = bits >= cand[:, None]
            share = tl.sum(tl.where(take, bits.to(tl.float32, bitcast=True), 0.0), axis=1)
            ok = (tl.math.div_rn(share, te) >= remain) & (cand <= top_bits)
            prefix = tl.where(ok, cand, prefix)
        b -= 3
        # (EARLY_EXIT 0: the full search, for the A/B and the test that the two agree; else checked once at most
        # EARLY_EXIT bits are left: see _rule_first_check)
        if EARLY_EXIT > 0:
            if b <= EARLY_EXIT:
                in_interval = (bits >= prefix[:, None]) & (bits <= (prefix + ((1 << b) - 1))[:, None])
                open_rows = tl.sum((tl.sum(in_interval.to(tl.int32), axis=1) > 1).to(tl.int32), axis=0)
    return is_own | (bits >= prefix[:, None])


@triton.jit
def _token_threshold_kernel(GATE, Q_BLOCK, BLOCK_SIZE, ROW_SELECT, UNION, SEL_TOKENS, Sq, NB, n_rt, bh0, threshold,
                            stride_gs, ROWS: tl.constexpr, NB_PAD: tl.constexpr, W: tl.constexpr,
                            STORE_UNION: tl.constexpr, EARLY_EXIT: tl.constexpr):
    # The threshold rule (_threshold_rule) for ROWS query rows of one (sample, head) from their precomputed fp32
    # gate rows (GATE [heads in chunk, Sq, NB], rows stride_gs apart). Launched with one warp: a row's reductions stay
    # inside the warp (shuffles, no shared memory or barriers), which is what the rule's masked row sums cost on chip.
    rt = tl.program_id(0)
    j = tl.program_id(1)
    bh = bh0 + j
    rows = rt * ROWS + tl.arange(0, ROWS)
    row_ok = rows < Sq
    cols = tl.arange(0, NB_PAD)
    c_ok = cols < NB
    valid = row_ok[:, None] & c_ok[None, :]
    # masked by the row's width, not NB: a multiple of 16 (token_gate), so the loads vectorise (columns past NB are 0)
    s = tl.load(GATE + (j.to(tl.int64) * Sq + rows[:, None]) * stride_gs + cols[None, :],
                mask=row_ok[:, None] & (cols < stride_gs)[None, :], other=0.0)
    own = tl.load(Q_BLOCK + rows, mask=row_ok, other=0)
    is_own = valid & (cols[None, :] == own[:, None])
    sel = _threshold_rule(s, valid, is_own, threshold, ROWS, EARLY_EXIT)  # within valid: own and other blocks only
    _store_selection(sel, bh, rt, rows, row_ok, cols, c_ok, Sq, n_rt, BLOCK_SIZE, ROW_SELECT, UNION, SEL_TOKENS,
                     ROWS, NB_PAD, W, STORE_UNION)


# _token_gate_kernel modes (constexpr: jit code may read module globals only as such)
GATE_ONE_PRODUCT, GATE_TF32_SPLIT, GATE_BF16_SPLIT = tl.constexpr(0), tl.constexpr(1), tl.constexpr(2)


@triton.jit
def _token_gate_kernel(Q, M1, M2, M3, GATE, stride_qb, stride_qs, stride_qh, stride_qd, Sq, H, NB, NB_PAD, bh0,
                       stride_gs, D: tl.constexpr, D_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                       MODE: tl.constexpr, PRECISION: tl.constexpr, F32_DOT: tl.constexpr):
    # GATE[j, rows, :] = q . mean (fp32) for head bh0 + j, on tensor cores: the q tile is loaded once and walks the
    # blocks BN at a time. The means come split into parts exact in the product's input type, so that the products
    # are exact and only the fp32 accumulation rounds (about what an fp32 matmul does):
    #   GATE_BF16_SPLIT (bf16 q): three bf16 parts (8 + 8 + 8 bits), three bf16 products;
    #   GATE_TF32_SPLIT (fp16 q, exact in TF32): a TF32 head and remainder (~21 bits), two TF32 products;
    #   GATE_ONE_PRODUCT (fp32 q): M1 = the mean, one product at PRECISION (3xTF32; fp32 in the interpreter).
    rt = tl.program_id(0)
    j = tl.program_id(1)
    bh = bh0 + j
    b = bh // H
    h = bh % H
    rows = rt * BM + tl.arange(0, BM)
    row_ok = rows < Sq
    offs_d = tl.arange(0, D_PAD)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h * stride_qh + rows.to(tl.int64)[:, None] * stride_qs
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if MODE != GATE_BF16_SPLIT or F32_DOT:  # (F32_DOT: the CPU interpreter's bf16 dot is not exact)
        q = q.to(tl.float32)
    m_base = (j.to(tl.int64) * D_PAD + offs_d[:, None]) * NB_PAD  # the parts hold the chunk's heads only
    g_base = GATE + (j.to(tl.int64) * Sq + rows[:, None]) * stride_gs
    for c0 in range(0, NB, BN):
        cols = c0 + tl.arange(0, BN)
        m_offs = m_base + cols[None, :]  # NB_PAD columns, zero past NB: no mask needed
        if MODE == GATE_BF16_SPLIT:
            g = tl.dot(q, tl.load(M3 + m_offs).to(q.dtype), out_dtype=tl.float32)
            g = tl.dot(q, tl.load(M2 + m_offs).to(q.dtype), g, out_dtype=tl.float32)
            g = tl.dot(q, tl.load(M1 + m_offs).to(q.dtype), g, out_dtype=tl.float32)
        elif MODE == GATE_TF32_SPLIT:
            g = tl.dot(q, tl.load(M2 + m_offs), input_precision=PRECISION)
            g = tl.dot(q, tl.load(M1 + m_offs), g, input_precision=PRECISION)
        else:
            g = tl.dot(q, tl.load(M1 + m_offs), input_precision=PRECISION)
        # up to the row's width (a multiple of 16: vector stores), past NB the zero means give 0
        tl.store(g_base + cols[None, :], g, mask=row_ok[:, None] & (cols < stride_gs)[None, :])


def _gate_operands(q_dtype: torch.dtype, means_t: torch.Tensor, interpret: bool):
    """``(mode, (m1, m2, m3), precision)`` for ``_token_gate_kernel``: the means split so that each part times q is
    exact in the product's input type (parts sum to the mean to ~24 bits for bf16, ~21 for TF32)."""
    if q_dtype == torch.bfloat16:
        m1 = means_t.to(torch.bfloat16)
        r = means_t - m1.float()
        m2 = r.to(torch.bfloat16)
        return GATE_BF16_SPLIT, (m1, m2, (r - m2.float()).to(torch.bfloat16)), "ieee"
    if q_dtype == torch.float16:
        hi = (means_t.view(torch.int32) & -8192).view(torch.float32)  # low 13 mantissa bits cleared: exact TF32
        return GATE_TF32_SPLIT, (hi, means_t - hi, hi), "ieee" if interpret else "tf32"  # (third: unused)
    return GATE_ONE_PRODUCT, (means_t, means_t, means_t), "ieee" if interpret else "tf32x3"  # (only the first read)


def _gate_row_width(num_blocks: int) -> int:
    """Floats between the rows of :func:`token_gate`'s buffer: ``num_blocks`` rounded up to 16."""
    return -(-num_blocks // 16) * 16


def token_gate(q: torch.Tensor, means_t: torch.Tensor, num_blocks: int, h0: int, h1: int) -> torch.Tensor:
    """fp32 gate ``[h1 - h0, Sq, num_blocks]`` of (sample, head) ``h0 .. h1`` (flat ``b * H + h``): every query row of
    ``q [B, Sq, H, D]`` against every block's key mean (``means_t [B*H, D_PAD, NB_PAD]``, :func:`block_key_means`).
    Tensor cores at about fp32 accuracy (see ``_token_gate_kernel``). A view: its rows are ``num_blocks`` rounded up to
    16 floats apart, so that every row starts 64-byte aligned and Triton (which specialises integer arguments that are
    multiples of 16) vectorises the gate's stores and the rule kernel's loads (with 390 blocks, rows 1,560 bytes apart
    took one 4-byte access per value)."""
    B, Sq, H, D = q.shape
    means_t = means_t[h0:h1].contiguous()  # split only this chunk's means into parts
    D_PAD, NB_PAD = means_t.shape[1], means_t.shape[2]
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    mode, parts, precision = _gate_operands(q.dtype, means_t, interpret)
    gate = torch.empty(h1 - h0, Sq, _gate_row_width(num_blocks), device=q.device, dtype=torch.float32)
    BM, BN = (64, 32) if interpret else _GATE_TILES
    BN = min(BN, NB_PAD)
    _token_gate_kernel[(triton.cdiv(Sq, BM), h1 - h0)](
        q, *parts, gate, q.stride(0), q.stride(1), q.stride(2), q.stride(3), Sq, H, num_blocks, NB_PAD, h0,
        gate.stride(1), D=D, D_PAD=D_PAD, BM=BM, BN=BN, MODE=mode, PRECISION=precision, F32_DOT=interpret,
        num_warps=_GATE_WARPS, num_stages=2)
    return gate[..., :num_blocks]


def _rule_first_check(nb_pad: int) -> int:
    """``EARLY_EXIT`` of the threshold rule for ``nb_pad`` blocks: the bits left when the search first checks whether
    it may stop. The check costs about a third of a round (the kernel is issue-bound: 88% of the SM's issue slots,
    session 14's ncu), and early rounds cannot stop: their interval (an octave or a fraction of one) holds more than
    one of the blocks' values. Rows of the random-weight Wan2.1-1.3B (480p, 131 K per layer type) stopping after
    round 1 / 2 / 3 / 4: 11 blocks 0 / 1.4% / 77% / 18%, 130 blocks 0 / 0 / 0 / 11%, 390 blocks 0 / 0 / 0 / 0.05%.
    So the first check comes after round 2, 4 or 5 (H200, 3D rule kernel: from round 4 1.439 -> 1.355 ms, spatial
    0.737 -> 0.693, same selections). Checking later only costs rounds: the selection never changes. 0 (no check,
    the full 30-bit search) when ``_RULE_EARLY_EXIT`` is off."""
    if not _RULE_EARLY_EXIT:
        return 0
    if nb_pad <= 32:
        return 24
    return 18 if nb_pad <= 128 else 15


def _threshold_rows(nb_pad: int) -> int:
    """Rows per one-warp program of _token_threshold_kernel. Measured (H200, Wan-1.3B, router ms at 1 / 2 / 4 / 8
    rows): 1D (32 padded blocks) 1.06 / 1.04 / 1.15 / 1.38 (32 rows: 2.99), 2D 1.68 / 1.93 / 3.25 / 2.60, 3D 3.63 /
    4.08 / 4.33 / 5.80: the rule's 30 dependent steps are latency-bound, and more rows per warp only add pressure.
    The CPU interpreter pays per program instead: there ~1K gate values per program (same kernel code)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return max(1, min(64, 1024 // nb_pad))
    return 1 if nb_pad >= 128 else 2


def _route_threshold_tokens(q, means_t, q_block, block_size, row_select, union, sel_tokens, NB, rows, threshold,
                            store_union: bool, max_gate_bytes: int = 1 << 30):
    """Per-token threshold rule: the gate ``q . mean`` (:func:`token_gate`, about fp32 like the reference's fp32
    einsum) over chunks of (sample, head), then :func:`_token_threshold_kernel` on it."""
    B, Sq, H, D = q.shape
    BH = B * H
    NB_PAD = means_t.shape[-1]
    n_rt = triton.cdiv(Sq, rows)
    step = max(1, max_gate_bytes // (Sq * _gate_row_width(NB) * 4))
    for h0 in range(0, BH, step):
        h1 = min(BH, h0 + step)
        gate = token_gate(q, means_t, NB, h0, h1)
        _token_threshold_kernel[(n_rt, h1 - h0)](
            gate, q_block, block_size, row_select, union, sel_tokens, Sq, NB, n_rt, h0, float(threshold),
            gate.stride(1), ROWS=rows, NB_PAD=NB_PAD, W=NB_PAD // 32, STORE_UNION=store_union,
            EARLY_EXIT=_rule_first_check(NB_PAD), num_warps=1)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass
class RouterOutput:
    """Selection in the block-sparse kernel's layout (see :mod:`mixdit.kernels.reference`)."""

    row_select: torch.Tensor  # [B, H, Sq, W] int32 bitmask over blocks
    kv_count: torch.Tensor | None  # [B, H, n_qt] int32 (None: no query-tile layout asked)
    kv_index: torch.Tensor | None  # [B, H, n_qt, n_kv_tiles] int32
    density: torch.Tensor  # 0-d float32: selected key tokens / all key tokens (mean over b, h, rows)
    tile_density: torch.Tensor | None  # 0-d float32: visited key tiles / all key tiles (what is computed)


def block_key_means(k: torch.Tensor, block_tile_start: torch.Tensor, block_tile_count: torch.Tensor,
                    kv_tile_len: torch.Tensor, block_size: torch.Tensor, kv_tile: int,
                    nb_pad: int | None = None, max_block_tiles: int | None = None) -> torch.Tensor:
    """Transposed fp32 block key means ``[B*H, D_PAD, NB_PAD]`` (zero padding) of padded ``k``.

    ``max_block_tiles`` (the largest ``block_tile_count``, known from the block shape: no host sync) lets
    long blocks (1D layers: ~3,200 rows) be split over several programs; their partial means are summed
    in a fixed order, so the result is deterministic."""
    B, Sk, H, D = k.shape
    if Sk != kv_tile_len.numel() * kv_tile:  # a layout built for another key tile would be read wrongly
        raise ValueError(f"k has {Sk} rows but the layout has {kv_tile_len.numel()} key tiles of kv_tile={kv_tile}")
    NB = block_tile_start.numel()
    NB_PAD = nb_pad or max(32, _next_pow2(NB))
    D_PAD = max(16, _next_pow2(D))
    rows = 128 if D_PAD <= 128 else 64
    chunks = -(-int(max_block_tiles) * kv_tile // rows) if max_block_tiles else 1
    split = max(1, min(16, -(-chunks // 4)))  # >= 4 chunks per program
    means_t = torch.zeros(B * H, split, D_PAD, NB_PAD, device=k.device, dtype=torch.float32)
    _block_means_kernel[(NB, split, B * H)](
        k, means_t, block_tile_start, block_tile_count, kv_tile_len, block_size,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3), H, NB_PAD, split,
        D=D, D_PAD=D_PAD, KV_TILE=kv_tile, ROWS=rows, num_warps=4)
    return means_t[:, 0] if split == 1 else means_t.sum(1)


def route_blocks(q: torch.Tensor, k: torch.Tensor, *, q_block: torch.Tensor, block_size: torch.Tensor,
                 block_tile_start: torch.Tensor, block_tile_count: torch.Tensor, kv_tile_len: torch.Tensor,
                 kv_tile_group: torch.Tensor, selection: str = "threshold", threshold: float = 0.25,
                 topk: int = 3, q_tile: int = 128, kv_tile: int = 128, precision: str | None = "tf32x3",
                 block_m: int | None = None, max_block_tiles: int | None = None,
                 tile_layout: bool = True) -> RouterOutput:
    """Select VMoBA blocks for every query row and head; return the block-sparse layout.

    ``q`` ``[B, Sq, H, D]`` (block order), ``k`` ``[B, Sk_pad, H, D]`` (padded block layout).
    ``selection``: ``"threshold"`` (per query token and head), ``"topk"`` or ``"global"`` (per
    sample and head over all pairs). ``precision`` (top-k / global; the threshold rule's gate is
    :func:`token_gate`, about fp32 whatever this says): ``tl.dot`` input precision of the fp32 gate
    (``"ieee"`` exact, ``"tf32x3"`` ~fp32 on tensor cores (None: this), ``"tf32"`` fastest/least exact).
    ``max_block_tiles``: optional, see :func:`block_key_means`. ``tile_layout=False``: only the per-row
    bitmask and the density (``kv_count``/``kv_index``/``tile_density`` None), for
    :func:`mixdit.kernels.key_block_attention.key_block_attention`, which needs no query-tile layout.
    """
    B, Sq, H, D = q.shape
    NB = block_size.numel()
    n_kt = kv_tile_group.numel()
    NB_PAD = max(32, _next_pow2(NB))
    W = NB_PAD // 32
    D_PAD = max(16, _next_pow2(D))
    fast_threshold = selection == "threshold"
    if fast_threshold:  # one-warp rule kernel on a precomputed fp32 gate: router tiles of a few rows
        block_m = _threshold_rows(NB_PAD)
    elif block_m is None:
        block_m = max(16, min(64, 8192 // NB_PAD))
    if q_tile % block_m:
        block_m = 16
    assert q_tile % block_m == 0, "q_tile must be a multiple of 16"
    D_CHUNK = min(D_PAD, max(16, 8192 // NB_PAD))
    precision = precision or "tf32x3"
    if os.environ.get("TRITON_INTERPRET") == "1":
        precision = "ieee"
    n_rt = triton.cdiv(Sq, block_m)
    dev = q.device
    # tau >= 1 means "cover the whole mass": every block. (With the reference's +1e-6 in fp32 the
    # share of the others can round onto the target and drop the minimum block; 2.0 avoids that.)
    threshold = 2.0 if threshold >= 1.0 else float(threshold)
    means_t = block_key_means(k, block_tile_start, block_tile_count, kv_tile_len, block_size, kv_tile, NB_PAD,
                              max_block_tiles)
    block_size = torch.nn.functional.pad(block_size, (0, NB_PAD - NB))  # the kernels read whole NB_PAD rows of it

    row_select = torch.empty(B, H, Sq, W, device=dev, dtype=torch.int32)
    sel_tokens = torch.empty(B * H, n_rt, device=dev, dtype=torch.float32)
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)
    # per-program block unions feed only the query-tile layout ([B*H, Sq, NB_PAD] bytes at one row per program)
    union = torch.empty(B * H, n_rt, NB_PAD, device=dev, dtype=torch.int8) if tile_layout else dummy
    num_warps = 4 if NB_PAD * block_m < 8192 else 8
    grid = (n_rt, B * H)

    def launch(mode, g_min=dummy, g_den=dummy, g_lo=dummy, g_step=dummy, partial=dummy):
        _route_kernel[grid](
            q, means_t, q_block, block_size, row_select, union, sel_tokens,
            g_min, g_den, g_lo, g_step, partial,
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            Sq, H, NB, n_rt, float(threshold),
            MODE=mode, TOPK=max(1, min(int(topk), NB)), NB_PAD=NB_PAD, W=W, D=D, D_PAD=D_PAD,
            D_CHUNK=D_CHUNK, BLOCK_M=block_m, NCAND=GLOBAL_CANDIDATES,
            PRECISION=precision, STORE_UNION=tile_layout, num_warps=num_warps)

    if fast_threshold:
        _route_threshold_tokens(q, means_t, q_block, block_size, row_select, union, sel_tokens, NB, block_m, threshold,
                                tile_layout)
    elif selection == "topk":
        launch(MODE_TOPK)
    elif selection == "global":
        cut = _global_cut(launch, B * H, n_rt, threshold, dev)
        launch(MODE_GLOBAL_SELECT, *cut)
    else:
        raise ValueError(f"unknown selection {selection!r}")

    total_keys = block_size.sum().to(torch.float32)
    density = sel_tokens.sum() / (total_keys * (B * H * Sq))
    if not tile_layout:
        return RouterOutput(row_select, None, None, density, None)
    # per query tile: OR of the router tiles it holds, blocks expanded to key tiles
    n_qt = triton.cdiv(Sq, q_tile)
    r = q_tile // block_m
    u = union
    if n_qt * r > n_rt:
        u = torch.nn.functional.pad(u, (0, 0, 0, n_qt * r - n_rt))
    block_union = u.view(B, H, n_qt, r, NB_PAD).amax(3)[..., :NB].bool()
    kv_count, kv_index = compact_tiles(block_union, kv_tile_group)
    tile_density = kv_count.sum().to(torch.float32) / float(B * H * n_qt * n_kt)
    return RouterOutput(row_select, kv_count, kv_index, density, tile_density)


def _global_cut(launch, BH: int, n_rt: int, threshold: float, dev):
    """Per-(sample, head) min, denominator and cut value of the global rule (device tensors)."""
    mm = torch.empty(BH, n_rt, 3, device=dev, dtype=torch.float32)
    launch(MODE_GLOBAL_MINMAX, partial=mm)
    g_min = mm[..., 0].amin(1).contiguous()
    g_den = mm[..., 1].amax(1) - g_min
    g_den = torch.where(g_den <= EPS, torch.ones_like(g_den), g_den).contiguous()
    # largest normalised gate of an "other" pair: the cut never goes above it (>= 1 pair taken)
    top = ((mm[..., 2].amax(1) - g_min) / g_den).clamp(min=0.0)
    n = GLOBAL_CANDIDATES
    lo = torch.zeros(BH, device=dev, dtype=torch.float32)
    step = (top / (n - 1)).contiguous()  # candidates lo + step * j, j = 0 .. n-1 (both ends)
    partial = torch.empty(BH, n_rt, n + 2, device=dev, dtype=torch.float32)
    select_all = None
    for p in range(GLOBAL_PASSES):
        launch(MODE_GLOBAL_SUMS, g_min, g_den, lo, step, partial)
        sums = partial.sum(1)  # [BH, 2 + n]
        own, total = sums[:, 0], sums[:, 1]
        remain = (threshold - own / (total + EPS)).clamp(min=0.0)
        ok = sums[:, 2:] / (total + EPS)[:, None] >= remain[:, None]  # monotone: True then False
        n_ok = ok.sum(1)
        jstar = (n_ok - 1).clamp(min=0)
        if p == 0:
            select_all = n_ok == 0  # even all other pairs together do not reach the share
            at_top = n_ok == n  # the top pair alone reaches it: the cut is the top value
            lo = torch.where(at_top, top, lo + step * jstar)
            step = torch.where(at_top, torch.zeros_like(step), step / (n - 1))
        else:
            lo = lo + step * jstar
            step = step / (n - 1)
        lo, step = lo.contiguous(), step.contiguous()
    cut = torch.where(select_all, torch.full_like(lo, -1.0), lo).contiguous()
    return g_min, g_den, cut


# ----------------------------------------------------------------------------------------------
# query-tile router (VMoBA granularity="query_tile"): one selection per (sample, head, query tile)
# ----------------------------------------------------------------------------------------------
# Modes of ``_tile_route_kernel`` (the gate comes from token_gate before it). THRESHOLD / TOPK: one launch
# does rule and layout. The global rule needs per-(sample, head) reductions over all (tile, block)
# pairs, so it runs as GATE (partial min/max of the gate), TILE_GLOBAL_PASSES x PASS (partial sums at candidate
# cuts) and SELECT (rule + layout); every launch re-derives the head's state from the stored
# partials in a fixed order (deterministic, no torch glue, no host sync).
TILE_THRESHOLD = 0
TILE_TOPK = 1
TILE_GATE = 2
TILE_PASS = 3
TILE_SELECT = 4


def _tile_route_shape(nb_pad: int):
    """(query tiles per program, warps) for the tile route kernel: about 8 elements of a [tiles, NB_PAD]
    tensor per thread. Compiled for sm_90 (Triton 3.9's ptxas) that needs 50-135 registers and spills
    nothing from 16 to 1024 blocks, where 16 elements per thread took 250+ registers or spilled (e.g. 512
    blocks: 4 tiles x 8 warps 79 registers; 16 x 16 spilled 240 B; 16 x 8 with the old on-chip gate 272 B)."""
    tiles = max(2, min(16, 2048 // nb_pad))
    return tiles, 8 if tiles * nb_pad >= 2048 else 4


TILE_DIGIT = 5  # bits of the global cut decided per pass (32 candidate cuts)
TILE_NCAND = 1 << TILE_DIGIT
TILE_CUT_BITS = 30  # min-max normalised gates lie in [0, 1] (< 2.0): their fp32 bit patterns use bits 29..0
TILE_GLOBAL_PASSES = -(-TILE_CUT_BITS // TILE_DIGIT)
TILE_REC = TILE_NCAND + 3  # per-program partial record: [total, own, top, sums at the candidates...]


@triton.jit
def _store_block_tiles(idx_base, sel, first, start, tc, max_tc):
    """Write the key tiles of the blocks ``sel [R, NB_PAD]`` selects into ``idx_base [R, 1]`` (one query tile's
    ``kv_index`` row each), block after block in increasing order from slot ``first [R]`` on; block ``c`` owns tiles
    ``start[c] .. start[c] + tc[c] - 1`` (``max_tc`` = the largest ``tc``). Returns the tiles written per row."""
    ntile = tl.where(sel, tc[None, :], 0)
    dst = first[:, None] + tl.cumsum(ntile, axis=1) - ntile  # selected tiles of lower blocks come first
    for l in range(0, max_tc):
        tl.store(idx_base + dst + l, start[None, :] + l, mask=sel & (l < tc[None, :]))
    return tl.sum(ntile, axis=1)


@triton.jit
def _store_query_tile_tiles(KV_INDEX, row, n_kt, sel, first, start, tc, max_tc):
    """:func:`_store_block_tiles` for the one query tile ``row`` of ``kv_index`` (``[rows, n_kt]``): ``sel
    [NB_PAD]``, ``first`` a ``[1]`` tensor; returns the tiles written as ``[1]``."""
    return _store_block_tiles(KV_INDEX + row * n_kt + tl.zeros([1, 1], dtype=tl.int64), sel[None, :], first, start,
                              tc, max_tc)


@triton.jit
def _or(a, b):
    return a | b


@triton.jit
def _and(a, b):
    return a & b


@triton.jit
def _sorted_layout_kernel(RS, TILE_START, TILE_COUNT, KV_COUNT, KV_INDEX, KV_FULL, Sq, NB, n_qt, n_kt, max_tc,
                          Q_TILE: tl.constexpr, NB_PAD: tl.constexpr):
    # The query-tile layout of one query tile of one (sample, head) from its rows' selection words (RS [B*H, Sq], one
    # int32 word per row: at most 32 blocks): the blocks every row selected first (their tiles counted in KV_FULL),
    # then the other blocks of the union, each part in increasing order; entries past KV_COUNT are not written.
    qt = tl.program_id(0)
    bh = tl.program_id(1)
    rows = qt * Q_TILE + tl.arange(0, Q_TILE)
    ok = rows < Sq
    words = tl.load(RS + bh.to(tl.int64) * Sq + rows, mask=ok, other=0)
    union = tl.reduce(words, 0, _or)
    full = tl.reduce(tl.where(ok, words, -1), 0, _and)  # rows past Sq select everything: never make a block partial
    cols = tl.arange(0, NB_PAD)
    c_ok = cols < NB
    in_union = (((union >> cols) & 1) != 0) & c_ok
    in_full = (((full >> cols) & 1) != 0) & in_union
    tc = tl.load(TILE_COUNT + cols, mask=c_ok, other=0)
    start = tl.load(TILE_START + cols, mask=c_ok, other=0)
    row = (bh * n_qt + qt).to(tl.int64)
    n_full = _store_query_tile_tiles(KV_INDEX, row, n_kt, in_full, tl.zeros([1], dtype=tl.int32), start, tc, max_tc)
    n_part = _store_query_tile_tiles(KV_INDEX, row, n_kt, in_union & ~in_full, n_full, start, tc, max_tc)
    one = tl.arange(0, 1)
    tl.store(KV_FULL + row + one, n_full)
    tl.store(KV_COUNT + row + one, n_full + n_part)


def sorted_tile_layout(words: torch.Tensor, block_tile_start: torch.Tensor, block_tile_count: torch.Tensor,
                       num_kv_tiles: int, max_block_tiles: int, q_tile: int):
    """``(kv_count, kv_index, kv_full)`` of rows whose selection is one int32 word each (``words [B, H, Sq, 1]``, at
    most 32 blocks; VMoBA's sorted 1D path): what :func:`mixdit.kernels.router_reference.tile_layout_from_selection`
    with ``full_first=True`` returns (identical counts and ``kv_index[..., :kv_count]``; entries past the count are
    left unwritten, as the layout contract allows), in one Triton launch instead of ~25 PyTorch ops."""
    B, H, Sq, W = words.shape
    NB = block_tile_start.numel()
    if W != 1 or NB > 32:
        raise ValueError(f"sorted_tile_layout takes one selection word per row (<= 32 blocks), got {W} words and "
                         f"{NB} blocks")
    n_qt = triton.cdiv(Sq, q_tile)
    dev = words.device
    kv_count = torch.empty(B, H, n_qt, device=dev, dtype=torch.int32)
    kv_full = torch.empty(B, H, n_qt, device=dev, dtype=torch.int32)
    kv_index = torch.empty(B, H, n_qt, num_kv_tiles, device=dev, dtype=torch.int32)
    _sorted_layout_kernel[(n_qt, B * H)](words.contiguous(), block_tile_start, block_tile_count, kv_count, kv_index,
                                         kv_full, Sq, NB, n_qt, num_kv_tiles, int(max_block_tiles), Q_TILE=q_tile,
                                         NB_PAD=32, num_warps=1)
    return kv_count, kv_index, kv_full


@triton.jit
def _tile_query_means_kernel(Q, QMEAN, stride_qb, stride_qs, stride_qh, stride_qd, Sq, H, n_qt,
                             D: tl.constexpr, D_PAD: tl.constexpr, Q_TILE: tl.constexpr, ROWS: tl.constexpr):
    # fp32 mean query of one (sample, head, query tile): QMEAN [B*H, n_qt, D_PAD] (zeros past D).
    # Heads vary fastest across programs (programs running together read whole [rows, H*D] spans); on the
    # H200 it measured the same as tiles fastest (78 vs 79 us at Wan-1.3B, B = 2).
    bh = tl.program_id(0)
    qt = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_d = tl.arange(0, D_PAD)
    base = Q + b.to(tl.int64) * stride_qb + h * stride_qh
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    for r0 in tl.static_range(0, Q_TILE, ROWS):
        rows = qt * Q_TILE + r0 + tl.arange(0, ROWS)
        ptrs = base + rows.to(tl.int64)[:, None] * stride_qs + offs_d[None, :] * stride_qd
        x = tl.load(ptrs, mask=(rows[:, None] < Sq) & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    n = tl.minimum(Sq - qt * Q_TILE, Q_TILE).to(tl.float32)
    tl.store(QMEAN + (bh.to(tl.int64) * n_qt + qt) * D_PAD + offs_d, tl.math.div_rn(acc, n + tl.zeros_like(acc)))


@triton.jit
def _tile_global_state(PART, bh, BH, n_grp, npass, threshold,
                       GRP_PAD: tl.constexpr, NCAND: tl.constexpr, DIGIT: tl.constexpr, REC: tl.constexpr):
    # Head state of the global rule from the partial records of the finished launches: min,
    # denominator, total + eps, remain and the cut found so far (a bit-pattern prefix). If even all
    # other pairs miss the share, no candidate passes and the cut stays 0: every other pair is taken.
    g = tl.arange(0, GRP_PAD)
    g_ok = g < n_grp
    stride_pass = BH * n_grp * REC
    rec0 = PART + (bh * n_grp + g) * REC
    mn = tl.min(tl.load(rec0, mask=g_ok, other=float("inf")), axis=0)
    mx = tl.max(tl.load(rec0 + 1, mask=g_ok, other=float("-inf")), axis=0)
    den = mx - mn
    den = tl.where(den <= 1e-6, 1.0, den)
    rec1 = rec0 + stride_pass
    g1 = g_ok & ((g * 0 + npass) >= 1)  # pass-1 records exist (a tensor mask)
    total = tl.sum(tl.load(rec1, mask=g1, other=0.0), axis=0)
    own = tl.sum(tl.load(rec1 + 1, mask=g1, other=0.0), axis=0)
    top = tl.max(tl.load(rec1 + 2, mask=g1, other=-1.0), axis=0)
    top_bits = top.to(tl.int32, bitcast=True)  # -1.0 (no other pair) is negative as int too
    te = total + 1e-6
    remain = tl.maximum(threshold - tl.math.div_rn(own, te), 0.0)
    j = tl.arange(0, NCAND)
    prefix = tl.zeros([], dtype=tl.int32)
    for p in range(1, npass + 1):
        recp = PART + p * stride_pass + (bh * n_grp + g)[:, None] * REC + 3 + j[None, :]
        sums = tl.sum(tl.load(recp, mask=g_ok[:, None], other=0.0), axis=0)  # fixed order: deterministic
        shift = 30 - p * DIGIT  # 30 = TILE_CUT_BITS: pass p decides bits 29 - (p-1)*DIGIT .. shift
        cand = prefix + (j << shift)
        ok = (tl.math.div_rn(sums, te + tl.zeros_like(sums)) >= remain) & (cand <= top_bits)
        n_ok = tl.sum(ok.to(tl.int32), axis=0)  # ok is monotone in the candidate: True ... False
        prefix = prefix + (tl.maximum(n_ok - 1, 0) << shift)
    return mn, den, te, remain, prefix


@triton.jit
def _tile_route_kernel(GATE, Q_BLOCK, BLOCK_SIZE, TILE_START, TILE_COUNT, PART,
                       KV_COUNT, KV_INDEX, STATS,
                       Sq, NB, n_qt, n_kt, n_grp, BH, max_tc, npass, threshold, inv_keys, inv_tiles,
                       MODE: tl.constexpr, TOPK: tl.constexpr, NB_PAD: tl.constexpr, TM: tl.constexpr,
                       Q_TILE: tl.constexpr, GRP_PAD: tl.constexpr, NCAND: tl.constexpr, DIGIT: tl.constexpr,
                       REC: tl.constexpr, EARLY_EXIT: tl.constexpr):
    # GATE [B*H, n_qt, NB_PAD] fp32: mean query . block key means (one batched matmul before this launch)
    grp = tl.program_id(0)
    bh = tl.program_id(1)
    tiles = grp * TM + tl.arange(0, TM)
    t_ok = tiles < n_qt
    cols = tl.arange(0, NB_PAD)
    c_ok = cols < NB
    valid = t_ok[:, None] & c_ok[None, :]
    # own blocks of a tile: q_block is non-decreasing with no gaps, so they are the range of the
    # blocks of its first and last query (the reference marks q_block of every query)
    first = tiles * Q_TILE
    last = tl.minimum(first + Q_TILE, Sq) - 1
    lo = tl.load(Q_BLOCK + first, mask=t_ok, other=0)
    hi = tl.load(Q_BLOCK + last, mask=t_ok, other=-1)
    is_own = valid & (cols[None, :] >= lo[:, None]) & (cols[None, :] <= hi[:, None])
    oth = valid & ~is_own
    row_off = (bh.to(tl.int64) * n_qt + tiles)  # [TM] row of (b, h, tile)

    s = tl.load(GATE + row_off[:, None] * NB_PAD + cols[None, :], mask=valid, other=0.0)

    if MODE == 2:  # global, launch 1: partial min / max
        rec = PART + (bh * n_grp + grp) * REC
        tl.store(rec, tl.min(tl.min(tl.where(valid, s, float("inf")), axis=1), axis=0))
        tl.store(rec + 1, tl.max(tl.max(tl.where(valid, s, float("-inf")), axis=1), axis=0))
        return

    if MODE == 1:  # top-k: the k largest of (own = +inf, others = gate); ties -> lower block index
        work = tl.where(is_own, float("inf"), tl.where(valid, s, float("-inf")))
        sel = is_own
        for _ in tl.static_range(TOPK):
            pick = cols[None, :] == tl.argmax(work, axis=1, tie_break_left=True)[:, None]
            sel = sel | pick
            work = tl.where(pick, float("-inf"), work)
    elif MODE == 0:  # threshold, per tile row
        sel = _threshold_rule(s, valid, is_own, threshold, TM, EARLY_EXIT)
    else:  # global (MODE 3: partial sums at the next candidates; MODE 4: select)
        mn, den, te, remain, prefix = _tile_global_state(PART, bh, BH, n_grp, npass, threshold,
                                                         GRP_PAD, NCAND, DIGIT, REC)
        norm = tl.where(valid, tl.math.div_rn(s - mn, den + tl.zeros_like(s)), 0.0)
        bits = norm.to(tl.int32, bitcast=True)
        if MODE == 3:
            p = npass + 1
            rec = PART + p * (BH * n_grp * REC) + (bh * n_grp + grp) * REC
            if p == 1:
                tl.store(rec, tl.sum(tl.sum(norm, axis=1), axis=0))
                tl.store(rec + 1, tl.sum(tl.sum(tl.where(is_own, norm, 0.0), axis=1), axis=0))
                tl.store(rec + 2, tl.max(tl.max(tl.where(oth, norm, -1.0), axis=1), axis=0))
            shift = 30 - p * DIGIT
            for jj in tl.static_range(NCAND):
                take = oth & (bits >= prefix + (jj << shift))
                tl.store(rec + 3 + jj, tl.sum(tl.sum(tl.where(take, norm, 0.0), axis=1), axis=0))
            return
        sel = is_own | (oth & (bits >= prefix))

    # ---- layout: the tiles of the selected blocks in increasing order (the first kv_count entries of
    # the reference's stable argsort; the entries past the count are not written: the kernels never
    # read them); blocks own contiguous tile ranges in block order ----
    sel = sel & valid
    tc = tl.load(TILE_COUNT + cols, mask=c_ok, other=0)
    start = tl.load(TILE_START + cols, mask=c_ok, other=0)
    count = _store_block_tiles(KV_INDEX + row_off[:, None] * n_kt, sel, tl.zeros([TM], dtype=tl.int32), start, tc,
                               max_tc)
    tl.store(KV_COUNT + row_off, count, mask=t_ok)
    # statistics per tile: selected keys x query rows, and visited tiles, pre-scaled (summed by the launcher)
    bsize = tl.load(BLOCK_SIZE + cols, mask=c_ok, other=0)
    keys = tl.sum(tl.where(sel, bsize[None, :], 0), axis=1).to(tl.float32)
    rows_in = tl.minimum(Sq - first, Q_TILE).to(tl.float32)
    tl.store(STATS + row_off * 2, keys * rows_in * inv_keys, mask=t_ok)
    tl.store(STATS + row_off * 2 + 1, count.to(tl.float32) * inv_tiles, mask=t_ok)


def route_query_tiles_fused(q: torch.Tensor, k: torch.Tensor, *, q_block: torch.Tensor, block_size: torch.Tensor,
                            block_tile_start: torch.Tensor, block_tile_count: torch.Tensor,
                            kv_tile_len: torch.Tensor, max_block_tiles: int, selection: str = "threshold",
                            threshold: float = 0.25, topk: int = 3, q_tile: int = 128,
                            kv_tile: int = 128) -> RouterOutput:
    """VMoBA ``granularity="query_tile"`` router: one block selection per (sample, head, query tile)
    from the tile's mean query, own blocks (every block the tile overlaps) always kept.

    Same inputs as :func:`route_blocks` (``q_block`` must be non-decreasing with no gaps, as VMoBA's
    block order gives); ``max_block_tiles`` = the largest ``block_tile_count`` (static, from the
    block shape: no host sync). Returns ``row_select=None`` and the layout of
    :func:`mixdit.attention.vmoba.route_query_tiles_reference`: identical ``kv_count`` and
    ``kv_index[..., :kv_count]`` (the selected tiles ascending); entries past the count are left
    unwritten, as the layout contract allows (the kernels never read them).

    CUDA kernels per call (threshold / top-k: 6): the zero fill and kernel of
    :func:`block_key_means`, tile mean queries, the gate (:func:`token_gate`), one route kernel (global: a
    min/max launch, ``TILE_GLOBAL_PASSES`` search launches and a select launch instead, 13 in all),
    one ``sum`` for the statistics.

    The gate (mean query . block key means, [B*H, query tiles, blocks]) is one fp32 batched matmul
    (``torch.bmm``, like the reference's ``einsum``): on chip it cost the route kernel more than the rule, and
    :func:`token_gate` (the per-token rule's gate) made this router ~2x slower at Wan-1.3B (its launch walks the
    blocks per 128-row tile: 24 programs for 256 tile means x 12 heads; session 11).

    Ties (scores are fp32): threshold / global take every other block (pair) equal to the cut
    value, like the reference's ``flat >= cut_value``; top-k keeps the lower block index among
    equal scores (the reference's stable descending sort). Sums are taken in a different order
    than PyTorch's, so a selection can differ only where the reference's decision is within fp32
    rounding of a tie of the cumulative share and ``remain``.
    """
    B, Sq, H, D = q.shape
    NB = block_size.numel()
    n_kt = kv_tile_len.numel()
    BH = B * H
    dev = q.device
    NB_PAD = max(16, _next_pow2(NB))
    D_PAD = max(16, _next_pow2(D))
    TM, num_warps = _tile_route_shape(NB_PAD)
    n_qt = triton.cdiv(Sq, q_tile)
    n_grp = triton.cdiv(n_qt, TM)
    threshold = 2.0 if threshold >= 1.0 else float(threshold)  # tau >= 1: every block (see route_blocks)

    means_t = block_key_means(k, block_tile_start, block_tile_count, kv_tile_len, block_size, kv_tile, NB_PAD,
                              max_block_tiles)
    qmean = torch.empty(BH, n_qt, D_PAD, device=dev, dtype=torch.float32)
    _tile_query_means_kernel[(BH, n_qt)](
        q, qmean, q.stride(0), q.stride(1), q.stride(2), q.stride(3), Sq, H, n_qt,
        D=D, D_PAD=D_PAD, Q_TILE=q_tile, ROWS=min(q_tile, max(16, 8192 // D_PAD)), num_warps=4)
    # [B*H, n_qt, NB_PAD], zero past the real blocks: fp32-accurate on tensor cores (3xTF32) whatever the caller's
    # TF32 flag says, without touching that process-wide flag (a cuBLAS fp32 bmm needed it off)
    gate = token_gate(qmean.view(B, H, n_qt, D_PAD).transpose(1, 2), means_t, NB_PAD, 0, BH)

    kv_count = torch.empty(B, H, n_qt, device=dev, dtype=torch.int32)
    kv_index = torch.empty(B, H, n_qt, n_kt, device=dev, dtype=torch.int32)
    stats = torch.empty(BH * n_qt, 2, device=dev, dtype=torch.float32)
    total_keys = float(Sq)  # every query is a key: the partition's blocks cover the sequence once
    inv_keys = 1.0 / (float(BH * Sq) * total_keys)
    inv_tiles = 1.0 / float(BH * n_qt * n_kt)
    part = stats  # placeholder when unused
    if selection == "global":
        part = torch.empty(TILE_GLOBAL_PASSES + 1, BH, n_grp, TILE_REC, device=dev, dtype=torch.float32)

    def launch(mode, npass=0):
        _tile_route_kernel[(n_grp, BH)](
            gate, q_block, block_size, block_tile_start, block_tile_count, part,
            kv_count, kv_index, stats,
            Sq, NB, n_qt, n_kt, n_grp, BH, int(max_block_tiles), npass, threshold, inv_keys, inv_tiles,
            MODE=mode, TOPK=max(1, min(int(topk), NB)), NB_PAD=NB_PAD, TM=TM, Q_TILE=q_tile,
            GRP_PAD=max(2, _next_pow2(n_grp)), NCAND=TILE_NCAND, DIGIT=TILE_DIGIT, REC=TILE_REC,
            EARLY_EXIT=_rule_first_check(NB_PAD), num_warps=num_warps)

    if selection == "threshold":
        launch(TILE_THRESHOLD)
    elif selection == "topk":
        launch(TILE_TOPK)
    elif selection == "global":
        launch(TILE_GATE)
        for p in range(TILE_GLOBAL_PASSES):
            launch(TILE_PASS, npass=p)
        launch(TILE_SELECT, npass=TILE_GLOBAL_PASSES)
    else:
        raise ValueError(f"unknown selection {selection!r}")
    sums = stats.sum(0)
    return RouterOutput(None, kv_count, kv_index, sums[0], sums[1])
