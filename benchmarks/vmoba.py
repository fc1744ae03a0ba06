"""GPU benchmark: VMoBA (defaults) vs dense attention in whole Wan transformers.

* Wan2.1-1.3B (random weights, bf16, B=1) forward at 480p / 81 frames (latent 21x60x104 ->
  32,760 tokens): dense (best SDPA backend: cuDNN, flash) vs ``mixdit.apply(vmoba=VMoBAConfig())``.
* Wan2.1-14B at 720p / 81 frames (75,600 tokens): a stack of 1 and 4 layers of the published width
  is timed; the 40-layer forward is composed from the measured per-layer times (overhead + layer 0
  dense + 39 VMoBA layers, each layer type in its real proportion), and the script says so.

Also reported: attention time alone (router + permutation + sparse kernel per layer type, on q/k/v
captured from the model itself, summed over the layers; vs cuDNN dense per layer), achieved
density per layer type, router share, the attention share of the dense forward (the Amdahl
ceiling), the theoretical FLOPs ratio (attention only, and whole transformer) comparable with the
paper's 2.40x / 2.92x, and fidelity on spatially and temporally smooth latents (relative L2 of the
transformer output vs dense). A generation keeps the first ``dense_steps`` (24%) of the steps
dense: the per-generation speed-up is printed too.

The forward runs outside a pipeline's denoising loop, so the dense warm-up steps do not apply
(layer 0 stays dense). Writes ``benchmarks/results/vmoba-<gpu>.json`` and ``.md``.
Usage: ``python benchmarks/vmoba.py [--skip-14b]``; about 4 minutes on one H100.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def bench(fn, rep=200):
    import triton

    return float(triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median"))


def smooth_latents(shape, device, seed=0):
    """Spatially and temporally smooth latents: random noise at 1/8 resolution, trilinearly upsampled."""
    g = torch.Generator(device=device).manual_seed(seed)
    B, C, Fr, H, W = shape
    low = torch.randn(B, C, max(2, Fr // 4), max(2, H // 8), max(2, W // 8), device=device, generator=g)
    x = F.interpolate(low, size=(Fr, H, W), mode="trilinear", align_corners=True)
    return (x / x.std()).to(torch.bfloat16)


def model_inputs(grid_latent, device, seed=0):
    Fr, H, W = grid_latent
    g = torch.Generator(device=device).manual_seed(seed + 1)
    return dict(hidden_states=smooth_latents((1, 16, Fr, H, W), device, seed),
                timestep=torch.tensor([500.0], device=device),
                encoder_hidden_states=torch.randn(1, 512, 4096, device=device, generator=g).to(torch.bfloat16),
                return_dict=False)


def wan13b_layer_qkv(layers, device, dtype) -> dict:
    """{layer: (q, k, v)} ([1, S, H, D]) of a random-weight Wan2.1-1.3B's self-attention at 480p / 81 frames from
    smooth latents, running only the first max(layers) + 1 blocks (the per-kernel studies' realistic inputs)."""
    from mixdit.pipelines.random_models import random_transformer

    model = random_transformer("wan2.1-1.3b", device=device, dtype=dtype, num_layers=max(layers) + 1).eval()
    inputs = {k: v.to(dtype) if torch.is_tensor(v) and v.dtype == torch.bfloat16 else v  # latents, text states
              for k, v in model_inputs((21, 60, 104), device).items()}
    return capture_qkv(model, inputs, set(layers))


def capture_qkv(model, inputs, layers):
    """q, k, v ([B, S, H, D]) of the self-attention of ``layers``, as the real model computes them."""
    import mixdit
    from mixdit.api import FEATURES, Feature, register_feature

    store = {}

    class _Capture(Feature):
        keyword, config_class = "_capture", dict

        def sites(self, m, name):
            return [s for s in self.adapter.attention_sites(m) if s.layer_index in layers]

        def attend(self, call):
            store[call.site.layer_index] = tuple(t.transpose(1, 2).contiguous() for t in
                                                 (call.query, call.key, call.value))
            return None

    register_feature(_Capture)
    try:
        mixdit.apply(model, _capture={})
        with torch.no_grad():
            model(**inputs)
        mixdit.remove(model)
    finally:
        FEATURES.pop("_capture", None)
    return store


def time_forward(model, inputs, backend=None):
    def run():
        with torch.no_grad():
            model(**inputs)

    if backend is None:
        return bench(run, rep=300)
    with sdpa_kernel(backend):
        return bench(run, rep=300)


def attention_times(store, grid, config):
    """Per captured layer: dense cuDNN ms, VMoBA ms (router + permutation + kernel), router ms, density."""
    from mixdit.attention.vmoba import (VMoBAStats, attention_path, layer_type_for, partition_for_layer, route,
                                        vmoba_attention)

    out = {}
    for layer, (q, k, v) in store.items():
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            dense_ms = bench(lambda: F.scaled_dot_product_attention(qt, kt, vt))
        stats = VMoBAStats()
        vm = lambda: vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=config)  # noqa: E731
        vmoba_ms = bench(vm)
        part = partition_for_layer(grid, layer, config, q.device)
        qb = q[:, part.q_perm].contiguous() if not part.q_is_identity else q
        kb = k[:, part.kv_perm].contiguous() if not part.kv_is_identity else k
        layout = attention_path(config, part, qb, kb, v) == "query_tiles"  # the route vmoba_attention runs
        router_ms = bench(lambda: route(qb, kb, part, config, tile_layout=layout))
        vmoba_attention(q, k, v, grid=grid, layer_index=layer, config=config, stats=stats)
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            ref = F.scaled_dot_product_attention(qt, kt, vt).transpose(1, 2)
            got = vm()
            rel = float((got.float() - ref.float()).norm() / ref.float().norm())
        d = stats.as_dict().get(layer_type_for(layer, config), {})
        out[layer] = dict(layer_type=layer_type_for(layer, config), dense_ms=dense_ms, vmoba_ms=vmoba_ms,
                          router_ms=router_ms, density=d.get("density"), tile_density=d.get("tile_density"),
                          attn_rel_l2=rel)
    return out


