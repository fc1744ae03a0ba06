"""mixdit.kernels.block_sparse_attention vs the naive reference (CPU via TRITON_INTERPRET, and CUDA)."""

import importlib
import math

import pytest
import torch

from mixdit.kernels import block_sparse_attention
from mixdit.kernels.block_sparse_attention import BlockSparseAttentionFunction, transpose_layout
from mixdit.kernels.reference import block_sparse_attention_reference, dense_layout, random_layout

# the module shares its name with the exported function: fetch the module itself
bsa = importlib.import_module("mixdit.kernels.block_sparse_attention")

HAS_CUDA = torch.cuda.is_available()
gpu = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")]


@pytest.fixture(autouse=True)
def poison_outputs(monkeypatch):
    # every launcher output starts as NaN: an unwritten element fails the comparison
    monkeypatch.setattr(bsa, "_POISON_OUTPUTS", True)


@pytest.fixture(params=["new", "old", "tma", "atomic", "atomic-tma"])
def bwd_path(request, monkeypatch):
    """Backward code paths: new (padded lse/delta; TMA where the GPU has it), old (MIXDIT_BWD_TMA=0),
    tma (descriptors forced, so the CPU interpreter runs the TMA code too; on CUDA the same as new), and the
    dQ-by-atomics backward (MIXDIT_BWD_DQ=atomic): atomic, and atomic-tma (descriptors forced, CPU only).
    The atomic path's TMA reduce-adds (not in the interpreter) have their own GPU test."""
    path = request.param
    on = path != "old"
    monkeypatch.setitem(bsa._BWD_OPTS, "tma", on)
    monkeypatch.setitem(bsa._BWD_OPTS, "padded", on)
    monkeypatch.setitem(bsa._BWD_OPTS, "dq", "atomic" if path.startswith("atomic") else "split")
    monkeypatch.setitem(bsa._BWD_OPTS, "dq_tma_reduce", False)
    if path in ("tma", "atomic-tma"):
        if HAS_CUDA:
            pytest.skip("on CUDA the new path already uses TMA where it can")
        monkeypatch.setattr(bsa, "_tma_ok", lambda *ts: True)
    return path


def _inputs(B, Sq, Sk, H, D, dtype, device):
    q = torch.randn(B, Sq, H, D, dtype=dtype, device=device)
    k = torch.randn(B, Sk, H, D, dtype=dtype, device=device)
    v = torch.randn(B, Sk, H, D, dtype=dtype, device=device)
    return q, k, v


def _row_select_words(bits: torch.Tensor) -> torch.Tensor:
    """bool [B, H, S, groups <= 64] -> the kernels' int32 bitmask words [B, H, S, 2] (bit g % 32 of word g // 32)."""
    B, H, S, groups = bits.shape
    padded = torch.zeros(B, H, S, 64, dtype=torch.int64, device=bits.device)
    padded[..., :groups] = bits.long()
    words = (padded.view(B, H, S, 2, 32) * (1 << torch.arange(32, dtype=torch.int64, device=bits.device))).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _check_all(assert_close, q, k, v, layout, *, q_tile, kv_tile, grad=True, lse_grad=False, fn=None, **extra):
    """Compare out, lse (and dq, dk, dv) with the fp32 and same-dtype references under the tolerance rule."""
    kv_count, kv_index = layout
    fn = fn or (lambda *a, **kw: block_sparse_attention(*a, **kw))
    leaves = [t.detach().clone().requires_grad_(grad) for t in (q, k, v)]
    out, lse = fn(*leaves, kv_count, kv_index, q_tile=q_tile, kv_tile=kv_tile, **extra)
    refs = {}
    for name, upcast in (("fp32", True), ("same", False)):
        src = [t.detach().float() if upcast else t.detach() for t in (q, k, v)]
        src = [t.clone().requires_grad_(grad) for t in src]
        r_out, r_lse = block_sparse_attention_reference(*[t.to(q.dtype) if not upcast else t for t in src],
                                                        kv_count, kv_index, q_tile=q_tile, kv_tile=kv_tile,
                                                        upcast=upcast, **extra)
        if upcast:  # the fp32 reference must not round its output back to bf16/fp16
            r_out, r_lse = _ref_fp32(src, kv_count, kv_index, q_tile, kv_tile, extra)
        refs[name] = (src, r_out, r_lse)
    assert_close("out", out, refs["same"][1], refs["fp32"][1])
    assert_close("lse", lse, refs["same"][2], refs["fp32"][2])
    if not grad:
        return out, lse
    g_out = torch.randn_like(out, dtype=torch.float32)
    g_lse = torch.randn_like(lse) if lse_grad else None

    def loss(o, l):
        val = (o.float() * g_out).sum()
        if g_lse is not None:
            val = val + (l * g_lse).sum()
        return val

    loss(out, lse).backward()
    for name in refs:
        src, r_out, r_lse = refs[name]
        loss(r_out, r_lse).backward()
    for i, nm in enumerate(("dq", "dk", "dv")):
        assert_close(nm, leaves[i].grad, refs["same"][0][i].grad, refs["fp32"][0][i].grad, gradient=True)
    return out, lse


