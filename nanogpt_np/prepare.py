"""Text to token shards: the logic behind scripts/prepare_text.py and prepare_fineweb.py.

The recipe is build-nanogpt's fineweb.py: every document is tokenized with the
GPT-2 encoding and *starts* with <|endoftext|> (50256), which separates it from
the document before. The token stream is cut into shards of a fixed number of
tokens; a document that does not fit in the current shard is split, its tail
opening the next shard. Shards are uint16 `.npy` files named
`{prefix}_{split}_{index:06d}.npy`, written atomically.

The first `val_tokens` tokens of the stream form the validation split (for
FineWeb-Edu that is exactly shard 0, as in build-nanogpt), the rest is train.
The index counts on across the splits, as fineweb.py numbers them.
"""
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .data import read_shard, write_shard
from .tokenizer import EOT_TOKEN, get_encoding


def tokenize_document(doc):
    """One document (a str, or a dict with "text" as `datasets` yields) -> uint16 tokens
    starting with <|endoftext|>. A top-level function, so worker processes can run it."""
    text = doc["text"] if isinstance(doc, dict) else doc
    ids = get_encoding().encode_ordinary(text)
    tokens = np.empty(len(ids) + 1, dtype=np.uint16)
    tokens[0] = EOT_TOKEN
    tokens[1:] = ids
    return tokens


class ShardWriter:
    """Cuts a stream of token arrays into shards of `shard_size` tokens.

    write(tokens) fills the current shard and writes it out whenever it is full;
    close() writes the last, partial shard and returns every path written.
    """

    def __init__(self, out_dir, prefix, split, shard_size, first_index=0, log=None):
        if shard_size <= 0:
            raise ValueError(f"shard_size must be positive, got {shard_size}")
        self.out_dir, self.prefix, self.split = os.fspath(out_dir), prefix, split
        self.shard_size, self.index = int(shard_size), first_index
        self.buffer = np.empty(self.shard_size, dtype=np.uint16)
        self.filled = 0
        self.paths = []
        self.total_tokens = 0
        self.log = log
        os.makedirs(self.out_dir, exist_ok=True)

    def write(self, tokens):
        tokens = np.asarray(tokens, dtype=np.uint16)
        self.total_tokens += tokens.size
        while tokens.size:
            room = self.shard_size - self.filled
            take = tokens[:room]
            self.buffer[self.filled : self.filled + take.size] = take
            self.filled += take.size
            tokens = tokens[take.size :]
            if self.filled == self.shard_size:
                self._flush()

    def _flush(self):
        if self.filled == 0:
            return
        name = f"{self.prefix}_{self.split}_{self.index:06d}.npy"
        self.paths.append(write_shard(os.path.join(self.out_dir, name), self.buffer[: self.filled]))
        if self.log:
            self.log(f"wrote {self.paths[-1]} ({self.filled:,} tokens)")
        self.index += 1
        self.filled = 0

    def close(self):
        self._flush()
        return self.paths


def write_token_stream(token_arrays, out_dir, prefix, shard_size, val_tokens, log=None):
    """The first `val_tokens` tokens of the stream to val shards, the rest to train
    shards. Returns (val_paths, train_paths)."""
    val = ShardWriter(out_dir, prefix, "val", min(shard_size, max(val_tokens, 1)), log=log)
    train = None
    for tokens in token_arrays:
        if train is None:
            to_val = min(tokens.size, val_tokens - val.total_tokens)
            val.write(tokens[:to_val])
            tokens = tokens[to_val:]
            if val.total_tokens < val_tokens:
                continue
            val_paths = val.close()
            train = ShardWriter(out_dir, prefix, "train", shard_size, first_index=val.index, log=log)
        train.write(tokens)
    if train is None:  # the stream ended inside the val split
        val_paths = val.close()
        train = ShardWriter(out_dir, prefix, "train", shard_size, first_index=val.index, log=log)
    return val_paths, train.close()


