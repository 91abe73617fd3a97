"""gpucheck/recipe.py's batches: build-nanogpt's DataLoaderLite over the prepared text
(the whole row runs in test_gpu_check.py's dry run)."""
import numpy as np
import pytest

from nanogpt_np.gpucheck.recipe import text_batches


def test_text_batches_are_consecutive_windows_that_wrap():
    stream = np.arange(23)
    batches = text_batches(stream, 2, 3, 5)  # 6 tokens a batch, 7 read: 3 batches fit in 23 tokens
    starts = [int(x[0, 0]) for x, _ in batches]
    assert starts == [0, 6, 12, 0, 6]
    for x, y in batches:
        assert x.shape == y.shape == (2, 3)
        np.testing.assert_array_equal(x.reshape(-1) + 1, y.reshape(-1))  # targets: the next token
        np.testing.assert_array_equal(np.diff(x.reshape(-1)), 1)  # the rows follow each other


def test_text_batches_reject_a_text_shorter_than_one_batch():
    with pytest.raises(ValueError, match="needs 7"):
        text_batches(np.arange(6), 2, 3, 1)
