"""Running the sections: each in its own process (or all in this one), then the table."""
import argparse
import os
import subprocess
import sys
import time
from pathlib import Path


from nanogpt_np import backend
from nanogpt_np.kernels import loader

from . import settings
from .table import add_row, all_rows, save, table
from .attention_speed import section_attention_speed
from .curve import section_curve
from .environment import section_environment
from .kernel_checks import section_kernels
from .model_checks import section_model
from .recipe import section_recipe
from .speed import section_compile, section_speed, section_speed_350m, summary_rows
from .train_script import section_train_script
from .training_checks import section_training



# ---- running it --------------------------------------------------------------------------------

# (name, function, seconds it may take at most) in the order they run; each in its own process
SECTIONS = [
    ("environment", lambda args: section_environment(), 180),
    ("kernels", lambda args: section_kernels(), 240),
    ("model", lambda args: section_model(), 300),
    ("speed", lambda args: section_speed(), 300),
    ("attention", lambda args: section_attention_speed(), 120),
    ("curve", section_curve, 240),
    ("training", lambda args: section_training(), 120),
    ("train_script", section_train_script, 420),
    ("compile", section_compile, 600),
    ("recipe", section_recipe, 240),  # after "compile": its torch.compile finds that one's cache
    ("speed_350m", section_speed_350m, 600),
]


def run_section(name, args):
    fn = dict((n, f) for n, f, _ in SECTIONS)[name]
    try:
        backend.set_tf32(False)
    except RuntimeError:  # no CuPy: the section's rows say so one by one
        pass
    loader.sync_each_launch(True)  # correctness rows: an error names its kernel
    fn(args)


def run_in_subprocesses(args):
    """Each section in a fresh process: a sticky CUDA error, a crash or a hang loses
    that section's remaining rows only (the section's own timeout, and --budget,
    bound it)."""
    rows_file = Path(os.environ.get("OUT") or "/tmp") / f"gpu_check_rows_{os.getpid()}.jsonl"
    rows_file.unlink(missing_ok=True)
    os.environ[settings.ROWS_ENV] = str(rows_file)
    passthrough = [f"--budget={args.budget}", f"--start={args.start}"] + (["--no-compile"] if args.no_compile else [])
    if args.text:
        passthrough.append(f"--text={args.text}")
    for name, _, limit in SECTIONS:
        if name != "compile" and time.time() - args.start > args.budget + 120:
            add_row(dict(section="-", name=name, seconds=0, result="skipped: --budget spent", limit="", status="info"))
            continue
        before = len(all_rows())
        cmd = [sys.executable, *settings.SECTION_COMMAND, f"--section={name}"] + passthrough
        try:
            proc = subprocess.run(cmd, timeout=limit, stderr=subprocess.PIPE, text=True)
            code, tail = proc.returncode, proc.stderr[-1500:]
        except subprocess.TimeoutExpired as e:
            code, tail = "timeout", (e.stderr or b"")[-1500:]
            tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        if tail:
            sys.stderr.write(tail)
        if code != 0:
            detail = " | ".join(tail.strip().splitlines()[-3:])
            add_row(dict(section="!", name=f"section {name} ended early", seconds=0, limit="", status="FAIL",
                         ok=False, result=f"exit {code} after {len(all_rows()) - before} rows: {detail[:300]}"))
    summary_rows()


def prepare_text(src, dst):
    """Tokenize a text file with GPT-2's BPE into a .npy of uint16 ids (on a machine
    that has the tokenizer files; the GPU machine then needs only the .npy)."""
    from nanogpt_np.data import write_shard
    from nanogpt_np.tokenizer import get_encoding

    ids = get_encoding().encode_ordinary(Path(src).read_text(encoding="utf-8"))
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    write_shard(dst, ids)  # uint16 .npy, written whole or not at all
    print(f"{src}: {len(ids):,} tokens -> {dst}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check the CuPy backend on a GPU, in one command, and print a table.")
    parser.add_argument("--budget", type=float, default=270,
                        help="seconds for the whole run; torch.compile gets what is left, and is skipped under 90 s")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile reference")
    parser.add_argument("--text", "--data", dest="text", default=None,
                        help="real text for section 6: token ids (.npy, e.g. a prepared shakespeare.npy) or a text "
                             "file (default: stdlib source bytes)")
    parser.add_argument("--counts", action="store_true",
                        help="no GPU needed: count the launches, gemms, host syncs, allocations and bytes of one "
                             "steady-state 124M bf16 step (B=16, T=1024) on a counting stand-in for CuPy, then exit")
    parser.add_argument("--prepare-text", nargs=2, metavar=("TEXT", "OUT_NPY"),
                        help="tokenize TEXT with GPT-2's BPE into OUT_NPY for --text, then exit (no GPU needed)")
    parser.add_argument("--in-process", action="store_true",
                        help="run every section in this process (faster to start; one CUDA error then ends the rest)")
    parser.add_argument("--section", choices=[n for n, _, _ in SECTIONS], help=argparse.SUPPRESS)
    parser.add_argument("--start", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_text:
        prepare_text(*args.prepare_text)
        return 0
    if args.counts:
        from .counts import main as print_counts

        print_counts()
        return 0
    args.start = settings.START if args.start is None else args.start
    if args.section:  # one section, in a process the parent started
        run_section(args.section, args)
        return 0
    try:
        backend.get_xp("cupy")
    except RuntimeError as e:  # no CuPy or no GPU: say so once instead of failing every row
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if args.in_process:
        for name, _, _ in SECTIONS:
            run_section(name, args)
        summary_rows()
    else:
        run_in_subprocesses(args)
    save()
    print("\n" + table())
    return 1 if any(r["status"] == "FAIL" for r in all_rows()) else 0

