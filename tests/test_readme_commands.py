"""Every command in the README's code blocks either runs here, as written (with a few
training steps appended), or is listed below with the reason it cannot run offline.
A new README command that is in neither list fails this test, so none breaks unseen."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = os.path.dirname(sys.executable)

# commands that need what this machine lacks (or that are the test suite itself)
NOT_HERE = {
    "python3 -m pip install -e . && python3 scripts/train.py --preset tiny": "tests/test_docs.py runs it (install "
                                                                             "aside)",
    "python3 -m pip install -e '.[test]' && python3 -m pytest -q": "the suite itself: CI runs it",
    "python3 scripts/prepare_fineweb.py": "downloads FineWeb-Edu",
    "python3 scripts/train.py --data-dir edu_fineweb10B --backend cupy": "a GPU and FineWeb-Edu",
    "python3 scripts/train.py --data-dir edu_fineweb10B --backend cupy --resume": "a GPU and FineWeb-Edu",
    "python3 -m pip install -e '.[mpi]'": "installed already by the test extra",
    "mpirun -n 8 python3 scripts/train.py --backend cupy": "8 GPUs",
    "python3 scripts/sample.py --pretrained gpt2 --prompt \"Hello, I'm a language model,\" --num-samples 4 "
    "--max-new-tokens 64": "downloads GPT-2's weights",
    "python3 scripts/hellaswag.py --pretrained gpt2": "downloads GPT-2's weights and HellaSwag",
    "python3 -m pytest -q tests/layers": "part of the suite",
    "python3 -m pytest -q tests/test_model.py": "part of the suite",
    "python3 -m pytest -q -m \"not slow\"": "part of the suite",
    "python scripts/gpu_check.py": "a GPU (its CPU dry run is tests/kernels/test_gpu_check.py)",
    "python -m pytest -q -m gpu": "a GPU",
}
TRAIN_STEPS = ["--max-steps", "2", "--val-steps", "1", "--sample-tokens", "4", "--num-samples", "1",
               "--peak-tflops", "1"]


def readme_commands():
    """Each command line of the README's bash blocks, comments and blank lines dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if line:
                commands.append(line)
    return commands


def readme_python_blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder to run the commands in, with the checkout's scripts/ linked in (the
    scripts put their own checkout on sys.path), so log/ lands here, not in the repo."""
    d = tmp_path_factory.mktemp("readme")
    (d / "scripts").symlink_to(ROOT / "scripts")
    return d


def run(command, cwd, extra=()):
    words = shlex.split(command)
    env = dict(os.environ, NANOGPT_NP_CACHE=str(cwd / "cache"), NANOGPT_NP_STDLIB_CHARS="200000",
               PATH=VENV_BIN + os.pathsep + os.environ.get("PATH", ""))
    while "=" in words[0]:  # VAR=value prefixes, as the shell reads them
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    words = [sys.executable if w in ("python3", "python") else w for w in words]
    if words[0] == "mpiexec":
        words[0] = shutil.which("mpiexec", path=env["PATH"])
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        env.pop(var, None)
    return subprocess.run([*words, *extra], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_every_readme_command_is_run_or_excused():
    runnable = set(RUNS)
    unknown = [c for c in readme_commands() if c not in NOT_HERE and c not in runnable]
    assert not unknown, f"README commands neither run by this test nor excused: {unknown}"
    stale = [c for c in list(NOT_HERE) + list(RUNS) if c not in readme_commands()]
    assert not stale, f"listed here but no longer in the README: {stale}"


def train_tiny(cwd):
    r = run("python3 scripts/train.py --preset tiny", cwd, TRAIN_STEPS + ["--ckpt-every", "1"])
    assert r.returncode == 0, r.stderr
    assert "final val loss" in r.stdout
    # the README's sample command names the tiny run's last checkpoint, step 200
    shutil.copy(cwd / "log" / "model_00002.npz", cwd / "log" / "model_00200.npz")


def train_tiny_on_two_ranks(cwd):
    """Run after the quickstart's run, into its own --log-dir: log/ stays the first run's."""
    log_before = (cwd / "log" / "log.txt").read_text()
    r = run("OMP_NUM_THREADS=1 mpiexec -n 2 python3 scripts/train.py --preset tiny --log-dir log_2ranks", cwd,
            TRAIN_STEPS)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 rank(s) x B=8 x T=128 x 1 micro-steps = 2,048 tokens per step" in r.stdout
    assert r.stdout.count("final val loss") == 1  # rank 0 speaks for the job
    assert (cwd / "log" / "log.txt").read_text() == log_before and (cwd / "log_2ranks" / "run.json").exists()
    # the quickstart's command again, as the Training section shows it: refused, saying the ways on
    r = run("python3 scripts/train.py --preset tiny", cwd, TRAIN_STEPS)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--log-dir log holds another run" in r.stderr and "--resume" in r.stderr and "--overwrite" in r.stderr
    assert (cwd / "log" / "log.txt").read_text() == log_before


def sample_checkpoint(cwd):
    r = run("python3 scripts/sample.py --ckpt log/model_00200.npz", cwd)
    assert r.returncode == 0, r.stderr


def plot(cwd):
    r = run("python3 scripts/plot_log.py log/", cwd)
    assert r.returncode == 0, r.stderr
    assert (cwd / "log" / "log.png").stat().st_size > 1000


def memory_plan(cwd):
    r = run("python3 scripts/memory_plan.py --preset 124M --batch-size auto --memory-gib 16", cwd)
    assert r.returncode == 0 and "--batch-size auto: B=8" in r.stdout, r.stdout + r.stderr


def gradcheck_all(cwd):
    r = run("python3 -m nanogpt_np.gradcheck all", cwd)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok: every gradient within 1e-06"), r.stdout


def gradcheck_layernorm(cwd):
    r = run("python3 -m nanogpt_np.gradcheck layernorm", cwd)
    assert r.returncode == 0, r.stdout + r.stderr


# in the order they run (sampling and the plot read the tiny run's log/)
RUNS = {
    "python3 scripts/train.py --preset tiny": train_tiny,
    "OMP_NUM_THREADS=1 mpiexec -n 2 python3 scripts/train.py --preset tiny --log-dir log_2ranks":
        train_tiny_on_two_ranks,
    "python3 scripts/sample.py --ckpt log/model_00200.npz": sample_checkpoint,
    "python3 scripts/plot_log.py log/": plot,
    "python3 -m nanogpt_np.gradcheck all": gradcheck_all,
    "python3 scripts/memory_plan.py --preset 124M --batch-size auto --memory-gib 16": memory_plan,
    "python3 -m nanogpt_np.gradcheck layernorm": gradcheck_layernorm,
}


def test_the_runnable_readme_commands_run(workdir):
    if shutil.which("mpiexec", path=VENV_BIN + os.pathsep + os.environ.get("PATH", "")) is None:
        pytest.fail("mpiexec is missing: the test extra installs the mpich wheel")
    for command, check in RUNS.items():
        check(workdir)


def test_the_readme_python_blocks_run():
    blocks = readme_python_blocks()
    assert len(blocks) == 2
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    assert namespace["logits"].shape == (2, 16, 101) and set(namespace["grads"]) == set(namespace["model"].params)
    assert 'backend="cupy"' in blocks[1]  # the GPU one: a GPU only (tests/kernels/test_gpu.py)
