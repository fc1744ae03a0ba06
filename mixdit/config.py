"""Validation helpers shared by every feature config (one place for the wording of errors)."""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

from .errors import ConfigError


def check_number(field: str, value: Any, lo: float | None = None, hi: float | None = None,
                 integer: bool = False, lo_open: bool = False) -> None:
    kind = "an integer" if integer else "a number"
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise ConfigError(field, value, _range_text(kind, lo, hi, lo_open))
    if (lo is not None and (value <= lo if lo_open else value < lo)) or (hi is not None and value > hi):
        raise ConfigError(field, value, _range_text(kind, lo, hi, lo_open))


def check_choice(field: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(field, value, "one of " + ", ".join(repr(c) for c in choices))


def check_int_tuple(field: str, value: Any, length: int, lo: int = 1) -> None:
    if (not isinstance(value, (tuple, list)) or len(value) != length
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= lo for v in value)):
        raise ConfigError(field, value, f"{length} integers each >= {lo}")


def _range_text(kind: str, lo, hi, lo_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"{kind} in {'(' if lo_open else '['}{lo}, {hi}]"
    if lo is not None:
        return f"{kind} {'>' if lo_open else '>='} {lo}"
    if hi is not None:
        return f"{kind} <= {hi}"
    return kind


def config_to_dict(config) -> dict:
    """A JSON-ready dict of a feature config (used for output metadata and presets)."""
    out = {}
    for f in dataclasses.fields(config):
        v = getattr(config, f.name)
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out