def attention_totals(per_layer, counts, config):
    """Attention ms summed over the model's layers: dense, VMoBA as installed (a layer type runs dense when the
    dense-fallback rule says so: its sparse call was slower than dense, or its tile density is over
    ``max_tile_density``), VMoBA with every layer sparse, and the router's part of the as-installed time."""
    from mixdit.attention.vmoba import vmoba_fallback_reason

    dense_layer = per_layer[1]["dense_ms"]
    by_type = {r["layer_type"]: r for r in per_layer.values()}
    falls_back = {t: vmoba_fallback_reason(config, r["tile_density"], r["vmoba_ms"], r["dense_ms"]) is not None
                  for t, r in by_type.items()}
    dense_total = sum(counts.values()) * dense_layer
    all_sparse = counts["dense"] * dense_layer + sum(counts[t] * r["vmoba_ms"] for t, r in by_type.items())
    as_run = counts["dense"] * dense_layer + sum(counts[t] * (r["dense_ms"] if falls_back[t] else r["vmoba_ms"])
                                                 for t, r in by_type.items())
    router = sum(counts[t] * r["router_ms"] for t, r in by_type.items() if not falls_back[t])
    return dict(attention_dense_ms=dense_total, attention_vmoba_ms=as_run, attention_speedup=dense_total / as_run,
                attention_vmoba_all_sparse_ms=all_sparse, attention_dense_fallback=falls_back,
                router_ms_total=router, router_share_of_attention=router / as_run)


def layer_counts(num_layers, config):
    from mixdit.attention.vmoba import layer_type_for

    counts = {"dense": 0, "temporal": 0, "spatial": 0, "spatiotemporal": 0}
    for i in range(num_layers):
        counts["dense" if i in config.dense_layers else layer_type_for(i, config)] += 1
    return counts


