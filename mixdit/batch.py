"""``mixdit batch``: many generations from a prompts file, resumable, spread over GPUs.

    mixdit batch prompts.txt --out shots/ --model tiny-sd3 --seeds 4 --steps 20
    accelerate launch --num_processes 8 -m mixdit batch prompts.jsonl --out shots/ --model M --heads L13

* ``PROMPTS_FILE``: ``.txt`` (one prompt a line; blank lines and ``#`` comments skipped) or
  ``.jsonl`` (one object a line: ``prompt`` and optional ``seed``, ``negative_prompt``, ``steps``,
  ``guidance_scale``, ``height``, ``width``, ``frames``, ``name``). The whole file is checked before
  the model loads; a bad line is one error naming the file, the line and the field.
* Jobs are prompts x seeds (``--seeds N``: seeds ``S .. S+N-1``, ``S`` = ``--seed`` or the line's
  ``seed``). Each job writes ``DIR/<5-digit prompt index>-<prompt slug>-s<seed>.png`` (videos:
  ``.mp4``/``.gif``/``.webp``) or ``DIR/<name>.png`` (``DIR/<name>-s<seed>.png`` with several seeds),
  through the same generation path and metadata writer as ``mixdit generate``.
* Resumable: a job whose output exists is skipped; files are written under a hidden temporary name
  and linked into place, so an interrupted job leaves no half-written output and no existing file
  is ever overwritten.
* ``accelerate launch --num_processes N -m mixdit batch ...``: rank 0 lists the jobs still to do and
  broadcasts the list; rank r takes every N-th of them. Each rank appends its finished jobs to
  ``DIR/.manifest.rank<r>.jsonl``; after a barrier rank 0 appends them to ``DIR/manifest.jsonl``
  (lines already there are not repeated) and removes the per-rank files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from mixdit.errors import ConfigError, MixditError

MANIFEST = "manifest.jsonl"
RANK_MANIFEST = ".manifest.rank{rank}.jsonl"
_RANK_MANIFEST_RE = re.compile(r"^\.manifest\.rank\d+\.jsonl$")
VIDEO_FORMATS = ("mp4", "gif", "webp")
TEXT_SUFFIXES = (".txt", "")  # "" : a file without extension is read as text
JSONL_SUFFIXES = (".jsonl",)
# jsonl key -> (type check, allowed text); every key but prompt and name overrides the request field of that name
JSONL_FIELDS = {
    "prompt": "a non-empty string",
    "seed": "an integer",
    "negative_prompt": "a string",
    "steps": "an integer",
    "guidance_scale": "a number",
    "height": "an integer",
    "width": "an integer",
    "frames": "an integer",
    "name": "a file name of letters, digits, '.', '_', '-' (at most 120, not starting with '.' or '-')",
}
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,119}$")


# --------------------------------------------------------------------------------------------
# prompts file and jobs
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptLine:
    line: int  # 1-based line number in the prompts file
    prompt: str
    overrides: dict  # request field -> value (seed, negative_prompt, steps, guidance_scale, height, width, frames)
    name: str | None = None


@dataclass(frozen=True)
class Job:
    index: int  # position in the whole job list (prompt order, then seed)
    prompt_index: int
    line: int
    stem: str  # output file name without extension
    request: object  # GenerationRequest


def _line_error(source, line: int, field: str, value, allowed: str) -> MixditError:
    return MixditError(f"{source}, line {line}: {field} = {value!r} is not allowed: expected {allowed}")


def _check_field(source, line: int, key: str, value) -> None:
    ok = {
        "prompt": isinstance(value, str) and value.strip() != "",
        "negative_prompt": isinstance(value, str),
        "name": isinstance(value, str) and bool(_NAME_RE.match(value)),
        "guidance_scale": isinstance(value, (int, float)) and not isinstance(value, bool),
    }.get(key, isinstance(value, int) and not isinstance(value, bool))
    if not ok:
        raise _line_error(source, line, key, value, JSONL_FIELDS[key])


def prompt_text_lines(text: str):
    """``(line number, prompt)`` for each line of a prompts text; blank lines and ``#`` comments skipped."""
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped and not stripped.startswith("#"):
            yield number, stripped


