"""GPT-2 weights in and out: Hugging Face checkpoints (checked against transformers'
own GPT2LMHeadModel) and llm.c model files."""
import json
import os
import shutil

import numpy as np
import pytest

# test-only, both in setup.cfg's [test] extra: without them this file skips
torch = pytest.importorskip("torch", reason="PyTorch is in the test extra: pip install -e '.[test]'")
transformers = pytest.importorskip("transformers", reason="transformers is in the test extra: pip install -e '.[test]'")

from nanogpt_np import GPT, GPTConfig, pretrained
from nanogpt_np import safetensors_io as st
from nanogpt_np.model import WTE, parameter_shapes

HF_CONFIG = dict(n_positions=32, n_embd=16, n_layer=2, n_head=2, vocab_size=99, bos_token_id=98, eos_token_id=98)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def hf_logits(hf_model, idx):
    with torch.no_grad():
        return hf_model(torch.from_numpy(idx)).logits.double().numpy()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny random GPT-2 written by transformers itself (safetensors, "transformer." names)."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**HF_CONFIG)).eval()
    with torch.no_grad():  # random LayerNorm and bias values too, so every tensor matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "ln_" in name and name.endswith("weight") else 0.0))
    directory = tmp_path_factory.mktemp("hf") / "tiny-gpt2"
    model.save_pretrained(directory, safe_serialization=True)
    return directory


@pytest.fixture(scope="module")
def hf_model(hf_dir):
    return transformers.GPT2LMHeadModel.from_pretrained(hf_dir).eval()


@pytest.fixture
def idx():
    return np.random.default_rng(0).integers(0, 99, (2, 19))


def copy_dir(src, dst):
    shutil.copytree(src, dst)
    return dst


# ---- Hugging Face in ----------------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-5)])
def test_load_matches_transformers_logits(hf_dir, hf_model, idx, dtype, tol):
    model = GPT.from_pretrained(hf_dir, dtype=dtype)
    assert model.config == GPTConfig(block_size=32, vocab_size=99, n_layer=2, n_head=2, n_embd=16)
    assert model.dtype == dtype
    assert rel_err(model.forward(idx)[0], hf_logits(hf_model, idx)) < tol


def test_load_in_float64_matches_transformers_in_float64(hf_dir, hf_model, idx):
    model = GPT.from_pretrained(hf_dir, dtype=np.float64)
    hf64 = transformers.GPT2LMHeadModel.from_pretrained(hf_dir).double().eval()
    assert rel_err(model.forward(idx)[0], hf_logits(hf64, idx)) < 1e-12


def test_models_built_for_loading_skip_the_random_init():
    model = GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4), init_weights=False)
    assert not model.flat_params.any()


def test_conv1d_weights_are_transposed(hf_dir, hf_model):
    model = GPT.from_pretrained(hf_dir)
    sd = hf_model.state_dict()
    for suffix in pretrained.CONV1D:
        name = f"transformer.h.1.{suffix}"
        np.testing.assert_array_equal(model.params[name], sd[name].numpy().T)
    np.testing.assert_array_equal(model.params[WTE], sd["transformer.wte.weight"].numpy())
    by_file = GPT.from_pretrained(hf_dir / "model.safetensors")  # the file: its directory's config.json
    np.testing.assert_array_equal(by_file.flat_params, model.flat_params)


def rewrite(directory, edit):
    """Apply edit(tensors) -> tensors to directory's model.safetensors."""
    path = directory / "model.safetensors"
    st.save(path, edit(st.load(path)), metadata={"format": "pt"})