def run_wan13b(device, configs, rows):
    import mixdit
    from mixdit.pipelines.random_models import random_transformer

    grid = (21, 30, 52)
    model = random_transformer("wan2.1-1.3b", device=device, dtype=torch.bfloat16).eval()
    inputs = model_inputs((21, 60, 104), device)
    t_cudnn = time_forward(model, inputs, SDPBackend.CUDNN_ATTENTION)
    t_flash = time_forward(model, inputs, SDPBackend.FLASH_ATTENTION)
    t_dense = min(t_cudnn, t_flash)
    with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ref = model(**inputs)[0].float()
    # attention alone, on q/k/v captured from this model (one layer of each type, layer 0 dense)
    store = capture_qkv(model, inputs, {0, 1, 2, 3})
    for label, config in configs:
        per_layer = attention_times({k_: v_ for k_, v_ in store.items() if k_ != 0}, grid, config)
        counts = layer_counts(30, config)
        by_type = {r["layer_type"]: r for r in per_layer.values()}
        totals = attention_totals(per_layer, counts, config)
        # the whole transformer with VMoBA installed
        mixdit.apply(model, vmoba=config)
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):  # layer 0 (dense) uses cuDNN too
            t_vmoba = time_forward(model, inputs)
            with torch.no_grad():
                got = model(**inputs)[0].float()
        summary = mixdit.summary(model)["features"]["vmoba"]["density"]
        mixdit.remove(model)
        rel_l2 = float((got - ref).norm() / ref.norm())
        density_avg = sum(counts[t] * (by_type[t]["density"] or 1) for t in by_type) / max(1, sum(counts[t] for t in by_type))
        attn_flops_layer = 4 * 1 * 12 * (32760 ** 2) * 128
        lin_flops_layer = 2 * 32760 * (4 * 1536 * 1536 + 2 * 1536 * 8960) + 2 * 32760 * 2 * 1536 * 1536  # self+cross proj, ffn
        attn_ratio = 30 / (counts["dense"] + sum(counts[t] * (by_type[t]["density"] or 1) for t in by_type))
        whole_ratio = (30 * (attn_flops_layer + lin_flops_layer)) / (
            30 * lin_flops_layer + attn_flops_layer * (counts["dense"] + sum(counts[t] * (by_type[t]["density"] or 1) for t in by_type)))
        dense_frac = config.dense_steps if isinstance(config.dense_steps, float) else config.dense_steps / 50
        gen_speedup = 1.0 / (dense_frac + (1 - dense_frac) * t_vmoba / t_dense)
        rows.append(dict(shape="wan2.1-1.3b 480p 81f", config=label, tokens=32760, gpu=torch.cuda.get_device_name(),
                         dense_cudnn_ms=t_cudnn, dense_flash_ms=t_flash, vmoba_ms=t_vmoba,
                         forward_speedup=t_dense / t_vmoba, generation_speedup_with_dense_steps=gen_speedup,
                         **totals, attention_share_of_dense_forward=totals["attention_dense_ms"] / t_cudnn,
                         amdahl_ceiling=1.0 / (1 - totals["attention_dense_ms"] / t_cudnn),
                         density_per_layer_type={t: by_type[t]["density"] for t in by_type},
                         tile_density_per_layer_type={t: by_type[t]["tile_density"] for t in by_type},
                         summary_density=summary, mean_density=density_avg,
                         flops_ratio_attention=attn_ratio, flops_ratio_transformer=whole_ratio,
                         output_rel_l2_vs_dense=rel_l2, per_layer=per_layer, layer_counts=counts, composed=False))
    del model, store
    torch.cuda.empty_cache()


def run_wan14b(device, configs, rows):
    import mixdit
    from mixdit.pipelines.random_models import random_transformer

    grid, latent = (21, 45, 80), (21, 90, 160)
    inputs = model_inputs(latent, device)
    times, results = {}, {}
    for n in (1, 4):
        model = random_transformer("wan2.1-14b", device=device, dtype=torch.bfloat16, num_layers=n).eval()
        times[("dense", n)] = time_forward(model, inputs, SDPBackend.CUDNN_ATTENTION)
        if n == 4:
            with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                ref = model(**inputs)[0].float()
            store = capture_qkv(model, inputs, {1, 2, 3})
            for label, config in configs:
                per_layer = attention_times(store, grid, config)
                mixdit.apply(model, vmoba=config)
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_v = time_forward(model, inputs)
                    with torch.no_grad():
                        got = model(**inputs)[0].float()
                summary = mixdit.summary(model)["features"]["vmoba"]["density"]
                mixdit.remove(model)
                results[label] = (config, per_layer, t_v, summary, float((got - ref).norm() / ref.norm()))
            del store
        del model
        torch.cuda.empty_cache()
    for label, (config, per_layer, t_v, summary, rel14) in results.items():
        times[("vmoba", 4)] = t_v
        _compose_14b(config, label, per_layer, times, summary, rel14, rows)


