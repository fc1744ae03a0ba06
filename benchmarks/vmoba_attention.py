"""GPU microbenchmark: VMoBA router + permutation + block-sparse kernel vs cuDNN dense SDPA.

Shapes: Wan2.1-1.3B 480p/81 frames (grid 21x30x52, H=12, D=128, B=1 and 2) and Wan2.1-14B 720p
(grid 21x45x80, H=40, D=128, B=1); each layer type (1D/2D/3D) with the default VMoBAConfig
(threshold 0.25 per query-head). Two inputs per shape:

* ``random``: i.i.d. Gaussian q/k/v (nearly uniform gates: density is unrealistic);
* ``smooth``: low-frequency q/k over the (frame, row, col) grid plus a little noise, so nearby
  tokens look alike and the selection behaves more like real video.

Per row: router ms (block means + fused selection + layout), permutation ms (q/k/v gathers and the
output un-permute), sparse kernel ms, total, achieved density (selected key tokens / all) and tile
density (what the kernel computes), dense cuDNN SDPA ms and the speed-up.
Writes ``benchmarks/results/vmoba-attention-<gpu>.json``. Usage: ``python benchmarks/vmoba_attention.py
[--quick]`` (``--quick``: 1.3B B=1 only). Budget: < 4 minutes on one H100.

``--route-query-tiles``: only the ``granularity="query_tile"`` router at Wan2.1-1.3B 480p (1D/2D/3D,
random and smooth inputs): fused Triton router vs the PyTorch reference (ms, CUDA kernels launched per
call, tiles whose selection differs). Writes ``benchmarks/results/vmoba-query-tile-router-<gpu>.json``.

Kernel studies: ``--kernel-ab`` (forward switches per layer), ``--kernel-configs`` (forward configs of the 3D
layers), ``--layout-probe`` (VMoBA layouts vs random ones of the same density: masks, tile order, count spread),
``--bwd-ab`` (forward + backward with backward switches), ``--gathers``, ``--profile-router``, ``--key-blocks`` (the
exact rule: key-block attention vs the query-tile kernel, per layer type), ``--train`` (the exact rule with gradients:
forward and forward + backward per layer type, query tiles vs the hybrid forward).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from mixdit.attention.vmoba_config import VMoBAConfig, layer_type_for

SHAPES = [
    ("wan1.3b-480p", (21, 30, 52), 12, 128, 1),
    ("wan1.3b-480p", (21, 30, 52), 12, 128, 2),
    ("wan14b-720p", (21, 45, 80), 40, 128, 1),
]


def _write_result(out: dict, filename: str) -> dict:
    """Write ``out`` as JSON under ``benchmarks/results/`` and return it."""
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    path = os.path.join(os.path.dirname(__file__), "results", filename)
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)
    return out


def _bench(fn, reps=20):
    import triton
    return float(triton.testing.do_bench(fn, warmup=5, rep=reps, return_mode="median"))


def _smooth(B, grid, H, D, dev, dtype, seed):
    """Low-frequency fields over the grid: a sum of a few random plane waves per channel."""
    g = torch.Generator(device=dev).manual_seed(seed)
    Fg, Hg, Wg = grid
    f = torch.linspace(0, 1, Fg, device=dev).view(-1, 1, 1)
    y = torch.linspace(0, 1, Hg, device=dev).view(1, -1, 1)
    x = torch.linspace(0, 1, Wg, device=dev).view(1, 1, -1)
    out = torch.zeros(B, Fg, Hg, Wg, H, D, device=dev)
    for _ in range(4):
        kf, ky, kx = (torch.randn(B, 1, 1, 1, H, D, device=dev, generator=g) * 3 for _ in range(3))
        ph = torch.rand(B, 1, 1, 1, H, D, device=dev, generator=g) * 2 * math.pi
        out += torch.cos(2 * math.pi * (kf * f[..., None, None] + ky * y[..., None, None] + kx * x[..., None, None]) + ph)
    out = out / 2 + 0.1 * torch.randn(out.shape, device=dev, generator=g)
    return out.reshape(B, Fg * Hg * Wg, H, D).to(dtype)


# --kernel-ab: the sparse kernel again with forward switches flipped (what each is worth on VMoBA layouts). Session 8
# removed the candidates measured here (exp2_group, group_small_tiles: NOTES); new ones go in this table.
KERNEL_AB = {"no-len-tail": {"tail_only_mask": False}}
BWD_AB = {"dq": "atomic"}  # --bwd-ab: backward switches timed against the defaults
# a layer index of each type under the default cycle (1D -> 2D -> 3D from layer 0), in the order the tables print
LAYER_OF_TYPE = {layer_type_for(i, VMoBAConfig()): i for i in (1, 2, 3)}


def run(quick: bool = False, selection: str = "threshold", kv_tile_3d: int | None = None,
        granularity: str = "token", kernel_ab: bool = False, kernel_configs=(), layer_types=tuple(LAYER_OF_TYPE)):
    """``kernel_configs``: forward configs (BLOCK_M, BLOCK_N, warps, stages) also timed on the layers with small
    key tiles (3D: 32 keys; BLOCK_N is clipped to the tile), e.g. to tune the 3D layers' config."""
    from mixdit.attention.vmoba import _gather_tokens, _kernel_attention, partition_for_layer, route
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dev, dt = "cuda", torch.bfloat16
    extra = {} if kv_tile_3d is None else dict(kv_tile_spatiotemporal=kv_tile_3d)  # None: the config's default
    cfg = VMoBAConfig(selection=selection, min_tokens=0, dense_layers=(), granularity=granularity, **extra)
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    rows = []
    t_start = time.time()
    for name, grid, H, D, B in (SHAPES[:1] if quick else SHAPES):
        S = grid[0] * grid[1] * grid[2]
        scale = 1 / math.sqrt(D)
        for kind in ("random", "smooth"):
            if kind == "random":
                q, k, v = (torch.randn(B, S, H, D, device=dev, dtype=dt) for _ in range(3))
            else:
                q = _smooth(B, grid, H, D, dev, dt, 1)
                k = _smooth(B, grid, H, D, dev, dt, 2)
                v = torch.randn(B, S, H, D, device=dev, dtype=dt)
            qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))
            try:
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                    dense_ms = _bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=scale))
            except RuntimeError:  # no cuDNN attention: the default SDPA backend
                dense_ms = _bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=scale))
            for layer in (LAYER_OF_TYPE[t] for t in layer_types):
                part = partition_for_layer(grid, layer, cfg, dev)
                qb = _gather_tokens(q, part.q_perm)  # contiguous, as vmoba_attention passes them
                kb = _gather_tokens(k, part.kv_perm)
                vb = _gather_tokens(v, part.kv_perm)

                def permute():  # the gathers vmoba_attention does (last: the output's way back), none for identities
                    a = q if part.q_is_identity else _gather_tokens(q, part.q_perm)
                    if not part.kv_is_identity:
                        _gather_tokens(k, part.kv_perm), _gather_tokens(v, part.kv_perm)
                    return a if part.q_is_identity else _gather_tokens(a, part.q_inv)

                r = route(qb, kb, part, cfg)
                router_ms = _bench(lambda: route(qb, kb, part, cfg))
                perm_ms = _bench(permute)

                def sparse():
                    return _kernel_attention(qb, kb, vb, r.kv_count, r.kv_index, q_tile=cfg.q_tile,
                                             kv_tile=part.kv_tile, scale=scale, kv_tile_len=part.kv_tile_len,
                                             row_select=r.row_select,
                                             kv_tile_group=None if r.row_select is None else part.kv_tile_group)

                sparse_ms = _bench(sparse)
                sparse_ab = {}
                if kernel_ab:
                    for tag, opts in KERNEL_AB.items():
                        with bsa.forward_variant(opts):
                            sparse_ab[tag] = _bench(sparse)
                for c in kernel_configs if part.kv_tile < cfg.kv_tile else ():
                    with bsa.forward_variant(config=c):
                        try:
                            sparse_ab[",".join(map(str, c))] = _bench(sparse)
                        except Exception as e:  # e.g. out of shared memory: record and go on
                            print(f"config {c}: {type(e).__name__}: {str(e).splitlines()[0][:100]}", flush=True)
                total = router_ms + perm_ms + sparse_ms
                row = dict(model=name, grid=list(grid), B=B, H=H, D=D, tokens=S, input=kind,
                           layer_type=part.layer_type, blocks=part.num_blocks, kv_tiles=part.num_kv_tiles,
                           selection=selection, router_ms=router_ms, permute_ms=perm_ms, sparse_ms=sparse_ms,
                           total_ms=total, density=float(r.density), tile_density=float(r.tile_density),
                           dense_cudnn_ms=dense_ms, speedup=dense_ms / total)
                if sparse_ab:
                    row["sparse_ab_ms"] = sparse_ab
                rows.append(row)
                print(f"{name:13s} B={B} {kind:6s} {part.layer_type:14s} blocks={part.num_blocks:4d} "
                      f"router {router_ms:6.2f}  perm {perm_ms:6.2f}  sparse {sparse_ms:7.2f}  total {total:7.2f} ms"
                      f"  density {row['density']:.3f} (tiles {row['tile_density']:.3f})  dense {dense_ms:7.2f} ms"
                      f"  x{row['speedup']:.2f}" + "".join(f"  [{t} {ms:.2f}]" for t, ms in sparse_ab.items()), flush=True)
            del q, k, v, qh, kh, vh
            torch.cuda.empty_cache()
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
               triton=__import__("triton").__version__, config=dict(selection=selection, threshold=cfg.threshold,
               q_tile=cfg.q_tile, kv_tile=cfg.kv_tile, kv_tile_3d=cfg.kv_tile_spatiotemporal, granularity=granularity,
               router_precision=cfg.router_precision),
               wall_s=time.time() - t_start, rows=rows)
    tag = ("" if granularity == "token" else f"-{granularity}") + ("" if kv_tile_3d is None else f"-kv3d{kv_tile_3d}")
    tag += ("-kernel-ab" if kernel_ab else "") + ("-configs" if kernel_configs else "")
    tag += "" if set(layer_types) == set(LAYER_OF_TYPE) else "-" + "-".join(layer_types)
    return _write_result(out, f"vmoba-attention{tag}-{gpu}.json")


