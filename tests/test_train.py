import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig
from nanogpt_np.checkpoint import CheckpointError, load_checkpoint
from nanogpt_np.optim import AdamW
from nanogpt_np.distributed import Single
from nanogpt_np.train import (PRESETS, ConfigError, TrainConfig, Trainer, build_parser,
                              flops_per_token, grad_accum_steps, parse_args, train_step, truncate_log)
from tests.helpers import write_random_shards

ROOT = Path(__file__).resolve().parents[1]
QUIET = dict(log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Random-token shards: three train (rollovers every few steps; documents, for
    the shuffle), one val in llm.c's .bin format."""
    return str(write_random_shards(tmp_path_factory.mktemp("shards"), 3, 700, 37, "r_val_000000.bin", 500))


def small(data_dir, log_dir, **overrides):
    cfg = dict(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50304, batch_size=4,
               total_batch_size=128, max_lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=8,
               val_every=3, val_steps=2, sample_every=3, ckpt_every=4, num_samples=2, sample_tokens=3,
               data_dir=data_dir, log_dir=str(log_dir), peak_tflops=1.0, hellaswag_every=0)
    cfg.update(overrides)
    return TrainConfig(**cfg)


# ---- flags ----------------------------------------------------------------------------------


def test_defaults_are_build_nanogpts_124m_recipe():
    cfg = parse_args([])
    expected = dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50304, batch_size=64,
                    total_batch_size=524288, max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073,
                    weight_decay=0.1, grad_clip=1.0, data_dir=None, backend="numpy", dtype=None,
                    prompt="Hello, I'm a language model,", resume=False)
    assert {k: getattr(cfg, k) for k in expected} == expected
    assert grad_accum_steps(cfg.total_batch_size, cfg.batch_size, cfg.block_size) == 8


def test_every_flag_of_the_issue_parses():
    argv = ["--n-layer", "3", "--n-head", "2", "--n-embd", "32", "--block-size", "64", "--vocab-size", "50257",
            "--batch-size", "2", "--total-batch-size", "256", "--max-lr", "1e-3", "--min-lr", "1e-4",
            "--warmup-steps", "5", "--max-steps", "10", "--weight-decay", "0.0", "--grad-clip", "0.5",
            "--seed", "7", "--data-dir", "d", "--log-dir", "l", "--val-every", "0", "--val-steps", "3",
            "--sample-every", "0", "--ckpt-every", "0", "--resume", "--backend", "cupy", "--dtype", "float64",
            "--prompt", "x", "--preset", "tiny"]
    cfg = parse_args(argv)
    assert (cfg.n_layer, cfg.n_embd, cfg.block_size, cfg.total_batch_size, cfg.max_lr) == (3, 32, 64, 256, 1e-3)
    assert (cfg.val_every, cfg.sample_every, cfg.ckpt_every, cfg.resume) == (0, 0, 0, True)
    assert (cfg.backend, cfg.dtype, cfg.seed, cfg.data_dir, cfg.log_dir) == ("cupy", "float64", 7, "d", "l")


def test_preset_sets_defaults_and_flags_win():
    tiny = parse_args(["--preset", "tiny"])
    for key, value in PRESETS["tiny"].items():
        assert getattr(tiny, key) == value
    assert parse_args(["--preset", "tiny", "--max-steps", "3"]).max_steps == 3
    assert parse_args(["--max-steps", "3", "--preset", "tiny"]).max_steps == 3
    with pytest.raises(SystemExit):
        parse_args(["--preset", "huge"])


def test_grad_accum_must_divide():
    assert grad_accum_steps(524288, 16, 1024, world_size=8) == 4
    with pytest.raises(ConfigError, match="not divisible by B\\*T\\*ranks = 64\\*1024\\*3"):
        grad_accum_steps(524288, 64, 1024, world_size=3)


