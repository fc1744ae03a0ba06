"""Head perturbation guidance benchmark (GPU): transformer step time and HeadHunter search throughput.

    python benchmarks/guidance.py                     # random:sd3.5-medium and random:flux.1-dev at 1024^2
    python benchmarks/guidance.py --models sd3.5-medium --size 512

Per model (random weights, bf16, one transformer forward = one denoising step, median of CUDA-event
timings after warm-up):

* ``cfg``                 batch 2 [uncond, cond], nothing installed;
* ``cfg+pag (diffusers)`` batch 3 through every block, as diffusers' PAG pipeline runs it (SD3: its
                          ``PAGCFGJointAttnProcessor2_0`` on the layer; FLUX has no diffusers PAG pipeline:
                          mixdit with the shared prefix off, i.e. the same three full rows);
* ``mixdit L7`` / ``mixdit L13`` all heads of that layer perturbed, the perturbed row forked there
                          (blocks before it run for 2 rows only); ``naive`` rows: the same with the fork off.
* search throughput: head-samples scored per GPU-minute at ``--search-steps`` steps (transformer time
  only; VAE decode and the objective are the same per image either way), K candidates batched per call
  (each a cond row + a perturbed row forked at the candidate's layer) vs one candidate per call (the
  reference HeadHunter loop: cond + perturbed row, full depth), averaged over candidate layers.

Targets: mixdit L13 on SD3.5-medium <= 1.25x CFG alone; search >= 3x heads per GPU-minute.
Writes results/guidance-<gpu>.json and .md. Finishes in well under 4 minutes on an H100.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


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


def make_inputs(family, model, batch, size, device, dtype):
    cfg = model.config
    g = torch.Generator(device=device).manual_seed(0)
    lat = size // 8
    if family == "sd3":
        return dict(hidden_states=torch.randn(batch, cfg.in_channels, lat, lat, device=device, dtype=dtype, generator=g),
                    encoder_hidden_states=torch.randn(batch, 333, cfg.joint_attention_dim, device=device, dtype=dtype,
                                                      generator=g),
                    pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype,
                                                   generator=g),
                    timestep=torch.full((batch,), 500.0, device=device), return_dict=False)
    n = (lat // 2) ** 2
    side = lat // 2
    ids = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), -1).reshape(-1, 2)
    img_ids = torch.cat([torch.zeros(n, 1), ids.float()], 1).to(device)
    return dict(hidden_states=torch.randn(batch, n, cfg.in_channels, device=device, dtype=dtype, generator=g),
                encoder_hidden_states=torch.randn(batch, 512, cfg.joint_attention_dim, device=device, dtype=dtype,
                                                  generator=g),
                pooled_projections=torch.randn(batch, cfg.pooled_projection_dim, device=device, dtype=dtype,
                                               generator=g),
                timestep=torch.full((batch,), 0.5, device=device), guidance=torch.full((batch,), 3.5, device=device),
                txt_ids=torch.zeros(512, 3, device=device), img_ids=img_ids, return_dict=False)


def bench_model(arch, size, search_k, search_steps, layers=(7, 13)):
    import mixdit
    from mixdit.guidance.perturbation import GuidanceConfig, guidance_feature, row_layout
    from mixdit.pipelines.adapters import adapter_for
    from mixdit.pipelines.random_models import random_transformer

    device, dtype = "cuda", torch.bfloat16
    model = random_transformer(arch, device=device, dtype=dtype).eval()
    adapter = adapter_for(model)
    family, n_layers = adapter.family, adapter.num_layers(model)
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

    # search throughput: K candidates per call vs one per call, over candidate layers
    cand_layers = sorted({0, n_layers // 4, n_layers // 2, (3 * n_layers) // 4, n_layers - 1})
    search = {"k": search_k, "steps": search_steps, "layers": cand_layers, "per_layer": []}
    xk = make_inputs(family, model, search_k, size, device, dtype)
    x1 = make_inputs(family, model, 1, size, device, dtype)
    mixdit.apply(model, guidance=GuidanceConfig(heads=f"L0-{n_layers - 1}", scale=3.0))
    feat = guidance_feature(model)
    for layer in cand_layers:
        feat.row_head_sets = [{(layer, h % adapter.heads(model))} for h in range(search_k)]
        feat.config.shared_prefix = True
        tk = timed(lambda: run(xk), warmup=1, reps=3)
        feat.row_head_sets = [{(layer, 0)}]
        feat.config.shared_prefix = False
        t1 = timed(lambda: run(x1), warmup=1, reps=3)
        search["per_layer"].append(dict(layer=layer, batched_ms=tk, single_ms=t1))
    mixdit.remove(model)
    mean_k = statistics.mean(p["batched_ms"] for p in search["per_layer"])
    mean_1 = statistics.mean(p["single_ms"] for p in search["per_layer"])
    search["heads_per_gpu_minute_batched"] = 60_000 * search_k / (search_steps * mean_k)
    search["heads_per_gpu_minute_single"] = 60_000 / (search_steps * mean_1)
    search["speedup"] = search["heads_per_gpu_minute_batched"] / search["heads_per_gpu_minute_single"]
    del model
    torch.cuda.empty_cache()
    return dict(arch=arch, family=family, size=size, layers=n_layers, steps=rows, search=search)


def to_markdown(results, gpu) -> str:
    out = [f"# Head perturbation guidance on {gpu}", ""]
    for r in results:
        out += [f"## {r['arch']} at {r['size']}x{r['size']} (bf16, random weights, {r['layers']} layers)", "",
                "| config | batch rows | step ms | x CFG |", "|---|---|---|---|"]
        out += [f"| {s['config']} | {s['batch']} | {s['ms']:.1f} | {s['x_cfg']:.3f} |" for s in r["steps"]]
        s = r["search"]
        out += ["", f"Search ({s['steps']} steps, transformer time, K = {s['k']} candidates per call, "
                    f"candidate layers {s['layers']}):", "",
                "| layer | K batched ms/step | 1 candidate ms/step |", "|---|---|---|"]
        out += [f"| {p['layer']} | {p['batched_ms']:.1f} | {p['single_ms']:.1f} |" for p in s["per_layer"]]
        out += ["", f"Head-samples per GPU-minute: batched {s['heads_per_gpu_minute_batched']:.1f}, one per call "
                    f"{s['heads_per_gpu_minute_single']:.1f} -> {s['speedup']:.2f}x", ""]
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd3.5-medium,flux.1-dev")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--search-k", type=int, default=0, help="candidates per batched call (default 8 SD3, 4 FLUX)")
    p.add_argument("--search-steps", type=int, default=20)
    p.add_argument("--out-dir", default=os.path.join(HERE, "results"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs a CUDA GPU", file=sys.stderr)
        return 1
    torch.backends.cuda.matmul.allow_tf32 = True
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    results = []
    for arch in [a.strip() for a in args.models.split(",") if a.strip()]:
        k = args.search_k or (4 if "flux" in arch else 8)
        results.append(bench_model(arch, args.size, k, args.search_steps))
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