# --key-blocks launch variants (BLOCK_M, BLOCK_N, warps, stages). Session 9, run 1: of (128|64, 32|64|128, 4|8, 2)
# 128 x 32 with 4 warps won in every layer type (results/vmoba-key-blocks-variants-session9-*.json); run 2 timed a
# K/V-resident kernel (several query tiles per program), slower everywhere (...-resident-session9-*.json, removed).
# Session 10, run 3 (results/vmoba-key-blocks-tma-session10-*.json): K/V by TMA (in-kernel descriptors) lost in
# 2D/3D (1.3B spatial 6.9 vs 6.6 ms, 3D 14.1 vs 13.4) and won only in 1D with 64-key steps (5.1 vs 5.6 ms), where
# the sorted query tiles already run; removed again.
# Run 4 (...-maxnreg-session10-*.json): the attention kernel takes 255 registers per thread (2 programs per SM, ncu);
# capped by ptx .maxnreg: 128 x 32 at 168 or 128 registers spilled (1.4-2.3x slower); 64 x 32 at 128 registers
# was 5% slower in 2D, 5% faster in 3D, 10% faster in 1D; not kept (2D is where the key blocks run). Run 5
# (...-m256-session10-*.json): 256-query tiles, 8 or 16 warps, 10-25% slower in 2D and 3D.
KEY_BLOCK_VARIANTS = ((128, 32, 4, 1), (128, 32, 4, 3), (64, 32, 4, 2), (64, 32, 2, 2), (32, 32, 2, 2),
                      (64, 64, 4, 2), (128, 32, 8, 2))


# min_fill values the hybrid studies sweep (this GPU study and vmoba_tile_union's CPU count)
HYBRID_FILLS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75)


