"""What the compiler made of the forward kernel's configs, on the CPU (no GPU): sm_90 shared memory, registers,
spills, resident blocks per SM, and the main loop's instruction mix per thread (tensor-core MMAs, exp2 on the MUFU
unit, CTA-wide barriers, FMA-pipe work). Reads next to `attention.py --fwd-sweep` timings: e.g. a config whose
shared memory admits only one 4-warp block per SM leaves the tensor cores idle during every softmax.

    python -P benchmarks/kernel_sass.py [--configs "128,128,8,3;64,64,4,2"] [--masks none,len] [--json OUT]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # real compilation (before Triton is imported)

DEFAULT_CONFIGS = "128,128,8,3;128,64,8,3;64,64,4,3;64,64,4,2;64,32,4,4;64,128,4,2"
OPS = ("HGMMA", "MUFU.EX2", "BAR", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "FSEL")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="BLOCK_M,BLOCK_N,warps,stages;...")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--masks", default="none", help="comma list of none | len (VMoBA's kv_tile_len) | len+sel "
                                                     "(+ per-row selection bits) | len+slots (the bits as per-slot masks) | even "
                                                     "(a dividing key length)")
    ap.add_argument("--kv-tile", type=int, default=128, help="the layout's key tile (VMoBA 3D layers: 32)")
    ap.add_argument("--json", default=None, help="also write the rows here")
    a = ap.parse_args(argv)
    from mixdit.kernels.sm90 import compile_sm90

    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")
    rows = []
    print("| BM, BN, warps, stages | masks | smem B | regs | spill B | blocks/SM | scores/thread/iter | "
          + " | ".join(OPS) + " |")
    print("|---" * (7 + len(OPS)) + "|")
    for cfg in a.configs.split(";"):
        bm, bn, warps, stages = (int(x) for x in cfg.split(","))
        for masks in a.masks.split(","):
            consts = dict(Q_TILE=128, KV_TILE=a.kv_tile, HEAD_DIM=a.head_dim, BLOCK_M=bm, BLOCK_N=bn,
                          HAS_LEN=masks.startswith("len"), HAS_SEL=masks in ("len+sel", "len+slots"), EVEN_M=True,
                          EVEN_K=masks == "even", F32_DOT=False, USE_TMA=True, WARP_SPEC=False, TAIL_ONLY_MASK=True,
                          SLOT_MASKS=masks == "len+slots")
            try:
                c = compile_sm90(bsa._fwd_kernel, consts, warps, stages, sass=True)
            except Exception as e:  # e.g. out of shared memory
                print(f"| {cfg} | {masks} | failed: {str(e).splitlines()[0][:80]} |")
                continue
            mix = c.loop_mix()
            per_thread = bm * bn // (32 * warps)
            row = dict(config=[bm, bn, warps, stages], masks=masks, shared=c.shared, registers=c.registers,
                       spill_bytes=c.spill_bytes, blocks_per_sm=c.blocks_per_sm, scores_per_thread=per_thread,
                       loop_mix=mix)
            rows.append(row)
            print(f"| {cfg} | {masks} | {c.shared} | {c.registers} | {c.spill_bytes} | {c.blocks_per_sm} | "
                  f"{per_thread} | " + " | ".join(str(mix.get(op, 0)) for op in OPS) + " |", flush=True)
    if a.json:
        import triton

        with open(a.json, "w") as f:
            json.dump(dict(target="sm_90 (compiled on the CPU)", triton=triton.__version__, head_dim=a.head_dim,
                           rows=rows), f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