def _ref_fp32(src, kv_count, kv_index, q_tile, kv_tile, extra):
    # reference in fp32 end to end: feed fp32 tensors (the reference keeps the input dtype)
    return block_sparse_attention_reference(*src, kv_count, kv_index, q_tile=q_tile, kv_tile=kv_tile,
                                            upcast=True, **extra)


# ------------------------------------------------------------------------------------------------
# CPU + CUDA (tiny shapes: the interpreter is slow)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,D,q_tile,kv_tile,Sq,Sk,density",
    [
        (torch.float16, 64, 64, 64, 200, 200, 0.5),     # ragged last tile
        (torch.bfloat16, 64, 128, 64, 160, 230, 0.6),   # Sq != Sk, q tile spans two kernel blocks
        (torch.bfloat16, 128, 128, 128, 130, 260, 0.7),
        (torch.float16, 32, 64, 128, 96, 300, 0.5),
    ],
)
def test_random_layout(bwd_path, assert_close, device, dtype, D, q_tile, kv_tile, Sq, Sk, density):
    B, H = 2, 2
    q, k, v = _inputs(B, Sq, Sk, H, D, dtype, device)
    layout = random_layout(B, H, Sq, Sk, density, q_tile, kv_tile, device=device)
    _check_all(assert_close, q, k, v, layout, q_tile=q_tile, kv_tile=kv_tile, lse_grad=True)


def test_diagonal_only_and_all_tiles(bwd_path, assert_close, device):
    B, H, S, D = 1, 2, 192, 64
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, device)
    kv_count, kv_index = random_layout(B, H, S, S, 0.0, 64, 64, device=device)  # diagonal only
    dc, di = dense_layout(B, H, S, S, 64, 64, device=device)
    # head 0: diagonal only; head 1: every tile (in shuffled order)
    kv_count[:, 1] = dc[:, 1]
    kv_index[:, 1] = di[:, 1][..., torch.randperm(di.shape[-1], device=device)]
    _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=64, kv_tile=64)


@pytest.mark.parametrize("T", [64, 32])
def test_masks_len_rowselect_empty(bwd_path, assert_close, device, T):
    """kv_tile_len padding, row_select bitmasks (incl. a fully masked first visited tile) and empty rows."""
    B, H, S, D = 2, 2, 256, 64
    n_t = S // T
    q, k, v = _inputs(B, S, S, H, D, torch.float16, device)
    kv_count, kv_index = random_layout(B, H, S, S, 0.6, T, T, device=device)
    kv_count[0, 0, 1] = 0  # a query tile with no tile at all: out 0, lse -inf
    kv_tile_len = torch.randint(1, T + 1, (n_t,), dtype=torch.int32, device=device)
    kv_tile_len[0] = T
    groups = 40  # two bitmask words
    kv_tile_group = torch.randint(0, groups, (n_t,), dtype=torch.int32, device=device)
    bits = torch.rand(B, H, S, groups, device=device) < 0.5
    # rows whose first visited tile is masked but a later one is visible
    first = kv_tile_group[kv_index[..., 0].long()]  # [B, H, n_qt]
    first_rows = first.repeat_interleave(T, dim=-1)[..., :S]
    bits.scatter_(3, first_rows.unsqueeze(-1).long(), False)
    bits[1, 1, 5:9] = False  # rows that see nothing
    row_select = _row_select_words(bits)
    out, lse = _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=T, kv_tile=T,
                          kv_tile_len=kv_tile_len, row_select=row_select, kv_tile_group=kv_tile_group)
    assert torch.isinf(lse[1, 1, 5:9]).all() and (out[1, 5:9, 1] == 0).all()
    assert torch.isinf(lse[0, 0, T:2 * T]).all()


@pytest.mark.parametrize("masks,T", [("none", 128), ("len", 128), ("len+sel", 128), ("len", 256), ("len+sel", 256)])
def test_loop_prefetch_128_key_blocks(monkeypatch, bwd_path, assert_close, device, masks, T):
    """128-key forward and dQ blocks (the GPU configs; the interpreter's default is 64): the forward loads the
    masks' per-tile data (kv_tile_len, group, row bits) one step ahead (a version that lags one step fails here):
    ragged keys, an empty query tile, a query tile visiting one tile, slots whose next step is past the count;
    256-key tiles take two 128-key steps per tile (the next step's data is the same tile's, then the next's)."""
    monkeypatch.setitem(bsa._CONFIG_OVERRIDE, "fwd", (64, 128, 4, 1))
    monkeypatch.setitem(bsa._CONFIG_OVERRIDE, "dq", (64, 128, 4, 1))
    B, H, S, D = 1, 2, 600, 64
    n_t = -(-S // T)
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, device)
    kv_count, kv_index = random_layout(B, H, S, S, 0.6, T, T, device=device)
    kv_count[0, 0, 1] = 0
    kv_count[0, 1, 2] = 1
    extra = {}
    if masks != "none":
        extra["kv_tile_len"] = torch.randint(1, T + 1, (n_t,), dtype=torch.int32, device=device)
    if masks == "len+sel":
        extra["kv_tile_group"] = torch.arange(n_t, dtype=torch.int32, device=device)
        extra["row_select"] = torch.randint(-2**31, 2**31 - 1, (B, H, S, 1), dtype=torch.int64,
                                            device=device).to(torch.int32)
    out, lse = _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=T, kv_tile=T, **extra)
    assert torch.isinf(lse[0, 0, T:2 * T]).all() and (out[0, T:2 * T, 0] == 0).all()


