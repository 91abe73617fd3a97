"""Exercises: write every GPT-2 backward yourself, and be told exactly what is wrong.

    python -m nanogpt_np.exercises start DIR           # one file per layer, and the whole model
    python -m nanogpt_np.exercises check DIR [LAYER]   # one line per gradient: ok, not written, or wrong

`start` writes, for each layer, a file whose forward is the layer's reference_forward
(nanogpt_np/layers/<layer>.py) and whose backward keeps the recomputed values but has a
TODO for every gradient, under a comment quoting the forward line it differentiates.
model.py assembles the whole GPT-2 from your layer files; its TODOs are what the model
adds to its layers: the residual sums and the tied weight. Suggested order: linear,
gelu, embedding, cross_entropy, layernorm, attention, then model.

`check` runs nanogpt_np.gradcheck on your backward, on inputs of its own (float64,
shapes large enough that a wrong term cannot hide), and prints per gradient `ok`,
`not written`, or `wrong` with the worst element, backward's value and the finite
difference, their ratio, and a hint where the mistake has a known shape (a wrong shape,
a missing sum over a broadcast axis, a constant factor, a transposed matrix).
"""
import argparse
import ast
import inspect
import os
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

from . import gradcheck, reference
from .config import GPTConfig, parameter_shapes
from .layers import attention, cross_entropy, embedding, gelu, layernorm, linear

LAYERS = {"linear": linear, "gelu": gelu, "embedding": embedding, "cross_entropy": cross_entropy,
          "layernorm": layernorm, "attention": attention}  # in the suggested order
ORDER = list(LAYERS) + ["model"]


class NotWritten(gradcheck.NotWritten):
    """A TODO was used where a number was needed."""


class Todo:
    """The blank you replace. Arithmetic on it gives TODO again, so a gradient computed
    from an unwritten one is reported as not written, not as an error."""

    __array_priority__ = 1e6

    def __repr__(self):
        return "TODO"

    def _same(self, *args, **kwargs):
        return self

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _same
    __matmul__ = __rmatmul__ = __pow__ = __rpow__ = __neg__ = __pos__ = __getitem__ = __call__ = _same
    __iadd__ = __isub__ = __imul__ = __itruediv__ = _same

    def __array_ufunc__(self, ufunc, method, *args, **kwargs):
        return self

    def __array_function__(self, func, types, args, kwargs):
        return self

    def __getattr__(self, name):  # .T, .sum(...), .reshape(...), .swapaxes(...)
        if name.startswith("__"):
            raise AttributeError(name)
        return self

    def __setitem__(self, key, value):
        pass

    def _refuse(self, *args):
        raise NotWritten("a TODO was used as a number")

    __float__ = __int__ = __index__ = __bool__ = __iter__ = __len__ = _refuse


TODO = Todo()


# ---- the inputs each exercise is checked on -------------------------------------------------


def layer_inputs(layer, rng):
    """The forward's arguments for a layer's check, float64: big enough that every
    gradient has many elements, small enough to check in a second."""
    B, T, C, NH, V = 4, 16, 32, 4, 50
    x = rng.standard_normal((B, T, C))
    return {
        "linear": lambda: [x, rng.standard_normal((48, C)), rng.standard_normal(48)],
        "gelu": lambda: [2 * rng.standard_normal((B, T, 2 * C))],
        "embedding": lambda: [rng.integers(0, V, (B, T)), rng.standard_normal((V, C)), rng.standard_normal((24, C))],
        "cross_entropy": lambda: [3 * rng.standard_normal((B, T, V)), rng.integers(0, V, (B, T))],
        "layernorm": lambda: [2 * x + rng.standard_normal((B, T, 1)), rng.standard_normal(C) + 1,
                              rng.standard_normal(C)],
        "attention": lambda: [rng.standard_normal((2, T, 3 * C)), NH],
    }[layer]()


MODEL_CONFIG = GPTConfig(block_size=16, vocab_size=37, n_layer=2, n_head=2, n_embd=16)


def model_inputs(rng, cfg=MODEL_CONFIG, B=2, T=7):
    """(params, idx, targets) for the model exercise: small, random LayerNorm weights too."""
    params = {name: rng.standard_normal(shape) * (0.5 if len(shape) > 1 else 1.0)
              for name, shape in parameter_shapes(cfg)}
    return params, rng.integers(0, cfg.vocab_size, (B, T)), rng.integers(0, cfg.vocab_size, (B, T))


