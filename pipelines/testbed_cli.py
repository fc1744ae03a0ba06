"""``mixdit train testbed``: train the synthetic-shapes testbed models (CLI plug-in of :mod:`mixdit.cli`).

    mixdit train testbed --model video --out pipelines/testbed/weights/mixdit-shapes-video --steps 100000 --max-minutes 8
    mixdit train testbed --model image --out pipelines/testbed/weights/mixdit-shapes-image --steps 100000 --max-minutes 8
    mixdit train testbed --model mini-video --out /tmp/mini --steps 40 --device cpu     (CPU smoke test)

``train`` is shared with other trainers (``mixdit train vmoba``): whichever module registers first
creates the ``train`` command and later ones add their sub-command to it.
"""

from __future__ import annotations

import argparse

from mixdit.errors import ConfigError


def _train_subparsers(subparsers) -> argparse._SubParsersAction:
    """The ``train`` command's sub-command action, creating ``train`` if nobody has yet."""
    train = subparsers.choices.get("train")
    if train is None:
        train = subparsers.add_parser("train", help="train or fine-tune a model (train testbed|vmoba ...)")
    for action in train._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    return train.add_subparsers(dest="train_command", metavar="WHAT")


def register_commands(subparsers) -> None:
    from mixdit.pipelines.testbed.config import PRESETS, TestbedConfig

    p = _train_subparsers(subparsers).add_parser(
        "testbed", help="train a synthetic-shapes testbed model (Wan video / SD3 image)",
        description="Train a testbed model with flow matching on scenes rendered on the fly (accelerate; "
                    "bf16 on GPU). Saves a full diffusers pipeline folder plus testbed_config.json.")
    p.add_argument("--model", default="video", choices=list(PRESETS),
                   help="video (Wan, 13x64x64, 4096 tokens) | image (SD3, 64x64) | mini-* (CPU smoke tests)")
    p.add_argument("--out", required=True, help="output folder (a diffusers pipeline)")
    p.add_argument("--steps", type=int, default=20000, help="optimizer steps (default: 20000)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="stop (and save) before this much wall time has passed, whatever --steps says")
    p.add_argument("--batch-size", type=int, default=None, help="scenes per step per process (default: the preset's)")
    p.add_argument("--lr", "--learning-rate", dest="learning_rate", type=float, default=None)
    p.add_argument("--warmup-steps", type=int, default=None)
    p.add_argument("--ema-decay", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--high-noise-fraction", type=float, default=None,
                   help=f"share of each batch trained at noise levels drawn uniformly from "
                        f"[{TestbedConfig.high_noise_min}, 1), where "
                        "sampling decides layout and motion (default: the preset's; "
                        + ", ".join(f"{n} {c.high_noise_fraction:g}" for n, c in PRESETS.items()) + ")")
    p.add_argument("--sample-flow-shift", type=float, default=None,
                   help="noise-level shift of the saved scheduler (default: the preset's)")
    p.add_argument("--save-every", type=int, default=1000, help="save the pipeline every N steps (0: at the end only)")
    p.add_argument("--resume", action="store_true",
                   help="continue from the pipeline already in --out (time-limited runs add up)")
    p.add_argument("--pack-to", default=None, metavar="DIR",
                   help="after training, also write the folder as <name>.tar.NN parts of <= 15 MiB into DIR "
                        "(the device machine returns at most 8 files of 16 MiB); unpack with "
                        "`python -m mixdit.pipelines.testbed.ship unpack DIR NAME DEST`")
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--mixed-precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default: bf16 on GPU, no on CPU")
    p.set_defaults(func=_cmd_train_testbed)


def _cmd_train_testbed(args, modules=None) -> int:
    from mixdit.pipelines.testbed.config import preset
    from mixdit.pipelines.testbed.train import train_testbed

    if args.steps < 1:
        raise ConfigError("steps", args.steps, "an integer >= 1")
    if args.max_minutes is not None and args.max_minutes <= 0:
        raise ConfigError("max_minutes", args.max_minutes, "a positive number of minutes")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        raise ConfigError("device", args.device, "auto, cpu or cuda")
    config = preset(args.model, batch_size=args.batch_size, learning_rate=args.learning_rate,
                    warmup_steps=args.warmup_steps, ema_decay=args.ema_decay, seed=args.seed,
                    high_noise_fraction=args.high_noise_fraction, sample_flow_shift=args.sample_flow_shift)
    record = train_testbed(config, args.out, args.steps, max_minutes=args.max_minutes,
                           save_every=args.save_every or None, log_every=args.log_every,
                           device=None if args.device == "auto" else args.device,
                           mixed_precision=args.mixed_precision, resume=args.resume)
    print(f"trained {record['steps']} steps in {record['seconds']} s, final loss {record['final_loss']}: {args.out}")
    if args.pack_to:
        from mixdit.pipelines.testbed.ship import pack

        for part in pack(args.out, args.pack_to):
            print(part)
    return 0


def main(argv=None) -> int:
    """Standalone entry (``python -m mixdit.pipelines.testbed_cli train testbed ...``) for machines where
    ``mixdit.cli`` does not list this module yet."""
    import sys

    from mixdit.errors import MixditError

    parser = argparse.ArgumentParser(prog="python -m mixdit.pipelines.testbed_cli")
    register_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except MixditError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
