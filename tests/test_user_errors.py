"""Every case of issue 26, driven as a user drives it: a command per case (a
subprocess, or main() in this process where a subprocess would only add start-up
time), then its exit code, the one `error:` line, no traceback, and nothing under
the log or output folder changed. The start-up refusals run side by side, so the
file takes seconds. Its neighbour for damaged files: tests/test_untrusted_files.py."""
import contextlib
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import train
from nanogpt_np.data import write_shard

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--n-layer", "1", "--n-head", "2", "--n-embd", "16", "--block-size", "16", "--batch-size", "2",
         "--total-batch-size", "32", "--max-steps", "2", "--val-steps", "1", "--val-every", "1",
         "--sample-every", "0", "--ckpt-every", "2", "--hellaswag-every", "0", "--peak-tflops", "1"]


def snapshot(*folders):
    """{path: (size, mtime, sha256)} of every file under the folders (absent ones: {})."""
    seen = {}
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            if path.is_file():
                seen[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns,
                                   hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                seen[str(path)] = "folder"
    return seen


def shards(folder, low=0, high=50257, dtype=np.uint16, lengths=(500, 500), val=200):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, n in enumerate(lengths):
        write_shard(os.path.join(folder, f"t_train_{i:06d}.npy"), rng.integers(low, high, n).astype(dtype))
    write_shard(os.path.join(folder, "t_val_000000.npy"), rng.integers(0, 50257, val).astype(np.uint16))
    return str(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A finished run (log/ with log.txt, run.json and a checkpoint) and its data, made
    by train.main in this process; plus the folders the cases need."""
    root = tmp_path_factory.mktemp("user")
    data = shards(root / "data")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert train.main([*SMALL, "--data-dir", data, "--log-dir", str(root / "log")]) == 0
    bad_ids = shards(root / "bad_ids", low=50400, high=65536)
    shards(root / "data2", high=1000)
    wide = root / "wide"
    wide.mkdir()
    np.save(wide / "w_train_000000.npy", np.arange(600, dtype=np.int64))
    np.save(wide / "w_val_000000.npy", np.arange(600, dtype=np.int64))
    (root / "a_file").write_text("not a folder")
    only_log = root / "only_log"
    only_log.mkdir()
    (only_log / "log.txt").write_text("0 train 10.9\n1 train 10.1\n")
    other = root / "other_run"
    other.mkdir()
    shutil.copy(root / "log" / "model_00002.npz", other)
    (other / "run.json").write_text(json.dumps({"run_id": "0123456789ab", "started": "yesterday"}))
    (other / "log.txt").write_text("0 train 10.9\n")
    return dict(root=root, data=data, bad_ids=bad_ids, wide=str(wide), stdout=out.getvalue())


def run(args, cwd, script="train.py", env=None):
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = dict(os.environ, PYTHONPATH=path, **(env or {}))  # this checkout's package, as the scripts' own
    return subprocess.run([sys.executable, str(ROOT / "scripts" / script), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def run_side_by_side(cases, cwd):
    """cases: {name: (args, script)} -> {name: CompletedProcess}, four at a time."""
    env = {"NANOGPT_NP_CACHE": str(Path(cwd) / "cache"), "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(4) as pool:
        futures = {name: pool.submit(run, args, cwd, script, env) for name, (args, script) in cases.items()}
        return {name: f.result() for name, f in futures.items()}


def assert_one_error_line(r, *fragments):
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    assert lines and lines[0].startswith("error: "), r.stderr
    assert sum(line.startswith("error") for line in lines) == 1, r.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ---- 1-4, 6, 7: train.py refuses at start-up, one line, nothing touched ---------------------


def test_train_refusals_leave_every_file_as_it_was(world):
    root, data = world["root"], world["data"]
    log, other, only_log = str(root / "log"), str(root / "other_run"), str(root / "only_log")
    fresh = str(root / "never_made")
    tiny = ["--preset", "tiny", "--log-dir", fresh]
    cases = {
        # 1: a run owns its log directory
        "fresh into a run": ([*SMALL, "--data-dir", data, "--log-dir", log], "train.py"),
        "resume, other flags": ([*SMALL, "--data-dir", data, "--log-dir", log, "--resume", "--max-lr", "1e-3"],
                                "train.py"),
        "resume, other model": ([*SMALL, "--data-dir", data, "--log-dir", log, "--resume", "--n-embd", "32"],
                                "train.py"),
        "resume and overwrite": ([*SMALL, "--data-dir", data, "--log-dir", log, "--resume", "--overwrite"],
                                 "train.py"),
        "resume, bad data": ([*SMALL, "--data-dir", world["bad_ids"], "--log-dir", log, "--resume"], "train.py"),
        "resume, other data": ([*SMALL, "--data-dir", str(root / "data2"), "--log-dir", log, "--resume"],
                               "train.py"),
        "resume, no checkpoint": ([*SMALL, "--data-dir", data, "--log-dir", only_log, "--resume"], "train.py"),
        "resume, another run's checkpoint": ([*SMALL, "--data-dir", data, "--log-dir", other, "--resume"],
                                             "train.py"),
        "log dir is a file": ([*SMALL, "--data-dir", data, "--log-dir", str(root / "a_file")], "train.py"),
        # 2: every shard's ids, at start-up; no lossy advice
        "ids outside the vocab": ([*SMALL, "--data-dir", world["bad_ids"], "--log-dir", fresh], "train.py"),
        "int64 shard": ([*SMALL, "--data-dir", world["wide"], "--log-dir", fresh], "train.py"),
        # 3: the memory plan is a gate (124M defaults)
        "over the memory plan": (["--memory-gib", "8", "--log-dir", fresh], "train.py"),
        "memory-gib 0.01": (["--memory-gib", "0.01", *tiny], "train.py"),
        # 4, 6: every number checked
        "max-lr -1": (["--max-lr", "-1", *tiny], "train.py"),
        "max-lr nan": (["--max-lr", "nan", *tiny], "train.py"),
        "min-lr above max-lr": (["--min-lr", "1", *tiny], "train.py"),
        "grad-clip -1": (["--grad-clip", "-1", *tiny], "train.py"),
        "memory-gib -1": (["--memory-gib", "-1", *tiny], "train.py"),
        "weight-decay inf": (["--weight-decay", "inf", *tiny], "train.py"),
        "block-size 0": (["--block-size", "0", *tiny], "train.py"),
        "n-head 3": (["--n-head", "3", *tiny], "train.py"),
        "total-batch-size 0": (["--total-batch-size", "0", *tiny], "train.py"),
        # 7: a file given as --data-dir
        "data dir is a file": ([*SMALL, "--data-dir", str(root / "a_file"), "--log-dir", fresh], "train.py"),
    }
    before = snapshot(root)
    results = run_side_by_side(cases, root)
    expect = {
        "fresh into a run": ["holds another run: log.txt (", "1 checkpoint(s) (model_00002.npz)", "--resume",
                             "--overwrite", "another --log-dir"],
        "resume, other flags": ["was trained with other flags: --max-lr 0.0006 (now 0.001)", "--force"],
        "resume, other model": ["n_embd: checkpoint 16, this run 32"],
        "resume and overwrite": ["give one of them"],
        "resume, bad data": ["t_train_000000.npy: token 0 is id", "outside the vocabulary [0, 50304)"],
        "resume, other data": ([*SMALL, "--data-dir", str(root / "data2"), "--log-dir", log, "--resume"],
                               "train.py"),
        "resume, other data": [f"trained on {data}, but this one would read {root / 'data2'}", "--force"],
        "resume, no checkpoint": ["holds no checkpoint to continue, only log.txt with 2 line(s)", "--overwrite"],
        "resume, another run's checkpoint": ["model_00002.npz belongs to run", "run.json is run 0123456789ab"],
        "log dir is a file": ["is a file; give a folder"],
        "ids outside the vocab": ["t_train_000000.npy: token 0 is id", "outside the vocabulary [0, 50304)"],
        "int64 shard": ["w_train_000000.npy: tokens have dtype int64", "write_shard"],
        "over the memory plan": ["the memory plan needs 52.1 GiB per rank, more than the 8 GiB there is",
                                 "--batch-size auto (B=4)", "--force"],
        "memory-gib 0.01": ["more than the 0.01 GiB there is"],
        "max-lr -1": ["--max-lr -1: the peak learning rate must be a finite number > 0"],
        "max-lr nan": ["--max-lr nan: the peak learning rate must be a finite number > 0"],
        "min-lr above max-lr": ["--min-lr 1: the final learning rate must be a finite number in [0, --max-lr 0.003]"],
        "grad-clip -1": ["--grad-clip -1:", ">= 0"],
        "memory-gib -1": ["--memory-gib -1:", "> 0"],
        "weight-decay inf": ["--weight-decay inf:", "finite"],
        "block-size 0": ["--block-size 0: must be a whole number >= 1"],
        "n-head 3": ["--n-embd 64 is not divisible by --n-head 3", "(2, 4, 8, 16, 32, 64)"],
        "total-batch-size 0": ["--total-batch-size 0: must be a whole number >= 1"],
        "data dir is a file": ["is a file, not a folder of shards"],
    }
    for name, r in results.items():
        line = assert_one_error_line(r, *expect[name])
        assert "astype" not in r.stderr, name  # no lossy cast advised
        assert "uint16)" not in line or name != "int64 shard"
    assert "memory plan, per rank" in results["over the memory plan"].stderr  # the plan follows its line
    assert snapshot(root) == before  # not one file made, changed or emptied; no never_made/


# ---- 1: --overwrite, --resume appending, and the end of a run ------------------------------


def test_overwrite_replaces_and_resume_appends(world, tmp_path):
    log = tmp_path / "log"
    shutil.copytree(world["root"] / "log", log)
    first_run = json.loads((log / "run.json").read_text())
    log_before = (log / "log.txt").read_text()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # two more steps of the same run
        assert train.main([*SMALL, "--data-dir", world["data"], "--log-dir", str(log), "--resume",
                           "--max-steps", "4"]) == 0
    assert (log / "log.txt").read_text().startswith(log_before)  # appended to, not rewritten
    resumed = json.loads((log / "run.json").read_text())
    assert resumed["run_id"] == first_run["run_id"] and resumed["resumed"][0]["step"] == 2
    assert "note: --max-steps 2 (now 4)" in out.getvalue()
    with contextlib.redirect_stdout(out):
        assert train.main([*SMALL, "--data-dir", world["data"], "--log-dir", str(log), "--overwrite",
                           "--max-steps", "1", "--ckpt-every", "0"]) == 0
    assert "--overwrite: removed the previous run's log.txt, run.json, model_00004.npz" in out.getvalue()
    assert sorted(os.listdir(log)) == ["log.txt", "run.json"]
    assert json.loads((log / "run.json").read_text())["run_id"] != first_run["run_id"]
    assert (log / "log.txt").read_text().split()[:2] == ["0", "val"]


def test_the_end_of_a_run_says_how_to_sample_and_plot(world):  # 10
    assert (f"sample from it: python3 scripts/sample.py --ckpt {world['root'] / 'log' / 'model_00002.npz'}; "
            f"plot it: python3 scripts/plot_log.py {world['root'] / 'log'}") in world["stdout"]
    info = json.loads((world["root"] / "log" / "run.json").read_text())
    assert {"run_id", "started", "command", "config", "data_dir", "model_config"} <= set(info)
    assert info["config"]["seed"] == 1337 and info["data_dir"] == world["data"]


# ---- 5, 6: prepare_text.py ------------------------------------------------------------------


def test_prepare_text_refusals(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "random.bin").write_bytes(b"ok so far " + np.random.default_rng(0).bytes(20000))
    (tmp_path / "one_line.txt").write_text("hello world\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "text.txt").write_text("To be, or not to be, that is the question.\n" * 50)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's own file")
    o = ["--out", str(out)]
    cases = {
        "empty": (["empty.txt", *o], "prepare_text.py"),
        "not UTF-8": (["random.bin", *o], "prepare_text.py"),
        "one line": (["one_line.txt", *o], "prepare_text.py"),
        "out is a file": (["text.txt", "--out", "a_file"], "prepare_text.py"),
        "val-fraction 1.5": (["text.txt", *o, "--val-fraction", "1.5"], "prepare_text.py"),
        "val-fraction 0": (["text.txt", *o, "--val-fraction", "0"], "prepare_text.py"),
    }
    before = snapshot(tmp_path)
    results = run_side_by_side(cases, tmp_path)
    expect = {
        "empty": ["empty.txt is empty"],
        "not UTF-8": ["random.bin is not UTF-8 text: byte 0x", "at offset 1", "--errors replace"],
        "one line": ["leaves the val split with 0 token(s)"],
        "out is a file": ["--out a_file is a file"],
        "val-fraction 1.5": ["--val-fraction 1.5:", "in (0, 1)"],
        "val-fraction 0": ["--val-fraction 0:", "in (0, 1)"],
    }
    for name, r in results.items():
        assert_one_error_line(r, *expect[name])
    assert snapshot(tmp_path) == before
    r = run(["random.bin", *o, "--errors", "replace"], tmp_path, "prepare_text.py")  # accepted when asked
    assert r.returncode == 0 and "1 val and 1 train shard(s)" in r.stdout, r.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_during_prepare_text_is_one_line_and_no_files(tmp_path, workers):
    big = tmp_path / "big.txt"
    big.write_text("It was the best of times, it was the worst of times. " * 400_000)  # ~20 MB
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "prepare_text.py"), str(big), str(big),
                             "--out", str(out), "--workers", workers],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"})
    assert proc.stdout.readline().startswith("tokenizing 2 file(s)")  # the long part has begun
    time.sleep(0.2)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - t0 < 5  # not after the tokenizer finishes
    assert proc.returncode == 130 and stderr.strip() == f"interrupted; nothing was written to {out}", stderr
    assert not out.exists()


# ---- 7: words that say what is so ------------------------------------------------------------


def test_resuming_on_other_ranks_keeps_the_runs_tokens_per_step(world, tmp_path):
    """A run whose tokens per step follow B*T*ranks (the tiny preset), resumed with
    another B*ranks: the checkpoint's tokens per step hold, and the line says so."""
    from nanogpt_np.train import Trainer, parse_args

    log = tmp_path / "log"
    flags = ["--preset", "tiny", *[a for a in SMALL if a not in ("--total-batch-size", "32")], "--data-dir",
             world["data"]]
    cfg = parse_args([*flags, "--log-dir", str(log)])
    assert cfg.total_batch_size is None
    Trainer(cfg, log=lambda *a: None).run()  # 2 x 16 = 32 tokens per step
    lines = []
    resumed = Trainer(parse_args([*flags, "--log-dir", str(log), "--resume", "--batch-size", "1",
                                  "--max-steps", "3"]), log=lines.append)
    resumed.run()
    assert resumed.cfg.total_batch_size == 32 and resumed.accum == 2
    said = "\n".join(map(str, lines))
    assert "on 1 x B=1: the same 32 tokens per step (2 micro-steps now)" in said
    assert "warning" not in said


def test_ctrl_c_before_the_run_began_says_so(world, tmp_path, monkeypatch, capsys):
    from nanogpt_np.train import Trainer

    def interrupted(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_builtin_corpus", interrupted)  # Ctrl-C while the corpus is built
    assert train.main([*SMALL, "--log-dir", str(tmp_path / "log")]) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"interrupted before the run began; nothing was written to {tmp_path / 'log'}: run the same " \
                  "command again"
    assert not (tmp_path / "log").exists()


def test_the_continue_command_keeps_the_thread_settings(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    assert (train.resume_command(["--preset", "tiny", "--overwrite"], world_size=2)
            == "OMP_NUM_THREADS=1 mpiexec -n 2 python3 scripts/train.py --preset tiny --resume")


def test_progress_reaches_100_percent_only_at_the_end(world, tmp_path):
    from nanogpt_np.train import Trainer, parse_args

    lines = []
    trainer = Trainer(parse_args([*SMALL, "--data-dir", world["data"], "--log-dir", str(tmp_path),
                                  "--max-steps", "200"]), log=lines.append)
    trainer.flops_per_step, trainer.peak, trainer.clock = 1.0, 1e30, None
    trainer.log_path = str(tmp_path / "log.txt")
    for step in (198, 199):
        trainer.step = step + 1
        trainer.report(step, 1.0, 1e-3, 1.0, 0.01)
    assert "| 99% ETA" in lines[0] and "| 100% ETA" in lines[1]


# ---- 8, 9, 10 ------------------------------------------------------------------------------


def test_plot_log_draws_a_log_with_nan_losses(tmp_path):
    pytest.importorskip("matplotlib")
    (tmp_path / "log.txt").write_text("0 val nan\n0 train 10.5\n1 train nan\n1 skipped loss nan (non-finite; 1 in a "
                                      "row)\n2 train 9.0\n2 val nan\n")
    r = run([str(tmp_path)], tmp_path, "plot_log.py")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert (tmp_path / "log.png").stat().st_size > 1000


def test_tiny_with_batch_size_auto_runs(world, tmp_path):
    from nanogpt_np.train import Trainer, parse_args

    cfg = parse_args(["--preset", "tiny", "--batch-size", "auto", "--data-dir", world["data"], "--block-size", "16",
                      "--log-dir", str(tmp_path)])
    trainer = Trainer(cfg, log=lambda *a: None)
    assert trainer.cfg.batch_size == 8 and trainer.cfg.total_batch_size == 8 * 16 and trainer.accum == 1
    tight = Trainer(parse_args(["--preset", "tiny", "--batch-size", "auto", "--data-dir", world["data"],
                                "--block-size", "16", "--log-dir", str(tmp_path), "--memory-gib", "0.08"]),
                    log=lambda *a: None)
    assert 1 <= tight.cfg.batch_size < 8 and tight.cfg.total_batch_size == tight.cfg.batch_size * 16


def test_sample_says_when_the_prompt_is_cut_and_model_source_has_help(world, tmp_path):
    ckpt = world["root"] / "log" / "model_00002.npz"
    prompt = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen"
    cases = {
        "long prompt": (["--ckpt", str(ckpt), "--prompt", prompt, "--num-samples", "1", "--max-new-tokens", "2"],
                        "sample.py"),
        "help": (["--help"], "model_source.py"),
    }
    results = run_side_by_side(cases, tmp_path)
    r = results["long prompt"]
    assert r.returncode == 0 and "note: the prompt is 17 tokens, longer than the model's context of 16: its " \
                                 "first 1 tokens are not seen" in r.stderr, r.stderr
    r = results["help"]
    assert r.returncode == 0 and "--ckpt PATH" in r.stdout and "not a command" in r.stdout


def test_long_phases_say_so_before_they_start(world, tmp_path):  # 3
    from nanogpt_np.data import check_token_ids, find_shards
    from nanogpt_np.train import Trainer, parse_args

    lines = []
    trainer = Trainer(parse_args([*SMALL, "--data-dir", world["data"], "--log-dir", str(tmp_path)]),
                      log=lines.append)
    trainer.flops_per_step, trainer.peak = 1e12, 1e10  # 100 s a step at this peak
    trainer.say_what_takes_long()
    assert lines[-1].startswith("at the measured peak each step takes at least 1m40s, each validation")
    check_token_ids(find_shards(world["data"], "train"), 50304, log=lines.append, every_seconds=0)
    assert "checking token ids: shard 1 of 2 (0s)" in lines and lines[-1].startswith("checked the token ids of 2 shard(s)")