@pytest.mark.parametrize("q_tile,T,fwd_cfg", [(64, 32, None), (128, 32, (64, 32, 4, 1)), (16, 16, None),
                                             (64, 128, (64, 128, 4, 1))])
def test_slot_masks(monkeypatch, assert_close, device, q_tile, T, fwd_cfg):
    """The forward's per-slot masks (slot_masks_below): row_select transposed to the visited slots, with each slot's
    key length, both loaded a step ahead, equal the reference on ragged keys, groups in several bitmask words, rows
    that see nothing, an empty query tile and a query tile of one slot; with a program smaller than the query tile
    (64 rows of 128), 16-row query tiles (one half-used word) and 128-key steps. slot_masks itself: every bit and
    length against torch. The row words (what layouts over the masks' memory cap read) on the same inputs too."""
    if fwd_cfg is not None:
        monkeypatch.setitem(bsa._CONFIG_OVERRIDE, "fwd", fwd_cfg)
    B, H, S, D = 2, 2, 300, 64
    n_t = -(-S // T)
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, device)
    kv_count, kv_index = random_layout(B, H, S, S, 0.6, q_tile, T, device=device)
    kv_count[0, 0, 1] = 0
    kv_count[1, 1, 0] = 1
    kv_tile_len = torch.randint(1, T + 1, (n_t,), dtype=torch.int32, device=device)
    groups = 45  # two words
    kv_tile_group = torch.randint(0, groups, (n_t,), dtype=torch.int32, device=device)
    bits = torch.rand(B, H, S, groups, device=device) < 0.5
    bits[1, 0, 7:40] = False
    row_select = _row_select_words(bits)
    masks = bsa.slot_masks(row_select, kv_count, kv_index, kv_tile_group, q_tile, kv_tile_len)
    per_word = min(32, q_tile)
    got = ((masks[..., :-1, None] >> torch.arange(per_word, device=device)) & 1).flatten(-2).bool()  # [..,cap,q_tile]
    n_qt = kv_count.shape[-1]
    for b in range(B):
        for h in range(H):
            for qt in range(n_qt):
                rows = torch.arange(qt * q_tile, min(S, (qt + 1) * q_tile), device=device)
                for slot in range(int(kv_count[b, h, qt])):
                    g = int(kv_tile_group[kv_index[b, h, qt, slot]])
                    assert torch.equal(got[b, h, qt, slot, :len(rows)], bits[b, h, rows, g]), (b, h, qt, slot)
                    assert masks[b, h, qt, slot, -1] == kv_tile_len[kv_index[b, h, qt, slot]]
                    assert not got[b, h, qt, slot, len(rows):].any()
    for below in (1 << 30, 0):  # slot masks, then the row words
        monkeypatch.setitem(bsa._FWD_OPTS, "slot_masks_below", below)
        out, lse = _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=q_tile, kv_tile=T, grad=False,
                              fn=bsa.block_sparse_attention_forward, kv_tile_len=kv_tile_len, row_select=row_select,
                              kv_tile_group=kv_tile_group)
        assert torch.isinf(lse[1, 0, 7:40]).all() and (out[1, 7:40, 0] == 0).all()