# ---- writing the exercise files -------------------------------------------------------------


def _shape_comment(line):
    """A line's trailing shape comment, such as `  # (B, T, C)`, or ''."""
    m = re.search(r"#\s*(\([^()]*\))", line)
    return f"  # {m.group(1)}" if m else ""


def _forward_comment(line):
    """`# forward: <line>`, without the explanation that follows it (that is the answer)."""
    return re.sub(r"\s{2,}\(.*$", "", line.rstrip())


def _is_gradient(target):
    if isinstance(target, ast.Name):
        return target.id.startswith("d") or target.id == "_"
    if isinstance(target, ast.Subscript):  # grads[name], in the model
        return isinstance(target.value, ast.Name) and target.value.id == "grads"
    return isinstance(target, ast.Tuple) and all(_is_gradient(t) for t in target.elts)


def _calls_a_backward(value):
    """linear.reference_backward(...) or block_backward(...): the model's calls, given."""
    if not isinstance(value, ast.Call):
        return False
    name = value.func.attr if isinstance(value.func, ast.Attribute) else getattr(value.func, "id", "")
    return name.endswith("backward")


def _blanked(node, lines, indent, written):
    """The TODO line(s) for one statement of a backward, or [] to drop it."""
    text = [lines[k] for k in range(node.lineno - 1, node.end_lineno)]
    if isinstance(node, ast.Return):
        simple = isinstance(node.value, (ast.Name, ast.Tuple)) or (
            isinstance(node.value, ast.Call) and isinstance(node.value.func, ast.Attribute)
            and isinstance(node.value.func.value, ast.Name))
        return text if simple else [f"{indent}return TODO{_shape_comment(text[0])}"]
    if isinstance(node, ast.For):
        return text  # the model's loop over its blocks: given
    if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and _is_gradient(node.targets[0])):
        return []  # in-place updates, scatters and helper values are part of the answer
    if _calls_a_backward(node.value):
        return text  # the model's call into one of your layers: given
    target = node.targets[0]
    name = ", ".join(ast.unparse(t) for t in target.elts) if isinstance(target, ast.Tuple) else ast.unparse(target)
    if name in written:
        return []
    written.add(name)
    n = len(target.elts) if isinstance(target, ast.Tuple) else 1
    return [f"{indent}{name} = {', '.join(['TODO'] * n)}{_shape_comment(text[-1])}"]


def backward_skeleton(function, new_name="backward"):
    """A reference backward's source with each gradient replaced by TODO: the signature,
    docstring and recomputed forward values kept, then each `# forward:` comment and the
    gradients computed under it, blank."""
    source = inspect.getsource(function)
    lines = source.split("\n")
    func = ast.parse(source).body[0]
    body = func.body
    out = lines[: body[0].lineno - 1]
    out[0] = out[0].replace(f"def {function.__name__}(", f"def {new_name}(", 1)
    start = 0
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):  # the docstring's
        doc = lines[body[0].lineno - 1: body[0].end_lineno]  # its first paragraph: the shapes
        if "" in [d.strip() for d in doc]:  # (the rest of a reference's docstring gives the answer away)
            doc = doc[: [d.strip() for d in doc].index("")]
            doc[-1] = doc[-1].rstrip() + '"""'
        out += doc
        start = 1
    indent = re.match(r"\s*", lines[body[0].lineno - 1]).group(0)
    in_chain, written, previous_end = False, set(), body[start - 1].end_lineno if start else body[0].lineno - 1
    for node in body[start:]:
        for comment in lines[previous_end: node.lineno - 1]:
            stripped = comment.strip()
            if stripped.startswith("# forward:"):
                in_chain, written = True, set()
                out.append(_forward_comment(comment))
            elif not in_chain and stripped:
                out.append(comment)
        previous_end = node.end_lineno
        if in_chain:
            out += _blanked(node, lines, indent, written)
        else:
            out += lines[node.lineno - 1: node.end_lineno]
    return "\n".join(out) + "\n"


def _source(function, new_name=None, model=False):
    text = inspect.getsource(function)
    if new_name:
        text = text.replace(f"def {function.__name__}(", f"def {new_name}(", 1)
    if model:  # the model calls your layers: forward/backward in your files
        text = text.replace(".reference_forward(", ".forward(").replace(".reference_backward(", ".backward(")
    return text