def read_prompts(path) -> list[PromptLine]:
    """Read and check a ``.txt`` or ``.jsonl`` prompts file (see the module docstring).

    Raises :class:`MixditError` naming the file, the line and the field on the first bad line.
    """
    source = str(path)
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in TEXT_SUFFIXES + JSONL_SUFFIXES:
        raise ConfigError("prompts_file", source,
                          "a .txt file (one prompt a line) or a .jsonl file (one object a line)")
    try:
        text = p.read_text(encoding="utf-8-sig")  # -sig: a BOM from a Windows editor is not part of line 1
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError("prompts_file", source,
                          f"a readable UTF-8 .txt or .jsonl file ({type(e).__name__}: {e})") from None
    lines: list[PromptLine] = []
    for number, stripped in prompt_text_lines(text):
        if suffix not in JSONL_SUFFIXES:
            lines.append(PromptLine(number, stripped, {}))
            continue
        try:
            obj = json.loads(stripped)
        except ValueError as e:
            raise MixditError(f"{source}, line {number}: not valid JSON ({e.msg} at column {e.colno}); expected "
                              'one object a line like {"prompt": "a red square", "seed": 3}') from None
        if not isinstance(obj, dict):
            raise MixditError(f"{source}, line {number}: expected a JSON object with a \"prompt\" key, "
                              f"got {type(obj).__name__}")
        unknown = sorted(set(obj) - set(JSONL_FIELDS))
        if unknown:
            raise _line_error(source, number, unknown[0], obj[unknown[0]],
                              "one of the keys " + ", ".join(JSONL_FIELDS) + f" (not {unknown[0]!r})")
        if "prompt" not in obj:
            raise MixditError(f"{source}, line {number}: prompt is missing: expected a \"prompt\" key "
                              f"({JSONL_FIELDS['prompt']})")
        for key, value in obj.items():
            _check_field(source, number, key, value)
        overrides = {k: v for k, v in obj.items() if k not in ("prompt", "name")}
        if "guidance_scale" in overrides:
            overrides["guidance_scale"] = float(overrides["guidance_scale"])
        lines.append(PromptLine(number, obj["prompt"].strip(), overrides, obj.get("name")))
    if not lines:
        raise ConfigError("prompts_file", source, "at least one prompt (blank lines and # comments are skipped)")
    return lines


def slug(prompt: str, limit: int = 40) -> str:
    text = "".join(c if c.isascii() and c.isalnum() else "-" for c in prompt.lower())
    return re.sub(r"-+", "-", text)[:limit].strip("-") or "prompt"


def make_jobs(lines: list[PromptLine], base, seeds: int = 1, source="prompts") -> list[Job]:
    """prompts x seeds, each a validated request; output stems unique (case-insensitively)."""
    from mixdit.config import check_number

    check_number("seeds", seeds, 1, 1_000_000, integer=True)
    jobs: list[Job] = []
    seen: dict[str, int] = {}
    for prompt_index, pl in enumerate(lines):
        overrides = dict(pl.overrides)
        first = overrides.pop("seed", base.seed)
        for k in range(seeds):
            seed = first + k
            request = dataclasses.replace(base, prompt=pl.prompt, seed=seed, **overrides)
            try:
                request.validate()
            except ConfigError as e:
                raise _line_error(source, pl.line, e.field, e.value, e.allowed) from None
            if pl.name is not None:
                stem = pl.name if seeds == 1 else f"{pl.name}-s{seed}"
            else:
                stem = f"{prompt_index:05d}-{slug(pl.prompt)}-s{seed}"
            key = stem.casefold()
            if key in seen:
                raise _line_error(source, pl.line, "name", pl.name or stem, "an output name not used by another "
                                  f"job (line {seen[key]} writes {stem!r} too)")
            seen[key] = pl.line
            jobs.append(Job(len(jobs), prompt_index, pl.line, stem, request))
    return jobs


# --------------------------------------------------------------------------------------------
# processes
# --------------------------------------------------------------------------------------------
class Ranks:
    """Rank, world size, device and the three collectives the batch needs (no-ops in one process)."""

    def __init__(self, state, device: str):
        self._state, self.device = state, device
        self.rank, self.world = self._state.process_index, self._state.num_processes

    def barrier(self) -> None:
        if self.world > 1:
            self._state.wait_for_everyone()

    def broadcast(self, obj):
        """``obj`` of rank 0, on every rank."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        box = [obj]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every rank's ``obj``, in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


# --------------------------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------------------------
def _place(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; never replaces an existing ``dst`` (FileExistsError)."""
    try:
        os.link(src, dst)
    except FileExistsError:
        raise
    except OSError:  # a file system without hard links
        if dst.exists():
            raise FileExistsError(str(dst)) from None
        os.replace(src, dst)
        return
    os.unlink(src)