@pytest.mark.parametrize("q_tile,T,fwd_cfg", [(64, 32, None), (128, 128, (64, 128, 4, 1)), (64, 64, None)])
def test_full_first(monkeypatch, assert_close, device, q_tile, T, fwd_cfg):
    """kv_full: the layout puts the groups every row of a query tile selects first and counts them; the forward
    runs those slots without row masks and equals the reference (slot masks at 32-key steps, row words at 64 / 128,
    ragged keys, the last query tile partial) in the forward and through autograd. A false promise (every slot
    called full) must change the result: the unmasked loop is used."""
    from mixdit.kernels.router_reference import tile_layout_from_selection

    if fwd_cfg is not None:
        monkeypatch.setitem(bsa._CONFIG_OVERRIDE, "fwd", fwd_cfg)
    B, H, S, D, groups = 2, 2, 300, 64, 7
    n_t, n_qt = -(-S // T), -(-S // q_tile)
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, device)
    kv_tile_group = torch.randperm(n_t, device=device).remainder(groups).to(torch.int32)
    kv_tile_len = torch.randint(1, T + 1, (n_t,), dtype=torch.int32, device=device)
    sel = torch.rand(B, H, S, groups, device=device) < 0.35
    tile_of_row = torch.arange(S, device=device) // q_tile
    forced = torch.rand(B, H, n_qt, groups, device=device) < 0.4  # (query tile, group) pairs every row selects
    sel |= forced[:, :, tile_of_row]
    sel[0, 1, -(S % q_tile):] = True  # a partial last tile whose rows select everything
    kv_count, kv_index, kv_full = tile_layout_from_selection(sel, kv_tile_group, q_tile, full_first=True)
    plain_count, plain_index = tile_layout_from_selection(sel, kv_tile_group, q_tile)
    assert torch.equal(kv_count, plain_count)
    for b in range(B):
        for h in range(H):
            for qt in range(n_qt):
                c, f = int(kv_count[b, h, qt]), int(kv_full[b, h, qt])
                assert sorted(kv_index[b, h, qt, :c].tolist()) == plain_index[b, h, qt, :c].tolist()
                rows = sel[b, h, qt * q_tile:(qt + 1) * q_tile]
                full_groups = {g for g in range(groups) if bool(rows[:, g].all())}
                slot_groups = kv_tile_group[kv_index[b, h, qt, :c].long()].tolist()
                assert all(g in full_groups for g in slot_groups[:f])
                assert not any(g in full_groups for g in slot_groups[f:])
    assert 0 < int(kv_full.sum()) < int(kv_count.sum())
    row_select = _row_select_words(sel)
    extra = dict(kv_tile_len=kv_tile_len, row_select=row_select, kv_tile_group=kv_tile_group)
    _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=q_tile, kv_tile=T, grad=False,
               fn=bsa.block_sparse_attention_forward, kv_full=kv_full, **extra)
    _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=q_tile, kv_tile=T, kv_full=kv_full, **extra)
    right, _ = bsa.block_sparse_attention_forward(q, k, v, kv_count, kv_index, q_tile=q_tile, kv_tile=T,
                                                  kv_full=kv_full, **extra)
    wrong, _ = bsa.block_sparse_attention_forward(q, k, v, kv_count, kv_index, q_tile=q_tile, kv_tile=T,
                                                  kv_full=kv_count, **extra)
    assert (wrong.float() - right.float()).abs().max() > 0.05


@pytest.mark.parametrize("T", [16, 32, 64])  # 16: 19 key tiles, an odd count for the paired dK/dV programs
def test_small_tiles_padded(bwd_path, assert_close, device, T):
    """Small whole key tiles (VMoBA's 3D layers: 32 keys) with padded tiles, a ragged key length, query tiles
    visiting one or a few tiles, and an empty query tile."""
    B, H, S, D = 2, 2, 300, 64
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, device)
    kv_count, kv_index = random_layout(B, H, S, S, 0.5, T, T, device=device)
    kv_count[1, 0, 2] = 0
    kv_count[0, 1, 0] = 1
    kv_count[0, 1, 1] = min(3, int(kv_count[0, 1, 1]))
    n_t = -(-S // T)
    kv_tile_len = torch.randint(1, T + 1, (n_t,), dtype=torch.int32, device=device)
    out, lse = _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=T, kv_tile=T, kv_tile_len=kv_tile_len,
                          lse_grad=True)
    assert torch.isinf(lse[1, 0, 2 * T:3 * T]).all() and (out[1, 2 * T:3 * T, 0] == 0).all()


@pytest.mark.parametrize("T,S,lens,fwd_cfg", [(64, 200, [64, 1, 37, 8], None), (128, 300, [128, 40, 100], None),
                                              (128, 300, [128, 40, 100], (64, 128, 4, 1))])
def test_kv_tile_len_only(monkeypatch, bwd_path, assert_close, device, T, S, lens, fwd_cfg):
    """kv_tile_len padding without row_select (the atomic dQ masks padding keys out of p on its own).
    128-key tiles: two 64-key sub-blocks in the interpreter, one of them all padding (40) or partial (100);
    with 128-key forward blocks (fwd_cfg) the forward masks only the partial tiles (its BLOCK_N >= 128 path)."""
    if fwd_cfg is not None:
        monkeypatch.setitem(bsa._CONFIG_OVERRIDE, "fwd", fwd_cfg)
    B, H, D = 1, 2, 64
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, device)
    layout = random_layout(B, H, S, S, 0.7, T, T, device=device)
    kv_tile_len = torch.tensor(lens, dtype=torch.int32, device=device)
    _check_all(assert_close, q, k, v, layout, q_tile=T, kv_tile=T, kv_tile_len=kv_tile_len, lse_grad=True)


@pytest.mark.parametrize("mode", ["split", "atomic"])
@pytest.mark.parametrize("bm,bn,dtype", [(32, 128, torch.float16), (128, 32, torch.bfloat16), (16, 64, torch.float16)])
def test_bwd_block_sizes(monkeypatch, assert_close, device, mode, bm, bn, dtype):
    """dK/dV kernel blocks smaller than, equal to and (clipped) larger than the layout tiles, in both dQ modes."""
    if HAS_CUDA and dtype is torch.float16 and bm == 16:
        pytest.skip("16-row blocks are an interpreter-only check")
    monkeypatch.setitem(bsa._BWD_OPTS, "dq", mode)
    for kind in ("dkdv", "dkdv_atomic", "dq"):
        monkeypatch.setitem(bsa._CONFIG_OVERRIDE, kind, (bm, bn, 4, 2))
    B, H, Sq, Sk, D = 1, 2, 150, 190, 64
    q, k, v = _inputs(B, Sq, Sk, H, D, dtype, device)
    layout = random_layout(B, H, Sq, Sk, 0.6, 64, 128, device=device)
    _check_all(assert_close, q, k, v, layout, q_tile=64, kv_tile=128, lse_grad=True)


