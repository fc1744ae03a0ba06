"""VMoBA's command-line flags: one ``--vmoba-<field>`` per :class:`VMoBAConfig` field, the same for ``mixdit
generate --vmoba`` and ``mixdit train vmoba`` (built without loading torch). The values are checked by the config
class itself, so the CLI, the UI and Python share one set of rules and error messages."""

from __future__ import annotations

import argparse
import dataclasses

from mixdit.attention.vmoba_config import EXACT_KERNELS, GRANULARITIES, ROUTER_PRECISIONS, SELECTIONS, VMoBAConfig

# short help per field; the long form is VMoBAConfig's docstring
FIELD_HELP = {
    "selection": " | ".join(SELECTIONS),
    "threshold": "tau in [0, 1]: the share of the normalised gate mass the selected blocks cover",
    "temporal_block": "1D blocks: latent frames",
    "spatial_block": "2D blocks: latent rows, cols",
    "spatiotemporal_block": "3D blocks: latent frames, rows, cols",
    "topk_temporal": "k of 1D layers with --vmoba-selection topk (own block included)",
    "topk_spatial": "k of 2D layers with --vmoba-selection topk",
    "topk_spatiotemporal": "k of 3D layers with --vmoba-selection topk",
    "dense_steps": "first denoising steps kept dense: a fraction < 1 or a whole count",
    "dense_layers": "layer indices always dense (none given: no layer)",
    "min_tokens": "layers with fewer video tokens run dense",
    "layer_cycle_start": "layer index of the first 1D layer of the 1D -> 2D -> 3D cycle",
    "q_tile": "query tile of the kernels: 64 | 128",
    "kv_tile": "key tile of the kernels: 16 | 32 | 64 | 128",
    "router_precision": "gate precision of the top-k / global router: " + " | ".join(ROUTER_PRECISIONS) + " | none",
    "tile_union_only": "APPROXIMATE: each row attends to its query tile's union of blocks (true | false)",
    "granularity": " | ".join(GRANULARITIES) + ": token is exact; query_tile (APPROXIMATE) selects once per query "
                   "tile and is faster",
    "max_tile_density": "dense-fallback rule: a layer runs dense when its kernel would compute more than this share "
                        "of the key tiles or is slower than dense; 1 turns the rule off",
    "kv_tile_spatiotemporal": "key tile of 3D layers: 16 | 32 | 64 | 128 | none (= --vmoba-kv-tile)",
    "exact_kernel": " | ".join(EXACT_KERNELS) + ": how the exact rule runs (auto: query tiles with sorted queries in "
                    "layers of <= 32 blocks, the hybrid of query tiles and key blocks in the others)",
}
_TUPLE_METAVARS = {"spatial_block": ("H", "W"), "spatiotemporal_block": ("T", "H", "W")}  # fixed length
_OPTIONAL_TYPES = {"router_precision": str, "kv_tile_spatiotemporal": int}  # default None; "none" gives it back
_GIVEN_NONE = object()  # "--vmoba-<optional field> none": None, as opposed to the flag not given


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def _optional(kind):
    def parse(text: str):
        if text.strip().lower() in ("", "none"):
            return _GIVEN_NONE
        try:
            return kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__} or none, got {text!r}") from None
    return parse


def add_vmoba_arguments(group, default_notes: dict | None = None) -> None:
    """``--vmoba-<field>`` (dest ``vmoba_<field>``, default None = the config's) for every :class:`VMoBAConfig` field;
    ``default_notes`` replaces the shown default of some fields (training's own defaults)."""
    for f in dataclasses.fields(VMoBAConfig):
        if f.name not in FIELD_HELP:
            raise RuntimeError(f"VMoBAConfig.{f.name} has no --vmoba flag help (FIELD_HELP)")
        shown = " ".join(map(str, f.default)) if isinstance(f.default, tuple) else str(f.default).lower()
        shown = (default_notes or {}).get(f.name, shown)
        kw = dict(dest=f"vmoba_{f.name}", default=None, help=f"{FIELD_HELP[f.name]} (default: {shown})")
        if f.name in _TUPLE_METAVARS:
            kw.update(type=int, nargs=len(_TUPLE_METAVARS[f.name]), metavar=_TUPLE_METAVARS[f.name])
        elif isinstance(f.default, tuple):
            kw.update(type=int, nargs="*", metavar="N")
        elif f.name in _OPTIONAL_TYPES:
            kw.update(type=_optional(_OPTIONAL_TYPES[f.name]), metavar="V")
        elif isinstance(f.default, bool):
            kw.update(type=_bool, metavar="BOOL")
        elif isinstance(f.default, (int, float)):
            kw.update(type=type(f.default), metavar="N")
        else:
            kw.update(metavar="NAME")
        group.add_argument(f"--vmoba-{f.name.replace('_', '-')}", **kw)


def vmoba_fields_from_args(args) -> dict:
    """The ``VMoBAConfig`` fields given on the command line (or set by the UI on the same namespace)."""
    fields = {}
    for f in dataclasses.fields(VMoBAConfig):
        value = getattr(args, f"vmoba_{f.name}", None)
        if value is None:
            continue
        if value is _GIVEN_NONE:
            value = None
        elif isinstance(value, list):
            value = tuple(value)
        if f.name == "dense_steps" and float(value) >= 1 and float(value).is_integer():
            value = int(value)  # a whole number of steps, not a fraction
        fields[f.name] = value
    return fields


def add_generate_arguments(parser) -> None:
    g = parser.add_argument_group("VMoBA sparse video attention (Wan, HunyuanVideo, CogVideoX)")
    g.add_argument("--vmoba", action="store_true", help="use VMoBA mixture-of-block attention")
    add_vmoba_arguments(g)


def features_from_args(args) -> dict:
    if not getattr(args, "vmoba", False):
        return {}
    return {"vmoba": VMoBAConfig(**vmoba_fields_from_args(args))}
