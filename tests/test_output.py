"""Saving results: PNG with A1111 ``parameters`` + JSON metadata, MP4/GIF/WebP with sidecars."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from mixdit.errors import ConfigError
from mixdit.pipelines.output import (
    a1111_parameters, parse_a1111_parameters, read_metadata, save_result, sidecar,
)

META = dict(prompt="a cat, on a mat", negative_prompt="blurry", steps=20,
            scheduler="FlowMatchEulerDiscreteScheduler", guidance_scale=7.0, seed=1, width=64, height=64,
            model="tiny-sd3", vmoba={"threshold": 0.25}, shift=3.0)


def _frames(n=9, h=64, w=64, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _mp4_frame_count(path):
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path))
    meta = next(gen)
    count = sum(1 for _ in gen)
    return count, meta


def test_a1111_parameters_text():
    assert a1111_parameters(META) == (
        "a cat, on a mat\n"
        "Negative prompt: blurry\n"
        "Steps: 20, Sampler: FlowMatchEulerDiscreteScheduler, CFG scale: 7, Seed: 1, Size: 64x64, "
        'Model: tiny-sd3, Vmoba: "{\\"threshold\\":0.25}", Shift: 3'
    )
    # no negative prompt line when there is none; unknown keys appended in order
    text = a1111_parameters(dict(prompt="p", steps=2, guidance_scale=4.5, vmoba_mode="query_head"))
    assert text == "p\nSteps: 2, CFG scale: 4.5, Vmoba mode: query_head"


def test_parse_a1111_parameters_round_trip():
    back = parse_a1111_parameters(a1111_parameters(META))
    for key in ("prompt", "negative_prompt", "steps", "scheduler", "seed", "width", "height", "model", "vmoba"):
        assert back[key] == META[key], key
    assert back["guidance_scale"] == 7


def test_png_metadata_round_trip(tmp_path):
    image = np.random.default_rng(0).random((64, 48, 3)).astype(np.float32)
    paths = save_result(image, tmp_path / "out.png", META)
    assert paths == [tmp_path / "out.png"]
    assert read_metadata(paths[0]) == json.loads(json.dumps(META))
    with Image.open(paths[0]) as im:
        assert im.size == (48, 64)
        assert im.text["parameters"] == a1111_parameters(META)
        assert np.array_equal(np.asarray(im), np.round(image * 255).astype(np.uint8))


def test_png_batch_names_and_inputs(tmp_path):
    pil = [Image.new("RGB", (32, 32), c) for c in ("red", "green", "blue")]
    paths = save_result(pil, tmp_path / "batch.png", META)
    assert [p.name for p in paths] == ["batch.png", "batch-1.png", "batch-2.png"]
    md = read_metadata(paths[2])
    assert md["batch_index"] == 2 and md["batch_size"] == 3 and md["prompt"] == META["prompt"]
    # a channels-first torch tensor in [0, 1]
    paths = save_result(torch.rand(2, 3, 16, 24), tmp_path / "t.png", {})
    assert len(paths) == 2 and Image.open(paths[1]).size == (24, 16)


@pytest.mark.parametrize("ext", ["mp4", "gif", "webp"])
def test_video_writes_frames_and_metadata(tmp_path, ext):
    video = _frames()
    paths = save_result(video, tmp_path / f"clip.{ext}", META, fps=8)
    assert paths == [tmp_path / f"clip.{ext}"]
    assert sidecar(paths[0]).is_file()
    md = read_metadata(paths[0])
    assert md["fps"] == 8 and md["num_frames"] == 9 and md["prompt"] == META["prompt"]
    if ext == "mp4":
        count, meta = _mp4_frame_count(paths[0])
        assert count == 9 and tuple(meta["size"]) == (64, 64) and meta["fps"] == 8
        os.remove(sidecar(paths[0]))  # the JSON is also in the container's comment
        assert read_metadata(paths[0]) == md
    else:
        with Image.open(paths[0]) as im:
            assert im.n_frames == 9 and im.size == (64, 64)


def test_video_batch_and_frame_lists(tmp_path):
    batch = np.stack([_frames(5, 32, 32, 0), _frames(5, 32, 32, 1)]).astype(np.float32) / 255  # [B,F,H,W,C]
    paths = save_result(batch, tmp_path / "v.mp4", META)
    assert [p.name for p in paths] == ["v.mp4", "v-1.mp4"]
    assert all(_mp4_frame_count(p)[0] == 5 for p in paths)
    assert read_metadata(paths[1])["batch_index"] == 1 and read_metadata(paths[1])["fps"] == 16
    frames = [Image.fromarray(f) for f in _frames(4, 32, 32)]  # a list of PIL frames is one video
    assert len(save_result(frames, tmp_path / "pil.gif", {})) == 1
    with Image.open(tmp_path / "pil.gif") as im:
        assert im.n_frames == 4


def test_odd_size_mp4_is_padded(tmp_path):
    paths = save_result(_frames(3, 33, 35), tmp_path / "odd.mp4", {})
    count, meta = _mp4_frame_count(paths[0])
    assert count == 3 and tuple(meta["size"]) == (36, 34)


def test_unknown_extension(tmp_path):
    with pytest.raises(ConfigError) as info:
        save_result(_frames(2), tmp_path / "x.avi", META)
    assert info.value.field == "out"
    for ext in (".png", ".mp4", ".gif", ".webp"):
        assert ext in str(info.value)


def test_ffmpeg_is_bundled():
    import imageio_ffmpeg

    assert os.path.isfile(imageio_ffmpeg.get_ffmpeg_exe())


def test_tiny_pipeline_output_saves(tmp_path, monkeypatch):
    """End to end: a tiny pipeline's output object is saved with its run's metadata."""
    from mixdit.pipelines.zoo import load_pipeline

    monkeypatch.setenv("MIXDIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = load_pipeline("tiny-wan")
        out = pipe("a red ball", height=64, width=64, num_frames=5, num_inference_steps=2,
                   generator=torch.Generator().manual_seed(3))
    finally:
        torch.set_num_threads(threads)
    md = dict(prompt="a red ball", steps=2, seed=3, width=64, height=64, num_frames=5, model="tiny-wan",
              scheduler=type(pipe.scheduler).__name__)
    paths = save_result(out, tmp_path / "wan.mp4", md)
    assert _mp4_frame_count(paths[0])[0] == 5
    assert read_metadata(paths[0])["scheduler"] == "UniPCMultistepScheduler"
