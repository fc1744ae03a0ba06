"""VMoBA: config, partition, dense rules and the functional attention (CPU, Triton interpreter)."""

import importlib
import math
import os

import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mixdit.attention.vmoba import (  # noqa: E402
    VMoBAConfig, VMoBAStats, get_partition, layer_type_for, partition_for_layer, route, vmoba_attention,
    vmoba_should_run_dense)
from mixdit.errors import ConfigError  # noqa: E402
from mixdit.kernels import router_reference as rr  # noqa: E402
from mixdit.kernels.reference import visited_index  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(temporal_block=2, spatial_block=(2, 3), spatiotemporal_block=(2, 2, 3), kv_tile=16, q_tile=64,
             min_tokens=0, dense_layers=(), topk_temporal=2, topk_spatial=3, topk_spatiotemporal=4)


def test_config_defaults_are_published_wan_1_3b():
    c = VMoBAConfig()
    assert (c.selection, c.threshold) == ("threshold", 0.25)
    assert (c.temporal_block, c.topk_temporal) == (2, 3)
    assert (c.spatial_block, c.topk_spatial) == ((3, 4), 20)
    assert (c.spatiotemporal_block, c.topk_spatiotemporal) == ((4, 6, 4), 15)
    assert c.dense_layers == (0,) and 0.2 <= c.dense_steps <= 0.25 and c.min_tokens == 4096


@pytest.mark.parametrize("field,value", [
    ("selection", "sort"), ("threshold", 1.5), ("spatial_block", (3,)), ("spatiotemporal_block", (4, 0, 4)),
    ("temporal_block", 0), ("topk_spatial", 0), ("dense_steps", -1), ("dense_steps", 1.5),
    ("dense_layers", (-1,)), ("min_tokens", -5), ("kv_tile", 100), ("router_precision", "fp8")])
def test_config_validation_names_the_field(field, value):
    with pytest.raises(ConfigError) as e:
        VMoBAConfig(**{field: value})
    assert e.value.field == f"vmoba.{field}"


def test_layer_cycle_and_dense_rules():
    c = VMoBAConfig()
    assert [layer_type_for(i, c) for i in range(6)] == ["temporal", "spatial", "spatiotemporal"] * 2
    assert layer_type_for(1, VMoBAConfig(layer_cycle_start=1)) == "temporal"
    big = 32760
    assert vmoba_should_run_dense(c, 5, 50, 0, big)  # dense layer 0
    assert vmoba_should_run_dense(c, 11, 50, 4, big)  # 0.24 * 50 = 12 dense steps
    assert not vmoba_should_run_dense(c, 12, 50, 4, big)
    assert vmoba_should_run_dense(c, 30, 50, 4, 4095)  # too few tokens
    assert not vmoba_should_run_dense(c, None, None, 4, big)
    c2 = VMoBAConfig(dense_steps=3)
    assert vmoba_should_run_dense(c2, 2, 50, 4, big) and not vmoba_should_run_dense(c2, 3, 50, 4, big)


