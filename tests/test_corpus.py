"""The built-in standard-library corpus, built into a temporary cache, capped small."""
import json
import os

import numpy as np
import pytest

from nanogpt_np import corpus
from nanogpt_np.data import DataError, DataLoader, find_shards, read_shard
from nanogpt_np.tokenizer import EOT_TOKEN

CAP = 150_000  # characters: a few dozen files, tokenized in well under a second


def test_build_load_and_reuse(tmp_path):
    logs = []
    path = corpus.builtin_corpus(cache=tmp_path, max_chars=CAP, log=logs.append)
    assert "building the built-in corpus" in logs[0] and "ready" in logs[-1]
    manifest = json.loads((tmp_path / os.path.basename(path) / "corpus.json").read_text())
    assert manifest["files"] and all(f.endswith(".py") for f in manifest["files"])
    assert not any(part in corpus.SKIP_DIRS for f in manifest["files"] for part in f.split("/")[:-1])
    assert manifest["chars"] <= CAP
    val = np.asarray(read_shard(find_shards(path, "val")[0]))
    assert val[0] == EOT_TOKEN and val.size == manifest["val_tokens"]
    x, y = DataLoader(path, 2, 32).next_batch()
    assert x.shape == (2, 32)
    # a second call reuses the shards
    logs.clear()
    assert corpus.builtin_corpus(cache=tmp_path, max_chars=CAP, log=logs.append) == path
    assert logs == []
    assert [n for n in os.listdir(tmp_path) if ".tmp" in n] == []


def test_deterministic(tmp_path):
    a = corpus.builtin_corpus(cache=tmp_path / "a", max_chars=CAP, log=lambda *_: None)
    b = corpus.builtin_corpus(cache=tmp_path / "b", max_chars=CAP, log=lambda *_: None)
    assert os.path.basename(a) == os.path.basename(b)
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    for name in os.listdir(a):
        with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
            assert fa.read() == fb.read(), name


def test_a_failed_build_leaves_no_corpus(tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise KeyboardInterrupt  # killed halfway through the shards

    monkeypatch.setattr(corpus, "write_token_stream", boom)
    with pytest.raises(KeyboardInterrupt):
        corpus.builtin_corpus(cache=tmp_path, max_chars=CAP, log=lambda *_: None)
    final, _, _ = corpus.corpus_dir(tmp_path, CAP)
    assert not final.exists() and list(tmp_path.iterdir()) == []


def test_cache_location_and_cap_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "c"))
    assert corpus.cache_root() == tmp_path / "c"
    monkeypatch.delenv(corpus.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert corpus.cache_root() == tmp_path / "x" / "nanogpt_np"
    monkeypatch.setenv(corpus.CHARS_ENV, "1234")
    assert corpus.default_max_chars() == 1234
    monkeypatch.setenv(corpus.CHARS_ENV, "lots")
    with pytest.raises(ValueError, match="NANOGPT_NP_STDLIB_CHARS"):
        corpus.default_max_chars()


def test_a_python_without_stdlib_sources_is_explained(tmp_path):
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "os.pyc").write_bytes(b"")
    with pytest.raises(DataError, match="no .py files .* --data-dir"):
        corpus.stdlib_files(tmp_path / "lib")
    with pytest.raises(DataError, match="does not exist"):
        corpus.stdlib_files(tmp_path / "missing")


def test_cap_selects_a_fixed_subset():
    root, files = corpus.stdlib_files()
    assert files == sorted(files) and len(files) > 100
    small = corpus.select_files(root, files, CAP)
    assert small == corpus.select_files(root, files, CAP)
    assert sum((root / f).stat().st_size for f in small) <= CAP
    assert len(corpus.select_files(root, files, 10 * CAP)) > len(small)
    assert len(corpus.select_files(root, files, 1)) == 1  # never empty


def test_abandoned_temporary_builds_are_removed(tmp_path):
    final, _, _ = corpus.corpus_dir(tmp_path, CAP)
    dead = tmp_path / f".{final.name}.tmp999999999"  # no such process
    dead.mkdir(parents=True)
    (dead / "half.npy").write_bytes(b"x")
    corpus.builtin_corpus(cache=tmp_path, max_chars=CAP, log=lambda *_: None)
    assert not dead.exists() and final.exists()