LAYER_HEADER = '''"""Exercise: {title}'s backward.

`forward` is nanogpt_np/layers/{layer}.py's reference_forward. Write `backward`: each
TODO is one gradient, under a comment quoting the forward line it differentiates; work
from the last forward line up. The values computed above the first `# forward:` comment
are the forward's, recomputed for you. Check it:

    python -m nanogpt_np.exercises check {folder} {layer}

Stuck? nanogpt_np/layers/{layer}.py opens with the derivation, and docs/backprop.md
walks through it.
"""
import math  # noqa: F401 (some layers need it)

import numpy as np  # noqa: F401

from nanogpt_np.backend import array_module  # noqa: F401 (numpy here; cupy on a GPU)
from nanogpt_np.exercises import TODO, layer_inputs
'''

EXTRA = {
    "gelu": "from nanogpt_np.layers.gelu import GELU_COEF, SQRT_2_OVER_PI\n",
    "attention": "from nanogpt_np.layers.attention import _merge_heads, _split_heads, _to_heads  # noqa: F401\n",
}

EXAMPLE = '''

def example_inputs():
    """The arguments `check` uses (python -m nanogpt_np.gradcheck on this file uses them too)."""
    return layer_inputs("{layer}", np.random.default_rng(0))
'''


def layer_exercise(layer, folder="DIR"):
    """The text of one layer's exercise file."""
    module = LAYERS[layer]
    title = {"gelu": "GELU", "layernorm": "LayerNorm", "cross_entropy": "cross-entropy"}.get(layer, layer)
    return (LAYER_HEADER.format(title=title, layer=layer, folder=folder) + EXTRA.get(layer, "") + "\n\n"
            + _source(module.reference_forward, "forward") + "\n\n"
            + backward_skeleton(module.reference_backward) + EXAMPLE.format(layer=layer))


MODEL_HEADER = '''"""Exercise: the whole GPT-2 backward, from your layers.

The forward is nanogpt_np/reference.py's, calling the layers in this folder (your
files: their forward and backward). What is left to write is what the model adds to
its layers: a residual `x1 = x + a` hands its gradient to both summands, a value read
twice (x feeds ln_1 and the residual) gets the sum of both gradients, and wte, used by
the embedding and by lm_head, gets both contributions. Finish the layers first:

    python -m nanogpt_np.exercises check {folder} model

nanogpt_np/reference.py is the answer, and docs/backprop.md (stops 7 and 8) the lesson.
"""
from nanogpt_np.config import WPE, WTE  # noqa: F401
from nanogpt_np.exercises import TODO, your_layers

attention, cross_entropy, embedding, gelu, layernorm, linear = your_layers(__file__)  # the files beside this one
'''


def model_exercise(folder="DIR"):
    """The text of the whole-model exercise file."""
    parts = [MODEL_HEADER.format(folder=folder),
             _source(reference.block_forward, model=True),
             backward_skeleton(reference.block_backward, "block_backward").replace(".reference_backward(", ".backward("),
             _source(reference.forward, model=True),
             backward_skeleton(reference.backward).replace(".reference_backward(", ".backward(")]
    return "\n\n".join(parts)


def your_layers(model_file):
    """The six layer modules in the folder of `model_file`, loaded from their files."""
    folder = Path(model_file).resolve().parent
    names = ["attention", "cross_entropy", "embedding", "gelu", "layernorm", "linear"]
    return [gradcheck.load_file(_file(folder, name), f"exercise_{abs(hash(str(folder)))}_{name}") for name in names]


def _file(folder, name):
    path = Path(folder) / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such exercise file; write the exercises first: "
                                f"python -m nanogpt_np.exercises start {folder}")
    return path


def _write_atomic(path, text):
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def start(folder, force=False):
    """Write the exercise files into folder; refuses to overwrite your work unless force."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    texts = {f"{layer}.py": layer_exercise(layer, folder) for layer in LAYERS}
    texts["model.py"] = model_exercise(folder)
    existing = [name for name in texts if (folder / name).exists()]
    if existing and not force:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}: your work is kept. Check it with "
                              f"python -m nanogpt_np.exercises check {folder}, or start over with --force")
    for name, text in texts.items():
        _write_atomic(folder / name, text)
    return [folder / name for name in texts]


# ---- checking them --------------------------------------------------------------------------


def _todo_left(path):
    """True when the file still uses the name TODO (not counting its import)."""
    tree = ast.parse(Path(path).read_text())
    return any(isinstance(n, ast.Name) and n.id == "TODO" and isinstance(n.ctx, ast.Load) for n in ast.walk(tree))


def _model_pair(module):
    """The model as gradcheck's pair over its parameters: forward(*params) -> (loss, acts)."""
    cfg = MODEL_CONFIG
    params, idx, targets = model_inputs(np.random.default_rng(0))
    names = list(params)

    def forward(*values):
        p = dict(zip(names, values))
        _, loss, acts = module.forward(p, idx, targets, cfg.n_layer, cfg.n_head)
        return loss, (p, acts)

    def backward(dloss, cache):
        p, acts = cache
        grads = module.backward(p, acts, cfg.n_layer, cfg.n_head)
        return [grads.get(name, TODO) * dloss for name in names]  # the model's backward is for dloss = 1

    return forward, backward, [params[n] for n in names], names


