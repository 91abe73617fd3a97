"""The README's quickstart commands are contracts: CI runs the test command verbatim."""
import re
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
