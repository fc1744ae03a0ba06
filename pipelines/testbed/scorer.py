"""A deterministic scene detector (no learned model) and image/video similarity metrics.

``detect(frames)`` finds the one shape of a testbed scene and reads its attributes:

* background: the median colour of a 2-pixel border ring, nearest background palette colour;
* foreground: pixels farther than 0.25 (RGB in [0, 1]) from the background; no object when they
  cover less than 0.5% or more than 40% of the frame (noise, an empty frame);
* colour: the median of the core foreground pixels (the farther half), nearest object palette colour;
* shape: coverage ``alpha`` = projection of each pixel onto the background->object colour line;
  the bounding box of the largest connected region of ``alpha > 0.5`` (so stray specks and streaks
  apart from the object do not stretch it) gives a first centre and half extent; each shape is
  rendered (:func:`~mixdit.pipelines.testbed.scenes.shape_coverage`) at that estimate and at nearby
  ones (half extent down to 80%, centre +-1 pixel: a streak touching the object still stretches the
  box) and the best soft IoU over all candidates wins (bounding-box fill ratios: circle pi/4,
  square 1, triangle 1/2);
* position: the cell of the coverage-weighted centroid in a 3x3 grid;
* videos: direction = dominant axis of the centroid displacement from the first to the last frame
  with an object (none if it moved less than 5% of the frame), speed = displacement vs the
  midpoint of the two scene speeds (0.2 and 0.45 of the frame over the clip); colour, shape and
  background are the majority over frames.

``score(frames_list, prompts)`` compares detections with the attributes parsed from each prompt and
returns accuracy per attribute. ``psnr`` and ``ssim`` (Gaussian window 11, sigma 1.5, valid
region, K1 = 0.01, K2 = 0.03, mean over channels and frames) compare two generations.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F

from mixdit.pipelines.testbed.scenes import (BACKGROUNDS, COLORS, COLUMNS, ROWS, SHAPES, TRAVEL, parse_caption,
                                             shape_coverage)

FOREGROUND_THRESHOLD = 0.25
MIN_OBJECT_FRACTION = 0.005
MAX_OBJECT_FRACTION = 0.40
MIN_MOTION = 0.05

_OBJ = np.array(list(COLORS.values()), dtype=np.float32) / 255
_BG = np.array(list(BACKGROUNDS.values()), dtype=np.float32) / 255


def as_frames(x) -> np.ndarray:
    """PIL image, list of PIL images, ``[H, W, 3]``, ``[F, H, W, 3]`` (numpy/torch, uint8 or floats
    in [0, 1]) or torch ``[3, H, W]`` / ``[3, F, H, W]`` -> float32 numpy ``[F, H, W, 3]`` in [0, 1]."""
    if isinstance(x, (list, tuple)):
        return np.concatenate([as_frames(i) for i in x])
    if hasattr(x, "convert") and hasattr(x, "size"):  # PIL
        x = np.asarray(x.convert("RGB"))
    if torch.is_tensor(x):
        x = x.detach().float().cpu()
        if x.shape[0] == 3 and x.ndim in (3, 4):  # channels first
            x = x.permute(*range(1, x.ndim), 0)
        x = x.numpy()
    x = np.asarray(x)
    if x.dtype == np.uint8:
        x = x.astype(np.float32) / 255
    x = x.astype(np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"expected frames [F, H, W, 3], got shape {x.shape}")
    return x


def _nearest(color: np.ndarray, palette: np.ndarray, names) -> str:
    return list(names)[int(np.argmin(((palette - color) ** 2).sum(-1)))]


def detect_frame(frame: np.ndarray, with_shape: bool = True) -> dict:
    """Attributes of one ``[H, W, 3]`` frame in [0, 1]: background, and (if an object is found)
    color, shape, position, centroid ``(x, y)`` in frame fractions."""
    h, w, _ = frame.shape
    ring = np.concatenate([frame[:2].reshape(-1, 3), frame[-2:].reshape(-1, 3),
                           frame[:, :2].reshape(-1, 3), frame[:, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    out: dict = {"background": _nearest(bg, _BG, BACKGROUNDS)}
    dist = np.sqrt(((frame - bg) ** 2).sum(-1))
    fg = dist > FOREGROUND_THRESHOLD
    frac = fg.mean()
    if frac < MIN_OBJECT_FRACTION or frac > MAX_OBJECT_FRACTION:
        return out
    core = fg & (dist >= np.median(dist[fg]))
    obj = np.median(frame[core], axis=0)
    out["color"] = _nearest(obj, _OBJ, COLORS)
    axis = obj - bg
    alpha = np.clip(((frame - bg) @ axis) / max(float(axis @ axis), 1e-6), 0, 1)
    alpha = np.where(fg | (alpha > 0.5), alpha, 0.0)  # ignore faint noise away from the object
    mass = alpha.sum()
    ys, xs = np.nonzero(alpha > 0.5)
    if mass <= 0 or len(xs) == 0:
        return {"background": out["background"]}
    cy = float((alpha.sum(1) * (np.arange(h) + 0.5)).sum() / mass) / h
    cx = float((alpha.sum(0) * (np.arange(w) + 0.5)).sum() / mass) / w
    out["centroid"] = (cx, cy)
    out["position"] = f"{ROWS[min(int(cy * 3), 2)]} {COLUMNS[min(int(cx * 3), 2)]}"
    if not with_shape:
        return out
    best, best_iou = fit_shape(alpha)
    out["shape"] = best
    out["shape_iou"] = best_iou
    return out


def largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region of a boolean mask (a flood fill; frames are small)."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    best, best_size, label = 0, 0, 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        label += 1
        labels[y0, x0] = label
        stack, size = [(y0, x0)], 0
        while stack:
            y, x = stack.pop()
            size += 1
            for ny in (y - 1, y, y + 1):
                for nx in (x - 1, x, x + 1):
                    if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not labels[ny, nx]:
                        labels[ny, nx] = label
                        stack.append((ny, nx))
        if size > best_size:
            best, best_size = label, size
    return labels == best if best else mask


def fit_shape(alpha: np.ndarray) -> tuple[str | None, float]:
    """Best template (shape, soft IoU) for a coverage map ``alpha`` ``[H, W]`` in [0, 1]; see the
    module docstring."""
    region = largest_region(alpha > 0.5)
    ys, xs = np.nonzero(region)
    if len(xs) == 0:
        return None, 0.0
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    half = max(x1 - x0, y1 - y0) / 2
    grid = torch.tensor([(x, y, half * f) for f in (0.8, 0.85, 0.9, 0.95, 1.0)
                         for x in ((x0 + x1) / 2 + d for d in (-1, 0, 1))
                         for y in ((y0 + y1) / 2 + d for d in (-1, 0, 1))], dtype=torch.float32)
    h, w = alpha.shape
    size = max(h, w)  # templates in fractions of a square frame, cropped to this one
    cx, cy, hh = (grid[:, i].view(-1, 1, 1) / size for i in range(3))
    a = torch.from_numpy(alpha.astype(np.float32))[None]
    best, best_iou = None, -1.0
    for shape in SHAPES:
        t = shape_coverage(shape, size, cx, cy, hh)[:, :h, :w]
        iou = float((torch.minimum(a, t).sum((1, 2)) / torch.maximum(a, t).sum((1, 2)).clamp_min(1e-6)).max())
        if iou > best_iou:
            best, best_iou = shape, iou
    return best, best_iou


def _majority(values):
    values = [v for v in values if v is not None]
    return Counter(values).most_common(1)[0][0] if values else None


def detect(frames) -> dict:
    """Attributes of an image or a video (see the module docstring). Keys present only when found."""
    frames = as_frames(frames)
    n = len(frames)
    shape_frames = set(np.linspace(0, n - 1, min(n, 5)).round().astype(int).tolist())  # shape on <= 5 frames
    per = [detect_frame(f, with_shape=i in shape_frames) for i, f in enumerate(frames)]
    out: dict = {}
    for key in ("background", "color", "shape"):
        v = _majority([p.get(key) for p in per])
        if v is not None:
            out[key] = v
    if len(per) == 1:
        if "position" in per[0]:
            out["position"] = per[0]["position"]
        return out
    cents = [p["centroid"] for p in per if "centroid" in p]
    if len(cents) >= 2:
        first = [i for i, p in enumerate(per) if "centroid" in p]
        span = (first[-1] - first[0]) / (len(per) - 1)  # fraction of the clip between the two detections
        dx, dy = cents[-1][0] - cents[0][0], cents[-1][1] - cents[0][1]
        dist = float(np.hypot(dx, dy)) / max(span, 1e-6)
        out["displacement"] = (dx, dy)
        if np.hypot(dx, dy) >= MIN_MOTION:
            out["direction"] = ("right" if dx > 0 else "left") if abs(dx) >= abs(dy) else ("down" if dy > 0 else "up")
            out["speed"] = "quickly" if dist > (TRAVEL["slowly"] + TRAVEL["quickly"]) / 2 else "slowly"
    return out


def score(generations, prompts: list[str]) -> dict:
    """Accuracy per attribute of ``generations`` (one image or video each) vs their prompts.

    Returns ``{"accuracy": {attr: fraction}, "counts": {attr: n}, "overall": mean of the
    accuracies, "details": [{"prompt", "expected", "detected", "correct"}]}``; only attributes a
    prompt names are scored."""
    hits: Counter = Counter()
    counts: Counter = Counter()
    details = []
    for gen, prompt in zip(generations, prompts, strict=True):
        expected = parse_caption(prompt)
        found = detect(gen)
        correct = {k: found.get(k) == v for k, v in expected.items()}
        for k, ok in correct.items():
            counts[k] += 1
            hits[k] += int(ok)
        details.append({"prompt": prompt, "expected": expected,
                        "detected": {k: v for k, v in found.items() if isinstance(v, str)}, "correct": correct})
    accuracy = {k: hits[k] / counts[k] for k in counts}
    overall = float(np.mean(list(accuracy.values()))) if accuracy else 0.0
    return {"accuracy": accuracy, "counts": dict(counts), "overall": overall, "details": details}


# ----------------------------------------------------------------------------------------------
# similarity
# ----------------------------------------------------------------------------------------------
def psnr(a, b, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over all frames (``inf`` when identical)."""
    a, b = as_frames(a).astype(np.float64), as_frames(b).astype(np.float64)
    mse = float(((a - b) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(data_range ** 2 / mse)


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()


def ssim(a, b, data_range: float = 1.0, window: int = 11, sigma: float = 1.5) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, mean over the valid region,
    channels and frames. Frames smaller than the window use a window of the frame's size."""
    a = torch.from_numpy(as_frames(a)).double().permute(0, 3, 1, 2)  # [F, 3, H, W]
    b = torch.from_numpy(as_frames(b)).double().permute(0, 3, 1, 2)
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ {tuple(a.shape)} vs {tuple(b.shape)}")
    window = min(window, a.shape[-1], a.shape[-2])
    g = _gaussian(window, sigma)
    c = a.shape[1]
    kx = g.view(1, 1, 1, -1).repeat(c, 1, 1, 1)
    ky = g.view(1, 1, -1, 1).repeat(c, 1, 1, 1)

    def blur(x):
        return F.conv2d(F.conv2d(x, kx, groups=c), ky, groups=c)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    saa = blur(a * a) - mu_a ** 2
    sbb = blur(b * b) - mu_b ** 2
    sab = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * sab + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))
    return float(s.mean())
