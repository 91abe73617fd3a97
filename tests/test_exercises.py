"""nanogpt_np.exercises: blank backwards for every layer and the model, and a check that
names each gradient: not written, ok, or wrong with a hint."""
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nanogpt_np import exercises, reference

ROOT = Path(__file__).resolve().parents[1]
LAYERS = list(exercises.LAYERS)


def written(folder):
    """The exercise files with every backward filled in from the references."""
    for layer, module in exercises.LAYERS.items():
        path = folder / f"{layer}.py"
        text = path.read_text()
        answer = inspect.getsource(module.reference_backward).replace("def reference_backward(", "def backward(")
        start, end = text.index("def backward("), text.index("\n\ndef example_inputs(")
        path.write_text(text[:start] + answer + text[end:])
    path = folder / "model.py"
    text = path.read_text()

    def answer(fn):
        return inspect.getsource(fn).replace(".reference_forward(", ".forward(").replace(".reference_backward(",
                                                                                         ".backward(")

    text = text[: text.index("def block_backward(")] + answer(reference.block_backward) + "\n\n" + \
        text[text.index("def forward("): text.index("def backward(")] + answer(reference.backward)
    path.write_text(text)
    return folder


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fresh")
    exercises.start(folder)
    return folder


@pytest.fixture(scope="module")
def answered(tmp_path_factory):
    folder = tmp_path_factory.mktemp("answered")
    exercises.start(folder)
    return written(folder)


def gradient_lines(lines):
    """{gradient: its line's verdict} from check's output."""
    return {line.split()[0]: line.split(None, 1)[1] for line in lines if line.startswith("  ") and
            not line.startswith("  note")}


def test_start_writes_one_file_per_layer_and_the_model(fresh):
    assert sorted(p.name for p in fresh.iterdir()) == sorted(f"{n}.py" for n in exercises.ORDER)
    text = (fresh / "linear.py").read_text()
    # the reference forward, kept; the backward blank, each TODO under the forward line it differentiates
    assert "def forward(x, weight, bias=None):" in text and "out = x @ weight.T" in text
    body = text[text.index("def backward("): text.index("def example_inputs(")]
    assert re.search(r"# forward: out = out \+ bias\n\s+dbias = TODO  # \(OC,\)", body)
    assert re.search(r"# forward: out = x @ weight.T\n\s+dx = TODO.*\n\s+dweight = TODO", body)
    assert "@" not in body.split("# forward:")[1]  # no answer left in the blanks
    model = (fresh / "model.py").read_text()
    assert "your_layers(__file__)" in model and "grads[WTE] = TODO" in model and "linear.backward(" in model


def test_start_keeps_existing_work(fresh):
    with pytest.raises(FileExistsError, match="your work is kept"):
        exercises.start(fresh)


@pytest.mark.parametrize("layer", exercises.ORDER)
def test_a_fresh_exercise_fails_every_gradient_as_not_written(fresh, layer):
    lines, passed = exercises.check(fresh, layer)
    assert not passed and lines[0] == f"{layer}.py"
    verdicts = gradient_lines(lines)
    if layer == "model":  # one line per parameter: the blanks of its layers and its own propagate
        assert len(verdicts) == 28 and set(verdicts.values()) == {"not written"}
        return
    expected = {"linear": ["dx", "dweight", "dbias"], "gelu": ["dx"], "embedding": ["dwte", "dwpe"],
                "cross_entropy": ["dlogits"], "layernorm": ["dx", "dweight", "dbias"], "attention": ["dqkv"]}[layer]
    assert verdicts == {g: "not written" for g in expected}


def test_filled_with_the_references_every_exercise_passes(answered):
    lines, passed = exercises.check(answered)
    assert passed, "\n".join(lines)
    assert lines[-1] == "ok: every gradient is right"
    gradients = [line.split(None, 1) for line in lines if line.startswith("  ")]
    assert len(gradients) == 3 + 1 + 2 + 1 + 3 + 1 + 28 and all(v.startswith("ok ") for _, v in gradients)


