"""backend.PinnedUpload and the model's batch upload, on the stand-in CuPy: a training
step's idx and targets reach the GPU in one copy, into one buffer kept per shape."""
import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig
from nanogpt_np.backend import PinnedUpload, data_pointer
from tests.kernels import fake_cupy


@pytest.fixture
def cupy(monkeypatch):
    return fake_cupy.install(monkeypatch)


def test_upload_of_parts_fills_the_buffer_side_by_side(cupy):
    rng = np.random.default_rng(0)
    upload = PinnedUpload(cupy, (2, 3, 5), np.int32, slots=2)
    for _ in range(3):  # more uploads than staging slots: they take turns
        a, b = rng.integers(0, 100, (3, 5)), rng.integers(0, 100, (3, 5))
        device = upload.upload((a, b))
        assert device is upload.device  # the same device buffer every time
        np.testing.assert_array_equal(device.get(), np.stack([a, b]))
    np.testing.assert_array_equal(upload.upload(np.ones((2, 3, 5))).get(), 1)  # one array still works
    with pytest.raises(ValueError, match=r"shape \(2, 3, 6\) is not this buffer's \(2, 3, 5\)"):
        upload.upload(np.ones((2, 3, 6)))
    with pytest.raises(ValueError, match=r"parts of shapes \[\(3, 5\), \(3, 4\)\]; this buffer takes 2 parts of shape \(3, 5\)"):
        upload.upload((a, b[:, :4]))
    for wrong in [(), (a,), (a, b, a)]:
        with pytest.raises(ValueError, match="this buffer takes 2 parts"):
            upload.upload(wrong)


@pytest.mark.parametrize("B, T", [(1, 1), (2, 7)])
def test_a_batch_goes_up_in_one_buffer(cupy, B, T):
    model = GPT(GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=1, n_embd=8), backend="cupy",
                init_weights=False)
    rng = np.random.default_rng(1)
    for _ in range(2):
        x, y = rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))
        idx, targets = model._check_inputs(x, y)
        np.testing.assert_array_equal(idx.get(), x)
        np.testing.assert_array_equal(targets.get(), y)
        assert idx.dtype == targets.dtype == np.int32 and idx.flags.c_contiguous and targets.flags.c_contiguous
        assert data_pointer(targets) == data_pointer(idx) + idx.nbytes  # the halves of one (2, B, T) buffer
    with pytest.raises(ValueError, match="outside"):  # still checked on the host first
        model._check_inputs(x, np.full((B, T), 11))
