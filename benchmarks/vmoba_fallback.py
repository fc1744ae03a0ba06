"""GPU check of VMoBA's dense-fallback rule in the whole Wan2.1-1.3B transformer (480p, 81 frames, random weights):
dense cuDNN forward vs ``VMoBAConfig()`` defaults (exact per-token rule) with the rule on, timed inside one 50-call
measurement window, plus which rule kept each layer dense and the last sparse/dense timings per layer.
Usage (from the repository root, on a GPU): ``python -P benchmarks/vmoba_fallback.py`` (~1 minute; ``-P`` keeps the
checkout's ``mixdit/`` folder from shadowing the installed package). Writes ``benchmarks/results/vmoba-fallback-<gpu>.json``.
"""

import json
import os
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    import mixdit
    from mixdit.attention.vmoba import VMoBAConfig
    from mixdit.pipelines.random_models import random_transformer

    sys.path.insert(0, HERE)
    from attention import gpu_slug
    from vmoba import model_inputs

    model = random_transformer("wan2.1-1.3b", device="cuda", dtype=torch.bfloat16).eval()
    x = model_inputs((21, 60, 104), "cuda")

    def run():
        with torch.no_grad(), sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            model(**x)

    def timed(label):
        ms = triton.testing.do_bench(run, warmup=1200, rep=2400, return_mode="median")
        print(f"{label:45s} {ms:8.1f} ms", flush=True)
        return ms

    run()
    dense = timed("dense (unpatched, cuDNN)")
    mixdit.apply(model, vmoba=VMoBAConfig())
    run()  # each layer's warm-up call (kernels compile; tile-share rule only)
    run()  # the timed measurement: sparse and dense per layer
    vmoba = timed("VMoBA defaults, timed dense-fallback rule")
    s = mixdit.summary(model)["features"]["vmoba"]
    lt = s["last_timing"]
    print(f"speed-up {dense / vmoba:.3f}; dense calls {s['dense_calls']}")
    print(f"layers timed {len(lt)}, sparse faster in {sum(r['sparse_ms'] < r['dense_ms'] for r in lt.values())}")
    out = dict(gpu=torch.cuda.get_device_name(), dense_ms=dense, vmoba_ms=vmoba, speedup=dense / vmoba,
               dense_calls=s["dense_calls"], last_timing=lt)
    path = os.path.join(HERE, "results", f"vmoba-fallback-{gpu_slug()}.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