# (layer, the reference line, the mistake, the gradient named, words of its verdict)
MISTAKES = [
    ("linear", "dweight = dout2.T @ x2", "dweight = x2.T @ dout2", "dweight",
     "wrong shape: gradient shape (32, 48), but weight has shape (48, 32): a transposed matrix"),
    ("gelu", "dx_direct = dout * 0.5 * (1 + t)", "dx_direct = dout * (1 + t)", "dx", None),  # with the next
    ("gelu", "dt = dout * 0.5 * x", "dt = dout * x", "dx", "hint: off by a constant factor: backward is 2 times"),
    ("embedding", "dwpe[:T] = dpos", "dwpe = dpos", "dwpe",
     "wrong shape: gradient shape (16, 32), but wpe has shape (24, 32): the forward read only a slice of wpe"),
    ("cross_entropy", "dlosses = xp.full(N, dloss / N", "dlosses = xp.full(N, dloss", "dlogits",
     "hint: off by a constant factor: backward is 64 times"),
    ("layernorm", "dbias = dout.sum(axis=rows)", "dbias = dout.sum(axis=0)", "dbias",
     "wrong shape: gradient shape (16, 32), but bias has shape (32,): a missing sum over a broadcast axis"),
    ("attention", "dq = ds @ k / math.sqrt(hs)", "dq = ds @ k", "dqkv",
     "hint: off by a constant factor: backward is 2.828 times the true gradient (on the"),
    ("model", "grads[WTE] = dwte_embedding + dwte_lm_head", "grads[WTE] = dwte_lm_head", "transformer.wte.weight",
     "wrong at element"),
]


@pytest.mark.parametrize("layer", exercises.ORDER)
def test_a_planted_mistake_is_named_with_its_gradient_and_hint(tmp_path, layer):
    exercises.start(tmp_path)
    written(tmp_path)
    path = tmp_path / f"{layer}.py"
    text = path.read_text()
    planted = [m for m in MISTAKES if m[0] == layer]
    for _, right, wrong, _, _ in planted:
        assert right in text
        text = text.replace(right, wrong)
    path.write_text(text)
    lines, passed = exercises.check(tmp_path, layer)
    assert not passed
    verdicts = gradient_lines(lines)
    _, _, _, gradient, words = planted[-1]
    assert words in verdicts[gradient], "\n".join(lines)
    assert re.search(r"wrong (shape|at element \(.*\): backward .* finite differences .* ratio .* relative error)",
                     verdicts[gradient])
    others = [v for g, v in verdicts.items() if g != gradient]
    assert all(v.startswith("ok ") for v in others), "\n".join(lines)  # only the planted gradient is named


def run(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "nanogpt_np.exercises", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_the_command_line_end_to_end(tmp_path):
    folder = tmp_path / "ex"
    r = run("start", folder)
    assert r.returncode == 0 and "wrote 7 exercises" in r.stdout, r.stderr
    r = run("start", folder)
    assert r.returncode == 2 and "--force" in r.stderr
    r = run("check", folder, "linear")
    assert r.returncode == 1 and r.stdout.splitlines()[1:4] == ["  dx      not written", "  dweight not written",
                                                                "  dbias   not written"]
    written(folder)
    r = run("check", folder, "gelu.py")
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "ok: every gradient is right", r.stdout
    r = run("check", folder, "softmax")
    assert r.returncode == 2 and "choose one of linear, gelu" in r.stderr
    r = run("check", tmp_path / "nowhere", "linear")
    assert r.returncode == 2 and "exercises start" in r.stderr


def test_an_exercise_file_is_also_a_gradcheck_file(answered):
    r = subprocess.run([sys.executable, "-m", "nanogpt_np.gradcheck", answered / "layernorm.py"],
                       capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("ok: every gradient within 1e-06"), r.stdout + r.stderr
