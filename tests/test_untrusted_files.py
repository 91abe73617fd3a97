"""Files from elsewhere are checked before they are trusted.

Each reader gets valid files made by the package's own writers, mutated (truncated,
header lengths off by a few bytes, overlapping ranges, wrong dtypes, absurd sizes,
missing keys, non-object JSON, non-UTF-8 bytes), and must refuse every one with
its own error class, naming the file, quickly, with nothing built or trained."""
import json
import time
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, checkpoint, hellaswag, pretrained, safetensors_io as st
from nanogpt_np.checkpoint import CheckpointError
from nanogpt_np.hellaswag import HellaSwagError
from nanogpt_np.optim import AdamW
from nanogpt_np.pretrained import HFWeightsError, LlmcModelError
from tests.helpers import loader_state

CFG = GPTConfig(block_size=16, vocab_size=61, n_layer=2, n_head=2, n_embd=8)
FAST = 2.0  # seconds: every refusal is a header check, never an allocation of the claimed size


def refused(error_class, path, fn, *args, match=None):
    t0 = time.monotonic()
    with pytest.raises(error_class) as e:
        fn(*args)
    assert time.monotonic() - t0 < FAST
    assert str(path) in str(e.value), f"the message does not name {path}: {e.value}"
    if match:
        assert match in str(e.value), str(e.value)
    return str(e.value)


# ---- safetensors ------------------------------------------------------------------------------


def valid_safetensors(path):
    rng = np.random.default_rng(0)
    st.save(path, {"a": rng.standard_normal((3, 4)).astype(np.float32), "b": np.ones(5, np.float32),
                   "c": np.zeros((2, 2), np.float16)})
    return path


