"""Head perturbation guidance as a ``diffusers.guiders.BaseGuidance`` (for modular pipelines).

Modular pipelines call the denoiser once per prediction the guider asks for (``pred_cond``,
``pred_uncond``, ``pred_cond_perturbed``). For the perturbed pass this guider installs mixdit's
head perturbation on the denoiser in "perturb every row in place" mode (same attention transform as
``mixdit.apply(pipe, guidance=...)``, on diffusers' SDPA path, any attention backend the wrapped
processor supports) and removes it afterwards. Combination::

    pred = pred_uncond + w (pred_cond - pred_uncond) + s (pred_cond - pred_cond_perturbed)

(``w`` = ``guidance_scale``; CFG off when ``w == 1``; ``s`` active for steps in
``[perturbed_guidance_start, perturbed_guidance_stop)``.) The denoiser must not carry another
mixdit session while the guider runs.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.guiders.guider_utils import BaseGuidance, GuiderOutput, rescale_noise_cfg

from mixdit.guidance.perturbation import GuidanceConfig


class HeadPerturbationGuidance(BaseGuidance):
    _input_predictions = ["pred_cond", "pred_uncond", "pred_cond_perturbed"]

    @register_to_config
    def __init__(self, guidance_scale: float = 7.0, perturbed_guidance_scale: float = 3.0, heads: str = "L13",
                 softpag: float = 1.0, mode: str = "identity", perturbed_guidance_start: float = 0.0,
                 perturbed_guidance_stop: float = 1.0, guidance_rescale: float = 0.0, start: float = 0.0,
                 stop: float = 1.0, enabled: bool = True):
        super().__init__(start, stop, enabled)
        self.guidance_scale = guidance_scale
        self.perturbed_guidance_scale = perturbed_guidance_scale
        self.guidance_rescale = guidance_rescale
        self.perturbation = GuidanceConfig(heads=heads, scale=1.0, softpag=softpag, mode=mode,
                                           window=(perturbed_guidance_start, perturbed_guidance_stop))
        self.perturbation.validate()
        self._installed = None

    # -- which pass is this ------------------------------------------------------------------
    def _passes(self) -> list[str]:
        order = ["pred_cond"]
        if self._is_cfg_enabled():
            order.append("pred_uncond")
        if self._is_perturbation_enabled():
            order.append("pred_cond_perturbed")
        return order

    def _current_pass(self) -> str:
        passes = self._passes()
        return passes[min(max(self._count_prepared, 1), len(passes)) - 1]

    def prepare_models(self, denoiser: torch.nn.Module) -> None:
        self._count_prepared += 1
        if self._current_pass() == "pred_cond_perturbed" and self._count_prepared > 1:
            import mixdit
            from mixdit.guidance.perturbation import guidance_feature

            mixdit.apply(denoiser, guidance=self.perturbation)
            guidance_feature(denoiser)._perturb_in_place = True
            self._installed = denoiser

    def cleanup_models(self, denoiser: torch.nn.Module) -> None:
        if self._installed is not None:
            import mixdit

            mixdit.remove(self._installed)
            self._installed = None

    def _indices(self):
        passes = self._passes()
        # tuple index 0 = conditional inputs, 1 = unconditional inputs
        return [1 if p == "pred_uncond" else 0 for p in passes], passes

    def prepare_inputs(self, data):
        idx, names = self._indices()
        return [self._prepare_batch(data, i, n) for i, n in zip(idx, names)]

    def prepare_inputs_from_block_state(self, data, input_fields):
        idx, names = self._indices()
        return [self._prepare_batch_from_block_state(input_fields, data, i, n) for i, n in zip(idx, names)]

    # -- combination -------------------------------------------------------------------------
    def forward(self, pred_cond: torch.Tensor, pred_uncond: torch.Tensor | None = None,
                pred_cond_perturbed: torch.Tensor | None = None) -> GuiderOutput:
        pred = pred_cond
        if self._is_cfg_enabled() and pred_uncond is not None:
            pred = pred_uncond + self.guidance_scale * (pred_cond - pred_uncond)
        if self._is_perturbation_enabled() and pred_cond_perturbed is not None:
            pred = pred + self.perturbed_guidance_scale * (pred_cond - pred_cond_perturbed)
        if self.guidance_rescale > 0.0:
            pred = rescale_noise_cfg(pred, pred_cond, self.guidance_rescale)
        return GuiderOutput(pred=pred, pred_cond=pred_cond, pred_uncond=pred_uncond)

    @property
    def is_conditional(self) -> bool:
        return self._current_pass() in ("pred_cond", "pred_cond_perturbed")

    @property
    def num_conditions(self) -> int:
        return len(self._passes())

    def _in_range(self, start: float, stop: float) -> bool:
        if self._num_inference_steps is None:
            return True
        return int(start * self._num_inference_steps) <= self._step < int(stop * self._num_inference_steps)

    def _is_cfg_enabled(self) -> bool:
        return (self._enabled and self._in_range(self._start, self._stop)
                and not math.isclose(self.guidance_scale, 1.0))

    def _is_perturbation_enabled(self) -> bool:
        start, stop = self.perturbation.window
        return (self._enabled and self._in_range(start, stop) and not math.isclose(self.perturbed_guidance_scale, 0.0)
                and self.perturbation.softpag > 0)
