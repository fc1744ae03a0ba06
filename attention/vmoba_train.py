"""Continue training a video DiT's transformer with VMoBA applied (``mixdit train vmoba``).

    mixdit train vmoba --model tiny-wan --data synthetic:64 --out runs/vmoba --steps 200
    accelerate launch --num_processes 8 -m mixdit train vmoba --model Wan-AI/Wan2.1-T2V-1.3B-Diffusers \\
        --data clips/ --out runs/wan-vmoba --height 480 --width 832 --frames 77 --mixed-precision bf16 \\
        --gradient-checkpointing --vmoba-threshold 0.25

Python: ``train_vmoba(TrainConfig(model="tiny-wan", data="synthetic:16", out="runs/x", steps=30))``
returns ``{"losses": [...], "samples_per_second": ..., ...}``.

What it does, in order:

1. Loads the model: a name :func:`mixdit.pipelines.zoo.load_pipeline` knows (built-in, local
   pipeline folder, hub id), a folder holding only a transformer (``config.json`` +
   weights), or (Python) a pipeline / transformer object. Wan 2.2's two experts: ``expert=
   "transformer"`` (high noise, t >= boundary) or ``"transformer_2"`` (low noise, t < boundary);
   the sampled timesteps are restricted to the chosen expert's interval.
2. Builds the dataset (:func:`build_dataset`): ``synthetic:N`` (smooth random latents + random
   prompt embeddings, identical on every rank), a folder of latent files (``.pt`` /
   ``.safetensors`` holding ``latents [C, F, H, W]`` and ``prompt_embeds [L, D]`` or a ``prompt``
   string), or a folder of videos (mp4/gif/webm/mov/avi/mkv read with imageio, resized and
   center-cropped to ``height x width``, first ``frames`` frames, encoded once with the pipeline's
   VAE and cached under ``OUT/cache``; prompts from ``<stem>.txt`` or ``metadata.jsonl``
   (``{"file_name", "text"}``), else the empty prompt). Prompts are encoded once with the
   pipeline's text encoder (``encode_prompt``, ``max_sequence_length`` tokens).
3. Applies VMoBA to the transformer (``mixdit.apply(transformer, vmoba=config)``; ``vmoba=None``
   trains dense, the baseline to compare against) and trains with the flow-matching objective
   diffusers' flow-matching training scripts use (SD3/FLUX/Wan-style): ``u`` from
   ``compute_density_for_timestep_sampling`` (uniform by default, or logit-normal / mode), index
   into a ``FlowMatchEulerDiscreteScheduler``'s (shifted) training timesteps and sigmas,
   ``x_t = (1 - σ) x0 + σ ε``, target ``ε - x0``, MSE weighted by
   ``compute_loss_weighting_for_sd3``; AdamW, gradient clipping, ``accelerate.Accelerator`` for
   devices, DDP, mixed precision and gradient accumulation.
4. Saves ``OUT/<expert>`` (``save_pretrained``) at the end and ``OUT/checkpoint-<step>/<expert>``
   every ``save_every`` steps; when the model came from a pipeline, ``OUT`` is also written as the
   full pipeline folder (``DiffusionPipeline.from_pretrained(OUT)`` loads it, trained expert in).

Data across processes: every rank builds the same index list; each epoch is one permutation
(seeded by ``seed`` and the epoch, the same on every rank) split round-robin, so ranks see
disjoint samples and together the whole set (when ``N`` is not a multiple of the number of
processes, the permutation is padded with its own first entries so every rank takes the same
number of steps, as ``DistributedSampler`` does). Gradients are all-reduced by DDP, so all ranks
hold identical weights. Noise and timesteps are drawn per rank (seed + rank).

Gradient checkpointing keeps VMoBA active in the recomputation: :func:`mixdit.pipelines.context.checkpoint_keeping_context`
carries mixdit's forward context into the backward pass. With diffusers' default checkpoint
function the recomputed blocks see no context, run dense attention, and torch raises a
``CheckpointError`` (different saved tensors) in backward. The recomputation does not compute attention
again (VMoBA's kernels hand back the forward's output, lse and selection; PyTorch's SDPA is saved by
selective checkpointing) unless ``recompute_attention``.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mixdit.attention.vmoba_train_config import EXPERTS, TrainConfig, parse_data_spec
from mixdit.errors import ConfigError, MixditError
from mixdit.pipelines.context import checkpoint_keeping_context

VIDEO_SUFFIXES = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")
LATENT_SUFFIXES = (".pt", ".pth", ".safetensors")
DEFAULT_SIZE = {"height": 480, "width": 832, "frames": 81}  # WanPipeline's defaults
SYNTHETIC_TEXT_LEN = 16


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------
@dataclass
class LoadedModel:
    transformer: torch.nn.Module
    pipe: Any  # the diffusers pipeline, or None for a bare transformer
    name: str
    boundary_ratio: float | None
    vae_scale_temporal: int = 4
    vae_scale_spatial: int = 8
    defaults: dict = field(default_factory=dict)


def load_model(model, expert: str = "transformer") -> LoadedModel:
    """Resolve ``model`` (name, folder, pipeline or transformer) to the expert to train."""
    from diffusers import ModelMixin

    from mixdit.generate import model_defaults

    if isinstance(model, ModelMixin):
        if expert != "transformer":
            raise ConfigError("expert", expert, "'transformer' when a bare transformer is given")
        return LoadedModel(model.float(), None, type(model).__name__, None)
    pipe, name = None, None
    if isinstance(model, (str, os.PathLike)):
        name = os.fspath(model)
        folder = Path(name).expanduser()
        if (folder / "config.json").is_file() and not (folder / "model_index.json").is_file():
            return LoadedModel(_load_transformer_folder(folder), None, name, None)
        from mixdit.pipelines.zoo import load_pipeline

        pipe = load_pipeline(name, device="cpu", dtype=torch.float32)
    elif hasattr(model, "components"):
        pipe, name = model, getattr(model, "mixdit_model_name", type(model).__name__)
    else:
        raise ConfigError("model", model, "a model name, a folder, a diffusers pipeline or a transformer")
    transformer = getattr(pipe, expert, None)
    if transformer is None:
        have = [e for e in EXPERTS if getattr(pipe, e, None) is not None]
        raise ConfigError("expert", expert, "one of the pipeline's denoisers: " + ", ".join(have))
    transformer.float()
    boundary = getattr(getattr(pipe, "config", {}), "boundary_ratio", None)
    if getattr(pipe, "transformer_2", None) is None:
        boundary = None  # a single denoiser covers the whole schedule
    vae = getattr(pipe, "vae", None)
    return LoadedModel(transformer, pipe, name, boundary,
                       vae_scale_temporal=int(getattr(pipe, "vae_scale_factor_temporal", 4) or 4),
                       vae_scale_spatial=int(getattr(pipe, "vae_scale_factor_spatial", 8) or 8) if vae is not None else 8,
                       defaults=model_defaults(pipe))  # the sizes `mixdit generate` uses for this model


def _load_transformer_folder(folder: Path):
    import diffusers

    config = json.loads((folder / "config.json").read_text())
    cls = getattr(diffusers, str(config.get("_class_name", "")), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ConfigError("model", str(folder), "a diffusers pipeline folder or a folder saved by a diffusers "
                                                 f"transformer's save_pretrained (unknown class {config.get('_class_name')!r})")
    return cls.from_pretrained(str(folder), torch_dtype=torch.float32)


def _text_dim(transformer) -> int:
    cfg = transformer.config
    for name in ("text_dim", "joint_attention_dim", "text_embed_dim"):
        if getattr(cfg, name, None):
            return int(getattr(cfg, name))
    raise ConfigError("model", type(transformer).__name__, "a transformer with a text_dim config (Wan family)")


def _latent_grid(loaded: LoadedModel, height: int, width: int, frames: int) -> tuple[int, int, int]:
    return ((frames - 1) // loaded.vae_scale_temporal + 1, height // loaded.vae_scale_spatial,
            width // loaded.vae_scale_spatial)


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
class TrainDataset(torch.utils.data.Dataset):
    """Items ``{"index", "latents" [C,F,H,W] fp32, "prompt_embeds" [L,D] fp32}``.

    ``kind="synthetic"``: generated from ``(seed, index)`` on demand (same on every rank);
    ``kind="files"``: one latent file per item, loaded on demand; prompt strings map to
    embeddings encoded once (``prompt_cache``).
    """

    def __init__(self, kind: str, count: int, *, files=None, shape=None, text_shape=None, seed=0,
                 prompt_cache=None):
        self.kind, self.count, self.files = kind, count, files or []
        self.shape, self.text_shape, self.seed = shape, text_shape, seed
        self.prompt_cache = prompt_cache or {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        if self.kind == "synthetic":
            latents, embeds = synthetic_sample(index, self.shape, self.text_shape, self.seed)
        else:
            record = read_latent_file(self.files[index])
            latents = record["latents"]
            embeds = record.get("prompt_embeds")
            if embeds is None:
                embeds = self.prompt_cache[record.get("prompt", "")]
        return {"index": index, "latents": latents.float(), "prompt_embeds": embeds.float()}


def synthetic_sample(index: int, shape, text_shape, seed: int = 0):
    """Smooth random latents ``shape = (C, F, H, W)`` (coarse noise, trilinear upsampling,
    unit variance per channel) and random prompt embeddings ``text_shape = (L, D)``."""
    g = torch.Generator().manual_seed(1_000_003 * (seed + 1) + index)
    C, F_, H, W = shape
    coarse = torch.randn(1, C, max(1, (F_ + 1) // 2), max(1, (H + 3) // 4), max(1, (W + 3) // 4), generator=g)
    latents = torch.nn.functional.interpolate(coarse, size=(F_, H, W), mode="trilinear", align_corners=True)[0]
    latents = (latents - latents.mean(dim=(1, 2, 3), keepdim=True)) / latents.std(dim=(1, 2, 3), keepdim=True).clamp_min(1e-3)
    embeds = torch.randn(*text_shape, generator=g)
    return latents, embeds


def read_latent_file(path: Path) -> dict:
    """``{"latents", "prompt_embeds"?, "prompt"?}`` from a ``.pt``/``.pth`` or ``.safetensors`` file."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
            meta = f.metadata() or {}
        if "prompt" in meta and "prompt_embeds" not in out:
            out["prompt"] = meta["prompt"]
    else:
        out = torch.load(str(path), map_location="cpu", weights_only=True)
        if not isinstance(out, dict):
            raise ConfigError("data", str(path), "a dict with 'latents' and 'prompt_embeds' or 'prompt'")
    if "latents" not in out or not torch.is_tensor(out["latents"]) or out["latents"].dim() != 4:
        raise ConfigError("data", str(path), "a file holding 'latents' [C, F, H, W]")
    if "prompt_embeds" in out:
        pe = out["prompt_embeds"]
        if pe.dim() == 3 and pe.shape[0] == 1:
            out["prompt_embeds"] = pe = pe[0]
        if pe.dim() != 2:
            raise ConfigError("data", str(path), "'prompt_embeds' of shape [L, D]")
    elif not isinstance(out.get("prompt", None), str):
        raise ConfigError("data", str(path), "a file holding 'prompt_embeds' [L, D] or a 'prompt' string")
    return out