def key_blocks_study(shapes=(SHAPES[0], SHAPES[2]), layer_types=tuple(LAYER_OF_TYPE), variants=True,
                     source: str = "smooth", kv_tile_3d: int | None = None) -> dict:
    """The exact rule's kernels on smooth q/k (or the model's, ``source="model"``), per layer type: router (per-token, no query-tile layout),
    key-block attention (default launch and, with ``variants``, ``KEY_BLOCK_VARIANTS``), its kernels' GPU time
    (profiler), the query-tile kernel on the same selection (router with layout + kernel; where the default
    ``exact_kernel="auto"`` sorts the queries by selection, that path too: sort, gathers, layout, kernel)
    and cuDNN dense; max |key_blocks - query_tiles| of the outputs; the hybrid kernel (``exact_kernel="hybrid"``)
    at each of ``HYBRID_FILLS`` and its kernels' GPU time at VMoBA's own launch (``hybrid_launch``). ``source="model"``: the q/k/v of
    a random-weight Wan2.1-1.3B (:func:`_model_layers`) instead of the synthetic smooth fields. ``kv_tile_3d``: key
    tile of the 3D layers (default ``VMoBAConfig``'s). Writes ``vmoba-key-blocks[-model]-<gpu>.json``."""
    from mixdit.attention.vmoba import _kernel_attention, _sorted_query_tile_call, attention_path, hybrid_launch, route
    from mixdit.kernels.key_block_attention import hybrid_block_attention, key_block_attention

    cfg = VMoBAConfig(min_tokens=0, dense_layers=(), **({} if kv_tile_3d is None else
                                                        dict(kv_tile_spatiotemporal=kv_tile_3d)))
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    rows, dense = [], {}
    layers = _model_layers(layer_types, cfg) if source == "model" else _smooth_layers(shapes, layer_types, cfg)
    for name, B, D, layer_type, part, qb, kb, vb, r1, raster in layers:
        H, S = qb.shape[2], qb.shape[1]
        scale = 1 / math.sqrt(D)
        if (name, B) not in dense:  # cuDNN dense attention on the raster tensors, once per shape
            qh, kh, vh = (t.transpose(1, 2) for t in raster)
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                dense[name, B] = _bench(lambda: F.scaled_dot_product_attention(qh, kh, vh, scale=scale))
            del qh, kh, vh
        dense_ms = dense[name, B]
        kw = dict(block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
                  kv_tile_len=part.kv_tile_len, kv_tile=part.kv_tile, scale=scale)
        r0 = route(qb, kb, part, cfg, tile_layout=False)
        router_ms = _bench(lambda: route(qb, kb, part, cfg, tile_layout=False))
        out_kb, _, work = key_block_attention(qb, kb, vb, r0.row_select, return_work=True, **kw)
        kb_ms = _bench(lambda: key_block_attention(qb, kb, vb, r0.row_select, **kw))
        prof = _gpu_ms_per_kernel(lambda: key_block_attention(qb, kb, vb, r0.row_select, **kw))
        var = {}
        if variants:
            for bm, bn, nw, ns in KEY_BLOCK_VARIANTS:
                try:
                    var[f"{bm},{bn},{nw},{ns}"] = _bench(lambda: key_block_attention(
                        qb, kb, vb, r0.row_select, block_m=bm, block_n=bn, num_warps=nw, num_stages=ns, **kw))
                except Exception as e:  # out of resources: record and go on
                    print(f"variant {bm},{bn},{nw},{ns}: {type(e).__name__}: {str(e).splitlines()[0][:90]}", flush=True)
        hyb = {}
        for fill in HYBRID_FILLS:
            hkw = dict(kv_tile_group=part.kv_tile_group, q_tile=cfg.q_tile, min_fill=fill, **kw)
            out_h, _, work_h = hybrid_block_attention(qb, kb, vb, r0.row_select, return_work=True, **hkw)
            hyb[fill] = dict(ms=_bench(lambda: hybrid_block_attention(qb, kb, vb, r0.row_select, **hkw)),
                             work=float(work_h), max_abs_diff=(out_h.float() - out_kb.float()).abs().max().item())
            del out_h
        hyb_prof = _gpu_ms_per_kernel(lambda: hybrid_block_attention(
            qb, kb, vb, r0.row_select, kv_tile_group=part.kv_tile_group, **hybrid_launch(part, cfg), **kw))
        router_layout_ms = _bench(lambda: route(qb, kb, part, cfg))

        def qt():
            return _kernel_attention(qb, kb, vb, r1.kv_count, r1.kv_index, q_tile=cfg.q_tile, kv_tile=part.kv_tile,
                                     scale=scale, kv_tile_len=part.kv_tile_len, row_select=r1.row_select,
                                     kv_tile_group=part.kv_tile_group)
        out_qt = qt()[0]
        qt_ms = _bench(qt)
        diff = (out_kb.float() - out_qt.float()).abs().max().item()
        sorted_qt = {}
        if attention_path(cfg, part, qb, kb, vb) == "sorted_query_tiles":
            out_s, _, work_s = _sorted_query_tile_call(qb, kb, vb, r0.row_select, part, cfg, scale)
            sorted_ms = _bench(lambda: _sorted_query_tile_call(qb, kb, vb, r0.row_select, part, cfg, scale))
            sorted_qt = dict(sorted_query_tiles_ms=sorted_ms, sorted_query_tiles_total_ms=router_ms + sorted_ms,
                             sorted_query_tile_work=float(work_s),
                             sorted_max_abs_diff=(out_kb.float() - out_s.float()).abs().max().item())
            del out_s
        row = dict(model=name, B=B, H=H, tokens=S, layer_type=part.layer_type, blocks=part.num_blocks, kv_tile=part.kv_tile,
                   density=float(r0.density), key_block_work=float(work), query_tile_work=float(r1.tile_density),
                   router_ms=router_ms, key_blocks_ms=kb_ms, key_blocks_total_ms=router_ms + kb_ms,
                   key_blocks_kernels_ms=prof, key_blocks_variants_ms=var, router_with_layout_ms=router_layout_ms,
                   query_tiles_ms=qt_ms, query_tiles_total_ms=router_layout_ms + qt_ms, dense_cudnn_ms=dense_ms,
                   max_abs_diff=diff, hybrid={str(f): h for f, h in hyb.items()}, hybrid_kernels_ms=hyb_prof,
                   **sorted_qt)
        rows.append(row)
        print(f"{name:13s} {part.layer_type:14s} kv_tile {part.kv_tile:3d} dens {row['density']:.3f} work kb {work:.3f} qt "
              f"{row['query_tile_work']:.3f} | router {router_ms:6.2f} keyblk {kb_ms:7.2f} = {router_ms + kb_ms:7.2f}"
              f" | qtiles {router_layout_ms:6.2f}+{qt_ms:7.2f} | dense {dense_ms:7.2f} | diff {diff:.2e}", flush=True)
        if sorted_qt:
            print(f"   sorted query tiles: work {sorted_qt['sorted_query_tile_work']:.3f}, router {router_ms:6.2f} + "
                  f"{sorted_qt['sorted_query_tiles_ms']:7.2f} = {sorted_qt['sorted_query_tiles_total_ms']:7.2f} ms, "
                  f"diff {sorted_qt['sorted_max_abs_diff']:.2e}", flush=True)
        print("   kernels:", prof, flush=True)
        print("   variants:", {kk: round(vv, 2) for kk, vv in var.items()}, flush=True)
        print("   hybrid (min_fill: ms / work / diff):", "  ".join(
            f"{f}: {h['ms']:.2f} / {h['work']:.3f} / {h['max_abs_diff']:.1e}" for f, h in hyb.items()), flush=True)
        print("   hybrid kernels:", hyb_prof, flush=True)
        del qb, kb, vb, r0, r1, out_kb, out_qt
        torch.cuda.empty_cache()
    return _write_result(dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__,
                              triton=__import__("triton").__version__, rows=rows),
                         f"vmoba-key-blocks{'-model' if source == 'model' else ''}-{gpu}.json")