def test_old_style_names_mask_buffers_and_lm_head_load(hf_dir, hf_model, idx, tmp_path):
    """The hub's original files: no "transformer." prefix, attn.bias/masked_bias buffers, maybe lm_head."""
    d = copy_dir(hf_dir, tmp_path / "old")

    def old_style(t):
        out = {k.removeprefix("transformer."): v for k, v in t.items()}
        for i in range(2):
            out[f"h.{i}.attn.bias"] = np.tril(np.ones((1, 1, 32, 32), dtype=np.float32))
            out[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
        out["lm_head.weight"] = out["wte.weight"].copy()
        return out

    rewrite(d, old_style)
    assert rel_err(GPT.from_pretrained(d).forward(idx)[0], hf_logits(hf_model, idx)) < 1e-5


@pytest.mark.parametrize("half", ["F16", "BF16"])
def test_half_precision_checkpoints_load(hf_dir, hf_model, idx, tmp_path, half):
    d = copy_dir(hf_dir, tmp_path / half)
    path = d / "model.safetensors"
    tensors = {k: torch.from_numpy(v) for k, v in st.load(path).items()}
    from safetensors.torch import save_file

    target = torch.float16 if half == "F16" else torch.bfloat16
    save_file({k: v.to(target) for k, v in tensors.items()}, str(path), metadata={"format": "pt"})
    model = GPT.from_pretrained(d)
    for name, value in tensors.items():
        expected = value.to(target).float().numpy()
        ours = model.params[name]
        np.testing.assert_array_equal(ours, expected.T if name.endswith(pretrained.CONV1D) else expected)


def test_sharded_checkpoint_loads(hf_dir, hf_model, idx, tmp_path):
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(hf_dir / "config.json", d)
    tensors = st.load(hf_dir / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        st.save(d / shard, {n: tensors[n] for n in shard_names}, metadata={"format": "pt"})
        weight_map.update({n: shard for n in shard_names})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert rel_err(GPT.from_pretrained(d).forward(idx)[0], hf_logits(hf_model, idx)) < 1e-5


def test_vocab_can_be_padded_on_load(hf_dir, hf_model, idx):
    model = GPT.from_pretrained(hf_dir, vocab_size=128)
    assert model.config.vocab_size == 128
    assert not model.params[WTE][99:].any()
    assert rel_err(model.forward(idx)[0][..., :99], hf_logits(hf_model, idx)) < 1e-5


# ---- clear errors -------------------------------------------------------------------


def test_missing_unexpected_and_misshapen_tensors_are_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "broken")

    def break_it(t):
        del t["transformer.h.1.mlp.c_fc.bias"]
        t["transformer.h.0.attn.rotary"] = np.zeros(3, np.float32)
        return t

    rewrite(d, break_it)
    with pytest.raises(ValueError) as e:
        GPT.from_pretrained(d)
    msg = str(e.value)
    assert "model.safetensors" in msg
    assert "missing tensors: transformer.h.1.mlp.c_fc.bias" in msg
    assert "unexpected tensors: h.0.attn.rotary" in msg

    d2 = copy_dir(hf_dir, tmp_path / "shape")
    rewrite(d2, lambda t: {**t, "transformer.wpe.weight": np.zeros((31, 16), np.float32)})
    with pytest.raises(ValueError, match=r"transformer.wpe.weight has shape \(31, 16\) but config.json implies \(32, 16\)"):
        GPT.from_pretrained(d2)


def test_missing_files_are_named(hf_dir, tmp_path):
    d = copy_dir(hf_dir, tmp_path / "no_weights")
    os.remove(d / "model.safetensors")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(FileNotFoundError, match=r"no model.safetensors\. It holds pytorch_model.bin, a pickle"):
        GPT.from_pretrained(d)
    d2 = copy_dir(hf_dir, tmp_path / "no_config")
    os.remove(d2 / "config.json")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        GPT.from_pretrained(d2)
    with pytest.raises(FileNotFoundError, match="no such directory or file"):
        GPT.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize(
    "change,match",
    [
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
        ({"n_inner": 40}, "n_inner=40"),
        ({"model_type": "llama"}, "only GPT-2"),
    ],
)
def test_unsupported_configs_are_refused(hf_dir, tmp_path, change, match):
    d = copy_dir(hf_dir, tmp_path / "variant")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(change)
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=match):
        GPT.from_pretrained(d)


# ---- the Hugging Face cache and downloads ----------------------------------------


