"""HellaSwag rendering and scoring, on hand-made examples in the official jsonl format."""
import json

import numpy as np
import pytest

from nanogpt_np import GPT, GPTConfig, hellaswag
from nanogpt_np.tokenizer import get_encoding

ENC = get_encoding()

# Official format: the fields of hellaswag_val.jsonl (ind, activity_label, ctx_a, ctx_b, ctx, ...).
EXAMPLES = [
    {"ind": 24, "activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "ctx": "A man is sitting on a roof. he", "split": "val", "split_type": "indomain", "label": 3,
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."],
     "source_id": "activitynet~v_-JhWjGDPHMY"},
    {"ind": 92, "activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell.",
     "ctx_b": "she", "ctx": "A lady walks to a barbell. she", "split": "val", "split_type": "zeroshot",
     "label": 0, "endings": ["bends down and grabs the pole.", "swings and lands in her arms.",
                             "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "source_id": "activitynet~v_-lJS58hyo1c"},
    {"ind": 106, "activity_label": "Walking", "ctx_a": "Two hikers stop at a fork in the trail.", "ctx_b": "one",
     "ctx": "Two hikers stop at a fork in the trail. one", "split": "val", "split_type": "indomain", "label": 2,
     "endings": ["smiles", "jumps", "walks slowly toward the distant mountain", "sings"],
     "source_id": "wikihow~12345"},
]


def write_jsonl(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples))
    return path


def reference_render(example, enc):
    """build-nanogpt's render_example, restated: context tokens, then the tokens of
    " " + ending for each of the 4 rows, a 0/1 mask over the ending, zero padding."""
    context = enc.encode(example["ctx"])
    token_rows, mask_rows = [], []
    for ending in example["endings"]:
        ending_tokens = enc.encode(" " + ending)
        token_rows.append(context + ending_tokens)
        mask_rows.append([0] * len(context) + [1] * len(ending_tokens))
    width = max(len(r) for r in token_rows)
    tokens = np.zeros((4, width), dtype=np.int64)
    mask = np.zeros((4, width), dtype=np.int64)
    for i in range(4):
        tokens[i, : len(token_rows[i])] = token_rows[i]
        mask[i, : len(mask_rows[i])] = mask_rows[i]
    return tokens, mask, example["label"]


def reference_losses(model, tokens, mask):
    """build-nanogpt's scoring, restated with the full (B, T, V) logits: the loss of
    each next token, kept where the shifted mask is 1, summed and averaged per row."""
    logits = np.asarray(model.forward(tokens)[0], dtype=np.float64)[:, :-1]  # (4, T-1, V)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]  # (4, T-1)
    shifted_mask = mask[:, 1:]
    total = (nll * shifted_mask).sum(1)
    return total, total / shifted_mask.sum(1)


@pytest.mark.parametrize("example", EXAMPLES + [{**EXAMPLES[0], "endings": ["", "x", "a b c d e f", "\u00e9t\u00e9!"]}])
def test_rendering_equals_build_nanogpt(example):
    tokens, mask, label = hellaswag.render_example(example, ENC)
    ref_tokens, ref_mask, ref_label = reference_render(example, ENC)
    assert tokens.dtype == ref_tokens.dtype and mask.dtype == ref_mask.dtype
    np.testing.assert_array_equal(tokens, ref_tokens)
    np.testing.assert_array_equal(mask, ref_mask)
    assert label == ref_label


def unigram_model(boost):
    """A GPT-2-vocab model whose every position predicts one fixed distribution.

    ln_f has weight 0 and bias e_0, so every hidden state is e_0 whatever the
    input, and the logits are wte[:, 0]: p(token) = softmax(wte[:, 0]). The loss
    of an ending is then just sum of -log p over its tokens, known in advance.
    """
    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg, dtype=np.float64, seed=0)
    model.params["transformer.ln_f.weight"][...] = 0
    model.params["transformer.ln_f.bias"][...] = np.eye(4)[0]
    wte = model.params["transformer.wte.weight"]
    wte[:, 0] = 0
    for token, logit in boost.items():
        wte[token, 0] = logit
    logp = wte[:, 0] - np.log(np.exp(wte[:, 0]).sum())
    return model, logp


def ending_tokens(example, i):
    return ENC.encode(" " + example["endings"][i])


@pytest.fixture(scope="module")
def known():
    """Boosts chosen so that: example 0 -> ending 3 (right, both ways); example 1 ->
    ending 3 (wrong, both ways); example 2 -> acc picks the one-token "smiles",
    acc_norm the long likely "walks slowly ..." (right only for acc_norm)."""
    boost = {}
    for t in ending_tokens(EXAMPLES[0], 3) + ending_tokens(EXAMPLES[1], 3):
        boost[t] = 15.0
    for t in ending_tokens(EXAMPLES[2], 2):
        boost[t] = 15.0
    (smiles,) = ending_tokens(EXAMPLES[2], 0)
    boost[smiles] = 14.0
    return unigram_model(boost)


def test_known_model_losses_and_answers(known):
    model, logp = known
    predictions = []
    for example in EXAMPLES:
        tokens, mask, _ = hellaswag.render_example(example, ENC)
        total, mean = hellaswag.ending_losses(model, tokens, mask)
        expected = np.array([-logp[ending_tokens(example, i)].sum() for i in range(4)])
        lengths = np.array([len(ending_tokens(example, i)) for i in range(4)])
        np.testing.assert_allclose(total, expected, rtol=1e-10)
        np.testing.assert_allclose(mean, expected / lengths, rtol=1e-10)
        predictions.append((int(total.argmin()), int(mean.argmin())))
    assert predictions == [(3, 3), (3, 3), (0, 2)]


