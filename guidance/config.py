"""Head perturbation guidance settings (:class:`GuidanceConfig`), presets and the HeadHunter search settings
(:class:`SearchConfig`), without torch: the CLI checks its options without loading torch. The feature is
:mod:`mixdit.guidance.perturbation` and the search :mod:`mixdit.guidance.search`; both re-export these names."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mixdit.config import check_choice, check_number, config_to_dict
from mixdit.errors import ConfigError
from mixdit.guidance.heads import format_heads, parse_spec

MODES = ("identity", "identity_image", "uniform", "mean_query")


@dataclass
class GuidanceConfig:
    """Head perturbation guidance settings (field names = CLI flags = preset keys).

    heads:  head spec (``"L13H18,L14H*,L2"``) or (layer, head) pairs, adapter layer numbering.
    scale:  perturbation guidance scale ``s`` (0 = off: the pipeline runs exactly as without it).
    softpag: strength ``u`` in [0, 1] of A -> (1-u) A + u P (1 = full PAG; 0 = no perturbation).
    mode:   ``identity`` | ``identity_image`` | ``uniform`` | ``mean_query``.
    window: (start, stop) fractions of the denoising steps where ``s`` applies.
    shared_prefix: run blocks before the first perturbed layer once for cond + perturbed rows.
    cfg_scale: the CFG scale the pipeline applies to the cond rows, when it cannot be read from the
        pipeline (None = detect: SD3/Wan ``guidance_scale``, FLUX ``true_cfg_scale``; 1 = no CFG).
    """

    heads: Any = "L13"
    scale: float = 3.0
    softpag: float = 1.0
    mode: str = "identity"
    window: tuple[float, float] = (0.0, 1.0)
    shared_prefix: bool = True
    cfg_scale: float | None = None

    def validate(self) -> None:
        parse_spec(self.heads, "guidance.heads")
        check_number("guidance.scale", self.scale, 0.0, 1000.0)
        check_number("guidance.softpag", self.softpag, 0.0, 1.0)
        check_choice("guidance.mode", self.mode, MODES)
        w = self.window
        if (not isinstance(w, (tuple, list)) or len(w) != 2
                or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in w)
                or not 0.0 <= w[0] < w[1] <= 1.0):
            raise ConfigError("guidance.window", w, "(start, stop) fractions of the steps with 0 <= start < stop <= 1")
        if not isinstance(self.shared_prefix, bool):
            raise ConfigError("guidance.shared_prefix", self.shared_prefix, "True or False")
        if self.cfg_scale is not None:
            check_number("guidance.cfg_scale", self.cfg_scale, 0.0, 1000.0, lo_open=True)

    def to_dict(self) -> dict:
        d = config_to_dict(self)
        if not isinstance(self.heads, str):
            d["heads"] = format_heads(parse_spec(self.heads))
        return d


def load_preset(path) -> dict:
    """A HeadHunter preset JSON (see :mod:`mixdit.guidance.search`)."""
    import json

    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError("guidance.heads", str(path), f"a readable preset JSON file ({e})") from e
    if not isinstance(data, dict) or "heads" not in data:
        raise ConfigError("guidance.heads", str(path), "a preset JSON object with a 'heads' field")
    return data


def config_from_preset(path, **overrides) -> GuidanceConfig:
    """``GuidanceConfig`` from a preset file (heads, softpag, scale, mode), with ``overrides``."""
    data = load_preset(path)
    fields = {k: data[k] for k in ("heads", "scale", "softpag", "mode") if k in data}
    fields.update({k: v for k, v in overrides.items() if v is not None})
    cfg = GuidanceConfig(**fields)
    cfg.validate()
    return cfg


@dataclass
class SearchConfig:
    """Settings of one HeadHunter search (field names = ``mixdit heads search`` flags)."""

    prompts: list[str]
    objective: Any = "pickscore"
    rounds: int = 1
    top_k: int = 24
    samples: int = 20  # prompt-seed pairs per candidate (prompts cycled, seeds seed, seed+1, ...)
    steps: int = 20
    seed: int = 0
    scale: float = 3.0
    softpag: float = 1.0
    mode: str = "identity"
    batch_size: int = 8  # candidates per batched pipeline call (1 = one candidate per pass)
    candidates: Any = None  # head spec of the search space (None = every head)
    height: int | None = None
    width: int | None = None
    cache_dir: str | None = None
    pipeline_kwargs: dict = field(default_factory=dict)  # extra pipeline call arguments (frames, ...)

    def validate(self) -> None:
        if not isinstance(self.prompts, (list, tuple)) or not self.prompts or not all(
                isinstance(p, str) and p.strip() for p in self.prompts):
            raise ConfigError("search.prompts", self.prompts, "a non-empty list of non-empty prompts")
        for name, lo in (("rounds", 1), ("top_k", 1), ("samples", 1), ("steps", 1), ("batch_size", 1)):
            check_number(f"search.{name}", getattr(self, name), lo, None, integer=True)
        check_number("search.seed", self.seed, 0, None, integer=True)
        check_number("search.scale", self.scale, 0.0, 1000.0, lo_open=True)
        check_number("search.softpag", self.softpag, 0.0, 1.0, lo_open=True)
        check_choice("search.mode", self.mode, MODES)
