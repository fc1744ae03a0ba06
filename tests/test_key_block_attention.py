"""mixdit.kernels.key_block_attention vs the naive reference (CPU via TRITON_INTERPRET, and CUDA)."""

import importlib

import pytest
import torch

from mixdit.attention.vmoba import get_partition
from mixdit.kernels.key_block_attention import (_chunks, exact_attention_with_grad, hybrid_block_attention,
                                                key_block_attention, key_block_plan, split_by_tile_fill)
from mixdit.kernels.reference import block_sparse_attention_reference, dense_layout
from mixdit.kernels.router_reference import compact_tiles, row_select_to_selection, selection_to_row_select


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    for name in ("key_block_attention", "block_sparse_attention"):
        monkeypatch.setattr(importlib.import_module(f"mixdit.kernels.{name}"), "_POISON_OUTPUTS", True)


def _random_selection(B, H, part, density, device, gen):
    """Per-row bitmask [B, H, Sq, W]: each block with probability ``density``, the row's own block always."""
    S, NB = part.q_block.numel(), part.num_blocks
    sel = torch.rand(B, H, S, NB, generator=gen) < density
    sel[..., torch.arange(S), part.q_block.long().cpu()] = True
    return selection_to_row_select(sel).to(device)


def _layer_inputs(layer, grid, block, kv_tile, B, H, D, dtype, density, device, seed):
    """A partition, fresh random q (block order) / k / v (padded block layout) and a random row selection."""
    gen = torch.Generator().manual_seed(seed)
    part = get_partition(grid, layer, block, kv_tile, device)
    S = part.q_block.numel()
    x = [torch.randn(B, S, H, D, generator=gen).to(device, dtype) for _ in range(3)]
    q = x[0][:, part.q_perm]
    k, v = (t[:, part.kv_perm].contiguous() for t in x[1:])
    return part, q, k, v, _random_selection(B, H, part, density, device, gen)


def _reference_pair(q, k, v, rs, part, scale, device):
    """(same-dtype, fp32) masked-dense references of attention over the row-selected blocks."""
    B, S, H, _ = q.shape
    layout = dense_layout(B, H, S, k.shape[1], 64, part.kv_tile, device=device)
    extra = dict(kv_tile_len=part.kv_tile_len, row_select=rs, kv_tile_group=part.kv_tile_group)
    ref32 = block_sparse_attention_reference(q.float(), k.float(), v.float(), *layout, q_tile=64,
                                             kv_tile=part.kv_tile, scale=scale, **extra)
    same = block_sparse_attention_reference(q, k, v, *layout, q_tile=64, kv_tile=part.kv_tile, scale=scale,
                                            upcast=False, **extra)
    return same, ref32


@pytest.mark.parametrize("layer,grid,block,kv_tile,block_m,block_n,D,dtype,density", [
    ("spatiotemporal", (3, 5, 7), (2, 3, 4), 16, 32, 32, 32, torch.bfloat16, 0.3),  # partial blocks on every axis
    ("spatial", (4, 6, 6), (4, 3, 4), 32, 64, 32, 64, torch.float16, 0.4),  # NB = 6, 48-token blocks
    ("temporal", (5, 4, 6), (2, 4, 6), 32, 16, 64, 16, torch.bfloat16, 0.5),  # block_n > kv_tile
    ("spatiotemporal", (6, 6, 8), (1, 2, 2), 16, 32, 16, 32, torch.bfloat16, 0.2),  # NB = 72: 3 words, not 2^n
])
def test_matches_reference(assert_close, device, layer, grid, block, kv_tile, block_m, block_n, D, dtype, density):
    part, q, k, v, rs = _layer_inputs(layer, grid, block, kv_tile, 2, 3, D, dtype, density, device, seed=D)
    out, lse = key_block_attention(q, k, v, rs, block_tile_start=part.block_tile_start,
                                   block_tile_count=part.block_tile_count, kv_tile_len=part.kv_tile_len,
                                   kv_tile=kv_tile, scale=0.3, block_m=block_m, block_n=block_n)
    same, ref32 = _reference_pair(q, k, v, rs, part, 0.3, device)
    assert_close("out", out, same[0], ref32[0])
    assert_close("lse", lse, same[1], ref32[1])