def _gpu_ms_per_kernel(fn) -> dict:
    """GPU ms of each kernel one call of ``fn`` launches (torch profiler; CPU-side ops report 0 and are left out)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as pr:
        fn()
        torch.cuda.synchronize()
    return {e.key[:60]: round(e.device_time_total / 1e3, 3) for e in pr.key_averages() if e.device_time_total}


def _count_kernels(fn) -> int:
    """CUDA kernels one call of ``fn`` launches (torch profiler; -1 if it is unavailable)."""
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA
                   and not e.name.startswith("Memcpy"))
    except Exception:  # profiler missing or refused: the timing still counts
        return -1


def time_query_tile_router(selection: str = "threshold", batch: int = 1, reps: int = 50):
    """``route_query_tiles`` (fused Triton) vs ``route_query_tiles_reference`` (PyTorch) per layer type."""
    from mixdit.attention.vmoba import (partition_for_layer, route_query_tiles,
                                        route_query_tiles_reference)
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    dev, dt = "cuda", torch.bfloat16
    name, grid, H, D = "wan1.3b-480p", (21, 30, 52), 12, 128
    cfg = VMoBAConfig(selection=selection, granularity="query_tile", min_tokens=0, dense_layers=())
    S = grid[0] * grid[1] * grid[2]
    rows = []
    for kind in ("random", "smooth"):
        if kind == "random":
            q, k = (torch.randn(batch, S, H, D, device=dev, dtype=dt) for _ in range(2))
        else:
            q, k = _smooth(batch, grid, H, D, dev, dt, 1), _smooth(batch, grid, H, D, dev, dt, 2)
        for layer in (3, 1, 2):  # temporal, spatial, spatiotemporal
            part = partition_for_layer(grid, layer, cfg, dev)
            qb = q[:, part.q_perm].contiguous()
            kb = k[:, part.kv_perm].contiguous()
            a = route_query_tiles(qb, kb, part, cfg)
            b = route_query_tiles_reference(qb, kb, part, cfg)
            # the layout contract leaves kv_index past each count unspecified: compare the visited tiles only
            visited = torch.arange(a.kv_index.shape[-1], device=dev) < a.kv_count[..., None]
            diff = (a.kv_count != b.kv_count) | ((a.kv_index != b.kv_index) & visited).any(-1)
            fused_ms = _bench(lambda: route_query_tiles(qb, kb, part, cfg), reps)
            ref_ms = _bench(lambda: route_query_tiles_reference(qb, kb, part, cfg), reps)
            row = dict(model=name, B=batch, input=kind, layer_type=part.layer_type, blocks=part.num_blocks,
                       kv_tiles=part.num_kv_tiles, query_tiles=int(a.kv_count.shape[-1]), selection=selection,
                       fused_ms=fused_ms, reference_ms=ref_ms, speedup=ref_ms / fused_ms,
                       fused_kernels=_count_kernels(lambda: route_query_tiles(qb, kb, part, cfg)),
                       reference_kernels=_count_kernels(lambda: route_query_tiles_reference(qb, kb, part, cfg)),
                       tiles_differing=int(diff.sum()), tiles=diff.numel(), tile_density=float(a.tile_density),
                       density=float(a.density), density_reference=float(b.density))
            rows.append(row)
            print(f"{name} B={batch} {kind:6s} {part.layer_type:14s} blocks={part.num_blocks:4d} {selection}: "
                  f"fused {fused_ms:6.3f} ms ({row['fused_kernels']} kernels)  reference {ref_ms:6.3f} ms "
                  f"({row['reference_kernels']} kernels)  x{row['speedup']:.1f}  tiles differing "
                  f"{row['tiles_differing']}/{row['tiles']}  tile density {row['tile_density']:.3f}", flush=True)
        del q, k
        torch.cuda.empty_cache()
    gpu = torch.cuda.get_device_name().replace(" ", "-")
    out = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=__import__("triton").__version__,
               rows=rows)
    return _write_result(out, f"vmoba-query-tile-router-{gpu}.json")


def router_times(batch: int = 2, reps: int = 50, grid=(21, 30, 52), heads: int = 12, dev: str = "cuda",
                 bench=None) -> list[dict]:
    """The VMoBA routers alone at Wan2.1-1.3B 480p (smooth q/k, B=2: a CFG batch), per layer type: the exact
    per-token router (``route``) and the fused ``query_tile`` router, each with the sparse kernel on the layout
    it produced (so the router's share of its own attention call is visible). ``benchmarks/attention.py``
    reports these next to the block-sparse kernel's time at density 0.25."""
    from mixdit.attention.vmoba import _kernel_attention, partition_for_layer, route
    bench = bench or _bench
    dt = torch.bfloat16
    name, H, D = ("wan1.3b-480p" if tuple(grid) == (21, 30, 52) else "grid" + "x".join(map(str, grid))), heads, 128
    S = grid[0] * grid[1] * grid[2]
    q, k = _smooth(batch, grid, H, D, dev, dt, 1), _smooth(batch, grid, H, D, dev, dt, 2)
    v = torch.randn(batch, S, H, D, device=dev, dtype=dt)
    rows = []
    for granularity in ("token", "query_tile"):
        cfg = VMoBAConfig(granularity=granularity, min_tokens=0, dense_layers=())
        for layer in (3, 1, 2):  # temporal, spatial, spatiotemporal
            part = partition_for_layer(grid, layer, cfg, dev)
            qb, kb, vb = q[:, part.q_perm].contiguous(), k[:, part.kv_perm].contiguous(), v[:, part.kv_perm].contiguous()
            r = route(qb, kb, part, cfg)  # dispatches on cfg.granularity
            router_ms = bench(lambda: route(qb, kb, part, cfg), reps)
            sparse_ms = bench(lambda: _kernel_attention(
                qb, kb, vb, r.kv_count, r.kv_index, q_tile=cfg.q_tile, kv_tile=part.kv_tile, scale=D ** -0.5,
                kv_tile_len=part.kv_tile_len, row_select=r.row_select,
                kv_tile_group=None if r.row_select is None else part.kv_tile_group), reps)
            rows.append(dict(model=name, B=batch, H=H, D=D, tokens=S, granularity=granularity,
                             layer_type=part.layer_type, router_ms=router_ms, sparse_ms=sparse_ms,
                             share_of_own_call=router_ms / (router_ms + sparse_ms), density=float(r.density),
                             tile_density=float(r.tile_density)))
    del q, k, v
    torch.cuda.empty_cache()
    return rows


def _smooth_layers(shapes, layer_types, cfg, requires_grad: bool = False):
    """Per shape and layer type: smooth q/k and random v in the layer's block order, with the layer's partition
    and route. Yields ``(name, B, D, layer_type, part, qb, kb, vb, r, raster)``, ``raster`` = the ``(q, k, v)`` they
    were gathered from."""
    from mixdit.attention.vmoba import _gather_tokens, partition_for_layer, route

    dev, dt = "cuda", torch.bfloat16
    for name, grid, H, D, B in shapes:
        S = grid[0] * grid[1] * grid[2]
        q, k = _smooth(B, grid, H, D, dev, dt, 1), _smooth(B, grid, H, D, dev, dt, 2)
        v = torch.randn(B, S, H, D, device=dev, dtype=dt)
        for layer_type in layer_types:
            part = partition_for_layer(grid, LAYER_OF_TYPE[layer_type], cfg, dev)
            qb, kb, vb = (_gather_tokens(t, p).requires_grad_(requires_grad)
                          for t, p in ((q, part.q_perm), (k, part.kv_perm), (v, part.kv_perm)))
            yield name, B, D, layer_type, part, qb, kb, vb, route(qb.detach(), kb.detach(), part, cfg), (q, k, v)
        del q, k, v
        torch.cuda.empty_cache()


def _model_layers(layer_types, cfg):
    """As :func:`_smooth_layers`, but q/k/v are what a random-weight Wan2.1-1.3B's self-attention computes in layers
    1-3 from smooth latents at 480p / 81 frames (``benchmarks/vmoba.py``'s capture): far more structured than the
    synthetic fields (tile unions ~0.5 instead of ~0.98 in 2D/3D), so the split between kernels is realistic."""
    import sys

    from mixdit.attention.vmoba import _gather_tokens, partition_for_layer, route

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vmoba import wan13b_layer_qkv

    layers = {t: LAYER_OF_TYPE[t] for t in layer_types}
    store = wan13b_layer_qkv(set(layers.values()), "cuda", torch.bfloat16)
    torch.cuda.empty_cache()
    grid = (21, 30, 52)
    for layer_type, layer in layers.items():
        q, k, v = store.pop(layer)
        part = partition_for_layer(grid, layer, cfg, "cuda")
        qb, kb, vb = (_gather_tokens(t, p).contiguous()
                      for t, p in ((q, part.q_perm), (k, part.kv_perm), (v, part.kv_perm)))
        yield "wan1.3b-model", 1, q.shape[-1], layer_type, part, qb, kb, vb, route(qb, kb, part, cfg), (q, k, v)
        del q, k, v


def train_step_study(reps: int = 10, profile: bool = False) -> dict:
    """What VMoBA's exact rule costs in training, per layer type, on a random-weight Wan2.1-1.3B's own q/k/v (480p /
    81 frames, B = 1): forward with gradients (what gradient checkpointing runs twice) and forward + backward of
    ``vmoba_attention`` (permutations and router included) with ``exact_kernel="query_tiles"`` (the training path
    up to session 15: the query-tile kernel in block order in 2D/3D layers, sorted queries in 1D) and ``"auto"``
    (since session 16 the hybrid forward in 2D/3D layers) with either backward of the exact rule
    (``key_block_attention.EXACT_BACKWARD``: the query-tile backward on the tile union, or split like the hybrid),
    against cuDNN dense. ``profile``: also the GPU time per kernel of one forward + backward with the split backward."""
    from mixdit.attention.vmoba import vmoba_attention
    from mixdit.kernels import key_block_attention as kba

    default_backward = kba.EXACT_BACKWARD
    base = dict(min_tokens=0, dense_layers=())
    rows = []
    for _, B, D, layer_type, part, qb, kb, vb, r, raster in _model_layers(tuple(LAYER_OF_TYPE), VMoBAConfig(**base)):
        q, k, v = (t.detach().requires_grad_(True) for t in raster)
        grad = torch.randn_like(q)
        qh, kh, vh = (t.transpose(1, 2) for t in (q, k, v))

        def dense():
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qh, kh, vh, scale=D ** -0.5).transpose(1, 2)

        fns = {"dense (cuDNN)": dense}
        # (config, the exact rule's backward); session 16 also measured 128-key tiles in 3D layers: slower
        variants = {"query_tiles": (dict(exact_kernel="query_tiles"), None), "auto union-bwd": ({}, "union"),
                    "auto split-bwd": ({}, "split")}

        def call(cfg, backward):
            def fn():
                kba.EXACT_BACKWARD = backward or kba.EXACT_BACKWARD
                try:
                    return vmoba_attention(q, k, v, grid=(21, 30, 52), layer_index=LAYER_OF_TYPE[layer_type],
                                           config=cfg)
                finally:
                    kba.EXACT_BACKWARD = default_backward
            return fn

        for label, (extra, backward) in variants.items():
            fns[f"vmoba {label}"] = call(VMoBAConfig(**extra, **base), backward)
        outs = {}
        for name, fn in fns.items():
            out = fn()
            g = torch.autograd.grad(out, (q, k, v), grad)
            outs[name] = (out.detach().float(), [t.float() for t in g])
            fwd = _bench(fn, reps)
            step = _bench(lambda: torch.autograd.grad(fn(), (q, k, v), grad), reps)
            rows.append(dict(layer_type=layer_type, path=name, fwd_ms=fwd, fwd_bwd_ms=step,
                             checkpointed_ms=step + fwd))
            print(f"train {layer_type:14s} {name:22s} fwd {fwd:6.2f}  fwd+bwd {step:6.2f}  "
                  f"checkpointed (fwd twice) {step + fwd:6.2f} ms", flush=True)
        if profile:  # GPU time per kernel of one forward + backward of the default path
            from torch.profiler import ProfilerActivity
            from torch.profiler import profile as torch_profile

            fn = fns["vmoba auto split-bwd"]
            torch.cuda.synchronize()
            with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
                torch.autograd.grad(fn(), (q, k, v), grad)
                torch.cuda.synchronize()
            per_kernel = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    per_kernel[e.name[:50]] = per_kernel.get(e.name[:50], 0.0) + e.device_time / 1e3
            top = sorted(per_kernel.items(), key=lambda kv: -kv[1])[:14]
            rows.append(dict(layer_type=layer_type, profile_auto_fwd_bwd_ms=dict(top)))
            print(f"profile {layer_type}: total {sum(per_kernel.values()):.2f} ms; "
                  + "; ".join(f"{n} {ms:.2f}" for n, ms in top), flush=True)
        for other in ("vmoba auto union-bwd", "vmoba auto split-bwd"):  # same selection: equal up to rounding
            a, b = outs["vmoba query_tiles"], outs[other]
            rel = [float((x - y).norm() / y.norm()) for x, y in zip([a[0], *a[1]], [b[0], *b[1]])]
            rows.append(dict(layer_type=layer_type, path=other, rel_l2_vs_query_tiles_out_dq_dk_dv=rel))
            print(f"train {layer_type:14s} {other} vs query_tiles rel. L2 (out, dq, dk, dv): "
                  + ", ".join(f"{x:.1e}" for x in rel), flush=True)
    return _write_result(dict(gpu=torch.cuda.get_device_name(), rows=rows),
                         f"vmoba-train-step-{torch.cuda.get_device_name().lower().replace(' ', '-')}.json")


