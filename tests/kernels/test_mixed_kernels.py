"""The mixed-precision kernels on the CPU emulator: bf16 instantiations of LayerNorm,
GELU and cross-entropy, the fused elementwise kernels of fused.cu, and the cuBLAS
gemmEx wrapper (run against a NumPy model of gemmEx that reads and writes through
the same pointers and leading dimensions).

bf16 results are compared with a float64 reference computed from the very bf16
values the kernel read, so the only difference allowed is the final rounding to
bf16 (half a bf16 ulp, plus float32 arithmetic): a relative 2^-8 of the largest
value. Anything computed in float32 (statistics, losses, float32 outputs) must
match to float32 rounding.
"""
import numpy as np
import pytest

from nanogpt_np import kernels, layers
from nanogpt_np.backend import bfloat16
from nanogpt_np.kernels import fused, gemm
from tests.helpers import assert_close, rel_err
from tests.kernels.emulator import placed

BF16 = bfloat16()
BF16_TOL = 2.0**-8  # one rounding to bf16, relative to the largest value
F32_TOL = 2e-5


def bf16(a):
    """a rounded to bf16 (an ml_dtypes array)."""
    return np.asarray(a, dtype=np.float32).astype(BF16)


def f64(a):
    return np.asarray(a).astype(np.float64)


def close_bf16(actual, expected, what):
    assert actual.dtype == BF16, f"{what}: dtype {actual.dtype}, wanted bf16"
    err = rel_err(f64(actual), expected)
    assert err <= BF16_TOL, f"{what}: relative error {err:.2e} > {BF16_TOL:.1e}"


def close_f32(actual, expected, what, tol=F32_TOL):
    err = rel_err(f64(actual), expected)
    assert err <= tol, f"{what}: relative error {err:.2e} > {tol:.1e}"


@pytest.mark.parametrize("shape", [(1, 1, 33), (2, 7, 45), (1, 13, 768)])
def test_layernorm_float32_in_bf16_out(emulated, shape):
    rng = np.random.default_rng(0)
    C = shape[-1]
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    out, cache = kernels.layernorm.forward(x, w, b, out_dtype=BF16)
    out_ref, cache_ref = layers.layernorm.forward(f64(x), f64(w), f64(b))
    close_bf16(out, out_ref, "out")
    assert cache[2].dtype == np.float32 and cache[3].dtype == np.float32  # statistics stay float32
    close_f32(cache[3], cache_ref[3], "rstd")
    # backward: bf16 dout (what the matmul's backward hands over), float32 dx
    dout = bf16(rng.standard_normal(shape))
    dx, dw, db = kernels.layernorm.backward(dout, cache)
    dx_ref, dw_ref, db_ref = layers.layernorm.backward(f64(dout), cache_ref)
    assert dx.dtype == np.float32 and dw.dtype == np.float32
    close_f32(dx, dx_ref, "dx", tol=1e-4)
    close_f32(dw, dw_ref, "dweight", tol=1e-4)
    close_f32(db, db_ref, "dbias")


def warp_sums_in_lane_order(v, W):
    """layernorm.cu's row sums in NumPy, in the kernels' order: lane l adds channels
    [W l + 32 W k, ... + W) for k = 0, 1, ... one after another, then warp_sum's
    butterfly (lane l adds lane l ^ offset's sum, offset 16, 8, 4, 2, 1). (N,)"""
    N, C = v.shape
    lanes = np.zeros((N, 32), dtype=v.dtype)
    for c0 in range(0, C, 32 * W):
        for j in range(W):
            c = c0 + W * np.arange(32) + j
            inside = c < C
            lanes[:, inside] = lanes[:, inside] + v[:, c[inside]]
    for offset in (16, 8, 4, 2, 1):
        lanes = lanes + lanes[:, np.arange(32) ^ offset]
    return lanes[:, 0]


def layernorm_in_lane_order(x, w, b, W, out_dtype, eps=np.float32(1e-5)):
    """layernorm_forward's (out, mean, rstd) in float32 NumPy, operation by operation."""
    mean = warp_sums_in_lane_order(x, W) / np.float32(x.shape[1])
    d = x - mean[:, None]
    rstd = np.float32(1) / np.sqrt(warp_sums_in_lane_order(d * d, W) / np.float32(x.shape[1]) + eps)
    return (d * rstd[:, None] * w + b).astype(out_dtype), mean, rstd