@pytest.mark.parametrize("grid", [(5, 5, 7), (4, 6, 8), (1, 1, 3)])
@pytest.mark.parametrize("layer", [0, 1, 2], ids=["1d", "2d", "3d"])
def test_partition_membership(grid, layer):
    cfg = VMoBAConfig(**SMALL)
    p = partition_for_layer(grid, layer, cfg)
    Fg, Hg, Wg = grid
    S = Fg * Hg * Wg
    bt, bh, bw = (min(b, g) for b, g in zip(cfg.block_shape(p.layer_type, grid), grid))
    assert p.block_shape == (bt, bh, bw)
    # q_perm is a permutation, q_inv its inverse
    assert torch.equal(torch.sort(p.q_perm).values, torch.arange(S))
    assert torch.equal(p.q_perm[p.q_inv], torch.arange(S))
    # every token sits in exactly one block: the one its (frame, row, col) falls in
    f, rem = p.q_perm // (Hg * Wg), p.q_perm % (Hg * Wg)
    y, x = rem // Wg, rem % Wg
    nbh, nbw = -(-Hg // bh), -(-Wg // bw)
    expect = ((f // bt) * nbh + y // bh) * nbw + x // bw
    assert torch.equal(p.q_block.long(), expect)
    # blocks are contiguous in query order, in increasing id; sizes = clipped extents
    assert (p.q_block[1:] >= p.q_block[:-1]).all()
    for c in range(p.num_blocks):
        members = (p.q_block == c).nonzero().flatten()
        assert members.numel() == int(p.block_size[c]) and int(members[0]) == int(p.block_start[c])
        assert members.numel() == int(members[-1] - members[0] + 1)
        ff, yy, xx = f[members], y[members], x[members]
        ext = [(ff.max() - ff.min() + 1), (yy.max() - yy.min() + 1), (xx.max() - xx.min() + 1)]
        assert int(ext[0] * ext[1] * ext[2]) == members.numel()  # a full (possibly clipped) box
        assert ext[0] <= bt and ext[1] <= bh and ext[2] <= bw
        assert int(ff.min()) % bt == 0 and int(yy.min()) % bh == 0 and int(xx.min()) % bw == 0
    # padded key layout: block c starts on a tile boundary, real rows hold its tokens in order
    T = p.kv_tile
    assert int(p.kv_tile_len.sum()) == S
    for c in range(p.num_blocks):
        t0, tc = int(p.block_tile_start[c]), int(p.block_tile_count[c])
        assert (p.kv_tile_group[t0:t0 + tc] == c).all()
        rows = p.kv_perm[t0 * T:t0 * T + int(p.block_size[c])]
        s0 = int(p.block_start[c])
        assert torch.equal(rows, p.q_perm[s0:s0 + int(p.block_size[c])])
        assert tc == math.ceil(int(p.block_size[c]) / T)
    assert p.kv_perm.numel() == p.num_kv_tiles * T and (p.kv_perm < S).all()
    # kv_inv: each raster token's own (real, not pad) row of the padded layout
    assert torch.equal(p.kv_perm[p.kv_inv], torch.arange(S))
    real = (torch.arange(T).view(1, -1) < p.kv_tile_len.view(-1, 1).long()).reshape(-1)
    assert torch.equal(torch.sort(p.kv_inv).values, torch.nonzero(real).view(-1))


def test_partition_is_cached():
    a = get_partition((4, 6, 8), "spatial", (4, 3, 4), 64)
    assert a is get_partition((4, 6, 8), "spatial", (4, 3, 4), 64)


def _qkv(B, S, H, D, seed, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, S, H, D, generator=g).to(DEV, dtype) for _ in range(3)]


def _masked_attention(q, k, v, mask, scale, dtype):
    qh, kh, vh = (t.to(dtype).transpose(1, 2) for t in (q, k, v))
    s = (qh @ kh.transpose(-1, -2)).float() * scale
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).to(dtype)
    return (p @ vh).transpose(1, 2)


def _check(out, q, k, v, mask, scale):
    ref32 = _masked_attention(q, k, v, mask, scale, torch.float32)
    ref_same = _masked_attention(q, k, v, mask, scale, q.dtype)
    tol = 2 * (ref_same.float() - ref32).abs().max().item() + 1e-5
    err = (out.float() - ref32).abs().max().item()
    assert err <= tol, f"max error {err:.3e} > tolerance {tol:.3e}"


@pytest.mark.parametrize("text_position,text_len", [("none", 0), ("before", 7), ("after", 9)])
def test_threshold_one_equals_dense(text_position, text_len):
    grid = (3, 4, 5)
    B, H, D = 2, 2, 32
    S = 60 + text_len
    q, k, v = _qkv(B, S, H, D, seed=1)
    cfg = VMoBAConfig(threshold=1.0, **SMALL)
    full = torch.ones(B, H, S, S, dtype=torch.bool, device=DEV)
    for layer in ((0, 1, 2) if text_position == "none" else (2,)):
        out = vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=cfg, text_len=text_len,
                              text_position=text_position)
        assert out.shape == q.shape and out.dtype == q.dtype
        _check(out, q, k, v, full, 1 / math.sqrt(D))


def _vmoba_mask(q, k, grid, layer, cfg, text_len, text_position):
    """Dense boolean mask [B, H, S, S] of what VMoBA attends to (raster order, text dense)."""
    B, S, H, _ = q.shape
    Sv = grid[0] * grid[1] * grid[2]
    vid = slice(text_len, S) if text_position == "before" else slice(0, Sv)
    p = partition_for_layer(grid, layer, cfg, q.device)
    qb = q[:, vid][:, p.q_perm].contiguous()
    kb = k[:, vid][:, p.kv_perm].contiguous()
    sel = rr.row_select_to_selection(route(qb, kb, p, cfg).row_select, p.num_blocks)  # [B,H,Sv(block),C]
    block_of_raster = p.q_block.long()[p.q_inv]
    mv = sel[:, :, p.q_inv][..., block_of_raster]  # [B, H, Sv, Sv] raster
    mask = torch.ones(B, H, S, S, dtype=torch.bool, device=q.device)
    mask[:, :, vid, vid] = mv
    return mask, sel