# --train-sweep variants against the current defaults, each a label and its knobs: "split" (the split backward's
# q_tile / min_fill), "kb_dq" / "kb_dkdv" (key-block backward launches), "qt_switches" / "qt_configs" (the
# query-tile part's backward_variant). Session 17's first round (one knob at a time) set today's defaults
# (results/vmoba-train-sweep-round1-session17-*.json); this is its second round (combinations).
TRAIN_SWEEP = [("default", {})]
TRAIN_SWEEP += [(f"bwd q_tile {t} min_fill {f}", {"split": {"q_tile": t, "min_fill": f}})
                for t in (64, 128) for f in (0.375, 0.5, 0.625)]
TRAIN_SWEEP += [(f"bwd q_tile 128, qt {kind} {c}", {"split": {"q_tile": 128}, "qt_configs": {kind: c}})
                for kind, c in (("dq", (128, 32, 4, 3)), ("dq", (128, 32, 8, 2)), ("dq", (128, 32, 8, 3)),
                                ("dkdv", (64, 32, 4, 2)), ("dkdv", (128, 32, 8, 3)), ("dkdv", (32, 32, 4, 3)))]
TRAIN_SWEEP += [(f"kb dkdv {c}", {"kb_dkdv": c}) for c in ((64, 64, 8), (128, 64, 8), (32, 64, 4), (64, 128, 8))]
TRAIN_SWEEP += [(f"kb dq {c}", {"kb_dq": c}) for c in ((128, 32, 8), (128, 64, 8), (256, 32, 8), (128, 64, 4))]
TRAIN_SWEEP += [(f"qt dkdv {c}", {"qt_configs": {"dkdv": c}}) for c in ((64, 64, 4, 2), (64, 32, 4, 2),
                                                                          (128, 32, 4, 3))]
