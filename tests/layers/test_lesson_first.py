"""Each layer file reads as a lesson from the top: the docstring says what the layer
computes and derives its backward, reference_forward / reference_backward come next,
and notes on speed come only after the line that introduces the fast pair."""
import ast
import inspect

import pytest

from nanogpt_np import layers

FAST_LINE = "# ---- the same arithmetic, scheduled for speed"
SPEED_WORDS = ["BLAS", "faster than", "%", "cache-sized", "L2", "threads", "CHUNK", "TILE", "kernels/"]


@pytest.mark.parametrize("name", layers.__all__)
def test_the_lesson_comes_first(name):
    module = getattr(layers, name)
    source = inspect.getsource(module)
    doc = module.__doc__
    assert "Derivation" in doc and "reference_forward" in doc
    assert not [w for w in SPEED_WORDS if w in doc], "speed notes belong below the fast pair's line"
    lesson, fast = source.split(FAST_LINE)
    code = [line for line in lesson.split('"""', 2)[2].splitlines() if not line.startswith(("from ", "import "))]
    assert not [w for w in SPEED_WORDS if w in "\n".join(code)], "speed notes before the fast pair"
    defs = [node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    assert defs.index("reference_forward") < defs.index("reference_backward") < defs.index("forward")
    assert "def reference_" not in fast and "def forward(" not in lesson


def test_attention_states_the_softmax_jacobian_and_the_max():
    doc = layers.attention.__doc__
    jacobian, collapsed = doc.index("diag(p) - p p^T"), doc.index("dS[i, j] = P[i, j] * (dP[i, j] - D[i])")
    assert jacobian < collapsed and "The row max gets no gradient" in doc
    backward = inspect.getsource(layers.attention.reference_backward)
    assert "# forward: e = xp.exp(s - s.max(axis=-1, keepdims=True))" in backward
    assert "The max gets no gradient" in backward


def test_embedding_says_the_ids_get_no_gradient():
    doc = layers.embedding.__doc__
    assert "There is no gradient for idx" in doc and "There is no dx" not in doc
