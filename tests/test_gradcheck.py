"""nanogpt_np.gradcheck: passes the project's layers, catches a broken backward."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np import gradcheck
from nanogpt_np.layers import layernorm

ROOT = Path(__file__).resolve().parents[1]
LAYERS = list(gradcheck.layer_cases(np.random.default_rng(0)))


@pytest.mark.parametrize("layer", LAYERS)
@pytest.mark.parametrize("which", ["fast", "reference"])
def test_every_layer_passes(layer, which):
    fwd, bwd, inputs, names, ref_fwd, ref_bwd = gradcheck.layer_cases(np.random.default_rng(3))[layer]
    if which == "reference":
        fwd, bwd = gradcheck.as_pair(ref_fwd, ref_bwd)
    errors = gradcheck.check(fwd, bwd, *inputs, names=names)
    assert list(errors) == names and max(errors.values()) < 1e-7


def layernorm_backward_without_the_xhat_term(dout, cache):
    """LayerNorm's backward with the rstd-through-var term dropped: the mistake of
    treating the variance as a constant."""
    x, weight, mean, rstd = cache
    xhat = (x - mean) * rstd
    g = dout * weight
    dx = rstd * (g - g.mean(axis=-1, keepdims=True))  # missing: - xhat * mean(g * xhat)
    axes = tuple(range(x.ndim - 1))
    return dx, (dout * xhat).sum(axis=axes), dout.sum(axis=axes)


def test_a_dropped_term_is_caught_and_named():
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 5, 8)) * 2 + 1, rng.standard_normal(8) + 1, rng.standard_normal(8)
    with pytest.raises(AssertionError, match=r"^x: worst element \(\d, \d, \d\): backward .* finite differences "
                                             r".* ratio .* relative error .* > 1e-06"):
        gradcheck.check(layernorm.forward, layernorm_backward_without_the_xhat_term, x, w, b,
                        names=["x", "weight", "bias"])
    rows = gradcheck.measure(layernorm.forward, layernorm_backward_without_the_xhat_term, x, w, b,
                             names=["x", "weight", "bias"])
    errors = {row.name: row.error for row in rows}
    assert errors["x"] > 1e-2 and errors["weight"] < 1e-7 and errors["bias"] < 1e-7


def relu_forward(x):
    out = np.maximum(x, 0.0)
    return out, x


def test_a_readers_relu_and_a_wrong_one():
    x = np.random.default_rng(1).standard_normal((4, 6))
    assert gradcheck.check(relu_forward, lambda dout, x: dout * (x > 0), x)["input 0"] < 1e-8
    with pytest.raises(AssertionError, match="input 0"):
        gradcheck.check(relu_forward, lambda dout, x: dout, x)  # forgot the mask


def test_the_contract_is_enforced():
    x = np.ones((2, 3))
    with pytest.raises(ValueError, match="returned 2 gradient"):
        gradcheck.check(relu_forward, lambda dout, x: (dout, dout), x)
    with pytest.raises(ValueError, match="gradient shape"):
        gradcheck.check(relu_forward, lambda dout, x: dout.sum(axis=0), x)


def gather_forward(idx, table):
    return table[idx], (idx, table.shape)


def gather_backward(dout, cache):
    idx, shape = cache
    dtable = np.zeros(shape)
    np.add.at(dtable, idx, dout)
    return None, dtable  # integer ids have no gradient


def test_integer_inputs_are_passed_through_unchecked():
    idx = np.array([[0, 1, 1]])  # a repeated id
    table = np.random.default_rng(0).standard_normal((3, 2))
    assert list(gradcheck.check(gather_forward, gather_backward, idx, table)) == ["input 1"]


def test_the_command_line_prints_a_table():
    r = subprocess.run([sys.executable, "-m", "nanogpt_np.gradcheck", "layernorm"], capture_output=True,
                       text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("layernorm: forward/backward, float64")
    assert "the worst shown" in lines[0] and "worst at" in lines[2]
    assert [line.split()[0] for line in lines[3:6]] == ["x", "weight", "bias"]
    assert lines[-1] == "ok: every gradient within 1e-06"
    doc = (ROOT / "docs" / "backprop.md").read_text()
    shown = doc.split("$ python3 -m nanogpt_np.gradcheck layernorm\n")[1].split("```")[0].splitlines()
    assert shown[:3] == lines[:3] and len(shown) == len(lines)  # the docs show this table (rounding aside)
    assert [line.split()[:3] for line in shown[3:]] == [line.split()[:3] for line in lines[3:]]


def test_the_docs_worked_example_runs_as_written(capsys):
    text = (ROOT / "docs" / "backprop.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "rmsnorm_backward" in b).split("```")[0]
    exec(compile(block, "docs/backprop.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed in text  # the output the doc shows is the output it gets


# ---- realistic sizes: a wrong term is not diluted by the dimension ----------------------------


def layernorm_backward_without_the_mean_term(dout, cache):
    """LayerNorm's backward missing mean(g): the mean treated as a constant."""
    x, weight, mean, rstd = cache
    xhat = (x - mean) * rstd
    g = dout * weight
    dx = rstd * (g - xhat * (g * xhat).mean(axis=-1, keepdims=True))  # missing: - mean(g)
    return dx, (dout * xhat).sum(axis=(0, 1)), dout.sum(axis=(0, 1))