@pytest.mark.parametrize("text_position,text_len", [("none", 0), ("before", 7), ("after", 9)])
@pytest.mark.parametrize("selection", ["threshold", "topk"])
def test_sparse_with_text_equals_masked_dense(text_position, text_len, selection):
    grid = (5, 5, 7)
    B, H, D = 2, 2, 32
    S = 175 + text_len
    q, k, v = _qkv(B, S, H, D, seed=2)
    cfg = VMoBAConfig(selection=selection, **SMALL)
    for layer in ((1, 2) if selection == "threshold" else (2,)):
        stats = VMoBAStats()
        out = vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=cfg, text_len=text_len,
                              text_position=text_position, stats=stats)
        mask, sel = _vmoba_mask(q, k, grid, layer, cfg, text_len, text_position)
        assert not sel.all()  # genuinely sparse
        _check(out, q, k, v, mask, 1 / math.sqrt(D))
        d = stats.as_dict()[layer_type_for(layer, cfg)]
        assert d["calls"] == 1 and 0 < d["density"] < 1 and d["density"] <= d["tile_density"] <= 1


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_exact_kernels_agree(layer, monkeypatch):
    """The exact rule through every kernel path gives the masked-dense result: key_blocks, hybrid, query_tiles with
    the queries sorted by selection (layers of <= 32 blocks, what "auto" picks there) and in block order."""
    import mixdit.attention.vmoba as vm

    grid = (5, 5, 7)  # SMALL blocks: 3 / 9 / 27 per layer type, all <= 32
    q, k, v = _qkv(2, 175, 2, 32, seed=4)
    mask, _ = _vmoba_mask(q, k, grid, layer, VMoBAConfig(**SMALL), 0, "none")
    outs, work = {}, {}
    for kernel, max_sorted in (("key_blocks", 32), ("hybrid", 32), ("query_tiles", 32), ("auto", 32),
                               ("query_tiles", 0)):
        monkeypatch.setattr(vm, "SORTED_QUERY_MAX_BLOCKS", max_sorted)
        stats = VMoBAStats()
        out = vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=VMoBAConfig(exact_kernel=kernel, **SMALL),
                              stats=stats)
        _check(out, q, k, v, mask, 1 / math.sqrt(32))
        outs[kernel, max_sorted] = out
        work[kernel, max_sorted] = stats.as_dict()[layer_type_for(layer, VMoBAConfig(**SMALL))]["tile_density"]
    assert torch.equal(outs["auto", 32], outs["query_tiles", 32])  # auto = sorted query tiles here
    assert work["query_tiles", 32] <= work["query_tiles", 0]  # sorted tiles compute no more here
    if layer == 0:
        assert work["query_tiles", 32] < work["query_tiles", 0]  # and here (3 blocks) it saves tiles


@pytest.mark.parametrize("kernel,text_position,text_len,backward", [("hybrid", "none", 0, "split"),
                                                                    ("key_blocks", "after", 9, "split"),
                                                                    ("hybrid", "before", 7, "union")])
def test_key_block_forwards_have_gradients(kernel, text_position, text_len, backward, monkeypatch):
    """A call that needs gradients keeps the key-block / hybrid forward (bit for bit the no-gradient output) and
    gets the masked-dense reference's gradients from either backward of the exact rule (the router builds its tile
    layout only for the union one); with text tokens the gradient also flows through the lse of the log-sum-exp
    merge."""
    import mixdit.attention.vmoba as vm
    from mixdit.kernels import key_block_attention as kba

    grid, layer = (5, 5, 7), 2
    B, H, D = 2, 2, 32
    q, k, v = _qkv(B, 175 + text_len, H, D, seed=5)
    cfg = VMoBAConfig(exact_kernel=kernel, **SMALL)
    call = dict(grid=grid, layer_index=layer, config=cfg, text_len=text_len, text_position=text_position)
    no_grad_out = vmoba_attention(q, k, v, **call)
    monkeypatch.setattr(kba, "EXACT_BACKWARD", backward)
    backward_layouts, split_calls = [], []
    real, real_split = kba.exact_attention_with_grad, kba.hybrid_backward
    monkeypatch.setattr(kba, "exact_attention_with_grad",
                        lambda *a, **kw: backward_layouts.append(kw["backward_layout"]) or real(*a, **kw))
    monkeypatch.setattr(kba, "hybrid_backward",
                        lambda *a, **kw: split_calls.append(kw["min_fill"]) or real_split(*a, **kw))
    monkeypatch.setattr(vm, "_sorted_query_tile_call", None)  # never the query-tile forward
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    out = vmoba_attention(*leaves, **call)
    assert len(backward_layouts) == 1 and (backward_layouts[0] is None) == (backward == "split")
    assert out.requires_grad and torch.equal(out.detach(), no_grad_out)
    g_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(6)).to(out.device, out.dtype)
    out.backward(g_out)
    if backward == "split":  # split as the forward was (key blocks: every pair key-block-major)
        fill = vm.hybrid_launch(partition_for_layer(grid, layer, cfg, DEV), cfg)["min_fill"]
        assert split_calls == [fill if kernel == "hybrid" else 2.0]
    else:
        assert not split_calls

    mask, _ = _vmoba_mask(q, k, grid, layer, cfg, text_len, text_position)

    def reference_grads(dtype):
        ref_leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
        _masked_attention(*ref_leaves, mask, 1 / math.sqrt(D), dtype).backward(g_out.to(dtype))
        return [t.grad.float() for t in ref_leaves]

    for leaf, r32, rs in zip(leaves, reference_grads(torch.float32), reference_grads(q.dtype)):
        tol = 2 * (rs - r32).abs().max().item() + 1e-5
        err = (leaf.grad.float() - r32).abs().max().item()
        assert torch.isfinite(leaf.grad).all() and err <= tol, f"{err:.3e} > {tol:.3e}"


