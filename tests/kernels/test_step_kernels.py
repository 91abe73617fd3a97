"""The training step's own kernels (reduce.cu, embedding.cu, adamw_apply, the fused
residual + LayerNorm) against their NumPy formulas, in the CPU emulator."""
import math

import numpy as np
import pytest

from nanogpt_np import kernels, layers
from nanogpt_np.backend import bfloat16
from nanogpt_np.kernels import adamw, fused, reduce
from nanogpt_np.optim import _adam_chunk, clip_coefficient
from tests.helpers import assert_close
from tests.kernels.emulator import placed


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sum_squares_and_loss_into_the_report(emulated, dtype):
    rng = np.random.default_rng(0)
    g = rng.standard_normal(100_003).astype(dtype)
    loss = np.array([2.5], dtype=dtype)
    report, part = np.zeros(2), np.zeros(reduce.SUM_SQUARES_BLOCKS)
    reduce.sum_squares(g, loss, report, part)
    assert report[0] == 2.5
    assert math.isclose(report[1], float(np.dot(g.astype(np.float64), g)), rel_tol=1e-6)
    losses = rng.standard_normal(777).astype(dtype)
    out = np.array([1.0], dtype=dtype)
    reduce.loss_mean(losses, out, 0.5 / losses.size, accumulate=True)
    assert_close(out, np.array([1.0 + 0.5 * losses.mean()]), dtype, "loss")


def test_finish_partials_writes_then_adds_each_segment(emulated):
    rng = np.random.default_rng(1)
    parts = reduce.Partials(np, 3, np.float32, [[("a", 4), ("b", 2)], [("c", 5)]])
    for name, width in (("a", 4), ("b", 2), ("c", 5)):
        buf, stride = parts.slot(name)
        rows = rng.standard_normal((3, width)).astype(np.float32)
        for k in range(3):
            buf[k * stride:k * stride + width] = rows[k]
        parts.__dict__.setdefault("expected", {})[name] = rows.sum(axis=0)
    grads = np.full(20, 7.0, dtype=np.float32)
    offsets = {"a": 0, "b": 10, "c": 14}
    parts.finish(grads, offsets, accumulate=False)
    for name, width in (("a", 4), ("b", 2), ("c", 5)):
        np.testing.assert_allclose(grads[offsets[name]:offsets[name] + width], parts.expected[name], rtol=1e-6)
    assert (grads[4:10] == 7).all() and grads[19] == 7  # nothing else touched
    parts.finish(grads, offsets, accumulate=True, names=["b"])
    np.testing.assert_allclose(grads[10:12], 2 * parts.expected["b"], rtol=1e-6)
    np.testing.assert_allclose(grads[0:4], parts.expected["a"], rtol=1e-6)


@pytest.mark.parametrize("B, T", [(1, 1), (2, 7)])
def test_embedding_kernels_match_the_formula(emulated, B, T):
    rng = np.random.default_rng(2)
    V, C = 11, 40
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((16, C))
    idx = rng.integers(0, V, (B, T))
    idx[0, 0] = idx[-1, -1]  # a repeated token
    x, cache = kernels.embedding.forward(idx, wte, wpe)
    assert_close(x, layers.embedding.reference_forward(idx, wte, wpe), np.float64, "x")
    dx = rng.standard_normal((B, T, C))
    dwte, dwpe = kernels.embedding.backward(dx, cache)
    ref_wte, ref_wpe = layers.embedding.reference_backward(dx, idx, wte, wpe)
    assert_close(dwte, ref_wte, np.float64, "dwte")
    assert_close(dwpe, ref_wpe, np.float64, "dwpe")
    bad = idx.copy()
    bad[0, 0] = V  # out of range: NaN rows, never a read past wte
    assert np.isnan(kernels.embedding.forward(bad, wte, wpe)[0][0, 0]).all()


