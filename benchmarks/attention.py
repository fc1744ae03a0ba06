"""Block-sparse attention benchmark (GPU): dense SDPA (cuDNN, flash), FlexAttention with the same block
mask, and mixdit's Triton kernel, forward and forward+backward, at several densities.

    python benchmarks/attention.py                       # every shape, fwd (+ fwd+bwd where listed)
    python benchmarks/attention.py --quick               # Wan-1.3B only
    python benchmarks/attention.py --shapes flux,sd35 --densities 1,0.25
    python benchmarks/attention.py --sweep               # time kernel configs (BLOCK_M/N, warps, stages)
    python benchmarks/attention.py --bwd-ab --bwd-sweep  # backward: old / split / atomic-dQ kernels vs Flex (Wan-1.3B),
                                                         # FLUX / SD3.5 vs cuDNN; --bwd-sweep: atomic kernel configs
    python benchmarks/attention.py --host [--host-baseline REV]  # Python us per call (CPU: launches stubbed)

TFLOP/s count only computed tiles: 4*B*H*S^2*D*(visited tiles / all tiles) for the forward and 3.5x that
for forward+backward. Writes results/attention-<gpu>.json and .md (``--out-dir`` to change).
``--router``: the VMoBA routers on their own at the Wan-1.3B shape (B=2, smooth q/k; per layer type: the exact
per-token router and the fused ``query_tile`` router, each beside the sparse kernel on the layout it produced);
writes ``attention-router-<gpu>.json``.
"""

from __future__ import annotations

import argparse
import contextlib
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
DEV = "cuda"  # --smoke: "cpu" (Triton's interpreter, tiny shapes)


def _device_name():
    return torch.cuda.get_device_name() if DEV == "cuda" else "CPU (interpreter smoke run)"


def _empty_cache():
    if DEV == "cuda":
        torch.cuda.empty_cache()


def bench(fn, rep_ms=200):
    if DEV != "cuda":  # --smoke: one timed call (the point is running the code, not the number)
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    import triton.testing

    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def make_inputs(B, H, S, D, grad):
    # [B, S, H, D] storage (the diffusers dispatcher layout); random, never zeros
    q, k, v = (torch.randn(B, S, H, D, device=DEV, dtype=torch.bfloat16).requires_grad_(grad) for _ in range(3))
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


