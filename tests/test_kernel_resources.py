"""The attention kernels' default configs must fit a Hopper SM (compiled for sm_90 on the CPU, no GPU needed).

Why: a one-line change inside the dQ loop (a tail-tile branch) once made Triton keep q and dO in shared
memory, 256 KB at the default config against Hopper's 227 KB: every fwd+bwd on an H100/H200 failed with
OutOfResources while the interpreter tests (CPU) passed. Compiling with Triton's own ptxas catches it here.
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mixdit.kernels.sm90 import HOPPER_SMEM_PER_BLOCK

_SCRIPT = textwrap.dedent("""
    import importlib, inspect, json
    from mixdit.kernels.sm90 import compile_sm90
    bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")

    def compile_one(kernel, consts, warps, stages):
        return compile_sm90(kernel, consts, warps, stages).shared

    out = []
    kba = importlib.import_module("mixdit.kernels.key_block_attention")
    sig = inspect.signature(kba.key_block_attention).parameters
    kb = dict(F32_DOT=False, D=128, BLOCK_M=sig["block_m"].default, BLOCK_N=sig["block_n"].default, KV_TILE=32)
    out.append(("key-blocks", 128, True, compile_one(kba._key_block_attn_kernel, kb, sig["num_warps"].default,
                                                     sig["num_stages"].default)))
    for D in (64, 128):
        for has_len, has_sel in ((False, False), (True, False), (True, True)):
            bm, bn, w, s = bsa._FWD_CONFIGS[D]
            fwd = dict(Q_TILE=128, KV_TILE=128, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, HAS_LEN=has_len, HAS_SEL=has_sel,
                       EVEN_M=False, EVEN_K=False, F32_DOT=False, USE_TMA=True, WARP_SPEC=False, TAIL_ONLY_MASK=True,
                       SLOT_MASKS=False, HAS_FULL=False)
            out.append(("fwd", D, has_len, compile_one(bsa._fwd_kernel, fwd, w, s)))
            if has_sel and D == 128:  # VMoBA: 1D layers' sorted tiles (kv_full), 3D layers' 32-key steps
                out.append(("fwd-full", D, has_len, compile_one(bsa._fwd_kernel, dict(fwd, HAS_FULL=True), w, s)))
                for kind, sel in (("row_masks", True), ("lengths_only", False)):
                    sbm, sbn, sw, ss = bsa._FWD_CONFIGS_SMALL_KV[kind][D]
                    small = dict(fwd, KV_TILE=32, BLOCK_M=sbm, BLOCK_N=sbn, HAS_SEL=sel, SLOT_MASKS=sel)
                    out.append(("fwd-32-" + kind, D, has_len, compile_one(bsa._fwd_kernel, small, sw, ss)))
            if not has_len:  # a key length that divides: no mask needed, same pipeline wanted
                fwd_even = dict(fwd, EVEN_M=True, EVEN_K=True)
                out.append(("fwd-even", D, has_len, compile_one(bsa._fwd_kernel, fwd_even, w, s)))
            bm, bn, w, s = bsa._DKDV_CONFIGS[D]
            dkdv = dict(Q_TILE=128, KV_TILE=128, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, HAS_LEN=has_len, HAS_SEL=has_sel,
                        F32_DOT=False, PADDED=True, USE_TMA=True, EVEN_Q=False, DQ_ATOMIC=False, DQ_TMA=False, TPP=1)
            out.append(("dkdv", D, has_len, compile_one(bsa._bwd_dkdv_kernel, dkdv, w, s)))
            bm, bn, w, s = bsa._DQ_CONFIGS[D]
            dq = dict(Q_TILE=128, KV_TILE=128, HEAD_DIM=D, BLOCK_M=bm, BLOCK_N=bn, HAS_LEN=has_len, HAS_SEL=has_sel,
                      F32_DOT=False, PADDED=True, USE_TMA=True, EVEN_K=False)
            out.append(("dq", D, has_len, compile_one(bsa._bwd_dq_kernel, dq, w, s)))
            if has_sel and D == 128:  # VMoBA's 3D layers in training: 32-key tiles, dK/dV over pairs of them
                bm, _, w, s = bsa._DKDV_CONFIGS_PAIRS[D]
                pairs = dict(dkdv, Q_TILE=64, KV_TILE=32, BLOCK_M=bm, BLOCK_N=64, TPP=2)
                out.append(("dkdv-32-pairs", D, has_len, compile_one(bsa._bwd_dkdv_kernel, pairs, w, s)))
                bm, bn, w, s = bsa._DQ_CONFIGS_SMALL_KV[D]
                out.append(("dq-32", D, has_len, compile_one(bsa._bwd_dq_kernel, dict(dq, Q_TILE=64, KV_TILE=32,
                                                                                     BLOCK_M=bm, BLOCK_N=bn), w, s)))
    print("RESULT" + json.dumps(out))
""")


def test_default_configs_fit_hopper_shared_memory(tmp_path):
    pytest.importorskip("triton.backends.nvidia")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real compilation, not the interpreter
    # run outside the checkout: `python -c` puts the working directory first on sys.path, where the bare `mixdit/`
    # folder would shadow an installed (non-editable) mixdit
    proc = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                          cwd=tmp_path)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None and ("ptxas" in proc.stderr and "not found" in proc.stderr.lower()):
        pytest.skip("Triton's ptxas is not available here")
    assert line is not None, proc.stderr[-3000:]
    rows = json.loads(line[len("RESULT"):])
    assert len(rows) == 26
    over = [(k, D, masks, smem) for k, D, masks, smem in rows if smem > HOPPER_SMEM_PER_BLOCK]
    assert not over, f"kernels over Hopper's {HOPPER_SMEM_PER_BLOCK} B of shared memory (kernel, D, masks, bytes): {over}"
    # A mask-free forward loop once got two K/V buffers instead of three (164 vs 229 KB at D = 128) and ran 9%
    # slower on an H200: a dividing key length must be pipelined like a ragged one.
    smem = {(k, D): b for k, D, masks, b in rows if not masks}
    for D in (64, 128):
        assert smem[("fwd-even", D)] == smem[("fwd", D)], f"D={D}: {smem[('fwd-even', D)]} vs {smem[('fwd', D)]} B"


def test_blocks_per_sm_counts_shared_memory_registers_and_warps():
    from mixdit.kernels.sm90 import Compiled

    # two 4-warp blocks of 112 KB fit an SM's 228 KB with the 1 KB reserved per block; the 8-warp default does not
    assert Compiled(shared=114712, registers=167, spill_bytes=0, warps=4, sass="").blocks_per_sm == 2
    assert Compiled(shared=229400, registers=254, spill_bytes=0, warps=8, sass="").blocks_per_sm == 1
    assert Compiled(shared=131096, registers=231, spill_bytes=0, warps=8, sass="").blocks_per_sm == 1
    # registers bind first: 255 per thread x 8 warps is half the register file
    assert Compiled(shared=16384, registers=255, spill_bytes=0, warps=8, sass="").blocks_per_sm == 1
    assert Compiled(shared=16384, registers=64, spill_bytes=0, warps=4, sass="").blocks_per_sm == 8
    # small blocks: 64 resident warps per SM (2,048 threads), not 32
    assert Compiled(shared=8192, registers=32, spill_bytes=0, warps=4, sass="").blocks_per_sm == 16