@pytest.mark.parametrize("with_copy", [False, True])
def test_adamw_apply_reads_its_step_from_device_memory(emulated, with_copy):
    rng = np.random.default_rng(3)
    n = 5000
    p, g = rng.standard_normal(n).astype(np.float32), rng.standard_normal(n).astype(np.float32)
    m, v = (rng.standard_normal(n) ** 2).astype(np.float32), (rng.standard_normal(n) ** 2).astype(np.float32)
    runs = [(0, 1000, True), (1000, 1700, False), (1700, n, True)]
    grad_scale, max_norm, lr, step = 0.5, 1.0, 1e-3, 3
    norm2 = float(np.dot(g.astype(np.float64), g))
    hyper = adamw.hyperparameters(step, lr, (0.9, 0.95), 1e-8, 0.1, max_norm, grad_scale)
    report = np.array([0.0, norm2])
    # the formula: grads scaled, clipped, then optim's decay and _adam_chunk per run
    coef = np.float32(grad_scale * clip_coefficient(math.sqrt(norm2) * grad_scale, max_norm))
    ref = [a.copy() for a in (p, g * coef, m, v)]
    for a, b, decay in runs:
        if decay:
            ref[0][a:b] *= np.float32(1 - lr * 0.1)
        _adam_chunk(*(x[a:b] for x in ref), 0.9, 0.95, lr / (1 - 0.9**step), math.sqrt(1 - 0.95**step), 1e-8)
    copy = np.zeros(n, dtype=bfloat16()) if with_copy else None
    adamw.apply(p, g, m, v, adamw.runs_table(runs), len(runs), 3300, hyper, report, copy=copy)
    np.testing.assert_allclose(p, ref[0], rtol=2e-6, atol=1e-8)  # float32 rounding of p - update near 0
    np.testing.assert_allclose(m, ref[2], rtol=1e-5, atol=1e-9)  # (1 - beta1) in float32 vs in float64
    if with_copy:
        np.testing.assert_array_equal(copy, p.astype(bfloat16()))


@pytest.mark.parametrize("dtype, copy_dtype", [(np.float32, None), (np.float32, "bf16"), (np.float64, np.float64)])
def test_adamw_apply_vector_and_scalar_paths_give_the_same_bits(emulated, dtype, copy_dtype):
    """Runs that start and stop off a multiple of the vector width (a head and a tail
    one at a time, packs between), a one-element run, and the whole buffer misaligned
    (every element one at a time): p, m, v and the copy agree bit for bit."""
    rng = np.random.default_rng(8)
    n = 1003
    runs = [(0, 13), (13, 14), (14, 1001), (1001, n)]
    table = adamw.runs_table([(a, b, k % 2 == 0) for k, (a, b) in enumerate(runs)])
    start = [rng.standard_normal(n).astype(dtype), rng.standard_normal(n).astype(dtype),
             (rng.standard_normal(n) ** 2).astype(dtype), (rng.standard_normal(n) ** 2).astype(dtype)]
    hyper = adamw.hyperparameters(2, 1e-3, (0.9, 0.95), 1e-8, 0.1, 1.0, 0.5)
    report = np.array([0.0, 4.0])
    results = []
    for misaligned in (False, True):
        p, g, m, v = (placed(a, misaligned and k == 0) for k, a in enumerate(start))
        copy = None if copy_dtype is None else np.zeros(n, dtype=bfloat16() if copy_dtype == "bf16" else copy_dtype)
        adamw.apply(p, g, m, v, table, len(runs), 987, hyper, report, copy=copy)
        results.append([a.view(np.uint8).copy() for a in (p, m, v) + (() if copy is None else (copy,))])
        if copy is not None:
            np.testing.assert_array_equal(copy, p.astype(copy.dtype))
    for aligned, unaligned in zip(*results):
        np.testing.assert_array_equal(aligned, unaligned)