def _options(request, meta: dict | None) -> dict:
    from mixdit.config import config_to_dict
    from mixdit.pipelines.output import _jsonable

    if meta is not None:  # the values the run used (model defaults filled in)
        keys = ("model", "negative_prompt", "steps", "height", "width", "frames", "fps", "guidance_scale",
                "scheduler", "device", "dtype", "features")
        return _jsonable({k: meta[k] for k in keys if k in meta})
    opts = {f.name: getattr(request, f.name) for f in dataclasses.fields(request) if f.name not in ("prompt", "seed")}
    opts["features"] = {k: (config_to_dict(v) if dataclasses.is_dataclass(v) else v)
                        for k, v in request.features.items()}
    return _jsonable(opts)


def merge_manifests(out_dir) -> int:
    """Append every ``.manifest.rank<r>.jsonl`` record to ``manifest.jsonl`` (job order, no line twice)
    and remove the per-rank files; returns the number of records added."""
    out_dir = Path(out_dir)
    parts = sorted(p for p in out_dir.iterdir() if _RANK_MANIFEST_RE.match(p.name))
    if not parts:
        return 0
    manifest = out_dir / MANIFEST
    existing = manifest.read_text(encoding="utf-8") if manifest.exists() else ""
    have = set(existing.splitlines())
    records = []
    for part in parts:
        for line in part.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut short by a killed process
                continue
            if line not in have:
                have.add(line)
                records.append((rec.get("index", 0), rec.get("rank", 0), line))
    records.sort()
    with open(manifest, "a", encoding="utf-8") as f:
        if existing and not existing.endswith("\n"):
            f.write("\n")
        for _, _, line in records:
            f.write(line + "\n")
    for part in parts:
        part.unlink()
    return len(records)


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def add_batch_parser(subparsers, modules):
    from mixdit.cli import add_feature_arguments, add_generation_options

    p = subparsers.add_parser(
        "batch", help="generate every prompt of a .txt/.jsonl file (x seeds) into a folder; resumable, multi-GPU",
        description="Generate every prompt of PROMPTS_FILE (x --seeds) into --out DIR with the same options and "
                    "metadata as `mixdit generate`. Outputs that exist are skipped (resume by running again); "
                    "finished jobs are listed in DIR/manifest.jsonl. Spread over GPUs with "
                    "`accelerate launch --num_processes N -m mixdit batch ...`.")
    p.add_argument("prompts_file", metavar="PROMPTS_FILE",
                   help=".txt: one prompt a line (blank lines and # comments skipped); .jsonl: one object a line with "
                        "\"prompt\" and optional " + ", ".join(f'"{k}"' for k in JSONL_FIELDS if k != "prompt"))
    add_generation_options(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (created if missing)")
    p.add_argument("--seeds", type=int, default=1, metavar="N",
                   help="seeds per prompt: --seed (or the line's seed) .. +N-1 (default 1)")
    p.add_argument("--video-format", default="mp4", choices=VIDEO_FORMATS, help="file type of videos (default mp4)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_feature_arguments(p, modules)
    p.set_defaults(func=cmd_batch)
    return p


def register_commands(subparsers) -> None:
    from mixdit.cli import _feature_modules

    add_batch_parser(subparsers, _feature_modules())


def cmd_batch(args, modules=None) -> int:
    from mixdit.cli import _feature_modules, request_from_args

    modules = _feature_modules() if modules is None else modules
    # everything a user can get wrong, before any model loads
    base = request_from_args(args, modules, prompt="")
    base.validate()
    lines = read_prompts(args.prompts_file)
    jobs = make_jobs(lines, base, args.seeds, source=args.prompts_file)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError("out", args.out, "a folder (this is a file)")

    from mixdit.distributed import process_state, relaunch_cpu_processes, requested_cpu_processes

    n = requested_cpu_processes()
    if n > 1:  # `accelerate launch --cpu --num_processes N` without MPI starts one process
        return relaunch_cpu_processes(n)
    with process_state(args.device) as (state, device):
        return run_batch(jobs, out_dir, args, base.features, Ranks(state, device))


def _check_jobs_for_model(pipe, jobs: list[Job], features: dict, source) -> None:
    """Checks that need the loaded model (feature support, frame counts), still before any generation."""
    import mixdit
    from mixdit.generate import pipeline_kwargs
    from mixdit.pipelines.adapters import adapter_for

    adapter = adapter_for(pipe)
    if features:
        mixdit.apply(pipe, **features)
        mixdit.remove(pipe)
    for job in jobs:
        try:
            pipeline_kwargs(pipe, adapter.family, adapter.is_video, job.request)
        except ConfigError as e:
            raise _line_error(source, job.line, e.field, e.value, e.allowed) from None


def run_batch(jobs: list[Job], out_dir: Path, args, features: dict, ranks: Ranks) -> int:
    from tqdm.auto import tqdm

    from mixdit.generate import run_generation
    from mixdit.pipelines.adapters import adapter_for
    from mixdit.pipelines.output import save_result, sidecar
    from mixdit.pipelines.zoo import load_pipeline

    pipe = load_pipeline(args.model, device=ranks.device, dtype=args.dtype)
    if hasattr(pipe, "set_progress_bar_config"):
        pipe.set_progress_bar_config(disable=True)  # one bar over the jobs instead
    is_video = adapter_for(pipe).is_video
    ext = "." + args.video_format if is_video else ".png"
    _check_jobs_for_model(pipe, jobs, features, args.prompts_file)
    out_dir.mkdir(parents=True, exist_ok=True)

    pending = ranks.broadcast([j.index for j in jobs if not (out_dir / (j.stem + ext)).exists()]
                              if ranks.rank == 0 else None)
    mine = [jobs[i] for i in pending[ranks.rank::ranks.world]]
    counts = {"done": 0, "skipped": 0, "failed": 0}
    desc = "batch" if ranks.world == 1 else f"batch rank {ranks.rank}"
    bar = tqdm(mine, desc=desc, unit="job", position=ranks.rank, disable=args.no_progress,
               dynamic_ncols=True)
    rank_manifest = out_dir / RANK_MANIFEST.format(rank=ranks.rank)
    loop_start = time.perf_counter()
    with open(rank_manifest, "a", encoding="utf-8") as manifest:
        if rank_manifest.stat().st_size and not rank_manifest.read_bytes().endswith(b"\n"):
            manifest.write("\n")  # a line cut short by an interrupted run stays on its own line
        for job in bar:
            target = out_dir / (job.stem + ext)
            tmp = out_dir / f".{job.stem}.rank{ranks.rank}.partial{ext}"
            record = {"index": job.index, "line": job.line, "prompt": job.request.prompt, "seed": job.request.seed,
                      "file": target.name, "path": str(target), "rank": ranks.rank}
            start = time.perf_counter()
            try:
                if target.exists():  # appeared since the list was made
                    counts["skipped"] += 1
                    continue
                result, meta, _ = run_generation(pipe, job.request)
                written = save_result(result, tmp, meta, fps=job.request.fps if is_video else None)
                moves = []
                for w in written:
                    final = out_dir / (job.stem + w.name[len(tmp.stem):])
                    if is_video:
                        moves.append((sidecar(w), sidecar(final)))
                    moves.append((w, final))
                clash = [str(dst) for _, dst in moves if dst.exists()]
                if clash:
                    raise MixditError(f"not overwriting existing file(s) {', '.join(clash)}")
                for src, dst in moves:
                    _place(src, dst)
                record.update(status="done", seconds=round(time.perf_counter() - start, 3),
                              options=_options(job.request, meta))
                counts["done"] += 1
            except (MixditError, ValueError, FileExistsError) as e:
                record.update(status="failed", seconds=round(time.perf_counter() - start, 3),
                              options=_options(job.request, None), error=str(e) or type(e).__name__)
                counts["failed"] += 1
                bar.write(f"mixdit: job {job.stem} (line {job.line}) failed: {e}", file=sys.stderr)
            finally:
                for leftover in (tmp, sidecar(tmp)):
                    if leftover.exists():
                        leftover.unlink()
            manifest.write(json.dumps(record, ensure_ascii=False) + "\n")
            manifest.flush()
    bar.close()
    counts["seconds"] = time.perf_counter() - loop_start

    ranks.barrier()
    totals = ranks.gather(counts)
    if ranks.rank == 0:
        merge_manifests(out_dir)
        done = sum(c["done"] for c in totals)
        failed = sum(c["failed"] for c in totals)
        skipped = len(jobs) - len(pending) + sum(c["skipped"] for c in totals)
        used = sum(1 for c in totals if c["done"] or c["failed"])
        seconds = max(c["seconds"] for c in totals)  # the slowest rank's jobs, after its model was loaded
        rate = f" ({60 * done / seconds:.1f} jobs/min)" if done and seconds > 0 else ""
        print(f"{done} done, {skipped} skipped, {failed} failed ({len(jobs)} jobs"
              + (f", {ranks.world} processes, {used} used" if ranks.world > 1 else "") + f") in {out_dir}; "
              f"{seconds:.1f} s after loading{rate}")
        print(f"manifest: {out_dir / MANIFEST}")
    failed_any = any(c["failed"] for c in totals)
    ranks.barrier()
    return 1 if failed_any else 0
