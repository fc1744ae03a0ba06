"""``mixdit train vmoba``: loss falls, saved weights load with plain diffusers, data sources, bad
arguments, gradient checkpointing keeps VMoBA, and a 2-process CPU run shards data and ends with
identical weights on both ranks."""

import json
from pathlib import Path

import pytest
import torch

from mixdit.attention.vmoba_train import (
    TrainConfig, checkpoint_keeping_context, read_video, shard_indices, train_vmoba, weights_checksum)
from mixdit.errors import ConfigError

TINY = dict(height=64, width=64, frames=9)  # tiny-wan: latent 16 x 3 x 8 x 8 -> 48 tokens
# VMoBA on for every layer of the tiny grid (defaults keep layer 0 and grids < 4096 tokens dense);
# 1-frame chunks, 2x2 tubes and 2x2x2 cubes so the 3 x 4 x 4 token grid has >= 3 blocks per layer
TINY_VMOBA = dict(min_tokens=0, dense_layers=(), temporal_block=1, spatial_block=(2, 2), spatiotemporal_block=(2, 2, 2),
                  max_tile_density=1.0)  # tiny grids visit most tiles: keep the dense-fallback rule off


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: intra-op threads only add contention (50x slower on a loaded 2-core box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny_wan():
    from mixdit.pipelines.zoo import load_pipeline

    return load_pipeline("tiny-wan", device="cpu", dtype=torch.float32)


def _cfg(tmp_path, **kw):
    base = dict(model="tiny-wan", data="synthetic:8", out=str(tmp_path / "out"), steps=4, learning_rate=1e-3,
                vmoba=None, progress=False, seed=0, **TINY)
    base.update(kw)
    return TrainConfig(**base)


def test_shards_are_disjoint_and_cover_every_sample():
    for count, world in ((8, 2), (12, 3), (5, 1)):
        for epoch in range(2):
            parts = [shard_indices(count, r, world, seed=3, epoch=epoch) for r in range(world)]
            flat = [i for p in parts for i in p]
            assert sorted(flat) == list(range(count)), (count, world, parts)
    # not divisible: padded so every rank takes the same number of steps, still covering all
    parts = [shard_indices(5, r, 2, seed=0, epoch=0) for r in range(2)]
    assert len(parts[0]) == len(parts[1]) == 3 and set(parts[0]) | set(parts[1]) == set(range(5))


def test_loss_falls_and_saved_folder_loads_with_plain_diffusers(tmp_path):
    from diffusers import DiffusionPipeline, WanTransformer3DModel

    pipe = _tiny_wan()
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    metrics = train_vmoba(_cfg(tmp_path, model=pipe, steps=30, save_every=15))
    losses = metrics["losses"]
    assert len(losses) == 30 and all(torch.isfinite(torch.tensor(losses)))
    head, tail = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert tail < 0.9 * head, f"loss did not fall: first 5 {head:.4f}, last 5 {tail:.4f}"
    assert metrics["samples_per_second"] > 0

    out = Path(metrics["out"])
    trained = pipe.transformer.state_dict()
    assert any(not torch.equal(before[k], trained[k]) for k in trained)
    loaded = WanTransformer3DModel.from_pretrained(out / "transformer")
    assert loaded.state_dict().keys() == trained.keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, trained[k]), k
    assert weights_checksum(loaded) == metrics["weights_sha256"]
    full = DiffusionPipeline.from_pretrained(out)  # OUT is the whole pipeline folder
    assert type(full).__name__ == "WanPipeline"
    assert weights_checksum(full.transformer) == metrics["weights_sha256"]
    assert (out / "checkpoint-15" / "transformer" / "config.json").is_file()
    assert json.loads((out / "train_metrics.json").read_text())["steps"] == 30


