"""GPU check of VMoBA's dense-fallback rule in the whole Wan2.1-1.3B transformer (480p, 81 frames, random weights):
dense cuDNN forward vs ``VMoBAConfig()`` defaults (exact per-token rule) with the rule on, timed inside one 50-call
measurement window, plus which rule kept each layer dense and the last sparse/dense timings per layer.
Usage (from the repository root, on a GPU): ``python -P benchmarks/vmoba_fallback.py`` (~1 minute).
Writes ``benchmarks/results/vmoba-fallback-<gpu>.json``.
"""
import json
import os
import torch, triton, sys, collections
from torch.nn.attention import SDPBackend, sdpa_kernel
import mixdit
from mixdit.attention.vmoba import VMoBAConfig
from mixdit.pipelines.random_models import random_transformer
sys.path.insert(0, "benchmarks")
from vmoba import model_inputs
model = random_transformer("wan2.1-1.3b", device="cuda", dtype=torch.bfloat16).eval()
x = model_inputs((21, 60, 104), "cuda")
def run():
    with torch.no_grad():
        model(**x)
def t(label):
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        ms = triton.testing.do_bench(run, warmup=1200, rep=2400, return_mode="median")
    print(f"{label:45s} {ms:8.1f} ms", flush=True)
    return ms
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    run()
d = t("dense (unpatched, cuDNN)")
mixdit.apply(model, vmoba=VMoBAConfig())
with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
    run()  # the measuring call: sparse + dense timed per layer
v = t("VMoBA defaults, timed dense-fallback rule")
s = mixdit.summary(model)["features"]["vmoba"]
print("speed-up", round(d / v, 3), "dense_calls", s["dense_calls"])
lt = s["last_timing"]
print("layers measured", len(lt), "sparse faster in", sum(1 for r in lt.values() if r["sparse_ms"] < r["dense_ms"]))
print({k.split(".")[1]: (r["sparse_ms"], r["dense_ms"]) for k, r in list(lt.items())[:12]})
out = dict(gpu=torch.cuda.get_device_name(), dense_ms=d, vmoba_ms=v, speedup=d / v, dense_calls=s["dense_calls"],
           last_timing=lt)
path = os.path.join("benchmarks", "results", "vmoba-fallback-" + torch.cuda.get_device_name().lower().replace(" ", "-") + ".json")
with open(path, "w") as f:
    json.dump(out, f, indent=1)
print("wrote", path)