def check_one(folder, name):
    """(lines, passed) for one exercise file."""
    path = _file(folder, name)
    try:
        module = gradcheck.load_file(path, f"exercise_check_{abs(hash(str(path.resolve())))}_{name}")
        if name == "model":
            forward, backward, inputs, input_names = _model_pair(module)
        else:
            forward, backward = module.forward, module.backward
            inputs = layer_inputs(name, np.random.default_rng(0))
            input_names = gradcheck.input_names(forward, len(inputs))
        exam = gradcheck.examine(forward, backward, *inputs, names=input_names)
    except gradcheck.NotWritten:
        return [f"{path.name}", "  not written: a TODO is used as a number"], False
    except Exception as e:  # the learner's code: say what it raised, in one line
        todo = _todo_left(path) or (name == "model" and any(_todo_left(_file(folder, n)) for n in LAYERS))
        said = f"{type(e).__name__}: {e}".splitlines()[0]
        if todo:
            return [f"{path.name}", f"  not written: TODOs left (running it raised {said})"], False
        hint = "; hint: a gradient of the wrong shape (a missing sum over a broadcast axis?)" \
            if "broadcast" in said else ""
        return [f"{path.name}", f"  error: {said}{hint}"], False
    lines = [f"{path.name}"]
    width = max(len(f.name) for f in exam.findings) + 1
    for f in exam.findings:
        grad = f"d{f.name}" if name != "model" else f.name
        if f.status == "ok":
            lines.append(f"  {grad:{width}} ok (relative error {f.worst.error:.1e})")
        elif f.status == "not written":
            lines.append(f"  {grad:{width}} not written")
        elif f.status == "shape":
            lines.append(f"  {grad:{width}} wrong shape: {f.hint}")
        else:
            r = f.shown
            hint = f"; hint: {f.hint}" if f.hint else ""
            lines.append(f"  {grad:{width}} wrong {gradcheck.place(r.where)}: backward {r.analytic:.6e}, finite differences "
                         f"{r.numeric:.6e}, ratio {r.ratio:.4g}, relative error {r.error:.1e}{hint}")
    lines += [f"  note: {n}" for n in exam.notes if n.startswith("warning")]
    return lines, all(f.status == "ok" for f in exam.findings)


def check(folder, layer=None):
    """(lines, passed) for one exercise or all of them, in the suggested order."""
    if layer is not None:
        layer = layer[:-3] if layer.endswith(".py") else layer
        if layer not in ORDER:
            raise ValueError(f"no exercise {layer!r}: choose one of {', '.join(ORDER)}")
    out, passed = [], True
    for name in [layer] if layer else ORDER:
        lines, ok = check_one(folder, name)
        out += lines
        passed &= ok
    out.append("ok: every gradient is right" if passed else "not yet: see the lines above")
    return out, passed


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m nanogpt_np.exercises",
                                description="Write GPT-2's backward passes yourself, and check them.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="write the exercise files into DIR")
    s.add_argument("dir")
    s.add_argument("--force", action="store_true", help="overwrite exercise files already in DIR")
    c = sub.add_parser("check", help="check the backward passes in DIR")
    c.add_argument("dir")
    c.add_argument("layer", nargs="?", help=f"one of {', '.join(ORDER)} (default: all)")
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            paths = start(args.dir, args.force)
            print(f"wrote {len(paths)} exercises in {args.dir}: {', '.join(x.name for x in paths)}")
            print(f"suggested order: {', '.join(ORDER)}; check one with "
                  f"python -m nanogpt_np.exercises check {args.dir} linear")
            return 0
        lines, passed = check(args.dir, args.layer)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
