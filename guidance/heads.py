"""Attention-head specs: ``"L13H18,L14H*,L2"`` <-> a sorted tuple of (layer, head) pairs.

Grammar (comma separated, spaces ignored, case-insensitive):

* ``L13H18`` - head 18 of layer 13;
* ``L14H*`` or ``L14`` - every head of layer 14;
* ``L3-5`` / ``L3-5H0`` - a layer range (inclusive).

Layers use each family adapter's numbering (``mixdit.pipelines.adapters``): SD3 joint blocks;
FLUX 19 double-stream then 38 single-stream blocks as one index (0..56); Wan blocks.
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

from mixdit.errors import ConfigError

Head = tuple[int, int]
ALL = -1  # "every head" placeholder before the head count is known

_ITEM = re.compile(r"^L(\d+)(?:-(\d+))?(?:H(\d+|\*))?$", re.IGNORECASE)
_SYNTAX = "a head spec like 'L13H18,L14H*,L2' (L<layer>[H<head>|H*], layer ranges 'L3-5')"


def parse_spec(spec, field: str = "guidance.heads") -> tuple[Head, ...]:
    """Syntax-only parse: (layer, head) pairs with ``head == ALL`` for whole layers.

    Accepts a spec string, or a sequence of spec strings / ``(layer, head)`` pairs
    (``head`` may be ``"*"``/None/-1 for a whole layer)."""
    items: list[Head] = []
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if not any(parts):
            raise ConfigError(field, spec, _SYNTAX + " (got an empty spec)")
        for part in parts:
            if not part:
                raise ConfigError(field, spec, _SYNTAX + " (empty item between commas)")
            m = _ITEM.match(part.replace(" ", ""))
            if not m:
                raise ConfigError(field, spec, f"{_SYNTAX}; {part!r} does not parse")
            lo = int(m.group(1))
            hi = int(m.group(2)) if m.group(2) is not None else lo
            if hi < lo:
                raise ConfigError(field, spec, f"{_SYNTAX}; layer range {part!r} runs backwards")
            head = ALL if m.group(3) in (None, "*") else int(m.group(3))
            items += [(layer, head) for layer in range(lo, hi + 1)]
        return tuple(items)
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ConfigError(field, spec, _SYNTAX + " (got an empty list)")
        for item in spec:
            if isinstance(item, str):
                items += parse_spec(item, field)
            elif (isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], int)
                  and not isinstance(item[0], bool)):
                head = item[1]
                if head in ("*", None, ALL):
                    head = ALL
                elif not isinstance(head, int) or isinstance(head, bool) or head < 0:
                    raise ConfigError(field, spec, f"(layer, head) pairs with integer heads; got {item!r}")
                if item[0] < 0:
                    raise ConfigError(field, spec, f"(layer, head) pairs with layers >= 0; got {item!r}")
                items.append((item[0], head))
            else:
                raise ConfigError(field, spec, f"{_SYNTAX}, or (layer, head) pairs; got {item!r}")
        return tuple(items)
    raise ConfigError(field, spec, _SYNTAX + ", or a list of (layer, head) pairs")


def resolve_heads(spec, num_layers: int, num_heads: int | Sequence[int], field: str = "guidance.heads",
                  family: str = "") -> tuple[Head, ...]:
    """Parse ``spec`` and check it against a model: sorted unique (layer, head) pairs.

    ``num_heads`` is one count for every layer or a per-layer sequence. Out of range raises
    :class:`ConfigError` naming the spec, the bad layer/head and the valid range."""
    heads_of = (lambda layer: num_heads) if isinstance(num_heads, int) else (lambda layer: num_heads[layer])
    where = f" for {family}" if family else ""
    out: set[Head] = set()
    for layer, head in parse_spec(spec, field):
        if not 0 <= layer < num_layers:
            raise ConfigError(field, spec, f"layers 0..{num_layers - 1}{where}; layer {layer} is out of range")
        n = heads_of(layer)
        if head == ALL:
            out.update((layer, h) for h in range(n))
        elif not 0 <= head < n:
            raise ConfigError(field, spec, f"heads 0..{n - 1} in layer {layer}{where}; head {head} is out of range")
        else:
            out.add((layer, head))
    return tuple(sorted(out))


def format_heads(heads: Iterable[Head], num_heads: int | Sequence[int] | None = None) -> str:
    """Inverse of :func:`resolve_heads`: whole layers written ``L2`` when ``num_heads`` is given."""
    by_layer: dict[int, set[int]] = {}
    for layer, head in heads:
        by_layer.setdefault(layer, set()).add(head)
    parts = []
    for layer in sorted(by_layer):
        hs = by_layer[layer]
        n = None if num_heads is None else (num_heads if isinstance(num_heads, int) else num_heads[layer])
        if ALL in hs or (n is not None and hs == set(range(n))):
            parts.append(f"L{layer}")
        else:
            parts += [f"L{layer}H{h}" for h in sorted(hs)]
    return ",".join(parts)


def head_counts(adapter, model) -> list[int]:
    """Number of heads of each layer (adapter numbering)."""
    return [int(site.module.heads) for site in adapter.attention_sites(model)]