@pytest.mark.parametrize("dtype, out", [(np.float32, None), (np.float64, None), (np.float32, "bf16")])
def test_residual_layernorm_is_bias_residual_then_layernorm(emulated, dtype, out):
    rng = np.random.default_rng(4)
    out_dtype = bfloat16() if out == "bf16" else dtype
    x = rng.standard_normal((2, 5, 40)).astype(dtype)
    a = rng.standard_normal((2, 5, 40)).astype(out_dtype)
    abias, w, b = (rng.standard_normal(40).astype(dtype) for _ in range(3))
    x_new, y, cache = kernels.layernorm.residual_forward(x, a, abias, w, b, out_dtype=out_dtype)
    x_ref = fused.bias_residual(x, a, abias)
    y_ref, cache_ref = kernels.layernorm.forward(x_ref, w, b, out_dtype=out_dtype)
    np.testing.assert_array_equal(x_new, x_ref)  # the same bits as the two kernels
    np.testing.assert_array_equal(y, y_ref)
    for got, want in zip(cache[2:], cache_ref[2:]):
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype, out", [(np.float64, None), (np.float32, "bf16")])
@pytest.mark.parametrize("N", [1, 37])
def test_one_kernel_layernorm_backward_equals_the_two_kernels(emulated, monkeypatch, dtype, out, N):
    """dx, dweight/dbias partial sums and the cast with its column partial sums, from
    layernorm_backward_fused, against layernorm_backward_dx + _params (its formulas)."""
    rng = np.random.default_rng(5)
    C = 40
    out_dtype = bfloat16() if out == "bf16" else dtype
    x = rng.standard_normal((1, N, C)).astype(dtype)
    dout = rng.standard_normal((1, N, C)).astype(out_dtype)
    w, b = rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype)
    _, cache = kernels.layernorm.forward(x, w, b, out_dtype=out_dtype)
    resid = rng.standard_normal((1, N, C)).astype(dtype)
    results = []
    for max_c in (kernels.layernorm.FUSED_MAX_C, 0):  # one kernel, then the two
        monkeypatch.setattr(kernels.layernorm, "FUSED_MAX_C", max_c)
        n_chunks = kernels.layernorm.param_chunks(N)[1]
        part = np.zeros(n_chunks * 3 * C, dtype=dtype if dtype == np.float64 else np.float32)
        dx, cast = resid.copy(), np.zeros((N, C), dtype=out_dtype)
        kernels.layernorm.backward(dout, cache, dx_out=dx, part=(part, 0, 3 * C), cast=(cast, (2 * C, 3 * C)))
        results.append((dx, cast, part.reshape(n_chunks, 3 * C).sum(axis=0)))
    (dx1, cast1, sums1), (dx2, cast2, sums2) = results
    np.testing.assert_array_equal(dx1, dx2)  # the same formula per row: the same bits
    np.testing.assert_array_equal(cast1, cast2)
    np.testing.assert_array_equal(cast1, dx1.reshape(N, C).astype(out_dtype))
    assert_close(sums1, sums2, dtype, "column sums")  # the same sums, added in another order
    assert_close(sums1[2 * C:], dx1.reshape(N, C).sum(axis=0), dtype, "residual column sums")


def test_every_kernel_argument_of_the_124m_step_is_16_byte_aligned(monkeypatch):
    """The 16-byte paths are the ones the real step takes: in one steady-state bf16 step
    of GPT-2 124M (the counting stand-in: CuPy's pool addresses, 512-byte rounded, and
    every view the step makes of them) no kernel receives an array off a 16-byte
    boundary, and every row width of a 2-D float argument is a multiple of 8 (C = 768,
    2304, 3072, V = 50304)."""
    from nanogpt_np.gpucheck import counts

    misaligned, widths = set(), set()
    launch = counts.CountingKernels.launch

    def checking(self, kernel_file, name, grid, block, args, shared_mem):
        arrays = [(k, a) for k, a in enumerate(args) if isinstance(a, counts.CountingArray)]
        misaligned.update((name, k) for k, a in arrays if a.data.ptr % 16)
        widths.update(a.shape[-1] for _, a in arrays if a.ndim == 2 and a.dtype.kind not in "iu")  # not ids, tables
        return launch(self, kernel_file, name, grid, block, args, shared_mem)

    monkeypatch.setattr(counts.CountingKernels, "launch", checking)
    counts.count_step()
    assert not misaligned
    assert {768, 2304, 3072, 50304} <= widths and all(w % 8 == 0 for w in widths), widths
