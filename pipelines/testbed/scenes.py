"""Synthetic scenes for the testbed models: one coloured shape on a plain background.

Images: a shape in one cell of a 3x3 grid. Videos: a shape moving left/right/up/down, slowly or
quickly. Every scene has a caption built from a fixed vocabulary, e.g.

    "a red circle in the top left on a white background"          (image)
    "a blue triangle moving up quickly on a gray background"       (video)

Scenes are drawn from a seed (``sample_scene(seed, video=...)``, numpy ``default_rng``) and rendered
on the fly in torch (``render``), batched, on any device, with optional anti-aliasing (pixel
coverage from a signed distance, ``clamp(0.5 - d, 0, 1)``). No dataset files.

Geometry (fractions of the frame side, so scenes look the same at any size): every shape has the
bounding box ``[c - h, c + h]^2`` with ``h`` the half extent (0.125 +- 10%): a circle of radius
``h`` (bounding-box fill pi/4), an axis-aligned square (fill 1), an upward isosceles triangle
(fill 1/2). Image positions are the 3x3 cell centres (1/6, 1/2, 5/6) +- 0.03. A video moves the
shape by 0.2 (slowly) or 0.45 (quickly) of the frame over the whole clip, at constant speed, and
the whole path stays inside the frame.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

# Object colours (RGB 0-255): far apart from each other and from every background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (255, 140, 0),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0),
    "white": (255, 255, 255),
    "gray": (128, 128, 128),
    "brown": (110, 70, 40),
}
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")

HALF_EXTENT = 0.125  # shape half extent (fraction of the frame side), +- SIZE_JITTER
SIZE_JITTER = 0.1
CELL_JITTER = 0.03
TRAVEL = {"slowly": 0.2, "quickly": 0.45}  # displacement over the whole clip (fraction of the side)
MARGIN = 0.02

ATTRIBUTES_IMAGE = ("color", "shape", "background", "position")
ATTRIBUTES_VIDEO = ("color", "shape", "background", "direction", "speed")


@dataclass(frozen=True)
class Scene:
    """One scene. ``x``/``y`` are the shape's centre at the first frame (fractions, y down)."""

    shape: str
    color: str
    background: str
    x: float
    y: float
    half_extent: float = HALF_EXTENT
    row: str | None = None  # images: grid cell of the centre
    column: str | None = None
    direction: str | None = None  # videos
    speed: str | None = None

    @property
    def is_video(self) -> bool:
        return self.direction is not None

    def caption(self) -> str:
        article = "an" if self.color[0] in "aeiou" else "a"
        if self.is_video:
            where = f"moving {self.direction} {self.speed}"
        else:
            where = f"in the {position_words(self.row, self.column)}"
        return f"{article} {self.color} {self.shape} {where} on a {self.background} background"

    def attributes(self) -> dict[str, str]:
        out = {"color": self.color, "shape": self.shape, "background": self.background}
        if self.is_video:
            out.update(direction=self.direction, speed=self.speed)
        else:
            out["position"] = f"{self.row} {self.column}"
        return out

    def center_at(self, t: float) -> tuple[float, float]:
        """Centre at clip time ``t`` in [0, 1] (0 = first frame, 1 = last)."""
        if not self.is_video:
            return self.x, self.y
        dx, dy = _unit(self.direction)
        d = TRAVEL[self.speed] * t
        return self.x + dx * d, self.y + dy * d

    def to_dict(self) -> dict:
        return asdict(self)


def position_words(row: str, column: str) -> str:
    """"top left", "middle right", "center" (middle center), ..."""
    if row == "middle" and column == "center":
        return "center"
    return f"{row} {column}"


def _unit(direction: str) -> tuple[int, int]:
    return {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}[direction]


