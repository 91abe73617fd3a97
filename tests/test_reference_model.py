"""nanogpt_np/reference.py, the model as a lesson, equals GPT's fast forward and backward."""
import numpy as np
import pytest

from nanogpt_np import GPT, reference
from tests.helpers import assert_same_as_reference
from tests.test_model import CONFIGS, batch


@pytest.mark.parametrize("cfg,B,T", CONFIGS)
def test_reference_model_equals_gpt_in_float64(cfg, B, T):
    model = GPT(cfg, dtype=np.float64, seed=1)
    idx, targets = batch(cfg, B, T)
    logits_ref, loss_ref, acts = reference.forward(model.params, idx, targets, cfg.n_layer, cfg.n_head)
    grads_ref = reference.backward(model.params, acts, cfg.n_layer, cfg.n_head)

    model.zero_grad()
    logits, loss = model.forward(idx, targets)
    assert_same_as_reference(logits.copy(), logits_ref, "logits")
    assert abs(loss - float(loss_ref)) <= 1e-12 * abs(loss)
    grads = model.backward()
    assert sorted(grads_ref) == sorted(grads)
    for name in grads:
        assert_same_as_reference(grads[name], grads_ref[name], name, tol=1e-10)


def test_the_tied_weight_gets_both_contributions():
    """Drop the embedding's share of wte's gradient and the reference no longer
    matches the model: the test above can fail where the lesson says it matters."""
    cfg, B, T = CONFIGS[0]
    model = GPT(cfg, dtype=np.float64, seed=1)
    idx, targets = batch(cfg, B, T)
    _, _, acts = reference.forward(model.params, idx, targets, cfg.n_layer, cfg.n_head)
    grads_ref = reference.backward(model.params, acts, cfg.n_layer, cfg.n_head)
    model.zero_grad()
    model.forward(idx, targets)
    grads = model.backward()
    lm_head_only = reference.linear.reference_backward(
        reference.cross_entropy.reference_backward(1.0, acts["logits"], targets), acts["xf"],
        model.params[reference.WTE])[1]
    with pytest.raises(AssertionError):
        assert_same_as_reference(grads[reference.WTE], lm_head_only, "wte without the embedding's share")
    assert_same_as_reference(grads[reference.WTE], grads_ref[reference.WTE], "wte", tol=1e-10)
