"""CLI of head perturbation guidance: ``mixdit generate --heads ...`` and ``mixdit heads search``."""

from __future__ import annotations

import os

from mixdit.errors import ConfigError


def add_generate_arguments(parser) -> None:
    g = parser.add_argument_group("head perturbation guidance (PAG / SoftPAG on chosen heads; HeadHunter presets)")
    g.add_argument("--heads", default=None, metavar="SPEC_OR_PRESET.json",
                   help="heads to perturb: a spec like 'L13H18,L14H*,L2' or a preset JSON from `mixdit heads search`")
    g.add_argument("--perturb-scale", type=float, default=None, metavar="S",
                   help="perturbation guidance scale s (default: the preset's, else 3.0)")
    g.add_argument("--softpag", type=float, default=None, metavar="U",
                   help="perturbation strength u in [0, 1]: A -> (1-u)A + uP (default: the preset's, else 1.0)")
    g.add_argument("--perturb-mode", default=None,
                   help="identity | identity_image | uniform | mean_query (default identity)")
    g.add_argument("--perturb-window", type=float, nargs=2, default=None, metavar=("START", "STOP"),
                   help="fractions of the steps where s applies (default 0 1)")


def _is_preset(value: str) -> bool:
    return value.lower().endswith(".json") or os.path.isfile(value)


def features_from_args(args) -> dict:
    from mixdit.guidance.config import GuidanceConfig, config_from_preset

    heads = getattr(args, "heads", None)
    extras = {"scale": getattr(args, "perturb_scale", None), "softpag": getattr(args, "softpag", None),
              "mode": getattr(args, "perturb_mode", None)}
    window = getattr(args, "perturb_window", None)
    if heads is None:
        given = [f"--{k}" for k, v in (("perturb-scale", extras["scale"]), ("softpag", extras["softpag"]),
                                       ("perturb-mode", extras["mode"]), ("perturb-window", window)) if v is not None]
        if given:
            raise ConfigError("heads", None, f"--heads SPEC_OR_PRESET.json together with {', '.join(given)}")
        return {}
    if window is not None:
        extras["window"] = tuple(window)
    if _is_preset(heads):
        if not os.path.isfile(heads):
            raise ConfigError("heads", heads, "an existing preset JSON file or a head spec like 'L13H18,L14H*'")
        return {"guidance": config_from_preset(heads, **extras)}
    cfg = GuidanceConfig(heads=heads, **{k: v for k, v in extras.items() if v is not None})
    cfg.validate()
    return {"guidance": cfg}


def register_commands(subparsers) -> None:
    heads = subparsers.add_parser("heads", help="attention-head tools (HeadHunter search)")
    sub = heads.add_subparsers(dest="heads_command", metavar="COMMAND")
    p = sub.add_parser("search", help="greedy HeadHunter search for the heads to perturb; writes a preset JSON",
                       description="Greedy HeadHunter search (CFG off). Spread over GPUs with `accelerate launch "
                                   "-m mixdit heads search ...`; resumable with --resume/--cache-dir.")
    p.add_argument("--model", required=True, help="built-in name, hub id or local folder")
    p.add_argument("--prompts", required=True, help="text file, one prompt per line (blank lines and # comments skipped)")
    p.add_argument("--objective", default="pickscore",
                   help="clip | pickscore | aesthetic | imagereward | module:function (default pickscore)")
    p.add_argument("--objective-model", default=None, help="hub id or folder of the objective's model")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--top-k", type=int, default=24)
    p.add_argument("--samples", type=int, default=20, help="prompt-seed pairs per candidate")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--perturb-scale", type=float, default=3.0)
    p.add_argument("--softpag", type=float, default=1.0, help="u during the search (lower it when generating)")
    p.add_argument("--perturb-mode", default="identity")
    p.add_argument("--candidates", default=None, help="head spec of the search space (default: every head)")
    p.add_argument("--batch-size", type=int, default=8, help="candidates per batched pipeline call")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None)
    p.add_argument("--cache-dir", default=None, help="where per-image scores are appended (resume point)")
    p.add_argument("--resume", action="store_true", help="resume from --cache-dir (default: <out>.cache)")
    p.add_argument("--out", required=True, help="preset JSON to write")
    p.set_defaults(func=_cmd_search)


def _cmd_search(args, modules=None) -> int:
    from mixdit.batch import prompt_text_lines
    from mixdit.guidance.config import SearchConfig

    try:
        with open(args.prompts) as f:
            prompts = [prompt for _, prompt in prompt_text_lines(f.read())]
    except OSError as e:
        raise ConfigError("prompts", args.prompts, f"a readable text file with one prompt per line ({e})") from e
    cache_dir = args.cache_dir or (args.out + ".cache" if args.resume else None)
    if args.resume and cache_dir and not os.path.isdir(cache_dir):
        raise ConfigError("cache_dir", cache_dir, "an existing cache folder to resume from")
    config = SearchConfig(prompts=prompts, objective=args.objective, rounds=args.rounds, top_k=args.top_k,
                          samples=args.samples, steps=args.steps, seed=args.seed, scale=args.perturb_scale,
                          softpag=args.softpag, mode=args.perturb_mode, batch_size=args.batch_size,
                          candidates=args.candidates, height=args.height, width=args.width, cache_dir=cache_dir)
    config.validate()  # before the (slow) imports and model load
    from mixdit.distributed import process_state, relaunch_cpu_processes, requested_cpu_processes
    from mixdit.guidance.objectives import get_objective
    from mixdit.guidance.search import head_hunter, write_preset
    from mixdit.pipelines.zoo import load_pipeline

    n = requested_cpu_processes()
    if n > 1:  # `accelerate launch --cpu --num_processes N` without MPI starts one process
        return relaunch_cpu_processes(n)
    with process_state(args.device) as (state, device):
        pipe = load_pipeline(args.model, device=device, dtype=args.dtype)
        objective = get_objective(args.objective, model=args.objective_model, device=pipe.device)
        preset = head_hunter(pipe, config, objective, model_name=args.model, state=state)
        preset["objective"] = args.objective
        if state.is_main_process:
            write_preset(preset, args.out)
            print(args.out)
            print(f"heads: {preset['heads']}")
    return 0
