"""mixdit.distributed: the process-group lifetime of multi-process commands."""

import re
import textwrap


def test_process_state_destroys_the_process_group(run_script_on_two_cpu_ranks, tmp_path):
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
    proc = run_script_on_two_cpu_ranks(script)
    assert proc.returncode == 0, proc.failure
    # the ranks share stdout: their lines may run together
    assert sorted(re.findall(r"rank (\d) group alive after: (True|False)", proc.stdout)) == [("0", "False"), ("1", "False")]
