"""Train a testbed model with rectified-flow matching on scenes rendered on the fly.

    mixdit train testbed --model video --out pipelines/testbed/weights/mixdit-shapes-video --steps 100000 --max-minutes 8

Each step draws ``batch_size`` scenes from ``numpy.random.default_rng([seed, step, rank])``,
renders them on the training device, encodes them with the pixel-shuffle codec and normalises
them exactly as the pipeline un-normalises before decoding. Prompts go through the pipeline's own
``encode_prompt`` (with its default ``max_sequence_length``), so training and inference see the
same text conditioning; 10% of captions are dropped to "" for classifier-free guidance.

Flow matching (the convention of SD3's and Wan's schedulers): ``x_s = (1 - s) x0 + s n`` with
``s = shift * u / (1 + (shift - 1) u)``, ``u = sigmoid(N(0, 1))``, timestep ``1000 s``; the
denoiser predicts ``n - x0`` (MSE); a ``high_noise_fraction`` share of each batch draws ``s``
uniformly from ``[high_noise_min, 1)`` instead (why: ``TestbedConfig.high_noise_fraction``). AdamW
with linear warm-up, gradient clipping, EMA of the weights (the EMA weights are what gets saved). The
text encoders train with the denoiser.

The output folder is a complete diffusers pipeline (``save_pretrained``) plus
``testbed_config.json``: the :class:`~mixdit.pipelines.testbed.models.TestbedConfig` used and the
run's record (steps, seconds, loss curve, device). ``--max-minutes`` stops early and still saves;
``--save-every`` saves along the way (so a killed run leaves its last save).
"""

from __future__ import annotations

import inspect
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from mixdit.pipelines.flow_matching import flow_matching_loss, with_sampling_shift
from mixdit.pipelines.testbed.models import TestbedConfig, build_testbed_pipeline
from mixdit.pipelines.testbed.scenes import render, sample_scene

CONFIG_FILE = "testbed_config.json"
# Shipped weights are stored in fp16: half the size in the repository (the EMA weights are small, well
# inside fp16's range, and its 11-bit mantissa is finer than the bf16 the model trains in); loading
# casts them to whatever dtype the caller asks for.
STORAGE_DTYPE = torch.float16


def sample_sigmas(batch: int, shift: float, generator: torch.Generator, device, high_noise_fraction: float = 0.0,
                  high_noise_min: float = 0.96) -> torch.Tensor:
    """Training noise levels: ``shift``-ed logit-normal; a ``high_noise_fraction`` share of them
    uniform on ``[high_noise_min, 1)`` instead (see ``TestbedConfig.high_noise_fraction``)."""
    u = torch.sigmoid(torch.randn(batch, generator=generator))
    sigma = shift * u / (1 + (shift - 1) * u)
    if high_noise_fraction > 0:  # extra draws only then: runs without it keep their random stream
        pick = torch.rand(batch, generator=generator) < high_noise_fraction
        band = high_noise_min + (1 - high_noise_min) * torch.rand(batch, generator=generator)
        sigma = torch.where(pick, band, sigma)
    return sigma.to(device)


