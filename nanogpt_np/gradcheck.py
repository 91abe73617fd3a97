"""Check a hand-written backward against finite differences: for your own layers too.

    from nanogpt_np import gradcheck
    errors = gradcheck.check(forward, backward, x, weight)   # {"input 0": 3e-10, "input 1": ...}

It takes the pair as you wrote it, and says in one line which way it read it:
    forward(*inputs)  -> (out, cache)   or a bare out (as every reference_forward)
    backward(dout, cache)  or  backward(dout, *inputs)
                      -> one gradient per input, in order (a bare array for one input),
                         or one per floating-point input (integer token ids and
                         settings such as n_head have none; None marks one too)

How it checks. It draws a random dout of out's shape and takes the scalar
L(inputs) = sum(forward(*inputs) * dout), whose gradient with respect to each input
is exactly what backward returns. Each input's gradient g is then measured three ways,
each against a fourth-order central difference of L in float64:
  - along a few random unit directions u: <g, u>. In n dimensions a random direction
    sees about |g| / sqrt(n) of the gradient, and of an error e in it |e| / sqrt(n):
    so the difference is taken relative to |g| / sqrt(n) (not to |g|, which would
    divide a wrong term down by sqrt(n)), and estimates |e| / |g| at any size;
  - along g itself: |g|. A wrong scale or a wrong matrix shows here at full size;
  - element by element, at a sample of single elements (at random, at random where g
    is not zero, and where |g| is largest), each relative to the larger of the two
    values, or of a thousandth of the largest gradient element (below that, rounding).
    A wrong term shows here at its own size, and where it is.
The report gives, per input, the worst of these: where it is, both values, their
ratio and the relative error. A correct float64 layer stays near 1e-9 (rounding);
a wrong term is reported at its own relative size, 1e-2 or more for the mistakes
learners make (a dropped term, a constant factor, a transposed matrix), at any size.
A sample cannot promise more: a mistake confined to a handful of elements of a large
input shows only when a direction or a sampled element falls on it.
The forward runs in float64 (inputs are copied, so a layer may overwrite its inputs
or its cache); an output in float32 is flagged, since its rounding (1e-7 relative,
amplified by the differencing) looks like a wrong gradient.

    python -m nanogpt_np.gradcheck layernorm            # one of the project's layers
    python -m nanogpt_np.gradcheck all --reference      # the plain reference functions
    python -m nanogpt_np.gradcheck path/to/mylayer.py   # forward/backward in your own file, on
                                                        # its example_inputs() or --shape 2,5,8 ...
"""
import argparse
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np

DEFAULT_TOL = 1e-6
N_DIRECTIONS = 3  # random directions per input
N_ELEMENTS = 24  # single elements per input: a third at random, a third at random where g is
# not zero (the rows an embedding used), a third where |g| is largest
STEP = 1e-3  # finite-difference step, relative to the input's typical element
FLOOR = 1e-3  # an element is compared relative to at least FLOOR * the largest gradient element


class Row(NamedTuple):
    """One measurement of one input's gradient: backward's value and finite differences'."""
    name: str  # the input
    where: str  # "element (0, 3, 1)", "along the gradient" or "random direction 2"
    analytic: float
    numeric: float
    error: float  # relative

    @property
    def ratio(self):
        """backward / finite differences: 2.0 means twice the true value."""
        return self.analytic / self.numeric if self.numeric else float("inf")


class Finding(NamedTuple):
    """What the check found for one input: status "ok", "wrong", "shape" or "not written"."""
    name: str
    status: str
    worst: Row = None  # the worst measurement, when the gradient could be measured
    hint: str = ""  # what the mistake looks like, where it has a known shape
    worst_element: Row = None  # the worst single element, when it is wrong too

    @property
    def shown(self):
        """The row to show: the worst wrong element (it says where), else the worst row."""
        return self.worst_element or self.worst


class Examination(NamedTuple):
    findings: list  # one Finding per input that has a gradient
    notes: list  # one-line remarks: how the pair was called, float32 output


class NotWritten(Exception):
    """backward has not been written yet (it returned or raised on a TODO)."""


def _copies(inputs):
    return [np.array(a, dtype=np.float64) if _checked(a) else a for a in inputs]