def test_bad_arguments_raise_one_clear_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        train_vmoba(_cfg(tmp_path, data=str(tmp_path / "no-such-folder")))
    assert e.value.field == "data" and "folder not found" in str(e.value)
    with pytest.raises(ConfigError) as e:
        train_vmoba(_cfg(tmp_path, vmoba={"threshold": 1.5}))
    assert e.value.field == "vmoba.threshold"
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, frames=8).validate()
    assert e.value.field == "frames"
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, data="synthetic:0").validate()
    assert e.value.field == "data"
    with pytest.raises(ConfigError) as e:
        _cfg(tmp_path, recompute_attention=True).validate()
    assert e.value.field == "recompute_attention" and "gradient_checkpointing" in str(e.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="none found"):
        train_vmoba(_cfg(tmp_path, data=str(empty)))

    from mixdit.cli import main

    capsys.readouterr()
    rc = main(["train", "vmoba", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and err.startswith("mixdit: error: data = ")
    rc = main(["train", "vmoba", "--data", "synthetic:4", "--out", str(tmp_path / "o"), "--vmoba-threshold", "2"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "vmoba.threshold = 2" in err


def test_latent_files_with_prompt_strings_and_embeddings(tmp_path):
    from safetensors.torch import save_file

    data = tmp_path / "latents"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    torch.save({"latents": torch.randn(16, 3, 8, 8, generator=g), "prompt": "a red square"}, data / "a.pt")
    torch.save({"latents": torch.randn(16, 3, 8, 8, generator=g), "prompt": "a blue circle"}, data / "b.pt")
    save_file({"latents": torch.randn(16, 3, 8, 8, generator=g), "prompt_embeds": torch.randn(5, 32, generator=g)},
              str(data / "c.safetensors"))
    metrics = train_vmoba(_cfg(tmp_path, data=str(data), steps=3, batch_size=2, save=False))
    assert metrics["dataset_size"] == 3 and len(metrics["losses"]) == 3
    assert list((tmp_path / "out" / "cache").glob("prompts-*.pt"))  # prompts encoded once, cached


def test_video_folder_is_encoded_once_and_cached(tmp_path):
    import imageio.v3 as iio
    import numpy as np

    data = tmp_path / "videos"
    data.mkdir()
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, size=(7, 40, 56, 3), dtype=np.uint8)  # shorter and smaller than asked
    iio.imwrite(data / "one.gif", frames, duration=60, loop=0)
    iio.imwrite(data / "two.mp4", rng.integers(0, 255, size=(12, 48, 96, 3), dtype=np.uint8), fps=8)
    (data / "one.txt").write_text("clip one")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "two.mp4", "text": "clip two"}) + "\n")
    pixels = read_video(data / "one.gif", 64, 64, 9)
    assert pixels.shape == (3, 9, 64, 64) and -1 <= pixels.min() and pixels.max() <= 1

    cfg = _cfg(tmp_path, data=str(data), steps=2, save=False)
    metrics = train_vmoba(cfg)
    assert metrics["dataset_size"] == 2
    cached = sorted((tmp_path / "out" / "cache").glob("*.pt"))
    latents = [c for c in cached if not c.name.startswith("prompts-")]
    assert len(latents) == 2
    rec = torch.load(latents[0], weights_only=True)
    assert rec["latents"].shape == (16, 3, 8, 8) and rec["prompt_embeds"].shape[-1] == 32
    stamps = {p: p.stat().st_mtime_ns for p in latents}
    train_vmoba(cfg)  # second run: read from the cache, nothing re-encoded
    assert {p: p.stat().st_mtime_ns for p in latents} == stamps


