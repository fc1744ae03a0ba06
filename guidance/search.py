"""HeadHunter: greedy search for the attention heads whose perturbation best serves an objective.

Round ``r`` (paper: "Fine-Grained Perturbation Guidance via Attention Head Selection"): for every
remaining head ``h`` generate the ``samples`` prompt-seed pairs with ``S + {h}`` perturbed (CFG off,
perturbation scale ``scale``, ``softpag`` u, default 3 and 1), score the images with the objective,
average, and add the ``top_k`` best heads to ``S``. Repeat for ``rounds`` rounds.

Speed: many candidates ride in one batched pipeline call. Each batch row is one candidate's own
trajectory (same prompt, same seed, so the same starting noise) with one perturbed row that
perturbs that row's candidate set (``PerturbationGuidance.row_head_sets``); candidates are grouped
by layer so the shared prefix forks late. Resumable: every (round, head set, prompt, seed) score is
appended to ``<cache_dir>/scores.rank<k>.jsonl`` as soon as it exists and is skipped on restart.
Distributed: ``accelerate``'s ``PartialState().split_between_processes`` splits each round's
candidates (every head scored exactly once), results are gathered at the end of the round.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from mixdit.guidance.config import SearchConfig  # noqa: F401  (re-exported)
from mixdit.guidance.heads import format_heads, head_counts, resolve_heads
from mixdit.guidance.perturbation import GuidanceConfig, guidance_feature


def _key(round_: int, heads: str, prompt: str, seed: int) -> str:
    return json.dumps([round_, heads, prompt, seed])


class ScoreCache:
    """JSON-lines score store keyed by (round, head set, prompt, seed); one file per process."""

    def __init__(self, cache_dir: str | None, rank: int = 0):
        self.scores: dict[str, float] = {}
        self.path = None
        if cache_dir is not None:
            d = Path(cache_dir)
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / f"scores.rank{rank}.jsonl"
            self.reload()

    def reload(self) -> None:
        if self.path is None:
            return
        for f in sorted(self.path.parent.glob("scores.rank*.jsonl")):
            for line in f.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    self.scores[_key(rec["round"], rec["heads"], rec["prompt"], rec["seed"])] = float(rec["score"])
                except (ValueError, KeyError):
                    continue  # a line cut short by a kill

    def get(self, round_, heads, prompt, seed):
        return self.scores.get(_key(round_, heads, prompt, seed))

    def put(self, round_, heads, prompt, seed, score: float) -> None:
        self.scores[_key(round_, heads, prompt, seed)] = float(score)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps({"round": round_, "heads": heads, "prompt": prompt, "seed": seed,
                                    "score": float(score)}) + "\n")
                f.flush()
                os.fsync(f.fileno())


def _cfg_off_kwargs(pipe) -> dict:
    # the search runs without classifier-free guidance: w = 1 turns it off in SD3/Wan pipelines;
    # FLUX(-dev) is guidance-distilled and runs a single conditional pass unless true_cfg_scale > 1
    import inspect

    params = inspect.signature(type(pipe).__call__).parameters
    kw = {}
    if "true_cfg_scale" in params:
        kw["true_cfg_scale"] = 1.0
    elif "guidance_scale" in params:
        kw["guidance_scale"] = 1.0
    return kw


def _images(out):
    imgs = getattr(out, "images", None)
    if imgs is None:
        imgs = [frames[len(frames) // 2] for frames in out.frames]  # video: score the middle frame
    return list(imgs)


def head_hunter(pipe, config: SearchConfig, objective: Callable | None = None, *, model_name: str | None = None,
                progress: bool = True, state=None) -> dict:
    """Run the greedy search on ``pipe``; returns the preset dict (also what ``--out`` writes).

    ``objective``: a callable ``f(images, prompts) -> list[float]`` (default: ``config.objective``
    through :func:`mixdit.guidance.objectives.get_objective`)."""
    import mixdit
    from accelerate import PartialState
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    from mixdit.guidance.objectives import get_objective

    config.validate()
    state = state or PartialState()
    adapter = mixdit.api.adapter_for(pipe)
    model = adapter.denoisers(pipe)[0][1]
    counts = head_counts(adapter, model)
    space = resolve_heads(config.candidates if config.candidates is not None else f"L0-{len(counts) - 1}",
                          len(counts), counts, field="search.candidates", family=adapter.family)
    score_fn = objective if objective is not None else get_objective(config.objective)
    cache = ScoreCache(config.cache_dir, state.process_index)
    pairs = [(config.prompts[i % len(config.prompts)], config.seed + i) for i in range(config.samples)]
    call_kw = dict(_cfg_off_kwargs(pipe), num_inference_steps=config.steps, **config.pipeline_kwargs)
    if config.height:
        call_kw["height"] = config.height
    if config.width:
        call_kw["width"] = config.width
    pipe.set_progress_bar_config(disable=True)

    selected: list[tuple[int, int]] = []
    rounds: list[dict] = []
    objective_name = config.objective if isinstance(config.objective, str) else getattr(
        config.objective, "__name__", type(config.objective).__name__)
    mixdit.apply(pipe, guidance=GuidanceConfig(heads=format_heads(space), scale=config.scale,
                                               softpag=config.softpag, mode=config.mode))
    state.wait_for_everyone()
    started = time.perf_counter()
    generated = 0  # (candidate, prompt-seed pair) generations this rank ran now (cache hits excluded)
    try:
        for r in range(config.rounds):
            remaining = sorted((h for h in space if h not in selected), key=lambda h: (-h[0], h[1]))
            if not remaining:
                break
            with state.split_between_processes(remaining) as mine:
                mine = list(mine)
            sets = {h: tuple(sorted(set(selected) | {h})) for h in mine}
            names = {h: format_heads(sets[h]) for h in mine}
            todo = [(p, s, h) for (p, s) in pairs for h in mine if cache.get(r, names[h], p, s) is None]
            generated += len(todo)
            bar = tqdm(total=len(mine) * len(pairs), initial=len(mine) * len(pairs) - len(todo),
                       desc=f"round {r + 1}/{config.rounds}", disable=not (progress and state.is_main_process))
            # one pipeline call per (pair, chunk of candidates); candidates are layer-sorted
            by_pair: dict[tuple[str, int], list] = {}
            for p, s, h in todo:
                by_pair.setdefault((p, s), []).append(h)
            for (p, s), heads in by_pair.items():
                for i in range(0, len(heads), config.batch_size):
                    chunk = heads[i:i + config.batch_size]
                    guidance_feature(pipe).row_head_sets = [frozenset(sets[h]) for h in chunk]
                    out = pipe([p] * len(chunk), generator=[torch.Generator().manual_seed(s) for _ in chunk],
                               **call_kw)
                    scores = score_fn(_images(out), [p] * len(chunk))
                    for h, sc in zip(chunk, scores):
                        cache.put(r, names[h], p, s, float(sc))
                    bar.update(len(chunk))
            bar.close()
            local = {names[h]: [cache.get(r, names[h], p, s) for p, s in pairs] for h in mine}
            merged: dict[str, list] = {}
            for part in (gather_object([local]) if state.num_processes > 1 else [local]):
                merged.update(part)
            means = {spec: sum(v) / len(v) for spec, v in merged.items()}
            by_spec = {format_heads(tuple(sorted(set(selected) | {h}))): h for h in remaining}
            best = sorted(means, key=lambda spec: -means[spec])[:config.top_k]
            new = [by_spec[spec] for spec in best]
            selected += new
            rounds.append({"round": r, "selected": format_heads(new), "scores": {
                format_heads([by_spec[spec]]): means[spec] for spec in sorted(means, key=lambda x: -means[x])}})
    finally:
        mixdit.remove(pipe)
    state.wait_for_everyone()
    seconds = time.perf_counter() - started  # the search itself: no model loading
    if state.num_processes > 1:
        generated = sum(gather_object([generated]))
    return {
        "model": model_name or getattr(pipe, "mixdit_model_name", type(pipe).__name__),
        "family": adapter.family,
        "heads": format_heads(sorted(selected)),
        "scale": config.scale,
        "softpag": config.softpag,
        "mode": config.mode,
        "objective": objective_name,
        "search": {"rounds": config.rounds, "top_k": config.top_k, "samples": config.samples, "steps": config.steps,
                   "seed": config.seed, "prompts": list(config.prompts), "batch_size": config.batch_size},
        # this run's cost (differs between runs; everything above is deterministic)
        "run": {"num_processes": state.num_processes, "seconds": round(seconds, 3), "generations": generated,
                "generations_per_minute": round(60 * generated / max(seconds, 1e-9), 2)},
        "rounds": rounds,
    }


def write_preset(preset: dict, path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(preset, f, indent=2)
