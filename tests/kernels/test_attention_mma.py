"""The bf16 tensor-core attention (attention_mma.cu) on the CPU emulator, whose
mma.sync and ldmatrix follow PTX's documented fragment layouts, whose cp.async
copies land only at their wait, and whose race detector fails any launch where
two warps touch a shared word in one barrier interval: against the NumPy mirror
of the tiling and roundings (kernels/flash_reference.py, closely), and against
float64 attention of the same bf16 inputs (to bf16 accuracy). The FlashAttention-2
kernels (the default bf16 path) and the first tensor-core kernels
(NANOGPT_BF16_ATTENTION=mma, kept for comparison) both."""
import numpy as np
import pytest

from nanogpt_np import kernels, layers
from nanogpt_np.backend import bfloat16
from nanogpt_np.kernels import flash_reference
from tests.helpers import rel_err

BF16 = bfloat16()
SHAPES = [  # B, T, NH (head size 64) for the first tensor-core kernels
    (1, 1, 1),  # T=1
    (2, 7, 2),  # shorter than a tile (and than a warp's 16 rows)
    (1, 65, 2),  # one row into the second tile
    (1, 131, 1),  # three tiles, the last ragged
]
FA2_SHAPES = [  # B, T, NH for the FlashAttention-2 kernels (128-row forward blocks,
    (2, 1, 1),  # 64-key backward blocks, 32-row query tiles): T=1, two batches
    (1, 63, 2),  # one short of a key tile, two heads
    (1, 64, 1),  # exactly one key tile
    (2, 65, 1),  # one row into the second key tile
    (1, 127, 1),  # one short of a forward block
    (1, 128, 1),  # exactly one forward block
    (1, 129, 2),  # one row into the second forward block
    (1, 333, 1),  # odd, several blocks of each kind, ragged everywhere
    (1, 1024, 1),  # GPT-2's context: 8 forward blocks, 16 key blocks (B*NH=1 keeps the emulator quick)
]
FA2_LAUNCHES = ["flash_attention_fa2_forward", "flash_attention_fa2_backward_dot", "flash_attention_fa2_backward",
                "flash_attention_fa2_backward_dq_store"]


def _inputs(B, T, NH, seed):
    rng = np.random.default_rng(seed)
    qkv = (rng.standard_normal((B, T, 3 * NH * 64)) * 1.5).astype(np.float32).astype(BF16)
    dy = rng.standard_normal((B, T, NH * 64)).astype(np.float32).astype(BF16)
    return qkv, dy


def test_mma_fragment_layout(emulated):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((16, 16)).astype(np.float32).astype(BF16)
    b = rng.standard_normal((16, 8)).astype(np.float32).astype(BF16)
    d = kernels.attention.mma_layout_check(a, b)
    assert d.dtype == np.float32
    assert rel_err(d, a.astype(np.float64) @ b.astype(np.float64)) < 1e-6


def _check_against_mirror_and_formula(emulated, qkv, dy, NH, path, launches, mirror_forward, mirror_backward):
    y, cache = kernels.attention.forward(qkv, NH)
    dqkv = kernels.attention.backward(dy, cache)
    assert kernels.attention.path_of(cache) == path
    assert [n.split("<")[0] for n in emulated.launches] == launches
    assert y.dtype == BF16 and dqkv.dtype == BF16 and cache[3].dtype == np.float32
    # the mirror: same tiles, same roundings, float64 otherwise
    y_mirror, cache_mirror = mirror_forward(qkv, NH)
    dqkv_mirror = mirror_backward(dy, cache_mirror)
    # float32 against float64 arithmetic between the same roundings: nearly every element
    # is the same bf16 number; the few that differ are one rounding apart (~0.1% seen)
    for got, want in ((y, y_mirror), (dqkv, dqkv_mirror)):
        assert rel_err(got.astype(np.float64), want) < 2e-3
        assert np.mean(got.astype(np.float64) != want) < 0.02
    assert rel_err(cache[3], cache_mirror[2]) < 1e-6  # lse is float32 arithmetic
    # and the exact formula, to bf16 accuracy
    y_ref, cache_ref = layers.attention.forward(qkv.astype(np.float64), NH)
    dqkv_ref = layers.attention.backward(dy.astype(np.float64), cache_ref)
    assert rel_err(y.astype(np.float64), y_ref) < 1e-2
    assert rel_err(dqkv.astype(np.float64), dqkv_ref) < 2e-2