@pytest.mark.parametrize("out", [np.float32, "bf16"])
@pytest.mark.parametrize("N, C", [(1, 40), (7, 768), (3, 13), (5, 36)])
def test_layernorm_rows_follow_their_lane_order_bit_for_bit(emulated, out, N, C):
    """16-byte row access (aligned, C a multiple of the width) and one channel at a time
    (a misaligned x) each give exactly the NumPy model of their lane order: the width
    changes which channels a lane adds, never what a channel computes."""
    rng = np.random.default_rng(9)
    out_dtype = BF16 if out == "bf16" else np.dtype(np.float32)
    x = (rng.standard_normal((N, C)) * 2 + 0.5).astype(np.float32)
    w, b = rng.standard_normal(C).astype(np.float32), rng.standard_normal(C).astype(np.float32)
    width = fused.per16(np.float32, out_dtype)
    for misaligned in (False, True):
        W = 1 if misaligned or C % width else width
        got, cache = kernels.layernorm.forward(placed(x, misaligned), w, b, out_dtype=out_dtype)
        want, mean, rstd = layernorm_in_lane_order(x, w, b, W, out_dtype)
        np.testing.assert_array_equal(cache[2].reshape(-1), mean)
        np.testing.assert_array_equal(cache[3].reshape(-1), rstd)
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_layernorm_backward_adds_into_dx_out(emulated, dtype):
    rng = np.random.default_rng(1)
    x, dout, resid = (rng.standard_normal((2, 5, 40)).astype(dtype) for _ in range(3))
    w, b = rng.standard_normal(40).astype(dtype), rng.standard_normal(40).astype(dtype)
    _, cache = kernels.layernorm.forward(x, w, b)
    dx_plain, dw, db = kernels.layernorm.backward(dout, cache)
    acc = resid.copy()
    dx, dw2, db2 = kernels.layernorm.backward(dout, cache, dx_out=acc)
    assert dx is acc or np.shares_memory(dx, acc)
    assert_close(acc, resid + dx_plain, dtype, "accumulated dx")
    np.testing.assert_array_equal(dw, dw2)
    with pytest.raises(ValueError, match="dx_out must be"):
        kernels.layernorm.backward(dout, cache, dx_out=acc[:, :4])


@pytest.mark.parametrize("shape", [(1, 1), (3, 50), (2, 7, 333)])
def test_gelu_bf16(emulated, shape):
    rng = np.random.default_rng(2)
    x, dout = bf16(rng.standard_normal(shape) * 3), bf16(rng.standard_normal(shape))
    out, cache = kernels.gelu.forward(x)
    out_ref, cache_ref = layers.gelu.forward(f64(x))
    close_bf16(out, out_ref, "out")
    close_bf16(kernels.gelu.backward(dout, cache), layers.gelu.backward(f64(dout), cache_ref), "dx")


@pytest.mark.parametrize("B,T,V", [(1, 1, 5), (2, 7, 101), (1, 3, 1000)])
def test_cross_entropy_bf16_logits(emulated, B, T, V):
    rng = np.random.default_rng(3)
    logits = bf16(rng.standard_normal((B, T, V)) * 4)
    targets = rng.integers(0, V, (B, T))
    mine = logits.copy()
    loss, cache = kernels.cross_entropy.forward(mine, targets)
    loss_ref, cache_ref = layers.cross_entropy.forward(f64(logits), targets)
    assert loss.dtype == np.float32  # the loss is float32 arithmetic on bf16 inputs
    close_f32(loss, loss_ref, "loss")
    dlogits = kernels.cross_entropy.backward(1.0, cache)
    assert np.shares_memory(dlogits, mine)
    close_bf16(dlogits, layers.cross_entropy.backward(1.0, cache_ref), "dlogits")


# ---- fused.cu against its formulas --------------------------------------------------------

def gelu64(u):
    out, _ = layers.gelu.forward(u)
    return out


def gelu_grad64(u, dout):
    _, cache = layers.gelu.forward(u)
    return layers.gelu.backward(dout, cache)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, "bf16"])