# later in session 17: dK/dV programs over pairs of 32-key tiles (block_sparse_attention _SMALL_KV_TILE)
TRAIN_SWEEP += [("qt dkdv single tiles", {"qt_switches": {"pair_tiles": False}})]
TRAIN_SWEEP += [(f"qt dkdv pairs {c}", {"qt_configs": {"dkdv": c}}) for c in ((64, 64, 4, 2), (128, 64, 8, 3),
                                                                                (64, 64, 8, 3))]


def train_sweep(reps: int = 10, layer_types=("spatiotemporal", "spatial")) -> dict:
    """The exact rule's split backward, one knob at a time (``TRAIN_SWEEP``): forward + backward of
    ``vmoba_attention`` per layer type on a random-weight Wan2.1-1.3B's own q/k/v (480p / 81 frames, B = 1), with
    the gradients' relative L2 against the default's (every variant computes the same pairs)."""
    import importlib

    from mixdit.attention.vmoba import vmoba_attention
    from mixdit.kernels import key_block_attention as kba

    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")  # the package exports a function so named
    base = VMoBAConfig(min_tokens=0, dense_layers=())
    launches = (kba._KB_BWD_DQ_LAUNCH, kba._KB_BWD_DKDV_LAUNCH)
    rows = []
    for _, B, D, layer_type, part, qb, kb, vb, r, raster in _model_layers(layer_types, base):
        q, k, v = (t.detach().requires_grad_(True) for t in raster)
        grad = torch.randn_like(q)
        ref = None
        for label, knobs in TRAIN_SWEEP:
            def step():
                kba._SPLIT_BACKWARD_OVERRIDE.update(knobs.get("split", {}))
                kba._KB_BWD_DQ_LAUNCH = knobs.get("kb_dq", launches[0])
                kba._KB_BWD_DKDV_LAUNCH = knobs.get("kb_dkdv", launches[1])
                try:
                    with bsa.backward_variant(knobs.get("qt_switches"), knobs.get("qt_configs")):
                        out = vmoba_attention(q, k, v, grid=(21, 30, 52), layer_index=LAYER_OF_TYPE[layer_type],
                                              config=base)
                        return torch.autograd.grad(out, (q, k, v), grad)
                finally:
                    kba._SPLIT_BACKWARD_OVERRIDE.clear()
                    kba._KB_BWD_DQ_LAUNCH, kba._KB_BWD_DKDV_LAUNCH = launches
            try:
                g = [t.float() for t in step()]
                ms = _bench(step, reps)
            except Exception as e:  # a launch that does not fit (registers, shared memory) is a result too
                rows.append(dict(layer_type=layer_type, variant=label, error=repr(e)[:200]))
                print(f"sweep {layer_type:14s} {label:28s} failed: {repr(e)[:120]}", flush=True)
                continue
            ref = ref or g
            rel = [float((a - b).norm() / b.norm()) for a, b in zip(g, ref)]
            rows.append(dict(layer_type=layer_type, variant=label, fwd_bwd_ms=ms, rel_l2_dq_dk_dv=rel))
            print(f"sweep {layer_type:14s} {label:28s} fwd+bwd {ms:6.2f} ms  rel. L2 vs default "
                  + ", ".join(f"{x:.1e}" for x in rel), flush=True)
        del q, k, v, grad, ref
        torch.cuda.empty_cache()
    return _write_result(dict(gpu=torch.cuda.get_device_name(), rows=rows),
                         f"vmoba-train-sweep-{torch.cuda.get_device_name().lower().replace(' ', '-')}.json")