def test_wan22_expert_via_cli_bf16_checkpointing(tmp_path, capsys):
    """``--expert transformer_2`` trains only the low-noise expert on t < boundary; the other stays."""
    from diffusers import WanTransformer3DModel

    from mixdit.attention.vmoba_train import FlowMatchingObjective, load_model
    from mixdit.cli import main
    from mixdit.pipelines.zoo import load_pipeline

    pipe = load_pipeline("tiny-wan22", device="cpu", dtype=torch.float32)
    boundary = pipe.config.boundary_ratio * 1000
    for expert, high in (("transformer", True), ("transformer_2", False)):
        objective = FlowMatchingObjective(TrainConfig(expert=expert), load_model(pipe, expert))
        t, sigma = objective.sample(512, torch.Generator().manual_seed(0))
        assert bool((t >= boundary).all()) is high and bool((t < boundary).all()) is not high
        torch.testing.assert_close(sigma * 1000, t)
    high_noise = weights_checksum(pipe.transformer)

    out = tmp_path / "out22"
    rc = main(["train", "vmoba", "--model", "tiny-wan22", "--expert", "transformer_2", "--data", "synthetic:4",
               "--out", str(out), "--steps", "3", "--height", "64", "--width", "64", "--frames", "9", "--no-vmoba",
               "--mixed-precision", "bf16", "--gradient-checkpointing", "--no-progress"])
    printed = capsys.readouterr().out
    assert rc == 0 and "trained 3 steps on 1 process(es)" in printed and str(out) in printed
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 3
    assert weights_checksum(WanTransformer3DModel.from_pretrained(out / "transformer")) == high_noise
    trained = json.loads((out / "train_metrics.json").read_text())["weights_sha256"]
    assert weights_checksum(WanTransformer3DModel.from_pretrained(out / "transformer_2")) == trained


def test_training_with_vmoba_runs_sparse_and_learns(tmp_path):
    pipe = _tiny_wan()
    before = weights_checksum(pipe.transformer)
    metrics = train_vmoba(_cfg(tmp_path, model=pipe, steps=1, vmoba=TINY_VMOBA, save=False))
    assert len(metrics["losses"]) == 1 and all(torch.isfinite(torch.tensor(metrics["losses"])))
    assert metrics["weights_sha256"] != before
    density = metrics["vmoba"]["features"]["vmoba"]["density"]
    sparse = {k: v for k, v in density.items() if k != "dense"}
    assert sparse and all(0 < row["density"] < 1 for row in sparse.values()), density
    import mixdit

    assert mixdit.summary(pipe.transformer) == {"features": {}}  # removed after training


def test_gradient_checkpointing_recomputes_with_vmoba(tmp_path):
    """Same gradients with and without checkpointing: the recomputation must run VMoBA too."""
    import mixdit
    from mixdit.attention.vmoba import VMoBAConfig

    transformer = _tiny_wan().transformer.train()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 3, 8, 8, generator=g), timestep=torch.tensor([700.0]),
                  encoder_hidden_states=torch.randn(1, 6, 32, generator=g), return_dict=False)

    def grads():
        transformer.zero_grad(set_to_none=True)
        transformer(**inputs)[0].square().mean().backward()
        return {n: p.grad.clone() for n, p in transformer.named_parameters() if p.grad is not None}

    dense = grads()
    mixdit.apply(transformer, vmoba=VMoBAConfig(**TINY_VMOBA))
    plain = grads()
    transformer.enable_gradient_checkpointing(checkpoint_keeping_context)
    checkpointed = grads()
    transformer.disable_gradient_checkpointing()
    mixdit.remove(transformer)
    assert plain.keys() == checkpointed.keys()
    for n in plain:
        torch.testing.assert_close(checkpointed[n], plain[n], rtol=1e-5, atol=1e-6, msg=n)
    assert any(not torch.allclose(plain[n], dense[n], rtol=1e-4, atol=1e-6) for n in plain)  # VMoBA did change them


