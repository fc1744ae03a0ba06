"""Fused VMoBA router (Triton; CPU interpreter here) vs the naive reference."""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mixdit.attention.vmoba import VMoBAConfig, partition_for_layer  # noqa: E402
from mixdit.kernels import router_reference as rr  # noqa: E402
from mixdit.kernels.block_router import route_blocks  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
GRID = (5, 5, 7)  # divides none of the block shapes below
CFG = VMoBAConfig(temporal_block=2, spatial_block=(2, 3), spatiotemporal_block=(2, 2, 3),
                  topk_temporal=2, topk_spatial=3, topk_spatiotemporal=4, kv_tile=16, q_tile=64,
                  min_tokens=0, dense_layers=())
TIE = 1e-5


def _inputs(layer, B=2, H=2, D=32, seed=0, dtype=torch.float32):
    part = partition_for_layer(GRID, layer, CFG, DEV)
    g = torch.Generator().manual_seed(seed)
    S = GRID[0] * GRID[1] * GRID[2]
    q = torch.randn(B, S, H, D, generator=g).to(DEV, dtype)
    k = torch.randn(B, S, H, D, generator=g).to(DEV, dtype)
    return part, q, k


def _route(part, q, k, selection, threshold=0.25, topk=3):
    qb = q[:, part.q_perm].contiguous()
    kb = k[:, part.kv_perm].contiguous()
    return route_blocks(qb, kb, q_block=part.q_block, block_size=part.block_size,
                        block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
                        kv_tile_len=part.kv_tile_len, kv_tile_group=part.kv_tile_group, selection=selection,
                        threshold=threshold, topk=topk, q_tile=CFG.q_tile, kv_tile=part.kv_tile,
                        precision="ieee")


def _reference(part, q, k, selection, threshold=0.25, topk=3):
    qb = q[:, part.q_perm]
    kb = k[:, part.q_perm]  # block order, unpadded
    return rr.select_blocks_reference(qb.cpu(), kb.cpu(), part.q_block.cpu(), part.q_block.cpu(), part.num_blocks,
                                      selection=selection, threshold=threshold, topk=topk)


def _near_tie(part, q, k, selection, threshold, topk):
    """Boolean ``[B, H, Sq, C]``: entries whose decision sits within float noise of a tie."""
    qb, kb = q[:, part.q_perm].cpu(), k[:, part.q_perm].cpu()
    gate = rr.block_gate_reference(qb, kb, part.q_block.cpu(), part.num_blocks)  # fp64 [B,H,S,C]
    C = gate.shape[-1]
    own = torch.zeros(gate.shape[-2], C, dtype=torch.bool)
    own[torch.arange(gate.shape[-2]), part.q_block.long().cpu()] = True
    own = own.expand_as(gate)
    if selection == "topk":
        others = torch.where(own, torch.full_like(gate, -1e30), gate)
        srt = others.sort(-1, descending=True).values
        kk = min(topk, C) - 1
        if kk <= 0 or kk >= C - 1:
            return torch.zeros_like(own)
        gap = (srt[..., kk - 1] - srt[..., kk]).abs() < TIE * gate.abs().amax()
        return gap.unsqueeze(-1).expand_as(own)
    dims = (-1,) if selection == "threshold" else (-2, -1)
    mn, mx = gate.amin(dim=dims, keepdim=True), gate.amax(dim=dims, keepdim=True)
    norm = (gate - mn) / (mx - mn)
    total = norm.sum(dim=dims, keepdim=True)
    remain = (threshold - (norm * own).sum(dim=dims, keepdim=True) / (total + rr.EPS)).clamp(min=0)
    others = torch.where(own, torch.full_like(norm, -1.0), norm)
    flat = others.flatten(start_dim=others.dim() - len(dims))
    srt = flat.sort(-1, descending=True).values
    ratio = srt.clamp(min=0).cumsum(-1) / (total.flatten(start_dim=others.dim() - len(dims)) + rr.EPS)
    close_ratio = ((ratio - remain.flatten(start_dim=others.dim() - len(dims))).abs() < TIE).any(-1)
    close_vals = ((srt[..., :-1] - srt[..., 1:]).abs() < TIE).any(-1) if selection == "threshold" else \
        torch.zeros_like(close_ratio)
    amb = close_ratio | close_vals
    shape = list(own.shape[:others.dim() - len(dims)]) + [1] * len(dims)
    return amb.view(shape).expand_as(own)


