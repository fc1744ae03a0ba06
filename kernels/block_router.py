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
2. ``_route_kernel``: for a tile of ``BLOCK_M`` query rows of one (sample, head) it computes the
   gate ``q . mean`` against every block on chip (``[BLOCK_M, NB_PAD]`` fp32 in registers, never in
   memory) and selects blocks per row:

   * threshold: min-max normalise over the blocks, ``remain = max(tau - own/(sum+eps), 0)``,
     then the cut value ``c`` such that the other blocks with ``norm >= c`` are the shortest
     descending prefix whose share reaches ``remain``: found by bisection on ``c`` (the share is
     monotone in ``c``), ``BISECT`` steps of a masked row sum (no sort needed);
   * top-k: own block plus the ``k - 1`` best others (iterated row max);
   * global: the same threshold rule per (sample, head) over all (query, block) pairs: a
     min/max pass, then ``GLOBAL_PASSES`` passes of a 16-way search for the cut value (each pass
     sums, per program, the normalised values above 16 candidate cuts; a tiny torch reduction
     narrows the interval 16x), then the selection pass. Nothing is sorted or materialised.

   Outputs per row: the bitmask ``row_select [B, H, Sq, W]`` (bit ``c`` of word ``c // 32``),
   per program the union of the selected blocks (int8, later OR-ed per query tile and expanded
   to key tiles) and the number of selected key tokens (for the density statistic).

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

MODE_THRESHOLD = 0
MODE_TOPK = 1
MODE_GLOBAL_SELECT = 2
MODE_GLOBAL_MINMAX = 3
MODE_GLOBAL_SUMS = 4

GLOBAL_CANDIDATES = 16  # candidates per global search pass
GLOBAL_PASSES = 7  # 15**-7 ~ 6e-9 resolution on the normalised cut value
BISECT_STEPS = 26  # threshold bisection steps on [0, top] (2**-26 < fp32 resolution near 1)


@triton.jit
def _block_means_kernel(K, MEANS_T, TILE_START, TILE_COUNT, TILE_LEN, BLOCK_SIZE,
                        stride_kb, stride_ks, stride_kh, stride_kd, H, NB_PAD,
                        D: tl.constexpr, D_PAD: tl.constexpr, KV_TILE: tl.constexpr):
    blk = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    t0 = tl.load(TILE_START + blk)
    tc = tl.load(TILE_COUNT + blk)
    offs_r = tl.arange(0, KV_TILE)
    offs_d = tl.arange(0, D_PAD)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    base = K + b.to(tl.int64) * stride_kb + h * stride_kh
    for t in range(t0, t0 + tc):
        ln = tl.load(TILE_LEN + t)
        rows = (offs_r + t * KV_TILE).to(tl.int64)
        ptrs = base + rows[:, None] * stride_ks + offs_d[None, :] * stride_kd
        x = tl.load(ptrs, mask=(offs_r[:, None] < ln) & (offs_d[None, :] < D), other=0.0)
        acc += tl.sum(x.to(tl.float32), axis=0)
    n = tl.load(BLOCK_SIZE + blk).to(tl.float32)
    tl.store(MEANS_T + bh.to(tl.int64) * D_PAD * NB_PAD + offs_d * NB_PAD + blk, acc / n)


@triton.jit
def _row_share(others, is_other, cut, total):
    # share of the other blocks whose normalised gate is >= cut (per row)
    take = is_other & (others >= cut[:, None])
    return tl.sum(tl.where(take, others, 0.0), axis=1) / (total + 1e-6)


@triton.jit
def _route_kernel(Q, MEANS_T, Q_BLOCK, BLOCK_SIZE, ROW_SELECT, UNION, SEL_TOKENS,
                  G_MIN, G_DEN, G_LO, G_STEP, PARTIAL,
                  stride_qb, stride_qs, stride_qh, stride_qd,
                  Sq, H, NB, n_rt, threshold,
                  MODE: tl.constexpr, TOPK: tl.constexpr, NB_PAD: tl.constexpr, W: tl.constexpr,
                  D: tl.constexpr, D_PAD: tl.constexpr, D_CHUNK: tl.constexpr, BLOCK_M: tl.constexpr,
                  BISECT: tl.constexpr, NCAND: tl.constexpr, PRECISION: tl.constexpr):
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
    elif MODE == 0:  # threshold per query token and head
        mx = tl.max(tl.where(col_ok[None, :], s, float("-inf")), axis=1)
        mn = tl.min(tl.where(col_ok[None, :], s, float("inf")), axis=1)
        den = mx - mn
        den = tl.where(den <= 1e-6, 1.0, den)
        norm = tl.where(col_ok[None, :], (s - mn[:, None]) / den[:, None], 0.0)
        total = tl.sum(norm, axis=1)
        own_n = tl.sum(tl.where(is_own, norm, 0.0), axis=1)
        remain = tl.maximum(threshold - own_n / (total + 1e-6), 0.0)
        others = tl.where(is_other, norm, -2.0)
        top = tl.max(others, axis=1)
        lo = tl.zeros([BLOCK_M], dtype=tl.float32)
        hi = top
        for _ in tl.static_range(BISECT):
            mid = (lo + hi) * 0.5
            ok = _row_share(others, is_other, mid, total) >= remain
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        r_top = _row_share(others, is_other, top, total)
        r_zero = _row_share(others, is_other, tl.zeros([BLOCK_M], dtype=tl.float32), total)
        cut = tl.where(r_top >= remain, top, tl.where(r_zero >= remain, lo, -1.0))
        sel = is_own | (is_other & (others >= cut[:, None]))
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

    # ---- outputs: per-row bitmask, per-program block union, selected key tokens ----
    sel = sel & row_ok[:, None]
    shifted = sel.to(tl.int32) << (cols % 32)[None, :]
    words = tl.sum(tl.reshape(shifted, [BLOCK_M, W, 32]), axis=2)
    wcols = tl.arange(0, W)
    rs_ptr = ROW_SELECT + ((bh.to(tl.int64) * Sq + rows[:, None]) * W + wcols[None, :])
    tl.store(rs_ptr, words, mask=row_ok[:, None])
    union = tl.max(sel.to(tl.int32), axis=0)
    tl.store(UNION + (bh.to(tl.int64) * n_rt + rt) * NB_PAD + cols, union.to(tl.int8))
    bsize = tl.load(BLOCK_SIZE + cols, mask=col_ok, other=0).to(tl.float32)
    ntok = tl.sum(tl.sum(tl.where(sel, bsize[None, :], 0.0), axis=1), axis=0)
    tl.store(SEL_TOKENS + bh.to(tl.int64) * n_rt + rt, ntok)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@dataclass
class RouterOutput:
    """Selection in the block-sparse kernel's layout (see :mod:`mixdit.kernels.reference`)."""

    row_select: torch.Tensor  # [B, H, Sq, W] int32 bitmask over blocks
    kv_count: torch.Tensor  # [B, H, n_qt] int32
    kv_index: torch.Tensor  # [B, H, n_qt, n_kv_tiles] int32
    density: torch.Tensor  # 0-d float32: selected key tokens / all key tokens (mean over b, h, rows)
    tile_density: torch.Tensor  # 0-d float32: visited key tiles / all key tiles (what is computed)


def block_key_means(k: torch.Tensor, block_tile_start: torch.Tensor, block_tile_count: torch.Tensor,
                    kv_tile_len: torch.Tensor, block_size: torch.Tensor, kv_tile: int,
                    nb_pad: int | None = None) -> torch.Tensor:
    """Transposed fp32 block key means ``[B*H, D_PAD, NB_PAD]`` (zero padding) of padded ``k``."""
    B, _, H, D = k.shape
    NB = block_tile_start.numel()
    NB_PAD = nb_pad or max(32, _next_pow2(NB))
    D_PAD = max(16, _next_pow2(D))
    means_t = torch.zeros(B * H, D_PAD, NB_PAD, device=k.device, dtype=torch.float32)
    _block_means_kernel[(NB, B * H)](
        k, means_t, block_tile_start, block_tile_count, kv_tile_len, block_size,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3), H, NB_PAD,
        D=D, D_PAD=D_PAD, KV_TILE=kv_tile, num_warps=4)
    return means_t