def test_atomic_matches_split(device):
    """Same dK/dV bits in both dQ modes (CPU: same blocks, same order) and dQ equal up to summation order,
    with kv_tile_len padding, row_select bitmasks and empty rows."""
    B, H, S, D, T = 1, 2, 192, 64, 64
    n_t = S // T
    q, k, v = _inputs(B, S, S, H, D, torch.float16, device)
    kc, ki = random_layout(B, H, S, S, 0.7, T, T, device=device)
    kv_tile_len = torch.tensor([T, 20, 50], dtype=torch.int32, device=device)
    kv_tile_group = torch.arange(n_t, dtype=torch.int32, device=device)
    row_select = torch.randint(0, 8, (B, H, S, 1), dtype=torch.int32, device=device)
    row_select[0, 1, 10:20] = 0  # rows that see nothing
    extra = dict(kv_tile_len=kv_tile_len, row_select=row_select, kv_tile_group=kv_tile_group)
    out, lse = bsa.block_sparse_attention_forward(q, k, v, kc, ki, T, T, **extra)
    g, gl = torch.randn_like(out), torch.randn_like(lse)
    gl[torch.isinf(lse)] = 0.0
    split = bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, T, T, grad_lse=gl, dq_mode="split", **extra)
    atomic = bsa.block_sparse_attention_backward(g, q, k, v, out, lse, kc, ki, T, T, grad_lse=gl, dq_mode="atomic", **extra)
    for name, a, b in zip(("dq", "dk", "dv"), split, atomic):
        assert torch.isfinite(b).all(), name
        if name == "dq" or HAS_CUDA:
            scale = a.float().abs().max().item()
            assert (a.float() - b.float()).abs().max().item() <= 4e-3 * scale, name
        else:
            assert torch.equal(a, b), name
    assert (atomic[0][0, 10:20, 1] == 0).all()  # no key, no gradient


def test_dq_mode_selection(monkeypatch):
    monkeypatch.setenv("MIXDIT_BWD_DQ", "Atomic")
    assert bsa._env_dq_mode() == "atomic"
    monkeypatch.delenv("MIXDIT_BWD_DQ")
    assert bsa._env_dq_mode() == "split"
    monkeypatch.setitem(bsa._BWD_OPTS, "dq", "atomic")
    assert bsa._dq_mode(None) == "atomic" and bsa._dq_mode("split") == "split"
    with pytest.raises(ValueError):
        bsa._dq_mode("fused")


def test_dense_layout_equals_sdpa(device):
    B, H, S, D = 1, 2, 200, 64
    q, k, v = _inputs(B, S, S, H, D, torch.float16, device)
    out, lse = block_sparse_attention(q, k, v, *dense_layout(B, H, S, S, 64, 64, device=device), q_tile=64, kv_tile=64)
    ref = torch.nn.functional.scaled_dot_product_attention(*(t.float().transpose(1, 2) for t in (q, k, v)))
    ref16 = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)))
    err, tol = (out.float() - ref.transpose(1, 2)).abs().max().item(), 2 * (ref16.float() - ref).abs().max().item() + 1e-5
    assert err <= tol, (err, tol)
    s = torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) / math.sqrt(D)
    assert (lse - torch.logsumexp(s, -1)).abs().max().item() < 1e-3


def test_autograd_function_and_transpose_layout(bwd_path, assert_close, device):
    B, H, S, D = 1, 2, 130, 64
    q, k, v = _inputs(B, S, S, H, D, torch.float16, device)
    layout = random_layout(B, H, S, S, 0.5, 64, 64, device=device)

    def fn(q, k, v, kc, ki, *, q_tile, kv_tile):
        return BlockSparseAttentionFunction.apply(q, k, v, kc, ki, q_tile, kv_tile, None, None, None, None)

    _check_all(assert_close, q, k, v, layout, q_tile=64, kv_tile=64, fn=fn)
    q_count, q_index = transpose_layout(*layout, 3)
    _check_transposed(*layout, q_count, q_index, 3)


def _check_transposed(kc, ki, q_count, q_index, n_kt):
    """The transposed layout lists, per key tile, exactly the query tiles visiting it, in ascending order."""
    B, H, n_qt = kc.shape
    kc, ki, q_count, q_index = (t.cpu() for t in (kc, ki, q_count, q_index))
    for b in range(B):
        for h in range(H):
            for t in range(n_kt):
                want = [qt for qt in range(n_qt) if t in ki[b, h, qt, : kc[b, h, qt]].tolist()]
                assert q_index[b, h, t, : q_count[b, h, t]].tolist() == want, (b, h, t)


