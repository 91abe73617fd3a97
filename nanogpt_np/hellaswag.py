"""HellaSwag: pick the right ending of a sentence, scored the way build-nanogpt does.

Each example (a line of the official hellaswag_{train,val,test}.jsonl) holds a
context `ctx`, four candidate `endings` and the index `label` of the right one.
The model reads four rows, context then " " + ending (GPT-2's tokenizer folds the
space into the ending's first token), and we ask how likely each ending is:

    loss(row) = sum over ending tokens t of -log p(token t | tokens before t)

acc counts the examples where the right ending has the lowest summed loss;
acc_norm, where it has the lowest mean loss (the sum over the ending's length),
which does not favour short endings. This is "completion style" scoring: the
model never sees the four endings side by side.

Key: E examples in a forward, R = 4 E rows, T the longest row, C channels,
V vocab, N the ending tokens in the batch.

Only the ending tokens need a loss, and position t predicts token t + 1, so we
run lm_head on just the N positions before an ending token, not on all R * T:
the (R, T, V) logits are never formed (with V = 50304 they would be the largest
array by far).

Examples are split across ranks (example i goes to rank i % world_size); each
rank counts its own, and `reduce_sum` (e.g. an MPI allreduce) adds the counts up.
"""
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .backend import to_host
from .jsonio import BLANK, parse_json
from .generate import hidden_states

URLS = {
    split: f"https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_{split}.jsonl"
    for split in ("train", "val", "test")
}
N_ENDINGS = 4
# examples in the official files: a cached copy with fewer was cut short
OFFICIAL_EXAMPLES = {"train": 39905, "val": 10042, "test": 10003}


class HellaSwagError(ValueError):
    """A HellaSwag file that cannot be scored; the message names the file and line."""
CHUNK_ELEMENTS = 1 << 22  # logits computed at a time (16 MB in float32)


class Rendered(NamedTuple):
    tokens: np.ndarray  # (4, T) int64, padded with 0 past each row's end
    mask: np.ndarray  # (4, T) int64, 1 on the ending's tokens
    label: int  # index of the right ending (None for the unlabeled test split)


class Result(NamedTuple):
    acc: float  # fraction of examples whose right ending has the lowest summed loss
    acc_norm: float  # ... the lowest mean loss per token
    n: int  # examples scored, over all ranks


# ---- data ------------------------------------------------------------------------


def default_data_dir():
    """$NANOGPT_NP_CACHE/hellaswag, else ~/.cache/nanogpt_np/hellaswag."""
    root = os.environ.get("NANOGPT_NP_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "nanogpt_np")
    return Path(root) / "hellaswag"


def data_file(split="val", path=None, data_dir=None, download=True, url=None):
    """The path of hellaswag_{split}.jsonl: `path` if given, else data_dir's copy,
    downloaded there first when missing (and download is allowed)."""
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"HellaSwag file {path} does not exist; check --path")
        return path
    if split not in URLS:
        raise ValueError(f"unknown HellaSwag split {split!r}; choose one of {', '.join(URLS)}")
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    target = data_dir / f"hellaswag_{split}.jsonl"
    official = url is None  # a caller's own url may serve any subset
    if target.is_file():
        if official:
            check_official_count(target, split)
        return target
    if not download:
        raise FileNotFoundError(f"{target} is missing; download it from {URLS[split]} or pass --path FILE")
    from .pretrained import download_file  # the same atomic, streamed download

    url = url or URLS[split]
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} -> {target}", flush=True)
    try:
        download_file(url, target)
    except OSError as e:
        raise RuntimeError(
            f"could not download HellaSwag {split} from {url} ({e}). Without a network, fetch "
            f"hellaswag_{split}.jsonl elsewhere and pass it with --path FILE"
        ) from e
    if official:
        check_official_count(target, split)
    return target


def check_official_count(path, split):
    """The cached official file holds every example (a download or copy cut at a line
    end would otherwise score a subset without a word)."""
    with open(path, "rb") as f:
        n = sum(1 for line in f if line.strip())
    if n != OFFICIAL_EXAMPLES[split]:
        raise HellaSwagError(f"{path}: {n} examples, but the official {split} split has {OFFICIAL_EXAMPLES[split]}; "
                             "the file is incomplete: delete it to download it again")