def header_and_data(path):
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_with(path, header_text, data):
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def header_length_off(k):
    def mutate(path):
        raw = bytearray(path.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        raw[:8] = (n + k).to_bytes(8, "little")
        path.write_bytes(bytes(raw))
    return mutate


def edit_header(change):
    def mutate(path):
        header, data = header_and_data(path)
        text = change(header)
        write_with(path, text if isinstance(text, (str, bytes)) else json.dumps(text), data)
    return mutate


def set_entry(name, key, value):
    def change(header):
        header[name][key] = value
        return header
    return change


SAFETENSORS_MUTATIONS = {
    "truncated by 1 byte": lambda p: p.write_bytes(p.read_bytes()[:-1]),
    "truncated to half": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "one extra byte": lambda p: p.write_bytes(p.read_bytes() + b"\0"),
    **{f"header length {k:+d}": header_length_off(k) for k in (-8, -5, -3, -1, 1, 3)},
    "overlapping ranges": edit_header(set_entry("b", "data_offsets", [0, 20])),
    "a gap between ranges": edit_header(lambda h: {**h, "a": {**h["a"], "data_offsets": [4, 52]}}),
    "offsets as booleans": edit_header(set_entry("a", "data_offsets", [False, True])),
    "offsets as floats": edit_header(set_entry("a", "data_offsets", [0.0, 48.0])),
    "dtype a list": edit_header(set_entry("a", "dtype", ["F32"])),
    "unknown dtype": edit_header(set_entry("a", "dtype", "C64")),
    "shape an int": edit_header(set_entry("a", "shape", 16)),
    "shape null": edit_header(set_entry("a", "shape", None)),
    "negative dim": edit_header(set_entry("a", "shape", [-3, -4])),
    "shape not matching its bytes": edit_header(set_entry("a", "shape", [4, 4])),
    "missing data_offsets": edit_header(lambda h: {**h, "a": {"dtype": "F32", "shape": [3, 4]}}),
    "duplicated key": edit_header(lambda h: json.dumps(h)[:-1] + ', "a": ' + json.dumps(h["a"]) + "}"),
    "header a list": edit_header(lambda h: "[1, 2, 3]"),
    "nested 100000 deep": edit_header(lambda h: "[" * 100000 + "]" * 100000),
    "not UTF-8": edit_header(lambda h: b'{"\xff": 1}'),
    "not JSON": edit_header(lambda h: "{nope"),
    "metadata not strings": edit_header(lambda h: {**h, "__metadata__": {"format": 3}}),
}


@pytest.mark.parametrize("mutation", list(SAFETENSORS_MUTATIONS))
def test_safetensors_mutations_are_refused_as_the_reference_refuses_them(tmp_path, mutation):
    from safetensors.numpy import load_file

    path = valid_safetensors(tmp_path / "m.safetensors")
    assert set(st.load(path)) == {"a", "b", "c"}
    SAFETENSORS_MUTATIONS[mutation](path)
    refused(st.SafetensorsError, path, st.load, path)
    try:  # the format's reference implementation: whatever it refuses, we refuse (above)
        load_file(str(path))
        reference_refused = False
    except Exception:
        reference_refused = True
    assert reference_refused or mutation in REFERENCE_LENIENT, f"the reference accepts {mutation!r}"


# cases the reference itself lets through (we refuse them anyway, as the format's spec says)
REFERENCE_LENIENT = {"duplicated key"}


# ---- Hugging Face directories ------------------------------------------------------------------


@pytest.fixture
def hf_dir(tmp_path):
    GPT(CFG, dtype=np.float32, seed=0).save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def edit_config(hf_dir, change):
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    out = change(cfg)
    path.write_bytes(out if isinstance(out, bytes) else json.dumps(out).encode())
    return path


@pytest.mark.parametrize("change,match", [
    (lambda c: [c], "must be a JSON object"),
    (lambda c: b'{"n_layer": 2, "\xff": 1}', "not UTF-8"),
    (lambda c: {**c, "n_layer": 10**9}, "n_layer=1000000000"),
    (lambda c: {**c, "n_layer": 3}, "holds blocks 0..1"),
    (lambda c: {**c, "n_head": 3}, "not divisible by n_head 3"),
    (lambda c: {**c, "n_embd": True}, "positive integer"),
    (lambda c: {**c, "n_positions": -1}, "positive integer"),
    (lambda c: {k: v for k, v in c.items() if k != "n_layer"}, "lacks 'n_layer'"),
    (lambda c: "[" * 100000 + "]" * 100000, "nested too deeply"),
], ids=["list", "0xff", "1e9 layers", "3 layers", "n_head 3", "bool", "negative", "no n_layer", "deep"])
def test_hf_config_mutations(hf_dir, change, match):
    path = edit_config(hf_dir, lambda c: (out.encode() if isinstance(out := change(c), str) else out))
    refused(HFWeightsError, path, pretrained.load_hf, hf_dir, match=match)


def test_hf_weights_stored_as_integers_are_refused(hf_dir):
    path = hf_dir / "model.safetensors"
    tensors = st.load(path)
    name = next(n for n in tensors if n.endswith("h.0.ln_1.weight"))
    tensors[name] = tensors[name].astype(np.int32)
    st.save(path, tensors)
    refused(HFWeightsError, path, pretrained.load_hf, hf_dir, match="stored as I32")


def test_a_shifted_header_never_loads_as_weights(hf_dir):
    path = hf_dir / "model.safetensors"
    header_length_off(-4)(path)
    refused(st.SafetensorsError, path, pretrained.load_hf, hf_dir)


# ---- llm.c model files -----------------------------------------------------------------------


@pytest.fixture
def llmc_file(tmp_path):
    path = tmp_path / "m.bin"
    pretrained.save_llmc(GPT(CFG, dtype=np.float32, seed=0), path)
    return path


def set_header_int(path, index, value):
    raw = bytearray(path.read_bytes())
    raw[4 * index : 4 * index + 4] = int(value).to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("mutate,match", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated or corrupt"),
    (lambda p: p.write_bytes(p.read_bytes()[:100]), "too short"),
    (lambda p: set_header_int(p, 0, 20240520), "a token data shard"),
    (lambda p: set_header_int(p, 1, 4), "version 4"),
    (lambda p: set_header_int(p, 4, 10**9), "implies"),
    (lambda p: set_header_int(p, 5, 3), "not divisible by num_heads 3"),
    (lambda p: set_header_int(p, 6, -8), "impossible sizes"),
], ids=["truncated", "short", "magic", "version", "1e9 layers", "heads", "negative"])
def test_llmc_mutations(llmc_file, mutate, match):
    mutate(llmc_file)
    refused(LlmcModelError, llmc_file, pretrained.load_llmc, llmc_file, match=match)