def _load_kernel_module(src: str, tag: str):
    """The kernel module from source text under another name (its custom ops renamed) for side-by-side timing."""
    import importlib.util
    import tempfile

    path = os.path.join(tempfile.mkdtemp(prefix="mixdit-bsa-"), f"_bsa_{tag}.py")  # @triton.jit needs a file
    with open(path, "w") as f:
        f.write(src.replace('"mixdit::', f'"mixdit_{tag}::'))
    spec = importlib.util.spec_from_file_location(f"_bsa_{tag}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _baseline_source(rev: str):
    """kernels/block_sparse_attention.py at git revision ``rev``, or the file ``rev`` itself; None if unavailable."""
    import subprocess

    if os.path.isfile(rev):
        return open(rev).read()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        return subprocess.run(["git", "show", f"{rev}:kernels/block_sparse_attention.py"], cwd=root, check=True,
                              capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        print(f"host: baseline {rev} unavailable ({type(e).__name__}); timing the current code only", flush=True)
        return None


class _StubKernel:
    def __getitem__(self, grid):
        return lambda *a, **kw: None


def host_overhead(baseline=None, n=300):
    """Host (Python) time per call of the launchers and the autograd path at a tiny shape (B1 H2 S256 D64, 64-row
    tiles, d=0.5), median of 7 runs of n calls. On a GPU the kernels run (they take a few us there, so the loop is
    host bound; the time is per call, enqueue only, synchronised once at the end); on a CPU the Triton launches are
    stubbed out, so the numbers are the Python/torch overhead around them. ``baseline``: a git revision (or file)
    of kernels/block_sparse_attention.py timed the same way for before/after."""
    from mixdit.kernels.reference import random_layout

    cuda = torch.cuda.is_available()
    dev = "cuda" if cuda else "cpu"
    mods = {"current": importlib.import_module("mixdit.kernels.block_sparse_attention")}
    src = _baseline_source(baseline) if baseline else None
    if src:
        mods[f"baseline {baseline}"] = _load_kernel_module(src, "baseline")
    B, H, S, D, T = 1, 2, 256, 64, 64
    gen = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.bfloat16, device=dev, generator=gen) for _ in range(3))
    kc, ki = random_layout(B, H, S, S, 0.5, T, T, device=dev, generator=gen)
    n_kt = ki.shape[-1]
    g = torch.randn_like(q)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))

    def per_call(fn, reps=n):
        for _ in range(20):
            fn()
        vals = []
        for _ in range(7):
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(reps):
                fn()
            t1 = time.perf_counter()
            if cuda:
                torch.cuda.synchronize()
            vals.append((t1 - t0) / reps * 1e6)
        return sorted(vals)[3]

    res = {}
    for label, bsa in mods.items():
        saved = {}
        if not cuda:  # stub every Triton launch: what is left is host overhead
            for name in [x for x in dir(bsa) if x.startswith("_") and x.endswith("_kernel")]:
                saved[name] = getattr(bsa, name)
                setattr(bsa, name, _StubKernel())
        try:
            out, lse = bsa.block_sparse_attention_forward(q, k, v, kc, ki, T, T)
            fwd = bsa.block_sparse_attention
            modes = [None] if "dq" not in getattr(bsa, "_BWD_OPTS", {}) else ["split", "atomic"]
            r = {"fwd launcher": per_call(lambda: bsa.block_sparse_attention_forward(q, k, v, kc, ki, T, T)),
                 "transpose_layout": per_call(lambda: bsa.transpose_layout(kc, ki, n_kt))}
            with torch.no_grad():
                r["public fwd (no grad)"] = per_call(lambda: fwd(q, k, v, kc, ki, q_tile=T, kv_tile=T))
            for mode in modes:
                tag = f" [{mode}]" if mode else ""
                kw = {"dq_mode": mode} if mode else {}
                r["bwd launcher" + tag] = per_call(
                    lambda: bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, T, T, **kw))
                saved_mode = bsa._BWD_OPTS.get("dq")
                if mode:
                    bsa._BWD_OPTS["dq"] = mode

                def fb():
                    o = fwd(qg, kg, vg, kc, ki, q_tile=T, kv_tile=T)[0]
                    torch.autograd.grad(o, (qg, kg, vg), g)
                r["public fwd+bwd (autograd)" + tag] = per_call(fb, max(n // 3, 50))
                if mode:
                    bsa._BWD_OPTS["dq"] = saved_mode
        finally:
            for name, kern in saved.items():
                setattr(bsa, name, kern)
        res[label] = r

    def floor():  # autograd itself: one elementwise op and its backward
        torch.autograd.grad(qg * 1.0, (qg,), g)
    res["autograd floor (one mul, fwd+bwd)"] = {"": per_call(floor)}
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton launches stubbed"
    lines = [f"host time per call, us ({where}; torch {torch.__version__}, triton {_triton_version()}; "
             f"B{B} H{H} S{S} D{D}, {T}-row tiles, d=0.5)"]
    for label, r in res.items():
        for key, us in r.items():
            lines.append(f"  {label:>22} {key:32s} {us:8.1f}")
    return res, "\n".join(lines)


def _triton_version():
    import triton

    return triton.__version__


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


def _small_fwd_error(bsa, D):
    """A function giving the forward's max error (out and lse) against the fp32 reference on a small ragged
    shape, so a sweep checks each code path with the current options before timing it."""
    from mixdit.kernels.reference import block_sparse_attention_reference as ref_fn
    from mixdit.kernels.reference import random_layout

    qs, ks, vs = make_inputs(1, 2, 1000, D, False)
    small = random_layout(1, 2, 1000, 1000, 0.5, TILE, TILE, device="cuda")
    r_out, r_lse = ref_fn(qs, ks, vs, *small, q_tile=TILE, kv_tile=TILE)

    def error():
        o, lse = bsa.block_sparse_attention_forward(qs, ks, vs, *small, TILE, TILE)
        return max((o.float() - r_out.float()).abs().max().item(), (lse - r_lse).abs().max().item())

    return error


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
    fwd_error = _small_fwd_error(bsa, D)
    for density in (1.0, 0.25):
        layout = random_layout(B, H, S, S, density, TILE, TILE, device="cuda")
        frac = layout[0].sum().item() / layout[1].numel()
        flops = 4 * B * H * S * S * D * frac
        for var in variants:
            for cfg in fwd_cfgs:
                try:
                    with bsa.forward_variant(var, cfg):
                        err = fwd_error()
                        ms = bench(mixdit_fn(q, k, v, layout, "fwd"), rep_ms)
                except Exception as e:
                    print("fwd", var, cfg, "FAILED", str(e)[:300], flush=True)
                    continue
                out.append(dict(kernel="fwd", cfg=cfg, opts=var, density=density, ms=ms, tflops=flops / ms / 1e9, err=err))
                print(f"sweep fwd d={density} {cfg} {var}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s err {err:.2e}", flush=True)
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


# --fwd-sweep: forward configs (BLOCK_M, BLOCK_N, warps, stages, launch extras). (128, 64, 8, 2) with maxnreg 128
# fits two CTAs per SM (96 KB shared each), so one CTA's prologue/epilogue can overlap the other's main loop.
FWD_SWEEP = [((128, 128, 8, 3), {}), ((128, 128, 8, 2), {}), ((128, 64, 8, 3), {}), ((128, 64, 8, 4), {}),
             ((128, 64, 8, 2), {}), ((128, 64, 8, 2), {"maxnreg": 128}), ((64, 64, 4, 3), {}),
             ((64, 128, 4, 2), {})]


# forward code-path switches over the defaults (--fwd-sweep: once per config; --fwd-ab: the default config only,
# each timed twice in A B A B order)
FWD_AB_VARIANTS = ({}, {"tail_only_mask": False})


def fwd_sweep(rep_ms, configs=None, variants=FWD_AB_VARIANTS, repeats=1):
    """Forward configs at the Wan-1.3B shape, d = 0.25 and 1.0, next to Flex with the same layout (same run).
    ``variants``: dicts of ``_FWD_OPTS`` switches applied over the defaults, one at a time."""
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    configs = FWD_SWEEP if configs is None else configs
    from mixdit.kernels.reference import random_layout

    B, H, S, D = 2, 12, 32760, 128
    q, k, v = make_inputs(B, H, S, D, False)
    fwd_error = _small_fwd_error(bsa, D)
    rows = []
    for density in (0.25, 1.0):
        layout = random_layout(B, H, S, S, density, TILE, TILE, device="cuda")
        flops = 4 * B * H * S * S * D * layout[0].sum().item() / layout[1].numel()
        flex_ms = bench(flex_fn(q, k, v, layout, "fwd", S), rep_ms)
        print(f"fwd-sweep d={density} flex {flex_ms:.3f} ms", flush=True)
        for var in [v for _ in range(repeats) for v in variants]:
            for cfg, extra in configs:
                try:
                    with bsa.forward_variant(var, cfg, extra):
                        err = fwd_error()
                        ms = bench(mixdit_fn(q, k, v, layout, "fwd"), rep_ms)
                except Exception as e:
                    print("fwd-sweep", cfg, extra, var, "FAILED", str(e)[:200], flush=True)
                    continue
                rows.append(dict(cfg=cfg, extra=extra, opts=var, density=density, ms=ms, tflops=flops / ms / 1e9,
                                 flex_ms=flex_ms, vs_flex=flex_ms / ms, err=err))
                print(f"fwd-sweep d={density} {cfg} {extra} {var}: {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s "
                      f"{flex_ms / ms:.3f}x flex err {err:.2e}", flush=True)
    return rows


def even_k_check(rep_ms, repeats=2):
    """Forward at the Wan-1.3B shape, d = 0.25, at 32,760 tokens (the last key tile ragged) and 32,768 (every tile
    full; same tile count and layout), next to Flex: a dividing length must not be slower (NOTES, session 6)."""
    from mixdit.kernels.reference import random_layout

    B, H, D = 2, 12, 128
    rows = []
    for _ in range(repeats):
        for S in (32760, 32768):
            q, k, v = make_inputs(B, H, S, D, False)
            gen = torch.Generator(device="cuda").manual_seed(1)
            layout = random_layout(B, H, S, S, 0.25, TILE, TILE, device="cuda", generator=gen)
            flops = 4 * B * H * S * S * D * layout[0].sum().item() / layout[1].numel()
            flex_ms = bench(flex_fn(q, k, v, layout, "fwd", S), rep_ms)
            ms = bench(mixdit_fn(q, k, v, layout, "fwd"), rep_ms)
            rows.append(dict(S=S, density=0.25, ms=ms, tflops=flops / ms / 1e9, flex_ms=flex_ms, vs_flex=flex_ms / ms))
            print(f"even-k S={S}: mixdit {ms:.3f} ms {flops / ms / 1e9:.0f} TF/s, flex {flex_ms:.3f} ms, "
                  f"{flex_ms / ms:.3f}x", flush=True)
    return rows


# backward code paths compared by --bwd-ab: name -> _BWD_OPTS
BWD_PATHS = {
    "mixdit-old": {"tma": False, "padded": False, "dq": "split", "dq_tma_reduce": False},  # MIXDIT_BWD_TMA=0 (v2)
    "mixdit-split": {"tma": True, "padded": True, "dq": "split", "dq_tma_reduce": False},  # v3: TMA + padded
    "mixdit-atomic": {"tma": True, "padded": True, "dq": "atomic", "dq_tma_reduce": False},  # v4: dQ by atomics
}
# --bwd-sweep: the atomic dK/dV kernel's (BLOCK_M queries, BLOCK_N keys, warps, stages) and TMA reduce-adds.
# Compiled for sm_90 on a CPU with Triton 3.9 (D=128; shared memory KB / registers / spill bytes):
# (64,128,8,2) 164/255/328, same with TMA reduce 181/255/296, (32,128,8,3) 140/255/208, (64,64,8,3) 132/225/0,
# (64,64,4,3) 132/255/88; dropped: (128,128,8,2) needs 263 KB (> 227), (64,128,4,2) spills 1.2 KB.
ATOMIC_SWEEP = [((64, 128, 8, 2), False), ((64, 128, 8, 3), False), ((64, 128, 8, 2), True),
                ((64, 128, 8, 3), True), ((32, 128, 8, 3), False), ((64, 64, 8, 3), False),
                ((64, 64, 8, 3), True), ((64, 64, 4, 3), False), ((64, 64, 8, 2), False)]
SPLIT_SWEEP = [("dkdv", (64, 64, 4, 3)), ("dkdv", (64, 128, 8, 2)), ("dkdv", (32, 128, 4, 3)),
               ("dq", (128, 128, 8, 3)), ("dq", (128, 64, 8, 3))]


def _grad_errors(bsa, paths, D=128, S=1000):
    if DEV != "cuda":
        D, S = 64, 200
    """Max |grad - fp32 reference| over dq, dk, dv for each (name, opts, override) on a small ragged shape."""
    from mixdit.kernels import block_sparse_attention
    from mixdit.kernels.reference import block_sparse_attention_reference as ref_fn, random_layout

    gen = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, S, 2, D, device=DEV, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    kc, ki = random_layout(1, 2, S, S, 0.5, TILE, TILE, device=DEV, generator=gen)
    g = torch.randn(q.shape, device=DEV, dtype=torch.float32, generator=gen)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(ref_fn(*leaves, kc, ki, q_tile=TILE, kv_tile=TILE)[0], leaves, g)
    errs = {}
    for name, opts, override in paths:
        with bsa.backward_variant(opts, override or {}):
            try:
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                out = block_sparse_attention(*leaves, kc, ki, q_tile=TILE, kv_tile=TILE)[0]
                grads = torch.autograd.grad(out.float(), leaves, g)
                errs[name] = max((a.float() - b).abs().max().item() for a, b in zip(grads, ref))
            except Exception as e:  # a config that does not compile (shared memory) or fails at run time
                print(f"  {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                errs[name] = float("nan")
    return errs


def atomic_sweep(bsa, q, k, v, layout, rep_ms, fwd_flops, split_cfgs=False):
    """Time the atomic dK/dV kernel's configs (backward alone, Wan-1.3B): each config's gradient error on a small
    ragged shape is checked first (≤ 2x the split path's + 1e-5, else not timed). Returns (rows, best or None)."""
    from mixdit.kernels import block_sparse_attention

    kc, ki = layout
    g = torch.randn_like(q)
    out = block_sparse_attention(q, k, v, kc, ki, q_tile=TILE, kv_tile=TILE)[0]
    cands = [(f"atomic {cfg}{' tma-reduce' if red else ''}", dict(BWD_PATHS["mixdit-atomic"], dq_tma_reduce=red),
              {"dkdv_atomic": cfg}) for cfg, red in ATOMIC_SWEEP]
    if split_cfgs:
        cands += [(f"split {kind}={cfg}", BWD_PATHS["mixdit-split"], {kind: cfg}) for kind, cfg in SPLIT_SWEEP]
    errs = _grad_errors(bsa, [("split", BWD_PATHS["mixdit-split"], {})] + cands)
    limit = 2 * errs["split"] + 1e-5
    print(f"  sweep: split path's error on the small shape {errs['split']:.2e}; limit {limit:.2e}", flush=True)
    rows, best = [], None
    for name, opts, override in cands:
        err = errs[name]
        row = dict(sweep=name, opts=opts, override={a: list(b) for a, b in override.items()}, err=err, ms=None)
        rows.append(row)
        if not err <= limit:  # NaN too
            print(f"  sweep {name}: error {err:.2e} > limit: not timed", flush=True)
            continue
        with bsa.backward_variant(opts, override or {}):
            try:
                ms = bench(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True), rep_ms)
            except Exception as e:
                print(f"  sweep {name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                continue
        row.update(ms=ms, tflops=2.5 * fwd_flops / ms / 1e9)
        print(f"  sweep bwd {name}: {ms:.3f} ms {row['tflops']:.0f} TF/s (err {err:.2e})", flush=True)
        if name.startswith("atomic") and (best is None or ms < best[0]):
            best = (ms, opts, override, name)
    return rows, best


def bwd_ab(rep_ms, densities=(0.25, 1.0), sweep_cfgs=False, flex_on=True, small=True, split_sweep=False):
    """Backward A/B. Wan-1.3B: the old backward kernels (MIXDIT_BWD_TMA=0), the split TMA ones (v3), dQ by atomics
    (v4; with --bwd-sweep also its best swept config) and FlexAttention with the same block mask; fwd+bwd, and the
    backward alone (autograd.grad on a kept graph, so both include their launch overhead). Backward FLOPs = 2.5x
    the forward's. Then FLUX / SD3.5 fwd+bwd at d=0.5/0.25 against cuDNN dense fwd+bwd (host-bound sizes)."""
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    from mixdit.kernels import block_sparse_attention
    from mixdit.kernels.reference import random_layout

    try:  # the backward-only timings replay one graph (retain_graph): compiled Flex must not donate its buffers
        torch._functorch.config.donated_buffer = False
    except AttributeError:
        pass
    B, H, S, D = SHAPES["wan1.3b"][:4]
    q, k, v = make_inputs(B, H, S, D, True)
    g = torch.randn_like(q)
    rows, sweep_rows = [], []
    paths = {name: (opts, {}) for name, opts in BWD_PATHS.items()}
    layouts = {d: random_layout(B, H, S, S, d, TILE, TILE, device=DEV) for d in densities}

    def bwd_only(fwd):  # fwd returns the output in the leaves' [B, S, H, D] layout
        out = fwd()
        return lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True)

    def fwd_flops_of(kc, ki, B, H, S, D):
        return 4 * B * H * S * S * D * (kc.sum().item() / ki.numel())

    if sweep_cfgs:
        d0 = 0.25 if 0.25 in layouts else densities[0]
        sweep_rows, best = atomic_sweep(bsa, q, k, v, layouts[d0], rep_ms, fwd_flops_of(*layouts[d0], B, H, S, D),
                                        split_sweep)
        default = ((bsa._DKDV_ATOMIC_CONFIGS[128]), False)
        if best and (tuple(best[2]["dkdv_atomic"]), best[1]["dq_tma_reduce"]) != default:
            paths["mixdit-atomic-best"] = (best[1], best[2])
            print(f"  best atomic config: {best[3]} ({best[0]:.3f} ms); timed below as mixdit-atomic-best", flush=True)

    for density in densities:
        kc, ki = layout = layouts[density]
        fwd_flops = fwd_flops_of(kc, ki, B, H, S, D)

        def mx_fwd(kc=kc, ki=ki):
            return block_sparse_attention(q, k, v, kc, ki, q_tile=TILE, kv_tile=TILE)[0]

        grads = {}
        for impl, (opts, override) in paths.items():
            with bsa.backward_variant(opts, override or {}):
                grads[impl] = torch.autograd.grad(mx_fwd(), (q, k, v), g)
        for impl in grads:
            if impl != "mixdit-split":
                diff = [(a.float() - b.float()).abs().max().item() for a, b in zip(grads[impl], grads["mixdit-split"])]
                print(f"d={density}: max |{impl} - mixdit-split| dq {diff[0]:.2e} dk {diff[1]:.2e} dv {diff[2]:.2e}",
                      flush=True)
        del grads

        impls = {}  # name: (fwd+bwd callable, forward returning out, backward path)
        if flex_on:
            impls["flex"] = (flex_fn(q, k, v, layout, "fwdbwd", S), flex_out(q, k, v, layout, S), None)
        for impl in paths:
            impls[impl] = (mixdit_fn(q, k, v, layout, "fwdbwd"), mx_fwd, paths[impl])
        for impl, (fb, fo, path) in impls.items():
            with bsa.backward_variant(*path) if path else contextlib.nullcontext():
                try:
                    t_fb = bench(fb, rep_ms)
                except Exception as e:  # keep the rest of the table
                    print(f"  d={density} {impl}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    continue
                try:
                    t_b = bench(bwd_only(fo), rep_ms)
                except Exception as e:  # compiled Flex refuses a replayed graph: backward = fwd+bwd - fwd
                    print(f"  d={density} {impl}: backward alone failed ({type(e).__name__}); "
                          "reported as fwd+bwd minus fwd", flush=True)
                    t_b = t_fb - bench(lambda: fo().sum(), rep_ms)
            for direction, ms, fl in (("fwd+bwd", t_fb, 3.5 * fwd_flops), ("bwd", t_b, 2.5 * fwd_flops)):
                rows.append(dict(shape="wan1.3b", density=density, direction=direction, impl=impl, ms=ms,
                                 tflops=fl / ms / 1e9))
                print(f"  wan1.3b d={density} {direction:7s} {impl:18s} {ms:8.3f} ms {fl / ms / 1e9:6.1f} TF/s", flush=True)
    del q, k, v, g
    _empty_cache()

    if small:  # FLUX / SD3.5 fwd+bwd vs cuDNN dense fwd+bwd (the target: never slower at density <= 0.5)
        for name in ("flux", "sd35"):
            Bs, Hs, Ss, Ds = SHAPES[name][:4]
            qs, ks, vs = make_inputs(Bs, Hs, Ss, Ds, True)
            dense = 4 * Bs * Hs * Ss * Ss * Ds * 3.5
            try:
                ms = bench(sdpa_fn(qs, ks, vs, "cudnn", "fwdbwd"), rep_ms)
                rows.append(dict(shape=name, density=1.0, direction="fwd+bwd", impl="sdpa-cudnn", ms=ms,
                                 tflops=dense / ms / 1e9))
                print(f"  {name} fwd+bwd sdpa-cudnn dense {ms:8.3f} ms", flush=True)
            except Exception as e:
                print(f"  {name} sdpa-cudnn: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
            for density in (0.5, 0.25):
                kc, ki = layout = random_layout(Bs, Hs, Ss, Ss, density, TILE, TILE, device=DEV)
                frac = kc.sum().item() / ki.numel()
                for impl, (opts, override) in paths.items():
                    if impl == "mixdit-old":
                        continue
                    with bsa.backward_variant(opts, override or {}):
                        try:
                            ms = bench(mixdit_fn(qs, ks, vs, layout, "fwdbwd"), rep_ms)
                        except Exception as e:
                            print(f"  {name} d={density} {impl}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
                            continue
                    rows.append(dict(shape=name, density=density, direction="fwd+bwd", impl=impl, ms=ms,
                                     tflops=dense * frac / ms / 1e9))
                    print(f"  {name} d={density} fwd+bwd {impl:18s} {ms:8.3f} ms", flush=True)
            del qs, ks, vs
            _empty_cache()

    lines = [(f"bwd A/B, {_device_name()}, torch {torch.__version__}, bf16; Wan-1.3B = B{B} H{H} S{S} D{D}; "
              "TFLOP/s on computed tiles (bwd = 2.5x fwd FLOPs, fwd+bwd = 3.5x); ratios = baseline ms / this ms"),
             f"{'shape':>8} {'density':>7} {'dir':>7} {'impl':>18} {'ms':>9} {'TF/s':>6} {'vs flex':>8} {'vs old':>7} "
             f"{'vs split':>8} {'vs cuDNN':>8}"]
    for r in rows:
        same = {x["impl"]: x["ms"] for x in rows if x["shape"] == r["shape"] and x["direction"] == r["direction"]
                and x["density"] == r["density"]}
        cudnn = [x["ms"] for x in rows if x["shape"] == r["shape"] and x["impl"] == "sdpa-cudnn"]

        def ratio(base, _r=r, _same=same):
            return f"{_same[base] / _r['ms']:.2f}x" if base in _same and _r["impl"] != base else ""
        vc = f"{cudnn[0] / r['ms']:.2f}x" if cudnn and r["impl"] != "sdpa-cudnn" else ""
        lines.append(f"{r['shape']:>8} {r['density']:>7} {r['direction']:>7} {r['impl']:>18} {r['ms']:>9.3f} "
                     f"{r['tflops']:>6.0f} {ratio('flex'):>8} {ratio('mixdit-old'):>7} {ratio('mixdit-split'):>8} {vc:>8}")
    timed = [r for r in sweep_rows if r.get("ms")]
    if timed:
        lines.append("atomic sweep (Wan-1.3B, backward alone): " + "; ".join(
            f"{r['sweep']} {r['ms']:.2f} ms" for r in sorted(timed, key=lambda r: r["ms"])))
    return dict(rows=rows, sweep=sweep_rows), "\n".join(lines)


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


def router_benchmark(out_dir, gpu):
    """Router time on its own and as a share of its attention call (see ``vmoba_attention.router_times``)."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from vmoba_attention import router_times

    rows = router_times(batch=2)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"attention-router-{gpu_slug()}.json"), "w") as f:
        json.dump(dict(gpu=gpu, torch=torch.__version__, triton=_triton_version(), rows=rows), f, indent=1)
    print("| router | layer type | router ms | sparse kernel ms | router share | density | tile density |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['granularity']} | {r['layer_type']} | {r['router_ms']:.3f} | {r['sparse_ms']:.3f} | "
              f"{r['share_of_own_call']:.1%} | {r['density']:.3f} | {r['tile_density']:.3f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {list(SHAPES)}")
    ap.add_argument("--densities", default=None, help="default 1,0.5,0.25,0.125 (--bwd-ab: 0.25,1)")
    ap.add_argument("--directions", default="fwd,fwdbwd")
    ap.add_argument("--quick", action="store_true", help="Wan-1.3B only")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time kernel configs instead of the comparison")
    ap.add_argument("--fwd-sweep", action="store_true", help="only the forward configs of FWD_SWEEP, next to Flex")
    ap.add_argument("--fwd-ab", action="store_true",
                    help="the default forward config with each FWD_AB_VARIANTS switch, twice in A B A B order, next to Flex")
    ap.add_argument("--fwd-configs", default=None, metavar="BM,BN,W,S;...",
                    help="with --fwd-sweep/--fwd-ab: these forward configs instead of FWD_SWEEP (resp. its first)")
    ap.add_argument("--fwd-opts", default="", metavar="KEY=0|1,...",
                    help="run the comparison with these forward switches (_FWD_OPTS) over the defaults")
    ap.add_argument("--tag", default="", help="with --fwd-sweep/--fwd-ab/--even-k: suffix of the result file's name")
    ap.add_argument("--even-k", action="store_true",
                    help="forward at 32,760 vs 32,768 tokens (ragged vs full last key tile), next to Flex")
    ap.add_argument("--bwd-ab", action="store_true",
                    help="backward: old / split / atomic-dQ kernels vs Flex (Wan-1.3B), FLUX/SD3.5 vs cuDNN")
    ap.add_argument("--bwd-sweep", action="store_true",
                    help="with --bwd-ab: first time the atomic dK/dV kernel's configs (Wan-1.3B d=0.25), then the "
                         "best one beside the default in the A/B")
    ap.add_argument("--bwd-sweep-split", action="store_true", help="with --bwd-sweep: also a few split-path configs")
    ap.add_argument("--no-small", action="store_true", help="with --bwd-ab: skip the FLUX / SD3.5 rows")
    ap.add_argument("--host", action="store_true",
                    help="host (Python) time per call of the launchers and autograd path (works on a CPU: stubbed)")
    ap.add_argument("--host-baseline", default=None, metavar="REV",
                    help="with --host: also time kernels/block_sparse_attention.py at this git revision (or file)")
    ap.add_argument("--router", action="store_true", help="only time the VMoBA routers (Wan-1.3B, B=2)")
    ap.add_argument("--probe", action="store_true", help="time the backward's pieces at the FLUX shape first")
    ap.add_argument("--rep-ms", type=int, default=200)
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    ap.add_argument("--smoke", action="store_true",
                    help="with --bwd-ab: run the A/B code on the CPU (Triton interpreter, tiny shapes, one call per "
                         "timing) to check the script itself; writes nothing")
    a = ap.parse_args(argv)
    t0 = time.time()
    if a.smoke:
        global DEV
        os.environ["TRITON_INTERPRET"] = "1"  # before the kernels are imported
        DEV = "cpu"
        SHAPES.update({"wan1.3b": (1, 1, 300, 64, ()), "flux": (1, 1, 200, 64, ()), "sd35": (1, 1, 150, 32, ())})
        out, table = bwd_ab(1, [0.25, 1.0], a.bwd_sweep, False, not a.no_small, a.bwd_sweep_split)
        print(table)
        print(f"smoke run took {time.time() - t0:.0f} s; rows {len(out['rows'])}, sweep rows {len(out['sweep'])}")
        return
    host = None
    if a.host:
        host, table = host_overhead(a.host_baseline)
        print(table, flush=True)
        if not a.bwd_ab:
            os.makedirs(a.out_dir, exist_ok=True)
            slug = gpu_slug() if torch.cuda.is_available() else "cpu-stubbed"
            with open(os.path.join(a.out_dir, f"attention-host-{slug}.json"), "w") as f:
                json.dump(host, f, indent=1)
            return
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gpu = torch.cuda.get_device_name()
    if a.router:
        router_benchmark(a.out_dir, gpu)
        return
    configs = None if a.fwd_configs is None else [(tuple(int(x) for x in c.split(",")), {})
                                                  for c in a.fwd_configs.split(";")]
    forward_checks = {"even_k": ("even-k", lambda: even_k_check(a.rep_ms)),
                      "fwd_ab": ("fwd-ab", lambda: fwd_sweep(a.rep_ms, configs or FWD_SWEEP[:1], FWD_AB_VARIANTS,
                                                              repeats=2)),
                      "fwd_sweep": ("fwd-sweep", lambda: fwd_sweep(a.rep_ms, configs))}
    for flag, (name, run) in forward_checks.items():
        if getattr(a, flag):
            rows = run()
            os.makedirs(a.out_dir, exist_ok=True)
            tag = f"-{a.tag}" if a.tag else ""
            with open(os.path.join(a.out_dir, f"attention-{name}{tag}-{gpu_slug()}.json"), "w") as f:
                json.dump(dict(gpu=gpu, torch=torch.__version__, triton=_triton_version(), rows=rows), f, indent=1)
            print(f"{name} took {time.time() - t0:.0f} s")
            return
    if a.sweep:
        res = sweep(a.rep_ms)
        os.makedirs(a.out_dir, exist_ok=True)
        with open(os.path.join(a.out_dir, f"attention-sweep-{gpu_slug()}.json"), "w") as f:
            json.dump(res, f, indent=1)
        print(f"sweep took {time.time() - t0:.0f} s")
        return
    if a.bwd_ab:
        res, table = bwd_ab(a.rep_ms, [float(x) for x in (a.densities or "0.25,1").split(",")], a.bwd_sweep,
                            not a.no_flex, not a.no_small, a.bwd_sweep_split)
        res.update(gpu=gpu, torch=torch.__version__, triton=_triton_version(), host_us=host)
        os.makedirs(a.out_dir, exist_ok=True)
        path = os.path.join(a.out_dir, f"attention-bwd-ab-{gpu_slug()}.json")
        with open(path, "w") as f:
            json.dump(res, f, indent=1)
        print(table)
        print(f"wrote {path}")
        print(f"bwd A/B took {time.time() - t0:.0f} s")
        return
    if a.probe:
        overhead_probe()
    shapes = ["wan1.3b"] if a.quick else a.shapes.split(",")
    densities = [float(x) for x in (a.densities or "1,0.5,0.25,0.125").split(",")]
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    switches = {k: bool(int(v)) for k, v in (kv.split("=") for kv in a.fwd_opts.split(",") if kv)}
    with bsa.forward_variant(switches):
        rows = run_benchmark(shapes, densities, a.directions.split(","), a.rep_ms, not a.no_flex)
    if switches:
        print(f"forward switches over the defaults: {switches}")
    print(write_results(rows, a.out_dir, gpu))
    print(f"benchmark took {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
