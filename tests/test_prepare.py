"""Tokenize-and-shard (prepare_fineweb.py's and prepare_text.py's code) on local text."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanogpt_np.data import DataLoader, find_shards, read_shard
from nanogpt_np.prepare import (ShardWriter, prepare_text_files, shard_documents, tokenize_document,
                                write_token_stream)
from nanogpt_np.tokenizer import EOT_TOKEN, get_encoding

ROOT = Path(__file__).resolve().parents[1]

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, I'm a language model,",
    "",
    "def f(x):\n    return x * 2\n" * 5,
    "Ünïcödé text, and <|endoftext|> written as plain text.",
] * 7


def read_all(paths):
    return np.concatenate([np.asarray(read_shard(p)) for p in paths]) if paths else np.zeros(0, np.uint16)


def test_tokenize_document_starts_with_eot():
    enc = get_encoding()
    for doc in (DOCS[0], {"text": DOCS[1], "id": "x"}):
        tokens = tokenize_document(doc)
        text = doc["text"] if isinstance(doc, dict) else doc
        assert tokens.dtype == np.uint16
        assert tokens.tolist() == [EOT_TOKEN] + enc.encode_ordinary(text)
    # special-token text inside a document is ordinary text, not a separator
    assert EOT_TOKEN not in tokenize_document("a <|endoftext|> b")[1:].tolist()


def test_shard_writer_cuts_the_stream(tmp_path):
    pieces = [np.arange(n, dtype=np.uint16) + 100 * i for i, n in enumerate([3, 9, 1, 12, 5])]
    w = ShardWriter(tmp_path, "p", "train", shard_size=7, first_index=3)
    for p in pieces:
        w.write(p)
    paths = w.close()
    assert [os.path.basename(p) for p in paths] == [f"p_train_{i:06d}.npy" for i in range(3, 8)]
    assert [read_shard(p).size for p in paths] == [7, 7, 7, 7, 2]
    np.testing.assert_array_equal(read_all(paths), np.concatenate(pieces))


@pytest.mark.parametrize("val_tokens", [0, 5, 7, 16, 1000])
def test_val_split_is_the_head_of_the_stream(tmp_path, val_tokens):
    stream = [np.arange(n, dtype=np.uint16) + 50 * i for i, n in enumerate([4, 10, 3, 9])]  # 26 tokens
    val, train = write_token_stream(stream, tmp_path, "p", 7, val_tokens)
    whole = np.concatenate(stream)
    np.testing.assert_array_equal(read_all(val), whole[:val_tokens])
    np.testing.assert_array_equal(read_all(train), whole[val_tokens:])
    names = [os.path.basename(p) for p in val + train]
    assert names == [f"p_{'val' if i < len(val) else 'train'}_{i:06d}.npy" for i in range(len(names))]


def test_shard_documents_in_parallel_is_fineweb_layout(tmp_path):
    """The prepare_fineweb.py path: worker processes, shard 0 val, the rest train,
    each document opened by <|endoftext|>, the same stream as tokenizing in order."""
    expected = np.concatenate([tokenize_document(d) for d in DOCS])
    shard = 64
    val, train = shard_documents(({"text": d} for d in DOCS), tmp_path / "two", "edufineweb", shard,
                                 val_tokens=shard, workers=2, chunksize=4)
    assert [os.path.basename(p) for p in val] == ["edufineweb_val_000000.npy"]
    assert os.path.basename(train[0]) == "edufineweb_train_000001.npy"
    assert all(read_shard(p).size == shard for p in val + train[:-1])
    np.testing.assert_array_equal(read_all(val + train), expected)
    serial = shard_documents(DOCS, tmp_path / "one", "edufineweb", shard, val_tokens=shard, workers=1)
    np.testing.assert_array_equal(read_all(serial[0] + serial[1]), expected)


def test_prepare_text_files(tmp_path):
    files = []
    for i, text in enumerate(["first file " * 50, "second file\n" * 80]):
        files.append(tmp_path / f"f{i}.txt")
        files[-1].write_text(text)
    out = tmp_path / "out"
    (out).mkdir()
    (out / "text_train_000099.npy").write_bytes(b"stale")  # from an earlier, longer run
    val, train = prepare_text_files(files, out, val_fraction=0.25, shard_size=100)
    tokens = np.concatenate([tokenize_document(f.read_text()) for f in files])
    np.testing.assert_array_equal(read_all(val + train), tokens)
    assert read_all(val).size == round(0.25 * tokens.size)
    assert sorted(os.listdir(out)) == sorted(os.path.basename(p) for p in val + train)
    with pytest.raises(ValueError, match=r"--val-fraction 1: .* in \(0, 1\)"):
        prepare_text_files(files, out, val_fraction=1.0)


def test_prepare_text_script(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.\n" * 200)
    out = tmp_path / "shards"
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_text.py"), str(text), "--out", str(out),
                        "--val-fraction", "0.2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "1 val and 1 train shard(s)" in r.stdout
    loader = DataLoader(out, 2, 16, split="val")
    x, y = loader.next_batch()
    assert x[0, 0] == EOT_TOKEN and find_shards(out, "train")
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_text.py"), str(tmp_path / "missing.txt"),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no such file" in r.stderr


def test_prepare_fineweb_script_needs_datasets_only_to_download():
    """The script imports and parses without `datasets`; the library is imported only
    inside load_fineweb, the download path."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "prepare_fineweb.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--shard-size" in r.stdout
    source = (ROOT / "scripts" / "prepare_fineweb.py").read_text()
    assert source.count("import load_dataset") == 1
    assert '"HuggingFaceFW/fineweb-edu"' in source and '"sample-10BT"' in source