@pytest.mark.parametrize("layer", [0, 1, 2], ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("selection", ["threshold", "topk", "global"])
def test_router_matches_reference(layer, selection):
    topk = CFG.topk_for(["temporal", "spatial", "spatiotemporal"][layer])
    for seed in (0, 1):
        part, q, k = _inputs(layer, seed=seed)
        r = _route(part, q, k, selection, topk=topk)
        got = rr.row_select_to_selection(r.row_select, part.num_blocks).cpu()
        ref = _reference(part, q, k, selection, topk=topk)
        diff = got != ref
        if diff.any():
            amb = _near_tie(part, q, k, selection, 0.25, topk)
            assert not (diff & ~amb).any(), f"{int((diff & ~amb).sum())} selections differ away from ties"
            assert diff.float().mean() < 0.01
        # own block always selected
        own = torch.zeros_like(got[0, 0])
        own[torch.arange(own.shape[0]), part.q_block.long().cpu()] = True
        assert got[:, :, own].all()
        # layout: per-query-tile union of the per-token selection, expanded to key tiles
        cnt, idx = rr.tile_layout_from_selection(got, part.kv_tile_group.cpu(), CFG.q_tile)
        assert torch.equal(r.kv_count.cpu(), cnt)
        for b, h, t in [(0, 0, 0), (1, 1, cnt.shape[-1] - 1)]:
            n = int(cnt[b, h, t])
            assert torch.equal(r.kv_index.cpu()[b, h, t, :n], idx[b, h, t, :n])
        assert abs(float(r.density) - float(rr.selected_key_fraction(got, part.block_size.cpu()))) < 1e-5


@pytest.mark.parametrize("layer", [1, 2], ids=["2d", "3d"])
def test_topk_count(layer):
    part, q, k = _inputs(layer, seed=3)
    for topk in (1, 3, part.num_blocks + 5):
        r = _route(part, q, k, "topk", topk=topk)
        got = rr.row_select_to_selection(r.row_select, part.num_blocks)
        assert (got.sum(-1) == min(topk, part.num_blocks)).all()


@pytest.mark.parametrize("selection", ["threshold", "global"])
def test_threshold_one_selects_all(selection):
    part, q, k = _inputs(2, seed=4)
    r = _route(part, q, k, selection, threshold=1.0)
    assert rr.row_select_to_selection(r.row_select, part.num_blocks).all()
    assert (r.kv_count == part.num_kv_tiles).all()
    assert abs(float(r.density) - 1.0) < 1e-6


@pytest.mark.parametrize("selection", ["threshold", "global", "topk"])
def test_selection_is_per_sample(selection):
    """CFG batch: changing sample 1 never changes sample 0's selection (the reference's global mode
    mixes the batch; ours must not)."""
    part, q, k = _inputs(1, seed=5)
    r1 = _route(part, q, k, selection)
    q2, k2 = q.clone(), k.clone()
    q2[1] = q2[1] * 3.0 + 1.0
    k2[1] = torch.randn_like(k2[1])
    r2 = _route(part, q2, k2, selection)
    assert torch.equal(r1.row_select[0], r2.row_select[0])
    assert torch.equal(r1.kv_count[0], r2.kv_count[0])
    assert not torch.equal(r1.row_select[1], r2.row_select[1])


def test_bf16_queries_and_bitmask_words():
    """bf16 inputs route like their fp32 upcast; more than 32 blocks use several bitmask words."""
    grid = (3, 6, 8)
    cfg = VMoBAConfig(spatiotemporal_block=(1, 2, 2), kv_tile=16, q_tile=64)
    part = partition_for_layer(grid, 2, cfg, DEV)  # 3*3*4 = 36 blocks -> 2 words
    assert part.num_blocks == 36
    g = torch.Generator().manual_seed(6)
    S = 3 * 6 * 8
    q = torch.randn(1, S, 2, 32, generator=g).to(DEV, torch.bfloat16)
    k = torch.randn(1, S, 2, 32, generator=g).to(DEV, torch.bfloat16)
    qb, kb = q[:, part.q_perm].contiguous(), k[:, part.kv_perm].contiguous()
    r = route_blocks(qb, kb, q_block=part.q_block, block_size=part.block_size,
                     block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
                     kv_tile_len=part.kv_tile_len, kv_tile_group=part.kv_tile_group, selection="topk", topk=34,
                     q_tile=64, kv_tile=part.kv_tile, precision="ieee")
    assert r.row_select.shape[-1] == 2
    got = rr.row_select_to_selection(r.row_select, 36).cpu()
    ref = rr.select_blocks_reference(qb.float().cpu(), k[:, part.q_perm].float().cpu(), part.q_block.cpu(),
                                     part.q_block.cpu(), 36, selection="topk", topk=34)
    assert (got.sum(-1) == 34).all()
    assert (got != ref).float().mean() < 0.01


def test_row_select_packing_roundtrip():
    sel = torch.rand(2, 3, 5, 70) < 0.5
    sel[..., 31] = True  # sign bit
    assert torch.equal(rr.row_select_to_selection(rr.selection_to_row_select(sel), 70), sel)


@pytest.mark.parametrize("grid,layer_type,block,kv_tile", [
    ((9, 12, 10), "temporal", (6, 12, 10), 32),      # long blocks (720 rows) split over 2 programs each
    ((9, 6, 10), "temporal", (4, 6, 10), 16),        # 240 rows in 15 tiles of 16
    ((9, 6, 10), "spatiotemporal", (4, 4, 4), 32),   # 64-token blocks, partial ones at every edge
    ((9, 6, 10), "spatiotemporal", (3, 4, 4), 128),  # 48-token blocks padded to 128-row tiles
    ((5, 7, 6), "spatial", (5, 3, 4), 32),           # non-dividing grid
])
def test_block_key_means_match_reference(grid, layer_type, block, kv_tile):
    from mixdit.attention.vmoba import get_partition
    from mixdit.kernels.block_router import block_key_means

    part = get_partition(grid, layer_type, block, kv_tile, DEV)
    B, H, D = 2, 3, 32
    k = torch.randn(B, math.prod(grid), H, D, device=DEV, dtype=torch.bfloat16)
    kb = k[:, part.kv_perm.long()].contiguous()
    kb[:, _pad_rows(part)] = float("nan")  # pad rows must never be read into a mean
    C = part.num_blocks
    means_t = block_key_means(kb, part.block_tile_start, part.block_tile_count, part.kv_tile_len, part.block_size,
                              kv_tile, max_block_tiles=part.max_block_tiles)
    got = means_t.view(B, H, means_t.shape[1], means_t.shape[2])[:, :, :D, :C].permute(0, 1, 3, 2)
    block_of_token = torch.empty(math.prod(grid), dtype=torch.long, device=DEV)
    block_of_token[part.q_perm.long()] = part.q_block.long()
    ref = rr.block_key_means_reference(k.float(), block_of_token, C)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert means_t[:, D:].abs().sum() == 0 and means_t[:, :, C:].abs().sum() == 0  # zero padding


def _pad_rows(part):
    tiles = part.kv_tile_len.long().cpu()
    local = torch.arange(part.kv_tile).view(1, -1)
    pad = local >= tiles.view(-1, 1)  # [n_kt, kv_tile]
    return pad.reshape(-1).nonzero().view(-1).to(DEV)


def test_block_key_means_rejects_a_layout_of_another_key_tile():
    from mixdit.attention.vmoba import get_partition
    from mixdit.kernels.block_router import block_key_means

    part = get_partition((4, 6, 8), "spatiotemporal", (2, 3, 4), 32, DEV)
    k = torch.randn(1, part.num_kv_tiles * 32, 2, 32, device=DEV, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="kv_tile=16"):
        block_key_means(k, part.block_tile_start, part.block_tile_count, part.kv_tile_len, part.block_size, 16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_token_gate_is_fp32_accurate(dtype):
    """The threshold rule's gate (tensor-core products of q with the means split into bf16 / TF32 parts, or 3xTF32
    for fp32 q) is q . mean to about fp32 rounding, for 70 blocks (a partial column tile) and an odd head dim."""
    from mixdit.kernels.block_router import token_gate

    g = torch.Generator().manual_seed(21)
    B, S, H, D, NB, NB_PAD, D_PAD = 2, 150, 3, 24, 70, 128, 32
    q = torch.randn(B, S, H, D, generator=g).to(DEV, dtype)
    means_t = torch.zeros(B * H, D_PAD, NB_PAD)
    means_t[:, :D, :NB] = torch.randn(B * H, D, NB, generator=g) * torch.rand(1, 1, NB, generator=g)
    means_t = means_t.to(DEV)
    gate = token_gate(q, means_t, NB, 1, B * H)  # heads 1.. (an offset chunk)
    qbh = q.permute(0, 2, 1, 3).reshape(B * H, S, D).double()
    exact = torch.bmm(qbh, means_t[:, :D, :NB].double())[1:]
    bound = torch.bmm(qbh.abs(), means_t[:, :D, :NB].abs().double())[1:]  # sum |q| |m|
    err = (gate.double() - exact).abs()
    # 2^-19 of sum |q| |m|: fp32 summation over D terms and the means' 21-24 bits (one bf16 / TF32 product: 2^-8 / 2^-11)
    assert gate.shape == (B * H - 1, S, NB)
    assert bool((err <= 2.0 ** -19 * bound).all()), float((err / bound).max())


def test_threshold_rule_early_exit_selects_as_the_full_search():
    """The cut search stops once the remaining bits cannot change the selection: on gates built to be hard for it
    (many exact ties, values one ulp apart, a single other block, all-equal rows, tiny and large ranges) it selects
    exactly the blocks the full 30-bit search selects, at several thresholds, whether it checks after every round or
    from the fifth on."""
    import triton

    from mixdit.kernels import block_router as br

    g = torch.Generator().manual_seed(5)
    Sq, NB = 96, 45
    NB_PAD = 64
    base = torch.randn(1, Sq, NB, generator=g)
    rows = [base[0, :16],
            torch.round(base[0, 16:32] * 2) / 2,  # a few distinct values: many ties
            torch.nextafter(base[0, 32:48], torch.full_like(base[0, 32:48], 9.0)),  # then 1 ulp apart, below
            torch.ones(16, NB),  # all equal
            base[0, 64:80] * 1e-30 + 1.0,  # one value (1.0 after rounding): degenerate range
            base[0, 80:96] * 1e4]
    rows[2] = torch.where(torch.arange(NB) % 2 == 0, rows[2], base[0, 32:48])
    gate = torch.cat(rows)[None].contiguous().to(DEV)
    q_block = (torch.arange(Sq) % NB).to(DEV, torch.int32)
    q_block[-1] = 0
    block_size = torch.randint(1, 50, (NB,), generator=g).to(DEV, torch.int32)
    block_size_pad = torch.nn.functional.pad(block_size, (0, NB_PAD - NB))  # the kernel reads NB_PAD of them
    rows = br._threshold_rows(NB_PAD)  # as the router launches it (the interpreter: 16 rows per program)
    n_rt = triton.cdiv(Sq, rows)
    for threshold in (0.02, 0.25, 0.6, 2.0):
        out = {}
        for early in (0, 27, 15):  # the full search; the check after every round; from the fifth round (3D layers)
            rs = torch.full((1, 1, Sq, NB_PAD // 32), -7, device=DEV, dtype=torch.int32)
            tokens = torch.empty(1, n_rt, device=DEV)
            br._token_threshold_kernel[(n_rt, 1)](
                gate, q_block, block_size_pad, rs, tokens, tokens, Sq, NB, n_rt, 0, threshold, NB,
                ROWS=rows, NB_PAD=NB_PAD, W=NB_PAD // 32, STORE_UNION=False, EARLY_EXIT=early, num_warps=1)
            out[early] = rs
        assert torch.equal(out[27], out[0]), threshold
        assert torch.equal(out[15], out[0]), threshold
        sel = rr.row_select_to_selection(out[27], NB)[0, 0]
        assert sel[torch.arange(Sq), q_block.long()].all()  # own block always
        if threshold == 2.0:
            assert sel.all()


@pytest.mark.parametrize("grid,block,kv_tile,q_tile", [((5, 4, 6), (2, 4, 6), 32, 16), ((7, 6, 6), (1, 6, 6), 16, 32)])
def test_sorted_tile_layout_matches_the_pytorch_layout(grid, block, kv_tile, q_tile):
    """The sorted 1D path's layout kernel (union and every-row set per query tile from one selection word per row)
    gives what ``tile_layout_from_selection(full_first=True)`` gives: counts, full counts and the visited tiles in
    order (full blocks first), with a partial last query tile, a block every row takes and sorted words; more than one
    word per row is refused."""
    from mixdit.attention.vmoba import get_partition
    from mixdit.kernels.block_router import sorted_tile_layout

    g = torch.Generator().manual_seed(7)
    part = get_partition(grid, "temporal", block, kv_tile, DEV)
    NB = part.num_blocks
    B, H, Sq = 2, 3, grid[0] * grid[1] * grid[2]
    assert Sq % q_tile  # the last query tile is partial
    bits = torch.rand(B, H, Sq, NB, generator=g) < 0.4
    bits[..., 0] |= torch.rand(B, H, Sq, generator=g) < 0.9
    bits[:, 0, :, 1] = True  # every row of head 0 takes block 1: full in every tile
    words = (bits.int() << torch.arange(NB, dtype=torch.int32)).sum(-1, keepdim=True).to(torch.int32)
    words = torch.sort(words, dim=2).values.to(DEV)
    want = rr.tile_layout_from_selection(rr.row_select_to_selection(words, NB), part.kv_tile_group, q_tile,
                                         full_first=True)
    got = sorted_tile_layout(words, part.block_tile_start, part.block_tile_count, part.num_kv_tiles,
                             part.max_block_tiles, q_tile)
    assert torch.equal(got[0], want[0]) and torch.equal(got[2], want[2])
    assert 0 < int(want[2].sum()) < int(want[0].sum())
    for b in range(B):
        for h in range(H):
            for t in range(want[0].shape[-1]):
                c = int(want[0][b, h, t])
                assert torch.equal(got[1][b, h, t, :c], want[1][b, h, t, :c]), (b, h, t)
    with pytest.raises(ValueError, match="one selection word"):
        sorted_tile_layout(torch.cat([words, words], -1), part.block_tile_start, part.block_tile_count,
                           part.num_kv_tiles, part.max_block_tiles, q_tile)