def collate(items: list[dict]) -> dict:
    shapes = {tuple(it["latents"].shape) for it in items}
    if len(shapes) > 1:
        raise ConfigError("batch_size", len(items), f"1, or latents of one shape (got {sorted(shapes)})")
    L = max(it["prompt_embeds"].shape[0] for it in items)
    embeds = []
    for it in items:  # zero-pad text to the longest (Wan pads its UMT5 output with zeros too)
        pe = it["prompt_embeds"]
        embeds.append(torch.nn.functional.pad(pe, (0, 0, 0, L - pe.shape[0])))
    return {"index": torch.tensor([it["index"] for it in items]),
            "latents": torch.stack([it["latents"] for it in items]),
            "prompt_embeds": torch.stack(embeds)}


def shard_indices(count: int, rank: int, world: int, seed: int, epoch: int) -> list[int]:
    """This rank's share of epoch ``epoch``: one seeded permutation (identical on all ranks),
    padded with its own head to a multiple of ``world``, split round-robin."""
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    perm = torch.randperm(count, generator=g).tolist()
    total = math.ceil(count / world) * world
    while len(perm) < total:
        perm += perm[: total - len(perm)]
    return perm[rank::world]


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Exactly ``num_batches`` batches of ``batch_size`` indices for one rank (epochs chained)."""

    def __init__(self, count, batch_size, num_batches, rank, world, seed):
        self.count, self.batch_size, self.num_batches = count, batch_size, num_batches
        self.rank, self.world, self.seed = rank, world, seed

    def __len__(self):
        return self.num_batches

    def __iter__(self):
        stream: list[int] = []
        epoch = 0
        for _ in range(self.num_batches):
            while len(stream) < self.batch_size:
                stream += shard_indices(self.count, self.rank, self.world, self.seed, epoch)
                epoch += 1
            batch, stream = stream[: self.batch_size], stream[self.batch_size:]
            yield batch


def build_dataset(config: TrainConfig, loaded: LoadedModel, accelerator) -> TrainDataset:
    """The dataset for ``config.data`` (see the module docstring); encodes and caches on the main
    process first, the other ranks then read the cache."""
    kind, value = parse_data_spec(config.data)
    height, width, frames = _size(config, loaded)
    if kind == "synthetic":
        C = int(loaded.transformer.config.in_channels)
        shape = (C, *_latent_grid(loaded, height, width, frames))
        return TrainDataset("synthetic", value, shape=shape, text_shape=(SYNTHETIC_TEXT_LEN, _text_dim(loaded.transformer)),
                            seed=config.seed)
    folder: Path = value
    latent_files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in LATENT_SUFFIXES and p.is_file())
    videos = sorted(p for p in folder.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES and p.is_file())
    if not latent_files and not videos:
        raise ConfigError("data", str(folder), "a folder holding videos (" + "/".join(VIDEO_SUFFIXES)
                          + ") or latent files (" + "/".join(LATENT_SUFFIXES) + "); none found")
    if latent_files and videos:
        raise ConfigError("data", str(folder), "either videos or latent files, not both in one folder")
    cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.out) / "cache"
    with accelerator.main_process_first():
        if videos:
            files = _encode_videos(videos, folder, cache_dir, loaded, config, (height, width, frames), accelerator)
            prompts: dict = {}
        else:
            files = latent_files
            needed = sorted({rec["prompt"] for rec in map(read_latent_file, files) if "prompt_embeds" not in rec})
            prompts = _encode_prompts(needed, loaded, config, accelerator, cache_dir) if needed else {}
    return TrainDataset("files", len(files), files=files, prompt_cache=prompts)


def _size(config: TrainConfig, loaded: LoadedModel) -> tuple[int, int, int]:
    out = []
    for name in ("height", "width", "frames"):
        value = getattr(config, name) or loaded.defaults.get(name) or DEFAULT_SIZE[name]
        out.append(int(value))
    return tuple(out)


def _require(loaded: LoadedModel, what: str):
    comp = getattr(loaded.pipe, what, None) if loaded.pipe is not None else None
    if comp is None:
        raise ConfigError("model", loaded.name, f"a pipeline with a {what} (needed to encode this data; "
                                                "or give pre-encoded latents with prompt_embeds)")
    return comp


def _encode_prompts(prompts: list[str], loaded: LoadedModel, config: TrainConfig, accelerator, cache_dir: Path) -> dict:
    pipe = loaded.pipe
    text_encoder = _require(loaded, "text_encoder")
    key = hashlib.sha256(json.dumps([loaded.name, config.max_sequence_length, prompts]).encode()).hexdigest()[:16]
    path = cache_dir / f"prompts-{key}.pt"
    if path.is_file():
        return torch.load(str(path), map_location="cpu", weights_only=True)
    device = accelerator.device
    text_encoder.to(device)
    out = {}
    with torch.no_grad():
        for p in prompts:
            embeds, _ = pipe.encode_prompt(p, do_classifier_free_guidance=False, max_sequence_length=config.max_sequence_length,
                                           device=device, dtype=torch.float32)
            out[p] = embeds[0].cpu()
    text_encoder.to("cpu")
    if accelerator.is_main_process:
        cache_dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(out, path)
    return out


def _prompt_for(video: Path, root: Path) -> str:
    side = video.with_suffix(".txt")
    if side.is_file():
        return side.read_text().strip()
    meta = root / "metadata.jsonl"
    if meta.is_file():
        rel = str(video.relative_to(root))
        for line in meta.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                if row.get("file_name") in (rel, video.name):
                    return str(row.get("text", row.get("prompt", "")))
    return ""


def read_video(path: Path, height: int, width: int, frames: int) -> torch.Tensor:
    """``[3, frames, height, width]`` in [-1, 1]: the first ``frames`` frames (the last one
    repeated if the clip is shorter), scaled to cover ``height x width`` and center-cropped."""
    import itertools

    import imageio.v3 as iio
    import numpy as np

    try:  # stream: only the first `frames` frames are decoded
        got = [np.asarray(f) for f in itertools.islice(iio.imiter(str(path)), frames)]
    except Exception as e:  # unreadable file: name it
        raise MixditError(f"could not read video {str(path)!r}: {e}") from e
    if not got:
        raise MixditError(f"could not read video {str(path)!r}: no frames")
    arr = np.stack(got)
    if arr.ndim == 3:  # grey frames [T, H, W]
        arr = arr[..., None]
    if arr.shape[-1] == 4:
        arr = arr[..., :3]
    elif arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    video = torch.from_numpy(np.ascontiguousarray(arr)).float().permute(0, 3, 1, 2) / 127.5 - 1.0
    if video.shape[0] < frames:
        video = torch.cat([video, video[-1:].expand(frames - video.shape[0], -1, -1, -1)])
    h, w = video.shape[-2:]
    s = max(height / h, width / w)
    nh, nw = max(height, round(h * s)), max(width, round(w * s))
    video = torch.nn.functional.interpolate(video, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - height) // 2, (nw - width) // 2
    video = video[:, :, top:top + height, left:left + width]
    return video.permute(1, 0, 2, 3).clamp(-1, 1).contiguous()


def _encode_videos(videos, root: Path, cache_dir: Path, loaded: LoadedModel, config: TrainConfig, size, accelerator):
    """Encode each video once with the VAE (posterior mean, normalised by the VAE's
    ``latents_mean``/``latents_std`` as WanPipeline expects) into ``cache_dir``; returns the
    cached latent files."""
    height, width, frames = size
    cache_dir.mkdir(parents=True, exist_ok=True)
    todo, files = [], []
    for v in videos:
        st = v.stat()
        key = hashlib.sha256(json.dumps([str(v.resolve()), st.st_size, st.st_mtime_ns, size, loaded.name,
                                         config.max_sequence_length, _prompt_for(v, root)]).encode()).hexdigest()[:20]
        path = cache_dir / f"{v.stem}-{key}.pt"
        files.append(path)
        if not path.is_file():
            todo.append((v, path))
    if not todo:
        return files
    if not accelerator.is_main_process:  # main_process_first: the main rank has filled the cache
        raise MixditError(f"latent cache {str(cache_dir)!r} is incomplete on rank {accelerator.process_index}; "
                          "is it on a disk every process sees?")
    vae = _require(loaded, "vae")
    device = accelerator.device
    vae.to(device)
    prompts = _encode_prompts(sorted({_prompt_for(v, root) for v, _ in todo}), loaded, config, accelerator, cache_dir)
    cfg = vae.config
    mean = torch.tensor(getattr(cfg, "latents_mean", None) or [0.0] * cfg.z_dim).view(-1, 1, 1, 1)
    std = torch.tensor(getattr(cfg, "latents_std", None) or [1.0] * cfg.z_dim).view(-1, 1, 1, 1)
    from tqdm.auto import tqdm

    with torch.no_grad():
        for v, path in tqdm(todo, desc="encoding videos", disable=not config.progress):
            pixels = read_video(v, height, width, frames).unsqueeze(0).to(device, vae.dtype)
            dist = vae.encode(pixels).latent_dist
            latents = ((dist.mean[0].float().cpu() - mean) / std).contiguous()
            _atomic_save({"latents": latents, "prompt_embeds": prompts[_prompt_for(v, root)],
                          "source": str(v)}, path)
    vae.to("cpu")
    return files


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(obj, str(tmp))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# objective
# ----------------------------------------------------------------------------------------------
class FlowMatchingObjective:
    """The flow-matching loss of diffusers' SD3/FLUX-style training scripts, for one expert.

    Training timesteps and sigmas are a ``FlowMatchEulerDiscreteScheduler``'s (1000, shifted);
    ``u`` from ``compute_density_for_timestep_sampling`` picks an index; Wan 2.2 experts only
    draw from their own side of ``boundary_ratio x 1000``.
    """

    def __init__(self, config: TrainConfig, loaded: LoadedModel):
        from diffusers import FlowMatchEulerDiscreteScheduler

        from mixdit.pipelines.flow_matching import scheduler_shift

        shift = config.flow_shift
        if shift is None and loaded.pipe is not None and getattr(loaded.pipe, "scheduler", None) is not None:
            shift = scheduler_shift(loaded.pipe.scheduler)
        self.shift = float(shift or 3.0)
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=self.shift)
        self.timesteps = sched.timesteps.float().clone()  # descending, 1000 -> ~1
        self.sigmas = sched.sigmas[: len(self.timesteps)].float().clone()
        lo, hi = 0, len(self.timesteps)
        if loaded.boundary_ratio is not None:
            boundary = loaded.boundary_ratio * 1000
            high = int((self.timesteps >= boundary).sum())  # prefix: high-noise expert
            lo, hi = (0, high) if config.expert == "transformer" else (high, len(self.timesteps))
            if hi <= lo:
                raise ConfigError("expert", config.expert, "an expert whose timestep interval is not empty")
        self.lo, self.hi = lo, hi
        self.config = config

    def sample(self, batch_size: int, generator: torch.Generator):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        c = self.config
        scheme = "none" if c.timestep_sampling == "uniform" else c.timestep_sampling
        u = compute_density_for_timestep_sampling(scheme, batch_size, logit_mean=c.logit_mean, logit_std=c.logit_std,
                                                  mode_scale=c.mode_scale, generator=generator)
        idx = (self.lo + u * (self.hi - self.lo)).long().clamp(self.lo, self.hi - 1)
        return self.timesteps[idx], self.sigmas[idx]

    def loss(self, model, latents, prompt_embeds, generator: torch.Generator):
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        from mixdit.pipelines.flow_matching import flow_matching_loss

        B = latents.shape[0]
        timesteps, sigmas = self.sample(B, generator)
        timesteps = timesteps.to(latents.device)
        s = sigmas.to(latents.device).view(B, *([1] * (latents.ndim - 1)))
        weighting = compute_loss_weighting_for_sd3("none" if self.config.timestep_sampling == "uniform" else
                                                   self.config.timestep_sampling, sigmas=s)
        return flow_matching_loss(
            lambda x_t: model(hidden_states=x_t, timestep=timesteps, encoder_hidden_states=prompt_embeds,
                              return_dict=False)[0],
            latents, sigmas, generator, weighting)


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def weights_checksum(model: torch.nn.Module) -> str:
    """sha256 over the float32 bytes of every parameter, in name order."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _record_path(pattern: str, rank: int) -> Path:
    if "{rank}" in pattern:
        return Path(pattern.format(rank=rank))
    p = Path(pattern)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix or '.json'}")


