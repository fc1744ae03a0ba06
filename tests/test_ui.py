"""The Gradio web UI (`mixdit ui`) without a browser: the app's own event functions on tiny models."""

import asyncio
import json

import numpy as np
import pytest

gr = pytest.importorskip("gradio")

from mixdit.pipelines.output import read_metadata  # noqa: E402
from mixdit.ui.app import build_app, preset_updates  # noqa: E402
from mixdit.ui.logic import Form, Runner, model_info  # noqa: E402


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    runner = Runner(tmp_path_factory.mktemp("ui-outputs"), max_pipelines=2)
    return build_app(runner, model="tiny-sd3", device="cpu")


@pytest.fixture
def outputs(app, tmp_path):
    app.mixdit_runner.outputs_dir = tmp_path  # each test sees only its own files
    return tmp_path


def _fn(app, api_name):
    return next(f for f in app.fns.values() if f.api_name == api_name)


def _values(**changes):
    form = Form(device="cpu", dtype="auto")
    for k, v in changes.items():
        assert hasattr(form, k), k
        setattr(form, k, v)
    return [getattr(form, name) for name in Form.field_names()]


def _generate(app, **changes):
    return _fn(app, "generate").fn(*_values(**changes))


def _pixels(path):
    from PIL import Image

    return np.asarray(Image.open(path))


def test_app_builds_with_the_form_and_serialised_generate(app):
    fn = _fn(app, "generate")
    assert fn.concurrency_limit == 1  # one generation at a time
    assert len(app.mixdit_form_inputs) == len(Form.field_names())
    # a failed generate cannot touch what the user typed: no input is also an output
    assert not {id(c) for c in fn.outputs} & {id(c) for c in app.mixdit_form_inputs}


def test_image_generation_writes_png_with_metadata(app, outputs):
    image, video, summary, files, meta = _generate(app, model="tiny-sd3", prompt="a red square", steps=2, seed=7)
    path = image["value"]
    assert image["visible"] and not video["visible"] and video["value"] is None
    assert files == [path] and path.startswith(str(outputs)) and path.endswith(".png")
    saved = read_metadata(path)
    assert saved == meta and saved["model"] == "tiny-sd3" and saved["seed"] == 7 and saved["steps"] == 2
    assert _pixels(path).shape == (64, 64, 3)
    assert "seed 7" in summary and "2 steps" in summary and "64×64" in summary


def test_random_seed_is_recorded(app, outputs):
    *_, summary, _, meta = _generate(app, model="tiny-sd3", steps=1, seed=0, random_seed=True)
    assert f"seed {meta['seed']}" in summary and isinstance(meta["seed"], int)


@pytest.mark.parametrize("model", ["tiny-wan", "tiny-hunyuan-video", "tiny-cogvideox"])
def test_video_generation_with_vmoba_writes_mp4_sidecar_and_density_summary(app, outputs, model):
    import imageio.v3 as iio

    image, video, summary, files, meta = _generate(
        app, model=model, steps=2, frames=9, fps=8, vmoba=True, vmoba_threshold=0.5, vmoba_dense_steps=1.0)
    path = video["value"]
    assert video["visible"] and not image["visible"]
    assert files == [path, path + ".json"]
    assert iio.imread(path).shape[:3] == (9, 64, 64)
    sidecar = json.loads(open(path + ".json").read())
    assert sidecar == meta and meta["frames"] == 9 and meta["fps"] == 8
    vmoba = meta["features"]["vmoba"]
    assert vmoba["threshold"] == 0.5 and vmoba["dense_steps"] == 1  # a whole count, as `--vmoba-dense-steps 1`
    assert "VMoBA" in summary and "dense calls" in summary  # tiny grids run dense: the summary says why


def test_generate_through_gradio_processing(app, outputs):
    """The same event through gradio's pre/post-processing (what a browser request runs)."""
    from gradio.state_holder import SessionState

    out = asyncio.run(app.process_api(block_fn=_fn(app, "generate"), inputs=_values(model="tiny-sd3", steps=1),
                                      state=SessionState(app)))
    image, video, summary, files, meta = out["data"]
    assert image["value"]["path"].endswith(".png") and image["visible"]
    assert "1 steps" in summary and len(list(outputs.glob("*.png"))) == 1


@pytest.mark.parametrize("changes,field", [
    (dict(model="tiny-wan", vmoba=True, vmoba_threshold=2), "vmoba.threshold"),
    (dict(model="tiny-wan", vmoba=True, vmoba_selection="best"), "vmoba.selection"),
    (dict(height=30), "height"),
    (dict(steps=0), "steps"),
    (dict(steps=2.5), "steps"),
    (dict(guidance=True, heads=""), "guidance.heads"),
    (dict(guidance=True, heads="L1H0", softpag=1.5), "guidance.softpag"),
    (dict(model="tiny-wan", frames=8), "frames"),
])
def test_bad_value_is_one_field_named_error(app, outputs, changes, field):
    loads = app.mixdit_runner.loads
    with pytest.raises(gr.Error) as err:
        _generate(app, **{"model": "tiny-sd3", "steps": 1, **changes})
    message = err.value.message
    assert message.startswith(f"{field} = ") and "is not allowed: expected" in message, message
    assert "\n" not in message and "Traceback" not in message
    assert not list(outputs.iterdir())
    if field != "frames":  # frames is checked against the loaded model's family
        assert app.mixdit_runner.loads == loads  # rejected before any model load


