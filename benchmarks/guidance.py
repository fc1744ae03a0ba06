"""Head perturbation guidance benchmark (GPU): transformer step time and HeadHunter search throughput.

    python benchmarks/guidance.py                     # random:sd3.5-medium and random:flux.1-dev at 1024^2
    python benchmarks/guidance.py --models sd3.5-medium --size 512 --search-k 8,16
    python benchmarks/guidance.py --device cpu --tiny # smoke run of every code path on tiny models (CPU)

Per model (random weights, bf16, one transformer forward = one denoising step, median of CUDA-event
timings after warm-up):

* ``cfg``                 batch 2 [uncond, cond], nothing installed;
* ``cfg+pag (diffusers)`` batch 3 through every block, as diffusers' PAG pipeline runs it (SD3: its
                          ``PAGCFGJointAttnProcessor2_0`` on the layer; FLUX has no diffusers PAG pipeline:
                          mixdit with the shared prefix off, i.e. the same three full rows);
* ``mixdit L7`` / ``mixdit L13`` all heads of that layer perturbed, the perturbed row forked there
                          (blocks before it run for 2 rows only); ``naive`` rows: the same with the fork off.

Search throughput (what ``mixdit heads search`` runs per denoising step, round 1, CFG off; transformer
time only: VAE decode and the objective cost the same per image either way). Both sides score the
same candidates over the same steps, each candidate on its own trajectory (the search generates one
image per candidate and prompt-seed pair, so after the first step no two candidates share a row):

* ``batched`` (``--batch-size K``): one call with K ``cond`` rows (one per candidate, each its own
  latent) and ``row_head_sets`` giving each row one candidate head, all K of one layer (the search
  sorts candidates by layer and chunks them K at a time); the K perturbed rows fork at that layer:
  K*n + K*(n - L) layer-rows for n layers, fork at L;
* ``one per pass`` (``--batch-size 1``, the fair baseline): one call with the candidate's cond row
  and its perturbed row forked at L under the same shared-prefix rule normal guided generation uses:
  n + (n - L) layer-rows - exactly 1/K of the batched call's rows;
* ``no fork`` (context only: the reference HeadHunter loop, diffusers-PAG style): cond + perturbed
  row through every layer, 2n layer-rows. Earlier versions of this benchmark divided by this one.

Per-layer timings are taken at 5 candidate layers; the search-wide rate replays the search's own
chunking of every head of the model (layer-sorted, K per call, a chunk forks at its lowest layer),
each call's time interpolated linearly in the fork layer (the cost is linear in it: rows).
Since both sides compute the same layer-rows per candidate, the batched gain is GPU fill only
(see ``benchmarks/NOTES.md``, "Head perturbation guidance").

Targets: mixdit L13 on SD3.5-medium <= 1.25x CFG alone. Writes results/guidance-<gpu>.json and .md.
Finishes in about 3 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def make_timer(device: str):
    if device.startswith("cuda"):
        def timed(fn, warmup=2, reps=5) -> float:
            for _ in range(warmup):
                fn()
            torch.cuda.synchronize()
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b))
            return statistics.median(times)
    else:
        def timed(fn, warmup=2, reps=5) -> float:
            for _ in range(min(warmup, 1)):
                fn()
            times = []
            for _ in range(max(1, min(reps, 2))):
                a = time.perf_counter()
                fn()
                times.append(1000 * (time.perf_counter() - a))
            return min(times)
    return timed


def make_inputs(family, model, batch, size, device, dtype):
    """One denoiser call's inputs at ``size`` pixels (latent side size / 8; FLUX packs 2x2 patches into tokens)
    with the pipelines' text lengths (SD3.5: 77 CLIP + 256 T5 tokens; FLUX: 512)."""
    from mixdit.pipelines.tiny import denoiser_inputs

    lat = size // 8
    shape = dict(latent=(lat, lat), text_len=333) if family == "sd3" else dict(latent=(lat // 2,), text_len=512)
    return denoiser_inputs(model, batch, **shape, device=device, dtype=dtype)


def build_model(arch, device, dtype, tiny):
    if not tiny:
        from mixdit.pipelines.random_models import random_transformer

        return random_transformer(arch, device=device, dtype=dtype).eval()
    # smoke mode: the tiny test transformers, deeper so that forks at different layers differ
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from mixdit.pipelines.tiny import TINY_FLUX_TRANSFORMER, TINY_SD3_TRANSFORMER

    torch.manual_seed(0)
    if "flux" in arch:
        model = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
    else:
        model = SD3Transformer2DModel(**dict(TINY_SD3_TRANSFORMER, num_layers=5))
    return model.to(device=device, dtype=dtype).eval()


def interp(per_layer: dict[int, float], layer: float) -> float:
    """Piecewise-linear interpolation of measured per-layer times (the cost is linear in the fork layer)."""
    xs = sorted(per_layer)
    if layer <= xs[0]:
        return per_layer[xs[0]]
    for a, b in zip(xs, xs[1:]):
        if layer <= b:
            return per_layer[a] + (per_layer[b] - per_layer[a]) * (layer - a) / (b - a)
    return per_layer[xs[-1]]


def search_rate(space, k, per_layer_ms, steps) -> tuple[float, float]:
    """(heads per GPU-minute, mean fork layer) of one search round over ``space`` with ``k`` candidates
    per call: the search's own order (layer descending, head ascending), a chunk forks at its lowest
    layer; a short last chunk costs its share of rows."""
    order = sorted(space, key=lambda h: (-h[0], h[1]))
    total_ms, forks = 0.0, []
    for i in range(0, len(order), k):
        chunk = order[i:i + k]
        fork = min(l_ for l_, _ in chunk)
        forks.append(fork)
        total_ms += interp(per_layer_ms, fork) * len(chunk) / k
    return 60_000 * len(order) / (steps * total_ms), statistics.mean(forks)


def bench_model(arch, size, search_ks, search_steps, device="cuda", dtype=torch.bfloat16, tiny=False,
                layers=(7, 13)):
    import mixdit
    from mixdit.guidance.heads import head_counts
    from mixdit.guidance.perturbation import GuidanceConfig, guidance_feature, row_layout
    from mixdit.pipelines.adapters import adapter_for

    timed = make_timer(device)
    model = build_model(arch, device, dtype, tiny)
    adapter = adapter_for(model)
    family, n_layers = adapter.family, adapter.num_layers(model)
    counts = head_counts(adapter, model)
    if max(layers) >= n_layers:
        layers = tuple(sorted({n_layers // 4, n_layers // 2}))
    rows = []
    x2 = make_inputs(family, model, 2, size, device, dtype)

    def run(x):
        with torch.no_grad():
            return model(**x)

    t_cfg = timed(lambda: run(x2))
    rows.append(dict(config="cfg", batch=2, ms=t_cfg))

    # diffusers' PAG: a third full row
    x3 = make_inputs(family, model, 3, size, device, dtype)
    if family == "sd3":
        from diffusers.models.attention_processor import PAGCFGJointAttnProcessor2_0

        attn = model.transformer_blocks[layers[-1]].attn
        orig = attn.processor
        attn.set_processor(PAGCFGJointAttnProcessor2_0())
        t_pag = timed(lambda: run(x3))
        attn.set_processor(orig)
        rows.append(dict(config=f"cfg+pag (diffusers, L{layers[-1]})", batch=3, ms=t_pag))
    for layer in layers:
        for shared in (True, False):
            mixdit.apply(model, guidance=GuidanceConfig(heads=f"L{layer}", scale=3.0, shared_prefix=shared))
            with row_layout(model, ("uncond", "cond"), cfg_scale=5.0):
                t = timed(lambda: run(x2))
            mixdit.remove(model)
            label = f"mixdit L{layer}" + ("" if shared else " naive (no fork)")
            if family != "sd3" and not shared and layer == layers[-1]:
                label += " = diffusers-style batch 3"
            rows.append(dict(config=label, batch="2+1", ms=t))
    for r in rows:
        r["x_cfg"] = r["ms"] / t_cfg

    # search throughput: exactly the search's setup (every head of the model installed as the search
    # space, CFG off = every row "cond", per-row head sets); see the module docstring
    cand_layers = sorted({0, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
    space = [(l_, h) for l_ in range(n_layers) for h in range(counts[l_])]
    n = n_layers
    search = {"steps": search_steps, "layers": cand_layers, "heads": len(space), "single": [], "batched": []}
    mixdit.apply(model, guidance=GuidanceConfig(heads=f"L0-{n_layers - 1}", scale=3.0))
    feat = guidance_feature(model)
    x1 = make_inputs(family, model, 1, size, device, dtype)
    single, nofork = {}, {}
    for layer in cand_layers:
        feat.row_head_sets = [{(layer, 0)}]
        feat.config.shared_prefix = True  # what `--batch-size 1` runs: the normal guided-generation rule
        single[layer] = timed(lambda: run(x1), warmup=1, reps=3)
        feat.config.shared_prefix = False
        nofork[layer] = timed(lambda: run(x1), warmup=1, reps=3)
        feat.config.shared_prefix = True
        search["single"].append(dict(layer=layer, layer_rows=n + (n - layer), ms=single[layer],
                                     nofork_layer_rows=2 * n, nofork_ms=nofork[layer]))
    rate_1, _ = search_rate(space, 1, single, search_steps)
    rate_nofork, _ = search_rate(space, 1, nofork, search_steps)
    search["heads_per_gpu_minute_single"] = rate_1
    search["heads_per_gpu_minute_nofork"] = rate_nofork
    for k in search_ks:
        xk = make_inputs(family, model, k, size, device, dtype)
        batched = {}
        per_layer = []
        for layer in cand_layers:
            feat.row_head_sets = [{(layer, h % counts[layer])} for h in range(k)]
            batched[layer] = timed(lambda: run(xk), warmup=1, reps=3)
            lr = k * n + k * (n - layer)
            per_layer.append(dict(layer=layer, layer_rows=lr, ms=batched[layer], ms_per_layer_row=batched[layer] / lr))
        rate_k, mean_fork = search_rate(space, k, batched, search_steps)
        search["batched"].append(dict(k=k, per_layer=per_layer, mean_fork_layer=mean_fork,
                                      heads_per_gpu_minute=rate_k, speedup=rate_k / rate_1,
                                      speedup_vs_nofork=rate_k / rate_nofork))
        del xk
    feat.row_head_sets = None
    mixdit.remove(model)
    best = max(search["batched"], key=lambda b: b["heads_per_gpu_minute"])
    search["best_k"], search["speedup"] = best["k"], best["speedup"]
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return dict(arch=arch + (" (tiny)" if tiny else ""), family=family, size=size, layers=n_layers,
                dtype=str(dtype).replace("torch.", ""), steps=rows, search=search)


def to_markdown(results, gpu) -> str:
    out = [f"# Head perturbation guidance on {gpu}", ""]
    for r in results:
        n = r["layers"]
        out += [f"## {r['arch']} at {r['size']}x{r['size']} ({r['dtype']}, random weights, {n} layers)", "",
                "| config | batch rows | step ms | x CFG |", "|---|---|---|---|"]
        out += [f"| {s['config']} | {s['batch']} | {s['ms']:.1f} | {s['x_cfg']:.3f} |" for s in r["steps"]]
        s = r["search"]
        out += ["", f"Search ({s['steps']} steps, transformer time, round 1 over all {s['heads']} heads; every "
                    f"candidate on its own trajectory; layer-rows = rows x layers computed per call):", "",
                "| fork layer | 1 per pass: layer-rows | ms/step | ms/layer-row | no fork: layer-rows | ms/step |",
                "|---|---|---|---|---|---|"]
        out += [f"| {p['layer']} | {p['layer_rows']} | {p['ms']:.1f} | {p['ms'] / p['layer_rows']:.3f} | "
                f"{p['nofork_layer_rows']} | {p['nofork_ms']:.1f} |" for p in s["single"]]
        for b in s["batched"]:
            out += ["", f"K = {b['k']} candidates per call:", "",
                    "| fork layer | layer-rows | ms/step | ms/layer-row | ms/step per candidate |", "|---|---|---|---|---|"]
            out += [f"| {p['layer']} | {p['layer_rows']} | {p['ms']:.1f} | {p['ms_per_layer_row']:.3f} | "
                    f"{p['ms'] / b['k']:.1f} |" for p in b["per_layer"]]
            out += ["", f"Head-samples per GPU-minute at K = {b['k']}: {b['heads_per_gpu_minute']:.1f} vs one per pass "
                        f"{s['heads_per_gpu_minute_single']:.1f} -> **{b['speedup']:.2f}x** (vs the no-fork loop "
                        f"{s['heads_per_gpu_minute_nofork']:.1f}: {b['speedup_vs_nofork']:.2f}x)"]
        out += ["", f"Best K = {s['best_k']}: {s['speedup']:.2f}x heads per GPU-minute over one candidate per pass "
                    "(same layer-rows per candidate on both sides: the gain is GPU fill).", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd3.5-medium,flux.1-dev")
    p.add_argument("--size", type=int, default=None, help="image side (default 1024; 64 with --tiny)")
    p.add_argument("--search-k", default="",
                   help="candidates per batched call, comma list (default 8,16 for SD3; 4,8 for FLUX)")
    p.add_argument("--search-steps", type=int, default=20)
    p.add_argument("--device", default="cuda", help="cuda (default) | cpu (with --tiny: smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny test transformers instead of the published sizes")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print("needs a CUDA GPU (or --device cpu --tiny for a smoke run)", file=sys.stderr)
        return 1
    size = args.size or (64 if args.tiny else 1024)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        gpu = torch.cuda.get_device_name()
    else:
        gpu = f"CPU {platform.machine()}"
    if args.tiny:
        gpu += " tiny"
    t0 = time.time()
    results = []
    for arch in [a.strip() for a in args.models.split(",") if a.strip()]:
        ks = [int(k) for k in args.search_k.split(",") if k.strip()] or ([4, 8] if "flux" in arch else [8, 16])
        results.append(bench_model(arch, size, ks, args.search_steps, device=device, dtype=dtype, tiny=args.tiny))
        print(f"[{arch}] done at {time.time() - t0:.0f} s", flush=True)
    md = to_markdown(results, gpu)
    print(md)
    os.makedirs(args.out_dir, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-")
    meta = dict(gpu=gpu, torch=torch.__version__, seconds=time.time() - t0, results=results)
    with open(os.path.join(args.out_dir, f"guidance-{slug}.json"), "w") as f:
        json.dump(meta, f, indent=2)
    with open(os.path.join(args.out_dir, f"guidance-{slug}.md"), "w") as f:
        f.write(md + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
