"""VMoBA's settings and layer rules (no torch: the CLI builds its options from these without loading torch).

:class:`VMoBAConfig` (defaults = the published Wan2.1-T2V-1.3B configuration), the layer cycle
(:func:`layer_type_for`) and the dense rules (:func:`vmoba_dense_reason`, :func:`vmoba_fallback_reason`). The attention itself is in
:mod:`mixdit.attention.vmoba`, which re-exports these names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from mixdit.config import check_choice, check_int_tuple, check_number
from mixdit.errors import ConfigError

LAYER_TYPES = ("temporal", "spatial", "spatiotemporal")
SELECTIONS = ("threshold", "global", "topk")
ROUTER_PRECISIONS = ("tf32x3", "ieee", "tf32")
GRANULARITIES = ("token", "query_tile")
EXACT_KERNELS = ("auto", "hybrid", "key_blocks", "query_tiles")
# layers with at most this many blocks keep a row's selection in one int32 word; the query-tile kernel sorts
# their queries by it (mixdit.attention.vmoba._sorted_query_tile_call)
SORTED_QUERY_MAX_BLOCKS = 32
# exact_kernel="hybrid", per layer type: (query tile rows, min fill). A (query tile, block) pair goes to the query-tile
# kernel when at least `min fill` of the tile's rows selected the block, else to the key-block kernel
# (mixdit.kernels.key_block_attention); the query tile is at most VMoBAConfig.q_tile. H200, Wan-1.3B model q/k
# (session 13, benchmarks/results/hybrid-q-tile-session13-*.json): spatial (128, 0.5) 4.76 ms against (128, 0.375)
# 4.88 and 64-row tiles 6.4-8.0; 3D (64, 0.375) 7.33 against (128, 0.375) 7.55 (its 32-key forward launches 64-row
# programs anyway, and 64-row unions leave 19% of the pairs to the key blocks instead of 27%). Temporal layers take
# sorted query tiles unless exact_kernel="hybrid" is forced (session 11 measured 0.5-0.625 best there).
HYBRID_LAUNCH = {"temporal": (128, 0.5), "spatial": (128, 0.5), "spatiotemporal": (64, 0.375)}


@dataclass
class VMoBAConfig:
    """VMoBA settings. Defaults = the published Wan2.1-T2V-1.3B configuration.

    selection: ``"threshold"`` (per query token and head, the published default), ``"global"``
        (per sample and head over all (query, block) pairs) or ``"topk"``.
    threshold: share τ of the min-max normalised gate mass to cover (threshold/global).
    temporal_block / spatial_block / spatiotemporal_block: block shapes in latent-grid units
        after patchify (frames; (rows, cols); (frames, rows, cols)).
    topk_*: k per layer type for ``selection="topk"`` (own block included).
    dense_steps: first denoising steps kept dense: a float in [0, 1] is a fraction of the steps
        (0.24 = 12 of 50, FastVideo's ``first_full_step = 12``), an int is a count.
    dense_layers: layer indices always dense (Sparse-VideoGen/Radial keep layer 0 dense).
    min_tokens: below this many video tokens the layer runs dense. Why 4096: under ~4K tokens a
        dense cuDNN call costs < ~0.2 ms (H100, 12 heads) and the fixed router / gather / launch
        cost of the sparse path (~3 small kernels + 3 gathers) eats the saving, so VMoBA would
        be slower than dense. Re-calibrate with ``benchmarks/vmoba_attention.py``.
    layer_cycle_start: layer index that gets the first 1D partition of the 1D -> 2D -> 3D cycle.
    q_tile / kv_tile: tile sizes of the block-sparse kernel; every block is padded to whole
        key tiles.
    router_precision: ``tl.dot`` precision of the fp32 gate on GPU (``"tf32x3"`` ≈ fp32 on
        tensor cores; ``"ieee"`` exact and slower; ``"tf32"`` fastest, ~1e-3 relative error); None = ``"tf32x3"``.
        The per-token top-k / global router only: the threshold rule's gate is
        ``mixdit.kernels.block_router.token_gate`` (q times the means split into parts exact in bf16 / TF32,
        about fp32), ``query_tile``'s the same kernel on the tile mean queries (3xTF32).
    kv_tile_spatiotemporal: key tile for 3D layers only (None: ``kv_tile``). Default 32: 3D blocks are
        small (4x6x4 = 96 tokens), so 128-row tiles carry 33-60% padding; 32-row tiles carry almost none
        and made the 3D layers' kernel 1.4x faster (H200, Wan 1.3B and 14B, benchmarks/NOTES.md).
    tile_union_only: APPROXIMATE fast path, off by default: every query row attends to the union
        of the blocks selected by the rows of its query tile (skips the per-row bitmask test).
    granularity: ``"token"`` (default, exact: every query token and head selects its own blocks,
        as the paper and reference code do) or ``"query_tile"`` (APPROXIMATE, named option: one
        selection per query tile and head, from the tile's mean query, with every block the tile
        overlaps kept). Per-token selections of a 128-query tile cover almost every key tile, so
        the exact rule saves little compute; ``query_tile`` makes the computed tiles match the
        selected density. Its fidelity is measured in ``benchmarks/vmoba.py``.
    exact_kernel: how the exact per-token rule is computed. ``"auto"`` (default): layers of at most 32 blocks
        (1D layers at Wan sizes) take ``"query_tiles"`` with sorted queries, the others ``"hybrid"``.
        ``"key_blocks"``: each block attends to the queries that selected it, gathered into dense
        tiles, and each query's partial outputs are merged by log-sum-exp
        (:mod:`mixdit.kernels.key_block_attention`): only selected (query, key) pairs are computed, at the price
        of gathers and one partial output per (query, block) pair.
        ``"hybrid"``: per (query tile, block) pair the cheaper of the two: blocks that at least a
        share of the tile's rows selected run in the query-tile kernel (whole tiles, per-row masks), the others as
        key blocks; the results are merged by log-sum-exp (tile rows and share per layer type: ``HYBRID_LAUNCH``).
        ``"query_tiles"``: the block-sparse kernel over 128-query tiles with a per-row bitmask; it computes each
        tile's union of selections. In layers of at most 32 blocks each (sample, head)'s queries are first sorted
        by their selection (exact: only the order changes), so equal sets share tiles (1D at Wan-1.3B: 28% of
        the key tiles instead of 54%; 2D/3D selections are too diverse for any order to help,
        ``benchmarks/NOTES.md``). With gradients ``key_blocks`` and ``hybrid`` keep their forward and their
        backward is split the same way (:func:`mixdit.kernels.key_block_attention.hybrid_backward`). All are
        exact: the same selected keys, equal up to rounding.
    max_tile_density: the dense-fallback rule that keeps VMoBA from being slower than dense. On a
        layer's first sparse call and every 50 calls after (one host sync each time) the layer is
        measured; it then runs dense until the next measurement when the key tiles its selection
        makes the kernel compute exceed this share of all key tiles (sparsity cannot pay: router +
        per-row masks cost more than the skipped tiles save; break-even ≈ 0.5 for the exact rule)
        or, on a GPU, when the measuring call's sparse path (router + kernel, CUDA events) took
        longer than dense attention on the same inputs (timed in the same call; a layer's first,
        kernel-compiling call is not timed, its second is). 1.0 disables both.
    """

    selection: str = "threshold"
    threshold: float = 0.25
    temporal_block: int = 2
    spatial_block: tuple = (3, 4)
    spatiotemporal_block: tuple = (4, 6, 4)
    topk_temporal: int = 3
    topk_spatial: int = 20
    topk_spatiotemporal: int = 15
    dense_steps: float = 0.24
    dense_layers: tuple = (0,)
    min_tokens: int = 4096
    layer_cycle_start: int = 0
    q_tile: int = 128
    kv_tile: int = 128
    router_precision: Optional[str] = None
    tile_union_only: bool = False
    granularity: str = "token"
    max_tile_density: float = 0.5
    kv_tile_spatiotemporal: int | None = 32
    exact_kernel: str = "auto"

    def __post_init__(self):
        if isinstance(self.spatial_block, list):
            self.spatial_block = tuple(self.spatial_block)
        if isinstance(self.spatiotemporal_block, list):
            self.spatiotemporal_block = tuple(self.spatiotemporal_block)
        if isinstance(self.dense_layers, list):
            self.dense_layers = tuple(self.dense_layers)
        self.validate()

    def validate(self) -> None:
        check_choice("vmoba.selection", self.selection, SELECTIONS)
        check_number("vmoba.threshold", self.threshold, 0.0, 1.0)
        check_number("vmoba.temporal_block", self.temporal_block, 1, integer=True)
        check_int_tuple("vmoba.spatial_block", self.spatial_block, 2)
        check_int_tuple("vmoba.spatiotemporal_block", self.spatiotemporal_block, 3)
        for name in ("topk_temporal", "topk_spatial", "topk_spatiotemporal"):
            check_number(f"vmoba.{name}", getattr(self, name), 1, integer=True)
        if isinstance(self.dense_steps, float):
            check_number("vmoba.dense_steps", self.dense_steps, 0.0, 1.0)
        else:
            check_number("vmoba.dense_steps", self.dense_steps, 0, integer=True)
        if (not isinstance(self.dense_layers, tuple)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in self.dense_layers)):
            raise ConfigError("vmoba.dense_layers", self.dense_layers, "a tuple of layer indices >= 0")
        check_number("vmoba.min_tokens", self.min_tokens, 0, integer=True)
        check_number("vmoba.layer_cycle_start", self.layer_cycle_start, 0, integer=True)
        check_choice("vmoba.q_tile", self.q_tile, (64, 128))
        check_choice("vmoba.kv_tile", self.kv_tile, (16, 32, 64, 128))
        check_choice("vmoba.router_precision", self.router_precision, (None,) + ROUTER_PRECISIONS)
        check_choice("vmoba.kv_tile_spatiotemporal", self.kv_tile_spatiotemporal, (None, 16, 32, 64, 128))
        check_choice("vmoba.tile_union_only", self.tile_union_only, (False, True))
        check_choice("vmoba.granularity", self.granularity, GRANULARITIES)
        check_number("vmoba.max_tile_density", self.max_tile_density, 0.0, 1.0)
        check_choice("vmoba.exact_kernel", self.exact_kernel, EXACT_KERNELS)

    def block_shape(self, layer_type: str, grid) -> tuple:
        """Block shape (frames, rows, cols) in grid units for a layer type (before clipping)."""
        F_, Hh, W = grid
        if layer_type == "temporal":
            return (self.temporal_block, Hh, W)
        if layer_type == "spatial":
            return (F_, self.spatial_block[0], self.spatial_block[1])
        if layer_type == "spatiotemporal":
            return tuple(self.spatiotemporal_block)
        raise ConfigError("vmoba.layer_type", layer_type, "one of " + ", ".join(LAYER_TYPES))

    def topk_for(self, layer_type: str) -> int:
        return {"temporal": self.topk_temporal, "spatial": self.topk_spatial,
                "spatiotemporal": self.topk_spatiotemporal}[layer_type]

    def dense_step_count(self, num_steps: int) -> int:
        if isinstance(self.dense_steps, float):
            return int(math.ceil(self.dense_steps * num_steps - 1e-9))
        return int(self.dense_steps)


def layer_type_for(layer_index: int, config: VMoBAConfig) -> str:
    """``"temporal"`` (1D), ``"spatial"`` (2D) or ``"spatiotemporal"`` (3D) for a layer index."""
    return LAYER_TYPES[(int(layer_index) - config.layer_cycle_start) % 3]


def vmoba_dense_reason(config: VMoBAConfig, step_index: int | None, num_steps: int | None,
                       layer_index: int, num_tokens: int) -> str | None:
    """Why this call runs dense (``"dense_layers"``, ``"min_tokens"``, ``"dense_steps"``), or None.
    ``step_index``/``num_steps`` may be None (unknown step: only the layer and token rules apply)."""
    if layer_index in config.dense_layers:
        return "dense_layers"
    if num_tokens < config.min_tokens:
        return "min_tokens"
    if step_index is not None and num_steps is not None and step_index < config.dense_step_count(num_steps):
        return "dense_steps"
    return None


def vmoba_should_run_dense(config: VMoBAConfig, step_index: int | None, num_steps: int | None,
                           layer_index: int, num_tokens: int) -> bool:
    """Whether this call runs dense attention: a dense layer, a dense early step, or too few
    video tokens (``num_tokens < min_tokens``); see :func:`vmoba_dense_reason`."""
    return vmoba_dense_reason(config, step_index, num_steps, layer_index, num_tokens) is not None


def vmoba_fallback_reason(config: VMoBAConfig, tile_density: float | None, sparse_ms: float | None = None,
                          dense_ms: float | None = None) -> str | None:
    """The dense-fallback rule's verdict on one measured layer (``VMoBAConfig.max_tile_density``): ``"max_tile_density"``
    when its kernel computes more than that share of the key tiles, ``"slower_than_dense"`` when its sparse path
    (router + kernel) took longer than dense attention on the same inputs, else None (stay sparse). Off at
    ``max_tile_density >= 1``."""
    if config.max_tile_density >= 1.0:
        return None
    if tile_density is not None and tile_density > config.max_tile_density:
        return "max_tile_density"
    if sparse_ms is not None and dense_ms is not None and sparse_ms > dense_ms:
        return "slower_than_dense"
    return None