def test_unknown_model_is_one_message(app, outputs):
    with pytest.raises(gr.Error) as err:
        _generate(app, model="tiny-sd3", model_path="./no/such/folder")
    assert "./no/such/folder" in err.value.message and "Traceback" not in err.value.message


def test_features_never_leak_into_the_next_request(app, outputs):
    runner = app.mixdit_runner
    plain = dict(model="tiny-sd3", prompt="a red square", steps=2, seed=3)
    first = _generate(app, **plain)[0]["value"]
    loads = runner.loads
    guided = _generate(app, **plain, guidance=True, heads="L1H0", perturb_scale=3.0)
    assert "head guidance L1H0" in guided[2] and guided[4]["features"]["guidance"]["heads"] == "L1H0"
    with pytest.raises(gr.Error, match="vmoba does not support the sd3 family"):  # fails after the load
        _generate(app, **plain, vmoba=True)
    again = _generate(app, **plain)
    assert runner.loads == loads  # the cached pipeline served all of them
    assert not np.array_equal(_pixels(guided[0]["value"]), _pixels(first))
    assert np.array_equal(_pixels(again[0]["value"]), _pixels(first))  # bitwise the plain run
    assert again[4]["features"] == {} and again[4]["summary"] == {}
    import mixdit

    pipe = runner.cached("tiny-sd3", "cpu", None)
    assert pipe is not None and mixdit.summary(pipe) == {"features": {}}


def test_preset_upload_fills_fields_and_drives_generation(app, outputs, tmp_path):
    preset = tmp_path / "preset.json"
    preset.write_text(json.dumps({"model": "tiny-sd3", "heads": "L1H0,L1H1", "scale": 2.0, "softpag": 0.5,
                                  "mode": "uniform"}))
    on, heads, scale, softpag, mode = preset_updates(str(preset))
    assert (on["value"], heads["value"], scale["value"], softpag["value"], mode["value"]) == (
        True, "L1H0,L1H1", 2.0, 0.5, "uniform")
    meta = _generate(app, model="tiny-sd3", steps=1, guidance=True, heads="", heads_preset=str(preset),
                     perturb_scale=None, softpag=None, perturb_mode=None)[4]
    g = meta["features"]["guidance"]
    assert (g["heads"], g["scale"], g["softpag"], g["mode"]) == ("L1H0,L1H1", 2.0, 0.5, "uniform")
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(gr.Error, match="guidance.heads"):
        preset_updates(str(bad))


def test_model_change_fills_defaults_and_shows_panels(app):
    fn = _fn(app, "model_defaults")
    path, note, steps, cfg, width, height, frames, video_row, vmoba_box, vmoba, image, video = fn.fn("tiny-wan")
    assert path["value"] == "" and "Wan" in note["value"]
    assert (steps["value"], cfg["value"], width["value"], height["value"], frames["value"]) == (4, 4.0, 64, 64, 9)
    assert video_row["visible"] and vmoba_box["visible"] and video["visible"] and not image["visible"]
    _, note, steps, _, _, _, frames, video_row, vmoba_box, vmoba, image, video = fn.fn("tiny-sd3")
    assert steps["value"] == 4 and frames["value"] is None and "SD3" in note["value"]
    assert not video_row["visible"] and not vmoba_box["visible"] and vmoba["value"] is False and image["visible"]
    _, _, steps, _, _, _, frames, *_ = fn.fn("mixdit-shapes-video")  # the testbed model's trained settings
    from mixdit.pipelines.testbed.models import PRESETS

    assert (steps["value"], frames["value"]) == (PRESETS["video"].default_steps, 13)


def test_model_info_reads_local_folders_without_loading():
    from mixdit.pipelines.testbed.load import SHIPPED_WEIGHTS

    info = model_info(str(SHIPPED_WEIGHTS / "mixdit-shapes-image"))
    assert (info.family, info.is_video, info.defaults["steps"]) == ("sd3", False, 30)
    assert not info.supports_vmoba
    unknown = model_info("someone/some-model-not-in-the-cache")
    assert unknown.family is None and unknown.supports_vmoba and unknown.show_video_fields


def test_cli_ui_command(monkeypatch, capsys):
    import mixdit.ui.app as ui_app
    import mixdit.ui.cli as ui_cli
    from mixdit.cli import build_parser, main

    calls = {}
    monkeypatch.setattr(ui_app, "launch", lambda app, **kw: calls.update(app=app, **kw))
    parser = build_parser([ui_cli])
    args = parser.parse_args(["ui", "--port", "7861", "--model", "tiny-wan", "--device", "cpu", "--dtype", "fp32"])
    assert args.func(args, [ui_cli]) == 0
    assert isinstance(calls["app"], gr.Blocks) and calls["port"] == 7861 and calls["host"] == "127.0.0.1"
    assert calls["share"] is False
    # bad values: one line, exit code 2, no server started (main's error handling)
    monkeypatch.setattr("mixdit.cli._feature_modules", lambda: [ui_cli])
    calls.clear()
    assert main(["ui", "--port", "0"]) == 2
    assert main(["ui", "--dtype", "int8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("mixdit: error: port = 0") and err[1].startswith("mixdit: error: dtype")
    assert not calls
