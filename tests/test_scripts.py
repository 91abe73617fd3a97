"""The command-line front ends, run as a user runs them (tiny local models, no network)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, checkpoint, pretrained
from nanogpt_np.optim import AdamW
from tests.test_hellaswag import EXAMPLES, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, ok=True):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):  # never as if under mpiexec
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / script), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert (proc.returncode == 0) == ok, proc.stdout + proc.stderr
    return proc


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny GPT-2-vocab model as a Hugging Face directory and as a padded llm.c file."""
    d = tmp_path_factory.mktemp("models")
    # seed 4 gets HellaSwag acc 1/3 on EXAMPLES * k: a count lost between ranks would show
    model = GPT(GPTConfig(block_size=32, vocab_size=50304, n_layer=1, n_head=2, n_embd=8), seed=4)
    model.save_pretrained(d / "hf")
    pretrained.save_llmc(model, d / "tiny.bin")
    optimizer = AdamW(model.parameters())
    from tests.helpers import loader_state

    checkpoint.save_checkpoint(d / "model_00007.npz", model, optimizer, 7, [loader_state()],
                               rng_state=np.random.default_rng(0).bit_generator.state)
    return d


def samples(stdout):
    return [line for line in stdout.splitlines() if line.startswith("sample ")]


def test_sample_with_and_without_the_cache(models):
    args = ["--prompt", "Hello, I'm a language model,", "--num-samples", 2, "--max-new-tokens", 12, "--seed", 7]
    cached = samples(run("sample.py", "--pretrained", models / "hf", *args).stdout)
    assert len(cached) == 2 and all(s.split(": ", 1)[1].startswith("Hello, I'm a language model,") for s in cached)
    assert samples(run("sample.py", "--pretrained", models / "hf", "--no-cache", *args).stdout) == cached
    # the llm.c file holds the same weights, padded: its padding rows are never sampled
    assert samples(run("sample.py", "--llmc-bin", models / "tiny.bin", *args).stdout) == cached
    # and so does a training checkpoint
    assert samples(run("sample.py", "--ckpt", models / "model_00007.npz", *args).stdout) == cached
    greedy = run("sample.py", "--llmc-bin", models / "tiny.bin", "--temperature", 0, "--prompt", "", "--num-samples", 1)
    assert len(samples(greedy.stdout)) == 1 and "tokens/s" in greedy.stderr


def test_sample_reports_problems_without_a_traceback(models, tmp_path):
    proc = run("sample.py", "--pretrained", tmp_path / "missing", ok=False)
    assert "error:" in proc.stderr and "no such directory" in proc.stderr and "Traceback" not in proc.stderr
    proc = run("sample.py", "--llmc-bin", models / "tiny.bin", "--top-k", -1, ok=False)
    assert "top_k must be None or a positive integer" in proc.stderr
    assert run("sample.py", "--prompt", "x", ok=False).returncode == 2  # no model given: argparse's usage error


def test_hellaswag_script(models, tmp_path):
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES * 2)
    proc = run("hellaswag.py", "--llmc-bin", models / "tiny.bin", "--path", path, "--limit", 5,
               "--examples-per-forward", 2, "--print-every", 2)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("hellaswag val: 5 examples, acc ") and "acc_norm" in last
    assert "rank 0: 2/5" in proc.stdout
    result = hellaswag_result(models, EXAMPLES * 2, limit=5)
    assert f"acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f}" in last
    proc = run("hellaswag.py", "--llmc-bin", models / "tiny.bin", "--path", tmp_path / "none.jsonl", ok=False)
    assert "does not exist; check --path" in proc.stderr


def hellaswag_result(models, examples, limit):
    from nanogpt_np import hellaswag

    model = pretrained.load_llmc(models / "tiny.bin")
    return hellaswag.evaluate(model, examples[:limit])


def test_plot_log_script(tmp_path):
    (tmp_path / "log.txt").write_text("0 train 11.0\n0 val 10.9\n0 hella 0.25\n10 train 5.0\n")
    proc = run("plot_log.py", tmp_path)
    assert (tmp_path / "log.png").is_file() and "min train loss: 5.0000" in proc.stdout
    proc = run("plot_log.py", tmp_path / "nowhere", ok=False)
    assert "holds log.txt" in proc.stderr


def test_hellaswag_script_under_mpiexec(models, tmp_path):
    """Two ranks split the examples and sum their counts: the same result as one process."""
    pytest.importorskip("mpi4py")
    from tests.test_mpi import MPIEXEC, run_mpi

    if MPIEXEC is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]')")
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES * 3)
    args = ["--llmc-bin", str(models / "tiny.bin"), "--path", str(path), "--print-every", "0"]
    proc = run_mpi(ROOT / "scripts" / "hellaswag.py", n=2, args=args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("hellaswag val")]
    assert len(lines) == 1  # rank 0 reports
    result = hellaswag_result(models, EXAMPLES * 3, limit=9)
    assert result.acc == pytest.approx(1 / 3)
    assert f"9 examples, acc {result.acc:.4f}, acc_norm {result.acc_norm:.4f}" in lines[0]
    bad = run_mpi(ROOT / "scripts" / "hellaswag.py", n=2, timeout=60,
                  args=["--llmc-bin", str(models / "tiny.bin"), "--path", str(tmp_path / "none.jsonl")])
    assert bad.returncode != 0 and "check --path" in bad.stderr


def test_prepare_device_names_a_missing_text_and_writes_nothing(tmp_path):
    """scripts/prepare_device.sh (the device run's gpu_data/; it downloads wheels, so
    only its refusal runs here): a text file that is not there is one error line."""
    missing = tmp_path / "no_such_text.txt"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "prepare_device.sh"), str(missing)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: no text file {missing}; give one: bash scripts/prepare_device.sh PATH/TO/TEXT.txt"