# ~40 s on the 2-core box (4 Python start-ups: launcher, CLI, 2 ranks); not `slow` (< 60 s), 80 s when heavily loaded
def test_accelerate_launch_two_cpu_processes_shard_data_and_agree(run_two_cpu_ranks, tmp_path):
    _tiny_wan()  # build the cached tiny model once, before two ranks race to it
    record = tmp_path / "rec" / "samples.json"
    proc = run_two_cpu_ranks(["train", "vmoba", "--model", "tiny-wan", "--data", "synthetic:8", "--out",
                              str(tmp_path / "out"), "--steps", "4", "--lr", "1e-3", "--height", "64", "--width", "64",
                              "--frames", "9", "--vmoba-min-tokens", "0", "--vmoba-dense-layers",
                              "--vmoba-temporal-block", "1", "--vmoba-spatial-block", "2", "2",
                              "--gradient-checkpointing", "--no-progress", "--record-samples", str(record)],
                             timeout=240)
    assert proc.returncode == 0, proc.failure
    ranks = [json.loads((record.parent / f"samples.rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    seen0, seen1 = ranks[0]["samples"], ranks[1]["samples"]
    assert len(seen0) == len(seen1) == 4
    assert not set(seen0) & set(seen1) and sorted(seen0 + seen1) == list(range(8))
    assert ranks[0]["weights_sha256"] == ranks[1]["weights_sha256"]
    assert ranks[0]["losses"] == ranks[1]["losses"]  # the logged loss is the all-reduced mean
    from diffusers import WanTransformer3DModel

    saved = WanTransformer3DModel.from_pretrained(tmp_path / "out" / "transformer")
    assert weights_checksum(saved) == ranks[0]["weights_sha256"]
    density = json.loads((tmp_path / "out" / "train_metrics.json").read_text())["vmoba"]["features"]["vmoba"]["density"]
    assert density["spatial"]["density"] < 1  # VMoBA really ran (DDP + gradient checkpointing)


def test_gradient_accumulation_consumes_micro_batches(tmp_path):
    record = tmp_path / "rec.json"
    metrics = train_vmoba(_cfg(tmp_path, steps=2, batch_size=2, gradient_accumulation_steps=2, save=False,
                               record_samples=str(record)))
    assert len(metrics["losses"]) == 2
    seen = json.loads((tmp_path / "rec.rank0.json").read_text())["samples"]
    assert sorted(seen) == list(range(8))  # 2 steps x 2 micro-batches x 2 samples = one epoch


def test_cli_vmoba_flags_follow_the_config_fields():
    from mixdit.attention.vmoba_train_cli import config_from_args
    from mixdit.cli import build_parser

    args = build_parser().parse_args(
        ["train", "vmoba", "--data", "synthetic:2", "--out", "o", "--vmoba-spatial-block", "3", "4",
         "--vmoba-spatiotemporal-block", "2", "2", "2", "--vmoba-dense-layers", "--vmoba-threshold", "0.3",
         "--vmoba-min-tokens", "0", "--vmoba-selection", "topk", "--lr", "2e-4", "--expert", "transformer_2"])
    config = config_from_args(args)
    config.validate()
    v = config.vmoba
    assert (v.spatial_block, v.spatiotemporal_block, v.dense_layers) == ((3, 4), (2, 2, 2), ())
    assert (v.threshold, v.min_tokens, v.selection) == (0.3, 0, "topk")
    assert (config.learning_rate, config.expert) == (2e-4, "transformer_2")
    assert config_from_args(build_parser().parse_args(
        ["train", "vmoba", "--data", "synthetic:2", "--out", "o", "--no-vmoba"])).vmoba is None


def test_cli_default_model_takes_its_clip_size_from_the_zoo(tmp_path, capsys):
    """`mixdit train vmoba --data synthetic:N` with no size flags: the default model's own size (tiny-wan:
    64 x 64 x 9, as `mixdit generate` uses), not Wan's 480 x 832 x 81."""
    from mixdit.cli import main

    assert main(["train", "vmoba", "--data", "synthetic:2", "--out", str(tmp_path / "run"), "--steps", "1",
                 "--no-progress"]) == 0
    assert (tmp_path / "run").is_dir()