@pytest.mark.parametrize("B,T,NH", FA2_SHAPES)
def test_fa2_attention(emulated, B, T, NH):
    qkv, dy = _inputs(B, T, NH, seed=T)
    _check_against_mirror_and_formula(emulated, qkv, dy, NH, "fa2", FA2_LAUNCHES,
                                      flash_reference.fa2_forward, flash_reference.fa2_backward)


def _nan_partials(N, C):
    """A reduce.Partials laid out as a block's (c_attn's 3C columns between others'),
    every element a NaN."""
    scope = [("h.before", C), ("h.attn.c_attn.bias", 3 * C), ("h.after", 2 * C)]
    parts = kernels.reduce.Partials(np, kernels.fused.n_chunks(N), np.float32, [scope])
    parts.part[...] = np.nan
    return parts


@pytest.mark.parametrize("path,B,T,NH", [
    ("fa2", 1, 1, 1),  # T=1, B=1, one head: one row, one chunk
    ("fa2", 2, 7, 2),  # odd T, two batches, two heads: 14 rows, a chunk each
    ("fa2", 3, 43, 1),  # N = 129: chunks of 2 rows, the last one row
    ("fa2", 1, 131, 2),  # odd T, three key blocks, N = 131: 66 chunks, the last one row
    ("mma", 2, 7, 2),  # the first tensor-core kernels: dqkv, then column_sums
])
@pytest.mark.parametrize("row_chunks", [None, 3])  # the step's chunking; 3 chunks: 5 to 44 rows each, lanes of several rows
def test_backward_writes_the_column_partials_of_dqkv_as_column_sums_does(emulated, monkeypatch, path, B, T, NH,
                                                                         row_chunks):
    """attention.backward(part=slot): dqkv's column partial sums, bit for bit those of
    fused.column_sums over the returned dqkv, in the slot and nowhere else, and dqkv
    itself unchanged; FlashAttention-2 folds them into its dq store (no column_sums)."""
    monkeypatch.setenv(kernels.attention.BF16_PATH_ENV, path)
    if row_chunks:
        monkeypatch.setattr(kernels.fused, "ROW_CHUNKS", row_chunks)
    qkv, dy = _inputs(B, T, NH, seed=B * T)
    C, N = NH * 64, B * T
    _, cache = kernels.attention.forward(qkv, NH)
    plain = kernels.attention.backward(dy, cache)
    emulated.launches.clear()
    got, want = _nan_partials(N, C), _nan_partials(N, C)
    dqkv = kernels.attention.backward(dy, cache, part=got.slot("h.attn.c_attn.bias"))
    launched = [n.split("<")[0] for n in emulated.launches]
    if path == "fa2":
        assert launched[-1] == "flash_attention_fa2_backward_dq_store_sums" and "column_sums" not in launched
    else:
        assert launched[-1] == "column_sums"
    assert np.array_equal(dqkv.view(np.uint16), plain.view(np.uint16))  # the same dq store
    kernels.fused.column_sums(dqkv.reshape(-1, 3 * C), part=want.slot("h.attn.c_attn.bias"))
    assert np.array_equal(got.part.view(np.uint32), want.part.view(np.uint32))  # NaN where neither wrote
    rows = got.part.reshape(got.n_chunks, 6 * C)
    sums = rows[:, C:4 * C]  # the slot's columns, every one written; the others' untouched
    assert not np.isnan(sums).any() and np.isnan(rows[:, :C]).all() and np.isnan(rows[:, 4 * C:]).all()
    assert rel_err(sums.sum(axis=0, dtype=np.float64), dqkv.reshape(N, 3 * C).astype(np.float64).sum(axis=0)) < 1e-5


@pytest.mark.parametrize("B,T,NH", SHAPES)
def test_mma_attention(emulated, B, T, NH, monkeypatch):
    monkeypatch.setenv(kernels.attention.BF16_PATH_ENV, "mma")
    qkv, dy = _inputs(B, T, NH, seed=T)
    _check_against_mirror_and_formula(
        emulated, qkv, dy, NH, "mma",
        ["flash_attention_mma_forward", "flash_attention_mma_backward_dq", "flash_attention_mma_backward_dkdv"],
        flash_reference.mma_forward, flash_reference.mma_backward)


