"""`mixdit batch`: prompts files, validation before the model loads, outputs + manifest, resume,
seeds, feature flags, failed jobs, and a 2-process `accelerate launch --cpu` run (tiny models)."""

import json
import re

import numpy as np
import pytest
from PIL import Image

import mixdit
import mixdit.cli as cli
from mixdit.batch import make_jobs, read_prompts
from mixdit.errors import MixditError
from mixdit.generate import GenerationRequest

FAST = ["--model", "tiny-sd3", "--steps", "2", "--no-progress"]


@pytest.fixture
def main():
    """`mixdit.cli.main` (`mixdit batch` is one of its FEATURE_CLI_MODULES)."""
    assert "mixdit.batch" in cli.FEATURE_CLI_MODULES
    return cli.main


def _manifest(out):
    return [json.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]


def test_read_txt_and_jsonl(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a red square\n\n   # a comment\n  a blue circle  \n#x\n")
    lines = read_prompts(txt)
    assert [(p.line, p.prompt, p.overrides, p.name) for p in lines] == [(1, "a red square", {}, None),
                                                                         (4, "a blue circle", {}, None)]
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "a cat", "seed": 5, "steps": 3, "guidance_scale": 2, "name": "cat"}\n\n'
                  '# comment\n{"prompt": "a dog", "negative_prompt": "blurry", "height": 32, "width": 48}\n')
    a, b = read_prompts(jl)
    assert (a.line, a.prompt, a.name) == (1, "a cat", "cat")
    assert a.overrides == {"seed": 5, "steps": 3, "guidance_scale": 2.0}
    assert (b.line, b.overrides) == (4, {"negative_prompt": "blurry", "height": 32, "width": 48})
    jobs = make_jobs([a, b], GenerationRequest("", model="tiny-sd3", seed=10, steps=2), seeds=2)
    assert [(j.stem, j.request.seed, j.request.steps) for j in jobs] == [
        ("cat-s5", 5, 3), ("cat-s6", 5 + 1, 3), ("00001-a-dog-s10", 10, 2), ("00001-a-dog-s11", 11, 2)]
    assert jobs[2].request.negative_prompt == "blurry" and jobs[2].request.height == 32
    one = make_jobs([a], GenerationRequest("", seed=0), seeds=1)
    assert [j.stem for j in one] == ["cat"]