def _compose_14b(config, label, per_layer, times, summary, rel14, rows):
    layer_dense = (times[("dense", 4)] - times[("dense", 1)]) / 3
    overhead = times[("dense", 1)] - layer_dense
    layer_vmoba = (times[("vmoba", 4)] - overhead - layer_dense) / 3  # layers 1-3: one of each type
    counts = layer_counts(40, config)
    by_type = {r["layer_type"]: r for r in per_layer.values()}
    t40_dense = overhead + 40 * layer_dense
    sparse_layers = 40 - counts["dense"]
    t40_vmoba = overhead + counts["dense"] * layer_dense + sparse_layers * layer_vmoba
    totals = attention_totals(per_layer, counts, config)
    attn_ratio = 40 / (counts["dense"] + sum(counts[t] * (by_type[t]["density"] or 1) for t in by_type))
    attn_flops_layer = 4 * 40 * (75600 ** 2) * 128
    lin_flops_layer = 2 * 75600 * (4 * 5120 * 5120 + 2 * 5120 * 13824) + 2 * 75600 * 2 * 5120 * 5120
    whole_ratio = (40 * (attn_flops_layer + lin_flops_layer)) / (
        40 * lin_flops_layer + attn_flops_layer * (counts["dense"] + sum(counts[t] * (by_type[t]["density"] or 1) for t in by_type)))
    dense_frac = config.dense_steps if isinstance(config.dense_steps, float) else config.dense_steps / 50
    gen_speedup = 1.0 / (dense_frac + (1 - dense_frac) * t40_vmoba / t40_dense)
    rows.append(dict(shape="wan2.1-14b 720p 81f", config=label, tokens=75600, gpu=torch.cuda.get_device_name(),
                     dense_cudnn_ms=t40_dense, vmoba_ms=t40_vmoba, forward_speedup=t40_dense / t40_vmoba,
                     generation_speedup_with_dense_steps=gen_speedup,
                     **totals, attention_share_of_dense_forward=totals["attention_dense_ms"] / t40_dense,
                     amdahl_ceiling=1.0 / (1 - min(0.999, totals["attention_dense_ms"] / t40_dense)),
                     density_per_layer_type={t: by_type[t]["density"] for t in by_type},
                     tile_density_per_layer_type={t: by_type[t]["tile_density"] for t in by_type},
                     summary_density=summary, flops_ratio_attention=attn_ratio, flops_ratio_transformer=whole_ratio,
                     output_rel_l2_vs_dense_4_layers=rel14,
                     per_layer=per_layer, layer_counts=counts, composed=True,
                     stack_times_ms={f"{k[0]}-{k[1]}layers": v for k, v in times.items()},
                     note="40-layer times composed from measured 1- and 4-layer stacks: overhead + layer 0 dense + 39 x mean VMoBA layer"))


def result_path(name: str) -> str:
    """``benchmarks/results/<name>-<gpu>`` (no extension; the folder is created)."""
    os.makedirs(RESULTS, exist_ok=True)
    return os.path.join(RESULTS, f"{name}-" + torch.cuda.get_device_name().lower().replace(" ", "-"))


def write(rows):
    path = result_path("vmoba")
    with open(path + ".json", "w") as f:
        json.dump(rows, f, indent=1, default=float)
    lines = [f"# VMoBA in the Wan transformer ({torch.cuda.get_device_name()})", "",
             "| shape | config | dense ms | VMoBA ms | forward speed-up | per generation (24% dense steps) | attention dense ms | attention VMoBA ms (all sparse) | attention speed-up | layer types run dense by the fallback rule | attention share (dense) | Amdahl ceiling | router share | density 1D/2D/3D | FLOPs ratio attn / whole | rel. L2 vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["density_per_layer_type"]
        dens = "/".join(f"{d.get(t) or 0:.3f}" for t in ("temporal", "spatial", "spatiotemporal"))
        rel = r.get("output_rel_l2_vs_dense", r.get("output_rel_l2_vs_dense_4_layers"))
        lines.append(f"| {r['shape']}{' (composed)' if r['composed'] else ''} | {r['config']} | {r['dense_cudnn_ms']:.1f} | {r['vmoba_ms']:.1f} | "
                     f"{r['forward_speedup']:.2f}x | {r['generation_speedup_with_dense_steps']:.2f}x | {r['attention_dense_ms']:.1f} | "
                     f"{r['attention_vmoba_ms']:.1f} ({r['attention_vmoba_all_sparse_ms']:.1f}) | {r['attention_speedup']:.2f}x | "
                     f"{', '.join(t for t, d in r['attention_dense_fallback'].items() if d) or 'none'} | "
                     f"{r['attention_share_of_dense_forward']:.0%} | "
                     f"{r['amdahl_ceiling']:.2f}x | {r['router_share_of_attention']:.1%} | {dens} | "
                     f"{r['flops_ratio_attention']:.2f}x / {r['flops_ratio_transformer']:.2f}x | {rel:.4f} |")
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-14b", action="store_true")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/vmoba.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from mixdit.attention.vmoba import VMoBAConfig

    torch.backends.cuda.matmul.allow_tf32 = True
    configs = [("defaults (exact per-token)", VMoBAConfig()),
               ("granularity=query_tile (approximate)", VMoBAConfig(granularity="query_tile"))]
    rows = []
    run_wan13b("cuda", configs, rows)
    write(rows)
    if not args.skip_14b:
        run_wan14b("cuda", configs, rows)
        write(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