def test_an_unknown_bf16_path_is_an_error(monkeypatch):
    monkeypatch.setenv(kernels.attention.BF16_PATH_ENV, "fast")
    qkv, _ = _inputs(1, 3, 1, seed=0)
    with pytest.raises(ValueError, match="NANOGPT_BF16_ATTENTION='fast': use one of fa2, mma, simt"):
        kernels.attention.forward(qkv, 1)


def test_bf16_attention_can_go_through_the_float32_kernels(emulated, monkeypatch):
    monkeypatch.setenv(kernels.attention.BF16_PATH_ENV, "simt")
    qkv, dy = _inputs(1, 9, 2, seed=1)
    y, cache = kernels.attention.forward(qkv, 2)
    assert kernels.attention.path_of(cache) == "widened" and y.dtype == BF16
    dqkv = kernels.attention.backward(dy, cache)
    y_ref, cache_ref = layers.attention.forward(qkv.astype(np.float64), 2)
    assert rel_err(y.astype(np.float64), y_ref) < 2**-8
    assert rel_err(dqkv.astype(np.float64), layers.attention.backward(dy.astype(np.float64), cache_ref)) < 2**-8


@pytest.mark.parametrize("mirror", ["mma", "fa2"])
@pytest.mark.parametrize("B,T,NH", [(1, 1, 1), (2, 7, 2), (1, 130, 2), (1, 333, 1)])
def test_mma_mirror_matches_plain_attention(B, T, NH, mirror):
    """The mirrors alone (no emulator): the tiling is exact, the roundings cost bf16 accuracy."""
    qkv, dy = _inputs(B, T, NH, seed=7)
    forward, backward = getattr(flash_reference, f"{mirror}_forward"), getattr(flash_reference, f"{mirror}_backward")
    y, cache = forward(qkv, NH)
    dqkv = backward(dy, cache)
    y_ref, cache_ref = layers.attention.forward(qkv.astype(np.float64), NH)
    assert rel_err(y, y_ref) < 1e-2
    assert rel_err(cache[2], cache_ref[2]) < 1e-12  # the logsumexp is not rounded
    assert rel_err(dqkv, layers.attention.backward(dy.astype(np.float64), cache_ref)) < 2e-2
    # without the roundings the same tiling is exact
    y_exact, cache_exact = flash_reference.forward(qkv.astype(np.float64), NH, 64, 64)
    assert rel_err(y_exact, y_ref) < 1e-12


def test_views_off_a_16_byte_boundary_are_copied_for_the_16_byte_loads():
    from nanogpt_np.backend import data_pointer

    base = np.arange(40, dtype=np.float32).astype(BF16)
    view = base[1:33]  # 2 bytes into the allocation
    assert data_pointer(view) % 16 != 0
    fixed = kernels.attention._aligned16(view, np)
    assert data_pointer(fixed) % 16 == 0 and np.array_equal(fixed, view)
    aligned = base[8:40]
    assert kernels.attention._aligned16(aligned, np) is aligned  # no copy when none is needed


def test_fa2_launches_fit_cuda_limits_at_the_largest_shapes():
    """B*NH = 48*25 (GPT-2 XL's 25 heads at batch 48), T=1024: every launch's grid
    and block within CUDA's limits, recorded without running (the arrays are never
    touched, so np.empty commits no memory)."""
    from nanogpt_np.kernels import loader

    class Recorder:
        def __init__(self):
            self.launches = []

        def launch(self, kernel_file, name, grid, block, args, shared_mem):
            self.launches.append((name.split("<")[0], grid, block))

    recorder = Recorder()
    previous = loader.use_runner(recorder)
    try:
        B, NH, T = 48, 25, 1024
        qkv = np.empty((B, T, 3 * NH * 64), dtype=BF16)
        y, cache = kernels.attention.forward(qkv, NH)
        kernels.attention.backward(np.empty((B, T, NH * 64), dtype=BF16), cache)
    finally:
        loader.use_runner(previous)
    assert [n for n, _, _ in recorder.launches] == FA2_LAUNCHES
    for name, grid, block in recorder.launches:
        grid3 = (tuple(grid) + (1, 1))[:3]
        assert grid3[0] < 2**31 and max(grid3[1:]) <= 65535 and int(np.prod(block)) <= 1024, (name, grid, block)
    assert recorder.launches[0][1] == (B * NH, T // 128) and recorder.launches[2][1] == (B * NH, T // 64)