def layout_probe():
    """Where VMoBA layouts lose against a random layout of the same density (query_tile, smooth q/k, B = 1): the
    sparse kernel on the routed layout with its kv_tile_len masks, without them (timing only), with each query
    tile's count kept but its tiles drawn at random, and on random_layout at the same mean density."""
    from mixdit.attention.vmoba import _kernel_attention
    from mixdit.kernels.reference import random_layout

    cfg = VMoBAConfig(min_tokens=0, dense_layers=(), granularity="query_tile")
    rows = []
    for name, B, D, layer_type, part, qb, kb, vb, r, _ in _smooth_layers((SHAPES[2], SHAPES[0]), LAYER_OF_TYPE, cfg):
        T, n_kt, dev = part.kv_tile, part.num_kv_tiles, qb.device

        def timed(count, index, lengths):
            return _bench(lambda: _kernel_attention(qb, kb, vb, count, index, q_tile=cfg.q_tile, kv_tile=T,
                                                    scale=D ** -0.5, kv_tile_len=lengths), reps=100)

        pos = torch.arange(n_kt, device=dev)
        drawn = torch.rand(*r.kv_count.shape, n_kt, device=dev).argsort(-1)
        drawn = torch.where(pos < r.kv_count[..., None], drawn, n_kt + pos).sort(-1).values
        density = float(r.kv_count.float().mean()) / n_kt
        rc, ri = random_layout(B, qb.shape[2], qb.shape[1], kb.shape[1], density, cfg.q_tile, T, device=dev,
                               keep_diagonal=False)
        cases = {"real": (r.kv_count, r.kv_index, part.kv_tile_len), "no-len": (r.kv_count, r.kv_index, None),
                 "same-count-random-tiles": (r.kv_count, drawn.clamp(max=n_kt - 1).to(torch.int32), part.kv_tile_len),
                 "uniform-random": (rc, ri, part.kv_tile_len)}
        row = dict(model=name, B=B, layer_type=layer_type, kv_tile=T, density=density)
        for case, (count, index, lengths) in cases.items():
            ms = timed(count, index, lengths)
            row[case] = dict(ms=ms, tflops=4.0 * D * float(count.sum()) * cfg.q_tile * T / ms / 1e9)
        rows.append(row)
        print(f"probe {name} B={B} {layer_type:14s} T={T} density {density:.3f} | " + "  ".join(
            f"{c} {row[c]['ms']:.2f} ms ({row[c]['tflops']:.0f} TF/s)" for c in cases), flush=True)
    return _write_result(dict(gpu=torch.cuda.get_device_name(), rows=rows),
                         f"vmoba-layout-probe-{torch.cuda.get_device_name().replace(' ', '-')}.json")


def bwd_ab(reps: int = 100, switches=None):
    """Forward + backward of the sparse kernel on VMoBA's 128-key-tile layouts (query_tile, smooth q/k), A B A B:
    the default backward vs ``switches`` over ``_BWD_OPTS``. Session 8 timed a dQ-kernel prefetch of the masks'
    data this way (``{"prefetch_meta": True}``: within 1%, dropped); new candidates go in BWD_AB."""
    from mixdit.attention.vmoba import _kernel_attention

    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    cfg = VMoBAConfig(min_tokens=0, dense_layers=(), granularity="query_tile")
    rows = []
    for name, B, D, layer_type, part, qb, kb, vb, r, _ in _smooth_layers((SHAPES[0], SHAPES[2]), ("spatial", "temporal"),
                                                                     cfg, requires_grad=True):
        grad = torch.randn_like(qb)

        def step():
            out, _ = _kernel_attention(qb, kb, vb, r.kv_count, r.kv_index, q_tile=cfg.q_tile, kv_tile=part.kv_tile,
                                       scale=D ** -0.5, kv_tile_len=part.kv_tile_len)
            return torch.autograd.grad(out, (qb, kb, vb), grad)

        times = {False: [], True: []}
        for on in (False, True, False, True):
            with bsa.backward_variant(switches if on else None):
                times[on].append(_bench(step, reps))
        rows.append(dict(model=name, B=B, layer_type=layer_type, switches=switches, fwd_bwd_ms_default=times[False],
                         fwd_bwd_ms_switched=times[True]))
        print(f"bwd-ab {name} B={B} {layer_type:9s} fwd+bwd ms: default " + " / ".join(f"{t:.2f}" for t in times[False])
              + f"  {switches} " + " / ".join(f"{t:.2f}" for t in times[True]), flush=True)
    return _write_result(dict(gpu=torch.cuda.get_device_name(), rows=rows),
                         f"vmoba-bwd-ab-{torch.cuda.get_device_name().replace(' ', '-')}.json")


