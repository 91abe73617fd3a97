"""nanogpt_np.gradcheck: passes the project's layers, catches a broken backward."""
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
    with pytest.raises(AssertionError, match=r"^x: backward gives .* relative error .* > 1e-06"):
        gradcheck.check(layernorm.forward, layernorm_backward_without_the_xhat_term, x, w, b,
                        names=["x", "weight", "bias"])
    rows = gradcheck.measure(layernorm.forward, layernorm_backward_without_the_xhat_term, x, w, b,
                             names=["x", "weight", "bias"])
    errors = {name: err for name, _, _, err in rows}
    assert errors["x"] > 1e-3 and errors["weight"] < 1e-7 and errors["bias"] < 1e-7


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
    assert [line.split()[0] for line in lines[2:5]] == ["x", "weight", "bias"]
    assert lines[-1] == "ok: every gradient within 1e-06"


def test_the_docs_worked_example_runs_as_written(capsys):
    text = (ROOT / "docs" / "backprop.md").read_text()
    block = next(b for b in text.split("```python")[1:] if "rmsnorm_backward" in b).split("```")[0]
    exec(compile(block, "docs/backprop.md", "exec"), {})
    printed = capsys.readouterr().out.strip()
    assert printed in text  # the output the doc shows is the output it gets