@pytest.mark.parametrize("name,text,where", [
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "steps": 4,}\n', ["line 2", "not valid JSON"]),
    ("p.jsonl", '{"prompt": "ok"}\n\n{"prompt": "x", "stepz": 4}\n', ["line 3", "stepz", "one of the keys"]),
    ("p.jsonl", '{"prompt": "x", "steps": "four"}\n', ["line 1", "steps", "an integer"]),
    ("p.jsonl", '{"prompt": "ok"}\n{"prompt": "x", "steps": 0}\n', ["line 2", "steps = 0", "[1, 1000]"]),
    ("p.jsonl", '{"prompt": "x", "height": 30}\n', ["line 1", "height = 30", "multiple of 16"]),
    ("p.jsonl", '{"seed": 3}\n', ["line 1", "prompt is missing"]),
    ("p.jsonl", '["a cat"]\n', ["line 1", "JSON object"]),
    ("p.jsonl", '{"prompt": "x", "name": "../up"}\n', ["line 1", "name = '../up'", "file name"]),
    ("p.jsonl", '{"prompt": "x", "name": "a"}\n{"prompt": "y", "name": "A"}\n', ["line 2", "name", "line 1 writes"]),
    ("p.txt", "# only a comment\n\n", ["prompts_file", "at least one prompt"]),
    ("p.csv", "a,b\n", ["prompts_file", ".jsonl"]),
])
def test_bad_prompts_file_one_line_exit_2(main, tmp_path, capsys, name, text, where):
    f = tmp_path / name
    f.write_text(text)
    out = tmp_path / "out"
    assert main(["batch", str(f), "--out", str(out), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixdit: error:"), err
    for w in where:
        assert w in err[0], err
    if "line" in where[0]:
        assert str(f) in err[0]
    assert not out.exists()  # nothing written, no model loaded


@pytest.mark.parametrize("argv,field", [
    (["--seeds", "0"], "seeds"), (["--steps", "0"], "steps"), (["--perturb-scale", "2"], "heads"),
    (["--vmoba"], "vmoba"),  # tiny-sd3 is an image model: refused after the load, before any generation
    (["--model", "does-not-exist"], "does-not-exist"),
])
def test_bad_flags_exit_2(main, tmp_path, capsys, argv, field):
    (tmp_path / "p.txt").write_text("a red square\n")
    assert main(["batch", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"), *FAST, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and field in err[0], err
    assert not (tmp_path / "out").exists()


def test_model_dependent_line_error_before_any_generation(main, tmp_path, capsys):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a"}\n{"prompt": "b", "frames": 8}\n')
    out = tmp_path / "out"
    assert main(["batch", str(f), "--out", str(out), "--model", "tiny-wan", "--steps", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "line 2" in err and "frames = 8" in err and "4k+1" in err and str(f) in err
    assert not out.exists()


def test_debug_shows_traceback(main, tmp_path):
    (tmp_path / "p.jsonl").write_text('{"prompt": 3}\n')
    with pytest.raises(MixditError, match="line 1"):
        main(["--debug", "batch", str(tmp_path / "p.jsonl"), "--out", str(tmp_path / "o"), *FAST])


def test_outputs_manifest_and_metadata_match_generate(main, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red square\n# skip me\na blue circle\n")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "p.txt"), "--out", str(out), *FAST, "--seed", "3", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "4 done, 0 skipped, 0 failed" in printed and str(out) in printed
    assert re.search(r"; \d+\.\d s after loading \(\d+\.\d jobs/min\)", printed), printed
    names = ["00000-a-red-square-s3.png", "00000-a-red-square-s4.png", "00001-a-blue-circle-s3.png",
             "00001-a-blue-circle-s4.png"]
    assert sorted(p.name for p in out.iterdir()) == sorted(names + ["manifest.jsonl"])  # no temporary files left
    records = _manifest(out)
    assert [r["file"] for r in records] == names and [r["seed"] for r in records] == [3, 4, 3, 4]
    assert all(r["status"] == "done" and r["rank"] == 0 and r["seconds"] >= 0 for r in records)
    assert records[2]["prompt"] == "a blue circle" and records[2]["line"] == 3
    assert records[0]["options"]["steps"] == 2 and records[0]["options"]["model"] == "tiny-sd3"
    # the same file `mixdit generate` writes for that prompt and seed: pixels and metadata
    single = tmp_path / "single.png"
    assert cli.main(["generate", "a blue circle", "--model", "tiny-sd3", "--steps", "2", "--seed", "4",
                     "--out", str(single)]) == 0
    a, b = Image.open(out / names[3]), Image.open(single)
    assert np.array_equal(np.asarray(a), np.asarray(b))
    ma, mb = json.loads(a.text["mixdit"]), json.loads(b.text["mixdit"])
    ma.pop("seconds"), mb.pop("seconds")
    assert ma == mb and a.text["parameters"].split("Seconds")[0] == b.text["parameters"].split("Seconds")[0]


def test_resume_skips_existing_and_never_overwrites(main, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red square\na blue circle\na green triangle\n")
    out = tmp_path / "out"
    argv = ["batch", str(tmp_path / "p.txt"), "--out", str(out), *FAST]
    out.mkdir()
    (out / "00001-a-blue-circle-s0.png").write_bytes(b"user file")  # not ours: must survive
    (out / "notes.txt").write_text("keep")
    # an interrupted earlier run: one job finished and recorded in its rank file, not yet merged
    assert main(argv[:2] + ["--out", str(tmp_path / "first"), *FAST]) == 0
    first = tmp_path / "first"
    (first / "00000-a-red-square-s0.png").rename(out / "00000-a-red-square-s0.png")
    rec = _manifest(first)[0]
    (out / ".manifest.rank0.jsonl").write_text(json.dumps(rec) + "\n" + '{"index": 1, "cut sh')
    capsys.readouterr()
    assert main(argv) == 0
    assert "1 done, 2 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "00001-a-blue-circle-s0.png").read_bytes() == b"user file"
    assert (out / "notes.txt").read_text() == "keep"
    assert not list(out.glob(".manifest.rank*"))
    assert [r["file"] for r in _manifest(out)] == ["00000-a-red-square-s0.png", "00002-a-green-triangle-s0.png"]
    before = (out / "manifest.jsonl").read_text()
    assert main(argv) == 0  # everything done: nothing generated, manifest unchanged
    assert "0 done, 3 skipped, 0 failed" in capsys.readouterr().out
    assert (out / "manifest.jsonl").read_text() == before


def test_jsonl_names_and_overrides_on_a_video_model(main, tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a red square moving right", "name": "square", "seed": 7, "frames": 5, "steps": 1}\n'
                 '{"prompt": "a blue circle", "negative_prompt": "blurry"}\n')
    out = tmp_path / "out"
    assert main(["batch", str(f), "--out", str(out), "--model", "tiny-wan", "--steps", "2", "--frames", "9",
                 "--video-format", "gif", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["00001-a-blue-circle-s0.gif", "00001-a-blue-circle-s0.gif.json",
                                                     "manifest.jsonl", "square.gif", "square.gif.json"]
    meta = json.loads((out / "square.gif.json").read_text())
    assert (meta["seed"], meta["frames"], meta["steps"], meta["prompt"]) == (7, 5, 1, "a red square moving right")
    other = json.loads((out / "00001-a-blue-circle-s0.gif.json").read_text())
    assert (other["frames"], other["steps"], other["negative_prompt"]) == (9, 2, "blurry")
    assert Image.open(out / "square.gif").n_frames == 5


def test_feature_flag_passes_through(main, tmp_path):
    (tmp_path / "p.txt").write_text("a red square\n")
    plain, heads = tmp_path / "plain", tmp_path / "heads"
    assert main(["batch", str(tmp_path / "p.txt"), "--out", str(plain), *FAST]) == 0
    assert main(["batch", str(tmp_path / "p.txt"), "--out", str(heads), *FAST, "--heads", "L0",
                 "--perturb-scale", "5"]) == 0
    name = "00000-a-red-square-s0.png"
    a, b = Image.open(plain / name), Image.open(heads / name)
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    meta = json.loads(b.text["mixdit"])
    assert meta["features"]["guidance"]["scale"] == 5 and "guidance" not in json.loads(a.text["mixdit"])["features"]
    assert _manifest(heads)[0]["options"]["features"]["guidance"]["scale"] == 5


def test_failed_job_is_recorded_and_the_rest_runs(main, tmp_path, capsys, monkeypatch):
    import mixdit.generate as generate

    real = generate.run_generation

    def flaky(pipe, request, callback=None):
        if request.prompt == "bad":
            raise ValueError("boom")
        return real(pipe, request, callback)

    monkeypatch.setattr(generate, "run_generation", flaky)
    (tmp_path / "p.txt").write_text("good one\nbad\ngood two\n")
    out = tmp_path / "out"
    assert main(["batch", str(tmp_path / "p.txt"), "--out", str(out), *FAST]) == 1
    captured = capsys.readouterr()
    assert "2 done, 0 skipped, 1 failed" in captured.out and "boom" in captured.err
    records = _manifest(out)
    assert [r["status"] for r in records] == ["done", "failed", "done"]
    assert records[1]["error"] == "boom" and not (out / records[1]["file"]).exists()
    assert sorted(p.name for p in out.iterdir()) == ["00000-good-one-s0.png", "00002-good-two-s0.png", "manifest.jsonl"]


# ~25 s on the 2-core box (launcher, CLI, torch.distributed.run, 2 ranks); not `slow`, like the other
# two-process tests
def test_two_processes_do_each_job_once(run_two_cpu_ranks, tmp_path):
    mixdit.load_pipeline("tiny-sd3")  # build the cached tiny model once, before two ranks race to it
    (tmp_path / "p.txt").write_text("a red square\na blue circle\na green triangle\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "00001-a-blue-circle-s1.png").write_bytes(b"user file")  # counts as done: skipped by every rank
    proc = run_two_cpu_ranks(["batch", str(tmp_path / "p.txt"), "--out", str(out), "--model", "tiny-sd3",
                              "--steps", "1", "--seeds", "3", "--device", "cpu", "--no-progress"])
    assert proc.returncode == 0, proc.failure
    assert "8 done, 1 skipped, 0 failed (9 jobs, 2 processes, 2 used)" in proc.stdout, proc.stdout
    records = _manifest(out)
    files = [r["file"] for r in records]
    assert len(files) == len(set(files)) == 8 and "00001-a-blue-circle-s1.png" not in files
    assert {r["rank"] for r in records} == {0, 1}
    assert [r["index"] for r in records] == sorted(r["index"] for r in records)
    expected = {f"{i:05d}-{s}-s{seed}.png" for i, s in enumerate(["a-red-square", "a-blue-circle", "a-green-triangle"])
                for seed in range(3)}
    assert {p.name for p in out.glob("*.png")} == expected
    assert (out / "00001-a-blue-circle-s1.png").read_bytes() == b"user file"
    assert not list(out.glob(".*"))  # no per-rank manifests or temporary files left
