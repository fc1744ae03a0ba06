"""Multi-process helpers shared by the commands that spread work with accelerate
(``mixdit heads search``, ``mixdit train vmoba``, ``mixdit batch``)."""

from __future__ import annotations

import os
from contextlib import contextmanager

_MPI_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "MPI_LOCALNRANKS")


def requested_cpu_processes() -> int:
    """Processes asked of ``accelerate launch --cpu --num_processes N`` when it started just one.

    Without MPI (``--mpirun_hostfile``) accelerate's CPU launcher runs the script once (it only
    sets ``MASTER_ADDR``/``MASTER_PORT``); N is read from the launcher's command line. 1 when
    this process is not in that situation.
    """
    env = os.environ
    if env.get("ACCELERATE_USE_CPU", "").lower() not in ("true", "1") or "MASTER_ADDR" not in env:
        return 1
    if any(v in env for v in _MPI_SIZE_VARS) or "RANK" in env or "LOCAL_RANK" in env:
        return 1
    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            parent = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:
        return 1
    if not any("accelerate" in a for a in parent[:3]):
        return 1
    for i, a in enumerate(parent):
        for flag in ("--num_processes", "--num-processes"):
            if a == flag and i + 1 < len(parent) and parent[i + 1].isdigit():
                return int(parent[i + 1])
            if a.startswith(flag + "=") and a.split("=", 1)[1].isdigit():
                return int(a.split("=", 1)[1])
    return 1


@contextmanager
def process_state(device: str = "auto"):
    """Context giving ``(accelerate PartialState, device for this process's work)``. CPU ranks (tests,
    ``accelerate launch --cpu``) need ``cpu=True`` to join the gloo process group; with several
    processes and ``device`` auto/cuda each rank works on its own GPU.

    On leaving, a multi-process run meets at a barrier (success only: a failed rank must not hang the
    others) and destroys its process group: a gloo group left to the interpreter's teardown can abort
    the rank ("terminate called without an active exception", seen in CI)."""
    from accelerate import PartialState

    use_cpu = device == "cpu" or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true")
    state = PartialState(cpu=use_cpu)
    if state.num_processes > 1 and device in ("auto", "cuda"):
        device = str(state.device)
    ok = False
    try:
        yield state, device
        ok = True
    finally:
        if state.num_processes > 1:
            if ok:
                state.wait_for_everyone()
            state.destroy_process_group()


def relaunch_cpu_processes(n: int) -> int:
    """Start ``n`` CPU ranks of this same command with ``torch.distributed.run`` (gloo)."""
    import subprocess
    import sys

    env = dict(os.environ)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--nnodes", "1",
           "--master_addr", env.get("MASTER_ADDR", "127.0.0.1"), "--master_port", env.get("MASTER_PORT", "29500"),
           "-m", "mixdit", *sys.argv[1:]]
    print(f"mixdit: accelerate launch --cpu starts one process without MPI; starting {n} CPU processes "
          "with torch.distributed.run", file=sys.stderr)
    return subprocess.call(cmd, env=env)