@pytest.mark.parametrize("n_qt,n_kt,density", [(37, 40, 0.9), (5, 70, 0.5), (20, 3, 1.0), (17, 33, 0.0)])
def test_transpose_layout_kernel(device, n_qt, n_kt, density):
    """The Triton transpose across its chunk edges (16 key tiles, 16 query tiles, 32 slots per step), with
    empty query tiles, stale entries past the counts and a strided kv_index."""
    B, H = 2, 3
    kc, ki = random_layout(B, H, n_qt * 16, n_kt * 16, density, 16, 16, device=device)  # stale entries past counts
    kc[0, 1, :3] = 0  # query tiles that visit nothing
    wide = torch.randint(0, n_kt, (B, H, n_qt, 2 * n_kt), dtype=ki.dtype, device=device)
    wide[..., ::2] = ki
    ki = wide[..., ::2]  # last-dim stride 2
    q_count, q_index = transpose_layout(kc, ki, n_kt)
    _check_transposed(kc, ki, q_count, q_index, n_kt)


def test_ragged_keys_with_very_negative_lse(bwd_path, assert_close, device):
    """Padding keys past Sk have s = 0, so p = exp(-lse) there; with every real score far below 0 that
    overflowed dS to inf in fp16 and inf * (k = 0) made dQ NaN. Scores here sit near -32 (lse ~ -28)."""
    B, H, Sq, Sk, D = 1, 2, 64, 80, 16
    q = (-8 + 0.3 * torch.randn(B, Sq, H, D, device=device)).half()
    k = (1 + 0.3 * torch.randn(B, Sk, H, D, device=device)).half()
    v = torch.randn(B, Sk, H, D, device=device).half()
    layout = dense_layout(B, H, Sq, Sk, 64, 64, device=device)
    _, lse = _check_all(assert_close, q, k, v, layout, q_tile=64, kv_tile=64, lse_grad=True)
    assert float(lse.detach().max()) < -15


def test_forward_rescale_with_rising_logits(assert_close, device):
    """Keys get larger tile by tile (in a shuffled visiting order, with masked rows and a ragged tail), so the
    row max jumps by up to ~2^29 several times per row: a skipped or stale rescale overflows fp16 p (a
    variant that never rescaled after the first tile failed)."""
    B, H, Sq, Sk, D, T = 1, 2, 128, 300, 32, 64
    q = torch.randn(B, Sq, H, D, device=device)
    growth = torch.linspace(0.2, 8.0, Sk, device=device)[None, :, None, None]
    k = (torch.randn(B, Sk, H, D, device=device) * growth).half()
    q, v = q.half(), torch.randn(B, Sk, H, D, device=device).half()
    kv_count, kv_index = dense_layout(B, H, Sq, Sk, T, T, device=device)
    kv_index = kv_index[..., torch.randperm(kv_index.shape[-1], device=device)].contiguous()
    _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=T, kv_tile=T, grad=False)
    # per-row masks: some rows see a key group late (their max starts at -inf on earlier tiles)
    n_kt = kv_index.shape[-1]
    grp = torch.arange(n_kt, device=device, dtype=torch.int32)
    sel = torch.randint(0, 2 ** n_kt, (B, H, Sq, 1), device=device, dtype=torch.int32)
    _check_all(assert_close, q, k, v, (kv_count, kv_index), q_tile=T, kv_tile=T, grad=False,
               row_select=sel, kv_tile_group=grp)


def test_too_long_sequence_is_refused_not_miscomputed():
    """Row offsets inside the kernels are int32: a [B, S, H, D] tensor whose one head spans >= 2^31 elements
    gets a clear error before any launch (meta tensors: nothing is allocated)."""
    S, H, D = 2 ** 31 // (16 * 128) + 1, 16, 128  # (S - 1) * H * D + D > 2^31
    q = torch.empty(1, S, H, D, dtype=torch.bfloat16, device="meta")
    layout = (torch.empty(1, H, 1, dtype=torch.int32, device="meta"), torch.empty(1, H, 1, 1, dtype=torch.int32, device="meta"))
    with pytest.raises(ValueError, match="int32 row offsets"):
        block_sparse_attention(q, q, q, *layout)
    ok = torch.empty(1, S - 2, H, D, dtype=torch.bfloat16, device="meta")  # just under: accepted by the check
    bsa._check(ok, ok, ok, 128, 128)
    heads_major = torch.empty(1, H, S, D, dtype=torch.bfloat16, device="meta").transpose(1, 2)  # the advice given
    bsa._check(heads_major, heads_major, heads_major, 128, 128)