def fake_cache(root, repo, source_dir):
    """huggingface_hub's layout: blobs/, snapshots/<commit>/ (links to blobs), refs/main."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef"
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo_dir / "blobs").mkdir()
    for name in ("config.json", "model.safetensors"):
        blob = repo_dir / "blobs" / ("blob-" + name)
        shutil.copy(source_dir / name, blob)
        os.symlink(blob, snap / name)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return snap


def clear_hf_env(monkeypatch):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "NANOGPT_NP_CACHE"):
        monkeypatch.delenv(var, raising=False)


def test_names_resolve_through_the_hf_cache(hf_dir, hf_model, idx, tmp_path, monkeypatch):
    clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    snap = fake_cache(tmp_path / "hub", "gpt2", hf_dir)
    assert pretrained.resolve_hf("gpt2") == snap
    assert rel_err(GPT.from_pretrained("gpt2").forward(idx)[0], hf_logits(hf_model, idx)) < 1e-5
    # HF_HOME/hub, and the repo's newer home under openai-community/
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    snap = fake_cache(tmp_path / "home" / "hub", "openai-community/gpt2-medium", hf_dir)
    assert pretrained.resolve_hf("gpt2-medium") == snap
    # the default: ~/.cache/huggingface/hub (XDG_CACHE_HOME moves ~/.cache)
    monkeypatch.delenv("HF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    snap = fake_cache(tmp_path / "xdg" / "huggingface" / "hub", "gpt2-xl", hf_dir)
    assert pretrained.resolve_hf("gpt2-xl") == snap


def test_a_name_not_found_says_how_to_get_it(tmp_path, monkeypatch):
    clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("NANOGPT_NP_CACHE", str(tmp_path / "own"))
    with pytest.raises(FileNotFoundError) as e:
        GPT.from_pretrained("gpt2-large")
    msg = str(e.value)
    assert str(tmp_path / "hub") in msg and "huggingface-cli download gpt2-large" in msg and "download=True" in msg
    with pytest.raises(FileNotFoundError, match="huggingface-cli download someone/gpt2-1.5"):
        GPT.from_pretrained("someone/gpt2-1.5")  # a repo id, dots and all
    with pytest.raises(FileNotFoundError, match="gpt2_124M.bin: no such directory or file"):
        GPT.from_pretrained("gpt2_124M.bin")


def test_download_fetches_into_our_cache(hf_dir, hf_model, idx, tmp_path, monkeypatch):
    """The real download code, pointed at a file:// mirror of huggingface.co's URL layout."""
    clear_hf_env(monkeypatch)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    mirror = tmp_path / "mirror"
    (mirror / "gpt2" / "resolve" / "main").mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        shutil.copy(hf_dir / name, mirror / "gpt2" / "resolve" / "main" / name)
    own = tmp_path / "own"
    model = GPT.from_pretrained("gpt2", download=True, cache_dir=own, base_url=mirror.as_uri())
    assert rel_err(model.forward(idx)[0], hf_logits(hf_model, idx)) < 1e-5
    assert sorted(p.name for p in (own / "gpt2").iterdir()) == ["config.json", "model.safetensors"]
    shutil.rmtree(mirror)  # found in the cache now, no second download
    GPT.from_pretrained("gpt2", cache_dir=own)
    with pytest.raises(RuntimeError, match="could not download .*gpt2-medium"):
        GPT.from_pretrained("gpt2-medium", download=True, cache_dir=own, base_url=mirror.as_uri())
    assert not (own / "gpt2-medium" / "config.json").exists()


# ---- Hugging Face out ---------------------------------------------------------------


def test_export_loads_in_transformers(idx, tmp_path):
    cfg = GPTConfig(block_size=32, vocab_size=99, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg, seed=4)
    model.flat_params += np.random.default_rng(0).standard_normal(model.flat_params.shape).astype(np.float32) * 0.05
    model.save_pretrained(tmp_path / "out")
    hf, info = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert rel_err(hf_logits(hf.eval(), idx), model.forward(idx)[0]) < 1e-5
    assert rel_err(GPT.from_pretrained(tmp_path / "out").flat_params, model.flat_params) == 0


def test_padded_vocab_is_cut_on_export(tmp_path):
    cfg = GPTConfig(block_size=16, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, seed=1)
    model.save_pretrained(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["vocab_size"] == 50257 and config["n_positions"] == 16
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    idx = np.array([[50256, 0, 17, 50000, 3]])
    assert rel_err(hf_logits(hf, idx), model.forward(idx)[0][..., :50257]) < 1e-5
    with pytest.raises(ValueError, match="vocab_size=60000 must be in"):
        model.save_pretrained(tmp_path / "bad", vocab_size=60000)


# ---- llm.c --------------------------------------------------------------------------

LLMC_ORDER_IN_THE_TEST = [  # llm.c's ParameterTensors, as train_gpt2.c lays them out
    ("wte", None), ("wpe.weight", None), ("ln_1.weight", 1), ("ln_1.bias", 1), ("attn.c_attn.weight", 1),
    ("attn.c_attn.bias", 1), ("attn.c_proj.weight", 1), ("attn.c_proj.bias", 1), ("ln_2.weight", 1),
    ("ln_2.bias", 1), ("mlp.c_fc.weight", 1), ("mlp.c_fc.bias", 1), ("mlp.c_proj.weight", 1),
    ("mlp.c_proj.bias", 1), ("ln_f.weight", None), ("ln_f.bias", None),
]


def expected_llmc_payload(model, padded):
    parts = []
    for name, per_layer in LLMC_ORDER_IN_THE_TEST:
        if per_layer:
            parts += [model.params[f"transformer.h.{i}.{name}"] for i in range(model.config.n_layer)]
        elif name == "wte":
            wte = np.zeros((padded, model.config.n_embd), np.float32)
            wte[: model.config.vocab_size] = model.params[WTE]
            parts.append(wte)
        else:
            parts.append(model.params[f"transformer.{name}"])
    return b"".join(np.asarray(p, "<f4").tobytes() for p in parts)


@pytest.mark.parametrize("vocab,header_vocab,padded", [(99, 99, 128), (50304, 50257, 50304), (50257, 50257, 50304)])
def test_llmc_file_layout_and_round_trip(tmp_path, vocab, header_vocab, padded):
    cfg = GPTConfig(block_size=16, vocab_size=vocab, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, seed=2)
    path = tmp_path / "model.bin"
    pretrained.save_llmc(model, path)
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], "<i4")
    assert list(header[:8]) == [20240326, 3, 16, header_vocab, 2, 2, 8, padded] and not header[8:].any()
    assert raw[1024:] == expected_llmc_payload(model, padded)

    back = GPT.from_pretrained(path)  # a file: llm.c format
    assert back.config.vocab_size == padded
    np.testing.assert_array_equal(back.params[WTE][:vocab], model.params[WTE])
    for name, _ in parameter_shapes(cfg)[1:]:
        np.testing.assert_array_equal(back.params[name], model.params[name])
    cut = pretrained.load_llmc(path, keep_padding=False, dtype=np.float64)
    assert cut.config.vocab_size == header_vocab and cut.dtype == np.float64