@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 9, 70), (1, 301, 5)])
def test_fused_kernels_match_their_formulas(emulated, dtype, shape):
    rng = np.random.default_rng(4)
    low = dtype == "bf16"
    act = BF16 if low else np.dtype(dtype)  # the activation dtype
    resid = np.float32 if low else act  # the residual stream / bias dtype
    C = shape[-1]
    pre, dout, a = (rng.standard_normal(shape).astype(np.float32).astype(act) for _ in range(3))
    x = rng.standard_normal(shape).astype(resid)
    bias = rng.standard_normal(C).astype(resid)

    def check(actual, expected, what):
        if low:
            close_bf16(actual, expected, what) if actual.dtype == BF16 else close_f32(actual, expected, what)
        else:
            assert actual.dtype == act
            assert_close(actual, expected, act, what, factor=10)

    check(fused.bias_gelu_forward(pre, bias), gelu64(f64(pre) + f64(bias)), "bias_gelu")
    dpre, dbias = fused.bias_gelu_backward(dout, pre, bias)
    dpre_ref = gelu_grad64(f64(pre) + f64(bias), f64(dout))
    check(dpre, dpre_ref, "bias_gelu dpre")
    check(dbias, dpre_ref.reshape(-1, C).sum(axis=0), "bias_gelu dbias")
    out = fused.bias_residual(x, a, bias)
    assert out.dtype == resid
    check(out, f64(x) + f64(a) + f64(bias), "bias_residual")
    cast, sums = fused.cast_column_sums(x, act)
    assert cast.dtype == act
    check(cast, f64(x), "cast")
    check(sums, f64(x).reshape(-1, C).sum(axis=0), "cast column sums")
    check(fused.column_sums(a), f64(a).reshape(-1, C).sum(axis=0), "column_sums")
    added = a.copy()
    check(fused.bias_add(added, bias), f64(a) + f64(bias), "bias_add")


def bits(a):
    return np.asarray(a).view(np.uint8)


def both_paths(run, *arrays):
    """run(*arrays) with every array 16-byte aligned (the vector path where the shape
    allows) and with the first one misaligned (the scalar path): results as uint8 bits."""
    results = []
    for misaligned in (False, True):
        placed_arrays = [placed(a, misaligned and k == 0) for k, a in enumerate(arrays)]
        results.append([bits(r) for r in run(*placed_arrays)])
    return results


# C a multiple of 8 (every dtype's vector path), of 4 only, of 2 only, odd; N = 1 and odd N
VECTOR_SHAPES = [(1, 1, 3), (1, 1, 8), (3, 5, 16), (1, 7, 12), (2, 3, 6), (1, 9, 13), (4, 33, 24)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32, "bf16"])
@pytest.mark.parametrize("shape", VECTOR_SHAPES)
def test_fused_vector_and_scalar_paths_give_the_same_bits(emulated, dtype, shape):
    """16-byte accesses change only how the elements are loaded: the aligned call (vector
    path) and the misaligned one (scalar path) agree bit for bit, and the kernels whose
    formula NumPy evaluates in the same precision agree with NumPy bit for bit."""
    rng = np.random.default_rng(6)
    low = dtype == "bf16"
    act = BF16 if low else np.dtype(dtype)
    resid = np.dtype(np.float32) if low else act
    C = shape[-1]
    pre, dout, a = (rng.standard_normal(shape).astype(np.float32).astype(act) for _ in range(3))
    x = rng.standard_normal(shape).astype(resid)
    bias = rng.standard_normal(C).astype(resid)
    aligned, misaligned = both_paths(lambda a_, x_, b_: [fused.bias_residual(x_, a_, b_)], a, x, bias)
    np.testing.assert_array_equal(aligned[0], misaligned[0])
    want = (x + (a.astype(resid) + bias)).astype(resid)  # TX(A(x) + (A(a) + bias)), as NumPy rounds it
    np.testing.assert_array_equal(bits(fused.bias_residual(x, a, bias)), bits(want))
    added = placed(a, False)
    fused.bias_add(added, bias)
    np.testing.assert_array_equal(bits(added), bits((a.astype(resid) + bias).astype(act)))
    shifted = placed(a, True)
    fused.bias_add(shifted, bias)
    np.testing.assert_array_equal(bits(shifted), bits(added))
    for run, arrays in [
        (lambda p_, b_: [fused.bias_gelu_forward(p_, b_)], (pre, bias)),
        (lambda d_, p_, b_: fused.bias_gelu_backward(d_, p_, b_), (dout, pre, bias)),
        (lambda x_: fused.cast_column_sums(x_, act), (x,)),
        (lambda a_: [fused.column_sums(a_)], (a,)),
        (lambda x_: [kernels.gelu.forward(x_)[0]], (pre,)),
        (lambda d_, x_: [kernels.gelu.backward(d_, x_)], (dout, pre)),
    ]:
        aligned, misaligned = both_paths(run, *arrays)
        for u, v in zip(aligned, misaligned):
            np.testing.assert_array_equal(u, v)
    for to in ({act, resid} if low else {act}):  # the casts, each way
        src = x if to == act else a
        aligned, misaligned = both_paths(lambda s_: [fused.cast(s_, to)], src)
        np.testing.assert_array_equal(aligned[0], misaligned[0])
        np.testing.assert_array_equal(aligned[0], bits(src.astype(to)))


