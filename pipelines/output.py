"""Saving generated images and videos together with the settings that reproduce them.

* PNG: an A1111-style ``parameters`` tEXt chunk (readable by common image tools) and a ``mixdit``
  tEXt chunk holding the metadata dict as JSON (the source of truth, read by :func:`read_metadata`).
* MP4 (H.264 through imageio-ffmpeg's bundled ffmpeg), GIF, WebP (animated, through Pillow): the
  JSON goes into the container's ``comment`` (MP4: also ``description``; GIF: comment extension)
  and always into a sidecar ``<file>.json`` (``video.mp4.json``).

Several results (a batch of images or of videos) are written as ``name.png``, ``name-1.png``, ...;
each file's metadata then also carries ``batch_index`` and ``batch_size``.
"""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import numpy as np

from mixdit.errors import ConfigError

IMAGE_EXTENSIONS = (".png",)
VIDEO_EXTENSIONS = (".mp4", ".gif", ".webp")
ALLOWED_EXTENSIONS = IMAGE_EXTENSIONS + VIDEO_EXTENSIONS
METADATA_KEY = "mixdit"
DEFAULT_FPS = 16

# metadata key -> A1111 label, in A1111's order (prompt / negative prompt are written on their own lines)
_A1111_LABELS = {
    "steps": "Steps", "scheduler": "Sampler", "guidance_scale": "CFG scale", "seed": "Seed",
    "size": "Size", "model": "Model",
}
_A1111_SKIP = {"prompt", "negative_prompt", "width", "height"}


