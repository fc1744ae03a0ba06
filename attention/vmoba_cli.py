"""``mixdit generate --vmoba`` flags (same field names as :class:`VMoBAConfig`)."""

from __future__ import annotations


def add_generate_arguments(parser) -> None:
    g = parser.add_argument_group("VMoBA sparse video attention (Wan, HunyuanVideo, CogVideoX)")
    g.add_argument("--vmoba", action="store_true", help="use VMoBA mixture-of-block attention")
    g.add_argument("--vmoba-selection", default=None, help="threshold | global | topk (default: threshold)")
    g.add_argument("--vmoba-granularity", default=None,
                   help="token (exact, default) | query_tile (approximate: one selection per query tile; faster)")
    g.add_argument("--vmoba-exact-kernel", default=None,
                   help="how the exact rule runs at inference: auto (default: query_tiles in layers of <= 32 blocks, "
                        "hybrid in the others) | hybrid (per query tile and block, query tiles where many rows "
                        "selected the block, key blocks elsewhere) | key_blocks (only selected pairs computed) "
                        "| query_tiles (query-tile kernel with per-row masks)")
    g.add_argument("--vmoba-threshold", type=float, default=None, help="tau in [0, 1] (default 0.25)")
    g.add_argument("--vmoba-dense-steps", type=float, default=None,
                   help="first steps kept dense: a fraction < 1 or a whole count (default 0.24)")
    g.add_argument("--vmoba-temporal-block", type=int, default=None, metavar="T", help="1D blocks: latent frames (default 2)")
    g.add_argument("--vmoba-spatial-block", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="2D blocks: latent rows, cols (default 3 4)")
    g.add_argument("--vmoba-spatiotemporal-block", type=int, nargs=3, default=None, metavar=("T", "H", "W"),
                   help="3D blocks: latent frames, rows, cols (default 4 6 4)")


def features_from_args(args) -> dict:
    if not getattr(args, "vmoba", False):
        return {}
    from mixdit.attention.vmoba_config import VMoBAConfig

    fields = {}
    if args.vmoba_selection is not None:
        fields["selection"] = args.vmoba_selection
    if args.vmoba_granularity is not None:
        fields["granularity"] = args.vmoba_granularity
    if args.vmoba_exact_kernel is not None:
        fields["exact_kernel"] = args.vmoba_exact_kernel
    if args.vmoba_threshold is not None:
        fields["threshold"] = args.vmoba_threshold
    if args.vmoba_dense_steps is not None:
        d = args.vmoba_dense_steps
        fields["dense_steps"] = int(d) if d >= 1 and float(d).is_integer() else float(d)
    if args.vmoba_temporal_block is not None:
        fields["temporal_block"] = args.vmoba_temporal_block
    if args.vmoba_spatial_block is not None:
        fields["spatial_block"] = tuple(args.vmoba_spatial_block)
    if args.vmoba_spatiotemporal_block is not None:
        fields["spatiotemporal_block"] = tuple(args.vmoba_spatiotemporal_block)
    return {"vmoba": VMoBAConfig(**fields)}
