#!/usr/bin/env bash
# Backward A/B on one Hopper GPU, from the repository root, mixdit importable (nothing is installed here):
# 1. the kernel tests on CUDA;
# 2. host (Python) time per call of the launchers / autograd path, now and at the v3 baseline commit (if git works);
# 3. the atomic-dQ dK/dV kernel's config sweep (each config's error checked first), then fwd+bwd and backward-only
#    at Wan-1.3B (d=0.25, 1.0) for the old kernels (MIXDIT_BWD_TMA=0), split (v3), atomic (v4, default config and
#    the sweep's best) and FlexAttention, and FLUX / SD3.5 fwd+bwd (d=0.5, 0.25) against cuDNN dense fwd+bwd.
# Writes benchmarks/results/attention-bwd-ab-<gpu>.json and ends with a short table.
# Extra arguments go to benchmarks/attention.py (e.g. --bwd-sweep-split, --no-small, --rep-ms 100).
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
BASELINE=${BASELINE:-668414a}  # the last commit before the v4 backward / host-overhead work
t0=$(date +%s)
# from outside the checkout: the repository's top-level mixdit/ folder would shadow the installed package
(cd /tmp && $PY -m pytest -q -x -p no:cacheprovider "$OLDPWD/tests/test_block_sparse_attention.py")
tests=$?
echo "kernel tests took $(( $(date +%s) - t0 )) s"
# time even if a test failed (the A/B prints how far each path's gradients are from the split path's);
# the exit status keeps the failure
$PY benchmarks/attention.py --host --host-baseline "$BASELINE" --bwd-ab --bwd-sweep --rep-ms 150 "$@" || exit $?
echo "kernel tests: $([ $tests -eq 0 ] && echo passed || echo "FAILED (pytest exit $tests)"); total $(( $(date +%s) - t0 )) s"
exit $tests
