"""`mixdit generate` end to end on the offline tiny models, and its error handling."""

import json

import numpy as np
import pytest
from PIL import Image

from mixdit.cli import main


def test_generate_image_with_metadata(tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "a red square", "--model", "tiny-sd3", "--steps", "2", "--seed", "7",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "done in" in printed
    img = Image.open(out)
    assert img.size == (64, 64)
    assert img.text["parameters"].startswith("a red square\n")
    meta = json.loads(img.text["mixdit"])
    assert meta["model"] == "tiny-sd3" and meta["seed"] == 7 and meta["steps"] == 2
    # the metadata reproduces the run bitwise
    out2 = tmp_path / "again.png"
    assert main(["generate", meta["prompt"], "--model", meta["model"], "--steps", str(meta["steps"]),
                 "--seed", str(meta["seed"]), "--out", str(out2)]) == 0
    assert np.array_equal(np.asarray(Image.open(out2)), np.asarray(img))


def test_generate_video_mp4(tmp_path):
    import imageio.v3 as iio

    out = tmp_path / "clip.mp4"
    assert main(["generate", "a red square moving right", "--model", "tiny-wan", "--steps", "2",
                 "--frames", "9", "--out", str(out)]) == 0
    frames = iio.imread(out)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (64, 64)
    assert json.loads((tmp_path / "clip.mp4.json").read_text())["frames"] == 9


def test_generate_with_vmoba_flags(tmp_path):
    out = tmp_path / "v.gif"
    assert main(["generate", "a blue circle", "--model", "tiny-wan", "--steps", "2", "--vmoba",
                 "--vmoba-threshold", "0.5", "--vmoba-spatial-block", "2", "2", "--vmoba-exact-kernel", "query_tiles",
                 "--out", str(out)]) == 0
    meta = json.loads((tmp_path / "v.gif.json").read_text())
    assert meta["features"]["vmoba"]["threshold"] == 0.5
    assert meta["features"]["vmoba"]["exact_kernel"] == "query_tiles"
    assert meta["features"]["vmoba"]["spatial_block"] == [2, 2]


@pytest.mark.parametrize("argv,field", [
    (["generate", "x", "--model", "does-not-exist"], "does-not-exist"),
    (["generate", "x", "--steps", "0"], "steps"),
    (["generate", "x", "--height", "30"], "height"),
    (["generate", "x", "--out", "picture.bmp"], "out"),
    (["generate", "x", "--model", "tiny-wan", "--frames", "8"], "frames"),
    (["generate", "x", "--model", "tiny-cogvideox", "--frames", "10"], "frames"),
    (["generate", "x", "--model", "tiny-wan", "--vmoba", "--vmoba-threshold", "2"], "vmoba.threshold"),
    (["generate", "x", "--model", "tiny-sd3", "--vmoba"], "vmoba"),
    (["generate", "x", "--model", "tiny-wan", "--vmoba", "--vmoba-exact-kernel", "fast"], "vmoba.exact_kernel"),
    (["generate", "x", "--dtype", "int8"], "dtype"),
])
def test_bad_input_one_line_exit_2(argv, field, capsys, tmp_path):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixdit: error:") and field in err[0], err
    assert "Traceback" not in "\n".join(err)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("argv,flag", [
    (["generate", "x", "--steps", "abc"], "--steps"),
    (["generate", "x", "--vmoba", "--vmoba-q-tile", "big"], "--vmoba-q-tile"),
    (["generate", "x", "--vmoba", "--vmoba-spatial-block", "3"], "--vmoba-spatial-block"),
    (["generate", "x", "--vmoba", "--vmoba-tile-union-only", "maybe"], "--vmoba-tile-union-only"),
    (["train", "vmoba", "--data", "synthetic:2", "--vmoba-dense-layers", "one"], "--vmoba-dense-layers"),
    (["bogus"], "COMMAND"),
])
def test_argument_type_errors_one_line_exit_2(argv, flag, capsys, tmp_path):
    """argparse's own errors (a value of the wrong type, a missing value, an unknown command): one line naming the
    flag and what it takes, exit code 2, no usage dump, and nothing written where the command would write."""
    out = {"generate": [str(tmp_path / "x.png")], "train": [str(tmp_path / "o")]}.get(argv[0], [])
    assert main(argv + ["--out", *out] if out else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mixdit") and "error: argument " + flag in err[0], err
    assert not list(tmp_path.iterdir())


def test_every_vmoba_config_field_is_a_flag_of_generate_and_train(capsys):
    """`mixdit generate --vmoba` and `mixdit train vmoba` take the same --vmoba-<field> flags, one per VMoBAConfig
    field, parsed to the field's type (tuples, optional values, booleans, whole-count dense steps)."""
    import dataclasses

    from mixdit.attention.vmoba_cli import features_from_args
    from mixdit.attention.vmoba_config import VMoBAConfig
    from mixdit.attention.vmoba_train_cli import config_from_args
    from mixdit.cli import build_parser

    names = [f.name for f in dataclasses.fields(VMoBAConfig)]
    flags = ["--vmoba-selection", "topk", "--vmoba-topk-spatial", "7", "--vmoba-spatiotemporal-block", "2", "3", "4",
             "--vmoba-dense-layers", "--vmoba-dense-steps", "3", "--vmoba-router-precision", "ieee",
             "--vmoba-kv-tile-spatiotemporal", "none", "--vmoba-tile-union-only", "yes",
             "--vmoba-granularity", "query_tile", "--vmoba-max-tile-density", "0.7"]
    expect = dict(selection="topk", topk_spatial=7, spatiotemporal_block=(2, 3, 4), dense_layers=(), dense_steps=3,
                  router_precision="ieee", kv_tile_spatiotemporal=None, tile_union_only=True,
                  granularity="query_tile", max_tile_density=0.7)
    parser = build_parser()
    gen = features_from_args(parser.parse_args(["generate", "x", "--vmoba", *flags]))["vmoba"]
    train = config_from_args(parser.parse_args(["train", "vmoba", "--data", "synthetic:2", "--out", "o", *flags]))
    train.validate()
    for cfg in (gen, train.vmoba):
        got = dataclasses.asdict(cfg)
        assert {k: got[k] for k in expect} == expect
        assert isinstance(cfg.dense_steps, int)
    for cmd in (["generate", "--help"], ["train", "vmoba", "--help"]):
        capsys.readouterr()
        assert main(cmd) == 0
        text = capsys.readouterr().out
        for name in names:
            assert "--vmoba-" + name.replace("_", "-") in text, (cmd, name)
    assert dataclasses.asdict(features_from_args(parser.parse_args(["generate", "x", "--vmoba"]))["vmoba"]) == \
        dataclasses.asdict(VMoBAConfig())


def test_debug_shows_traceback():
    from mixdit.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        main(["--debug", "generate", "x", "--model", "./no/such/folder"])


def test_models_lists_builtins(capsys):
    assert main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert {"tiny-sd3", "tiny-flux", "tiny-wan", "tiny-wan22", "random:wan2.1-1.3b"} <= set(names)


def test_help_does_not_import_torch_or_diffusers():
    """`mixdit --help` builds every command's parser; none of them may import torch or diffusers (the testbed
    codec's import made --help take 6.6 s, torch through the VMoBA / training / testbed configs 1.8 s; now
    ~0.15 s: the configs the parsers read live in torch-free modules). Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, mixdit.cli as c; c.build_parser(); "
            "heavy = [m for m in ('torch', 'diffusers', 'mixdit.pipelines.testbed.codec') if m in sys.modules]; "
            "print('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "HEAVY []" in out.stdout, out.stdout


def test_argument_errors_are_reported_before_torch_is_imported():
    """A wrong value gets its error (exit code 2) without importing torch or diffusers (~4 s on a CPU): the
    settings are checked before the commands import the model stack. Checked in a fresh interpreter."""
    import subprocess
    import sys

    code = ("import sys, mixdit.cli as c; "
            "codes = [c.main(a) for a in (['generate', 'x', '--steps', '-1'], "
            "['generate', 'x', '--heads', 'L0', '--perturb-scale', '-1'], "
            "['generate', 'x', '--vmoba', '--vmoba-threshold', '2'], "
            "['heads', 'search', '--model', 'tiny-sd3', '--prompts', sys.argv[1], '--out', 'x.json', '--top-k', '0'], "
            "['train', 'vmoba', '--data', 'synthetic:0', '--out', 'o'])]; "
            "print('CODES', codes, 'HEAVY', [m for m in ('torch', 'diffusers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code, __file__], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CODES [2, 2, 2, 2, 2] HEAVY []" in out.stdout, (out.stdout, out.stderr[-2000:])
    for field in ("steps", "guidance.scale", "vmoba.threshold", "search.top_k", "data"):
        assert f"mixdit: error: {field} = " in out.stderr, (field, out.stderr)


def test_libraries_are_quieted_when_first_imported():
    """The component-loading progress bars and info logs of diffusers / transformers stay off although the CLI
    no longer imports them up front."""
    import subprocess
    import sys

    code = ("import logging, mixdit.cli as c; c._quiet_libraries(); "
            "import diffusers.utils.logging as d, transformers.utils.logging as t; "
            "print('QUIET', d.is_progress_bar_enabled(), t.is_progress_bar_enabled(), "
            "d.get_verbosity() == logging.ERROR, t.get_verbosity() == logging.ERROR)")
    env = {k: v for k, v in __import__("os").environ.items() if not k.endswith("_VERBOSITY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert "QUIET False False True True" in out.stdout, (out.stdout, out.stderr[-2000:])


@pytest.mark.parametrize("model", ["tiny-hunyuan-video", "tiny-cogvideox"])
def test_generate_video_families_with_vmoba_and_heads(tmp_path, model):
    """HunyuanVideo and CogVideoX end to end from the CLI (tiny built-ins): VMoBA and head perturbation together."""
    import imageio.v3 as iio

    out = tmp_path / "c.mp4"
    assert main(["generate", "a blue circle", "--model", model, "--steps", "2", "--vmoba", "--heads", "L2",
                 "--out", str(out)]) == 0
    assert iio.imread(out).shape[:3] == (9, 64, 64)
    meta = json.loads((tmp_path / "c.mp4.json").read_text())
    assert meta["model"] == model and set(meta["features"]) == {"vmoba", "guidance"}