def sums_in_kernel_order(a, rows_per_chunk, n_chunks, lanes):
    """fused.cu's column partial sums in NumPy, in the kernels' order: chunk k, row
    lane y sums rows r0 + y, r0 + y + lanes, ... one after another, then the lanes'
    sums are added in lane order. (n_chunks, C), in a's accumulate dtype."""
    acc = np.float32 if a.dtype == BF16 else a.dtype
    a = a.reshape(-1, a.shape[-1]).astype(acc)
    N, C = a.shape
    out = np.zeros((n_chunks, C), dtype=acc)
    for k in range(n_chunks):
        r0, r1 = k * rows_per_chunk, min(N, (k + 1) * rows_per_chunk)
        lane_sums = []
        for y in range(lanes):
            s = np.zeros(C, dtype=acc)
            for r in range(r0 + y, r1, lanes):
                s = s + a[r]
            lane_sums.append(s)
        total = lane_sums[0]
        for s in lane_sums[1:]:
            total = total + s
        out[k] = total
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32, "bf16"])
@pytest.mark.parametrize("N, C", [(1, 3), (37, 24), (301, 13), (600, 40)])
def test_column_sums_follow_their_fixed_order_bit_for_bit(emulated, monkeypatch, dtype, N, C):
    """The partial sums are the NumPy model's, bit for bit, on both paths: more row lanes
    and chunks change the order of the additions, never make it depend on timing."""
    monkeypatch.setattr(fused, "ROW_CHUNKS", 4)  # several chunks, the last one short, at test sizes
    rng = np.random.default_rng(7)
    act = BF16 if dtype == "bf16" else np.dtype(dtype)
    acc = np.float32 if dtype == "bf16" else act
    a = rng.standard_normal((N, C)).astype(np.float32).astype(act)
    rows_per_chunk, n_chunks = fused._chunks(N)
    want = sums_in_kernel_order(a, rows_per_chunk, n_chunks, fused.COLUMN_BLOCK[1])
    for misaligned in (False, True):
        part = np.full(n_chunks * C, np.nan, dtype=acc)
        fused.column_sums(placed(a, misaligned), part=(part, C))
        np.testing.assert_array_equal(part.reshape(n_chunks, C), want)
        part[...] = np.nan  # cast_column_sums reads the float32 residual stream (bf16 values here)
        cast, _ = fused.cast_column_sums(placed(a.astype(acc), misaligned), act, part=(part, C))
        np.testing.assert_array_equal(part.reshape(n_chunks, C), want)
        np.testing.assert_array_equal(bits(cast), bits(a))


def test_a_vector_access_without_its_guard_fails_in_the_emulator(tmp_path):
    """The emulator faults a misaligned 16-byte access as the GPU does, so a wrong guard
    cannot pass the tests: gelu_forward with its alignment check removed, given a
    misaligned view."""
    import shutil

    from nanogpt_np.kernels import gelu, loader
    from tests.kernels import emulator

    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    source = (loader.KERNEL_DIR / "gelu.cu").read_text()
    guard = "aligned16(x) && aligned16(out) ? n / V : 0"
    assert guard in source
    lib = emulator.build(tmp_path, replace={"gelu.cu": source.replace(guard, "n / V")}, files=["gelu.cu"],
                         race_detector=False)
    previous = loader.use_runner(emulator.EmulatedRunner(lib))
    try:
        x = np.arange(40, dtype=np.float32)
        gelu.forward(placed(x, False))  # aligned: the unguarded vector path is fine
        with pytest.raises(RuntimeError, match="16-byte vector access at a misaligned address"):
            gelu.forward(placed(x, True))
    finally:
        loader.use_runner(previous)