def test_flops_per_token_is_6n_plus_attention():
    cfg = GPTConfig(block_size=1024, vocab_size=50304, n_layer=12, n_head=12, n_embd=768)
    total = 124_475_904  # GPT-2 124M with the padded vocab, wte counted once
    non_wpe = total - 1024 * 768
    assert flops_per_token(cfg) == 6 * non_wpe + 6 * 12 * 768 * 1024


# ---- the step ---------------------------------------------------------------------------------


class ListLoader:
    def __init__(self, batches):
        self.batches = list(batches)

    def next_batch(self):
        return self.batches.pop(0)


def test_accumulation_gives_the_whole_batch_gradient():
    """Two micro-batches of 2 rows equal one batch of 4 rows (float64): the
    accumulated gradient is divided by the number of micro-steps."""
    cfg = GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=8)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 50, (4, 8)), rng.integers(0, 50, (4, 8))
    results = []
    for batches in ([(x, y)], [(x[:2], y[:2]), (x[2:], y[2:])]):
        model = GPT(cfg, dtype=np.float64, seed=1)
        opt = AdamW(model.parameters(), lr=1e-2)
        loss, norm = train_step(model, opt, ListLoader(batches), len(batches), 1e-2, 1.0, Single())
        results.append((loss, norm, model.flat_params.copy()))
    (l1, n1, p1), (l2, n2, p2) = results
    assert l1 == pytest.approx(l2, rel=1e-13) and n1 == pytest.approx(n2, rel=1e-12)
    np.testing.assert_allclose(p1, p2, rtol=0, atol=1e-13)


# ---- whole runs --------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [False, True])
def test_resume_is_bit_identical(data_dir, tmp_path, shuffle):
    """8 steps straight == 4 steps, stop, resume, 4 more: losses, val losses, samples,
    weights, AdamW moments and log.txt, bit for bit (loader rollovers included)."""
    straight = Trainer(small(data_dir, tmp_path / "a", shuffle=shuffle, ckpt_every=0), **QUIET)
    full = straight.run()
    first = Trainer(small(data_dir, tmp_path / "b", shuffle=shuffle), **QUIET)
    first.run(stop_at=4)  # as if killed during step 4
    assert os.path.exists(tmp_path / "b" / "model_00004.npz")
    resumed = Trainer(small(data_dir, tmp_path / "b", shuffle=shuffle, resume=True), **QUIET)
    assert resumed.train_loader.state() != straight.train_loader.state()
    second = resumed.run()
    assert list(second["train"]) == [4, 5, 6, 7]
    for kind in ("train", "val", "samples"):
        assert {k: v for k, v in full[kind].items() if k >= 4} == second[kind], kind
    np.testing.assert_array_equal(resumed.model.flat_params, straight.model.flat_params)
    np.testing.assert_array_equal(resumed.optimizer.exp_avg_sq, straight.optimizer.exp_avg_sq)
    assert resumed.optimizer.step_count == 8
    assert resumed.train_loader.state() == straight.train_loader.state()
    assert (tmp_path / "a" / "log.txt").read_text() == (tmp_path / "b" / "log.txt").read_text()


def test_resume_refuses_another_config(data_dir, tmp_path):
    Trainer(small(data_dir, tmp_path, max_steps=2, ckpt_every=2), **QUIET).run()
    with pytest.raises(CheckpointError, match="n_embd: checkpoint 16, this run 32"):
        Trainer(small(data_dir, tmp_path, n_embd=32, resume=True), **QUIET).run()


def test_resume_without_checkpoint_starts_fresh(data_dir, tmp_path):
    logs = []
    history = Trainer(small(data_dir, tmp_path, max_steps=1, resume=True), log=logs.append).run()
    assert list(history["train"]) == [0] and any("no checkpoint" in line for line in logs)


