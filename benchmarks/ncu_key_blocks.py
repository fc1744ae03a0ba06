"""One profiled key-block attention call (Wan2.1-1.3B 480p, smooth q/k) for Nsight Compute.

    ncu --profile-from-start off -k regex:"_key_block_attn|_pair_merge" -c 2 --section SpeedOfLight \\
        --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis --section LaunchStats \\
        python3 -P benchmarks/ncu_key_blocks.py spatial|spatiotemporal|temporal

Three warm-up calls compile the kernels; only the fourth runs between cudaProfilerStart/Stop. Session 10's
reports: ``results/ncu-key-block-*-session10-*.txt`` (digest in NOTES.md).
"""

import math
import os
import sys

import torch

sys.path.append(os.path.join(os.getcwd(), "benchmarks"))


def main(layer_type: str) -> None:
    import vmoba_attention as va
    from mixdit.attention.vmoba import VMoBAConfig, route
    from mixdit.kernels.key_block_attention import key_block_attention

    cfg = VMoBAConfig(min_tokens=0, dense_layers=())
    for _, _, D, _, part, qb, kb, vb, _, _ in va._smooth_layers((va.SHAPES[0],), (layer_type,), cfg):
        r0 = route(qb, kb, part, cfg, tile_layout=False)
        kw = dict(block_tile_start=part.block_tile_start, block_tile_count=part.block_tile_count,
                  kv_tile_len=part.kv_tile_len, kv_tile=part.kv_tile, scale=1 / math.sqrt(D))
        for _ in range(3):
            key_block_attention(qb, kb, vb, r0.row_select, **kw)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        key_block_attention(qb, kb, vb, r0.row_select, **kw)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "spatial")
