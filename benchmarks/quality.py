"""Quality benchmark: does a feature change what the model draws?

For a model (default: both trained testbed models) and every feature configuration that exists in
this checkout (discovered through ``mixdit.api.FEATURES``):

* ``dense``: no feature (the reference);
* ``vmoba``: ``VMoBAConfig()`` defaults (video families only; below ``min_tokens`` it runs dense, and a
  layer whose selection covers more than ``max_tile_density`` of the key tiles runs dense);
  ``vmoba-sparse``: the same exact selection always applied (``max_tile_density=1``);
  ``vmoba-query-tile``: the named ``granularity="query_tile"`` approximation, always applied;
* ``guidance-*``: head perturbation presets a guidance module exposes (``PRESETS`` dicts or
  ``guidance/presets/*.json`` files) and a generic ``guidance-mid`` (all heads of the middle layer,
  scale 3, full PAG) that fits any depth;

it generates a fixed prompt set (60 testbed captions, seed = prompt index; ``--limit`` keeps the
first N) through the shared generation path (:func:`mixdit.generate.run_generation`), scores
every output with the deterministic detector (:mod:`mixdit.pipelines.testbed.scorer`: accuracy
per attribute) and compares it with the dense output of the same prompt and seed (PSNR, SSIM).

    python benchmarks/quality.py                                  # mixdit-shapes-video and -image
    python benchmarks/quality.py --model mixdit-shapes-video --limit 10
    python benchmarks/quality.py --model tiny-wan --limit 2       # any zoo name or pipeline folder
    python benchmarks/quality.py --model /tmp/mini --limit 2 --configs dense,vmoba

Writes ``benchmarks/results/quality-<model>.json`` and ``.md`` (``--out-dir`` to change).
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import os
import re
import sys
from pathlib import Path

import numpy as np

PROMPT_SEED = 2024
NUM_PROMPTS = 60


def prompt_set(video: bool, limit: int | None = None) -> list[tuple[str, int]]:
    """The fixed (prompt, seed) pairs: 60 scene captions drawn with seed 2024, seeds 0..59."""
    from mixdit.pipelines.testbed.scenes import sample_scenes

    scenes = sample_scenes(PROMPT_SEED, NUM_PROMPTS, video=video)
    pairs = [(s.caption(), i) for i, s in enumerate(scenes)]
    return pairs[:limit] if limit else pairs


def load_model(name: str, device: str, dtype: str | None):
    import mixdit.pipelines.testbed.codec  # noqa: F401  (registers the codec class for from_pretrained)
    from mixdit.pipelines.testbed.load import TESTBED_MODELS, load_testbed, set_testbed_defaults

    if name in TESTBED_MODELS:
        return load_testbed(name, device, dtype)
    from mixdit.pipelines.zoo import load_pipeline

    pipe = load_pipeline(name, device=device, dtype=dtype)
    if os.path.isdir(name):
        set_testbed_defaults(pipe, name)
    return pipe


def _num_layers(pipe) -> int:
    from mixdit.pipelines.adapters import adapter_for

    adapter = adapter_for(pipe)
    return adapter.num_layers(adapter.denoisers(pipe)[0][1])


def feature_configurations(pipe) -> list[tuple[str, dict]]:
    """(name, features) for every configuration to compare; ``dense`` first."""
    from mixdit import api
    from mixdit.pipelines.adapters import adapter_for

    api._load_builtin_features()
    adapter = adapter_for(pipe)
    configs: list[tuple[str, dict]] = [("dense", {})]
    if "vmoba" in api.FEATURES:
        cls = api.FEATURES["vmoba"]
        if cls.supported_families is None or adapter.family in cls.supported_families:
            configs.append(("vmoba", {"vmoba": cls.config_class()}))
            # the defaults may keep a layer dense (max_tile_density): these two always apply the selection
            configs.append(("vmoba-sparse", {"vmoba": cls.config_class(max_tile_density=1.0)}))
            configs.append(("vmoba-query-tile", {"vmoba": cls.config_class(granularity="query_tile",
                                                                           max_tile_density=1.0)}))
    if "guidance" in api.FEATURES:
        cls = api.FEATURES["guidance"]
        if cls.supported_families is None or adapter.family in cls.supported_families:
            for name, cfg in _guidance_presets(cls.config_class, adapter.family):
                configs.append((f"guidance-{name}", {"guidance": cfg}))
            mid = _num_layers(pipe) // 2
            configs.append(("guidance-mid", {"guidance": cls.config_class(heads=f"L{mid}", scale=3.0)}))
    return configs


def _guidance_presets(config_class, family: str) -> list[tuple[str, object]]:
    """Presets a guidance module exposes: ``PRESETS`` dicts (name -> config or dict) in
    ``mixdit.guidance.*`` and preset JSON files in ``guidance/presets/`` whose ``family`` matches."""
    found: list[tuple[str, object]] = []
    for mod_name in ("mixdit.guidance", "mixdit.guidance.perturbation", "mixdit.guidance.search"):
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError:
            continue
        for name, value in (getattr(mod, "PRESETS", None) or {}).items():
            if isinstance(value, dict):
                if value.get("family", family) != family:
                    continue
                value = config_class(**{k: v for k, v in value.items() if k in ("heads", "scale", "softpag", "mode")})
            if isinstance(value, config_class) and name not in dict(found):
                found.append((name, value))
    try:
        import mixdit.guidance as g

        folder = Path(g.__file__).parent / "presets"
        from mixdit.guidance.config import config_from_preset, load_preset

        for path in sorted(glob.glob(str(folder / "*.json"))):
            data = load_preset(path)
            if data.get("family", family) == family:
                found.append((Path(path).stem, config_from_preset(path)))
    except Exception:  # no presets folder / unreadable preset: nothing to add
        pass
    return found


def _as_array(result) -> np.ndarray:
    from mixdit.pipelines.testbed.scorer import as_frames

    return as_frames(result)


def run(model: str, *, limit: int | None, device: str, dtype: str | None, steps: int | None,
        configs: list[str] | None, out_dir: Path, flow_shift: float | None = None, log=print) -> dict:
    from mixdit.errors import MixditError
    from mixdit.generate import GenerationRequest, run_generation
    from mixdit.pipelines.adapters import adapter_for
    from mixdit.pipelines.testbed.scorer import psnr, score, ssim

    pipe = load_model(model, device, dtype)
    if flow_shift is not None:
        from mixdit.pipelines.flow_matching import with_sampling_shift

        pipe.scheduler = with_sampling_shift(pipe.scheduler, flow_shift)
    is_video = adapter_for(pipe).is_video
    pairs = prompt_set(is_video, limit)
    # testbed folders carry their own defaults (size, frames, steps); zoo names get theirs from the zoo
    defaults = dict(getattr(pipe, "_mixdit_defaults", None) or {})
    all_configs = feature_configurations(pipe)
    if configs:
        unknown = set(configs) - {n for n, _ in all_configs}
        if unknown:
            log(f"skipping configurations that do not exist here: {', '.join(sorted(unknown))}")
        all_configs = [c for c in all_configs if c[0] in configs or c[0] == "dense"]
    results: dict = {"model": model, "video": is_video, "num_prompts": len(pairs), "prompt_seed": PROMPT_SEED,
                     "steps": steps, "device": device, "flow_shift": flow_shift, "configs": {}}
    dense_out: list[np.ndarray] = []
    for name, features in all_configs:
        outs, seconds, error = [], 0.0, None
        for prompt, seed in pairs:
            request = GenerationRequest(prompt=prompt, model=model, seed=seed, device=device, dtype=dtype,
                                        features=features, steps=steps or defaults.get("steps"),
                                        height=defaults.get("height"), width=defaults.get("width"),
                                        frames=defaults.get("frames") if is_video else None,
                                        guidance_scale=defaults.get("guidance_scale"))
            try:
                result, meta, secs = run_generation(pipe, request)
            except (MixditError, ValueError, NotImplementedError) as e:
                error = f"{type(e).__name__}: {e}"
                break
            outs.append(_as_array(result))
            seconds += secs
        import mixdit

        mixdit.remove(pipe)
        if error is not None:
            log(f"{name}: skipped ({error})")
            results["configs"][name] = {"error": error}
            continue
        scored = score(outs, [p for p, _ in pairs])
        entry = {"features": {k: _jsonable(v) for k, v in features.items()},
                 "accuracy": scored["accuracy"], "overall_accuracy": scored["overall"],
                 "seconds_per_generation": seconds / max(len(outs), 1)}
        if name == "dense":
            dense_out = outs
        elif dense_out:
            ps = [psnr(a, b) for a, b in zip(outs, dense_out)]
            entry["psnr_vs_dense"] = float(np.mean([min(p, 100.0) for p in ps]))  # identical outputs count 100 dB
            entry["ssim_vs_dense"] = float(np.mean([ssim(a, b) for a, b in zip(outs, dense_out)]))
        entry["details"] = [{"prompt": d["prompt"], "detected": d["detected"], "correct": d["correct"]}
                            for d in scored["details"]]
        results["configs"][name] = entry
        log(f"{name}: overall accuracy {entry['overall_accuracy']:.3f} "
            + " ".join(f"{k}={v:.2f}" for k, v in entry["accuracy"].items())
            + (f" psnr={entry['psnr_vs_dense']:.2f} ssim={entry['ssim_vs_dense']:.4f}" if "psnr_vs_dense" in entry else ""))
    write_results(results, out_dir)
    return results


def _jsonable(v):
    import dataclasses

    if dataclasses.is_dataclass(v):
        from mixdit.config import config_to_dict

        return config_to_dict(v)
    return v if isinstance(v, (int, float, str, bool, type(None), list, dict)) else repr(v)


def slug(model: str) -> str:
    base = os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", base).strip("-") or "model"


def write_results(results: dict, out_dir: Path) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"quality-{slug(results['model'])}"
    json_path, md_path = stem.with_suffix(".json"), stem.with_suffix(".md")
    json_path.write_text(json.dumps(results, indent=2, default=str))
    attrs: list[str] = []
    for entry in results["configs"].values():
        for a in entry.get("accuracy", {}):
            if a not in attrs:
                attrs.append(a)
    lines = [f"# Quality: {results['model']}", "",
             f"{results['num_prompts']} prompts (testbed captions, prompt seed {results['prompt_seed']}, "
             f"generation seed = prompt index), steps: {results['steps'] or 'model default'}, "
             f"sampler shift: {results.get('flow_shift') or 'model default'}, "
             f"device: {results['device']}. Accuracy from the deterministic scorer; PSNR/SSIM against dense "
             "with the same seeds.", "",
             "| configuration | " + " | ".join(attrs) + " | overall | PSNR vs dense (dB) | SSIM vs dense | s/generation |",
             "|---" * (len(attrs) + 5) + "|"]
    for name, e in results["configs"].items():
        if "error" in e:
            lines.append(f"| {name} | " + " | ".join("-" for _ in attrs) + f" | skipped: {e['error'][:80]} | | | |")
            continue
        acc = " | ".join(f"{e['accuracy'].get(a, float('nan')):.2f}" for a in attrs)
        p = f"{e['psnr_vs_dense']:.2f}" if "psnr_vs_dense" in e else "(reference)"
        s = f"{e['ssim_vs_dense']:.4f}" if "ssim_vs_dense" in e else "(reference)"
        lines.append(f"| {name} | {acc} | {e['overall_accuracy']:.3f} | {p} | {s} | {e['seconds_per_generation']:.2f} |")
    md_path.write_text("\n".join(lines) + "\n")
    return json_path, md_path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="zoo name or pipeline folder; repeat for several (default: both testbed models)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N of the 60 prompts")
    parser.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--flow-shift", type=float, default=None,
                        help="sample with this noise-level shift (default: the model's scheduler)")
    parser.add_argument("--configs", default=None, help="comma-separated subset of configurations (dense is always run)")
    parser.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results")
                        if "__file__" in globals() else "benchmarks/results")
    args = parser.parse_args(argv)
    models = args.model or ["mixdit-shapes-video", "mixdit-shapes-image"]
    configs = [c.strip() for c in args.configs.split(",")] if args.configs else None
    from mixdit.errors import MixditError

    status = 0
    for model in models:
        try:
            run(model, limit=args.limit, device=args.device, dtype=args.dtype, steps=args.steps, configs=configs,
                flow_shift=args.flow_shift,
                out_dir=Path(args.out_dir))
        except MixditError as e:
            print(f"quality: {model}: {e}", file=sys.stderr)
            status = 2
    return status


if __name__ == "__main__":
    sys.exit(main())
