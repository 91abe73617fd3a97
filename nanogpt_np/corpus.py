"""The built-in default corpus: the Python standard library's own source code.

Every machine that runs this package has it, so `scripts/train.py` with no
--data-dir needs no download. The first run tokenizes it into shards in a cache
directory (a few seconds); later runs reuse them.

What goes in, deterministically:
  - the `.py` files under `sysconfig.get_paths()["stdlib"]`, skipping test suites,
    site-packages and caches (SKIP_DIRS);
  - sorted by path, then put in a fixed pseudo-random order (a permutation from a
    constant seed), so neither split nor any stretch of training is one package;
  - files are taken in that order until `max_chars` characters are in (16M by
    default: all of CPython 3.11's ~12M; override with NANOGPT_NP_STDLIB_CHARS);
  - the first 5% of the token stream is the val split, the rest train, in shards of
    1M tokens, as prepare.write_token_stream cuts them.

The cache lives in $NANOGPT_NP_CACHE, else $XDG_CACHE_HOME/nanogpt_np, else
~/.cache/nanogpt_np, in a folder named after the Python version and a hash of the
file list and settings. It is built in a temporary folder and renamed into place,
so a run killed halfway leaves no half corpus behind.
"""
import hashlib
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np

from .data import DataError
from .prepare import write_token_stream
from .tokenizer import EOT_TOKEN, get_encoding

CORPUS_VERSION = 1
DEFAULT_MAX_CHARS = 16_000_000
VAL_FRACTION = 0.05
SHARD_TOKENS = 1_000_000
ORDER_SEED = 0
PREFIX = "stdlib"
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
CACHE_ENV, CHARS_ENV = "NANOGPT_NP_CACHE", "NANOGPT_NP_STDLIB_CHARS"


def cache_root():
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nanogpt_np"


def default_max_chars():
    value = os.environ.get(CHARS_ENV)
    if value is None:
        return DEFAULT_MAX_CHARS
    if not value.isdigit() or int(value) <= 0:
        raise ValueError(f"{CHARS_ENV}={value!r}; set it to a positive number of characters")
    return int(value)


def stdlib_files(root=None):
    """Sorted relative paths of the standard library's .py files, tests excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the standard library folder {root} (from sysconfig) does not exist; "
                           "pass --data-dir with prepared shards instead")
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not SKIP_DIRS.intersection(rel.parts[:-1]) and path.is_file():
            files.append(rel.as_posix())
    if not files:
        raise DataError(f"no .py files under the standard library folder {root} (this Python may "
                        "ship it compiled or zipped); pass --data-dir with prepared shards instead")
    return root, sorted(files)


def select_files(root, files, max_chars):
    """The files in the fixed shuffled order, until max_chars characters (at least one)."""
    order = np.random.default_rng(ORDER_SEED).permutation(len(files))
    chosen, total = [], 0
    for i in order:
        size = (root / files[i]).stat().st_size  # bytes, a close bound on characters
        if chosen and total + size > max_chars:
            continue  # skip this one; a smaller file later may still fit
        chosen.append(files[i])
        total += size
    return chosen


def corpus_dir(cache=None, max_chars=None):
    """The folder the corpus for this Python and these settings lives in, and its files."""
    max_chars = default_max_chars() if max_chars is None else max_chars
    root, files = stdlib_files()
    chosen = select_files(root, files, max_chars)
    h = hashlib.sha256(json.dumps([CORPUS_VERSION, max_chars, VAL_FRACTION, SHARD_TOKENS]).encode())
    for rel in chosen:
        h.update(f"{rel}\0{(root / rel).stat().st_size}\0".encode())
    version = f"py{sys.version_info.major}{sys.version_info.minor}"
    return Path(cache or cache_root()) / f"{PREFIX}-{version}-{h.hexdigest()[:12]}", root, chosen


def builtin_corpus(cache=None, max_chars=None, log=print):
    """Path of the built-in corpus's shard folder, tokenizing it first if needed."""
    final, root, chosen = corpus_dir(cache, max_chars)
    if (final / "corpus.json").is_file():
        return str(final)
    t0 = time.time()
    log(f"building the built-in corpus: {len(chosen)} files of the Python standard library "
        f"({root}) -> {final}")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot create the corpus cache {final.parent} ({e}); "
                           f"set {CACHE_ENV} to a writable folder") from e
    _remove_abandoned_builds(final)
    tmp = final.parent / f".{final.name}.tmp{os.getpid()}"
    try:
        manifest = _tokenize_into(tmp, root, chosen)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.rename(tmp, final)
    except OSError:  # another process finished the same corpus first: use theirs
        shutil.rmtree(tmp, ignore_errors=True)
        if not (final / "corpus.json").is_file():
            raise
    log(f"built-in corpus ready: {manifest['train_tokens']:,} train and {manifest['val_tokens']:,} "
        f"val tokens in {time.time() - t0:.1f}s")
    return str(final)


def _remove_abandoned_builds(final):
    """Delete temporary folders of this corpus left by processes that no longer run."""
    for tmp in final.parent.glob(f".{final.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1]
        if pid.isdigit() and not _process_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)


def _process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _tokenize_into(folder, root, chosen):
    texts = [(root / rel).read_text(encoding="utf-8", errors="replace") for rel in chosen]
    enc = get_encoding()
    ids = enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)
    docs = [np.concatenate([[EOT_TOKEN], d]).astype(np.uint16) for d in ids]
    total = sum(d.size for d in docs)
    val_tokens = max(1, int(total * VAL_FRACTION))
    val_paths, train_paths = write_token_stream(docs, folder, PREFIX, SHARD_TOKENS, val_tokens)
    manifest = {
        "source": str(root), "python": sys.version.split()[0], "version": CORPUS_VERSION,
        "files": chosen, "chars": sum(len(t) for t in texts),
        "val_tokens": val_tokens, "train_tokens": total - val_tokens,
        "val_shards": [os.path.basename(p) for p in val_paths],
        "train_shards": [os.path.basename(p) for p in train_paths],
    }
    # written last: its presence marks a complete corpus
    (folder / "corpus.json").write_text(json.dumps(manifest, indent=1))
    return manifest