# ---- training checkpoints ----------------------------------------------------------------------


@pytest.fixture
def ckpt_file(tmp_path):
    model = GPT(CFG, dtype=np.float32, seed=0)
    opt = AdamW(model.parameters())
    path = tmp_path / "model_00003.npz"
    checkpoint.save_checkpoint(path, model, opt, 3, [loader_state()], np.random.default_rng(0).bit_generator.state)
    return path


def rewrite_checkpoint(path, change_meta=None, change_arrays=None):
    """The same checkpoint with meta or arrays changed and the checksums recomputed:
    what the checksums cannot catch (a writer's bug, a hand edit), the schema must."""
    import hashlib

    with np.load(path, allow_pickle=False) as npz:
        arrays = {k: npz[k] for k in npz.files if k not in ("meta", "meta_sha256")}
        meta = json.loads(str(npz["meta"]))
    if change_meta:
        meta = change_meta(meta)
    if change_arrays:
        change_arrays(arrays)
    if isinstance(meta, dict):
        meta["checksums"] = {k: checkpoint.sha256(a) for k, a in arrays.items()}
    text = json.dumps(meta)
    arrays["meta"], arrays["meta_sha256"] = np.array(text), np.array(hashlib.sha256(text.encode()).hexdigest())
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def drop(key):
    return lambda m: {k: v for k, v in m.items() if k != key}


def meta_set(key, value):
    return lambda m: {**m, key: value}


def loader_set(key, value):
    return lambda m: {**m, "loader_states": [{**m["loader_states"][0], key: value}]}


def array_set(name, fn):
    def change(arrays):
        arrays[name] = fn(arrays[name])
    return change


CKPT_META_MUTATIONS = {
    "no step": (drop("step"), "no 'step'"),
    "no loader_states": (drop("loader_states"), "no 'loader_states'"),
    "meta not an object": (lambda m: [m], "not a nanogpt_np-checkpoint file"),
    "step -1": (meta_set("step", -1), "step -1 is negative"),
    "step a string": (meta_set("step", "3"), "'step' is str"),
    "optimizer step -5": (lambda m: {**m, "optimizer": {**m["optimizer"], "step": -5}}, "optimizer step -5"),
    "shard_index 5": (loader_set("shard_index", 5), "shard_index 5 is past"),
    "shard_index -1": (loader_set("shard_index", -1), "shard_index is -1"),
    "rank mismatch": (loader_set("rank", 1), "says rank 1 of 1"),
    "no rng": (meta_set("rng_state", {}), "rng_state"),
    "dtype int64": (meta_set("dtype", "int64"), "dtype 'int64'"),
    "n_layer 1e9": (lambda m: {**m, "model_config": {**m["model_config"], "n_layer": 10**9}},
                    "needs 12000000004"),
    "n_head 3": (lambda m: {**m, "model_config": {**m["model_config"], "n_head": 3}}, "not divisible by n_head"),
}
CKPT_ARRAY_MUTATIONS = {
    "params int64": (array_set("param/transformer.wpe.weight", lambda a: a.astype(np.int64)), "int64"),
    "params float16": (array_set("param/transformer.wpe.weight", lambda a: a.astype(np.float16)), "float16"),
    "params bool": (array_set("param/transformer.wpe.weight", lambda a: a > 0), "bool"),
    "params strings": (array_set("param/transformer.wpe.weight", lambda a: a.astype(str)), "<U"),
    "params reshaped": (array_set("param/transformer.wpe.weight", lambda a: a.reshape(-1)), "(128,)"),
    "exp_avg_sq negative": (array_set("optim/exp_avg_sq", lambda a: a - 1.0), "negative values"),
    "exp_avg NaN": (array_set("optim/exp_avg", lambda a: a * np.nan), "NaN or Inf"),
    "a parameter missing": (lambda arrays: arrays.pop("param/transformer.ln_f.bias"), "parameter arrays"),
}


