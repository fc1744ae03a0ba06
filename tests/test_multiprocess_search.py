"""`accelerate launch --cpu --num_processes 2 mixdit heads search`: every head scored exactly once,
split across the ranks; a resumed search computes nothing new (issue: multi-GPU run, CPU part)."""

import json
import os

import mixdit

OBJECTIVE = '''
import os
import numpy as np

def score(images, prompts):
    # deterministic toy objective; logs each call so the test can count work done
    with open(os.environ["TOY_CALL_LOG"], "a") as f:
        f.write(f"{os.getpid()} {len(images)}\\n")
    return [-abs(float(np.asarray(im, dtype=np.float32).mean()) / 255.0 - 0.5) for im in images]
'''


def _search(run_two_cpu_ranks, tmp_path, *extra):
    args = ["heads", "search", "--model", "tiny-sd3", "--prompts", str(tmp_path / "prompts.txt"),
            "--objective", "toy_objective_mp:score", "--candidates", "L0-1", "--top-k", "2", "--samples", "1",
            "--steps", "2", "--batch-size", "4", "--device", "cpu", "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "preset.json"), *extra]
    return run_two_cpu_ranks(args, dict(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
                                        TOY_CALL_LOG=str(tmp_path / "calls.log")))


def test_two_process_search_scores_each_head_once_and_resumes(run_two_cpu_ranks, tmp_path):
    mixdit.load_pipeline("tiny-sd3")  # build the cached tiny model once, before two ranks race to it
    (tmp_path / "toy_objective_mp.py").write_text(OBJECTIVE)
    (tmp_path / "prompts.txt").write_text("a red square\n")
    proc = _search(run_two_cpu_ranks, tmp_path)
    assert proc.returncode == 0, proc.failure
    per_rank = []
    for r in range(2):
        lines = (tmp_path / "cache" / f"scores.rank{r}.jsonl").read_text().splitlines()
        per_rank.append([json.loads(x)["heads"] for x in lines])
    assert per_rank[0] and per_rank[1], "both ranks scored candidates"
    scored = per_rank[0] + per_rank[1]
    assert len(scored) == len(set(scored)) == 8  # tiny-sd3: 2 layers x 4 heads, each exactly once
    assert not set(per_rank[0]) & set(per_rank[1])
    pids = {line.split()[0] for line in (tmp_path / "calls.log").read_text().splitlines()}
    assert len(pids) == 2  # the work really ran in two processes
    preset = json.loads((tmp_path / "preset.json").read_text())
    assert preset["model"] == "tiny-sd3" and len(preset["heads"].split(",")) >= 1
    calls_before = (tmp_path / "calls.log").read_text()
    again = _search(run_two_cpu_ranks, tmp_path, "--resume")
    assert again.returncode == 0, again.failure
    assert (tmp_path / "calls.log").read_text() == calls_before  # resumed: nothing recomputed
    assert json.loads((tmp_path / "preset.json").read_text())["heads"] == preset["heads"]
