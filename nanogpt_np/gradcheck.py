"""Check a hand-written backward against finite differences: for your own layers too.

    from nanogpt_np import gradcheck
    errors = gradcheck.check(forward, backward, x, weight)   # {"input 0": 3e-10, "input 1": ...}

The contract is the layers' own:
    forward(*inputs)        -> (out, cache)
    backward(dout, cache)   -> one gradient per input, in order (a bare array when
                               there is one input; None for an input with no
                               gradient, such as integer token ids)

How it checks. It draws a random dout of out's shape and takes the scalar
L(inputs) = sum(forward(*inputs)[0] * dout), whose gradient with respect to each
input is exactly what backward(dout, cache) returns. Along a few random unit
directions u it compares the analytic directional derivative <grad, u> with the
central difference (L(x + eps u) - L(x - eps u)) / (2 eps), in float64; the error
is relative to the larger of the two and of |grad|. A wrong
term in a backward shows up along almost every direction; rounding stays around
1e-9 relative. Each forward gets fresh copies of the inputs, so a layer may
overwrite its inputs or cache (cross_entropy's backward reuses the logits buffer).

    python -m nanogpt_np.gradcheck layernorm            # one of the project's layers
    python -m nanogpt_np.gradcheck all --reference      # the plain reference functions
"""
import argparse
import sys

import numpy as np

DEFAULT_TOL = 1e-6


def _copies(inputs):
    return [np.array(a, dtype=np.float64) if _checked(a) else a for a in inputs]


def _checked(a):
    return isinstance(a, np.ndarray) and a.dtype.kind == "f"


def _as_tuple(grads, n):
    grads = grads if isinstance(grads, (tuple, list)) else (grads,)
    if len(grads) != n:
        raise ValueError(f"backward returned {len(grads)} gradient(s) for {n} input(s); return one per "
                         "input, in order (None for an input without a gradient)")
    return tuple(grads)


def measure(forward, backward, *inputs, names=None, n_dirs=3, eps=1e-6, seed=0):
    """[(name, analytic, numeric, relative error)], one row per input with a
    gradient, each the direction (of n_dirs) with the largest error."""
    rng = np.random.default_rng(seed)
    names = list(names) if names is not None else [f"input {i}" for i in range(len(inputs))]
    base = _copies(inputs)
    out, cache = forward(*_copies(base))
    dout = rng.standard_normal(np.shape(out))

    def objective(values):
        return float(np.sum(np.asarray(forward(*_copies(values))[0], dtype=np.float64) * dout))

    grads = _as_tuple(backward(dout if np.ndim(out) else float(dout), cache), len(inputs))
    rows = []
    for i, (x, g) in enumerate(zip(base, grads)):
        if g is None or not _checked(x):
            continue
        g = np.asarray(g, dtype=np.float64)
        if g.shape != x.shape:
            raise ValueError(f"{names[i]}: gradient shape {g.shape}, but the input has shape {x.shape}")
        worst = None
        for _ in range(n_dirs):
            u = rng.standard_normal(x.shape)
            u /= np.linalg.norm(u)
            plus, minus = list(base), list(base)
            plus[i], minus[i] = x + eps * u, x - eps * u
            numeric = (objective(plus) - objective(minus)) / (2 * eps)
            analytic = float(np.sum(g * u))
            # relative to the gradient's size too: a direction nearly orthogonal to g
            # has a tiny derivative whose last digits are all rounding
            error = abs(numeric - analytic) / max(abs(numeric), abs(analytic), float(np.linalg.norm(g)), 1e-12)
            if worst is None or error > worst[3]:
                worst = (names[i], analytic, numeric, error)
        rows.append(worst)
    return rows


def check(forward, backward, *inputs, names=None, tol=DEFAULT_TOL, n_dirs=3, eps=1e-6, seed=0):
    """{input name: relative error}; AssertionError naming the first input whose
    gradient disagrees with finite differences by more than tol."""
    rows = measure(forward, backward, *inputs, names=names, n_dirs=n_dirs, eps=eps, seed=seed)
    for name, analytic, numeric, error in rows:
        if error > tol:
            raise AssertionError(f"{name}: backward gives {analytic:.10e} along a random direction, finite "
                                 f"differences {numeric:.10e}: relative error {error:.2e} > {tol:.0e}")
    return {name: error for name, _, _, error in rows}


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
    """A reference (forward(*inputs) -> out, backward(dout, *inputs)) as the checker's
    (forward -> (out, cache), backward(dout, cache)): the cache is the inputs."""
    return (lambda *inputs: (reference_forward(*inputs), inputs),
            lambda dout, inputs: reference_backward(dout, *inputs))


def main(argv=None):
    names = list(layer_cases(np.random.default_rng(0)))
    p = argparse.ArgumentParser(description="Check a layer's backward against float64 finite differences.")
    p.add_argument("layer", choices=names + ["all"])
    p.add_argument("--reference", action="store_true", help="check reference_forward/backward instead of the fast pair")
    p.add_argument("--tol", type=float, default=DEFAULT_TOL)
    args = p.parse_args(argv)
    failed = False
    for layer in names if args.layer == "all" else [args.layer]:
        fwd, bwd, inputs, input_names, ref_fwd, ref_bwd = layer_cases(np.random.default_rng(0))[layer]
        if args.reference:
            fwd, bwd = as_pair(ref_fwd, ref_bwd)
        which = "reference_forward/reference_backward" if args.reference else "forward/backward"
        print(f"{layer}: {which}, float64, 3 random directions, eps 1e-6")
        print(f"  {'input':8} {'shape':12} {'backward <g,u>':>18} {'finite diff.':>18} {'rel. error':>10}")
        for (name, analytic, numeric, error), x in zip(measure(fwd, bwd, *inputs, names=input_names), inputs):
            mark = "" if error <= args.tol else f"  > {args.tol:g}: WRONG"
            failed |= error > args.tol
            print(f"  {name:8} {str(x.shape):12} {analytic:18.10e} {numeric:18.10e} {error:10.1e}{mark}")
    print("FAILED" if failed else f"ok: every gradient within {args.tol:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
