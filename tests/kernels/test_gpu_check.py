"""scripts/gpu_check.py, dry-run on the CPU: a fake CuPy over NumPy, kernels in the
CPU emulator, PyTorch on the CPU, every size shrunk. The GPU run is rare and
short, so each of its rows must already work here; only the numbers are the GPU's."""
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import GPTConfig
from nanogpt_np.kernels import gemm, loader

ROOT = Path(__file__).resolve().parents[2]
TINY = GPTConfig(block_size=32, vocab_size=61, n_layer=1, n_head=2, n_embd=128)  # head size 64
SIZES = dict(
    attention=[(1, 5, 2, np.float32), (1, 70, 1, np.float64)],
    attention_bf16=[(1, 9, 2)],
    bf16_rows=(1, 3, 40, 70),
    gemm=[(5, 7, 3)],
    host=(1, 8),
    graph_steps=4,
    timing_reps=1,
    curve=(TINY, 3, 2, 16),
    recipe=(TINY, 3, 2, 16),
    layernorm=[((2, 3, 40), np.float32), ((1, 2, 40), np.float64)],
    gelu=[((3, 50), np.float32)],
    cross_entropy=[(1, 3, 70, np.float32), (2, 2, 33, np.float64)],
    adamw=[(1001, np.float32), (77, np.float64)],
    small_model=(TINY, 1, 9),
    big_model=(TINY, 2, 17),
    train=(TINY, 3, 2, 16),
    attention_bench=(1, 1, 16, 64),
    speed=(TINY, 2, 16),
    speed_350m=(TINY, 1, 16),
    train_script=dict(n_layer=1, n_head=2, n_embd=32, T=16, B=2, tokens=64, steps=6),
)


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_time_limit_stops_a_long_row():
    import time

    from nanogpt_np.gpucheck import table

    with pytest.raises(table.TimeLimit):
        table.with_time_limit(1, lambda: time.sleep(5))
    assert table.with_time_limit(5, lambda: 42) == 42


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ is not on PATH: no CUDA emulator")
def test_gpu_check_dry_run(fast_emulator_lib, monkeypatch, tmp_path, capsys):
    from tests.kernels import emulator, fake_cupy

    fake_cupy.install(monkeypatch)
    monkeypatch.setattr(emulator.EmulatedCupyRunner, "lib_path", fast_emulator_lib)
    monkeypatch.setattr(loader, "CupyRunner", emulator.EmulatedCupyRunner)
    previous = loader.use_runner(emulator.EmulatedCupyRunner())
    previous_gemm = gemm.use_runner(emulator.NumpyCublas())
    monkeypatch.setenv("NANOGPT_CUDA_SYNC", "0")
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["gpu_check.py", "--no-compile", "--in-process"])
    gpu_check = load_gpu_check()
    from nanogpt_np.gpucheck import settings

    monkeypatch.setattr(settings, "SIZES", SIZES)
    monkeypatch.setattr(settings, "TORCH_DEVICE", "cpu")
    monkeypatch.setattr(settings, "TRAIN_BACKEND", "numpy")  # section 7's subprocesses have no fake GPU
    try:
        status = gpu_check.main()
    finally:
        loader.use_runner(previous)
        gemm.use_runner(previous_gemm)
    out = capsys.readouterr().out
    rows = gpu_check.ROWS
    # the speed verdicts compare a CPU emulator with PyTorch on the CPU: meaningless here, so
    # only they may say FAIL; nothing may be an ERROR
    verdicts = {"ratio ours bf16 / PyTorch best (tok/s)", "MFU of ours bf16", "peak GPU memory, ours bf16 vs PyTorch",
                "350M ratio ours bf16 / PyTorch best (tok/s)"}
    broken = [(r["name"], r["result"]) for r in rows
              if r["result"].startswith("ERROR") or (r["status"] == "FAIL" and r["name"] not in verdicts)]
    assert not broken, broken
    assert status in (0, 1)
    assert {r["section"] for r in rows} == {"0", "1", "2", "3", "4", "5", "6", "7"}
    n_kernel_rows = sum(len(SIZES[k]) for k in ("attention", "attention_bf16", "layernorm", "gelu", "cross_entropy",
                                                "adamw", "gemm")) + 3
    # + the 350M rows, section 7, section 5's 4 more (bf16 fa2 and mma timed at two shapes), section 4's
    # graph rows (host time with graphs, eager vs graphs, per-kernel time), section 7's --cuda-graphs off,
    # and section 4's step on the first mma attention kernels, and section 6's ours vs build-nanogpt
    assert len(rows) == 3 + n_kernel_rows + 6 + 2 + 4 + 4 + 1 + 1 + 3 + 4 + 3 + 4 + 3 + 1 + 1 + 1
    first = next(r for r in rows if r["name"].startswith("ours bf16 with the first mma attention"))
    assert first["result"].startswith("B") and "ours_bf16_mma_tok_s" in first.get("metrics", {}), first
    section5 = [r["name"] for r in rows if r["section"] == "5"]
    assert len(section5) == 8 and sum("124M ours bf16" in n for n in section5) == 2, section5  # fa2, mma
    assert sum("350M" in n for n in section5) == 3, section5  # fa2, mma, SDPA at the 350M shape
    section7 = [r for r in rows if r["section"] == "7"]
    assert [r["status"] for r in section7] == ["ok", "ok", "ok", "ok"], section7
    assert "log.txt identical" in section7[2]["result"] and "--cuda-graphs off" in section7[1]["result"]
    names = {r["name"] for r in rows}
    overlap = next(r for r in rows if r["name"] == "overlapped NCCL allreduce, 1 rank")
    assert overlap["status"] == "ok" and overlap["result"].startswith("3 buckets (want 3)"), overlap
    assert verdicts <= names and "host time per step, eager (launch overhead)" in names
    graphs = next(r for r in rows if r["name"].startswith("eager vs CUDA graphs"))
    assert "losses bit-identical" in graphs["result"], graphs  # the stand-in refuses capture here: eager both ways
    timing = next(r for r in rows if r["name"].startswith("per-kernel time"))
    assert " launches | " in timing["result"] and "gemm" in timing["result"], timing  # all 0 ms here: any 15
    paths = [r["result"].rsplit("path ", 1)[-1] for r in rows if r["name"].startswith("attention") and "bf16" in r["name"]]
    assert "fa2" in paths and "widened" in paths
    assert "skipped (--no-compile)" in out
    assert (tmp_path / "gpu_check.txt").read_text().startswith("#")
    assert (tmp_path / "gpu_check.json").exists()
    curve = next(r for r in rows if r["section"] == "6")
    assert len(curve["metrics"]["curve_bf16"]) == SIZES["curve"][1]
    recipe = next(r for r in rows if r["name"].endswith("ours vs build-nanogpt"))
    assert recipe["status"] == "ok" and "torch.compile skipped: --no-compile" in recipe["result"], recipe
    steps = SIZES["recipe"][1]
    assert [len(recipe["metrics"][k]) for k in ("curve_ours_bf16", "curve_torch_bf16")] == [steps, steps], recipe
    assert recipe["metrics"]["recipe_ours_s"] > 0 and recipe["metrics"]["recipe_torch_s"] > 0