def _checked(a):
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def _is_todo(g):
    return getattr(type(g), "__name__", "") == "Todo"  # exercises.TODO, without importing it


# ---- reading the pair the way it was written --------------------------------------------------


def _takes_inputs(backward):
    """True when backward's signature asks for more than (dout, cache)."""
    try:
        params = inspect.signature(backward).parameters.values()
    except (TypeError, ValueError):
        return False
    required = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(required) > 2 or any(p.kind == p.VAR_POSITIONAL for p in params)


def adapt(forward, backward, inputs):
    """(forward(*inputs) -> (out, cache), backward(dout, cache), one-line note) for a pair
    written either way: forward returning a bare array or (out, cache), backward taking
    (dout, cache) or (dout, *inputs)."""
    result = forward(*_copies(inputs))
    bare = not (isinstance(result, tuple) and len(result) == 2)
    with_inputs = bare or _takes_inputs(backward)
    returns = "a bare output" if bare else "(out, cache)"
    called = "backward(dout, *inputs)" if with_inputs else "backward(dout, cache)"
    note = f"forward returns {returns}; backward is called as {called}"

    def fwd(*values):
        r = forward(*values)
        out, cache = (r, None) if bare else r
        return out, (cache, values)

    def bwd(dout, cache_and_inputs):
        cache, values = cache_and_inputs
        return backward(dout, *values) if with_inputs else backward(dout, cache)

    return fwd, bwd, note


def _match_gradients(grads, inputs, names):
    """backward's result as one entry per input (None where an input has no gradient)."""
    if _is_todo(grads):
        raise NotWritten("backward returned TODO")
    grads = list(grads) if isinstance(grads, (tuple, list)) else [grads]
    if len(grads) == len(inputs):
        return grads
    floats = [i for i, x in enumerate(inputs) if _checked(x)]
    if len(grads) == len(floats):  # one per floating-point input, as the references return
        matched = [None] * len(inputs)
        for i, g in zip(floats, grads):
            matched[i] = g
        return matched
    raise ValueError(f"backward returned {len(grads)} gradient(s) for {len(inputs)} input(s) "
                     f"({', '.join(names)}); return one per input, in order (None for an input without a "
                     f"gradient), or one per floating-point input")


# ---- finite differences -----------------------------------------------------------------------


def _derivative(fwd, base, i, step, dout):
    """d/dt of L(base with input i moved to x + t * step) at t = 0, fourth-order central
    differences. The outputs are subtracted before dout weighs them, so outputs the step
    does not reach cancel exactly instead of adding their rounding."""
    x = base[i]
    h = STEP * max(float(np.sqrt(np.mean(x * x))), 1e-3)  # relative to the input's scale

    def out_at(t):
        values = list(base)
        values[i] = x + t * step
        return np.asarray(fwd(*_copies(values))[0], dtype=np.float64)

    near = out_at(h) - out_at(-h)
    far = out_at(2 * h) - out_at(-2 * h)
    return float(np.sum((8 * near - far) * dout)) / (12 * h)


def _element_indices(g, rng, n_elements):
    """Flat indices to check one by one: all of a small input, else a third at random, a
    third at random among the elements where g is not zero (an embedding's gradient is
    zero on every row no token used: a mistake hides in the used rows) and a third where
    |g| is largest (a wrong term shows where the gradient is)."""
    if g.size <= n_elements:
        return np.arange(g.size)
    k = n_elements // 3
    flat = np.abs(g).reshape(-1)
    random = rng.choice(g.size, k, replace=False)
    nonzero = np.flatnonzero(flat)
    used = rng.choice(nonzero, min(k, nonzero.size), replace=False)
    largest = np.argsort(flat)[::-1][: n_elements - 2 * k]
    return np.unique(np.concatenate([random, used, largest]))