def test_attention_path_rule(monkeypatch):
    """The one dispatch rule: "auto" sorts the queries in layers of few blocks and takes the hybrid in the others,
    with or without gradients; a CPU tensor the kernels don't take, "query_tiles" and the approximations never get
    key blocks."""
    import mixdit.attention.vmoba as vm

    grid = (5, 5, 7)
    q, k, v = _qkv(1, 175, 2, 32, seed=7)
    few, many = (partition_for_layer(grid, layer, VMoBAConfig(**SMALL), DEV) for layer in (0, 2))  # 3 / 27 blocks
    monkeypatch.setattr(vm, "SORTED_QUERY_MAX_BLOCKS", 8)
    path = vm.attention_path
    assert path(VMoBAConfig(**SMALL), few, q, k, v) == "sorted_query_tiles"
    assert path(VMoBAConfig(**SMALL), many, q, k, v) == "hybrid"
    assert path(VMoBAConfig(exact_kernel="key_blocks", **SMALL), few, q, k, v) == "key_blocks"
    assert path(VMoBAConfig(exact_kernel="key_blocks", **SMALL), many, q, k, v) == "key_blocks"
    assert path(VMoBAConfig(exact_kernel="hybrid", **SMALL), few, q, k, v) == "hybrid"
    assert path(VMoBAConfig(exact_kernel="query_tiles", **SMALL), many, q, k, v) == "query_tiles"
    assert path(VMoBAConfig(exact_kernel="query_tiles", **SMALL), few, q, k, v) == "sorted_query_tiles"
    # gradients keep the forward (the backward is the query-tile kernel's on the same selection)
    assert path(VMoBAConfig(**SMALL), many, q.clone().requires_grad_(True), k, v) == "hybrid"
    assert path(VMoBAConfig(exact_kernel="key_blocks", **SMALL), few, q.clone().requires_grad_(True), k, v) == \
        "key_blocks"
    assert path(VMoBAConfig(**SMALL), many, q.float(), k.float(), v.float()) == ("hybrid" if DEV == "cuda"
                                                                                 else "query_tiles")
    for approx in (dict(granularity="query_tile"), dict(tile_union_only=True)):
        assert path(VMoBAConfig(**approx, **SMALL), few, q, k, v) == "query_tiles"


def test_fallback_reason_rule():
    from mixdit.attention.vmoba import vmoba_fallback_reason

    c = VMoBAConfig()  # max_tile_density 0.5
    assert vmoba_fallback_reason(c, 0.6) == "max_tile_density"
    assert vmoba_fallback_reason(c, 0.6, 1.0, 2.0) == "max_tile_density"  # the tile share is checked first
    assert vmoba_fallback_reason(c, 0.3, 2.0, 1.0) == "slower_than_dense"
    assert vmoba_fallback_reason(c, 0.3, 1.0, 2.0) is None and vmoba_fallback_reason(c, 0.3) is None
    assert vmoba_fallback_reason(VMoBAConfig(max_tile_density=1.0), 0.9, 2.0, 1.0) is None  # rule off


def test_global_selection_attention_and_cfg_independence():
    grid = (5, 5, 7)
    q, k, v = _qkv(2, 175, 2, 32, seed=3)
    cfg = VMoBAConfig(selection="global", **SMALL)
    out = vmoba_attention(q, k, v, grid=grid, layer_index=2, config=cfg)
    mask, _ = _vmoba_mask(q, k, grid, 2, cfg, 0, "none")
    _check(out, q, k, v, mask, 1 / math.sqrt(32))
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    q2[1], k2[1] = torch.randn_like(q2[1]), torch.randn_like(k2[1])
    out2 = vmoba_attention(q2, k2, v2, grid=grid, layer_index=2, config=cfg)
    assert torch.equal(out[0], out2[0])


