"""Block-sparse attention benchmark (GPU): dense SDPA (cuDNN, flash), FlexAttention with the same block
mask, and mixdit's Triton kernel, forward and forward+backward, at several densities.

    python benchmarks/attention.py                       # every shape, fwd (+ fwd+bwd where listed)
    python benchmarks/attention.py --quick               # Wan-1.3B only
    python benchmarks/attention.py --shapes flux,sd35 --densities 1,0.25
    python benchmarks/attention.py --sweep               # time kernel configs (BLOCK_M/N, warps, stages)
    python benchmarks/attention.py --bwd-ab              # backward: old vs new (TMA) kernels vs Flex, Wan-1.3B

TFLOP/s count only computed tiles: 4*B*H*S^2*D*(visited tiles / all tiles) for the forward and 3.5x that
for forward+backward. Writes results/attention-<gpu>.json and .md (``--out-dir`` to change).
A ``router_ms`` column is left for the VMoBA router's own timing (measured elsewhere).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import sys
import time

import torch

SHAPES = {  # name: (B, H, S, D, directions)
    "wan1.3b": (2, 12, 32760, 128, ("fwd", "fwdbwd")),
    "wan14b": (1, 40, 75600, 128, ("fwd",)),
    "flux": (1, 24, 4608, 128, ("fwd", "fwdbwd")),
    "sd35": (1, 24, 4429, 64, ("fwd", "fwdbwd")),
}
TILE = 128


def bench(fn, rep_ms=200):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def make_inputs(B, H, S, D, grad):
    # [B, S, H, D] storage (the diffusers dispatcher layout); random, never zeros
    q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16).requires_grad_(grad) for _ in range(3))
    return q, k, v


def mixdit_fn(q, k, v, layout, direction):
    from mixdit.kernels import block_sparse_attention

    kc, ki = layout
    if direction == "fwd":
        return lambda: block_sparse_attention(q, k, v, kc, ki, q_tile=TILE, kv_tile=TILE)
    g = torch.randn_like(q)

    def run():
        out, _ = block_sparse_attention(q, k, v, kc, ki, q_tile=TILE, kv_tile=TILE)
        out.backward(g)
    return run


def sdpa_fn(q, k, v, backend, direction):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    g = torch.randn_like(qt)

    def run():
        with sdpa_kernel(be):
            out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt)
            if direction == "fwdbwd":
                out.backward(g)
    return run


_FLEX = {}


def _flex_parts(q, k, v, layout, S):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    if "f" not in _FLEX:
        _FLEX["f"] = torch.compile(flex_attention, dynamic=False)
    kc, ki = layout
    mask = BlockMask.from_kv_blocks(kc, ki, BLOCK_SIZE=TILE, seq_lengths=(S, S))
    return _FLEX["f"], mask, [t.transpose(1, 2) for t in (q, k, v)]


def flex_out(q, k, v, layout, S):
    """A callable returning Flex's output, back in the [B, S, H, D] layout."""
    flex, mask, (qt, kt, vt) = _flex_parts(q, k, v, layout, S)
    return lambda: flex(qt, kt, vt, block_mask=mask).transpose(1, 2)


def flex_fn(q, k, v, layout, direction, S):
    flex, mask, (qt, kt, vt) = _flex_parts(q, k, v, layout, S)
    g = torch.randn_like(qt)

    def run():
        out = flex(qt, kt, vt, block_mask=mask)
        if direction == "fwdbwd":
            out.backward(g)
    return run


