#!/usr/bin/env bash
# Backward A/B on one Hopper GPU, from the repository root, mixdit importable (nothing is installed here):
# the kernel tests on CUDA, then fwd+bwd and backward-only timings at Wan-1.3B (d=0.25, 1.0) for the old
# backward kernels (the MIXDIT_BWD_TMA=0 path), the new ones (TMA + padded lse/delta) and FlexAttention.
# Extra arguments go to benchmarks/attention.py (--bwd-sweep also times the new path's configs at d=0.25).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
$PY -m pytest -q -x -p no:cacheprovider tests/test_block_sparse_attention.py
tests=$?
# time even if a test failed (the table says whether new and old agree); the exit status keeps the failure
$PY benchmarks/attention.py --bwd-ab "$@" || exit $?
echo "kernel tests: $([ $tests -eq 0 ] && echo passed || echo "FAILED (pytest exit $tests)")"
exit $tests