@pytest.mark.parametrize("mutation", list(CKPT_META_MUTATIONS) + list(CKPT_ARRAY_MUTATIONS))
def test_checkpoint_mutations(ckpt_file, mutation):
    assert checkpoint.load_checkpoint(ckpt_file)["meta"]["step"] == 3
    if mutation in CKPT_META_MUTATIONS:
        change, match = CKPT_META_MUTATIONS[mutation]
        rewrite_checkpoint(ckpt_file, change_meta=change)
    else:
        change, match = CKPT_ARRAY_MUTATIONS[mutation]
        rewrite_checkpoint(ckpt_file, change_arrays=change)
    refused(CheckpointError, ckpt_file, checkpoint.load_checkpoint, ckpt_file, match=match)


@pytest.mark.parametrize("damage", ["truncated", "flipped byte", "empty", "not a zip"])
def test_damaged_checkpoint_bytes(ckpt_file, damage):
    raw = ckpt_file.read_bytes()
    if damage == "truncated":
        ckpt_file.write_bytes(raw[:-1])
    elif damage == "flipped byte":
        ckpt_file.write_bytes(raw[: len(raw) // 2] + bytes([raw[len(raw) // 2] ^ 1]) + raw[len(raw) // 2 + 1 :])
    elif damage == "empty":
        ckpt_file.write_bytes(b"")
    else:
        ckpt_file.write_bytes(b"\x93NUMPY" + raw[6:])
    refused(CheckpointError, ckpt_file, checkpoint.load_checkpoint, ckpt_file)


def test_sample_refuses_an_absurd_checkpoint_quickly(ckpt_file):
    import subprocess
    import sys

    rewrite_checkpoint(ckpt_file, change_meta=lambda m: {**m, "model_config": {**m["model_config"], "n_layer": 10**9}})
    root = Path(__file__).resolve().parents[1]
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, str(root / "scripts" / "sample.py"), "--ckpt", str(ckpt_file)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and time.monotonic() - t0 < 20
    assert r.stderr.count("error:") == 1 and "Traceback" not in r.stderr and str(ckpt_file) in r.stderr


# ---- HellaSwag files ------------------------------------------------------------------------


EXAMPLE = {"ctx": "A man sits down.", "endings": ["He stands.", "He eats.", "He sleeps.", "He runs."], "label": 1}


@pytest.mark.parametrize("content,match", [
    (b"", "no HellaSwag examples"),
    (b"\n\n", "no HellaSwag examples"),
    (json.dumps(EXAMPLE).encode() + b"\n" + json.dumps(EXAMPLE).encode()[:20], ":2: not valid JSON"),
    (json.dumps(EXAMPLE).encode() + b"\n" + b'{"ctx": "caf\xe9"}\n', ":2: not UTF-8"),
    (json.dumps({**EXAMPLE, "label": None}).encode() + b"\n", ":1: the example has no label"),
    (json.dumps({**EXAMPLE, "endings": ["a"]}).encode() + b"\n", ":1: field 'endings'"),
    (b"[1, 2]\n", ":1: a HellaSwag example is a JSON object"),
], ids=["empty", "blank", "cut mid-line", "latin-1", "no label", "one ending", "a list"])
def test_hellaswag_mutations(tmp_path, content, match):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_bytes(content)
    refused(HellaSwagError, path, hellaswag.load_examples, path, None, True, match=match)


def test_hellaswag_special_tokens_are_text():
    from nanogpt_np.tokenizer import get_encoding

    enc = get_encoding()
    example = {**EXAMPLE, "ctx": "The end <|endoftext|> of it."}
    rendered = hellaswag.render_example(example, enc)
    assert enc.eot_token not in rendered.tokens[0][rendered.mask[0] == 0].tolist()


def test_an_official_cached_file_cut_at_a_line_end_is_refused(tmp_path):
    cache = tmp_path / "hellaswag"
    cache.mkdir()
    path = cache / "hellaswag_val.jsonl"
    path.write_text((json.dumps(EXAMPLE) + "\n") * 100)
    refused(HellaSwagError, path, hellaswag.data_file, "val", None, cache, match="official val split has 10042")
