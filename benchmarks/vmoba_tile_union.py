"""CPU study for the exact VMoBA rule: how much compute could regrouping the queries save?

The exact (per-token) selection is computed, then the block-sparse kernel's work is counted (no timing): each
tile of 128 queries visits the union of its queries' blocks, as key tiles. In block order (today) the union of a
tile covers most key tiles in 2D/3D layers, so the exact rule computes nearly dense attention. The queries may be
visited in any order (the output is permuted back), so this script also counts the work after sorting each head's
queries by their selection, so that queries with the same blocks share tiles:

* ``block order``: today's tiles (queries in block order);
* ``sorted by selection``: each head's queries sorted lexicographically by their selection bit vector, blocks taken
  in order of how often they are selected (most common first), so that equal and similar sets are adjacent;
* ``block, then selection``: the same sort inside each block only (queries stay with their own block);
* ``sorted by selection word``: layers of at most 32 blocks only: each head's queries sorted by their selection as one
  integer (bit c = block c), what ``exact_kernel="auto"`` runs there (``attention/vmoba.py``);
* ``clustered by q`` / ``clustered by selection``: each head's queries split recursively at the median of their
  principal axis into groups of one query tile (a PCA tree; the directions of q, or the selection bit vectors), so
  that queries close in q-space or in their selected sets share tiles (session 10).

Prints, per layer type: the exact token density (selected keys / all keys, the FLOP floor), the tile density of
each order and the ratio to the floor; for the key-block-major kernel, what merging 2 or 4 neighbouring blocks
into one masked key set would do to its pairs (partial-output bytes) and computed keys (:func:`pair_grouping`); and
how the hybrid kernel would split the pairs at several fills (:func:`hybrid_split`, session 11). Inputs: ``smooth`` q/k as in ``vmoba_attention.py`` (low-frequency fields
over the grid plus noise) and i.i.d. ``random`` ones; with ``--model``, also the q/k a random-weight Wan2.1-1.3B
computes in layers 1-3 from smooth latents, as ``benchmarks/vmoba.py`` captures them (a 4-layer stack run on the
CPU in fp32: a few minutes). Those are far more structured than the synthetic fields (block-order unions ~0.5, not
~0.98), so read the two separately.

    python -P benchmarks/vmoba_tile_union.py [--grid 21,30,52] [--heads 12] [--model] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmoba_attention import HYBRID_FILLS  # noqa: E402  (one list for the CPU count and the GPU study)


def tile_density(sel: torch.Tensor, order: torch.Tensor, kv_tile_group: torch.Tensor, q_tile: int) -> float:
    """Key tiles visited / (query tiles x key tiles) when the queries of each head are taken in ``order``: the
    router's own per-query-tile union (``tile_layout_from_selection``) of the reordered selection.
    ``sel``: bool [H, S, NB]; ``order``: long [H, S]."""
    from mixdit.kernels.router_reference import tile_layout_from_selection

    H, S, NB = sel.shape
    ordered = torch.gather(sel, 1, order[..., None].expand(H, S, NB))
    kv_count, _ = tile_layout_from_selection(ordered[None], kv_tile_group, q_tile)
    return float(kv_count.double().sum() / (kv_count.numel() * kv_tile_group.numel()))


def pair_grouping(sel: torch.Tensor, block_size: torch.Tensor, group: int) -> tuple[float, float]:
    """For the key-block-major kernel (``kernels/key_block_attention.py``) with ``group`` consecutive blocks (block
    index order: neighbours along the last grid axis) merged into one key set per (query, group) with a per-row mask:
    (pairs, computed keys), each relative to ``group = 1`` (the exact pairs and the FLOP floor). Pairs are what the
    partial outputs cost in bytes; computed keys what the masked-out halves cost in FLOPs."""
    H, S, NB = sel.shape
    n_grp = -(-NB // group)
    pad = n_grp * group - NB
    sel_p = torch.nn.functional.pad(sel, (0, pad)).view(H, S, n_grp, group)
    size_p = torch.nn.functional.pad(block_size.double(), (0, pad)).view(n_grp, group)
    hit = sel_p.any(-1)  # [H, S, n_grp]
    pairs = float(hit.double().sum() / sel.double().sum())
    keys = float((hit.double() * size_p.sum(-1)).sum() / (sel.double() * block_size.double()).sum())
    return pairs, keys


def hybrid_split(sel: torch.Tensor, block_size: torch.Tensor, q_tile: int, fills=HYBRID_FILLS) -> dict:
    """For ``exact_kernel="hybrid"`` (``kernels/key_block_attention.py``): per (query tile, block) pair in block
    order, the block goes to the query-tile kernel when at least ``fill`` of the tile's rows selected it. Per fill:
    the share of the selected (query, block) pairs that go there (partials saved), the keys its whole tiles compute
    and the keys the key-block kernel still computes, both relative to the exact selection's (the FLOP floor)."""
    H, S, NB = sel.shape
    n_qt = -(-S // q_tile)
    pad = n_qt * q_tile - S
    cnt = torch.nn.functional.pad(sel, (0, 0, 0, pad)).view(H, n_qt, q_tile, NB).sum(2).float()
    rows = torch.full((n_qt,), float(q_tile))
    rows[-1] = q_tile - pad
    bs = block_size.float().cpu()
    pairs, floor = cnt.sum(), (cnt * bs).sum()
    out = {}
    for fill in fills:
        dense = (cnt > 0) & (cnt >= fill * rows[None, :, None])
        out[fill] = dict(pairs_to_query_tiles=float((cnt * dense).sum() / pairs),
                         query_tile_keys=float((dense * rows[None, :, None] * bs).sum() / floor),
                         key_block_keys=float((cnt * ~dense * bs).sum() / floor))
    return out


def lexicographic_order(sel: torch.Tensor) -> torch.Tensor:
    """Per head, the query order that sorts the selection bit vectors lexicographically (most often selected
    block as the most significant bit): stable sorts from the least to the most significant block."""
    H, S, NB = sel.shape
    order = torch.arange(S).expand(H, S).clone()
    for h in range(H):
        significance = sel[h].sum(0).argsort(descending=True)  # most common block first
        o = torch.arange(S)
        for c in significance.flip(0).tolist():  # least significant first; stable keeps earlier keys' order
            o = o[torch.argsort(~sel[h, o, c], stable=True)]
        order[h] = o
    return order


def pca_tree_order(x: torch.Tensor, leaf: int, power_steps: int = 8) -> torch.Tensor:
    """Per head, a query order from a PCA tree: the rows of ``x [H, S, d]`` are split recursively at the median
    of their top principal axis (power iteration from a fixed start) into groups of ``leaf`` rows, each group
    contiguous in the order (a split keeps whole tiles on each side). Returns long ``[H, S]``."""
    H, S, d = x.shape
    orders = []
    for h in range(H):
        pending, done = [torch.arange(S)], []
        while pending:
            idx = pending.pop()
            if idx.numel() <= leaf:
                done.append(idx)
                continue
            xc = x[h, idx] - x[h, idx].mean(0)
            axis = torch.ones(d, dtype=x.dtype)
            for _ in range(power_steps):
                axis = xc.T @ (xc @ axis)
                axis = axis / axis.norm().clamp_min(1e-30)
            ranked = idx[torch.argsort(xc @ axis)]
            cut = max(leaf, (idx.numel() // leaf + 1) // 2 * leaf)
            pending += [ranked[cut:], ranked[:cut]]  # the lower half is split (and emitted) first
        orders.append(torch.cat(done))
    return torch.stack(orders)


def model_qk(layers=(1, 2, 3)):
    """{layer: (q, k)} ([1, S, H, D], fp32) of a random-weight Wan2.1-1.3B's self-attention at 480p / 81 frames,
    from smooth latents (the first max(layers) + 1 blocks only, on the CPU)."""
    from vmoba import wan13b_layer_qkv

    store = wan13b_layer_qkv(layers, "cpu", torch.float32)
    return {i: (store[i][0], store[i][1]) for i in layers}


def main(argv=None):
    from mixdit.attention.vmoba import (SORTED_QUERY_MAX_BLOCKS, VMoBAConfig, _gather_tokens, partition_for_layer,
                                        selection_word_order)
    from mixdit.kernels import router_reference as rr
    from vmoba_attention import LAYER_OF_TYPE, _smooth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--grid", default="21,30,52", help="latent grid F,H,W after patchify (Wan2.1-1.3B 480p)")
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--layer-types", default="spatial,spatiotemporal,temporal")
    ap.add_argument("--model", action="store_true", help="also the q/k of a random-weight Wan2.1-1.3B (grid 21,30,52)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)
    grid = tuple(int(x) for x in a.grid.split(","))
    H, D = a.heads, a.head_dim
    S = grid[0] * grid[1] * grid[2]
    cfg = VMoBAConfig(min_tokens=0, dense_layers=())
    torch.manual_seed(0)
    inputs = {"smooth": (_smooth(1, grid, H, D, "cpu", torch.float32, 1), _smooth(1, grid, H, D, "cpu", torch.float32, 2)),
              "random": (torch.randn(1, S, H, D), torch.randn(1, S, H, D))}
    cases = [(kind, layer_type, qk) for kind, qk in inputs.items() for layer_type in a.layer_types.split(",")]
    if a.model:
        assert grid == (21, 30, 52) and H == 12 and D == 128, "--model: Wan2.1-1.3B 480p (the default grid and heads)"
        t0 = time.time()
        captured = model_qk(tuple(LAYER_OF_TYPE[t] for t in a.layer_types.split(",")))
        print(f"model q/k captured in {time.time() - t0:.0f} s", flush=True)
        cases += [("model", t, captured[LAYER_OF_TYPE[t]]) for t in a.layer_types.split(",")]
    rows = []
    for kind, layer_type, (q, k) in cases:
        t0 = time.time()
        part = partition_for_layer(grid, LAYER_OF_TYPE[layer_type], cfg, "cpu")
        qb, kb = _gather_tokens(q, part.q_perm), _gather_tokens(k, part.q_perm)  # unpadded block order
        sel = rr.select_blocks_reference(qb, kb, part.q_block, part.q_block, part.num_blocks,
                                         selection=cfg.selection, threshold=cfg.threshold,
                                         dtype=torch.float32)[0]  # [H, S, NB]
        token_density = float(rr.selected_key_fraction(sel[None], part.block_size))
        block_order = torch.arange(S).expand(H, S)
        lex = lexicographic_order(sel)
        within = torch.gather(lex, 1, torch.argsort(part.q_block[lex], dim=1, stable=True))  # own block first
        q_dir = torch.nn.functional.normalize(qb[0].float().transpose(0, 1), dim=-1)  # [H, S, D]
        dens = {"block order": tile_density(sel, block_order, part.kv_tile_group, cfg.q_tile),
                "sorted by selection": tile_density(sel, lex, part.kv_tile_group, cfg.q_tile),
                "block, then selection": tile_density(sel, within, part.kv_tile_group, cfg.q_tile),
                "clustered by q": tile_density(sel, pca_tree_order(q_dir, cfg.q_tile), part.kv_tile_group, cfg.q_tile),
                "clustered by selection": tile_density(sel, pca_tree_order(sel.float(), cfg.q_tile),
                                                       part.kv_tile_group, cfg.q_tile)}
        if part.num_blocks <= SORTED_QUERY_MAX_BLOCKS:
            word_order = selection_word_order(rr.selection_to_row_select(sel[None]))[0]
            dens["sorted by selection word"] = tile_density(sel, word_order, part.kv_tile_group, cfg.q_tile)
        grouping = {g: pair_grouping(sel, part.block_size, g) for g in (2, 4)}
        hybrid = hybrid_split(sel, part.block_size, cfg.q_tile)
        row = dict(input=kind, layer_type=layer_type, grid=list(grid), heads=H, blocks=part.num_blocks,
                   token_density=token_density, tile_density=dens,
                   key_block_grouping={g: dict(pairs=p, computed_keys=c) for g, (p, c) in grouping.items()},
                   hybrid_split={str(f): h for f, h in hybrid.items()}, seconds=time.time() - t0)
        rows.append(row)
        print(f"{kind:6s} {layer_type:14s} blocks {part.num_blocks:4d}  token density {token_density:.3f}  " +
              "  ".join(f"{name}: tiles {d:.3f} ({d / token_density:.2f}x the floor)" for name, d in dens.items()) +
              "  | key blocks merged by " + "  ".join(f"{g}: pairs {p:.2f}x, keys {c:.2f}x" for g, (p, c) in grouping.items()),
              flush=True)
        print("   hybrid split (fill: pairs to query tiles / their keys / key-block keys, x the floor): " + "  ".join(
            f"{f}: {h['pairs_to_query_tiles']:.3f} / {h['query_tile_keys']:.2f} / {h['key_block_keys']:.2f}"
            for f, h in hybrid.items()), flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(rows=rows, threshold=cfg.threshold, q_tile=cfg.q_tile), f, indent=1)


if __name__ == "__main__":
    main()
