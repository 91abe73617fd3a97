"""The NumPy-only safetensors reader/writer against the reference `safetensors` package."""
import json

import numpy as np
import pytest

# the reference package and PyTorch (for bfloat16) are in the test extra: without them this file skips
torch = pytest.importorskip("torch", reason="PyTorch is in the test extra: pip install -e '.[test]'")
pytest.importorskip("safetensors", reason="safetensors is in the test extra: pip install -e '.[test]'")
from safetensors.numpy import load_file, save_file  # noqa: E402
from safetensors.torch import save_file as torch_save_file  # noqa: E402

from nanogpt_np import safetensors_io as st


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 5)).astype(np.float32),
        "d": rng.standard_normal((2, 1, 4)),  # float64
        "h": rng.standard_normal(7).astype(np.float16),
        "i": np.arange(-3, 3, dtype=np.int64).reshape(2, 3),
        "u": np.arange(5, dtype=np.uint8),
        "b": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 4), dtype=np.float32),
    }


def test_round_trip_and_the_reference_reads_our_files(tmp_path):
    tensors = sample_tensors()
    path = tmp_path / "x.safetensors"
    st.save(path, tensors, metadata={"format": "pt"})
    ours, ref = st.load(path), load_file(str(path))
    header, metadata, start = st.read_header(path)
    assert metadata == {"format": "pt"} and start % 8 == 0
    for name, a in tensors.items():
        for got in (ours[name], ref[name]):
            assert got.dtype == a.dtype and got.shape == a.shape
            np.testing.assert_array_equal(got, a)


def test_we_read_the_references_files_including_bf16(tmp_path):
    tensors = {k: v for k, v in sample_tensors().items() if k != "empty"}
    path = tmp_path / "ref.safetensors"
    save_file(tensors, str(path))
    ours = st.load(path)
    for name, a in tensors.items():
        np.testing.assert_array_equal(ours[name], a)
    bf = torch.randn(4, 6).bfloat16()
    torch_save_file({"w": bf}, str(tmp_path / "bf16.safetensors"))
    w = st.load(tmp_path / "bf16.safetensors")["w"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, bf.float().numpy())
    assert set(st.load(path, names=["w"])) == {"w"}
    with pytest.raises(KeyError, match="no tensor named nope"):
        st.load(path, names=["nope"])


def test_bf16_rounding_matches_torch():
    x = np.concatenate([np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 100,
                        np.array([0.0, -0.0, np.inf, -np.inf, 1e-40], dtype=np.float32)])
    bits = st.float32_to_bf16_bits(x)
    expected = torch.from_numpy(x).bfloat16().view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(bits, expected)
    assert np.isnan(st.bf16_bits_to_float32(st.float32_to_bf16_bits(np.array([np.nan], np.float32))))


def write_raw(path, header, data=b""):
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
        (lambda p: p.write_bytes((10**9).to_bytes(8, "little") + b"{}"), "header length"),
        (lambda p: p.write_bytes((4).to_bytes(8, "little") + b"{no}"), "not valid JSON"),
        (lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"1234"), "truncated"),
        (lambda p: write_raw(p, {"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"12345678"),
         "needs 12 bytes"),
        (lambda p: write_raw(p, {"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"12345678"),
         "dtype C64"),
        (lambda p: write_raw(p, {"a": {"shape": [1]}}), "malformed header entry"),
    ],
)
def test_corrupt_files_are_named(tmp_path, make, match):
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(st.SafetensorsError, match=match):
        st.load(path)


def test_atomic_open_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with st.atomic_open(target) as f:
            f.write(b"new but incomplete")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]  # no temporary left behind
    with st.atomic_open(target) as f:
        f.write(b"new")
    assert target.read_bytes() == b"new"