def test_layout_shape_is_checked(device):
    B, H, S, D = 1, 2, 200, 32
    q, k, v = _inputs(B, S, S, H, D, torch.float16, device)
    kc, ki = dense_layout(B, H, S, S, 128, 64, device=device)  # built for q_tile 128
    with pytest.raises(ValueError, match="kv_count must have shape"):
        block_sparse_attention(q, k, v, kc, ki, q_tile=64, kv_tile=64)
    kc, ki = dense_layout(B, H, S, S, 64, 64, device=device)
    with pytest.raises(ValueError, match="kv_index must have shape"):
        block_sparse_attention(q, k, v, kc, ki[..., 0], q_tile=64, kv_tile=64)
    with pytest.raises(ValueError, match="kv_tile_len must have shape"):
        block_sparse_attention(q, k, v, kc, ki, q_tile=64, kv_tile=64,
                               kv_tile_len=torch.full((3,), 64, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match="row_select must have shape"):
        block_sparse_attention(q, k, v, kc, ki, q_tile=64, kv_tile=64,
                               row_select=torch.ones(B, H, S, dtype=torch.int32, device=device),
                               kv_tile_group=torch.arange(4, dtype=torch.int32, device=device))


def test_custom_op_fake_matches_real_for_strided_inputs(device):
    """opcheck: schema, fake (shapes and strides, incl. a q whose last dim is not contiguous), autograd."""
    B, H, S, D = 1, 2, 96, 32
    q = torch.randn(B, H, D, S, device=device, dtype=torch.float16).permute(0, 3, 1, 2)  # last stride S
    k, v = (torch.randn(B, S, H, D, device=device, dtype=torch.float16) for _ in range(2))
    kc, ki = random_layout(B, H, S, S, 0.6, 64, 64, device=device)
    args = (q, k, v, kc, ki, 64, 64, 1 / math.sqrt(D), None, None, None)
    torch.library.opcheck(bsa._fwd_op, args, test_utils=("test_schema", "test_faketensor"))
    out, lse = bsa._fwd_op(*args)
    g = torch.randn_like(out)
    bwd_args = (g, torch.randn_like(lse), q, k, v, out, lse, kc, ki, 64, 64, 1 / math.sqrt(D), None, None, None)
    torch.library.opcheck(bsa._bwd_op, bwd_args, test_utils=("test_schema", "test_faketensor"))


def test_torch_compile_fullgraph(bwd_path, device):
    B, H, S, D = 1, 2, 128, 64
    q, k, v = (t.requires_grad_() for t in _inputs(B, S, S, H, D, torch.float16, device))
    layout = random_layout(B, H, S, S, 0.5, 64, 64, device=device)

    def f(q, k, v, kc, ki):
        out, lse = block_sparse_attention(q, k, v, kc, ki, q_tile=64, kv_tile=64)
        return out.float().sum() + lse.sum()

    backend = "inductor" if HAS_CUDA else "aot_eager"  # no C++ compiler needed on CPU
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    val = compiled(q, k, v, *layout)
    val.backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    eager = f(q, k, v, *layout)
    eager.backward()
    assert torch.allclose(val, eager, rtol=1e-4, atol=1e-3)
    for g, t in zip(grads, (q, k, v)):
        assert torch.allclose(g.float(), t.grad.float(), rtol=1e-3, atol=1e-3)


# ------------------------------------------------------------------------------------------------
# CUDA only: larger shapes, the production tile configs, CUDA graphs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype,D,q_tile,kv_tile,S,density",
    [
        (torch.bfloat16, 128, 128, 128, 2100, 0.3),
        (torch.float16, 128, 128, 64, 1500, 0.4),
        (torch.bfloat16, 64, 64, 64, 1333, 0.25),
        (torch.bfloat16, 64, 128, 128, 1024, 1.0),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_large(bwd_path, assert_close, dtype, D, q_tile, kv_tile, S, density):
    B, H = 2, 3
    q, k, v = _inputs(B, S, S, H, D, dtype, "cuda")
    layout = random_layout(B, H, S, S, density, q_tile, kv_tile, device="cuda")
    _check_all(assert_close, q, k, v, layout, q_tile=q_tile, kv_tile=kv_tile, lse_grad=True)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_masks_large(bwd_path, assert_close):
    B, H, S, D, T = 1, 4, 1000, 128, 128
    n_t = (S + T - 1) // T
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, "cuda")
    layout = random_layout(B, H, S, S, 0.5, T, T, device="cuda")
    kv_tile_len = torch.randint(1, T + 1, (n_t,), dtype=torch.int32, device="cuda")
    kv_tile_group = torch.arange(n_t, dtype=torch.int32, device="cuda")
    row_select = torch.randint(-2**31, 2**31 - 1, (B, H, S, 1), dtype=torch.int64, device="cuda").to(torch.int32)
    _check_all(assert_close, q, k, v, layout, q_tile=T, kv_tile=T, kv_tile_len=kv_tile_len,
               row_select=row_select, kv_tile_group=kv_tile_group)


@pytest.mark.parametrize(
    "dtype,D,q_tile,kv_tile,S,density,masks",
    [
        (torch.bfloat16, 128, 128, 128, 2100, 0.3, False),
        (torch.float16, 64, 128, 64, 1333, 0.5, False),
        (torch.bfloat16, 128, 128, 128, 1000, 0.5, True),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_atomic_tma_reduce(monkeypatch, assert_close, dtype, D, q_tile, kv_tile, S, density, masks):
    """The atomic dQ backward with its adds as TMA reduce-adds (the sweep's dq_tma_reduce option)."""
    monkeypatch.setitem(bsa._BWD_OPTS, "dq", "atomic")
    monkeypatch.setitem(bsa._BWD_OPTS, "dq_tma_reduce", True)
    B, H = 1, 3
    q, k, v = _inputs(B, S, S, H, D, dtype, "cuda")
    layout = random_layout(B, H, S, S, density, q_tile, kv_tile, device="cuda")
    extra = {}
    if masks:
        n_t = (S + kv_tile - 1) // kv_tile
        extra = dict(kv_tile_len=torch.randint(1, kv_tile + 1, (n_t,), dtype=torch.int32, device="cuda"),
                     kv_tile_group=torch.arange(n_t, dtype=torch.int32, device="cuda"),
                     row_select=torch.randint(-2**31, 2**31 - 1, (B, H, S, 1), dtype=torch.int64,
                                              device="cuda").to(torch.int32))
    _check_all(assert_close, q, k, v, layout, q_tile=q_tile, kv_tile=kv_tile, lse_grad=True, **extra)


@pytest.mark.parametrize("mode", ["split", "atomic"])
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_no_host_sync(monkeypatch, mode):
    """Forward and backward (both dQ modes, lse gradient included) never synchronise with the host."""
    monkeypatch.setitem(bsa._BWD_OPTS, "dq", mode)
    B, H, S, D = 1, 2, 1000, 128
    q, k, v = (t.requires_grad_() for t in _inputs(B, S, S, H, D, torch.bfloat16, "cuda"))
    kc, ki = random_layout(B, H, S, S, 0.5, device="cuda")

    def step():
        out, lse = block_sparse_attention(q, k, v, kc, ki)
        return torch.autograd.grad((out.float().square().sum(), lse.sum()), (q, k, v))

    step()  # compile outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        grads = step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_cuda_graph_capture():
    B, H, S, D = 1, 4, 1024, 128
    q, k, v = _inputs(B, S, S, H, D, torch.bfloat16, "cuda")
    kc, ki = random_layout(B, H, S, S, 0.5, device="cuda")
    block_sparse_attention(q, k, v, kc, ki)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = block_sparse_attention(q, k, v, kc, ki)
    q.copy_(torch.randn_like(q))
    kc2, ki2 = random_layout(B, H, S, S, 0.5, device="cuda")
    kc.copy_(kc2)
    ki.copy_(ki2)
    graph.replay()
    ref, ref_lse = block_sparse_attention(q, k, v, kc, ki)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_gpu_checkpointed_forward_in_backward_thread():
    # gradient checkpointing re-runs the forward in autograd's backward thread, which does not see an
    # allocator set in the main thread (Triton keeps it per thread); the TMA forward needs one there
    from torch.utils.checkpoint import checkpoint

    B, H, S, D = 1, 2, 512, 128
    q, k, v = (t.requires_grad_() for t in _inputs(B, S, S, H, D, torch.bfloat16, "cuda"))
    kc, ki = random_layout(B, H, S, S, 0.5, device="cuda")
    out = checkpoint(lambda a, b, c: block_sparse_attention(a, b, c, kc, ki)[0], q, k, v, use_reentrant=False)
    out.float().square().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))


def test_forward_variant_applies_and_restores():
    """The benchmarks' A/B hook: switches, config and launch options hold inside and are restored after an error."""
    tables = (bsa._FWD_OPTS, bsa._CONFIG_OVERRIDE, bsa._FWD_LAUNCH_EXTRA)
    before = [dict(t) for t in tables]
    with pytest.raises(RuntimeError):
        with bsa.forward_variant({"tail_only_mask": not before[0]["tail_only_mask"]}, (64, 32, 4, 1),
                                 {"maxnreg": 128}):
            assert bsa._FWD_OPTS["tail_only_mask"] != before[0]["tail_only_mask"]
            assert bsa._CONFIG_OVERRIDE["fwd"] == (64, 32, 4, 1) and bsa._FWD_LAUNCH_EXTRA["maxnreg"] == 128
            raise RuntimeError("inside")
    assert [dict(t) for t in tables] == before


def test_backward_variant_applies_and_restores():
    """The benchmarks' backward A/B hook: switches hold inside, a configs dict replaces the overrides, and both
    tables are restored after an error."""
    tables = (bsa._BWD_OPTS, bsa._CONFIG_OVERRIDE)
    before = [dict(t) for t in tables]
    bsa._CONFIG_OVERRIDE["fwd"] = (64, 64, 4, 1)  # an override the configs dict must clear
    try:
        with pytest.raises(RuntimeError):
            with bsa.backward_variant({"dq": "atomic"}, {"dq": (64, 128, 4, 1)}):
                assert bsa._BWD_OPTS["dq"] == "atomic"
                assert bsa._CONFIG_OVERRIDE == {"dq": (64, 128, 4, 1)}
                raise RuntimeError("inside")
        assert bsa._CONFIG_OVERRIDE["fwd"] == (64, 64, 4, 1)
    finally:
        bsa._CONFIG_OVERRIDE.pop("fwd", None)
    assert [dict(t) for t in tables] == before
