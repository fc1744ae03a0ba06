"""mixdit.kernels.key_block_attention vs the naive reference (CPU via TRITON_INTERPRET, and CUDA)."""

import pytest
import torch

from mixdit.attention.vmoba import get_partition
from mixdit.kernels.key_block_attention import _chunks, key_block_attention, key_block_plan
from mixdit.kernels.reference import block_sparse_attention_reference, dense_layout
from mixdit.kernels.router_reference import row_select_to_selection, selection_to_row_select


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    import importlib
    monkeypatch.setattr(importlib.import_module("mixdit.kernels.key_block_attention"), "_POISON_OUTPUTS", True)


def _random_selection(B, H, part, density, device, gen):
    """Per-row bitmask [B, H, Sq, W]: each block with probability ``density``, the row's own block always."""
    S, NB = part.q_block.numel(), part.num_blocks
    sel = torch.rand(B, H, S, NB, generator=gen) < density
    sel[..., torch.arange(S), part.q_block.long().cpu()] = True
    return selection_to_row_select(sel).to(device)


@pytest.mark.parametrize("layer,grid,block,kv_tile,block_m,block_n,D,dtype,density", [
    ("spatiotemporal", (3, 5, 7), (2, 3, 4), 16, 32, 32, 32, torch.bfloat16, 0.3),  # partial blocks on every axis
    ("spatial", (4, 6, 6), (4, 3, 4), 32, 64, 32, 64, torch.float16, 0.4),  # NB = 6, 48-token blocks
    ("temporal", (5, 4, 6), (2, 4, 6), 32, 16, 64, 16, torch.bfloat16, 0.5),  # block_n > kv_tile
])
def test_matches_reference(assert_close, device, layer, grid, block, kv_tile, block_m, block_n, D, dtype, density):
    gen = torch.Generator().manual_seed(D)
    B, H = 2, 3
    part = get_partition(grid, layer, block, kv_tile, device)
    S = part.q_block.numel()
    x = [torch.randn(B, S, H, D, generator=gen).to(device, dtype) for _ in range(3)]
    q = x[0][:, part.q_perm]
    k, v = (t[:, part.kv_perm].contiguous() for t in x[1:])
    rs = _random_selection(B, H, part, density, device, gen)
    scale = 0.3
    out, lse = key_block_attention(q, k, v, rs, block_tile_start=part.block_tile_start,
                                   block_tile_count=part.block_tile_count, kv_tile_len=part.kv_tile_len,
                                   kv_tile=kv_tile, scale=scale, block_m=block_m, block_n=block_n)
    layout = dense_layout(B, H, S, k.shape[1], 64, kv_tile, device=device)
    extra = dict(kv_tile_len=part.kv_tile_len, row_select=rs, kv_tile_group=part.kv_tile_group)
    ref32 = block_sparse_attention_reference(q.float(), k.float(), v.float(), *layout, q_tile=64, kv_tile=kv_tile,
                                             scale=scale, **extra)
    same = block_sparse_attention_reference(q, k, v, *layout, q_tile=64, kv_tile=kv_tile, scale=scale,
                                            upcast=False, **extra)
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
    *_, pairs, _ = key_block_plan(rs, part.num_blocks, 16)
    assert len(_chunks(pairs, max(pairs))) == B * H
    many = key_block_attention(q, k, v, rs, max_pair_bytes=max(pairs) * (2 * D + 12), **kw)
    assert torch.equal(one[0], many[0]) and torch.equal(one[1], many[1])


def test_plan_counts_pairs(device):
    gen = torch.Generator().manual_seed(5)
    part = get_partition((2, 4, 4), "spatiotemporal", (1, 2, 2), 16, device)
    rs = _random_selection(1, 2, part, 0.3, device, gen)
    row_cnt, col_cnt, list_len, pairs, _ = key_block_plan(rs, part.num_blocks)
    bits = row_select_to_selection(rs, part.num_blocks).long()  # [1, 2, S, NB]
    assert torch.equal(row_cnt.long(), bits.sum(-1).flatten(0, 1))
    assert torch.equal(col_cnt.sum(-1).long(), bits.sum(-2).flatten(0, 1))
    assert torch.equal(list_len.long(), bits.sum(-2).flatten(0, 1))
    assert pairs == bits.sum((-1, -2)).flatten().tolist()
    assert _chunks([5, 5, 5], 10) == [(0, 2), (2, 1)] and _chunks([12, 1], 10) == [(0, 1), (1, 1)]
