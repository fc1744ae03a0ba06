"""mixdit.distributed: the process-group lifetime of multi-process commands."""

import os
import re
import socket
import subprocess
import sys
import textwrap


def test_process_state_destroys_the_process_group(tmp_path):
    # A gloo group left to the interpreter's teardown aborted a rank now and then in CI ("terminate called
    # without an active exception", SIGABRT; pytorch/pytorch#190489): leaving process_state must destroy it.
    script = tmp_path / "ranks.py"
    script.write_text(textwrap.dedent("""
        import torch.distributed as dist
        from mixdit.distributed import process_state

        with process_state("cpu") as (state, device):
            assert state.num_processes == 2 and dist.is_initialized() and device == "cpu"
            state.wait_for_everyone()
        print(f"rank {state.process_index} group alive after: {dist.is_initialized()}", flush=True)
    """))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "MASTER_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--nnodes", "1",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script)],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the ranks share stdout: their lines may run together
    assert sorted(re.findall(r"rank (\d) group alive after: (True|False)", proc.stdout)) == [("0", "False"), ("1", "False")]