# --------------------------------------------------------------------------------------------
# metadata text
# --------------------------------------------------------------------------------------------
def _jsonable(value):
    """Best-effort conversion to JSON types (dtypes, paths, numpy/torch scalars, tuples...)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if hasattr(value, "item") and getattr(value, "ndim", None) == 0:
        return value.item()
    if hasattr(value, "to_dict"):
        try:
            return _jsonable(value.to_dict())
        except Exception:  # pragma: no cover
            pass
    return str(value)


def metadata_json(metadata: dict) -> str:
    return json.dumps(_jsonable(dict(metadata)), ensure_ascii=False, sort_keys=False)


def _label(key: str) -> str:
    text = key.replace("_", " ").strip()
    return text[:1].upper() + text[1:]


def _a1111_value(value) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, (dict, list, tuple)):
        text = json.dumps(_jsonable(value), ensure_ascii=False, separators=(",", ":"))
    else:
        text = str(value)
    # like A1111: quote values that would break its "Key: value, Key: value" parsing
    if any(c in text for c in ',:\n"'):
        text = json.dumps(text, ensure_ascii=False)
    return text


def a1111_parameters(metadata: dict) -> str:
    """The A1111 ``parameters`` text for a metadata dict.

    ``prompt\\nNegative prompt: ...\\nSteps: 20, Sampler: <scheduler>, CFG scale: 7, Seed: 1,
    Size: 64x64, Model: tiny-sd3, <Other key>: value, ...``. Missing keys are left out; any
    other key is appended as ``"Key name: value"`` (underscores become spaces).
    """
    md = dict(metadata)
    lines = [str(md.get("prompt") or "")]
    negative = md.get("negative_prompt")
    if negative:
        lines.append(f"Negative prompt: {negative}")
    fields = dict(md)
    if md.get("width") is not None and md.get("height") is not None:
        fields["size"] = f"{md['width']}x{md['height']}"
    parts = [f"{label}: {_a1111_value(fields[key])}" for key, label in _A1111_LABELS.items()
             if fields.get(key) is not None]
    parts += [f"{_label(k)}: {_a1111_value(v)}" for k, v in md.items()
              if k not in _A1111_LABELS and k not in _A1111_SKIP and v is not None]
    if parts:
        lines.append(", ".join(parts))
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# result -> list of items (each item: one image HxWx3 uint8, or one video FxHxWx3 uint8)
# --------------------------------------------------------------------------------------------
def _to_uint8(array) -> np.ndarray:
    if hasattr(array, "detach"):  # torch tensor
        array = array.detach().float().cpu().numpy()
    a = np.asarray(array)
    if a.dtype == np.uint8:
        return a
    if a.dtype == bool:
        return a.astype(np.uint8) * 255
    a = a.astype(np.float32)
    if np.issubdtype(np.asarray(array).dtype, np.integer) or (a.size and a.max() > 1.5):
        return np.clip(np.round(a), 0, 255).astype(np.uint8)
    return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)


def _channels_last(a: np.ndarray) -> np.ndarray:
    if a.ndim >= 3 and a.shape[-1] not in (1, 3, 4) and a.shape[-3] in (1, 3, 4):
        a = np.moveaxis(a, -3, -1)
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a


def _frame(x) -> np.ndarray:
    from PIL import Image

    if isinstance(x, Image.Image):
        return np.asarray(x.convert("RGBA" if x.mode in ("RGBA", "LA", "P") and "A" in x.getbands() else "RGB"))
    a = _channels_last(_to_uint8(x))
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3:
        raise ValueError(f"expected one image of shape (H, W, C), got {a.shape}")
    return a


def _unwrap(result):
    for attr in ("frames", "images"):  # diffusers pipeline outputs
        if not isinstance(result, (list, tuple, np.ndarray)) and hasattr(result, attr):
            return getattr(result, attr)
    return result


def _is_frame_like(x) -> bool:
    from PIL import Image

    return isinstance(x, Image.Image) or (hasattr(x, "shape") and len(x.shape) <= 3)


def _images(result) -> list[np.ndarray]:
    from PIL import Image

    result = _unwrap(result)
    if isinstance(result, Image.Image):
        return [_frame(result)]
    if isinstance(result, (list, tuple)):
        out: list[np.ndarray] = []
        for x in result:
            out.extend(_images(x))
        return out
    a = _channels_last(_to_uint8(result))
    if a.ndim in (2, 3):
        return [_frame(a)]
    if a.ndim == 4:
        return [a[i] for i in range(a.shape[0])]
    if a.ndim == 5:  # a video batch written as PNGs: every frame
        return [f for v in a for f in v]
    raise ValueError(f"cannot read images from an array of shape {a.shape}")


def _videos(result) -> list[np.ndarray]:
    """One array [F, H, W, C] per video; a list of frames is one video, a list of lists a batch."""
    result = _unwrap(result)
    if isinstance(result, (list, tuple)):
        if result and all(_is_frame_like(x) for x in result):
            return [np.stack([_frame(x) for x in result])]
        out: list[np.ndarray] = []
        for x in result:
            out.extend(_videos(x))
        return out
    if _is_frame_like(result) and not hasattr(result, "shape"):
        return [np.stack([_frame(result)])]
    a = _channels_last(_to_uint8(result))
    if a.ndim == 3:
        return [a[None]]
    if a.ndim == 4:
        return [a]
    if a.ndim == 5:
        return [a[i] for i in range(a.shape[0])]
    raise ValueError(f"cannot read a video from an array of shape {a.shape}")


def _numbered(path: Path, i: int) -> Path:
    return path if i == 0 else path.with_name(f"{path.stem}-{i}{path.suffix}")


# --------------------------------------------------------------------------------------------
# writers
# --------------------------------------------------------------------------------------------
def _write_png(image: np.ndarray, path: Path, metadata: dict) -> None:
    from PIL import Image, PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", a1111_parameters(metadata))
    info.add_text(METADATA_KEY, metadata_json(metadata))
    Image.fromarray(image).save(path, format="PNG", pnginfo=info)


def _write_mp4(video: np.ndarray, path: Path, fps: float, text: str) -> None:
    import imageio_ffmpeg

    frames = video[..., :3]
    f, h, w = frames.shape[:3]
    if h % 2 or w % 2:  # yuv420p needs even sizes: pad by edge replication
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        h, w = frames.shape[1:3]
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, codec="libx264", pix_fmt_in="rgb24", pix_fmt_out="yuv420p",
        macro_block_size=1, quality=None, bitrate=None,
        output_params=["-crf", "18", "-metadata", f"comment={text}", "-metadata", f"description={text}"],
    )
    writer.send(None)
    for frame in frames:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _write_animated(video: np.ndarray, path: Path, fps: float, text: str, fmt: str) -> None:
    from PIL import Image

    images = [Image.fromarray(f) for f in video]
    duration = max(1, int(round(1000.0 / fps)))
    kwargs = dict(save_all=True, append_images=images[1:], duration=duration, loop=0)
    if fmt == "GIF":
        kwargs["comment"] = text.encode("utf-8")
    else:
        kwargs.update(lossless=False, quality=90)
    images[0].save(path, format=fmt, **kwargs)


def check_output_path(path, is_video: bool | None = None) -> str:
    """Validate an output file name before any work is done; returns its lower-case extension.
    ``is_video`` (when known) also checks that the extension fits the model's output."""
    ext = Path(path).suffix.lower()
    allowed = ALLOWED_EXTENSIONS if is_video is None else (VIDEO_EXTENSIONS if is_video else IMAGE_EXTENSIONS)
    if ext not in allowed:
        raise ConfigError("out", str(path), "a file name ending in " + ", ".join(allowed))
    return ext