def test_float64_and_switches_off(data_dir, tmp_path):
    cfg = small(data_dir, tmp_path, dtype="float64", max_steps=3, val_every=0, sample_every=0, ckpt_every=0)
    trainer = Trainer(cfg, **QUIET)
    history = trainer.run()
    assert trainer.model.flat_params.dtype == np.float64 and trainer.val_loader is None
    assert history["val"] == {} and history["samples"] == {} and len(history["train"]) == 3
    assert sorted(os.listdir(tmp_path)) == ["log.txt", "run.json"]
    assert (tmp_path / "log.txt").read_text().splitlines() == [f"{s} train {history['train'][s]:.6f}"
                                                               for s in range(3)]


def test_bad_flags_are_explained(data_dir, tmp_path):
    with pytest.raises(ConfigError, match="not divisible"):
        Trainer(small(data_dir, tmp_path, total_batch_size=100), **QUIET)
    with pytest.raises(ConfigError, match="smaller than GPT-2's 50257"):
        Trainer(small(data_dir, tmp_path, vocab_size=1000), **QUIET)
    with pytest.raises(ConfigError, match="[Cc]u[Pp]y"):
        Trainer(small(data_dir, tmp_path, backend="cupy"), **QUIET)
    with pytest.raises(ConfigError, match="bf16 .* runs on the GPU only: use --backend cupy"):
        Trainer(small(data_dir, tmp_path, dtype="bf16"), **QUIET)


def test_dtype_defaults_to_bf16_on_the_gpu_and_float32_on_the_cpu():
    assert parse_args([]).dtype is None and parse_args(["--dtype", "bf16"]).dtype == "bf16"
    from nanogpt_np.backend import default_precision

    assert default_precision("cupy") == "bf16" and default_precision("numpy") == "float32"


def test_truncate_log(tmp_path):
    path = tmp_path / "log.txt"
    path.write_text("0 val 10.1\n0 train 10.0\n1 train 9.0\n2 val 8.5\n2 train 8.0\n")
    truncate_log(str(path), 2)
    assert path.read_text() == "0 val 10.1\n0 train 10.0\n1 train 9.0\n"


# ---- scripts/train.py end to end --------------------------------------------------------------

TINY = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
        "--total-batch-size", "64", "--val-steps", "2", "--num-samples", "1", "--sample-tokens", "4",
        "--peak-tflops", "1", "--hellaswag-every", "0"]


def run_train(args, tmp_path, timeout=300):
    env = dict(os.environ, NANOGPT_NP_CACHE=str(tmp_path / "cache"), NANOGPT_NP_STDLIB_CHARS="60000")
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "train.py"), *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=tmp_path)