def test_chunked_equals_one_pass(device):
    """Pairs processed in several (sample, head) chunks give the same bits as one pass."""
    gen = torch.Generator().manual_seed(3)
    B, H, D = 2, 2, 32
    part = get_partition((3, 4, 8), "spatial", (3, 2, 4), 16, device)
    S = part.q_block.numel()
    q, k, v = (torch.randn(B, S, H, D, generator=gen).to(device, torch.bfloat16) for _ in range(3))
    k, v = k[:, part.kv_perm].contiguous(), v[:, part.kv_perm].contiguous()
    rs = _random_selection(B, H, part, 0.4, device, gen)
    kw = dict(block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
              kv_tile_len=part.kv_tile_len, kv_tile=16, block_m=16)
    one = key_block_attention(q, k, v, rs, **kw)
    pairs, _ = key_block_plan(rs, part.num_blocks, 16).per_head()
    assert len(_chunks(pairs, max(pairs))) == B * H
    many = key_block_attention(q, k, v, rs, max_pair_bytes=max(pairs) * (2 * D + 12), **kw)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])
    planned = key_block_attention(q, k, v, rs, plan=key_block_plan(rs, part.num_blocks, 16), **kw)
    assert torch.equal(one[0], planned[0]) and torch.equal(one[1], planned[1])
    with pytest.raises(ValueError, match="block_m=32"):
        key_block_attention(q, k, v, rs, plan=key_block_plan(rs, part.num_blocks, 32), **kw)