def test_dense_fallbacks_and_stats_dict():
    grid = (3, 4, 5)
    q, k, v = _qkv(1, 60, 2, 32, seed=4)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    stats = {}
    out = vmoba_attention(q, k, v, grid=grid, layer_index=4, config=VMoBAConfig(), stats=stats)  # 60 < 4096
    assert torch.equal(out, ref)
    out = vmoba_attention(q, k, v, grid=grid, layer_index=0, config=VMoBAConfig(min_tokens=0))  # dense layer
    assert torch.equal(out, ref)
    out = vmoba_attention(q, k, v, grid=grid, layer_index=4, config=VMoBAConfig(min_tokens=0),
                          step_index=0, num_steps=50)  # dense early step
    assert torch.equal(out, ref)
    assert stats["vmoba"].as_dict() == {"dense": {"calls": 1, "density": 1.0, "tile_density": 1.0}}


def test_fp32_and_odd_head_dim():
    """fp32 inputs with a head dim the kernel can't take (12) still work (padded, bf16 inside)."""
    grid = (3, 4, 5)
    q, k, v = _qkv(1, 60, 2, 12, seed=5, dtype=torch.float32)
    cfg = VMoBAConfig(threshold=1.0, **SMALL)
    out = vmoba_attention(q, k, v, grid=grid, layer_index=1, config=cfg)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 3e-2


def test_bad_grid_raises_config_error():
    q, k, v = _qkv(1, 60, 2, 32, seed=6)
    with pytest.raises(ConfigError):
        vmoba_attention(q, k, v, grid=(3, 4, 6), layer_index=1, config=VMoBAConfig(**SMALL))


# ---- query-tile router (granularity="query_tile"): fused Triton router vs the PyTorch reference ----
QT = dict(SMALL, granularity="query_tile")
QT_GRIDS = [(5, 5, 7), (4, 6, 8), (3, 7, 9)]  # (5,5,7), (3,7,9): partial blocks and a partial last query tile
QT_TOL = 1e-5


def _fresh_seed() -> int:
    return int.from_bytes(os.urandom(4), "little") >> 1


def _qt_route_both(grid, layer, cfg, q, k):
    from mixdit.attention.vmoba import route_query_tiles, route_query_tiles_reference

    part = partition_for_layer(grid, layer, cfg, q.device)
    qb = q[:, part.q_perm].contiguous()
    kb = k[:, part.kv_perm].contiguous()
    return part, qb, k[:, part.q_perm], route_query_tiles(qb, kb, part, cfg), route_query_tiles_reference(qb, kb, part, cfg)