class _Trainer:
    def __init__(self, config: TestbedConfig, device: str | None, mixed_precision: str | None,
                 init_from: str | os.PathLike | None = None):
        from accelerate import Accelerator

        cpu = device == "cpu" or (device in (None, "auto") and not torch.cuda.is_available())
        if mixed_precision is None:
            mixed_precision = "no" if cpu else "bf16"
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision)
        self.config = config
        self.device = self.accelerator.device
        if init_from is not None:  # continue from a saved testbed pipeline (its EMA weights)
            from diffusers import DiffusionPipeline

            import mixdit.pipelines.testbed.codec  # noqa: F401  (the codec class must be imported to load)

            self.pipe = DiffusionPipeline.from_pretrained(str(init_from), dtype=torch.float32)
            self.pipe.scheduler = with_sampling_shift(self.pipe.scheduler, config.sampling_shift)
        else:
            self.pipe = build_testbed_pipeline(config)
        pipe = self.pipe
        self.video = config.kind == "video"
        self.text_encoders = [m for m in (getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2",
                                                                             "text_encoder_3")) if m is not None]
        for m in [pipe.transformer, *self.text_encoders, pipe.vae]:
            m.to(self.device)
        for m in self.text_encoders:
            m.requires_grad_(config.train_text_encoder)
            m.train(config.train_text_encoder)
        pipe.transformer.train()
        self.trainable = [pipe.transformer] + (self.text_encoders if config.train_text_encoder else [])
        params = [p for m in self.trainable for p in m.parameters() if p.requires_grad]
        self.params = params
        self.optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=(0.9, 0.99),
                                           weight_decay=config.weight_decay, fused=self.device.type == "cuda")
        warm = max(config.warmup_steps, 1)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        self.model = self.accelerator.prepare(pipe.transformer)
        self.optimizer, self.scheduler = self.accelerator.prepare(self.optimizer, self.scheduler)
        self.ema = [p.detach().float().clone() for p in params]
        self.max_sequence_length = inspect.signature(type(pipe).__call__).parameters["max_sequence_length"].default
        seed = config.seed * 1000 + self.accelerator.process_index
        self.generator = torch.Generator().manual_seed(seed)  # noise levels
        self.noise_generator = torch.Generator(self.device).manual_seed(seed)  # noise, drawn where it is used

    # -- one batch ------------------------------------------------------------------------------
    def batch(self, step: int):
        c = self.config
        rng = np.random.default_rng([c.seed, step, self.accelerator.process_index])
        scenes = [sample_scene(rng, self.video) for _ in range(c.batch_size)]
        captions = [s.caption() if rng.uniform() >= c.caption_dropout else "" for s in scenes]
        pixels = render(scenes, c.height, c.num_frames if self.video else 1, device=self.device) * 2 - 1
        with torch.no_grad():
            x0 = self.pipe.vae.normalize(self.pipe.vae.encode(pixels).latent_dist.sample())
        return captions, x0

    def encode(self, captions):
        p = self.pipe
        if self.video:
            embeds, _ = p.encode_prompt(captions, do_classifier_free_guidance=False,
                                        max_sequence_length=self.max_sequence_length, device=self.device)
            return dict(encoder_hidden_states=embeds)
        embeds, _, pooled, _ = p.encode_prompt(captions, None, None, device=self.device,
                                               do_classifier_free_guidance=False,
                                               max_sequence_length=self.max_sequence_length)
        return dict(encoder_hidden_states=embeds, pooled_projections=pooled)

    def step(self, step: int) -> float:
        c = self.config
        captions, x0 = self.batch(step)
        b = x0.shape[0]
        sigma = sample_sigmas(b, c.flow_shift, self.generator, self.device, c.high_noise_fraction, c.high_noise_min)

        def predict(x_t):
            with self.accelerator.autocast():
                cond = self.encode(captions)
                return self.model(hidden_states=x_t, timestep=sigma * 1000, return_dict=False, **cond)[0]

        loss = flow_matching_loss(predict, x0, sigma, self.noise_generator)
        self.accelerator.backward(loss)
        if self.accelerator.num_processes > 1 and c.train_text_encoder:  # text encoders are not DDP-wrapped
            for m in self.text_encoders:
                for p in m.parameters():
                    if p.grad is not None:
                        p.grad = self.accelerator.reduce(p.grad, reduction="mean")
        if c.grad_clip:
            self.accelerator.clip_grad_norm_(self.params, c.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        decay = min(c.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(self.ema, [p.detach().float() for p in self.params], 1 - decay)
        return loss.detach()  # a tensor: no host sync per step

    # -- saving ---------------------------------------------------------------------------------
    def save(self, out_dir: Path, record: dict) -> None:
        self.accelerator.wait_for_everyone()
        if not self.accelerator.is_main_process:
            return
        live = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, e in zip(self.params, self.ema):
                p.copy_(e.to(p.dtype))
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
            self.pipe.save_pretrained(out_dir)
            store_weights_as(out_dir, STORAGE_DTYPE)
            payload = {"config": self.config.to_dict(), "training": record}
            (out_dir / CONFIG_FILE).write_text(json.dumps(payload, indent=2))
        finally:
            with torch.no_grad():
                for p, v in zip(self.params, live):
                    p.copy_(v)


def train_testbed(config: TestbedConfig, out_dir: str | os.PathLike, steps: int, *, max_minutes: float | None = None,
                  save_every: int | None = None, log_every: int = 50, device: str | None = None,
                  mixed_precision: str | None = None, resume: bool = False, log=print) -> dict:
    """Train and save a testbed pipeline; returns the training record (also in ``testbed_config.json``).

    ``resume=True`` continues from the pipeline already saved in ``out_dir`` (its config and EMA
    weights; the optimizer state starts afresh, the data continues with new seeds), so several
    time-limited runs add up: ``steps`` counts the new steps."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    first_step, history = 0, []
    init_from = None
    if resume and (out_dir / CONFIG_FILE).is_file():
        saved = read_testbed_config(out_dir)
        from mixdit.pipelines.testbed.models import TestbedConfig as _C

        previous = _C.from_dict(saved["config"])
        if previous.kind != config.kind:
            from mixdit.errors import ConfigError

            raise ConfigError("testbed.model", config.kind, f"{previous.kind} (what {out_dir} holds) to resume")
        # the recipe (optimiser, noise levels, sampler defaults) follows the preset; the architecture stays
        for key in ("batch_size", "learning_rate", "warmup_steps", "ema_decay", "seed", "high_noise_fraction",
                    "high_noise_min", "sample_flow_shift", "default_steps", "default_guidance_scale"):
            setattr(previous, key, getattr(config, key))
        config = previous
        first_step = int(saved["training"].get("total_steps", saved["training"]["steps"]))
        history = saved["training"].get("runs", []) + [{k: saved["training"].get(k) for k in
                                                         ("steps", "seconds", "final_loss", "device")}]
        init_from = out_dir
        log(f"resuming from {out_dir} after {first_step} steps")
    trainer = _Trainer(config, device, mixed_precision, init_from=init_from)
    acc = trainer.accelerator
    losses: list[float] = []
    pending: list[torch.Tensor] = []  # losses of steps not read back yet
    curve: list[dict] = []
    done = 0
    budget = None if max_minutes is None else max_minutes * 60
    save_seconds = 0.0
    step_seconds = 0.0
    record: dict = {}

    def make_record(final: bool) -> dict:
        return {"steps": done, "requested_steps": steps, "seconds": round(time.perf_counter() - start, 1),
                "seconds_per_step": round(step_seconds / max(done, 1), 4), "loss_curve": curve,
                "final_loss": curve[-1]["loss"] if curve else None, "device": _device_name(acc.device),
                "num_processes": acc.num_processes, "mixed_precision": acc.mixed_precision,
                "batch_size_per_process": config.batch_size, "finished": final,
                "visual_tokens_per_sample": config.num_visual_tokens, "total_steps": first_step + done,
                "runs": history}

    for step in range(steps):
        if budget is not None and done > 0:
            projected = time.perf_counter() - start + step_seconds / done + 2 * save_seconds + 5
            if projected > budget:
                log(f"time budget reached after {done} steps")
                break
        t0 = time.perf_counter()
        pending.append(trainer.step(first_step + step))
        done += 1
        if done % log_every == 0 or done == steps or step < 3:
            losses.extend(torch.stack(pending).float().cpu().tolist())  # the one host sync per log interval
            pending.clear()
        step_seconds += time.perf_counter() - t0
        if done % log_every == 0 or done == steps:
            window = losses[-log_every:]
            curve.append({"step": done, "loss": round(float(np.mean(window)), 5)})
            log(f"step {done}/{steps} loss {curve[-1]['loss']:.4f} "
                f"({step_seconds / done:.3f} s/step, lr {trainer.scheduler.get_last_lr()[0]:.2e})")
        if save_every and done % save_every == 0 and done < steps:
            t1 = time.perf_counter()
            trainer.save(out_dir, make_record(final=False))
            save_seconds = max(save_seconds, time.perf_counter() - t1)
    if pending:
        losses.extend(torch.stack(pending).float().cpu().tolist())
    if not curve or curve[-1]["step"] != done:
        window = losses[-log_every:] or [float("nan")]
        curve.append({"step": done, "loss": round(float(np.mean(window)), 5)})
    record = make_record(final=True)
    record["losses"] = [round(v, 5) for v in losses] if len(losses) <= 200 else None
    trainer.save(out_dir, record)
    log(f"saved {out_dir} ({done} steps, {record['seconds']} s)")
    return record


def store_weights_as(folder: str | os.PathLike, dtype: torch.dtype) -> None:
    """Rewrite every floating-point tensor of the ``*.safetensors`` files under ``folder`` in ``dtype``."""
    from safetensors.torch import load_file, save_file

    for path in Path(folder).rglob("*.safetensors"):
        tensors = load_file(str(path))
        if all(not t.is_floating_point() or t.dtype == dtype for t in tensors.values()):
            continue
        converted = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
        save_file(converted, str(path), metadata={"format": "pt"})


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return str(device)


def read_testbed_config(folder: str | os.PathLike) -> dict:
    path = Path(folder) / CONFIG_FILE
    return json.loads(path.read_text()) if path.exists() else {}


__all__ = ["train_testbed", "read_testbed_config", "sample_sigmas", "CONFIG_FILE"]
