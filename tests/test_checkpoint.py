import json
import os

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, checkpoint
from nanogpt_np.checkpoint import CheckpointError
from nanogpt_np.optim import AdamW
from tests.helpers import loader_state

CFG = GPTConfig(block_size=8, vocab_size=61, n_layer=2, n_head=2, n_embd=8)


def trained(seed=0, dtype=np.float32, config=CFG, steps=2):
    model = GPT(config, dtype=dtype, seed=seed)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        idx = rng.integers(0, config.vocab_size, (2, 8))
        model.zero_grad()
        model.forward(idx, idx)
        model.backward()
        opt.step(model.grads)
    return model, opt


def save(path, model, opt, step=5):
    rng = np.random.default_rng(3)
    rng.random(7)
    loaders = [loader_state(0, 40, world_size=2), loader_state(1, 56, world_size=2)]
    checkpoint.save_checkpoint(path, model, opt, step, loaders, rng.bit_generator.state, {"max_lr": 1e-2})
    return rng


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_round_trip_is_exact(tmp_path, dtype):
    model, opt = trained(dtype=dtype)
    path = tmp_path / "model_00005.npz"
    rng = save(path, model, opt)
    ckpt = checkpoint.load_checkpoint(path)
    fresh, fresh_opt = GPT(CFG, dtype=dtype, seed=9), None
    fresh_opt = AdamW(fresh.parameters(), lr=1e-2, weight_decay=0.1)
    meta = checkpoint.restore(ckpt, fresh, fresh_opt, path)
    np.testing.assert_array_equal(fresh.flat_params, model.flat_params)
    np.testing.assert_array_equal(fresh_opt.exp_avg, opt.exp_avg)
    np.testing.assert_array_equal(fresh_opt.exp_avg_sq, opt.exp_avg_sq)
    assert fresh_opt.step_count == opt.step_count == 2
    assert meta["step"] == 5 and meta["model_config"] == CFG.to_dict() and meta["dtype"] == np.dtype(dtype).name
    assert [s["base"] for s in meta["loader_states"]] == [40, 56]
    restored = np.random.default_rng()
    restored.bit_generator.state = meta["rng_state"]
    assert restored.random() == rng.random()
    assert meta["train_args"] == {"max_lr": 1e-2}


def test_format_is_plain_npz_without_pickle(tmp_path):
    model, opt = trained()
    path = tmp_path / "c.npz"
    save(path, model, opt)
    with np.load(path, allow_pickle=False) as npz:  # loads with pickle off
        names = set(npz.files)
        assert names >= {"meta", "optim/exp_avg", "optim/exp_avg_sq", "param/transformer.wte.weight"}
        assert "param/lm_head.weight" not in names  # tied, stored once
        assert json.loads(str(npz["meta"]))["format"] == checkpoint.FORMAT
        assert all(npz[n].dtype != object for n in names)


def test_checkpoint_from_another_config_is_refused(tmp_path):
    model, opt = trained()
    path = tmp_path / "c.npz"
    save(path, model, opt)
    other = GPT(GPTConfig(block_size=8, vocab_size=61, n_layer=3, n_head=2, n_embd=8))
    with pytest.raises(CheckpointError, match="another model config .*n_layer: checkpoint 2, this run 3"):
        checkpoint.restore(checkpoint.load_checkpoint(path), other, AdamW(other.parameters()), path)
    as64 = GPT(CFG, dtype=np.float64)
    with pytest.raises(CheckpointError, match="dtype: checkpoint 'float32', this run 'float64'"):
        checkpoint.restore(checkpoint.load_checkpoint(path), as64, AdamW(as64.parameters()), path)


def test_corrupt_or_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        checkpoint.load_checkpoint(tmp_path / "none.npz")
    model, opt = trained()
    path = tmp_path / "c.npz"
    save(path, model, opt)
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(CheckpointError, match="unreadable or incomplete"):
        checkpoint.load_checkpoint(path)
    np.savez(tmp_path / "other.npz", meta=np.array(json.dumps({"format": "x"})), **{"optim/exp_avg": np.zeros(1),
             "optim/exp_avg_sq": np.zeros(1)})
    with pytest.raises(CheckpointError, match="not a nanogpt_np-checkpoint"):
        checkpoint.load_checkpoint(tmp_path / "other.npz")


def test_save_is_atomic(tmp_path, monkeypatch):
    model, opt = trained()
    path = tmp_path / "model_00001.npz"
    save(path, model, opt, step=1)
    before = path.read_bytes()

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    model.flat_params += 1
    with pytest.raises(KeyboardInterrupt):
        save(path, model, opt, step=1)
    assert path.read_bytes() == before  # the old checkpoint is untouched
    assert os.listdir(tmp_path) == ["model_00001.npz"]  # and no temporary file is left


def test_latest_checkpoint(tmp_path):
    assert checkpoint.latest_checkpoint(tmp_path / "missing") is None
    assert checkpoint.latest_checkpoint(tmp_path) is None
    for name in ["model_00100.npz", "model_02000.npz", "model_00300.npz", "model_99999.npz.tmp12", "log.txt"]:
        (tmp_path / name).write_bytes(b"")
    assert checkpoint.latest_checkpoint(tmp_path) == str(tmp_path / "model_02000.npz")
    assert checkpoint.checkpoint_path("d", 42) == os.path.join("d", "model_00042.npz")
