"""Objectives (image scorers) for the HeadHunter search: ``f(images, prompts) -> list[float]``.

Built-ins load through the real transformers / hub code, so a hub id or a local folder works:

* ``clip``        CLIPScore: ``max(100 cos(image, text), 0)`` with ``CLIPModel`` (default
                  ``openai/clip-vit-large-patch14``, the paper's ViT-L/14);
* ``pickscore``   PickScore: ``logit_scale.exp() * cos`` with ``yuvalkirstain/PickScore_v1`` (processor
                  ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``);
* ``aesthetic``   LAION aesthetic predictor v2: an MLP on normalised CLIP ViT-L/14 image embeddings
                  (head weights ``sac+logos+ava1-l14-linearMSE.pth``, a local path or downloaded with
                  ``huggingface_hub`` from ``camenduru/improved-aesthetic-predictor``);
* ``imagereward`` ImageReward through its own package (``pip install image-reward``).

Any Python callable with the same signature works, and ``"package.module:function"`` names one.
Higher is better for every objective.
"""

from __future__ import annotations

import importlib
from typing import Callable, Sequence

import torch

from mixdit.errors import ConfigError

Objective = Callable[[Sequence, Sequence[str]], list]
BUILTIN = ("clip", "pickscore", "aesthetic", "imagereward")


def _device(device):
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


class _CLIPBase:
    def __init__(self, name_or_path: str, processor: str | None = None, device=None, dtype=torch.float32):
        from transformers import CLIPModel, CLIPProcessor

        self.device = _device(device)
        self.model = CLIPModel.from_pretrained(name_or_path, dtype=dtype).to(self.device).eval()
        self.processor = CLIPProcessor.from_pretrained(processor or name_or_path)

    @torch.no_grad()
    def _cosine(self, images, prompts) -> torch.Tensor:
        inputs = self.processor(text=list(prompts), images=[im.convert("RGB") for im in images], return_tensors="pt",
                                padding=True, truncation=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.model.dtype))
        txt = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask"))
        img = getattr(img, "pooler_output", img)
        txt = getattr(txt, "pooler_output", txt)
        img = img / img.norm(dim=-1, keepdim=True)
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return (img * txt).sum(-1).float()


class CLIPScore(_CLIPBase):
    def __init__(self, name_or_path: str = "openai/clip-vit-large-patch14", device=None, **kw):
        super().__init__(name_or_path, device=device, **kw)

    def __call__(self, images, prompts) -> list[float]:
        return (100 * self._cosine(images, prompts)).clamp(min=0).tolist()


class PickScore(_CLIPBase):
    def __init__(self, name_or_path: str = "yuvalkirstain/PickScore_v1",
                 processor: str | None = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K", device=None, **kw):
        super().__init__(name_or_path, processor=processor, device=device, **kw)

    def __call__(self, images, prompts) -> list[float]:
        return (self.model.logit_scale.exp().float() * self._cosine(images, prompts)).tolist()


class AestheticMLP(torch.nn.Module):
    """The LAION improved aesthetic predictor head (linear stack over a CLIP image embedding)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128), torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64), torch.nn.Dropout(0.1), torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))

    def forward(self, x):
        return self.layers(x)


class LAIONAesthetic(_CLIPBase):
    def __init__(self, name_or_path: str = "openai/clip-vit-large-patch14",
                 head: str = "camenduru/improved-aesthetic-predictor:sac+logos+ava1-l14-linearMSE.pth",
                 device=None, **kw):
        super().__init__(name_or_path, device=device, **kw)
        import os

        path = head
        if not os.path.exists(head):
            from huggingface_hub import hf_hub_download

            repo, _, filename = head.partition(":")
            path = hf_hub_download(repo, filename)
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
        self.head = AestheticMLP(self.model.config.projection_dim)
        self.head.load_state_dict(state)
        self.head.to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images, prompts) -> list[float]:
        inputs = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")
        img = self.model.get_image_features(pixel_values=inputs["pixel_values"].to(self.device, self.model.dtype))
        img = getattr(img, "pooler_output", img).float()
        img = img / img.norm(dim=-1, keepdim=True)
        return self.head(img).squeeze(-1).tolist()


class ImageRewardScore:
    def __init__(self, name_or_path: str = "ImageReward-v1.0", device=None):
        try:
            import ImageReward as RM  # the package's own loading code
        except ImportError as e:
            raise ConfigError("objective", "imagereward", "the `image-reward` package installed "
                                                          "(pip install image-reward)") from e
        self.model = RM.load(name_or_path, device=_device(device))

    @torch.no_grad()
    def __call__(self, images, prompts) -> list[float]:
        return [float(self.model.score(p, im)) for im, p in zip(images, prompts)]


def get_objective(objective, *, model: str | None = None, device=None, **kwargs) -> Objective:
    """An objective from a name (``clip``/``pickscore``/``aesthetic``/``imagereward``, optionally with
    ``model=`` a hub id or folder), ``"module:function"``, or a callable (returned as is)."""
    if callable(objective):
        return objective
    if not isinstance(objective, str):
        raise ConfigError("objective", objective, "one of " + ", ".join(BUILTIN) + ", 'module:function' or a callable")
    name = objective.lower()
    extra = {"device": device, **kwargs}
    if model is not None:
        extra["name_or_path"] = model
    if name == "clip":
        return CLIPScore(**extra)
    if name == "pickscore":
        return PickScore(**extra)
    if name == "aesthetic":
        return LAIONAesthetic(**extra)
    if name == "imagereward":
        return ImageRewardScore(**extra)
    if ":" in objective:
        mod, _, fn = objective.partition(":")
        try:
            f = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError("objective", objective, f"an importable 'module:function' ({e})") from e
        if not callable(f):
            raise ConfigError("objective", objective, "a callable f(images, prompts) -> list[float]")
        return f
    raise ConfigError("objective", objective, "one of " + ", ".join(BUILTIN) + ", 'module:function' or a callable")