def silu(x):
    return x / (1 + np.exp(-x))


def test_a_missing_term_is_caught_at_a_realistic_size():
    """At (4, 64, 256) a random direction sees 5% of this error diluted to 2e-4; the
    element-wise check reports it at its own size."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((4, 64, 256)) * 2 + 1, rng.standard_normal(256) + 1, rng.standard_normal(256)
    right = gradcheck.measure(layernorm.forward, layernorm.backward, x, w, b, names=["x", "weight", "bias"])
    assert max(row.error for row in right) < 1e-6
    wrong = gradcheck.measure(layernorm.forward, layernorm_backward_without_the_mean_term, x, w, b,
                              names=["x", "weight", "bias"])
    assert wrong[0].error > 1e-2 and wrong[0].where.startswith("element ")
    assert wrong[1].error < 1e-6 and wrong[2].error < 1e-6


def test_a_missing_product_rule_is_caught_at_a_realistic_size():
    x = np.random.default_rng(1).standard_normal((4, 64, 64))

    def right(dout, x):
        s = 1 / (1 + np.exp(-x))
        return dout * s * (1 + x * (1 - s))

    assert gradcheck.measure(silu, right, x)[0].error < 1e-6
    assert gradcheck.measure(silu, lambda dout, x: dout / (1 + np.exp(-x)), x)[0].error > 1e-2


def test_scalar_loss_at_a_realistic_size_stays_at_rounding():
    """Cross-entropy's gradient elements are ~1/N of its loss: the step and the element
    floor keep rounding below the tolerance, and a missing 1/N is named as a factor."""
    from nanogpt_np.layers import cross_entropy

    rng = np.random.default_rng(2)
    logits, targets = rng.standard_normal((4, 64, 391)) * 3, rng.integers(0, 391, (4, 64))
    fwd = lambda logits: cross_entropy.reference_forward(logits, targets)  # noqa: E731
    bwd = lambda d, logits: cross_entropy.reference_backward(d, logits, targets)  # noqa: E731
    assert gradcheck.measure(fwd, bwd, logits)[0].error < 1e-6
    exam = gradcheck.examine(fwd, lambda d, logits: bwd(d, logits) * 256, logits)
    (finding,) = exam.findings
    assert finding.status == "wrong" and abs(finding.worst.ratio - 256) < 1e-3
    assert finding.hint.startswith("off by a constant factor: backward is 256 times")


# ---- the pair as a learner writes it ------------------------------------------------------


def test_a_reference_style_pair_is_read_as_written():
    """A bare-array forward and backward(dout, *inputs): no batch axis split off as a cache."""
    rng = np.random.default_rng(0)
    x, w, b = rng.standard_normal((2, 3, 4)), rng.standard_normal(4) + 1, rng.standard_normal(4)
    exam = gradcheck.examine(layernorm.reference_forward, layernorm.reference_backward, x, w, b)
    assert exam.notes == ["forward returns a bare output; backward is called as backward(dout, *inputs)"]
    assert [f.status for f in exam.findings] == ["ok"] * 3


def test_a_cache_forward_with_an_inputs_backward():
    def forward(x, weight):
        return x @ weight.T, None

    def backward(dout, x, weight):
        return dout @ weight, dout.reshape(-1, dout.shape[-1]).T @ x.reshape(-1, x.shape[-1])

    rng = np.random.default_rng(0)
    exam = gradcheck.examine(forward, backward, rng.standard_normal((2, 3, 4)), rng.standard_normal((5, 4)))
    assert exam.notes[0] == "forward returns (out, cache); backward is called as backward(dout, *inputs)"
    assert [f.status for f in exam.findings] == ["ok", "ok"]


def test_one_gradient_per_float_input_and_settings_pass_through():
    """attention.reference_backward(dout, qkv, n_head) returns dqkv alone: n_head is a setting."""
    from nanogpt_np.layers import attention

    qkv = np.random.default_rng(0).standard_normal((2, 5, 12))
    errors = gradcheck.check(attention.reference_forward, attention.reference_backward, qkv, 2,
                             names=["qkv", "n_head"])
    assert list(errors) == ["qkv"] and errors["qkv"] < 1e-7


def test_a_float32_output_is_flagged():
    x = np.random.default_rng(0).standard_normal((3, 4))
    exam = gradcheck.examine(lambda x: np.tanh(x).astype(np.float32), lambda d, x: d * (1 - np.tanh(x) ** 2), x)
    assert any(n.startswith("warning: the output is float32") and "float64" in n for n in exam.notes)


# ---- hints --------------------------------------------------------------------------------


@pytest.mark.parametrize("gshape,xshape,words", [
    ((8, 24), (24, 8), "a transposed matrix"),
    ((2, 5, 8), (8,), "a missing sum over a broadcast axis: b was broadcast over axes (0, 1) of this gradient"),
    ((5, 8), (8,), "a missing sum over a broadcast axis"),
    ((2, 5, 8), (7, 8), "a missing sum over a broadcast axis"),
    ((2, 5, 8), (2, 5, 1), "size 1 along (2,)"),
    ((5, 8), (7, 8), "the forward read only a slice of b"),
])
def test_shape_hints(gshape, xshape, words):
    hint = gradcheck.shape_hint("b", gshape, xshape)
    assert hint.startswith(f"gradient shape {gshape}, but b has shape {xshape}: ") and words in hint


def test_a_transposed_square_matrix_is_named():
    rng = np.random.default_rng(0)
    x, w = rng.standard_normal((6, 4)), rng.standard_normal((4, 4))

    def backward(dout, x, w):
        return dout @ w, x.T @ dout  # dweight transposed: dout.T @ x is right

    (_, dweight) = gradcheck.examine(lambda x, w: x @ w.T, backward, x, w, names=["x", "weight"]).findings
    assert dweight.status == "wrong" and dweight.hint.startswith("a transposed matrix")


# ---- the command line on a learner's own file ------------------------------------------------

MY_LAYER = '''
import numpy as np

def forward(x, weight):
    return np.tanh(x) * weight

def backward(dout, x, weight):
    dx = dout * weight * (1 - np.tanh(x) ** 2){mistake}
    return dx, (dout * np.tanh(x)).sum(axis=(0, 1))
{example}'''
EXAMPLE = '''
def example_inputs():
    rng = np.random.default_rng(0)
    return rng.standard_normal((2, 5, 8)), rng.standard_normal(8)
'''


def run_gradcheck(*args):
    return subprocess.run([sys.executable, "-m", "nanogpt_np.gradcheck", *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT, timeout=60)


def test_the_command_line_checks_a_learners_file(tmp_path):
    good, bad, bare = tmp_path / "good.py", tmp_path / "bad.py", tmp_path / "bare.py"
    good.write_text(MY_LAYER.format(mistake="", example=EXAMPLE))
    bad.write_text(MY_LAYER.format(mistake=" * 2", example=EXAMPLE))
    bare.write_text(MY_LAYER.format(mistake="", example=""))
    r = run_gradcheck(good)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "forward/backward" in r.stdout and "backward is called as backward(dout, *inputs)" in r.stdout
    assert [line.split()[0] for line in r.stdout.splitlines()[3:5]] == ["x", "weight"]
    r = run_gradcheck(bad)
    assert r.returncode == 1 and r.stdout.rstrip().endswith("FAILED")
    (x_line,) = [line for line in r.stdout.splitlines() if line.split()[:1] == ["x"]]
    assert "WRONG" in x_line and "off by a constant factor: backward is 2 times" in x_line
    r = run_gradcheck(bare)
    assert r.returncode == 2 and "no example_inputs()" in r.stderr and "--shape" in r.stderr
    r = run_gradcheck(bare, "--shape", "2,5,8", "--shape", "8")
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_command_line_reads_a_reference_pair_and_a_cache_pair(tmp_path):
    """A file with only reference_forward/backward is checked as such; with both pairs,
    --reference picks the plain one."""
    ref = tmp_path / "ref.py"
    ref.write_text(MY_LAYER.format(mistake="", example=EXAMPLE).replace("def forward(", "def reference_forward(")
                   .replace("def backward(", "def reference_backward("))
    r = run_gradcheck(ref)
    assert r.returncode == 0 and "reference_forward/reference_backward" in r.stdout.splitlines()[0], r.stdout
    both = tmp_path / "both.py"
    both.write_text(ref.read_text() + CACHE_PAIR)
    r = run_gradcheck(both)
    assert r.returncode == 1 and "backward is called as backward(dout, cache)" in r.stdout
    assert "off by a constant factor: backward is 3 times" in r.stdout
    r = run_gradcheck(both, "--reference")
    assert r.returncode == 0 and "backward(dout, *inputs)" in r.stdout, r.stdout


CACHE_PAIR = """
def forward(x, weight):
    out = np.tanh(x) * weight
    return out, (x, weight)