def test_evaluate_a_jsonl_file(known, tmp_path):
    model, _ = known
    path = write_jsonl(tmp_path / "hellaswag_val.jsonl", EXAMPLES)
    examples = hellaswag.load_examples(path)
    result = hellaswag.evaluate(model, examples, ENC)
    assert result == (pytest.approx(1 / 3), pytest.approx(2 / 3), 3)
    assert (result.acc, result.acc_norm, result.n) == tuple(result)
    assert hellaswag.load_examples(path, limit=2) == EXAMPLES[:2]
    # examples rendered once up front (what a training loop evaluating often would pass)
    rendered = [hellaswag.render_example(e, ENC) for e in examples]
    assert hellaswag.evaluate(model, rendered) == result


@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_scoring_equals_full_logits_reference(dtype, tol):
    """A random model (so every position matters) against the full-logits formula."""
    cfg = GPTConfig(block_size=64, vocab_size=50304, n_layer=2, n_head=2, n_embd=8)  # padded vocab
    model = GPT(cfg, dtype=dtype, seed=1)
    model.flat_params *= 20  # spread the predictions out
    for example in EXAMPLES:
        tokens, mask, _ = hellaswag.render_example(example, ENC)
        total, mean = hellaswag.ending_losses(model, tokens, mask)
        ref_total, ref_mean = reference_losses(model, tokens, mask)
        np.testing.assert_allclose(total, ref_total, rtol=tol)
        np.testing.assert_allclose(mean, ref_mean, rtol=tol)


def test_batching_and_ranks_do_not_change_the_result():
    cfg = GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, dtype=np.float64, seed=5)
    model.flat_params *= 30
    examples = EXAMPLES * 3  # 9 examples: ranks get 5 and 4
    single = hellaswag.evaluate(model, examples, ENC)
    assert hellaswag.evaluate(model, examples, ENC, examples_per_forward=4) == single
    per_rank = []

    def record(counts):  # what an allreduce is handed; here each rank runs alone
        per_rank.append(counts.copy())
        return counts

    for rank in range(2):
        hellaswag.evaluate(model, examples, ENC, rank=rank, world_size=2, reduce_sum=record)
    assert [c[2] for c in per_rank] == [5, 4]
    total = per_rank[0] + per_rank[1]
    summed = hellaswag.evaluate(model, examples, ENC, rank=0, world_size=2, reduce_sum=lambda c: total)
    assert summed == single
    with pytest.raises(ValueError, match="rank 2 is outside"):
        hellaswag.evaluate(model, examples, ENC, rank=2, world_size=2)


def test_progress_reports_this_ranks_counts(known):
    model, _ = known
    calls = []
    hellaswag.evaluate(model, EXAMPLES, ENC, progress=lambda done, total, counts: calls.append((done, total, list(counts))))
    assert calls == [(1, 3, [1, 1, 1]), (2, 3, [1, 1, 2]), (3, 3, [1, 2, 3])]


# ---- bad input ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "line,match",
    [
        ("{not json", r"hellaswag_val.jsonl:2: not valid JSON"),
        (json.dumps({**EXAMPLES[0], "endings": ["a", "b"]}), "'endings' must be a list of 4 strings"),
        (json.dumps({**EXAMPLES[0], "label": 4}), "'label' must be 0, 1, 2 or 3"),
        (json.dumps({"endings": EXAMPLES[0]["endings"]}), "'ctx' .* must be a string"),
    ],
)
def test_bad_lines_are_named(tmp_path, line, match):
    path = tmp_path / "hellaswag_val.jsonl"
    path.write_text(json.dumps(EXAMPLES[0]) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=match):
        hellaswag.load_examples(path)


def test_unlabeled_too_long_and_out_of_vocab_examples_are_refused(known):
    model, _ = known
    unlabeled = {k: v for k, v in EXAMPLES[0].items() if k != "label"}  # the test split hides labels
    with pytest.raises(ValueError, match="no label"):
        hellaswag.evaluate(model, [unlabeled], ENC)
    long = {**EXAMPLES[0], "ctx": "word " * 80}
    with pytest.raises(ValueError, match="more than block_size=64"):
        hellaswag.evaluate(model, [long], ENC)
    small = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=1, n_head=1, n_embd=4))
    with pytest.raises(ValueError, match="vocab_size is 100"):
        hellaswag.evaluate(small, EXAMPLES, ENC)


def test_data_file_uses_path_cache_or_download(tmp_path):
    source = write_jsonl(tmp_path / "source.jsonl", EXAMPLES)
    assert hellaswag.data_file("val", path=source) == source
    with pytest.raises(FileNotFoundError, match="check --path"):
        hellaswag.data_file("val", path=tmp_path / "missing.jsonl")
    # the real download code, from a file:// URL
    data_dir = tmp_path / "cache"
    got = hellaswag.data_file("val", data_dir=data_dir, url=source.as_uri())
    assert got == data_dir / "hellaswag_val.jsonl" and got.read_text() == source.read_text()
    assert hellaswag.data_file("val", data_dir=data_dir, url="file:///nowhere") == got  # cached: no download
    with pytest.raises(RuntimeError, match="could not download HellaSwag test .* pass it with --path FILE"):
        hellaswag.data_file("test", data_dir=data_dir, url=(tmp_path / "nowhere.jsonl").as_uri())
    assert not (data_dir / "hellaswag_test.jsonl").exists()
    with pytest.raises(FileNotFoundError, match="pass --path FILE"):
        hellaswag.data_file("train", data_dir=data_dir, download=False)
    with pytest.raises(ValueError, match="unknown HellaSwag split"):
        hellaswag.data_file("dev", data_dir=data_dir)
    assert hellaswag.URLS["val"].endswith("rowanz/hellaswag/master/data/hellaswag_val.jsonl")
