"""Shared test helpers. Without CUDA, Triton kernels run in its CPU interpreter (set before any import of triton)."""

import os
import socket
import subprocess
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")


@pytest.fixture
def device() -> str:
    return "cuda" if HAS_CUDA else "cpu"


@pytest.fixture
def fresh_dynamo():
    """torch.compile tests: no compiled code or counters from an earlier test, none left for a later one."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def tolerance(ref_same_dtype: torch.Tensor, ref_fp32: torch.Tensor) -> float:
    """FlagAttention's rule: allowed max error = 2 x (same-dtype PyTorch error vs fp32) + 1e-5."""
    return 2 * (ref_same_dtype.float() - ref_fp32.float()).abs().max().item() + 1e-5


def assert_close_rule(name: str, out: torch.Tensor, ref_same_dtype: torch.Tensor, ref_fp32: torch.Tensor,
                      gradient: bool = False) -> None:
    """Check ``out`` against the fp32 reference with :func:`tolerance`; -inf entries must match exactly.
    ``gradient``: a backward kernel's output (one more bit of floor, see below)."""
    out_dtype = out.dtype
    out, ref_fp32, ref_same = out.float(), ref_fp32.float(), ref_same_dtype.float()
    assert not torch.isnan(out).any(), f"{name}: NaN in kernel output"
    inf_k, inf_r = torch.isinf(out), torch.isinf(ref_fp32)
    assert torch.equal(inf_k, inf_r), f"{name}: inf pattern differs ({int((inf_k != inf_r).sum())} entries)"
    if inf_r.any():
        assert torch.equal(out[inf_r], ref_fp32[inf_r]), f"{name}: inf sign differs"
    fin = ~inf_r
    err = (out[fin] - ref_fp32[fin]).abs().max().item() if fin.any() else 0.0
    tol = tolerance(ref_same[fin], ref_fp32[fin]) if fin.any() else 1e-5
    if fin.any() and out_dtype in (torch.float16, torch.bfloat16):
        # floor: one ulp of the output dtype at the top of the largest value's binade. On tiny tensors both
        # errors are set by the final rounding of a few elements, and the kernel's and the reference's can
        # differ by one ulp (measured: error ratios of 1.0-2.5x at S=192, bf16, gradients included), which
        # the 2x rule alone makes flaky.
        # Gradients get one more bit: the flash-attention recipe rounds P and dS to the input dtype before
        # the dV / dK / dQ matmuls, and on the few largest gradient elements (sums over a whole query tile)
        # that puts the kernel up to ~2 ulps from fp32 where the reference may sit within 1 (measured: 2 of 200
        # fresh draws of the kv_tile_len test at 1.05-1.07x the one-bit floor). A masking or indexing bug is
        # off by O(1) relative error, far above either floor.
        mant = 7 if out_dtype == torch.bfloat16 else 10
        extra = 1 if gradient else 0
        biggest = ref_fp32[fin].abs().max().item()
        if biggest > 0:
            import math

            tol = max(tol, 2.0 ** (math.floor(math.log2(biggest)) + 1 + extra - mant))
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


@pytest.fixture
def assert_close():
    """Fixture form of :func:`assert_close_rule` (test modules can't import conftest under importlib mode)."""
    return assert_close_rule


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(cmd, extra_env, timeout):
    """Run a two-rank launcher in a clean environment (earlier in-process accelerate use may have left its
    variables); ``.failure``: the head and the tail of stderr (the rank that fails first prints near the top,
    the launcher's summary comes last)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ACCELERATE_", "MASTER_", "TORCHELASTIC_"))
           and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", **(extra_env or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    err = proc.stderr
    proc.failure = err if len(err) <= 6000 else err[:3000] + "\n[...]\n" + err[-3000:]
    return proc


@pytest.fixture
def run_two_cpu_ranks():
    """``run(args, extra_env=None, timeout=300)``: ``python -m mixdit *args`` in two CPU ranks under
    ``accelerate launch`` on a free local port. Returns the CompletedProcess with ``.failure`` (see _run_ranks)."""
    def run(args, extra_env=None, timeout=300):
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), "-m", "mixdit", *args]
        return _run_ranks(cmd, extra_env, timeout)
    return run


@pytest.fixture
def run_script_on_two_cpu_ranks():
    """``run(script, timeout=120)``: a Python file in two ranks under ``torch.distributed.run`` (accelerate's
    CPU launcher starts one process without MPI). Returns the CompletedProcess with ``.failure``."""
    def run(script, timeout=120):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), str(script)]
        return _run_ranks(cmd, None, timeout)
    return run