def backward(dout, cache):
    x, weight = cache
    return dout * weight * (1 - np.tanh(x) ** 2), (dout * np.tanh(x)).sum(axis=(0, 1)) * 3
"""


def test_the_command_line_refuses_an_unknown_layer():
    r = run_gradcheck("layernrom")
    assert r.returncode == 2 and "neither a layer" in r.stderr


# ---- every command docs/backprop.md shows runs on the base install --------------------------


def backprop_md_commands():
    """The commands of docs/backprop.md: its bash blocks' lines and its inline `Check:` ones."""
    import re

    text = (ROOT / "docs" / "backprop.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        commands += [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]
    commands += re.findall(r"Check: `([^`]+)`", text)
    return commands


def test_every_backprop_md_command_runs_without_torch(tmp_path, capsys):
    """As a reader runs them, LAYER, the learner's file and the exercise folder filled in.
    The pytest ones run with PyTorch hidden (an import of it fails, as on the base
    install); the package's own commands run in this process, since the package never
    imports torch (tests/test_structure.py)."""
    from nanogpt_np import exercises

    hidden = tmp_path / "hide_torch" / "torch"
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text("raise ImportError('PyTorch is hidden: the base install has none')\n")
    mine = tmp_path / "mylayer.py"
    mine.write_text(MY_LAYER.format(mistake="", example=EXAMPLE))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(hidden.parent), str(ROOT)]))
    commands = backprop_md_commands()
    assert "python3 -m nanogpt_np.exercises start myexercises" in commands and len(commands) >= 12
    for command in commands:
        words = (command.replace("LAYER", "layernorm").replace("path/to/mylayer.py", str(mine))
                 .replace("myexercises", str(tmp_path / "ex"))).split()
        assert words[:2] == ["python3", "-m"], command
        if words[2] == "pytest":
            r = subprocess.run([sys.executable, *words[1:]], capture_output=True, text=True, cwd=ROOT, env=env,
                               timeout=300)
            assert r.returncode == 0 and " passed" in r.stdout, command + r.stdout[-2000:]
            continue
        main = {"nanogpt_np.gradcheck": gradcheck.main, "nanogpt_np.exercises": exercises.main}[words[2]]
        code = main(words[3:])
        out = capsys.readouterr().out
        if words[3] == "check":  # a fresh exercise folder: nothing written yet
            assert code == 1 and "not written" in out, command + out
        else:
            assert code == 0, command + out