def save_result(result, path, metadata: dict | None = None, fps: float | None = None) -> list[Path]:
    """Save images or videos at ``path`` with ``metadata``; returns the files written.

    ``result``: a diffusers output (``.images`` / ``.frames``), a PIL image, a list of PIL images,
    an array/tensor ``[H, W, C]`` / ``[N, H, W, C]`` (images) or ``[F, H, W, C]`` /
    ``[B, F, H, W, C]`` (videos; float in [0, 1] or uint8; channels-first is accepted).
    The extension chooses the writer: ``.png`` writes images (``name.png``, ``name-1.png``, ...);
    ``.mp4``, ``.gif``, ``.webp`` write one video per batch item (a list of frames is one video).
    ``fps`` defaults to ``metadata["fps"]`` or 16. ``metadata`` should hold what reproduces the run
    (prompt, negative_prompt, steps, scheduler, guidance_scale, seed, width, height, model, feature
    configs...).
    """
    path = Path(path)
    ext = check_output_path(path)
    metadata = dict(metadata or {})
    path.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if ext in IMAGE_EXTENSIONS:
        items = _images(result)
    else:
        items = _videos(result)
        fps = float(fps or metadata.get("fps") or DEFAULT_FPS)
        if not math.isfinite(fps) or fps <= 0:
            raise ConfigError("fps", fps, "a positive number of frames per second")
    if not items:
        raise ValueError("save_result: the result holds no image or frame")
    for i, item in enumerate(items):
        target = _numbered(path, i)
        md = dict(metadata)
        if len(items) > 1:
            md.update(batch_index=i, batch_size=len(items))
        if ext == ".png":
            _write_png(item, target, md)
        else:
            md.setdefault("fps", fps)
            md.setdefault("num_frames", int(item.shape[0]))
            text = metadata_json(md)
            if ext == ".mp4":
                _write_mp4(item, target, fps, text)
            else:
                _write_animated(item, target, fps, text, "GIF" if ext == ".gif" else "WEBP")
            sidecar(target).write_text(json.dumps(_jsonable(md), indent=2, ensure_ascii=False))
        written.append(target)
    return written


def sidecar(path) -> Path:
    """The JSON sidecar of a video file: ``video.mp4`` -> ``video.mp4.json``."""
    path = Path(path)
    return path.with_name(path.name + ".json")


# --------------------------------------------------------------------------------------------
# reading back
# --------------------------------------------------------------------------------------------
def parse_a1111_parameters(text: str) -> dict:
    """Best-effort inverse of :func:`a1111_parameters` (for PNGs written by other tools)."""
    lines = text.split("\n")
    md: dict = {}
    last = lines[-1] if len(lines) > 1 and ": " in lines[-1] else None
    body = lines[:-1] if last is not None else lines
    prompt_lines = [ln for ln in body if not ln.startswith("Negative prompt: ")]
    negative = [ln[len("Negative prompt: "):] for ln in body if ln.startswith("Negative prompt: ")]
    md["prompt"] = "\n".join(prompt_lines)
    if negative:
        md["negative_prompt"] = negative[0]
    if last is not None:
        labels = {v: k for k, v in _A1111_LABELS.items()}
        import re

        for m in re.finditer(r'\s*([^:,]+):\s*("(?:\\.|[^"\\])*"|[^,]*)\s*(?:,|$)', last):
            label, value = m.group(1).strip(), m.group(2).strip()
            if value.startswith('"'):
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            if isinstance(value, str) and value[:1] in "{[":
                try:
                    value = json.loads(value)
                except ValueError:
                    pass
            key = labels.get(label, label.lower().replace(" ", "_"))
            for conv in (int, float):
                try:
                    value = conv(value)
                    break
                except (TypeError, ValueError):
                    continue
            md[key] = value
        if isinstance(md.get("size"), str) and "x" in md["size"]:
            w, h = md.pop("size").split("x", 1)
            md["width"], md["height"] = int(w), int(h)
    return md


def _ffmpeg_comment(path: Path) -> str | None:
    import imageio_ffmpeg

    proc = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-v", "error", "-i", str(path), "-f", "ffmetadata", "-"],
                          capture_output=True, text=True, timeout=60)
    value, key = None, None
    lines = proc.stdout.split("\n")
    for i, line in enumerate(lines):
        if line.startswith("comment="):
            value, key = line[len("comment="):], i
            # ffmetadata escapes '=', ';', '#', '\\' and newlines with a backslash
            while value.endswith("\\") and key + 1 < len(lines):
                key += 1
                value = value[:-1] + "\n" + lines[key]
            break
    if value is None:
        return None
    out, esc = [], False
    for c in value:
        if esc:
            out.append(c)
            esc = False
        elif c == "\\":
            esc = True
        else:
            out.append(c)
    return "".join(out)


def read_metadata(path) -> dict:
    """The metadata dict saved with ``path`` (PNG chunk, else the sidecar, else the container comment)."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext == ".png":
        from PIL import Image

        with Image.open(path) as im:
            text = im.text if hasattr(im, "text") else im.info
            if METADATA_KEY in text:
                return json.loads(text[METADATA_KEY])
            if "parameters" in text:
                return parse_a1111_parameters(text["parameters"])
    car = sidecar(path)
    if car.is_file():
        return json.loads(car.read_text())
    if ext == ".mp4":
        comment = _ffmpeg_comment(path)
        if comment:
            return json.loads(comment)
    if ext in (".gif", ".webp"):
        from PIL import Image

        with Image.open(path) as im:
            comment = im.info.get("comment")
        if comment:
            return json.loads(comment.decode("utf-8") if isinstance(comment, bytes) else comment)
    raise FileNotFoundError(f"no mixdit metadata found for {path}")
