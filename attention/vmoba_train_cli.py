"""``mixdit train vmoba``: its command-line options (built from :class:`~mixdit.attention.vmoba_train_config.TrainConfig`
and :class:`~mixdit.attention.vmoba_config.VMoBAConfig` without loading torch) and the command, which runs
:func:`mixdit.attention.vmoba_train.train_vmoba`."""

from __future__ import annotations

import os

from mixdit.attention.vmoba_cli import add_vmoba_arguments, vmoba_fields_from_args
from mixdit.attention.vmoba_train_config import (EXPERTS, MIXED_PRECISIONS, TIMESTEP_SAMPLINGS,
                                                 TRAINING_VMOBA_DEFAULTS, TrainConfig)


def register_commands(subparsers) -> None:
    """``mixdit train vmoba ...`` (the CLI plug-in contract of :mod:`mixdit.cli`)."""
    train = subparsers.add_parser("train", help="train or fine-tune a model (train vmoba ...)")
    train_sub = train.add_subparsers(dest="train_command", metavar="WHAT")
    p = train_sub.add_parser(
        "vmoba", help="continue training a video DiT's transformer with VMoBA attention",
        description="Continue training a video DiT's transformer (Wan family) with VMoBA applied, on videos, "
                    "pre-encoded latents or synthetic:N data. Works under `accelerate launch` (one or many "
                    "processes). Saves OUT/<expert> (+ the full pipeline in OUT).")
    d = TrainConfig()
    p.add_argument("--model", default=d.model, help=f"built-in name, pipeline folder, hub id or transformer folder (default: {d.model})")
    p.add_argument("--data", required=True, help="synthetic:N | a folder of videos (mp4/gif...) | a folder of .pt/.safetensors latents")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--expert", default=d.expert, choices=EXPERTS, help="which denoiser to train (Wan 2.2: transformer = high noise)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"optimizer steps (default: {d.steps})")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=d.learning_rate,
                   help=f"AdamW learning rate (default: {d.learning_rate})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per process per micro-step")
    p.add_argument("--gradient-accumulation-steps", type=int, default=d.gradient_accumulation_steps)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--height", type=int, default=None, help="clip height in pixels (videos, synthetic)")
    p.add_argument("--width", type=int, default=None, help="clip width in pixels")
    p.add_argument("--frames", type=int, default=None, help="frames per clip (4k+1)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="also save OUT/checkpoint-<step> every N steps (0: end only)")
    p.add_argument("--mixed-precision", default=d.mixed_precision, choices=MIXED_PRECISIONS)
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute each block in the backward; attention outputs are kept, not recomputed")
    p.add_argument("--recompute-attention", action="store_true",
                   help="with --gradient-checkpointing: recompute attention too (less memory, slower)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="0 disables clipping")
    p.add_argument("--timestep-sampling", default=d.timestep_sampling, choices=TIMESTEP_SAMPLINGS)
    p.add_argument("--flow-shift", type=float, default=None, help="sigma shift (default: the pipeline scheduler's, else 3.0)")
    p.add_argument("--max-sequence-length", type=int, default=d.max_sequence_length, help="text tokens when encoding prompts")
    p.add_argument("--cache-dir", default=None, help="where encoded videos/prompts are cached (default: OUT/cache)")
    p.add_argument("--cpu", action="store_true", help="train on the CPU even if a GPU is present")
    p.add_argument("--num-workers", type=int, default=d.num_workers, help="DataLoader workers")
    p.add_argument("--no-vmoba", action="store_true", help="train with dense attention (the baseline)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--record-samples", default=None, help=argparse_suppress())
    group = p.add_argument_group("VMoBA", "any VMoBAConfig field (default: its defaults)")
    add_vmoba_arguments(group, {name: f"{value} in training" for name, value in TRAINING_VMOBA_DEFAULTS.items()})
    p.set_defaults(func=_cmd_train_vmoba)
    train.set_defaults(func=lambda args, modules: (train.print_help(), 2)[1])


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


def config_from_args(args) -> TrainConfig:
    vmoba = None if args.no_vmoba else vmoba_fields_from_args(args)
    return TrainConfig(
        model=args.model, data=args.data, out=args.out, expert=args.expert, steps=args.steps,
        learning_rate=args.learning_rate, batch_size=args.batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, seed=args.seed, height=args.height,
        width=args.width, frames=args.frames, vmoba=vmoba, save_every=args.save_every,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing,
        recompute_attention=args.recompute_attention,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, timestep_sampling=args.timestep_sampling,
        flow_shift=args.flow_shift, max_sequence_length=args.max_sequence_length, cache_dir=args.cache_dir,
        cpu=args.cpu, num_workers=args.num_workers, record_samples=args.record_samples, progress=not args.no_progress)


def _cmd_train_vmoba(args, modules) -> int:
    config = config_from_args(args)
    config.validate()  # before anything heavy
    from mixdit.distributed import relaunch_cpu_processes, requested_cpu_processes

    n = requested_cpu_processes()
    if n > 1:
        return relaunch_cpu_processes(n)
    from mixdit.attention.vmoba_train import train_vmoba

    metrics = train_vmoba(config)
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0) == 0:
        losses = metrics["losses"]
        k = max(1, min(5, len(losses) // 2))
        head, tail = sum(losses[:k]) / k, sum(losses[-k:]) / k
        print(f"trained {metrics['steps']} steps on {metrics['world_size']} process(es): loss {head:.4f} -> {tail:.4f} "
              f"(mean of first/last {k}), {metrics['samples_per_second']:.2f} samples/s")
        print(metrics["out"])
    return 0