def time_gathers(reps: int = 200) -> list[dict]:
    """Block-order gathers at Wan2.1-1.3B 480p (q, k, v in and the output back, per layer): ``x[:, idx]``,
    ``index_select(1, idx)`` and mixdit's ``_gather_tokens`` (one row gather over the flattened batch), B = 1 and 2."""
    import triton

    from mixdit.attention.vmoba import _gather_tokens, partition_for_layer

    grid, H, D = (21, 30, 52), 12, 128
    ways = {
        "x[:, idx]": lambda x, i: x[:, i].contiguous(),
        "index_select": lambda x, i: x.index_select(1, i),
        "_gather_tokens": _gather_tokens,
    }
    rows = []
    for B in (1, 2):
        x = torch.randn(B, math.prod(grid), H, D, device="cuda", dtype=torch.bfloat16)
        for layer in (1, 2):
            part = partition_for_layer(grid, layer, VMoBAConfig(), "cuda")
            for name, g in ways.items():
                assert torch.equal(g(x, part.kv_perm), x[:, part.kv_perm])
                ms = triton.testing.do_bench(lambda: (g(x, part.q_perm), g(x, part.kv_perm), g(x, part.kv_perm),
                                                      g(x, part.q_inv)), warmup=50, rep=reps)
                rows.append(dict(B=B, layer_type=part.layer_type, way=name, ms=ms))
                print(f"gathers B={B} {part.layer_type:14s} {name:15s} {ms:.3f} ms", flush=True)
    return rows


def router_profile(batch: int = 2, reps: int = 20) -> dict:
    """CUDA time per kernel of the fused ``query_tile`` router at Wan2.1-1.3B 480p (smooth q/k), per layer type (µs)."""
    import collections

    from torch.profiler import ProfilerActivity, profile

    from mixdit.attention.vmoba import _gather_tokens, partition_for_layer, route

    grid, H, D = (21, 30, 52), 12, 128
    q, k = _smooth(batch, grid, H, D, "cuda", torch.bfloat16, 1), _smooth(batch, grid, H, D, "cuda", torch.bfloat16, 2)
    cfg = VMoBAConfig(granularity="query_tile", min_tokens=0, dense_layers=())
    out = {}
    for layer in (3, 1, 2):  # temporal, spatial, spatiotemporal
        part = partition_for_layer(grid, layer, cfg, "cuda")
        qb, kb = _gather_tokens(q, part.q_perm), _gather_tokens(k, part.kv_perm)
        for _ in range(5):
            route(qb, kb, part, cfg)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(reps):
                route(qb, kb, part, cfg)
            torch.cuda.synchronize()
        per_kernel = collections.defaultdict(float)
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                per_kernel[e.name[:60]] += e.device_time / reps
        out[part.layer_type] = dict(sorted(per_kernel.items(), key=lambda kv: -kv[1]))
        print(f"router B={batch} {part.layer_type:14s} blocks={part.num_blocks:4d} "
              + ", ".join(f"{name} {us:.1f}" for name, us in out[part.layer_type].items()) + " (us)", flush=True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="Wan2.1-1.3B B=1 only")
    ap.add_argument("--selection", default="threshold", choices=["threshold", "global", "topk"])
    ap.add_argument("--kv-tile-3d", type=int, default=None, help="key tile of 3D layers (default: VMoBAConfig's, 32)")
    ap.add_argument("--granularity", default="token", choices=["token", "query_tile"])
    ap.add_argument("--kernel-ab", action="store_true",
                    help="also time the sparse kernel with each KERNEL_AB set of forward switches")
    ap.add_argument("--kernel-configs", default="", metavar="BM,BN,W,S;...",
                    help="also time the sparse kernel of the small-key-tile (3D) layers with these forward configs")
    ap.add_argument("--layer-types", default=",".join(LAYER_OF_TYPE), help=f"comma list of {list(LAYER_OF_TYPE)}")
    ap.add_argument("--route-query-tiles", action="store_true",
                    help="only time the query_tile router, fused vs reference (Wan2.1-1.3B 480p)")
    ap.add_argument("--batch", type=int, default=1, help="batch of --route-query-tiles (2: a CFG batch)")
    ap.add_argument("--gathers", action="store_true", help="only time the block-order gathers (B = 1 and 2)")
    ap.add_argument("--bwd-ab", action="store_true",
                    help="only forward + backward on 128-key-tile layouts, the default backward vs BWD_AB's switches")
    ap.add_argument("--layout-probe", action="store_true",
                    help="only the sparse kernel on VMoBA layouts vs random ones of the same density (masks, order)")
    ap.add_argument("--profile-router", action="store_true",
                    help="only profile the fused query_tile router's kernels per layer type (B = 2)")
    ap.add_argument("--key-blocks", action="store_true",
                    help="only the exact rule's kernels: key-block attention (+ variants), hybrid, query tiles, dense")
    ap.add_argument("--train", action="store_true",
                    help="only the exact rule in training per layer type (model q/k/v): forward, forward + backward")
    ap.add_argument("--train-sweep", action="store_true",
                    help="only the exact rule's split backward, one launch / split knob at a time (TRAIN_SWEEP)")
    ap.add_argument("--profile", action="store_true", help="--train: also GPU time per kernel of the default path")
    ap.add_argument("--model-qk", action="store_true",
                    help="--key-blocks on a random-weight Wan2.1-1.3B's own q/k/v instead of synthetic fields")
    a = ap.parse_args()
    if a.train:
        train_step_study(profile=a.profile)
    elif a.train_sweep:
        train_sweep(layer_types=tuple(a.layer_types.split(",")) if a.layer_types != ",".join(LAYER_OF_TYPE)
                    else ("spatiotemporal", "spatial"))
    elif a.key_blocks:
        key_blocks_study(variants=not a.quick, source="model" if a.model_qk else "smooth")
    elif a.gathers:
        time_gathers()
    elif a.bwd_ab:
        bwd_ab(switches=BWD_AB)
    elif a.layout_probe:
        layout_probe()
    elif a.profile_router:
        router_profile()
    elif a.route_query_tiles:
        time_query_tile_router(selection=a.selection, batch=a.batch)
    else:
        run(quick=a.quick, selection=a.selection, kv_tile_3d=a.kv_tile_3d, granularity=a.granularity,
            kernel_ab=a.kernel_ab, layer_types=tuple(a.layer_types.split(",")),
            kernel_configs=[tuple(int(x) for x in c.split(",")) for c in a.kernel_configs.split(";") if c])
