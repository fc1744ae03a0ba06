"""Installs VMoBA through ``mixdit.apply(pipe, vmoba=VMoBAConfig(...))``.

Every self-attention module of a supported video DiT gets mixdit's processor; the algorithm itself
lives in :mod:`mixdit.attention.vmoba`. Cross-attention is never touched (Wan's ``attn2``).
"""

from __future__ import annotations

import torch

from mixdit.api import Feature, register_feature
from mixdit.attention.vmoba import (VMoBAConfig, VMoBAStats, layer_type_for, vmoba_attention, vmoba_dense_reason,
                                    vmoba_fallback_reason)

RECHECK_EVERY = 50  # calls between two measurements of a layer (~once per 50-step generation)


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
        self.last_timing: dict[str, dict] = {}  # module name -> sparse/dense ms of its last measuring call (GPU)
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
            reason = entry[0] + ":" + layer_type_for(site.layer_index, self.config)
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
        key = (call.site.name, ctx.grid)
        # a layer's first sparse call compiles and warms the kernels: its time would mislead, so the
        # timed measurement is the next call (GPU only; the tile-share rule applies from the first)
        warmup = key not in self._fallback
        timed = self._due(key) and not warmup and self.config.max_tile_density < 1.0 and q.is_cuda
        if timed:  # the measuring call on a GPU: time the sparse path and dense attention on the same inputs
            marks = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
            marks[0].record()
        out = vmoba_attention(q, k, v, grid=ctx.grid, layer_index=call.site.layer_index, config=self.config,
                              scale=call.scale, text_len=ctx.text_len,
                              text_position=ctx.text_position if ctx.text_len else "none",
                              stats=probe, text_key_mask=key_mask)
        timing = None
        if timed:
            marks[1].record()
            call.dense()
            marks[2].record()
            marks[2].synchronize()
            timing = (marks[0].elapsed_time(marks[1]), marks[1].elapsed_time(marks[2]))
        for lt in probe.counts:
            self.stats.record(lt, probe.sums.get(lt), probe.tile_sums.get(lt))
        self._update_fallback(key, probe, timing, time_next_call=warmup and q.is_cuda)
        return out.transpose(1, 2)

    def _due(self, key) -> bool:
        entry = self._fallback.get(key)
        return entry is None or entry[1] <= 0

    def _update_fallback(self, key, probe: VMoBAStats, timing: tuple[float, float] | None,
                         time_next_call: bool = False) -> None:
        """The documented dense-fallback rule (``VMoBAConfig.max_tile_density``): on a measuring call a
        layer is kept dense until its next measurement when its tile share exceeds ``max_tile_density``
        or, on a GPU, when the sparse path (router + kernel) took longer than dense attention on the
        same inputs. ``entry = [reason it runs dense or None, calls before the next measurement]``."""
        if self.config.max_tile_density >= 1.0:
            return
        entry = self._fallback.setdefault(key, [None, 0])
        if entry[1] > 0:  # not due for a measurement
            entry[1] -= 1
            return
        tiles = [float(t) for t in probe.tile_sums.values()]  # one host sync
        entry[0] = vmoba_fallback_reason(self.config, max(tiles) if tiles else None, *(timing or ()))
        if timing is not None:
            self.last_timing[key[0]] = {"sparse_ms": round(timing[0], 3), "dense_ms": round(timing[1], 3)}
        entry[1] = 0 if time_next_call and entry[0] is None else RECHECK_EVERY - 1

    def summary(self):
        return {"config": {"selection": self.config.selection, "threshold": self.config.threshold,
                           "granularity": self.config.granularity, "exact_kernel": self.config.exact_kernel},
                "density": self.stats.as_dict(),
                "dense_calls": dict(self.dense_calls),
                "last_timing": dict(self.last_timing)}


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
