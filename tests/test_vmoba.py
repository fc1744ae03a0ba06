"""VMoBA: config, partition, dense rules and the functional attention (CPU, Triton interpreter)."""

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from mixdit.attention.vmoba import (  # noqa: E402
    VMoBAConfig, VMoBAStats, get_partition, layer_type_for, partition_for_layer, route, vmoba_attention,
    vmoba_should_run_dense)
from mixdit.errors import ConfigError  # noqa: E402
from mixdit.kernels import router_reference as rr  # noqa: E402

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
