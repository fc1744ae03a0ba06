"""GPU benchmark: VMoBA under ``torch.compile`` (inductor) in the Wan2.1-1.3B transformer, 480p / 81 frames.

Four forwards of the same random-weight model (bf16, B=1, smooth latents), SDPA pinned to cuDNN for every dense
attention call: dense eager, dense compiled, VMoBA defaults eager, VMoBA defaults compiled. Compiled, mixdit's
patched attention modules stay eager (a graph break each: ``MixditAttnProcessor.__call__`` is
``torch.compiler.disable``d) and everything else (FFN, norms, modulation, cross-attention) goes through inductor;
the dense model compiles whole. Reported: latency, compile time (first call), speed-ups against both dense
baselines, and the relative L2 of each compiled output against its eager output.

Writes ``benchmarks/results/vmoba-compile-<gpu>.json`` and ``.md``. Usage: ``python benchmarks/vmoba_compile.py``;
about 5 minutes on one H100 (two inductor compiles).
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from vmoba import bench, model_inputs, result_path  # noqa: E402


def _forward(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


def _measure(label, model, inputs, ref_eager=None):
    """(row, output): first-call seconds (the compile when ``model`` is compiled), median ms, output."""
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = _forward(model, inputs)
    torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    ms = bench(lambda: _forward(model, inputs), rep=300)
    row = dict(run=label, first_call_s=first_s, ms=ms)
    if ref_eager is not None:
        row["rel_l2_vs_eager"] = float((out.float() - ref_eager.float()).norm() / ref_eager.float().norm())
    print(f"{label}: {ms:.1f} ms (first call {first_s:.1f} s)", flush=True)
    return row, out


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/vmoba_compile.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import mixdit
    from mixdit.attention.vmoba import VMoBAConfig
    from mixdit.pipelines.random_models import random_transformer

    torch.backends.cuda.matmul.allow_tf32 = True
    # cuDNN for every dense SDPA call, eager and compiled alike (inductor picks the backend when it traces)
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_mem_efficient_sdp(False)
    torch.backends.cuda.enable_math_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(True)

    model = random_transformer("wan2.1-1.3b", device="cuda", dtype=torch.bfloat16).eval()
    inputs = model_inputs((21, 60, 104), "cuda")
    rows = []
    row, dense_eager = _measure("dense eager", model, inputs)
    rows.append(row)
    torch._dynamo.reset()
    row, _ = _measure("dense compiled", torch.compile(model), inputs, dense_eager)
    rows.append(row)

    mixdit.apply(model, vmoba=VMoBAConfig())
    row, vmoba_eager = _measure("VMoBA eager", model, inputs)
    rows.append(row)
    torch._dynamo.reset()
    row, vmoba_compiled = _measure("VMoBA compiled", torch.compile(model), inputs, vmoba_eager)
    rows.append(row)
    density = mixdit.summary(model)["features"]["vmoba"]["density"]
    mixdit.remove(model)
    torch._dynamo.reset()

    ms = {r["run"]: r["ms"] for r in rows}
    gpu = torch.cuda.get_device_name()
    result = dict(gpu=gpu, shape="wan2.1-1.3b 480p 81f (32,760 tokens), B=1, bf16", torch=torch.__version__,
                  rows=rows, density=density,
                  speedup_vmoba_compiled_vs_dense_compiled=ms["dense compiled"] / ms["VMoBA compiled"],
                  speedup_vmoba_compiled_vs_dense_eager=ms["dense eager"] / ms["VMoBA compiled"],
                  speedup_vmoba_eager_vs_dense_eager=ms["dense eager"] / ms["VMoBA eager"],
                  vmoba_compiled_rel_l2_vs_dense_eager=float((vmoba_compiled.float() - dense_eager.float()).norm()
                                                             / dense_eager.float().norm()))
    path = result_path("vmoba-compile")
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"# VMoBA under torch.compile, Wan2.1-1.3B 480p 81f ({gpu}, torch {torch.__version__})", "",
             "| run | ms | first call s | rel. L2 vs its eager run |", "|---|---|---|---|"]
    for r in rows:
        rel = f"{r['rel_l2_vs_eager']:.2e}" if "rel_l2_vs_eager" in r else "–"
        lines.append(f"| {r['run']} | {r['ms']:.1f} | {r['first_call_s']:.1f} | {rel} |")
    lines += ["", f"VMoBA compiled vs dense compiled: **{result['speedup_vmoba_compiled_vs_dense_compiled']:.2f}x**; "
              f"vs dense eager: {result['speedup_vmoba_compiled_vs_dense_eager']:.2f}x; eager vs eager: "
              f"{result['speedup_vmoba_eager_vs_dense_eager']:.2f}x."]
    with open(path + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
