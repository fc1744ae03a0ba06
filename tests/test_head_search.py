"""HeadHunter search, objectives, presets and the CLI on tiny pipelines (CPU)."""

import json

import numpy as np
import pytest
import torch

import mixdit
from mixdit.errors import ConfigError
from mixdit.guidance.perturbation import GuidanceConfig, guidance_feature
from mixdit.guidance.search import SearchConfig, head_hunter

PLANTED = "L0H2"


@pytest.fixture(scope="module")
def pipe():
    p = mixdit.load_pipeline("tiny-sd3")
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def target(pipe):
    mixdit.apply(pipe, guidance=GuidanceConfig(heads=PLANTED, scale=3.0))
    img = pipe("a cat", num_inference_steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images[0]
    mixdit.remove(pipe)
    return np.asarray(img, dtype=np.float32)


class Toy:
    """Objective with a planted best head: closeness to the image generated with PLANTED perturbed."""

    def __init__(self, target, fail_after=None):
        self.target, self.calls, self.images, self.fail_after = target, 0, 0, fail_after

    def __call__(self, images, prompts):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls += 1
        self.images += len(images)
        return [-float(np.abs(np.asarray(im, dtype=np.float32) - self.target).mean()) for im in images]


def test_search_finds_planted_head_batched_and_single(pipe, target):
    for batch in (8, 1):
        toy = Toy(target)
        preset = head_hunter(pipe, SearchConfig(prompts=["a cat"], objective=toy, top_k=1, samples=1, steps=3,
                                                batch_size=batch, candidates=None if batch > 1 else "L0H1,L0H2,L0H3,L1H0"),
                             progress=False)
        assert preset["heads"] == PLANTED
        n = 8 if batch > 1 else 4  # every candidate scored exactly once (2 layers x 4 heads, or the 4 given)
        assert toy.images == n
        assert toy.calls == (1 if batch > 1 else n)
        assert preset["rounds"][0]["selected"] == PLANTED
    assert mixdit.summary(pipe) == {"features": {}}


@pytest.mark.parametrize("name", ["tiny-wan", "tiny-hunyuan-video", "tiny-cogvideox"])
def test_search_finds_planted_head_in_a_video_model(name):
    """The search on video pipelines (Wan, HunyuanVideo, CogVideoX): every candidate head scored once on its
    video's middle frame, in one batched call, and the planted head found."""
    from mixdit.guidance.heads import head_counts

    video = mixdit.load_pipeline(name)
    video.set_progress_bar_config(disable=True)
    size = dict(height=64, width=64, num_frames=9, guidance_scale=1.0)  # HunyuanVideo: embedded guidance 1
    planted = "L1H0"
    mixdit.apply(video, guidance=GuidanceConfig(heads=planted, scale=3.0))
    frames = video("a cat", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
                   **size).frames[0]
    mixdit.remove(video)
    toy = Toy(np.asarray(frames[len(frames) // 2], dtype=np.float32))
    adapter = mixdit.api.adapter_for(video)
    candidates = sum(head_counts(adapter, video.transformer))
    preset = head_hunter(video, SearchConfig(prompts=["a cat"], objective=toy, top_k=1, samples=1, steps=3,
                                             batch_size=candidates, pipeline_kwargs=dict(size, output_type="np")),
                         progress=False)
    assert preset["heads"] == planted and preset["family"] == adapter.family
    assert toy.images == candidates and toy.calls == 1


def test_two_rounds_and_preset_roundtrip(pipe, target, tmp_path):
    preset = head_hunter(pipe, SearchConfig(prompts=["a cat"], objective=Toy(target), rounds=2, top_k=1, samples=1,
                                            steps=3, candidates="L0"), progress=False)
    assert preset["rounds"][0]["selected"] == PLANTED and len(preset["rounds"]) == 2
    assert len(preset["rounds"][1]["scores"]) == 3  # the selected head is not scored again
    path = tmp_path / "preset.json"
    path.write_text(json.dumps(preset))
    from mixdit.guidance.cli import features_from_args
    from types import SimpleNamespace

    f = features_from_args(SimpleNamespace(heads=str(path), perturb_scale=2.0, softpag=0.4, perturb_mode=None,
                                           perturb_window=None))
    cfg = f["guidance"]
    assert cfg.heads == preset["heads"] and cfg.scale == 2.0 and cfg.softpag == 0.4


def test_resume_skips_done_work(pipe, target, tmp_path):
    cfg = SearchConfig(prompts=["a cat", "a dog"], objective=None, top_k=1, samples=2, steps=2, batch_size=4,
                       cache_dir=str(tmp_path / "cache"))
    killed = Toy(target, fail_after=2)  # dies after 2 batched calls (8 of 16 images)
    with pytest.raises(KeyboardInterrupt):
        head_hunter(pipe, cfg, killed, progress=False)
    assert mixdit.summary(pipe) == {"features": {}}
    lines = (tmp_path / "cache" / "scores.rank0.jsonl").read_text().splitlines()
    assert len(lines) == 8
    resumed = Toy(target)
    preset = head_hunter(pipe, cfg, resumed, progress=False)
    assert resumed.images == 8  # only the missing half
    assert preset["run"]["generations"] == 8
    again = Toy(target)
    repeat = head_hunter(pipe, cfg, again, progress=False)
    assert repeat["run"]["generations"] == 0
    assert {k: v for k, v in repeat.items() if k != "run"} == {k: v for k, v in preset.items() if k != "run"}
    assert again.images == 0


def test_clip_objective_from_local_folder(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor
    from PIL import Image

    from mixdit.guidance.objectives import get_objective
    from mixdit.pipelines.tiny import make_clip_tokenizer

    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=16)
    CLIPModel(config).save_pretrained(tmp_path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32),
                  tokenizer=make_clip_tokenizer()).save_pretrained(tmp_path)
    images = [Image.fromarray(np.full((40, 40, 3), c, dtype=np.uint8)) for c in (0, 128, 255)]
    for name in ("clip", "pickscore"):
        kw = {"processor": str(tmp_path)} if name == "pickscore" else {}
        scores = get_objective(name, model=str(tmp_path), device="cpu", **kw)(images, ["a cat"] * 3)
        assert len(scores) == 3 and all(isinstance(s, float) for s in scores)
    with pytest.raises(ConfigError, match="objective"):
        get_objective("nope")


def test_cli_flags_and_errors(tmp_path):
    from mixdit.cli import build_parser
    from mixdit.guidance.cli import features_from_args

    parser = build_parser()
    args = parser.parse_args(["generate", "x", "--heads", "L1H0,L0", "--perturb-scale", "2", "--softpag", "0.5",
                              "--perturb-window", "0", "0.5"])
    cfg = features_from_args(args)["guidance"]
    assert (cfg.heads, cfg.scale, cfg.softpag, tuple(cfg.window)) == ("L1H0,L0", 2.0, 0.5, (0.0, 0.5))
    assert features_from_args(parser.parse_args(["generate", "x"])) == {}
    with pytest.raises(ConfigError, match="--heads"):
        features_from_args(parser.parse_args(["generate", "x", "--softpag", "0.5"]))
    with pytest.raises(ConfigError, match="softpag"):
        features_from_args(parser.parse_args(["generate", "x", "--heads", "L1", "--softpag", "2"]))
    with pytest.raises(ConfigError, match="preset"):
        features_from_args(parser.parse_args(["generate", "x", "--heads", str(tmp_path / "missing.json")]))
    a = parser.parse_args(["heads", "search", "--model", "tiny-sd3", "--prompts", "p.txt", "--objective", "clip",
                           "--rounds", "2", "--top-k", "3", "--samples", "4", "--out", "o.json", "--steps", "5",
                           "--seed", "1", "--resume", "--cache-dir", "c"])
    assert (a.rounds, a.top_k, a.samples, a.steps, a.seed, a.resume, a.cache_dir) == (2, 3, 4, 5, 1, True, "c")


def test_cli_search_end_to_end(tmp_path, monkeypatch, target):
    from mixdit.cli import main

    (tmp_path / "prompts.txt").write_text("# prompts of the search\n\na cat\n")  # comments and blanks skipped
    import sys
    import types

    mod = types.ModuleType("toy_objective_mod")
    mod.score = Toy(target)
    monkeypatch.setitem(sys.modules, "toy_objective_mod", mod)
    out = tmp_path / "preset.json"
    rc = main(["heads", "search", "--model", "tiny-sd3", "--prompts", str(tmp_path / "prompts.txt"), "--objective",
               "toy_objective_mod:score", "--top-k", "1", "--samples", "1", "--steps", "3", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    preset = json.loads(out.read_text())
    assert preset["heads"] == PLANTED and preset["model"] == "tiny-sd3" and preset["objective"] == "toy_objective_mod:score"
    assert preset["search"]["prompts"] == ["a cat"]
    assert main(["heads", "search", "--model", "tiny-sd3", "--prompts", str(tmp_path / "none.txt"), "--out",
                 str(out)]) == 2


def test_row_head_sets_per_row(pipe):
    """Each perturbed row perturbs its own set: a batch of 2 candidates == the 2 single runs."""
    kw = dict(num_inference_steps=2, guidance_scale=1.0, output_type="latent")
    mixdit.apply(pipe, guidance=GuidanceConfig(heads="L0,L1", scale=3.0))
    feature = guidance_feature(pipe)
    feature.row_head_sets = [{(1, 0)}, {(0, 3), (1, 2)}]
    both = pipe(["a cat"] * 2, generator=[torch.Generator().manual_seed(0) for _ in range(2)], **kw).images
    singles = []
    for hs in feature.row_head_sets:
        feature.row_head_sets = [hs]
        singles.append(pipe("a cat", generator=torch.Generator().manual_seed(0), **kw).images)
    mixdit.remove(pipe)
    torch.testing.assert_close(both, torch.cat(singles), atol=1e-5, rtol=1e-5)