def test_train_script_on_builtin_corpus(tmp_path):
    r = run_train(TINY + ["--max-steps", "3", "--val-every", "2", "--sample-every", "2", "--ckpt-every", "0",
                          "--log-dir", "log"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "building the built-in corpus" in r.stdout
    step_lines = [line for line in r.stdout.splitlines() if line.startswith("step ") and "/3 |" in line]
    assert len(step_lines) == 3
    assert re.search(r"loss \d+\.\d{6} \| lr .* \| norm .* \| .* ms \| .* tok/s \| MFU .*% \| .* ETA", step_lines[0])
    assert "sample 0: \"Hello, I'm a language model," in r.stdout
    assert re.search(r"final val loss \d+\.\d{4} \(step 2\)", r.stdout)
    log = (tmp_path / "log" / "log.txt").read_text().splitlines()
    assert [line.split()[:2] for line in log] == [["0", "val"], ["0", "train"], ["1", "train"],
                                                  ["2", "val"], ["2", "train"]]
    assert all(re.fullmatch(r"\d+ (train \d+\.\d{6}|val \d+\.\d{4})", line) for line in log)


def test_train_script_on_prepared_text_and_resume(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("It was the best of times, it was the worst of times.\n" * 300)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_text.py"), str(text), "--out",
                        str(tmp_path / "shards")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    args = TINY + ["--data-dir", str(tmp_path / "shards"), "--max-steps", "4", "--val-every", "2",
                   "--sample-every", "0", "--ckpt-every", "2", "--log-dir", "log"]
    r = run_train(args, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "building the built-in corpus" not in r.stdout
    final = load_checkpoint(tmp_path / "log" / "model_00004.npz")
    log_before = (tmp_path / "log" / "log.txt").read_text()
    # as if the run had died after its step-2 checkpoint
    os.remove(tmp_path / "log" / "model_00004.npz")
    with open(tmp_path / "log" / "log.txt", "a") as f:
        f.write("2 val 99.0000\n")  # a line of the lost work, to be rewritten
    r = run_train(args + ["--resume"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "resumed from" in r.stdout and "model_00002.npz at step 2" in r.stdout
    again = load_checkpoint(tmp_path / "log" / "model_00004.npz")
    for name, value in final["params"].items():
        np.testing.assert_array_equal(again["params"][name], value)
    np.testing.assert_array_equal(again["exp_avg"], final["exp_avg"])
    assert (tmp_path / "log" / "log.txt").read_text() == log_before


def test_train_script_reports_errors_cleanly(tmp_path):
    r = run_train(TINY + ["--data-dir", str(tmp_path / "nowhere"), "--max-steps", "1"], tmp_path)
    assert r.returncode == 1 and r.stderr.startswith("error: data directory") and "Traceback" not in r.stderr
    r = run_train(TINY + ["--backend", "cupy"], tmp_path)
    assert r.returncode == 1 and "cupy" in r.stderr.lower() and "Traceback" not in r.stderr


def test_dataclass_and_parser_agree():
    flags = {a.dest for a in build_parser()._actions}
    assert {f.name for f in dataclasses.fields(TrainConfig)} <= flags


def test_mfu_peak_is_remeasured_when_a_step_beats_it(data_dir, tmp_path, monkeypatch):
    import nanogpt_np.training.progress as progress

    peaks = iter([1.0, 1e18])  # start-up on a "busy" machine, then a quiet one
    monkeypatch.setattr(progress, "measure_peak_flops", lambda xp, dtype: next(peaks))
    logs = []
    cfg = small(data_dir, tmp_path, peak_tflops=None, max_steps=2, val_every=0, sample_every=0, ckpt_every=0)
    Trainer(cfg, log=logs.append).run()
    assert any("re-measured" in line for line in logs)
    mfus = [float(m) for line in logs for m in re.findall(r"MFU ([\d.]+)%", line)]
    assert len(mfus) == 2 and all(m < 100 for m in mfus)


# ---- HellaSwag during training -------------------------------------------------------------


def test_hellaswag_every_writes_hella_lines(data_dir, tmp_path):
    from tests.test_hellaswag import EXAMPLES, write_jsonl

    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    cfg = small(data_dir, tmp_path / "log", max_steps=3, val_every=0, sample_every=0, ckpt_every=0,
                hellaswag_every=2, hellaswag_path=str(path), block_size=32)
    history = Trainer(cfg, **QUIET).run()
    assert sorted(history["hella"]) == [0, 2]  # every 2 steps and at the last one
    lines = (tmp_path / "log" / "log.txt").read_text().splitlines()
    hella = [line for line in lines if " hella " in line]
    assert [line.split()[0] for line in hella] == ["0", "2"]
    for line in hella:
        assert re.fullmatch(r"\d+ hella \d\.\d{4}", line)
        assert round(float(line.split()[2]) * 3, 3) in (0, 1, 2, 3)  # 3 examples
    with pytest.raises(ConfigError, match="run to 2[0-9] tokens, more than --block-size 16"):
        Trainer(small(data_dir, tmp_path / "log2", hellaswag_every=2, hellaswag_path=str(path)), **QUIET)


def test_missing_hellaswag_file_is_a_config_error(data_dir, tmp_path):
    cfg = small(data_dir, tmp_path, hellaswag_every=5, hellaswag_path=str(tmp_path / "nope.jsonl"))
    with pytest.raises(ConfigError, match="--hellaswag-path FILE, or --hellaswag-every 0"):
        Trainer(cfg, **QUIET)