def _measure_one(fwd, base, i, g, dout, name, rng, n_dirs, n_elements):
    """[Row] for input i: random directions, the gradient's direction, single elements."""
    x = base[i]
    n = x.size
    gnorm = float(np.linalg.norm(g))
    rows = []
    for k in range(n_dirs):
        u = rng.standard_normal(x.shape)
        u /= np.linalg.norm(u)
        numeric = _derivative(fwd, base, i, u * np.sqrt(n), dout) / float(np.sqrt(n))  # elements of size ~1
        analytic = float(np.sum(g * u))
        # relative to |g| / sqrt(n), the size <g, u> has for a random unit u: so the error
        # estimates |g - true gradient| / |g| instead of a 1/sqrt(n) share of it
        error = abs(numeric - analytic) / max(abs(numeric), abs(analytic), gnorm / np.sqrt(n), 1e-300)
        rows.append(Row(name, f"random direction {k + 1}", analytic, numeric, error))
    if gnorm > 0:
        u = g / gnorm
        numeric = _derivative(fwd, base, i, u * np.sqrt(n), dout) / float(np.sqrt(n))
        error = abs(numeric - gnorm) / max(abs(numeric), gnorm)
        rows.append(Row(name, "along the gradient", gnorm, numeric, error))
    elements = []
    for flat in _element_indices(g, rng, n_elements):
        step = np.zeros(x.shape)
        step.flat[flat] = 1.0
        elements.append((flat, float(g.flat[flat]), _derivative(fwd, base, i, step, dout)))
    floor = FLOOR * max(float(np.abs(g).max(initial=0.0)), max(abs(e[2]) for e in elements), 1e-300)
    checked = []
    for flat, analytic, numeric in elements:
        error = abs(numeric - analytic) / max(abs(numeric), abs(analytic), floor)
        index = tuple(int(j) for j in np.unravel_index(flat, x.shape))
        rows.append(Row(name, f"element {index}", analytic, numeric, error))
        checked.append((flat, analytic, numeric, error))
    return rows, checked


# ---- what the mistake looks like ----------------------------------------------------------------


def shape_hint(name, gshape, xshape):
    """A sentence on a gradient of the wrong shape: transposed, a missing sum, a slice."""
    gshape, xshape = tuple(gshape), tuple(xshape)
    said = f"gradient shape {gshape}, but {name} has shape {xshape}"
    if len(xshape) == 2 and gshape == xshape[::-1]:
        return f"{said}: a transposed matrix (swap the factors of the product, or transpose it)"
    extra = len(gshape) - len(xshape)
    if extra > 0:
        lead = tuple(range(extra))
        axes = f"axis {lead[0]}" if extra == 1 else f"axes {lead}"
        if gshape[extra:] == xshape:
            return (f"{said}: a missing sum over a broadcast axis: {name} was broadcast over {axes} of this "
                    f"gradient, so {name}'s gradient is its sum over {axes}")
        return (f"{said}: a missing sum over a broadcast axis: the gradient has more axes than {name}; "
                f"sum over the axes the forward broadcast it over")
    if extra == 0 and all(g == x or x == 1 for g, x in zip(gshape, xshape)):
        axes = tuple(k for k, (g, x) in enumerate(zip(gshape, xshape)) if g != x)
        return (f"{said}: a missing sum over a broadcast axis: {name} has size 1 along {axes}, so sum "
                f"over {axes} with keepdims=True")
    if extra == 0 and all(g <= x for g, x in zip(gshape, xshape)):
        return (f"{said}: the forward read only a slice of {name}: give the gradient {name}'s full "
                "shape, with the slice's gradient in place and zeros elsewhere")
    return f"{said}: a gradient has the shape of its input"


def value_hint(g, elements, tol):
    """A sentence on wrong values whose pattern is known: a constant factor, a transpose.
    elements: [(flat index, backward, finite differences, relative error)]."""
    wrong = [(a, n) for _, a, n, error in elements if error > tol]
    if not wrong:
        return ""
    if g.ndim == 2 and g.shape[0] == g.shape[1]:
        gt = g.T.reshape(-1)
        if all(abs(gt[flat] - n) <= 1e-6 * max(abs(n), 1e-12) for flat, _, n, _ in elements):
            return "a transposed matrix: backward's value at [i, j] is the true one at [j, i]"
    ratios = [a / n for a, n in wrong if n != 0]
    if len(ratios) == len(wrong) and len(ratios) >= 2 and max(ratios) - min(ratios) <= 1e-3 * abs(ratios[0]):
        r = float(np.median(ratios))
        some = "" if len(wrong) == len(elements) else f" (on the {len(wrong)} of {len(elements)} checked " \
                                                      "elements that are wrong; the rest agree)"
        return (f"off by a constant factor: backward is {r:.4g} times the true gradient{some}: a scale "
                "missing or doubled (a 1/N of a mean, 1/sqrt(hs), a 0.5, a sign)")
    return ""