def _apply_vmoba(transformer, vmoba_config):
    if vmoba_config is None:
        return None
    import mixdit
    from mixdit.api import FEATURES

    if "vmoba" not in FEATURES:
        try:
            import mixdit.attention.vmoba_feature  # noqa: F401  registers the feature
        except ModuleNotFoundError:
            pass
    return mixdit.apply(transformer, vmoba=vmoba_config)


def _make_accelerator(config: TrainConfig):
    """An ``Accelerator`` for this run. Several runs in one single-process Python session (tests,
    notebooks) may differ in mixed precision: accelerate keeps its state process-wide, so a
    single-process state with another precision is reset first."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    kwargs = dict(mixed_precision=config.mixed_precision, cpu=config.cpu,
                  gradient_accumulation_steps=config.gradient_accumulation_steps)
    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", config.mixed_precision) != config.mixed_precision:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError("mixed_precision", config.mixed_precision,
                              f"{state.get('_mixed_precision')!r}, the precision this distributed process started with")
        AcceleratorState._reset_state()
    return Accelerator(**kwargs)


def train_vmoba(config: TrainConfig) -> dict:
    """Run one training job (see the module docstring). Returns the final metrics:

    ``losses`` (mean over processes, one per optimizer step), ``samples_per_second`` (all
    processes, excluding the first step's warm-up), ``seconds``, ``steps``, ``world_size``,
    ``out`` (folder), ``saved`` (paths written), ``vmoba`` (mixdit summary or None),
    ``weights_sha256`` (checksum of the trained expert), ``peak_gpu_memory_gb`` (this process; None on CPU).
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    config.validate()
    accelerator = _make_accelerator(config)
    rank, world = accelerator.process_index, accelerator.num_processes
    set_seed(config.seed)  # same initialisation of anything random on every rank

    loaded = load_model(config.model, config.expert)
    transformer = loaded.transformer
    dataset = build_dataset(config, loaded, accelerator)
    objective = FlowMatchingObjective(config, loaded)

    transformer.requires_grad_(True)
    transformer.train()
    if config.gradient_checkpointing:
        if not getattr(transformer, "_supports_gradient_checkpointing", False):
            raise ConfigError("gradient_checkpointing", True, f"False ({type(transformer).__name__} does not support it)")
        transformer.enable_gradient_checkpointing(
            functools.partial(checkpoint_keeping_context, keep_attention=not config.recompute_attention))
    session = _apply_vmoba(transformer, config.vmoba)

    micro_batches = config.steps * config.gradient_accumulation_steps
    sampler = ShardedBatchSampler(len(dataset), config.batch_size, micro_batches, rank, world, config.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=config.num_workers)
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay,
                                  eps=config.adam_epsilon)
    model, optimizer = accelerator.prepare(transformer, optimizer)
    generator = torch.Generator().manual_seed(config.seed * 1_000_003 + 17 + rank)

    out = Path(config.out)
    saved: list[str] = []
    seen: list[int] = []
    losses: list[float] = []
    window = torch.zeros((), device=accelerator.device)
    bar = tqdm(total=config.steps, desc=f"train vmoba ({'dense' if config.vmoba is None else 'vmoba'})",
               disable=not (config.progress and accelerator.is_local_main_process))
    log_file = None
    if config.save and accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log_file = open(out / "train_log.jsonl", "w")  # one line per optimizer step
    step, micro, t_first, t0 = 0, 0, None, time.perf_counter()
    for batch in loader:
        seen.extend(int(i) for i in batch["index"])
        latents = batch["latents"].to(accelerator.device)
        embeds = batch["prompt_embeds"].to(accelerator.device)
        with accelerator.accumulate(model):
            loss = objective.loss(model, latents, embeds, generator)
            accelerator.backward(loss)
            if accelerator.sync_gradients and config.max_grad_norm > 0:
                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        window = window + loss.detach().float() / config.gradient_accumulation_steps
        micro += 1
        if not accelerator.sync_gradients:
            continue
        step += 1
        step_loss = float(accelerator.reduce(window, reduction="mean"))
        window = torch.zeros((), device=accelerator.device)
        losses.append(step_loss)
        if t_first is None:
            t_first = time.perf_counter()
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        if log_file is not None:
            log_file.write(json.dumps({"step": step, "loss": step_loss, "seconds": round(time.perf_counter() - t0, 3)}) + "\n")
            log_file.flush()
        if config.save and config.save_every and step % config.save_every == 0 and step < config.steps:
            saved += _save(accelerator, model, loaded, out / f"checkpoint-{step}", config, final=False)
    bar.close()
    if log_file is not None:
        log_file.close()
    seconds = time.perf_counter() - t0
    timed_steps = max(0, step - 1)
    timed = time.perf_counter() - t_first if t_first is not None else 0.0
    samples = timed_steps * config.batch_size * config.gradient_accumulation_steps * world
    if timed_steps == 0:  # a one-step run: count its warm-up too
        samples, timed = step * config.batch_size * config.gradient_accumulation_steps * world, seconds

    unwrapped = accelerator.unwrap_model(model, keep_fp32_wrapper=False)
    summary = None
    if session is not None:
        import mixdit

        summary = mixdit.summary(unwrapped)
        mixdit.remove(unwrapped)
    unwrapped.eval()
    checksum = weights_checksum(unwrapped)
    if config.save:
        saved += _save(accelerator, unwrapped, loaded, out, config, final=True)
    if config.record_samples:
        path = _record_path(config.record_samples, rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"rank": rank, "world_size": world, "samples": seen, "weights_sha256": checksum,
                                    "losses": losses}))
    accelerator.wait_for_everyone()
    metrics = {
        "losses": losses, "final_loss": losses[-1] if losses else None, "steps": step,
        "samples_per_second": samples / timed if timed > 0 else float("nan"), "seconds": seconds,
        "world_size": world, "out": str(out), "saved": saved, "vmoba": summary, "weights_sha256": checksum,
        "dataset_size": len(dataset), "flow_shift": objective.shift,
        "peak_gpu_memory_gb": (torch.cuda.max_memory_allocated(accelerator.device) / 2 ** 30
                               if accelerator.device.type == "cuda" else None),
    }
    if accelerator.is_main_process and config.save:
        out.mkdir(parents=True, exist_ok=True)
        (out / "train_metrics.json").write_text(json.dumps(_jsonable(metrics), indent=1))
    accelerator.end_training()
    return metrics


def _jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _save(accelerator, model, loaded: LoadedModel, folder: Path, config: TrainConfig, final: bool) -> list[str]:
    """Main process writes ``folder/<expert>`` (and, at the end, the whole pipeline into ``folder``)."""
    accelerator.wait_for_everyone()
    written: list[str] = []
    if accelerator.is_main_process:
        model = accelerator.unwrap_model(model)
        target = folder / config.expert
        if final and loaded.pipe is not None:
            loaded.pipe.save_pretrained(str(folder), safe_serialization=True)
            written.append(str(folder))
        model.save_pretrained(str(target), safe_serialization=True)  # the trained weights, always
        written.append(str(target))
        meta = {"model": loaded.name, "expert": config.expert, "steps_config": config.steps,
                "vmoba": None if config.vmoba is None else dataclasses.asdict(config.vmoba)}
        (target / "mixdit_train.json").write_text(json.dumps(_jsonable(meta), indent=1))
    accelerator.wait_for_everyone()
    return written


__all__ = ["TrainConfig", "train_vmoba", "FlowMatchingObjective",
           "TrainDataset", "build_dataset", "shard_indices", "synthetic_sample", "read_latent_file", "read_video",
           "checkpoint_keeping_context", "weights_checksum", "load_model"]