def test_a_missing_one_hot_and_a_missing_softmax_row_term_are_caught_at_realistic_sizes():
    """Mistakes whose error is spread thin (one element per row of 391, or a row sum):
    a random direction measured against |g| / sqrt(n) sees them at full size."""
    from nanogpt_np.layers import attention, cross_entropy

    rng = np.random.default_rng(4)
    logits, targets = rng.standard_normal((4, 64, 391)) * 3, rng.integers(0, 391, (4, 64))

    def without_the_one_hot(dloss, logits):
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        return dloss * p / p.sum(axis=-1, keepdims=True) / (4 * 64)

    (row,) = gradcheck.measure(lambda logits: cross_entropy.reference_forward(logits, targets),
                               without_the_one_hot, logits)
    assert row.error > 1e-2

    def without_the_row_term(dy, qkv):  # ds = p * dp: the softmax's -p p^T part dropped
        q, k, v = attention._split_heads(qkv, 2)
        s = q @ k.swapaxes(-1, -2) / np.sqrt(q.shape[-1]) + np.triu(np.full((64, 64), -np.inf), 1)
        p = np.exp(s - s.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        dyh = attention._to_heads(dy, 2)
        ds = p * (dyh @ v.swapaxes(-1, -2))
        dq, dk = ds @ k / np.sqrt(q.shape[-1]), ds.swapaxes(-1, -2) @ q / np.sqrt(q.shape[-1])
        return np.concatenate([attention._merge_heads(a) for a in (dq, dk, p.swapaxes(-1, -2) @ dyh)], axis=-1)

    qkv = rng.standard_normal((2, 64, 3 * 64))
    (row,) = gradcheck.measure(lambda qkv: attention.reference_forward(qkv, 2), without_the_row_term, qkv)
    assert row.error > 1e-2
    (row,) = gradcheck.measure(lambda qkv: attention.reference_forward(qkv, 2),
                               lambda dy, qkv: attention.reference_backward(dy, qkv, 2), qkv)
    assert row.error < 1e-6


def test_the_readme_names_the_extra_its_gradient_checks_need():
    readme = (ROOT / "README.md").read_text()
    section = " ".join(readme.split("## The gradient checks", 1)[1].split("\n## ", 1)[0].split())
    assert "python3 -m pytest -q tests/layers" in section
    assert "need the test extra (`python3 -m pip install -e '.[test]'`)" in section
    assert "the checker needs only the base install" in section