# ---- the checks -------------------------------------------------------------------------------


def examine(forward, backward, *inputs, names=None, tol=DEFAULT_TOL, n_dirs=N_DIRECTIONS,
            n_elements=N_ELEMENTS, seed=0):
    """Examination(findings, notes): one Finding per input with a gradient (ok, wrong with
    the worst measurement and a hint, a shape mismatch, or not written)."""
    # a stream of its own: dout drawn as default_rng(0) draws a learner's x would equal x,
    # and make x.T @ dout symmetric (a transposed dweight would pass)
    rng = np.random.default_rng((seed, 0x67726164))
    names = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    fwd, bwd, note = adapt(forward, backward, inputs)
    notes = [note]
    base = _copies(inputs)
    out, cache = fwd(*_copies(base))
    if np.asarray(out).dtype.kind == "f" and np.asarray(out).dtype.itemsize < 8:
        notes.append(f"warning: the output is {np.asarray(out).dtype}, so its rounding (1e-7 relative and "
                     "more) swamps the check: compute in float64 (the inputs' dtype) to check a gradient")
    dout = rng.standard_normal(np.shape(out))
    try:
        grads = _match_gradients(bwd(dout if np.ndim(out) else float(dout), cache), base, names)
    except NotWritten:
        return Examination([Finding(names[i], "not written") for i, x in enumerate(base) if _checked(x)], notes)
    findings = [_finding(fwd, base, i, g, dout, names[i], rng, tol, n_dirs, n_elements)
                for i, (x, g) in enumerate(zip(base, grads))
                if _checked(x) and g is not None]  # None: an input without a gradient, as the contract allows
    return Examination(findings, notes)


def _finding(fwd, base, i, g, dout, name, rng, tol, n_dirs, n_elements):
    """The Finding for input i, whose gradient backward gave as g."""
    if _is_todo(g):
        return Finding(name, "not written")
    x = base[i]
    g = np.asarray(g, dtype=np.float64)
    if g.shape != x.shape:
        return Finding(name, "shape", hint=shape_hint(name, g.shape, x.shape))
    rows, elements = _measure_one(fwd, base, i, g, dout, name, rng, n_dirs, n_elements)
    worst = max(rows, key=lambda r: r.error)
    worst_element = max((r for r in rows if r.where.startswith("element")), key=lambda r: r.error)
    if worst.error <= tol:
        return Finding(name, "ok", worst)
    return Finding(name, "wrong", worst, value_hint(g, elements, tol), worst_element if worst_element.error > tol else None)


def measure(forward, backward, *inputs, names=None, n_dirs=N_DIRECTIONS, n_elements=N_ELEMENTS, seed=0):
    """[Row], the worst measurement of each input with a gradient. ValueError for a gradient
    that cannot be measured (wrong shape, None, not written)."""
    exam = examine(forward, backward, *inputs, names=names, n_dirs=n_dirs, n_elements=n_elements, seed=seed)
    rows = []
    for f in exam.findings:
        if f.worst is None:
            raise ValueError(f"{f.name}: {f.hint or f.status}")
        rows.append(f.worst)
    return rows


def place(where):
    """'at element (0, 3)', 'along the gradient', 'along random direction 2'."""
    return f"at {where}" if where.startswith("element") else where if where.startswith("along") else f"along {where}"


def describe(row):
    """One line: where the worst disagreement is, both values, the ratio, the error."""
    return (f"{row.name}: worst {row.where}: backward {row.analytic:.10e}, finite differences "
            f"{row.numeric:.10e}, ratio {row.ratio:.4g}, relative error {row.error:.2e}")