def overhead_probe():
    """Where a small-shape fwd+bwd spends its time: each backward piece timed alone (FLUX shape, 25%)."""
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    from mixdit.kernels.reference import random_layout

    B, H, S, D = 1, 24, 4608, 128
    q, k, v = make_inputs(B, H, S, D, False)
    kc, ki = random_layout(B, H, S, S, 0.25, TILE, TILE, device="cuda")
    out, lse = bsa.block_sparse_attention_forward(q, k, v, kc, ki, TILE, TILE)
    g = torch.randn_like(out)
    n_kt = ki.shape[-1]
    res = {
        "fwd launcher": bench(lambda: bsa.block_sparse_attention_forward(q, k, v, kc, ki, TILE, TILE)),
        "transpose_layout": bench(lambda: bsa.transpose_layout(kc, ki, n_kt)),
        "bwd launcher": bench(lambda: bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, TILE, TILE)),
    }
    graph = torch.cuda.CUDAGraph()
    bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, TILE, TILE)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, TILE, TILE)
    res["bwd launcher in a CUDA graph (GPU time)"] = bench(graph.replay)
    t0 = time.perf_counter()
    for _ in range(50):
        bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, TILE, TILE)
    res["bwd host time per call (no sync)"] = (time.perf_counter() - t0) / 50 * 1e3
    torch.cuda.synchronize()
    for key, ms in res.items():
        print(f"probe flux d=0.25 {key}: {ms:.3f} ms", flush=True)
    return res