def test_prepare_text_writes_token_ids(tmp_path):
    gpu_check = load_gpu_check()
    src = tmp_path / "t.txt"
    src.write_text("To be, or not to be, that is the question.")
    out = tmp_path / "not_yet" / "t.npy"  # its folder is made
    gpu_check.main(["--prepare-text", str(src), str(out)])
    assert [p.name for p in out.parent.iterdir()] == ["t.npy"]  # no temporary file left
    from nanogpt_np.gpucheck.curve import text_tokens

    tokens, source = text_tokens(str(out))
    assert tokens.dtype == np.int64 and 5 < tokens.size < 20 and "GPT-2 tokens" in source
    tokens, source = text_tokens(str(src))
    assert "GPT-2 BPE" in source and tokens.size < 20


def test_sections_run_in_their_own_processes(monkeypatch, tmp_path):
    """The parent runs each section as `gpu_check.py --section NAME`, gathers the rows
    the child appended, and turns a child that dies into a FAIL row, going on with
    the next section. Here (no CuPy) the environment section's rows are errors, and a
    section the child does not know makes it exit with an argparse error."""
    import time
    import types

    load_gpu_check()  # as the script wires it: its own path starts the section processes
    from nanogpt_np.gpucheck import runner, table

    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(runner, "SECTIONS", [("environment", None, 120), ("no_such_section", None, 120)])
    monkeypatch.setattr(runner, "summary_rows", lambda: None)
    # the budget counts from now, not from the import: earlier tests in this process take their own time
    args = types.SimpleNamespace(budget=100.0, start=time.time(), no_compile=True, text=None)
    runner.run_in_subprocesses(args)
    rows = table.all_rows()
    assert [r["name"] for r in rows] == ["environment", "NVRTC compiles every kernel",
                                         "mma.sync m16n8k16 bf16 fragment layout", "section no_such_section ended early"]
    assert rows[0]["result"].startswith("ERROR") and "cupy" in rows[0]["result"].lower()
    assert rows[3]["status"] == "FAIL" and "exit 2" in rows[3]["result"]
    assert "section no_such_section ended early" in (tmp_path / "gpu_check.txt").read_text()
