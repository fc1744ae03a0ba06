"""Installs VMoBA through ``mixdit.apply(pipe, vmoba=VMoBAConfig(...))``.

Every self-attention module of a supported video DiT gets mixdit's processor; the algorithm itself
lives in :mod:`mixdit.attention.vmoba`. Cross-attention is never touched (Wan's ``attn2``).
"""

from __future__ import annotations

import torch

from mixdit.api import Feature, register_feature
from mixdit.attention.vmoba import VMoBAConfig, VMoBAStats, layer_type_for, vmoba_attention, vmoba_dense_reason

RECHECK_EVERY = 50  # calls between two measurements of a layer's tile density (~once per 50-step generation)


@register_feature
class VMoBAFeature(Feature):
    keyword = "vmoba"
    config_class = VMoBAConfig
    supported_families = ("wan", "hunyuan_video", "cogvideox")

    def __init__(self, config, adapter, pipe):
        super().__init__(config, adapter, pipe)
        self.stats = VMoBAStats()
        # (module name, grid) -> [runs dense?, calls left before the next measurement]
        self._fallback: dict[tuple, list] = {}
        self.dense_calls: dict[str, int] = {}  # reason -> calls kept dense by a documented rule

    def sites(self, model, denoiser_name):
        return self.adapter.attention_sites(model)  # both Wan 2.2 experts: called once per denoiser

    def wants(self, site, ctx):
        if ctx.grid is None:
            return False
        reason = vmoba_dense_reason(self.config, ctx.step_index, ctx.num_steps, site.layer_index,
                                    ctx.num_visual_tokens)
        entry = self._fallback.get((site.name, ctx.grid))
        if reason is None and entry is not None and entry[0] and entry[1] > 0:  # sparsity did not pay here
            entry[1] -= 1
            reason = "max_tile_density:" + layer_type_for(site.layer_index, self.config)
        if reason is not None:
            self.dense_calls[reason] = self.dense_calls.get(reason, 0) + 1
            return False
        return True

    def attend(self, call):
        ctx = call.ctx
        if call.extra or call.query.shape[2] != ctx.num_visual_tokens + ctx.text_len:
            return None  # an attention call VMoBA does not understand (dropout, GQA, ...): stay dense
        key_mask = _key_mask(call.attn_mask, call.query.shape[0], call.key.shape[2])
        if key_mask is False:
            return None
        q, k, v = (t.transpose(1, 2) for t in (call.query, call.key, call.value))  # views, [B, S, H, D]
        probe = VMoBAStats()
        out = vmoba_attention(q, k, v, grid=ctx.grid, layer_index=call.site.layer_index, config=self.config,
                              scale=call.scale, text_len=ctx.text_len,
                              text_position=ctx.text_position if ctx.text_len else "none",
                              stats=probe, text_key_mask=key_mask)
        for lt in probe.counts:
            self.stats.record(lt, probe.sums.get(lt), probe.tile_sums.get(lt))
        self._update_fallback(call.site.name, ctx.grid, probe)
        return out.transpose(1, 2)

    def _update_fallback(self, name, grid, probe: VMoBAStats) -> None:
        """The documented dense-fallback rule (``VMoBAConfig.max_tile_density``)."""
        if self.config.max_tile_density >= 1.0:
            return
        key = (name, grid)
        entry = self._fallback.setdefault(key, [False, 0])
        if entry[1] > 0:  # not due for a measurement
            entry[1] -= 1
            return
        tiles = [float(t) for t in probe.tile_sums.values()]  # one host sync
        entry[0] = bool(tiles) and max(tiles) > self.config.max_tile_density
        entry[1] = RECHECK_EVERY - 1

    def summary(self):
        return {"config": {"selection": self.config.selection, "threshold": self.config.threshold,
                           "granularity": self.config.granularity},
                "density": self.stats.as_dict(),
                "dense_calls": dict(self.dense_calls)}


def _key_mask(attn_mask, batch: int, num_keys: int):
    """A boolean ``[B, num_keys]`` key mask from SDPA's ``attn_mask``, None if absent, False if the
    mask is more than a key mask (then VMoBA defers to dense attention)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype != torch.bool or attn_mask.shape[-1] != num_keys:
        return False
    m = attn_mask.reshape(attn_mask.shape[0], -1, num_keys)
    if m.shape[1] != 1:
        return False
    return m[:, 0].expand(batch, num_keys)