def test_plan_counts_pairs(device):
    gen = torch.Generator().manual_seed(5)
    part = get_partition((2, 4, 4), "spatiotemporal", (1, 2, 2), 16, device)
    rs = _random_selection(1, 2, part, 0.3, device, gen)
    plan = key_block_plan(rs, part.num_blocks)
    row_cnt, col_cnt, list_len = plan.row_cnt, plan.col_cnt, plan.list_len
    pairs, tiles = plan.per_head()
    bits = row_select_to_selection(rs, part.num_blocks).long()  # [1, 2, S, NB]
    assert torch.equal(row_cnt.long(), bits.sum(-1).flatten(0, 1))
    assert torch.equal(col_cnt.sum(-1).long(), bits.sum(-2).flatten(0, 1))
    assert torch.equal(list_len.long(), bits.sum(-2).flatten(0, 1))
    assert pairs == bits.sum((-1, -2)).flatten().tolist()
    assert tiles == ((bits.sum(-2) + 127) // 128).sum(-1).flatten().tolist()
    assert _chunks([5, 5, 5], 10) == [(0, 2), (2, 1)] and _chunks([12, 1], 10) == [(0, 1), (1, 1)]


def test_split_by_tile_fill(device):
    """The dense set of a (query tile, block) is the blocks at least min_fill of the tile's rows selected; the two
    masks partition every row's bits (72 blocks: 3 words; a last tile of 32 rows)."""
    gen = torch.Generator().manual_seed(11)
    B, H, S, NB, q_tile, min_fill = 2, 3, 160, 72, 64, 0.3
    sel = torch.rand(B, H, S, NB, generator=gen) < torch.rand(B, H, 1, NB, generator=gen)  # per-block rates
    rs = selection_to_row_select(sel).to(device)
    dense, sparse, union, layout = split_by_tile_fill(rs, NB, q_tile, min_fill)
    assert layout is None
    n_qt = -(-S // q_tile)
    rows = torch.tensor([min(q_tile, S - t * q_tile) for t in range(n_qt)], dtype=torch.float32)
    cnt = torch.stack([sel[:, :, t * q_tile:(t + 1) * q_tile].sum(2) for t in range(n_qt)], 2).float()
    want = (cnt > 0) & (cnt >= min_fill * rows[:, None])
    assert torch.equal(union.cpu(), want)
    assert 0 < int(want.sum()) < want.numel()  # both kinds occur
    tile_of_row = torch.arange(S) // q_tile
    dense_bits = sel & want[:, :, tile_of_row]
    assert torch.equal(row_select_to_selection(dense.cpu(), NB), dense_bits)
    assert torch.equal(row_select_to_selection(sparse.cpu(), NB), sel & ~dense_bits)
    assert torch.equal(dense.cpu() | sparse.cpu(), rs.cpu()) and not (dense.cpu() & sparse.cpu()).any()
    # the same kernel writes the dense sets as the query-tile layout: what compact_tiles makes of the union
    tiles_per_block = torch.randint(1, 4, (NB,), generator=gen, dtype=torch.int32)
    start = (torch.cumsum(tiles_per_block, 0) - tiles_per_block).to(torch.int32)
    kv_tile_group = torch.repeat_interleave(torch.arange(NB, dtype=torch.int32), tiles_per_block)
    n_kt = kv_tile_group.numel()
    block_tiles = (start.to(device), tiles_per_block.to(device), n_kt, int(tiles_per_block.max()))
    *_, (kv_count, kv_index) = split_by_tile_fill(rs, NB, q_tile, min_fill, block_tiles)
    want_count, want_index = compact_tiles(want, kv_tile_group)
    assert torch.equal(kv_count.cpu(), want_count)
    for b in range(B):
        for h in range(H):
            for t in range(n_qt):
                c = int(want_count[b, h, t])
                assert torch.equal(kv_index[b, h, t, :c].cpu(), want_index[b, h, t, :c]), (b, h, t)


@pytest.mark.parametrize("min_fill", [0.0, 0.35, 1.01])  # all pairs to query tiles / mixed / all to key blocks
@pytest.mark.parametrize("layer,grid,block,kv_tile,B,D,dtype,density", [
    ("spatiotemporal", (3, 5, 7), (2, 3, 4), 16, 2, 32, torch.bfloat16, 0.3),
    ("spatiotemporal", (6, 6, 8), (1, 2, 2), 16, 1, 16, torch.float16, 0.25),  # 72 blocks (one sample: CPU time)
])
def test_hybrid_matches_reference(assert_close, device, min_fill, layer, grid, block, kv_tile, B, D, dtype, density):
    part, q, k, v, rs = _layer_inputs(layer, grid, block, kv_tile, B, 2, D, dtype, density, device,
                                      seed=int(min_fill * 100) + D)
    out, lse, work = hybrid_block_attention(
        q, k, v, rs, block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
        kv_tile_len=part.kv_tile_len, kv_tile_group=part.kv_tile_group, kv_tile=kv_tile, scale=0.3, q_tile=32,
        min_fill=min_fill, return_work=True, block_m=16)
    same, ref32 = _reference_pair(q, k, v, rs, part, 0.3, device)
    assert_close("out", out, same[0], ref32[0])
    assert_close("lse", lse, same[1], ref32[1])
    _, key_work = key_block_attention(q, k, v, rs, block_tile_start=part.block_tile_start,
                                      block_tile_count=part.block_tile_count, kv_tile_len=part.kv_tile_len,
                                      kv_tile=kv_tile, return_work=True)[1:]
    if min_fill > 1:  # nothing dense: the key-block kernel's own work
        assert abs(float(work) - float(key_work)) < 1e-6
    else:  # whole tiles of the dense blocks: at least the selected keys' tiles
        assert float(work) >= float(key_work) - 1e-6


@pytest.mark.parametrize("backward,min_fill", [("union", 0.35), ("union", 2.0), ("split", 0.0), ("split", 0.35),
                                              ("split", 2.0), ("split-chunked", 0.35)])
def test_gradients_match_reference(monkeypatch, device, backward, min_fill):
    """Gradients of the hybrid (and, at min_fill > 1, the key-block) forward, dL/dout and dL/dlse both, against the
    masked-dense reference's: from the query-tile backward on the selection's tile layout ("union"), and split like
    the forward ("split": all pairs to the query tiles / mixed / all key-block-major; "-chunked": one (sample,
    head) per chunk of the key-block backward)."""
    from mixdit.kernels.router_reference import tile_layout_from_selection

    if backward == "split-chunked":
        monkeypatch.setattr(importlib.import_module("mixdit.kernels.key_block_attention"), "_KB_BWD_MAX_PAIR_BYTES", 1)
        backward = "split"

    part, q, k, v, rs = _layer_inputs("spatiotemporal", (3, 5, 7), (2, 3, 4), 16, 2, 3, 32, torch.bfloat16, 0.3,
                                      device, seed=11 + int(10 * min_fill))
    gen = torch.Generator().manual_seed(5)
    g_out = torch.randn(q.shape, generator=gen).to(device, q.dtype)
    g_lse = torch.randn(q.shape[0], q.shape[2], q.shape[1], generator=gen).to(device)
    union = tile_layout_from_selection(row_select_to_selection(rs, part.num_blocks), part.kv_tile_group, 64)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    hybrid = dict(q_tile=32, min_fill=min_fill) if min_fill <= 1 else {}
    out, lse, _ = exact_attention_with_grad(
        *leaves, rs, hybrid=min_fill <= 1, backward_layout=union, q_tile_backward=64, backward=backward,
        kv_tile_group=part.kv_tile_group, block_tile_start=part.block_tile_start,
        block_tile_count=part.block_tile_count, kv_tile_len=part.kv_tile_len, kv_tile=16, scale=0.3, block_m=16,
        **hybrid)
    torch.autograd.backward((out, lse), (g_out, g_lse))
    layout = dense_layout(q.shape[0], q.shape[2], q.shape[1], k.shape[1], 64, 16, device=device)
    extra = dict(kv_tile_len=part.kv_tile_len, row_select=rs, kv_tile_group=part.kv_tile_group)

    def reference_grads(upcast):
        ref = [(t.float() if upcast else t).detach().clone().requires_grad_(True) for t in (q, k, v)]
        o, l_ = block_sparse_attention_reference(*ref, *layout, q_tile=64, kv_tile=16, scale=0.3, upcast=upcast,
                                                 **extra)
        torch.autograd.backward((o, l_), (g_out.to(o.dtype), g_lse))
        return [t.grad.float() for t in ref]

    for name, leaf, r32, rs_ in zip("qkv", leaves, reference_grads(True), reference_grads(False)):
        tol = 2 * (rs_ - r32).abs().max().item() + 1e-5
        err = (leaf.grad.float() - r32).abs().max().item()
        assert torch.isfinite(leaf.grad).all() and err <= tol, f"d{name}: {err:.3e} > {tol:.3e}"


def test_hybrid_trims_a_layout_too_large_for_slot_masks(monkeypatch, assert_close, device):
    """Over the slot masks' memory cap the hybrid cuts its query-tile layout to the most tiles a query tile visits,
    so the forward still takes per-slot masks (Wan-14B 720p 3D layers): exact, and the masks were built."""
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    part, q, k, v, rs = _layer_inputs("spatiotemporal", (6, 6, 8), (1, 2, 2), 16, 2, 2, 32, torch.bfloat16, 0.01,
                                      device, seed=7)  # 72 blocks, sparse: no query tile visits every key tile
    n_qt, n_kt = -(-q.shape[1] // 32), part.kv_tile_len.numel()
    full_bytes = 2 * 2 * n_qt * n_kt * (bsa._slot_mask_words(32) + 1) * 4
    monkeypatch.setattr(bsa, "_SLOT_MASKS_MAX_BYTES", full_bytes - 1)  # the untrimmed layout no longer fits
    monkeypatch.setitem(bsa._FWD_OPTS, "slot_masks_below", 1 << 30)  # every step size takes slot masks when they fit
    built = []
    real = bsa.slot_masks
    monkeypatch.setattr(bsa, "slot_masks", lambda *a, **kw: built.append(a[2].shape[-1]) or real(*a, **kw))
    out, lse = hybrid_block_attention(
        q, k, v, rs, block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
        kv_tile_len=part.kv_tile_len, kv_tile_group=part.kv_tile_group, kv_tile=16, scale=0.3, q_tile=32,
        min_fill=0.0, block_m=16)
    assert built and 0 < built[0] < n_kt
    same, ref32 = _reference_pair(q, k, v, rs, part, 0.3, device)
    assert_close("out", out, same[0], ref32[0])
    assert_close("lse", lse, same[1], ref32[1])