def check(forward, backward, *inputs, names=None, tol=DEFAULT_TOL, n_dirs=N_DIRECTIONS,
          n_elements=N_ELEMENTS, seed=0):
    """{input name: relative error}; AssertionError naming the first input whose gradient
    disagrees with finite differences by more than tol (ValueError for a wrong shape)."""
    exam = examine(forward, backward, *inputs, names=names, tol=tol, n_dirs=n_dirs, n_elements=n_elements,
                   seed=seed)
    for f in exam.findings:
        if f.worst is None:
            raise ValueError(f"{f.name}: {f.hint or f.status}")
        if f.status == "wrong":
            hint = f"; {f.hint}" if f.hint else ""
            raise AssertionError(f"{describe(f.worst)} > {tol:.0e}{hint}")
    return {f.name: float(f.worst.error) for f in exam.findings}


# ---- the project's layers, as the command line checks them ---------------------------------


def layer_cases(rng):
    """{layer: (forward, backward, inputs, names, reference_forward, reference_backward)},
    small float64 shapes: B=2, T=5 (odd, and more than one attention tile of 3)."""
    from .layers import attention, cross_entropy, embedding, gelu, layernorm, linear

    B, T, C, NH, V = 2, 5, 8, 2, 11
    x = rng.standard_normal((B, T, C))
    idx, targets = rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))
    return {
        "embedding": (lambda wte, wpe: embedding.forward(idx, wte, wpe), embedding.backward,
                      [rng.standard_normal((V, C)), rng.standard_normal((7, C))], ["wte", "wpe"],
                      lambda wte, wpe: embedding.reference_forward(idx, wte, wpe),
                      lambda d, wte, wpe: embedding.reference_backward(d, idx, wte, wpe)),
        "linear": (linear.forward, linear.backward,
                   [x, rng.standard_normal((3 * C, C)), rng.standard_normal(3 * C)], ["x", "weight", "bias"],
                   linear.reference_forward, linear.reference_backward),
        "layernorm": (layernorm.forward, layernorm.backward,
                      [x * 2 + 1, rng.standard_normal(C) + 1, rng.standard_normal(C)], ["x", "weight", "bias"],
                      layernorm.reference_forward, layernorm.reference_backward),
        "attention": (lambda qkv: attention.forward(qkv, NH, tile=3), attention.backward,
                      [rng.standard_normal((B, T, 3 * C))], ["qkv"],
                      lambda qkv: attention.reference_forward(qkv, NH),
                      lambda d, qkv: attention.reference_backward(d, qkv, NH)),
        "gelu": (gelu.forward, gelu.backward, [x * 2], ["x"], gelu.reference_forward, gelu.reference_backward),
        "cross_entropy": (lambda logits: cross_entropy.forward(logits, targets), cross_entropy.backward,
                          [rng.standard_normal((B, T, V)) * 3], ["logits"],
                          lambda logits: cross_entropy.reference_forward(logits, targets),
                          lambda d, logits: cross_entropy.reference_backward(d, logits, targets)),
    }


def as_pair(reference_forward, reference_backward):
    """A reference (forward(*inputs) -> out, backward(dout, *inputs)) as the layers' pair
    (forward -> (out, cache), backward(dout, cache)): the cache is the inputs. The checker
    reads a reference pair as it is; this is for code that wants the layers' contract."""
    return (lambda *inputs: (reference_forward(*inputs), inputs),
            lambda dout, inputs: reference_backward(dout, *inputs))


# ---- a learner's own file -------------------------------------------------------------------


def load_file(path, module_name=None):
    """The module in a .py file, loaded by path (its folder need not be a package; while it
    loads, its folder is on sys.path, so it may import the files beside it)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file; give the path of a .py file defining forward and backward")
    name = module_name or f"gradcheck_user_{abs(hash(str(path.resolve())))}_{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    folder = str(path.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


def file_pair(module, reference=False):
    """(forward, backward, which) from a module: forward/backward, or the reference pair
    (when asked, or when the module has only that)."""
    pairs = [("reference_forward", "reference_backward"), ("forward", "backward")]
    if not reference:
        pairs.reverse()
    for f, b in pairs:
        if callable(getattr(module, f, None)) and callable(getattr(module, b, None)):
            return getattr(module, f), getattr(module, b), f"{f}/{b}"
    raise ValueError(f"{module.__file__}: defines neither forward/backward nor reference_forward/"
                     "reference_backward; define the pair to check")


def input_names(forward, n):
    """The forward's first n parameter names, as the inputs' names."""
    try:
        params = [p.name for p in inspect.signature(forward).parameters.values()
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        params = []
    return params[:n] if len(params) >= n else [f"input {i}" for i in range(n)]


def file_inputs(module, shapes, seed=0):
    """The inputs to check a file's pair on: --shape flags (float64 normals), else its example_inputs()."""
    if shapes:
        rng = np.random.default_rng(seed)
        return [rng.standard_normal(s) for s in shapes]
    if not callable(getattr(module, "example_inputs", None)):
        raise ValueError(f"{module.__file__}: no example_inputs(); define example_inputs() returning the "
                         "forward's arguments, or give one --shape per input (e.g. --shape 2,5,8 --shape 8)")
    return list(module.example_inputs())