def _ignore_interrupts():
    """Worker processes leave Ctrl-C to the parent, which stops the pool: one message,
    not one traceback per worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def tokenize_in_parallel(docs, workers, chunksize=16):
    """Yield tokenize_document(doc) for each doc, in order, from `workers` processes
    (in this process when workers <= 1)."""
    if workers <= 1:
        for doc in docs:
            yield tokenize_document(doc)
        return
    with mp.get_context("spawn").Pool(workers, initializer=_ignore_interrupts) as pool:
        yield from pool.imap(tokenize_document, docs, chunksize=chunksize)


def shard_documents(docs, out_dir, prefix, shard_size, val_tokens, workers=1, chunksize=16, log=None):
    """Tokenize an iterable of documents (str or {"text": str}) in `workers` processes
    and write shards, the first `val_tokens` tokens as val. Returns (val_paths, train_paths)."""
    stream = tokenize_in_parallel(docs, workers, chunksize)
    return write_token_stream(stream, out_dir, prefix, shard_size, val_tokens, log=log)


def tokenize_on_threads(texts, workers):
    """tokenize_document of each text on `workers` threads: the tokenizer releases the
    GIL, so threads run in parallel (and, unlike worker processes, need no pipe to
    drain when Ctrl-C stops them)."""
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(tokenize_document, texts))


def interruptible(fn, *args):
    """fn(*args) in a daemon thread, waited for in short joins. The tokenizer releases
    the GIL, but a signal is handled only between bytecodes of the main thread: called
    there, a file of 100 MB would take its whole tokenization to notice a Ctrl-C."""
    box = {}

    def work():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the caller, who raises it
            box["error"] = e

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
    if "error" in box:
        raise box["error"]
    return box["value"]


class PrepareError(ValueError):
    """Input prepare_text_files cannot make shards of; the message names the file and the fix."""


def read_text_file(path, errors="strict"):
    """A file's text. Empty files and bytes that are not UTF-8 are refused (naming the
    byte offset) unless errors="replace", which turns undecodable bytes into U+FFFD."""
    with open(path, "rb") as f:
        data = f.read()
    if not data.strip():
        raise PrepareError(f"{path} is empty{'' if not data else ' (only whitespace)'}; leave it out or give it text")
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start:,} cannot be "
                           "decoded; convert it to UTF-8 (e.g. iconv -f latin1 -t utf-8), or pass --errors replace "
                           "to read undecodable bytes as U+FFFD") from None


def prepare_text_files(paths, out_dir, val_fraction=0.1, shard_size=10**8, prefix="text",
                       workers=1, log=None, errors="strict"):
    """Each text file is one document; the first `val_fraction` of all tokens is val.
    Returns (val_paths, train_paths), and removes older `{prefix}_*` shards in out_dir.
    Every check comes before any write; the shards are written into a temporary folder
    inside out_dir and moved into place at the end, so an error or a Ctrl-C leaves
    out_dir as it was."""
    out_dir = os.fspath(out_dir)
    if not 0 < val_fraction < 1:
        raise PrepareError(f"--val-fraction {val_fraction:g}: the share of tokens for the val split must be "
                           "a number in (0, 1), e.g. 0.1")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise PrepareError(f"--out {out_dir} is a file; give a folder for the shards (it is created if missing)")
    texts = [read_text_file(path, errors) for path in paths]
    if log:
        log(f"tokenizing {len(texts)} file(s), {sum(len(t) for t in texts):,} characters")
    docs = interruptible(tokenize_on_threads, texts, workers)  # Ctrl-C stops the wait at once
    total = sum(d.size for d in docs)
    val_tokens = int(round(total * val_fraction))
    if val_tokens < 2 or total - val_tokens < 2:
        empty = "val" if val_tokens < 2 else "train"
        raise PrepareError(f"--val-fraction {val_fraction:g} of {total} tokens leaves the {empty} split with "
                           f"{val_tokens if empty == 'val' else total - val_tokens} token(s) (each needs at least "
                           "2: an input and its target); give more text or another --val-fraction")
    try:
        os.makedirs(out_dir, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{prefix}_partial", dir=out_dir)
    except OSError as e:
        raise PrepareError(f"cannot write to --out {out_dir}: {e.strerror or e}") from None
    try:
        val_paths, train_paths = write_token_stream(docs, staging, prefix, shard_size, val_tokens)
        final = []
        for path in val_paths + train_paths:
            final.append(os.path.join(out_dir, os.path.basename(path)))
            os.replace(path, final[-1])
            if log:
                log(f"wrote {final[-1]} ({read_shard(final[-1]).size:,} tokens)")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    remove_stale_shards(out_dir, prefix, final)
    return final[: len(val_paths)], final[len(val_paths):]


def remove_stale_shards(out_dir, prefix, keep):
    """Delete `{prefix}_*` shards in out_dir left from an earlier, longer run."""
    keep = {os.path.abspath(p) for p in keep}
    for name in os.listdir(out_dir):
        path = os.path.abspath(os.path.join(out_dir, name))
        if name.startswith(prefix + "_") and name.endswith(".npy") and path not in keep:
            os.remove(path)