def test_cast_rounds_to_nearest_even_as_ml_dtypes(emulated):
    """The kernel's float32 -> bf16 rounding is bit for bit ml_dtypes' (and so
    PyTorch's): ties to even, NaN and infinities kept, overflow to infinity."""
    rng = np.random.default_rng(5)
    specials = np.array([0.0, -0.0, 1.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-9, np.inf, -np.inf, np.nan,
                         3.4e38, 1e-40, -1e-45, 65504.0], dtype=np.float32)
    values = np.concatenate([specials, rng.standard_normal(5000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 5000)])
    values = values.astype(np.float32)
    got = fused.cast(values, BF16)
    want = values.astype(BF16)
    np.testing.assert_array_equal(got.view(np.uint16)[~np.isnan(values)], want.view(np.uint16)[~np.isnan(values)])
    assert np.isnan(got[np.isnan(values)].astype(np.float32)).all()
    back = fused.cast(got, np.float32)  # widening is exact
    np.testing.assert_array_equal(back, want.astype(np.float32))


# ---- the gemmEx wrapper ---------------------------------------------------------------------

@pytest.fixture
def numpy_cublas():
    from tests.kernels.emulator import NumpyCublas

    runner = NumpyCublas()
    previous = gemm.use_runner(runner)
    yield runner
    gemm.use_runner(previous)


@pytest.mark.parametrize("trans_a", [False, True])
@pytest.mark.parametrize("trans_b", [False, True])
@pytest.mark.parametrize("M,K,N", [(1, 1, 1), (5, 3, 7), (16, 64, 24), (2, 9, 1)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32, "bf16"])
def test_gemm_matches_matmul(numpy_cublas, trans_a, trans_b, M, K, N, dtype):
    rng = np.random.default_rng(M * 100 + K * 10 + N)
    dt = BF16 if dtype == "bf16" else np.dtype(dtype)
    a_op, b_op = rng.standard_normal((M, K)), rng.standard_normal((K, N))
    a = np.ascontiguousarray(a_op.T if trans_a else a_op).astype(np.float32).astype(dt)
    b = np.ascontiguousarray(b_op.T if trans_b else b_op).astype(np.float32).astype(dt)
    expected = (f64(a).T if trans_a else f64(a)) @ (f64(b).T if trans_b else f64(b))
    out = gemm.matmul(a, b, trans_a=trans_a, trans_b=trans_b)
    assert out.shape == (M, N) and out.dtype == dt
    if dtype == "bf16":
        close_bf16(out, expected, "bf16 out")
        wide = gemm.matmul(a, b, trans_a=trans_a, trans_b=trans_b, out_dtype=np.float32)
        assert wide.dtype == np.float32
        close_f32(wide, expected, "float32 out")  # the product itself is not rounded to bf16
    else:
        assert_close(out, expected, dt, "out")


@pytest.mark.parametrize("dtype", [np.float32, "bf16"])
def test_gemm_beta_one_accumulates_into_float32(numpy_cublas, dtype):
    """What a weight gradient needs: dW += dout.T @ x, bf16 operands, float32 dW."""
    rng = np.random.default_rng(6)
    dt = BF16 if dtype == "bf16" else np.dtype(dtype)
    dout, x = rng.standard_normal((10, 6)).astype(dt), rng.standard_normal((10, 4)).astype(dt)
    dW = rng.standard_normal((6, 4)).astype(np.float32)
    before = dW.copy()
    out = gemm.matmul(dout, x, out=dW, trans_a=True, beta=1.0)
    assert out is dW
    close_f32(dW, f64(before) + f64(dout).T @ f64(x), "dW")
    assert numpy_cublas.calls[-1][-1] == 1.0


def test_gemm_column_major_arguments(numpy_cublas):
    """The row-major product becomes the column-major out.T = op(b).T @ op(a).T."""
    a, b = np.zeros((5, 3), np.float32), np.zeros((7, 3), np.float32)  # a (M, K), b stored (N, K)
    gemm.matmul(a, b, trans_b=True)
    transa, transb, m, n, k, lda, ldb, ldc, beta = numpy_cublas.calls[-1]
    assert (transa, transb, m, n, k) == (gemm.OP_T, gemm.OP_N, 7, 5, 3)
    assert (lda, ldb, ldc) == (3, 3, 7)


def test_gemm_rejects_bad_calls(numpy_cublas):
    a = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="does not give out"):
        gemm.matmul(a, np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError, match="differ in dtype"):
        gemm.matmul(a, np.zeros((3, 2), np.float64))
    with pytest.raises(ValueError, match="C-contiguous"):
        gemm.matmul(a.T, np.zeros((4, 2), np.float32))
    with pytest.raises(ValueError, match="beta != 0"):
        gemm.matmul(a, np.zeros((3, 2), np.float32), beta=1.0)
    with pytest.raises(TypeError, match="cannot write"):
        gemm.matmul(a, np.zeros((3, 2), np.float32), out=np.zeros((4, 2), np.float64))
