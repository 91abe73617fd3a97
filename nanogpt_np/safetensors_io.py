"""Read and write the safetensors format with NumPy alone (no pickle, no torch).

A safetensors file is three parts, back to back:

    8 bytes      N, the header's length, an unsigned little-endian 64-bit integer
    N bytes      a JSON object: {name: {"dtype": "F32", "shape": [..], "data_offsets": [begin, end]}},
                 plus an optional "__metadata__": {str: str}; padded with spaces
    the rest     the tensors' raw bytes, little-endian, row-major; each tensor's
                 bytes are data[begin:end], counted from the end of the header

That is all: reading it is a JSON parse and a view into the bytes, so we map the
file and copy out only the tensors asked for. NumPy has no bfloat16; a BF16
value is the top half of a float32, so it is widened by a 16-bit shift.
"""
import json
import math
import os
import tempfile

import numpy as np

from .jsonio import parse_json

# safetensors dtype -> NumPy dtype of the stored bytes (BF16 is read as raw uint16)
DTYPES = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_NAMES = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<i8"): "I64",
          np.dtype("<i4"): "I32", np.dtype("<i2"): "I16", np.dtype("i1"): "I8", np.dtype("u1"): "U8",
          np.dtype("?"): "BOOL"}
MAX_HEADER = 100 << 20  # the reference implementation refuses larger headers too


class SafetensorsError(ValueError):
    """The file is not a valid safetensors file; the message names the problem."""


def read_header(path):
    """(header dict without __metadata__, metadata dict, byte offset where the data starts).

    Checked as the format's reference implementation checks it, before any tensor is
    read: the header is one JSON object with no repeated key; each entry has a dtype
    this reader knows, a shape of non-negative integers and two integer offsets; and
    the byte ranges, sorted, tile the data section exactly (from 0 to its last byte,
    no gap, no overlap), each as long as its shape and dtype need. A header length a
    few bytes off therefore fails here instead of shifting every tensor."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: header length {n} does not fit a {size}-byte file; the file is truncated "
                "or not safetensors (download it again)"
            )
        raw = f.read(n)
    header = _parse_header_json(path, raw)
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map names to strings")
    for name, info in header.items():
        _check_entry(path, name, info)
    _check_tiling(path, header, size - 8 - n)
    return header, metadata, 8 + n


def _parse_header_json(path, raw):
    def no_repeats(pairs):
        keys = [k for k, _ in pairs]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            raise SafetensorsError(f"{path}: the header names {', '.join(map(repr, repeated))} more than once")
        return dict(pairs)

    header = parse_json(raw, f"{path}: the header", SafetensorsError, object_pairs_hook=no_repeats,
                        hint="; the file is corrupt")
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: the header is not a JSON object")
    return header


def _is_index(v):
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0  # JSON true is not an offset


def _check_entry(path, name, info):
    if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
        raise SafetensorsError(f"{path}: tensor {name!r} has a malformed header entry {info!r} (it needs exactly "
                               "dtype, shape and data_offsets)")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise SafetensorsError(
            f"{path}: tensor {name!r} has dtype {dtype if isinstance(dtype, str) else repr(dtype)}, which this "
            "reader does not handle "
            f"(it reads {', '.join(DTYPES)})"
        )
    if not isinstance(shape, list) or not all(_is_index(d) for d in shape):
        raise SafetensorsError(f"{path}: tensor {name!r} has a bad shape {shape!r} (a list of non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_index(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise SafetensorsError(f"{path}: tensor {name!r} has bad data_offsets {offsets!r} ([begin, end], integers)")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise SafetensorsError(
            f"{path}: tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} bytes, "
            f"but its offsets give {offsets[1] - offsets[0]}"
        )


def _check_tiling(path, header, data_size):
    expected = 0
    for name, info in sorted(header.items(), key=lambda kv: tuple(kv[1]["data_offsets"])):
        begin, end = info["data_offsets"]
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else f"leaves a gap of {begin - expected} bytes"
            raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {begin} of the data, which {what}; "
                                   "the byte ranges must tile the data section, so the file is corrupt")
        expected = end
    if expected != data_size:
        raise SafetensorsError(
            f"{path}: the tensors cover {expected} bytes but the data section has {data_size}; the header "
            "length or the offsets are wrong, or the file is truncated"
        )


def load(path, names=None):
    """{name: np.ndarray} for every tensor (or those in `names`), copied out of the file.

    F16 stays float16; BF16 comes back as float32 (exact: bf16 is a truncated float32).
    """
    header, _, start = read_header(path)
    if names is not None:
        missing = [n for n in names if n not in header]
        if missing:
            raise KeyError(f"{path} has no tensor named {', '.join(missing)}")
        header = {n: header[n] for n in names}
    data = np.memmap(path, dtype=np.uint8, mode="r")
    out = {}
    for name, info in header.items():
        begin, end = info["data_offsets"]
        stored = DTYPES[info["dtype"]]
        raw = np.asarray(data[start + begin : start + end]).view(stored).reshape(tuple(info["shape"]))
        if info["dtype"] == "BF16":
            out[name] = bf16_bits_to_float32(raw)
        else:
            out[name] = raw.astype(stored.newbyteorder("="))  # a copy, in native byte order
    del data
    return out


def bf16_bits_to_float32(bits):
    """uint16 bfloat16 bit patterns -> float32 values (the bits become the top half)."""
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(x):
    """float32 -> uint16 bfloat16 bit patterns, rounding to nearest even (NaN stays NaN)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
    return np.where(np.isnan(x), np.uint32(0x7FC0), rounded).astype(np.uint16)


def save(path, tensors, metadata=None):
    """Write {name: array} as a safetensors file, atomically (temp file, then rename)."""
    header, offset, arrays = {}, 0, []
    for name, a in tensors.items():
        a = np.asarray(a)
        dtype = a.dtype.newbyteorder("<") if a.dtype.itemsize > 1 else a.dtype  # the file is little-endian
        if dtype not in _NAMES:
            raise TypeError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors here")
        a = np.asarray(a, dtype=dtype, order="C")  # (not ascontiguousarray: it makes 0-d arrays 1-d)
        header[name] = {"dtype": _NAMES[dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        arrays.append(a)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned, as the reference writer does
    with atomic_open(path) as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())


class atomic_open:
    """open(path, "wb") that only ever leaves the old file or the complete new one:
    the bytes go to a temporary file in the same directory, renamed over path on success."""

    def __init__(self, path):
        self.path = os.fspath(path)

    def __enter__(self):
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp = tempfile.mkstemp(prefix=os.path.basename(self.path) + ".", suffix=".tmp", dir=directory)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
        self.f = os.fdopen(fd, "wb")
        return self.f

    def __exit__(self, exc_type, exc, tb):
        try:
            if exc_type is None:
                self.f.flush()
                os.fsync(self.f.fileno())
            self.f.close()
            if exc_type is None:
                os.replace(self.tmp, self.path)
        finally:
            if os.path.exists(self.tmp):
                os.unlink(self.tmp)
        return False