def _shape(text):
    try:
        shape = tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give sizes separated by commas, e.g. 2,5,8")
    if not shape or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--shape {text!r}: give positive sizes separated by commas, e.g. 2,5,8")
    return shape


def print_table(title, exam, shapes, tol):
    """The table of the command line; returns True when every gradient is within tol."""
    print(title)
    for note in exam.notes:
        print(f"  {note}")
    print(f"  {'input':8} {'shape':14} {'worst at':24} {'backward':>18} {'finite diff.':>18} {'ratio':>8} "
          f"{'rel. error':>10}")
    passed = True
    for f in exam.findings:
        shape = str(shapes[f.name])
        if f.worst is None:
            passed = False
            print(f"  {f.name:8} {shape:14} {f.status.upper()}: {f.hint or f.status}")
            continue
        r = f.worst
        mark = "" if f.status == "ok" else f"  > {tol:g}: WRONG" + (f"; {f.hint}" if f.hint else "")
        passed &= f.status == "ok"
        print(f"  {r.name:8} {shape:14} {r.where:24} {r.analytic:18.10e} {r.numeric:18.10e} {r.ratio:8.4g} "
              f"{r.error:10.1e}{mark}")
    return passed


def main(argv=None):
    layers = list(layer_cases(np.random.default_rng(0)))
    p = argparse.ArgumentParser(description="Check a layer's backward against float64 finite differences.")
    p.add_argument("layer", help=f"one of {', '.join(layers)}, all, or the path of your own .py file")
    p.add_argument("--reference", action="store_true", help="check reference_forward/backward instead of the fast pair")
    p.add_argument("--shape", type=_shape, action="append", default=[],
                   help="for a file: one per input, the shape of a float64 input (instead of example_inputs())")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL)
    args = p.parse_args(argv)
    what = (f"{N_DIRECTIONS} random directions, the gradient's direction, up to {N_ELEMENTS} single elements "
            "per input; the worst shown")
    if args.layer.endswith(".py") or Path(args.layer).is_file():
        try:
            module = load_file(args.layer)
            fwd, bwd, which = file_pair(module, args.reference)
            inputs = file_inputs(module, args.shape)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        names = input_names(fwd, len(inputs))
        exam = examine(fwd, bwd, *inputs, names=names, tol=args.tol)
        shapes = {n: np.shape(x) for n, x in zip(names, inputs)}
        passed = print_table(f"{args.layer}: {which}, float64; {what}", exam, shapes, args.tol)
    elif args.layer in layers + ["all"]:
        passed = True
        for layer in layers if args.layer == "all" else [args.layer]:
            fwd, bwd, inputs, names, ref_fwd, ref_bwd = layer_cases(np.random.default_rng(0))[layer]
            if args.reference:
                fwd, bwd = ref_fwd, ref_bwd
            which = "reference_forward/reference_backward" if args.reference else "forward/backward"
            exam = examine(fwd, bwd, *inputs, names=names, tol=args.tol)
            shapes = {n: np.shape(x) for n, x in zip(names, inputs)}
            passed &= print_table(f"{layer}: {which}, float64; {what}", exam, shapes, args.tol)
    else:
        p.error(f"{args.layer!r} is neither a layer ({', '.join(layers)}, all) nor a .py file")
    print(f"ok: every gradient within {args.tol:g}" if passed else "FAILED")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
