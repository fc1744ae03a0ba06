"""Testbed: scene generator, pixel-shuffle codec, word tokenizer, scorer, trainer smoke test, saved
pipelines loading through plain diffusers, the CLI and the quality benchmark (CPU, miniature configs)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from mixdit.pipelines.testbed.codec import PixelShuffleAutoencoder
from mixdit.pipelines.testbed.models import PRESETS, preset, transformer_megabytes
from mixdit.pipelines.testbed.scenes import (BACKGROUNDS, COLORS, SHAPES, parse_caption, render, sample_scene,
                                             sample_scenes, vocabulary)
from mixdit.pipelines.testbed.scorer import detect, psnr, score, ssim
from mixdit.pipelines.testbed.text import UNK_ID, make_word_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # the CPU boxes are shared: two OpenMP threads on two busy cores are much slower than one
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# ----------------------------------------------------------------------------------------------
# scenes
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("video", [False, True])
def test_scenes_are_deterministic_and_captions_match_attributes(video):
    a, b = sample_scenes(7, 50, video), sample_scenes(7, 50, video)
    assert a == b and a != sample_scenes(8, 50, video)
    assert sample_scene(3, video) == sample_scene(3, video)
    frames = 5 if video else 1
    assert torch.equal(render(a[:4], 32, frames), render(b[:4], 32, frames))
    vocab = set(vocabulary())
    for s in a:
        caption = s.caption()
        assert parse_caption(caption) == s.attributes(), caption
        assert set(caption.split()) <= vocab
    # the generator covers every shape, colour and background
    many = sample_scenes(0, 300, video)
    assert {s.shape for s in many} == set(SHAPES)
    assert {s.color for s in many} == set(COLORS)
    assert {s.background for s in many} == set(BACKGROUNDS)


def test_render_shapes_and_motion():
    img = render([sample_scene(0, False)], 64)
    assert img.shape == (1, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    s = sample_scene(1, True)
    vid = render([s], 64, 17)
    assert vid.shape == (1, 3, 17, 64, 64)
    assert torch.equal(vid[:, :, 0], render([s], 64, 1))  # frame 0 = the scene's start
    hard = render([s], 64, 17, antialias=False)
    assert set(hard.unique().tolist()) <= set((torch.tensor(COLORS[s.color] + BACKGROUNDS[s.background]) / 255).tolist())


# ----------------------------------------------------------------------------------------------
# codec
# ----------------------------------------------------------------------------------------------
def test_codec_is_exactly_invertible_image_and_video():
    g = torch.Generator().manual_seed(0)
    image_codec = PixelShuffleAutoencoder(spatial_factor=2)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    z = image_codec.encode(x).latent_dist.sample()
    assert z.shape == (2, 12, 16, 16)
    assert torch.equal(image_codec.decode(z).sample, x)
    assert torch.equal(image_codec.encode(image_codec.decode(z).sample).latent_dist.mode(), z)

    video_codec = PixelShuffleAutoencoder(spatial_factor=1, temporal_factor=4)
    for frames in (1, 5, 17):
        v = torch.rand(2, 3, frames, 16, 16, generator=g) * 2 - 1
        zv = video_codec.encode(v).latent_dist.sample()
        assert zv.shape == (2, 12, (frames - 1) // 4 + 1, 16, 16)  # WanPipeline's latent frame count
        assert torch.equal(video_codec.decode(zv, return_dict=False)[0], v)
    both = PixelShuffleAutoencoder(spatial_factor=2, temporal_factor=2)
    v = torch.rand(1, 3, 9, 8, 8, generator=g)
    assert torch.equal(both.decode(both.encode(v).latent_dist.mode()).sample, v)
    with pytest.raises(ValueError):
        video_codec.encode(torch.rand(1, 3, 6, 16, 16))
    cfg = video_codec.config
    assert (cfg.z_dim, cfg.scale_factor_temporal, cfg.scale_factor_spatial) == (12, 4, 1)
    assert len(image_codec.config.block_out_channels) == 2  # SD3/FLUX read 2 ** (len - 1) = 2


def test_codec_save_load_round_trip(tmp_path):
    codec = PixelShuffleAutoencoder(spatial_factor=2, latents_mean=[0.1] * 12, latents_std=[0.5] * 12,
                                    scaling_factor=2.0, shift_factor=0.1)
    codec.save_pretrained(tmp_path / "vae")
    loaded = PixelShuffleAutoencoder.from_pretrained(tmp_path / "vae")
    def public(c):
        return {k: v for k, v in dict(c).items() if not k.startswith("_")}

    assert public(loaded.config) == public(codec.config)
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(loaded.decode(loaded.encode(x).latent_dist.sample()).sample, x)
    z = torch.randn(1, 12, 8, 8)
    assert torch.allclose(loaded.denormalize(loaded.normalize(z)), z, atol=1e-6)


def test_word_tokenizer(tmp_path):
    tok = make_word_tokenizer(16)
    ids = tok(sample_scene(0, True).caption()).input_ids
    assert UNK_ID not in ids and ids[-1] == tok.eos_token_id
    assert tok("A RED, circle!").input_ids == tok("a red circle").input_ids
    assert UNK_ID in tok("a cat").input_ids
    tok.save_pretrained(tmp_path)
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path)("a red circle").input_ids == tok("a red circle").input_ids


def test_presets_meet_size_and_token_targets():
    video, image = PRESETS["video"], PRESETS["image"]
    assert video.num_visual_tokens >= 4096  # 5 x 32 x 32
    for cfg in (video, image):
        assert transformer_megabytes(cfg) <= 30.0
    assert image.kind == "image" and video.kind == "video"


# ----------------------------------------------------------------------------------------------
# scorer
# ----------------------------------------------------------------------------------------------
def test_scorer_is_right_on_ground_truth_and_wrong_on_noise():
    images = sample_scenes(11, 60, video=False)
    frames = render(images, 64)
    result = score([f for f in frames], [s.caption() for s in images])
    assert result["accuracy"] == {"color": 1.0, "shape": 1.0, "background": 1.0, "position": 1.0}
    videos = sample_scenes(12, 16, video=True)
    clips = render(videos, 64, 17)
    result = score([c for c in clips], [s.caption() for s in videos])
    assert result["accuracy"] == {"color": 1.0, "shape": 1.0, "background": 1.0, "direction": 1.0, "speed": 1.0}
    g = torch.Generator().manual_seed(0)
    noise = [torch.rand(64, 64, 3, generator=g) for _ in range(20)]
    noisy = score(noise, [s.caption() for s in images[:20]])
    assert noisy["overall"] < 0.25
    for key in ("color", "shape", "position"):
        assert noisy["accuracy"][key] <= 0.2
    blank = detect(torch.zeros(64, 64, 3))
    assert "shape" not in blank and blank["background"] == "black"


def test_psnr_ssim():
    a = render(sample_scenes(0, 1, video=True), 32, 5)[0]
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    b = (a + 0.05 * torch.randn(a.shape, generator=g)).clamp(0, 1)
    c = torch.rand(a.shape, generator=g)
    assert psnr(a, b) > psnr(a, c) and 1.0 > ssim(a, b) > ssim(a, c)
    assert ssim(a, b) == pytest.approx(ssim(b, a))
    # uint8 PIL-style input and float input agree
    u8 = (a.permute(1, 2, 3, 0).numpy() * 255).round().astype(np.uint8)
    assert psnr(u8, u8.astype(np.float32) / 255) == float("inf")


# ----------------------------------------------------------------------------------------------
# training (miniature configs), saved pipelines, CLI, benchmark
# ----------------------------------------------------------------------------------------------
def _train_cli(kind: str, out: Path, steps: int) -> dict:
    import mixdit.pipelines.testbed_cli as testbed_cli
    from mixdit import cli

    parser = cli.build_parser([testbed_cli])
    args = parser.parse_args(["train", "testbed", "--model", kind, "--out", str(out), "--steps", str(steps),
                              "--device", "cpu", "--log-every", "5", "--save-every", "0"])
    assert args.func(args, [testbed_cli]) == 0
    return json.loads((out / "testbed_config.json").read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("testbed")
    return {kind: (root / kind, _train_cli(kind, root / kind, steps))
            for kind, steps in (("mini-image", 40), ("mini-video", 30))}


@pytest.mark.parametrize("kind", ["mini-image", "mini-video"])
def test_training_loss_falls(trained, kind):
    _, record = trained[kind]
    losses = record["training"]["losses"]
    assert record["training"]["steps"] == len(losses) == (40 if kind == "mini-image" else 30)
    assert record["config"]["kind"] == PRESETS[kind].kind
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("kind", ["mini-image", "mini-video"])
def test_saved_pipeline_loads_with_plain_diffusers_and_generates(trained, kind):
    from diffusers import DiffusionPipeline

    folder, record = trained[kind]
    from safetensors.torch import load_file

    stored = [t for f in folder.rglob("*.safetensors") for t in load_file(str(f)).values() if t.is_floating_point()]
    assert stored and all(t.dtype == torch.float16 for t in stored)  # shipped at half size
    pipe = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32)
    assert type(pipe).__name__ == ("WanPipeline" if kind == "mini-video" else "StableDiffusion3Pipeline")
    assert isinstance(pipe.vae, PixelShuffleAutoencoder)
    cfg = preset(kind)
    kwargs = dict(num_frames=cfg.num_frames) if cfg.kind == "video" else {}
    out = pipe("a red circle moving left slowly on a black background", height=cfg.height, width=cfg.width,
               num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs)
    result = out.frames if cfg.kind == "video" else out.images
    expected = (1, cfg.num_frames, cfg.height, cfg.width, 3) if cfg.kind == "video" else (1, cfg.height, cfg.width, 3)
    assert result.shape == expected and np.isfinite(result).all()


def test_load_testbed(trained, tmp_path, monkeypatch):
    from mixdit.errors import ModelNotFoundError
    from mixdit.pipelines.testbed import load as load_mod

    monkeypatch.setattr(load_mod, "candidate_paths", lambda name: [tmp_path / name])
    with pytest.raises(ModelNotFoundError, match="mixdit train testbed --model video"):
        load_mod.load_testbed("mixdit-shapes-video")
    (tmp_path / "mixdit-shapes-image").symlink_to(trained["mini-image"][0], target_is_directory=True)
    pipe = load_mod.load_testbed("mixdit-shapes-image", device="cpu", dtype="float32")
    assert pipe._mixdit_defaults["height"] == 32 and pipe._mixdit_defaults["steps"] == 4


def test_cli_shares_the_train_command():
    import argparse

    import mixdit.pipelines.testbed_cli as testbed_cli

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command")
    other = sub.add_parser("train").add_subparsers(dest="train_command")
    other.add_parser("vmoba")
    testbed_cli.register_commands(sub)  # joins the existing `train`
    assert parser.parse_args(["train", "testbed", "--out", "x"]).model == "video"
    assert parser.parse_args(["train", "vmoba"]).train_command == "vmoba"


def test_quality_benchmark_smoke(trained, tmp_path):
    spec = importlib.util.spec_from_file_location("quality_bench", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    assert len(quality.prompt_set(True)) >= 50 and len(quality.prompt_set(False)) >= 50
    folder = trained["mini-video"][0]
    import mixdit.api

    pipe = quality.load_model(str(folder), "cpu", None)
    names = [n for n, _ in quality.feature_configurations(pipe)]
    assert names[0] == "dense" and ("vmoba" in names) == ("vmoba" in mixdit.api.FEATURES)
    assert pipe._mixdit_defaults["frames"] == 5  # the folder's own size, not WanPipeline's 81 x 480 x 832
    assert quality.main(["--model", str(folder), "--limit", "2", "--device", "cpu", "--out-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / f"quality-{folder.name}.json").read_text())
    assert "dense" in data["configs"] and data["num_prompts"] == 2
    assert set(data["configs"]["dense"]["accuracy"]) == {"color", "shape", "background", "direction", "speed"}
    for name, entry in data["configs"].items():
        if name != "dense" and "error" not in entry:
            assert 0.0 <= entry["ssim_vs_dense"] <= 1.0 + 1e-9
    assert (tmp_path / f"quality-{folder.name}.md").read_text().startswith("# Quality")


def test_resume_continues_from_saved_weights(trained, tmp_path):
    import shutil

    folder = tmp_path / "resumed"
    shutil.copytree(trained["mini-image"][0], folder)
    import mixdit.pipelines.testbed_cli as testbed_cli
    from mixdit import cli

    args = cli.build_parser([testbed_cli]).parse_args(
        ["train", "testbed", "--model", "mini-image", "--out", str(folder), "--steps", "3", "--device", "cpu",
         "--resume", "--save-every", "0", "--high-noise-fraction", "0.5", "--sample-flow-shift", "7"])
    assert args.func(args, [testbed_cli]) == 0
    saved = json.loads((folder / "testbed_config.json").read_text())
    record = saved["training"]
    assert record["steps"] == 3 and record["total_steps"] == 43 and record["runs"][0]["steps"] == 40
    # the recipe follows the command line / preset, and the saved scheduler samples with the new shift
    assert saved["config"]["high_noise_fraction"] == 0.5 and saved["config"]["sample_flow_shift"] == 7.0
    assert json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["shift"] == 7.0
    # a fresh start would have loss ~2 (random weights); resuming starts near where training ended
    assert np.mean(record["losses"]) < np.mean(trained["mini-image"][1]["training"]["losses"][:5])


def test_pack_unpack_round_trip(trained, tmp_path):
    from mixdit.pipelines.testbed.ship import pack, unpack

    folder = trained["mini-video"][0]
    parts = pack(folder, tmp_path / "out", name="mixdit-shapes-video", part_mib=0.05)
    assert len(parts) > 1 and all(p.stat().st_size <= 0.05 * 1024 * 1024 for p in parts)
    root = unpack(tmp_path / "out", "mixdit-shapes-video", tmp_path / "weights")
    for f in folder.rglob("*"):
        if f.is_file():
            assert (root / f.relative_to(folder)).read_bytes() == f.read_bytes()
    from diffusers import DiffusionPipeline

    assert type(DiffusionPipeline.from_pretrained(root)).__name__ == "WanPipeline"


# ----------------------------------------------------------------------------------------------
# the shipped, trained models
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["mixdit-shapes-video", "mixdit-shapes-image"])
def test_shipped_weights_are_small_and_registered(name):
    from mixdit.pipelines.testbed.load import SHIPPED_WEIGHTS, testbed_path
    from mixdit.pipelines.zoo import generation_defaults

    folder = SHIPPED_WEIGHTS / name
    assert (folder / "model_index.json").is_file()
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 30e6, size
    if not os.environ.get("MIXDIT_TESTBED_DIR"):
        assert testbed_path(name) == folder
    from mixdit.pipelines.testbed.load import folder_defaults

    # the zoo's defaults (from the preset) are the shipped folder's (what the model was tuned for)
    assert generation_defaults(name) == folder_defaults(folder)


def test_shipped_image_model_draws_the_asked_colour_and_place():
    import mixdit
    from mixdit.pipelines.testbed.scorer import detect

    pipe = mixdit.load_pipeline("mixdit-shapes-image", device="cpu")
    prompts = ["a red circle in the top left on a white background",
               "a blue square in the bottom right on a black background",
               "a yellow triangle in the center on a gray background"]
    out = pipe(prompts, height=64, width=64, num_inference_steps=20, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(int(np.random.default_rng().integers(1000))),
               output_type="np").images
    found = [detect(image) for image in out]
    assert [f["color"] for f in found] == ["red", "blue", "yellow"], found
    assert [f["background"] for f in found] == ["white", "black", "gray"], found
    assert [f["position"] for f in found] == ["top left", "bottom right", "middle center"], found


def test_scorer_shape_survives_stray_pixels():
    """Generated frames have specks and streaks beside the object (the trained models draw them): a
    stretched bounding box made squares read as circles. The fit must see through both."""
    from mixdit.pipelines.testbed.scenes import Scene

    rng = np.random.default_rng()
    for shape in ("square", "circle", "triangle"):
        scene = Scene(shape=shape, color="red", background="white", x=float(rng.uniform(0.35, 0.65)),
                      y=float(rng.uniform(0.35, 0.65)), half_extent=float(rng.uniform(0.115, 0.135)))
        frame = render([scene], 64)[0].permute(1, 2, 0).clone()  # [H, W, 3]
        top = int((scene.y + scene.half_extent) * 64)
        left = int((scene.x - scene.half_extent) * 64)
        frame[top + 1, left:left + 6] = torch.tensor([0.86, 0.12, 0.12])  # a streak touching the bottom edge
        frame[3:5, 3:5] = torch.tensor([0.86, 0.12, 0.12])  # a speck far away
        frame[60, 50:58] = torch.tensor([0.86, 0.12, 0.12])  # a streak far away
        found = detect(frame)
        assert found["shape"] == shape, (shape, found)


def test_high_noise_share_of_training_sigmas():
    from mixdit.pipelines.testbed.train import sample_sigmas

    seed = int(np.random.default_rng().integers(1 << 30))
    base = sample_sigmas(40000, 3.0, torch.Generator().manual_seed(seed), "cpu")
    assert float((base > 0.99).float().mean()) < 0.002  # why the option exists: shift 3 almost never goes there
    mixed = sample_sigmas(40000, 3.0, torch.Generator().manual_seed(seed), "cpu", high_noise_fraction=0.25,
                          high_noise_min=0.96)
    expected = 0.25 + 0.75 * float((base >= 0.96).float().mean())
    assert abs(float((mixed >= 0.96).float().mean()) - expected) < 0.015
    band = mixed[mixed >= 0.96]
    assert float(band.max()) < 1.0 and abs(float((band > 0.98).float().mean()) - 0.5) < 0.05  # uniform in the band


def test_with_sampling_shift_sets_the_scheduler_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    from mixdit.pipelines.flow_matching import with_sampling_shift

    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    assert with_sampling_shift(wan, 3.0) is wan
    moved = with_sampling_shift(wan, 8.0)
    assert moved.config.flow_shift == 8.0 and wan.config.flow_shift == 3.0
    moved.set_timesteps(24)
    wan.set_timesteps(24)
    assert float(moved.sigmas[1]) > float(wan.sigmas[1])  # a larger shift spends more steps at high noise
    sd3 = FlowMatchEulerDiscreteScheduler(shift=2.0)
    assert with_sampling_shift(sd3, 5.0).config.shift == 5.0
    with pytest.raises(ValueError, match="no static shift"):
        with_sampling_shift(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 3.0)