def sample_scene(seed: int | np.random.Generator, video: bool) -> Scene:
    """A random scene, a pure function of ``seed`` (an int or a numpy Generator to draw from)."""
    rng = np.random.default_rng(seed) if not isinstance(seed, np.random.Generator) else seed
    shape = SHAPES[rng.integers(len(SHAPES))]
    color = list(COLORS)[rng.integers(len(COLORS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    h = HALF_EXTENT * (1 + SIZE_JITTER * rng.uniform(-1, 1))
    if not video:
        r, c = int(rng.integers(3)), int(rng.integers(3))
        x = (2 * c + 1) / 6 + CELL_JITTER * rng.uniform(-1, 1)
        y = (2 * r + 1) / 6 + CELL_JITTER * rng.uniform(-1, 1)
        return Scene(shape, color, background, float(x), float(y), float(h), row=ROWS[r], column=COLUMNS[c])
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    speed = SPEEDS[rng.integers(len(SPEEDS))]
    lo, hi = h + MARGIN, 1 - h - MARGIN
    travel = TRAVEL[speed]
    dx, dy = _unit(direction)
    along = rng.uniform(lo, hi - travel)  # start so that start and end are both inside
    across = rng.uniform(lo, hi)
    if dx:
        x, y = (along if dx > 0 else 1 - along), across
    else:
        x, y = across, (along if dy > 0 else 1 - along)
    return Scene(shape, color, background, float(x), float(y), float(h), direction=direction, speed=speed)


def sample_scenes(seed: int, count: int, video: bool) -> list[Scene]:
    rng = np.random.default_rng(seed)
    return [sample_scene(rng, video) for _ in range(count)]


# ----------------------------------------------------------------------------------------------
# rendering
# ----------------------------------------------------------------------------------------------
def shape_distance(shape: str, px: torch.Tensor, py: torch.Tensor, cx, cy, h) -> torch.Tensor:
    """Signed distance (negative inside) from points to a shape, in the units of the inputs.

    For the square and triangle it is the max of the edges' signed distances: exact inside and
    near the edges (all that anti-aliasing needs)."""
    dx, dy = px - cx, py - cy
    if shape == "circle":
        return torch.sqrt(dx * dx + dy * dy) - h
    if shape == "square":
        return torch.maximum(dx.abs(), dy.abs()) - h
    if shape == "triangle":  # apex (cx, cy - h), base corners (cx -+ h, cy + h)
        s5 = math.sqrt(5.0)
        bottom = dy - h
        left = (-2 * (dx + h) - (dy - h)) / s5
        right = (2 * (dx - h) - (dy - h)) / s5
        return torch.maximum(bottom, torch.maximum(left, right))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def shape_coverage(shape: str, size: int, cx: float, cy: float, h: float, *, antialias: bool = True,
                   device=None) -> torch.Tensor:
    """``[size, size]`` coverage in [0, 1] of a shape given in frame fractions."""
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5)
    py, px = coords[:, None], coords[None, :]
    d = shape_distance(shape, px, py, cx * size, cy * size, h * size)
    return (0.5 - d).clamp(0, 1) if antialias else (d <= 0).float()


def render(scenes: list[Scene], size: int = 64, num_frames: int = 1, *, antialias: bool = True,
           device=None) -> torch.Tensor:
    """Render scenes: ``[B, 3, H, W]`` (``num_frames == 1``) or ``[B, 3, F, H, W]``, floats in [0, 1].

    Vectorised over scenes and frames (one pass per shape kind), so a training batch renders on
    the GPU in a few milliseconds. A video scene rendered with ``num_frames == 1`` gives its first frame."""
    n = len(scenes)
    ts = [f / (num_frames - 1) if num_frames > 1 else 0.0 for f in range(num_frames)]
    centers = torch.tensor([[s.center_at(t) for t in ts] for s in scenes], dtype=torch.float32,
                           device=device) * size  # [B, F, 2]
    half = torch.tensor([s.half_extent for s in scenes], dtype=torch.float32, device=device).view(n, 1, 1, 1) * size
    fg = torch.tensor([COLORS[s.color] for s in scenes], dtype=torch.float32, device=device) / 255
    bg = torch.tensor([BACKGROUNDS[s.background] for s in scenes], dtype=torch.float32, device=device) / 255
    coords = torch.arange(size, device=device, dtype=torch.float32) + 0.5
    py, px = coords.view(1, 1, size, 1), coords.view(1, 1, 1, size)
    cx, cy = centers[..., 0, None, None], centers[..., 1, None, None]  # [B, F, 1, 1]
    d = torch.empty(n, num_frames, size, size, device=device)
    for shape in SHAPES:
        idx = [i for i, s in enumerate(scenes) if s.shape == shape]
        if idx:
            ii = torch.tensor(idx, device=device)
            d[ii] = shape_distance(shape, px, py, cx[ii], cy[ii], half[ii])
    a = (0.5 - d).clamp(0, 1) if antialias else (d <= 0).float()
    a = a[:, None]  # [B, 1, F, H, W]
    out = bg.view(n, 3, 1, 1, 1) * (1 - a) + fg.view(n, 3, 1, 1, 1) * a
    return out[:, :, 0] if num_frames == 1 else out


# ----------------------------------------------------------------------------------------------
# captions
# ----------------------------------------------------------------------------------------------
def vocabulary() -> list[str]:
    """Every word a caption can use (the testbed tokenizer's vocabulary, in a fixed order)."""
    words = ["a", "an", "in", "the", "on", "background", "moving", "center"]
    words += list(COLORS) + [b for b in BACKGROUNDS if b not in COLORS] + list(SHAPES)
    words += [r for r in ROWS] + [c for c in COLUMNS if c not in words] + [d for d in DIRECTIONS if d not in COLUMNS]
    words += list(SPEEDS)
    out: list[str] = []
    for w in words:
        if w not in out:
            out.append(w)
    return out


def parse_caption(text: str) -> dict[str, str]:
    """Attributes named by a caption (the inverse of :meth:`Scene.caption`); missing ones are left out.

    The object's colour is the first colour word, the background's the colour word right before
    ``background``; ``center`` alone means ``middle center``."""
    words = [w.strip(".,;:!?").lower() for w in text.split()]
    out: dict[str, str] = {}
    if "background" in words:
        i = words.index("background")
        if i > 0 and words[i - 1] in BACKGROUNDS:
            out["background"] = words[i - 1]
        words_obj = words[: max(i - 1, 0)]
    else:
        words_obj = words
    for w in words_obj:
        if w in COLORS and "color" not in out:
            out["color"] = w
        elif w in SHAPES and "shape" not in out:
            out["shape"] = w
    if "moving" in words_obj:
        i = words_obj.index("moving")
        rest = words_obj[i + 1:]
        if rest and rest[0] in DIRECTIONS:
            out["direction"] = rest[0]
        for w in rest:
            if w in SPEEDS:
                out["speed"] = w
    elif "in" in words_obj:
        rest = words_obj[words_obj.index("in") + 1:]
        rest = [w for w in rest if w not in ("the", "on", "a", "an")]
        if rest[:1] == ["center"]:
            out["position"] = "middle center"
        elif len(rest) >= 2 and rest[0] in ROWS and rest[1] in COLUMNS:
            out["position"] = f"{rest[0]} {rest[1]}"
    return out