def _qt_near_tie(part, qb, kb_unpadded, cfg, gaps=True):
    """Boolean ``[B, H, n_qt]``: tiles whose decision sits within float noise of a tie (fp64 gate).
    ``gaps``: also flag near-equal scores on both sides of the cut (off for inputs with exact ties)."""
    B, Sq, H, D = qb.shape
    qt, C = cfg.q_tile, part.num_blocks
    n_qt = -(-Sq // qt)
    pad = n_qt * qt - Sq
    qd = torch.nn.functional.pad(qb.double().cpu(), (0, 0, 0, 0, 0, pad))
    rows = torch.full((n_qt,), float(qt), dtype=torch.float64)
    rows[-1] = qt - pad
    qmean = qd.view(B, n_qt, qt, H, D).sum(2) / rows.view(1, -1, 1, 1)
    means = rr.block_key_means_reference(kb_unpadded.cpu(), part.q_block.cpu(), C).double()  # [B, H, C, D]
    gate = torch.einsum("bthd,bhcd->bhtc", qmean, means)
    own = torch.zeros(n_qt, C, dtype=torch.bool)
    own[torch.arange(Sq) // qt, part.q_block.long().cpu()] = True
    own = own.expand_as(gate)
    if cfg.selection == "topk":
        k_eff = min(cfg.topk_for(part.layer_type), C)
        srt = torch.where(own, torch.full_like(gate, -1e300), gate).sort(-1, descending=True).values
        kk = (k_eff - own.sum(-1)).clamp(min=0)  # other blocks taken
        n_oth = (~own).sum(-1)
        a = srt.gather(-1, (kk - 1).clamp(min=0).unsqueeze(-1)).squeeze(-1)
        b = srt.gather(-1, kk.clamp(max=C - 1).unsqueeze(-1)).squeeze(-1)
        scale = gate.abs().amax(-1)
        return ((kk > 0) & (kk < n_oth) & ((a - b).abs() < QT_TOL * scale)) if gaps else torch.zeros_like(kk, dtype=torch.bool)
    dims = (-1,) if cfg.selection == "threshold" else (-2, -1)
    mn, mx = gate.amin(dim=dims, keepdim=True), gate.amax(dim=dims, keepdim=True)
    den = torch.where(mx - mn <= rr.EPS, torch.ones_like(mx), mx - mn)
    norm = (gate - mn) / den
    total = norm.sum(dim=dims, keepdim=True)
    remain = (cfg.threshold - (norm * own).sum(dim=dims, keepdim=True) / (total + rr.EPS)).clamp(min=0)
    nd = len(dims)
    flat = torch.where(own, torch.full_like(norm, -1.0), norm).flatten(start_dim=4 - nd)
    srt = flat.sort(-1, descending=True).values
    ratio = srt.clamp(min=0).cumsum(-1) / (total.flatten(start_dim=4 - nd) + rr.EPS)
    rem = remain.flatten(start_dim=4 - nd)
    amb = (((ratio - rem).abs() < QT_TOL) & (srt >= 0)).any(-1)
    if gaps:  # scores within noise of each other on both sides of the cut
        cond = (ratio >= rem) & (srt >= 0)
        first = torch.where(cond.any(-1), cond.float().argmax(-1), (srt >= 0).sum(-1) - 1).clamp(min=0)
        nxt = (first + 1).clamp(max=srt.shape[-1] - 1)
        a = srt.gather(-1, first.unsqueeze(-1)).squeeze(-1)
        b = srt.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
        amb |= (nxt > first) & (b >= 0) & ((a - b).abs() < QT_TOL)
    return amb if nd == 1 else amb.unsqueeze(-1).expand(B, H, n_qt)


def _visited(r):
    return visited_index(r.kv_count, r.kv_index)


def _qt_assert_same(part, qb, kb_unpadded, cfg, r, ref, seed, gaps=True):
    assert r.row_select is None and ref.row_select is None
    assert r.kv_count.shape == ref.kv_count.shape and r.kv_index.shape == ref.kv_index.shape
    diff = (r.kv_count != ref.kv_count) | (_visited(r) != _visited(ref)).any(-1)
    if diff.any():  # only where the reference's own fp32 decision is a coin flip
        amb = _qt_near_tie(part, qb, kb_unpadded, cfg, gaps).to(diff.device)
        bad = diff & ~amb
        assert not bad.any(), f"seed {seed}: {int(bad.sum())} of {diff.numel()} tiles differ away from ties"
    same = ~diff
    assert torch.equal(r.kv_count[same], ref.kv_count[same])
    assert abs(float(r.density) - float(ref.density)) < 1e-5 + 1e-3 * float(diff.float().mean())
    assert abs(float(r.tile_density) - float(ref.tile_density)) < 1e-5 + float(diff.float().mean())


@pytest.mark.parametrize("selection", ["threshold", "topk", "global"])
@pytest.mark.parametrize("layer", [0, 1, 2], ids=["1d", "2d", "3d"])
def test_query_tile_router_fused_matches_reference(layer, selection):
    """Fresh random bf16 inputs, B=2 different samples: identical kv_count and visited kv_index (the
    selected tiles ascending) on every (sample, head, query tile). The grid rotates
    (a Latin square: every grid meets every layer type and every rule once) to keep the
    interpreter time down."""
    cfg = VMoBAConfig(selection=selection, **QT)
    grid = QT_GRIDS[(layer + ["threshold", "topk", "global"].index(selection)) % len(QT_GRIDS)]
    seed = _fresh_seed()
    S = grid[0] * grid[1] * grid[2]
    q, k = _qkv(2, S, 2, 32, seed=seed)[:2]
    k = k + 0.3 * torch.randn(2, 1, 2, 32, generator=torch.Generator().manual_seed(seed)).to(DEV, k.dtype)
    part, qb, ku, r, ref = _qt_route_both(grid, layer, cfg, q, k)
    _qt_assert_same(part, qb, ku, cfg, r, ref, seed)
    assert 0 < float(r.tile_density) <= 1
    # own blocks always visited; no key tile visited twice
    kvg = part.kv_tile_group.long()
    for b, h, t in [(0, 0, 0), (1, 1, r.kv_count.shape[-1] - 1)]:
        vis = r.kv_index[b, h, t, :int(r.kv_count[b, h, t])].long()
        own = set(part.q_block[t * cfg.q_tile:(t + 1) * cfg.q_tile].tolist())
        assert own <= set(kvg[vis].tolist())
        assert vis.unique().numel() == vis.numel()


@pytest.mark.parametrize("selection", ["threshold", "topk", "global"])
def test_query_tile_router_exact_ties(selection):
    """Blocks whose keys are copies of a few vectors give equal scores; with dyadic q and k (full
    query tiles, power-of-two tile rows) every mean and score is exact in fp32 in any summation
    order (a matmul library may otherwise round equal columns differently), so the ties are exact
    in both routers: the fused one breaks them as the reference does (threshold/global: all equal to
    the cut value are taken; top-k: the lower block index first)."""
    grid, layer = (4, 6, 8), 2
    cfg = VMoBAConfig(selection=selection, **dict(QT, topk_spatiotemporal=5))
    part = partition_for_layer(grid, layer, cfg, DEV)
    seed = _fresh_seed()
    g = torch.Generator().manual_seed(seed)
    S, H, D = 4 * 6 * 8, 2, 32
    protos = torch.randint(-4, 5, (2, 3, H, D), generator=g).float() / 4  # 3 key vectors per sample
    which = torch.randint(0, 3, (part.num_blocks,), generator=g)
    k_block_order = protos[:, which[part.q_block.long().cpu()]]  # [2, S, H, D], constant inside a block
    k = torch.empty_like(k_block_order)
    k[:, part.q_perm] = k_block_order
    q = torch.randint(-4, 5, (2, S, H, D), generator=g).float() / 4
    q, k = q.to(DEV, torch.bfloat16), k.to(DEV, torch.bfloat16)
    part, qb, ku, r, ref = _qt_route_both(grid, layer, cfg, q, k)
    _qt_assert_same(part, qb, ku, cfg, r, ref, seed, gaps=False)
    # equal scores in every row: threshold takes every block, global all or none of a row's others,
    # top-k the lowest-index others
    k_eq = torch.full_like(k, 0.5)
    part, qb, ku, r, ref = _qt_route_both(grid, layer, cfg, q, k_eq)
    assert torch.equal(r.kv_count, ref.kv_count) and torch.equal(_visited(r), _visited(ref))
    if selection == "topk":
        n_qt = r.kv_count.shape[-1]
        kvg = part.kv_tile_group.long()
        for t in range(n_qt):
            own = sorted(set(part.q_block[t * cfg.q_tile:(t + 1) * cfg.q_tile].tolist()))
            others = [c for c in range(part.num_blocks) if c not in own][:max(0, 5 - len(own))]
            vis = r.kv_index[0, 0, t, :int(r.kv_count[0, 0, t])].long()
            assert sorted(set(kvg[vis].tolist())) == sorted(own + others)
    elif selection == "threshold":
        assert (r.kv_count == part.num_kv_tiles).all()
    else:
        n_qt = r.kv_count.shape[-1]
        own_tiles = torch.tensor([int(part.block_tile_count[sorted(set(
            part.q_block[t * cfg.q_tile:(t + 1) * cfg.q_tile].tolist()))].sum()) for t in range(n_qt)])
        cnt = r.kv_count.cpu()
        assert ((cnt == part.num_kv_tiles) | (cnt == own_tiles)).all()


@pytest.mark.parametrize("selection", ["threshold", "global"])
def test_query_tile_router_fused_tau_one_and_per_sample(selection):
    grid, layer = (5, 5, 7), 1
    S = 175
    seed = _fresh_seed()
    q, k = _qkv(2, S, 2, 32, seed=seed)[:2]
    cfg1 = VMoBAConfig(selection=selection, **dict(QT, threshold=1.0))
    _, _, _, r, ref = _qt_route_both(grid, layer, cfg1, q, k)
    assert (r.kv_count == r.kv_index.shape[-1]).all() and torch.equal(_visited(r), _visited(ref))
    assert abs(float(r.density) - 1.0) < 1e-6
    cfg = VMoBAConfig(selection=selection, **QT)
    _, _, _, r, _ = _qt_route_both(grid, layer, cfg, q, k)
    q2, k2 = q.clone(), k.clone()
    q2[1] = q2[1] * 3.0 + 1.0
    k2[1] = torch.randn_like(k2[1])
    _, _, _, r2, _ = _qt_route_both(grid, layer, cfg, q2, k2)
    assert torch.equal(r.kv_count[0], r2.kv_count[0]) and torch.equal(_visited(r)[0], _visited(r2)[0])


@pytest.mark.parametrize("kernel,layer,text_len", [("hybrid", 2, 0), ("key_blocks", 3, 6), ("auto", 1, 0)])
def test_checkpoint_keeping_attention_skips_the_recomputed_attention(kernel, layer, text_len, monkeypatch):
    """Gradient checkpointing that keeps attention (``checkpoint_keeping_context``'s default) gives bit for bit the
    gradients of no checkpointing, and its recomputation runs neither the router nor an attention kernel;
    ``keep_attention=False`` recomputes both. Paths: hybrid, key blocks (+ text: its dense part and the SDPA of the
    text rows), sorted query tiles (1D, ``auto``: the query-tile kernel, as in block order)."""
    import mixdit.attention.vmoba as vm
    from mixdit.kernels import key_block_attention as kba
    from mixdit.pipelines.context import checkpoint_keeping_context

    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    grid, B, H, D = (5, 5, 7), 1, 2, 32
    S, C = 175 + text_len, H * D
    g = torch.Generator().manual_seed(12)
    x = torch.randn(B, S, C, generator=g).to(DEV, torch.bfloat16)
    weights = [(torch.randn(C, C, generator=g) / C ** 0.5).to(DEV, torch.bfloat16).requires_grad_(True)
               for _ in range(3)]
    g_out = torch.randn(B, S, C, generator=g).to(DEV, torch.bfloat16)
    cfg = VMoBAConfig(exact_kernel=kernel, **SMALL)
    calls = {"route": 0, "kernel": 0}

    def counted(name, fn, what):
        def wrapper(*a, **kw):
            calls[what] += 1
            return fn(*a, **kw)
        monkeypatch.setattr(*name, wrapper)

    counted((vm, "route"), vm.route, "route")
    for mod, fn in ((kba, "hybrid_block_attention"), (kba, "key_block_attention"), (bsa, "_forward")):
        counted((mod, fn), getattr(mod, fn), "kernel")

    def block(inp):
        q, k, v = ((inp @ w).view(B, S, H, D) for w in weights)
        return vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=cfg, text_len=text_len,
                               text_position="after" if text_len else "none").flatten(2)

    def grads(run):
        for w in weights:
            w.grad = None
        calls.update(route=0, kernel=0)
        run().backward(g_out)
        return [w.grad.clone() for w in weights], dict(calls)

    plain, plain_calls = grads(lambda: block(x))
    kept_grads, kept_calls = grads(lambda: checkpoint_keeping_context(block, x))
    redone, redone_calls = grads(lambda: checkpoint_keeping_context(block, x, keep_attention=False))
    assert plain_calls["route"] == 1 and plain_calls["kernel"] >= 1
    assert kept_calls == plain_calls  # the recomputation ran neither
    assert redone_calls == {n: 2 * c for n, c in plain_calls.items()}
    for a, b, c in zip(plain, kept_grads, redone):
        assert torch.isfinite(a).all() and a.abs().sum() > 0
        if DEV == "cpu":
            assert torch.equal(a, b) and torch.equal(a, c)
        else:  # the exact rule's dQ adds by fp32 atomics: run to run, the order (last bits) varies
            assert max((a - b).abs().max(), (a - c).abs().max()) <= 0.02 * a.abs().max()


def test_checkpoint_keeping_attention_saves_dense_sdpa():
    """Dense attention under the same checkpointing: PyTorch's SDPA runs once (selective checkpointing saves its
    outputs), gradients bit for bit those of no checkpointing; ``keep_attention=False`` runs it twice."""
    from mixdit.pipelines.context import checkpoint_keeping_context

    g = torch.Generator().manual_seed(13)
    B, S, H, D = 2, 40, 2, 16
    x = torch.randn(B, S, H * D, generator=g)
    w = (torch.randn(H * D, H * D, generator=g) / (H * D) ** 0.5).requires_grad_(True)

    def block(inp):
        q = (inp @ w).view(B, S, H, D).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q.tanh(), q.sin()).transpose(1, 2).flatten(2)

    from torch.utils._python_dispatch import TorchDispatchMode

    class CountSDPA(TorchDispatchMode):  # entered outside the checkpoint: sees only the SDPA calls that really run
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            self.n += "_scaled_dot_product" in name and "backward" not in name
            return func(*args, **(kwargs or {}))

    def run(fn):
        w.grad = None
        with CountSDPA() as count:
            fn().square().sum().backward()
        return w.grad.clone(), count.n

    plain, n_plain = run(lambda: block(x))
    kept_grad, n_kept = run(lambda: checkpoint_keeping_context(block, x))
    redone, n_redone = run(lambda: checkpoint_keeping_context(block, x, keep_attention=False))
    assert n_plain >= 1 and n_kept == n_plain and n_redone == 2 * n_plain
    assert torch.equal(plain, kept_grad) and torch.equal(plain, redone)