def gpu_slug():
    name = torch.cuda.get_device_name()
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def run_benchmark(shapes, densities, directions, rep_ms, flex_on):
    from mixdit.kernels.reference import random_layout

    rows = []
    for name in shapes:
        B, H, S, D, dirs = SHAPES[name]
        for direction in [d for d in directions if d in dirs]:
            grad = direction == "fwdbwd"
            q, k, v = make_inputs(B, H, S, D, grad)
            mult = 3.5 if grad else 1.0
            dense_flops = 4 * B * H * S * S * D * mult
            base = {}

            def add(impl, density, frac, fn):
                try:
                    ms = bench(fn, rep_ms * (4 if S > 60000 else 1))
                except Exception as e:  # keep the rest of the table if one backend fails
                    print(f"  {name} {direction} {impl} d={density}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                    return None
                row = dict(shape=name, B=B, H=H, S=S, D=D, impl=impl, density=density, computed_fraction=frac,
                           direction=direction, ms=ms, tflops=dense_flops * frac / ms / 1e9, router_ms=None)
                rows.append(row)
                print(f"  {name:8s} {direction:6s} {impl:12s} d={density:<6} {ms:9.3f} ms {row['tflops']:7.1f} TF/s", flush=True)
                return row

            for be in ("cudnn", "flash"):
                if name == "wan14b" and be == "flash":
                    continue  # 335 ms a call, nothing new
                r = add(f"sdpa-{be}", 1.0, 1.0, sdpa_fn(q, k, v, be, direction))
                if r:
                    base[be] = r["ms"]
            for density in densities:
                layout = random_layout(B, H, S, S, density, TILE, TILE, device="cuda")
                n_qt = layout[1].shape[2]
                frac = layout[0].sum().item() / (B * H * n_qt * layout[1].shape[3])
                fl = None
                if flex_on and name != "wan14b":
                    fl = add("flex", density, frac, flex_fn(q, k, v, layout, direction, S))
                mx = add("mixdit", density, frac, mixdit_fn(q, k, v, layout, direction))
                if mx:
                    for be, ms in base.items():
                        mx[f"speedup_vs_{be}"] = ms / mx["ms"]
                    if fl:
                        mx["speedup_vs_flex"] = fl["ms"] / mx["ms"]
                        for be, ms in base.items():
                            fl[f"speedup_vs_{be}"] = ms / fl["ms"]
            del q, k, v
            torch.cuda.empty_cache()
    return rows


def sweep(rep_ms):
    """Time kernel configs at the Wan-1.3B shape (d=0.25 and 1.0) via the launcher's override hook."""
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    from mixdit.kernels.reference import random_layout

    B, H, S, D = 2, 12, 32760, 128
    q, k, v = make_inputs(B, H, S, D, False)
    out = []
    fwd_cfgs = [(128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 4)]
    variants = [{}, {"tail_only_mask": True}, {"tma": True}, {"tma": True, "tail_only_mask": True},
                {"tma": True, "warp_specialize": True}, {"warp_specialize": True}]
    defaults = dict(bsa._FWD_OPTS)
    from mixdit.kernels.reference import block_sparse_attention_reference as ref_fn
    # correctness of each code path on a small ragged shape before timing it
    qs, ks, vs = make_inputs(1, 2, 1000, D, False)
    small = random_layout(1, 2, 1000, 1000, 0.5, TILE, TILE, device="cuda")
    r_out, r_lse = ref_fn(qs, ks, vs, *small, q_tile=TILE, kv_tile=TILE)
    for density in (1.0, 0.25):
        layout = random_layout(B, H, S, S, density, TILE, TILE, device="cuda")
        frac = layout[0].sum().item() / layout[1].numel()
        flops = 4 * B * H * S * S * D * frac
        for var in variants:
            for cfg in fwd_cfgs:
                bsa._FWD_OPTS.update(defaults)
                bsa._FWD_OPTS.update(var)
                bsa._CONFIG_OVERRIDE.clear()
                bsa._CONFIG_OVERRIDE["fwd"] = cfg
                try:
                    o, l = bsa.block_sparse_attention_forward(qs, ks, vs, *small, TILE, TILE)
                    err = max((o.float() - r_out.float()).abs().max().item(), (l - r_lse).abs().max().item())
                    ms = bench(mixdit_fn(q, k, v, layout, "fwd"), rep_ms)
                except Exception as e:
                    print("fwd", var, cfg, "FAILED", str(e)[:300], flush=True)
                    continue
                out.append(dict(kernel="fwd", cfg=cfg, opts=var, density=density, ms=ms, tflops=flops / ms / 1e9, err=err))
                print(f"sweep fwd d={density} {cfg} {var}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s err {err:.2e}", flush=True)
    bsa._FWD_OPTS.update(defaults)
    bsa._CONFIG_OVERRIDE.clear()
    # backward: time the whole fwd+bwd with one kernel's config changed at a time
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
    layout = random_layout(B, H, S, S, 0.25, TILE, TILE, device="cuda")
    frac = layout[0].sum().item() / layout[1].numel()
    flops = 3.5 * 4 * B * H * S * S * D * frac
    bwd_cfgs = {"dkdv": [(64, 128, 8, 2), (64, 64, 4, 3), (64, 64, 4, 4), (32, 64, 4, 3), (64, 64, 8, 3), (128, 64, 8, 3)],
                "dq": [(128, 64, 8, 2), (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 4), (64, 128, 4, 3)]}
    for kind, cfgs in bwd_cfgs.items():
        for cfg in cfgs:
            bsa._CONFIG_OVERRIDE.clear()
            bsa._CONFIG_OVERRIDE[kind] = cfg
            try:
                ms = bench(mixdit_fn(qg, kg, vg, layout, "fwdbwd"), rep_ms)
            except Exception as e:
                print(kind, cfg, "FAILED", str(e)[:150], flush=True)
                continue
            out.append(dict(kernel=kind, cfg=cfg, density=0.25, ms=ms, tflops=flops / ms / 1e9))
            print(f"sweep fwdbwd({kind}={cfg}) d=0.25: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s", flush=True)
    bsa._CONFIG_OVERRIDE.clear()
    return out


def bwd_ab(rep_ms, densities=(0.25, 1.0), sweep_cfgs=False, flex_on=True):
    """Backward A/B at Wan-1.3B: the old backward kernels (the MIXDIT_BWD_TMA=0 path), the new ones (TMA + padded
    lse/delta) and FlexAttention with the same block mask; fwd+bwd, and the backward alone (autograd.grad on a
    kept graph, so both include their launch overhead). Backward FLOPs = 2.5x the forward's."""
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    from mixdit.kernels import block_sparse_attention
    from mixdit.kernels.reference import random_layout

    B, H, S, D = SHAPES["wan1.3b"][:4]
    paths = {"mixdit-old": {"tma": False, "padded": False}, "mixdit-new": {"tma": True, "padded": True}}
    defaults = dict(bsa._BWD_OPTS)
    q, k, v = make_inputs(B, H, S, D, True)
    g = torch.randn_like(q)
    rows = []

    def bwd_only(fwd):  # fwd returns the output in the leaves' [B, S, H, D] layout
        out = fwd()
        return lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)

    for density in densities:
        kc, ki = layout = random_layout(B, H, S, S, density, TILE, TILE, device="cuda")
        frac = kc.sum().item() / ki.numel()
        fwd_flops = 4 * B * H * S * S * D * frac

        def mx_fwd(kc=kc, ki=ki):
            return block_sparse_attention(q, k, v, kc, ki, q_tile=TILE, kv_tile=TILE)[0]

        grads = {}
        for impl, opts in paths.items():
            bsa._BWD_OPTS.update(opts)
            grads[impl] = torch.autograd.grad(mx_fwd(), (q, k, v), g)
        diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads["mixdit-old"], grads["mixdit-new"]))
        print(f"d={density}: max |new - old| over dq, dk, dv = {diff:.3e}", flush=True)
        del grads

        impls = {}  # name: (fwd+bwd callable, forward returning out, backward path)
        if flex_on:
            impls["flex"] = (flex_fn(q, k, v, layout, "fwdbwd", S), flex_out(q, k, v, layout, S), None)
        for impl in paths:
            impls[impl] = (mixdit_fn(q, k, v, layout, "fwdbwd"), mx_fwd, impl)
        for impl, (fb, fo, path) in impls.items():
            if path:
                bsa._BWD_OPTS.update(paths[path])
            try:
                t_fb = bench(fb, rep_ms)
                t_b = bench(bwd_only(fo), rep_ms)
            except Exception as e:  # keep the rest of the table
                print(f"  d={density} {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                continue
            for direction, ms, fl in (("fwd+bwd", t_fb, 3.5 * fwd_flops), ("bwd", t_b, 2.5 * fwd_flops)):
                rows.append(dict(density=density, direction=direction, impl=impl, ms=ms, tflops=fl / ms / 1e9))
                print(f"  d={density} {direction:7s} {impl:10s} {ms:8.3f} ms {fl / ms / 1e9:6.1f} TF/s", flush=True)
        if sweep_cfgs and density == densities[0]:  # new path, backward alone, one kernel's config at a time
            bsa._BWD_OPTS.update(paths["mixdit-new"])
            for kind, cfgs in (("dkdv", [(64, 64, 4, 3), (64, 64, 4, 4), (64, 128, 8, 2), (64, 128, 8, 3),
                                         (32, 128, 4, 3), (128, 128, 8, 2)]),
                               ("dq", [(128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3),
                                       (128, 128, 8, 2)])):
                for cfg in cfgs:
                    bsa._CONFIG_OVERRIDE.clear()
                    bsa._CONFIG_OVERRIDE[kind] = cfg
                    try:
                        ms = bench(bwd_only(mx_fwd), rep_ms)
                    except Exception as e:
                        print(f"  sweep {kind} {cfg}: FAILED {str(e)[:200]}", flush=True)
                        continue
                    print(f"  sweep d={density} bwd {kind}={cfg}: {ms:.3f} ms {2.5 * fwd_flops / ms / 1e9:.0f} TF/s",
                          flush=True)
            bsa._CONFIG_OVERRIDE.clear()
    bsa._BWD_OPTS.update(defaults)

    lines = [(f"bwd A/B, Wan-1.3B (B{B} H{H} S{S} D{D}) bf16, {torch.cuda.get_device_name()}, torch {torch.__version__}; "
              "TFLOP/s on computed tiles (bwd = 2.5x fwd FLOPs, fwd+bwd = 3.5x)"),
             f"{'density':>7} {'dir':>7} {'impl':>10} {'ms':>9} {'TF/s':>6} {'vs flex':>8} {'vs old':>7}"]
    for r in rows:
        same = {x["impl"]: x["ms"] for x in rows if x["density"] == r["density"] and x["direction"] == r["direction"]}
        vf = f"{same['flex'] / r['ms']:.2f}x" if "flex" in same else ""
        vo = f"{same['mixdit-old'] / r['ms']:.2f}x" if "mixdit-old" in same and r["impl"] != "flex" else ""
        lines.append(f"{r['density']:>7} {r['direction']:>7} {r['impl']:>10} {r['ms']:>9.3f} {r['tflops']:>6.0f} "
                     f"{vf:>8} {vo:>7}")
    return rows, "\n".join(lines)


def write_results(rows, out_dir, gpu):
    os.makedirs(out_dir, exist_ok=True)
    slug = gpu_slug()
    for r in rows:
        r["gpu"] = gpu
    with open(os.path.join(out_dir, f"attention-{slug}.json"), "w") as f:
        json.dump(rows, f, indent=1)
    lines = [f"# Block-sparse attention on {gpu} (bf16, torch {torch.__version__})", "",
             "TFLOP/s on computed tiles; speedups are time ratios (baseline / this).", "",
             "| shape | dir | impl | density | ms | TFLOP/s | vs cuDNN dense | vs flash dense | vs Flex same mask | router ms |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        f = lambda key: f"{r[key]:.2f}x" if r.get(key) else ""  # noqa: E731
        lines.append(f"| {r['shape']} (B{r['B']} H{r['H']} S{r['S']} D{r['D']}) | {r['direction']} | {r['impl']} | "
                     f"{r['density']} | {r['ms']:.3f} | {r['tflops']:.0f} | {f('speedup_vs_cudnn')} | "
                     f"{f('speedup_vs_flash')} | {f('speedup_vs_flex')} | {r['router_ms'] or ''} |")
    with open(os.path.join(out_dir, f"attention-{slug}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--densities", default=None, help="default 1,0.5,0.25,0.125 (--bwd-ab: 0.25,1)")
    ap.add_argument("--directions", default="fwd,fwdbwd")
    ap.add_argument("--quick", action="store_true", help="Wan-1.3B only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time kernel configs instead of the comparison")
    ap.add_argument("--bwd-ab", action="store_true", help="backward: old vs new kernels vs Flex (Wan-1.3B)")
    ap.add_argument("--bwd-sweep", action="store_true",
                    help="with --bwd-ab: also time dkdv/dq configs of the new path (first density only)")
    ap.add_argument("--probe", action="store_true", help="time the backward's pieces at the FLUX shape first")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    if a.sweep:
        res = sweep(a.rep_ms)
        os.makedirs(a.out_dir, exist_ok=True)
        with open(os.path.join(a.out_dir, f"attention-sweep-{gpu_slug()}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"sweep took {time.time() - t0:.0f} s")
        return
    if a.bwd_ab:
        rows, table = bwd_ab(a.rep_ms, [float(x) for x in (a.densities or "0.25,1").split(",")], a.bwd_sweep,
                             not a.no_flex)
        os.makedirs(a.out_dir, exist_ok=True)
        with open(os.path.join(a.out_dir, f"attention-bwd-ab-{gpu_slug()}.json"), "w") as f:
            json.dump(rows, f, indent=1)
        print(table)
        print(f"bwd A/B took {time.time() - t0:.0f} s")
        return
    if a.probe:
        overhead_probe()
    shapes = ["wan1.3b"] if a.quick else a.shapes.split(",")
    densities = [float(x) for x in (a.densities or "1,0.5,0.25,0.125").split(",")]
    rows = run_benchmark(shapes, densities, a.directions.split(","), a.rep_ms,
                         not a.no_flex)
    print(write_results(rows, a.out_dir, gpu))
    print(f"benchmark took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