def test_llmc_bfloat16_round_trip(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=1, n_embd=8), seed=3)
    path = tmp_path / "bf16.bin"
    pretrained.save_llmc(model, path, dtype="bfloat16")
    assert np.frombuffer(path.read_bytes()[:8], "<i4").tolist() == [20240326, 5]
    back = pretrained.load_llmc(path, keep_padding=False)
    for name, p in model.parameters().items():
        expected = torch.from_numpy(np.asarray(p)).bfloat16().float().numpy()
        np.testing.assert_array_equal(back.params[name], expected)


def test_llmc_bad_files_are_named(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=1, n_embd=8))
    good = tmp_path / "good.bin"
    pretrained.save_llmc(model, good)
    raw = bytearray(good.read_bytes())

    def variant(name, data):
        p = tmp_path / name
        p.write_bytes(bytes(data))
        return p

    shard = np.zeros(256, "<i4")
    shard[:3] = [20240520, 1, 10]
    with pytest.raises(ValueError, match="magic number 20240520.*a token data shard"):
        pretrained.load_llmc(variant("shard.bin", shard.tobytes() + b"\0" * 20))
    old = raw.copy()
    old[4:8] = np.array([1], "<i4").tobytes()
    with pytest.raises(ValueError, match="version 1; this reader takes version 3"):
        pretrained.load_llmc(variant("v1.bin", old))
    with pytest.raises(ValueError, match="truncated"):
        pretrained.load_llmc(variant("short.bin", raw[:-4]))
    with pytest.raises(ValueError, match="too short"):
        pretrained.load_llmc(variant("tiny.bin", raw[:12]))
    with pytest.raises(ValueError, match="llm.c files hold"):
        pretrained.save_llmc(model, tmp_path / "x.bin", dtype="float16")


def test_llmc_keep_padding_is_a_padded_softmax_and_without_it_llmcs_own(tmp_path):
    """load_llmc's docstring: keep_padding=True is a padded_vocab_size-way softmax (the
    padding columns count), keep_padding=False is llm.c's softmax over vocab_size."""
    cfg = GPTConfig(block_size=16, vocab_size=99, n_layer=1, n_head=2, n_embd=8)
    path = tmp_path / "model.bin"
    pretrained.save_llmc(GPT(cfg, seed=4), path)  # header vocab 99, padded to 128
    padded = pretrained.load_llmc(path, dtype=np.float64)
    cut = pretrained.load_llmc(path, dtype=np.float64, keep_padding=False)
    assert (padded.config.vocab_size, cut.config.vocab_size) == (128, 99)
    idx = np.random.default_rng(0).integers(0, 99, (2, 16))
    targets = np.roll(idx, -1, axis=1)
    logits, padded_loss = padded.forward(idx, targets)
    logits = np.array(logits)  # (B, T, 128)
    picked = np.take_along_axis(logits, targets[..., None], -1)[..., 0]

    def mean_nll(columns):
        z = logits[..., :columns]
        lse = np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1)) + z.max(-1)
        return float((lse - picked).mean())

    _, cut_loss = cut.forward(idx, targets)
    np.testing.assert_allclose(padded_loss, mean_nll(128), rtol=1e-12)
    np.testing.assert_allclose(cut_loss, mean_nll(99), rtol=1e-12)
    assert padded_loss > cut_loss  # the padding columns add to the normaliser