def read_examples(path, need_labels=False):
    """Yield the examples of a HellaSwag .jsonl file as dicts, checked field by field;
    a bad line is a HellaSwagError naming its number."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            cut = "" if raw.endswith(b"\n") else " (the last line has no end: the file was cut short?)"
            example = parse_json(raw, where, HellaSwagError, hint=cut, skip_blank=True)
            if example is BLANK:
                continue
            check_example(example, where, need_labels)
            yield example


def load_examples(path, limit=None, need_labels=False):
    """The first `limit` (default: all) examples of a HellaSwag .jsonl file, as a
    list; a file with none is an error. need_labels: every example must have one."""
    out = []
    for example in read_examples(path, need_labels):
        if limit is not None and len(out) >= limit:
            break
        out.append(example)
    if not out:
        raise HellaSwagError(f"{path}: no HellaSwag examples in it (an empty file, or only blank lines)")
    return out


def check_example(example, where="example", need_label=False):
    if not isinstance(example, dict):
        raise HellaSwagError(f"{where}: a HellaSwag example is a JSON object, got {type(example).__name__}")
    if not isinstance(example.get("ctx"), str):
        raise HellaSwagError(f"{where}: field 'ctx' (the context) must be a string")
    endings = example.get("endings")
    if not (isinstance(endings, list) and len(endings) == N_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise HellaSwagError(f"{where}: field 'endings' must be a list of {N_ENDINGS} strings")
    label = example.get("label")
    if label is None and need_label:
        raise HellaSwagError(f"{where}: the example has no label (the test split's are hidden); score the val split")
    if label is not None and (isinstance(label, bool) or label not in range(N_ENDINGS)):
        raise HellaSwagError(f"{where}: field 'label' must be 0, 1, 2 or 3, got {label!r}")


# ---- rendering and scoring ---------------------------------------------------------


def render_example(example, enc):
    """Rendered(tokens (4, T), mask (4, T), label) for one example.

    Row i is the context's tokens followed by the tokens of " " + endings[i]; the
    mask is 1 over the ending's tokens; rows are padded with 0 to the longest.
    """
    # encode_ordinary: "<|endoftext|>" inside the text is text, not the special token
    ctx_tokens = enc.encode_ordinary(example["ctx"])
    rows = [ctx_tokens + enc.encode_ordinary(" " + ending) for ending in example["endings"]]
    T = max(len(r) for r in rows)
    tokens = np.zeros((N_ENDINGS, T), dtype=np.int64)
    mask = np.zeros((N_ENDINGS, T), dtype=np.int64)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = row
        mask[i, len(ctx_tokens) : len(row)] = 1
    return Rendered(tokens, mask, example.get("label"))


def ending_losses(model, tokens, mask):
    """Summed and mean loss of each row's masked tokens: tokens, mask (R, T) -> two (R,) arrays.

    The loss of token t + 1 is  logsumexp(logits[t]) - logits[t, token[t + 1]]  with
    logits[t] = lm_head(h[t]), taken at the N positions t whose next token is masked.
    """
    R, T = tokens.shape
    if T > model.config.block_size:
        raise ValueError(
            f"a rendered row has {T} tokens, more than block_size={model.config.block_size}; "
            "this model cannot score it"
        )
    if tokens.min() < 0 or tokens.max() >= model.config.vocab_size:
        raise ValueError(
            f"token ids span [{tokens.min()}, {tokens.max()}] but the model's vocab_size is "
            f"{model.config.vocab_size}; score with the tokenizer the model was trained with"
        )
    xp = model.xp
    h = hidden_states(model, xp.asarray(tokens))  # (R, T, C)
    rows, cols = np.nonzero(mask[:, 1:])  # (N,) each: token cols + 1 is scored at position cols
    targets = tokens[rows, cols + 1]  # (N,)
    losses = np.empty(len(rows), dtype=np.float64)
    wte = model.params["transformer.wte.weight"]
    step = max(1, CHUNK_ELEMENTS // wte.shape[0])
    for start in range(0, len(rows), step):
        stop = min(len(rows), start + step)
        r, c = xp.asarray(rows[start:stop]), xp.asarray(cols[start:stop])
        logits, _ = model.ops.linear.forward(h[r, c], wte, None)  # (n, V), the chunk's positions only
        row_max = logits.max(axis=-1, keepdims=True)  # (n, 1)
        target_logits = logits[xp.arange(stop - start), xp.asarray(targets[start:stop])]  # (n,)
        logits -= row_max
        xp.exp(logits, out=logits)  # in place: no second (n, V) array
        lse = xp.log(logits.sum(axis=-1)) + row_max[:, 0]  # (n,)
        losses[start:stop] = to_host(lse - target_logits)
    sum_loss = np.bincount(rows, weights=losses, minlength=R)  # (R,)
    count = np.maximum(mask[:, 1:].sum(axis=1), 1)  # (R,); an empty ending would divide by 0
    return sum_loss, sum_loss / count


def evaluate(model, examples, enc=None, rank=0, world_size=1, reduce_sum=None, examples_per_forward=1,
             progress=None):
    """Score HellaSwag examples -> Result(acc, acc_norm, n), over all ranks.

    examples: dicts as read_examples yields them (or Rendered tuples), the same
      list on every rank; this rank scores examples rank, rank + world_size, ...
    reduce_sum: called with this rank's counts, a float64 array
      [correct, correct_norm, total], and returning the sum over all ranks (an MPI
      allreduce); None when there is one process.
    examples_per_forward: examples whose 4 rows share one forward (padded to the
      longest); more use the GPU better, and the result does not change.
    progress: called as progress(scored, to_score, counts) after each forward,
      with this rank's numbers (for a running printout).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if enc is None:
        from .tokenizer import get_encoding

        enc = get_encoding()
    if not examples:
        raise HellaSwagError("no HellaSwag examples to score")
    mine = [render(ex, enc) for i, ex in enumerate(examples) if i % world_size == rank]
    counts = np.zeros(3, dtype=np.float64)  # correct, correct_norm, total
    for start in range(0, len(mine), examples_per_forward):
        group = mine[start : start + examples_per_forward]
        missing = [start + i for i, g in enumerate(group) if g.label is None]
        if missing:
            raise HellaSwagError(f"example {rank + world_size * missing[0]} (counting from 0) has no label (the "
                                 "test split's are hidden); score the val split")
        tokens, mask = stack_rows(group)
        sum_loss, mean_loss = ending_losses(model, tokens, mask)
        for e, g in enumerate(group):
            rows = slice(N_ENDINGS * e, N_ENDINGS * (e + 1))
            counts[0] += int(np.argmin(sum_loss[rows]) == g.label)
            counts[1] += int(np.argmin(mean_loss[rows]) == g.label)
            counts[2] += 1
        if progress is not None:
            progress(int(counts[2]), len(mine), counts.copy())
    if reduce_sum is not None:
        counts = np.asarray(reduce_sum(counts), dtype=np.float64)
    correct, correct_norm, total = (int(round(c)) for c in counts)
    if total == 0:
        return Result(float("nan"), float("nan"), 0)
    return Result(correct / total, correct_norm / total, total)


def render(example, enc):
    return example if isinstance(example, Rendered) else render_example(example, enc)


def stack_rows(group):
    """Rendered examples -> tokens, mask: (4 E, T), each padded with 0 to the longest row."""
    T = max(g.tokens.shape[1] for g in group)
    tokens = np.zeros((N_ENDINGS * len(group), T), dtype=np.int64)
    mask = np.zeros_like(tokens)
    for e, g in enumerate(group):
        t = g.tokens.shape[1]
        tokens[N_ENDINGS * e : N_ENDINGS * (e + 1), :t] = g.tokens
        mask[N_ENDINGS * e : N_ENDINGS * (e + 1), :t] = g.mask
    return tokens, mask
