"""The README's quickstart commands are contracts: CI runs the test command verbatim."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quickstart_commands():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    return [c.strip() for c in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_ci_runs_the_readme_test_command():
    test_commands = [c for c in quickstart_commands() if "pytest" in c]
    assert len(test_commands) == 1
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_commands[0] in ci


MAIN_JOB = "python3 -m pip install -e . && python3 scripts/train.py --preset tiny"


def test_quickstart_is_two_commands_main_job_first():
    commands = quickstart_commands()
    assert len(commands) == 2
    assert commands[0] == MAIN_JOB
    assert "pytest" in commands[1]


def test_main_job_command_runs(tmp_path):
    """The main job's flags parse, and the command itself (after the install) runs:
    the tiny preset, shortened to 2 steps here, on a capped built-in corpus."""
    from nanogpt_np.train import PRESETS, parse_args

    train_part = quickstart_commands()[0].split("&&")[1].split()
    assert train_part[:2] == ["python3", "scripts/train.py"]
    cfg = parse_args(train_part[2:])
    assert cfg.preset == "tiny" and cfg.data_dir is None
    assert cfg.max_steps == PRESETS["tiny"]["max_steps"]
    shorten = ["--max-steps", "2", "--val-steps", "1", "--sample-tokens", "4", "--num-samples", "1",
               "--log-dir", str(tmp_path / "log"), "--peak-tflops", "1"]
    env = dict(os.environ, NANOGPT_NP_CACHE=str(tmp_path / "cache"), NANOGPT_NP_STDLIB_CHARS="200000")
    r = subprocess.run([sys.executable, *train_part[1:], *shorten], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "final val loss" in r.stdout and "sample 0:" in r.stdout