def route_blocks(q: torch.Tensor, k: torch.Tensor, *, q_block: torch.Tensor, block_size: torch.Tensor,
                 block_tile_start: torch.Tensor, block_tile_count: torch.Tensor, kv_tile_len: torch.Tensor,
                 kv_tile_group: torch.Tensor, selection: str = "threshold", threshold: float = 0.25,
                 topk: int = 3, q_tile: int = 128, kv_tile: int = 128, precision: str = "tf32x3",
                 block_m: int | None = None) -> RouterOutput:
    """Select VMoBA blocks for every query row and head; return the block-sparse layout.

    ``q`` ``[B, Sq, H, D]`` (block order), ``k`` ``[B, Sk_pad, H, D]`` (padded block layout).
    ``selection``: ``"threshold"`` (per query token and head), ``"topk"`` or ``"global"`` (per
    sample and head over all pairs). ``precision``: ``tl.dot`` input precision of the fp32 gate
    (``"ieee"`` exact, ``"tf32x3"`` ~fp32 on tensor cores, ``"tf32"`` fastest/least exact).
    """
    B, Sq, H, D = q.shape
    NB = block_size.numel()
    n_kt = kv_tile_group.numel()
    NB_PAD = max(32, _next_pow2(NB))
    W = NB_PAD // 32
    D_PAD = max(16, _next_pow2(D))
    if block_m is None:
        block_m = max(16, min(64, 8192 // NB_PAD))
    if q_tile % block_m:
        block_m = 16
    assert q_tile % block_m == 0, "q_tile must be a multiple of 16"
    D_CHUNK = min(D_PAD, max(16, 8192 // NB_PAD))
    if precision == "ieee" or os.environ.get("TRITON_INTERPRET") == "1":
        precision = "ieee"
    n_rt = triton.cdiv(Sq, block_m)
    dev = q.device
    # tau >= 1 means "cover the whole mass": every block. (With the reference's +1e-6 in fp32 the
    # share of the others can round onto the target and drop the minimum block; 2.0 avoids that.)
    threshold = 2.0 if threshold >= 1.0 else float(threshold)
    means_t = block_key_means(k, block_tile_start, block_tile_count, kv_tile_len, block_size, kv_tile, NB_PAD)

    row_select = torch.empty(B, H, Sq, W, device=dev, dtype=torch.int32)
    union = torch.empty(B * H, n_rt, NB_PAD, device=dev, dtype=torch.int8)
    sel_tokens = torch.empty(B * H, n_rt, device=dev, dtype=torch.float32)
    dummy = torch.zeros(1, device=dev, dtype=torch.float32)
    num_warps = 4 if NB_PAD * block_m < 8192 else 8
    grid = (n_rt, B * H)

    def launch(mode, g_min=dummy, g_den=dummy, g_lo=dummy, g_step=dummy, partial=dummy):
        _route_kernel[grid](
            q, means_t, q_block, block_size, row_select, union, sel_tokens,
            g_min, g_den, g_lo, g_step, partial,
            q.stride(0), q.stride(1), q.stride(2), q.stride(3),
            Sq, H, NB, n_rt, float(threshold),
            MODE=mode, TOPK=max(1, min(int(topk), NB)), NB_PAD=NB_PAD, W=W, D=D, D_PAD=D_PAD,
            D_CHUNK=D_CHUNK, BLOCK_M=block_m, BISECT=BISECT_STEPS, NCAND=GLOBAL_CANDIDATES,
            PRECISION=precision, num_warps=num_warps)

    if selection == "threshold":
        launch(MODE_THRESHOLD)
    elif selection == "topk":
        launch(MODE_TOPK)
    elif selection == "global":
        cut = _global_cut(launch, B * H, n_rt, threshold, dev)
        launch(MODE_GLOBAL_SELECT, *cut)
    else:
        raise ValueError(f"unknown selection {selection!r}")

    # per query tile: OR of the router tiles it holds, blocks expanded to key tiles
    n_qt = triton.cdiv(Sq, q_tile)
    r = q_tile // block_m
    u = union
    if n_qt * r > n_rt:
        u = torch.nn.functional.pad(u, (0, 0, 0, n_qt * r - n_rt))
    block_union = u.view(B, H, n_qt, r, NB_PAD).amax(3)[..., :NB].bool()
    kv_count, kv_index = compact_tiles(block_union, kv_tile_group)
    total_keys = block_size.sum().to(torch.float32)
    density = sel_tokens.sum() / (total_keys * (B * H * Sq))
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
