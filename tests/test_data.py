import os

import numpy as np
import pytest

from nanogpt_np.data import (BIN_HEADER_INTS, BIN_MAGIC, DataError, DataLoader, find_shards,
                             read_shard, shuffle_documents, write_shard)
from nanogpt_np.tokenizer import EOT_TOKEN


def make_shards(folder, lengths, split="train", fmt="npy", seed=0, prefix="x"):
    """Shards of random tokens; returns their arrays in order."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(0, 50257, n).astype(np.uint16)
        write_shard(os.path.join(folder, f"{prefix}_{split}_{i:06d}.{fmt}"), tokens)
        arrays.append(tokens)
    return arrays


class ReferenceLoader:
    """build-nanogpt's DataLoaderLite for one process, on in-memory shards."""

    def __init__(self, shards, B, T):
        self.shards, self.B, self.T = shards, B, T
        self.current_shard, self.current_position = 0, 0
        self.tokens = shards[0]

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.current_position : self.current_position + B * T + 1].astype(np.int64)
        x, y = buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
        self.current_position += B * T
        if self.current_position + (B * T + 1) > len(self.tokens):
            self.current_shard = (self.current_shard + 1) % len(self.shards)
            self.tokens = self.shards[self.current_shard]
            self.current_position = 0
        return x, y


# ---- shard files ----------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_shard_round_trip(tmp_path, fmt):
    tokens = np.array([EOT_TOKEN, 0, 1, 65535, 300], dtype=np.uint16)
    path = write_shard(tmp_path / f"a_train_0.{fmt}", tokens)
    read = read_shard(path)
    assert read.dtype == np.uint16 and read.shape == (5,)
    np.testing.assert_array_equal(read, tokens)
    assert not any(".tmp" in n for n in os.listdir(tmp_path))  # the temporary file was renamed


def test_bin_shard_is_llm_c_layout(tmp_path):
    write_shard(tmp_path / "a_val.bin", np.arange(10))
    raw = (tmp_path / "a_val.bin").read_bytes()
    header = np.frombuffer(raw[: 4 * BIN_HEADER_INTS], dtype="<i4")
    assert list(header[:3]) == [BIN_MAGIC, 1, 10] and not header[3:].any()
    np.testing.assert_array_equal(np.frombuffer(raw[4 * BIN_HEADER_INTS :], dtype="<u2"), np.arange(10))


@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_truncated_shard_is_named(tmp_path, fmt):
    path = write_shard(tmp_path / f"a_train_0.{fmt}", np.arange(1000))
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 10)
    with pytest.raises(DataError, match=rf"a_train_0\.{fmt}: truncated"):
        read_shard(path)


def test_shard_with_trailing_bytes(tmp_path):
    path = write_shard(tmp_path / "a_train_0.bin", np.arange(100))
    with open(path, "ab") as f:
        f.write(b"xx")
    with pytest.raises(DataError, match="2 bytes after the 100 tokens"):
        read_shard(path)


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.float32, ">u2"])
def test_wrong_dtype_npy(tmp_path, dtype):
    path = tmp_path / "a_train_0.npy"
    np.save(path, np.arange(10).astype(dtype))
    with pytest.raises(DataError, match="a_train_0.npy: tokens have dtype .* uint16"):
        read_shard(path)


def test_pickled_npy_is_rejected_without_unpickling(tmp_path):
    path = tmp_path / "a_train_0.npy"
    np.save(path, np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="dtype object"):
        read_shard(path)


def test_wrong_magic_and_version(tmp_path):
    path = write_shard(tmp_path / "a_train_0.bin", np.arange(10))
    with open(path, "rb") as f:
        raw = f.read()
    bad_magic = bytearray(raw)
    bad_magic[:4] = np.int32(20240522).tobytes()  # llm.c's eval-file magic
    (tmp_path / "m_train_0.bin").write_bytes(bad_magic)
    with pytest.raises(DataError, match="m_train_0.bin: wrong magic number 20240522"):
        read_shard(tmp_path / "m_train_0.bin")
    bad_version = bytearray(raw)
    bad_version[4:8] = np.int32(2).tobytes()
    (tmp_path / "v_train_0.bin").write_bytes(bad_version)
    with pytest.raises(DataError, match="version 2"):
        read_shard(tmp_path / "v_train_0.bin")
    (tmp_path / "h_train_0.bin").write_bytes(raw[:100])
    with pytest.raises(DataError, match="shorter than the 1024-byte llm.c header"):
        read_shard(tmp_path / "h_train_0.bin")


def test_empty_shard_and_not_npy(tmp_path):
    path = write_shard(tmp_path / "a_train_0.npy", np.zeros(0, dtype=np.uint16))
    with pytest.raises(DataError, match="holds no tokens"):
        read_shard(path)
    (tmp_path / "b_train_0.npy").write_bytes(b"hello")
    with pytest.raises(DataError, match="b_train_0.npy: not a valid .npy file"):
        read_shard(tmp_path / "b_train_0.npy")


def test_find_shards_by_split_word(tmp_path):
    for name in ["edufineweb_val_000000.npy", "edufineweb_train_000001.npy", "edufineweb_train_000002.npy",
                 "tiny_shakespeare_val.bin", "tiny_shakespeare_train.bin", "mytrain_0.npy", "notes_train.txt"]:
        (tmp_path / name).write_bytes(b"")
    names = lambda split: [os.path.basename(p) for p in find_shards(tmp_path, split)]  # noqa: E731
    assert names("train") == ["edufineweb_train_000001.npy", "edufineweb_train_000002.npy",
                              "tiny_shakespeare_train.bin"]
    assert names("val") == ["edufineweb_val_000000.npy", "tiny_shakespeare_val.bin"]


def test_empty_or_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match="no train shards in .*prepare_text.py"):
        DataLoader(tmp_path, 2, 4)
    with pytest.raises(DataError, match="does not exist"):
        DataLoader(tmp_path / "nope", 2, 4)
    make_shards(tmp_path, [100])
    with pytest.raises(DataError, match="no val shards"):
        DataLoader(tmp_path, 2, 4, split="val")


def test_a_bad_shard_fails_at_construction(tmp_path):
    make_shards(tmp_path, [100, 100])
    np.save(tmp_path / "x_train_000002.npy", np.arange(100, dtype=np.int32))
    with pytest.raises(DataError, match="x_train_000002.npy"):
        DataLoader(tmp_path, 2, 4)


# ---- the loader ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_loader_matches_build_nanogpt(tmp_path, fmt):
    B, T = 2, 5
    shards = make_shards(tmp_path, [37, 23, 50], fmt=fmt)
    loader, ref = DataLoader(tmp_path, B, T), ReferenceLoader(shards, B, T)
    for _ in range(40):  # several epochs, rolling over every shard
        (x, y), (rx, ry) = loader.next_batch(), ref.next_batch()
        assert x.dtype == np.int64 and x.shape == (B, T)
        np.testing.assert_array_equal(x, rx)
        np.testing.assert_array_equal(y, ry)


def test_rollover_starts_the_next_shard(tmp_path):
    B, T = 2, 4  # 8 tokens a batch, 9 read
    shards = make_shards(tmp_path, [20, 30])
    loader = DataLoader(tmp_path, B, T)
    first, second, third = (loader.next_batch()[0] for _ in range(3))
    np.testing.assert_array_equal(first.ravel(), shards[0][:8])
    np.testing.assert_array_equal(second.ravel(), shards[0][8:16])  # 16 + 9 > 20: roll over
    np.testing.assert_array_equal(third.ravel(), shards[1][:8])
    assert (loader.epoch, loader.shard_index) == (0, 1)


def test_ranks_read_adjacent_slices(tmp_path):
    """Ranks r of R read at base + B*T*r and step by B*T*R: together they read what
    one process with R*B rows reads, shard rollovers included."""
    B, T, R = 2, 3, 3
    make_shards(tmp_path, [100, 61, 80])
    ranks = [DataLoader(tmp_path, B, T, rank=r, world_size=R) for r in range(R)]
    whole = DataLoader(tmp_path, R * B, T)
    for _ in range(20):
        xs, ys = zip(*(loader.next_batch() for loader in ranks))
        x, y = whole.next_batch()
        np.testing.assert_array_equal(np.concatenate(xs), x)
        np.testing.assert_array_equal(np.concatenate(ys), y)
        assert len({(loader.epoch, loader.shard_index) for loader in ranks}) == 1  # in step


def test_rank_offsets(tmp_path):
    B, T = 2, 4
    shards = make_shards(tmp_path, [200])
    x1, _ = DataLoader(tmp_path, B, T, rank=1, world_size=2).next_batch()
    np.testing.assert_array_equal(x1.ravel(), shards[0][B * T : 2 * B * T])
    with pytest.raises(ValueError, match="rank 2 is outside world_size 2"):
        DataLoader(tmp_path, B, T, rank=2, world_size=2)


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_round_trip(tmp_path, shuffle):
    make_shards(tmp_path, [50, 41, 66], seed=1)
    a = DataLoader(tmp_path, 2, 4, shuffle=shuffle, seed=7)
    for _ in range(13):
        a.next_batch()
    state = a.state()
    b = DataLoader(tmp_path, 2, 4, shuffle=shuffle, seed=7)
    b.load_state(state)
    for _ in range(30):  # across shard and epoch boundaries
        np.testing.assert_array_equal(a.next_batch()[0], b.next_batch()[0])


def test_load_state_rejects_another_setup(tmp_path):
    make_shards(tmp_path, [100])
    state = DataLoader(tmp_path, 2, 4).state()
    with pytest.raises(DataError, match="B=2, but this loader has B=3"):
        DataLoader(tmp_path, 3, 4).load_state(state)
    with pytest.raises(DataError, match="world_size"):
        DataLoader(tmp_path, 2, 4, rank=0, world_size=2).load_state(state)


def test_shuffle_is_seeded_and_off_by_default(tmp_path):
    make_shards(tmp_path, [300] * 5)
    # documents: put an EOT every 10 tokens so there are documents to shuffle
    for i in range(5):
        path = tmp_path / f"x_train_{i:06d}.npy"
        tokens = np.array(read_shard(path))
        tokens[::10] = EOT_TOKEN
        write_shard(path, tokens)

    def stream(**kw):
        loader = DataLoader(tmp_path, 2, 8, **kw)
        return np.concatenate([loader.next_batch()[0].ravel() for _ in range(60)])

    plain = stream()
    np.testing.assert_array_equal(plain, stream(shuffle=False, seed=123))  # seed unused when off
    np.testing.assert_array_equal(stream(shuffle=True, seed=1), stream(shuffle=True, seed=1))
    assert not np.array_equal(stream(shuffle=True, seed=1), stream(shuffle=True, seed=2))
    assert not np.array_equal(stream(shuffle=True, seed=1), plain)


def test_shuffle_documents_keeps_every_document():
    def docs(t):  # the documents of a stream that starts with <|endoftext|>
        return sorted(tuple(p.tolist()) for p in np.split(t, np.flatnonzero(t == EOT_TOKEN)[1:]))

    tokens = np.array([EOT_TOKEN, 1, 2, EOT_TOKEN, 3, EOT_TOKEN, 4, 4, 4, EOT_TOKEN, 9], dtype=np.uint16)
    outs = {tuple(shuffle_documents(tokens, np.random.default_rng(s)).tolist()) for s in range(20)}
    assert len(outs) > 1  # the order does change
    for out in outs:
        assert docs(np.array(out)) == docs(tokens)
    # a shard that opens mid-document: that tail [5, 6] moves as one piece
    tailed = np.concatenate([[5, 6], tokens]).astype(np.uint16)
    for s in range(20):
        out = shuffle_documents(tailed, np.random.default_rng(s)).tolist()
        i = out.index(5)
        assert out[i + 1] == 6 and sorted(out) == sorted(tailed.tolist())


def test_short_shards_are_skipped_or_refused(tmp_path, capsys):
    shards = make_shards(tmp_path, [5, 40])
    loader = DataLoader(tmp_path, 2, 4)  # needs 9 tokens a round
    assert "skipping 1 train shard" in capsys.readouterr().out
    np.testing.assert_array_equal(loader.next_batch()[0].ravel(), shards[1][:8])
    with pytest.raises(DataError, match="too short.*needs B\\*T\\*ranks\\+1 = 81"):
        DataLoader(tmp_path, 4, 10, world_size=2)


# ---- edge cases, against an independent restatement of the loader ---------------------


def restated_batches(shards, B, T, rank=0, world_size=1, shuffle=False, seed=0):
    """The batches rank `rank` reads, written out from the loader's contract (module
    docstring of data.py), not from its code: epoch after epoch, the shards in order
    (shuffled per epoch: permutation of default_rng([seed, epoch])), each shard's
    documents shuffled by default_rng([seed, epoch, shard]); in a shard, round r
    gives rank k the B*T+1 tokens at r*B*T*R + k*B*T, for every round that fits whole
    (B*T*R + 1 tokens from its start). Shards too short for one round are skipped."""
    step = B * T * world_size
    usable = [i for i, s in enumerate(shards) if len(s) >= step + 1]
    epoch = 0
    while True:
        order = (np.random.default_rng([seed, epoch]).permutation(len(usable)) if shuffle
                 else range(len(usable)))
        for k in order:
            tokens = np.asarray(shards[usable[k]])
            if shuffle:
                starts = list(np.flatnonzero(tokens == EOT_TOKEN))
                starts = starts if starts and starts[0] == 0 else [0] + starts
                docs = [tokens[a:b] for a, b in zip(starts, starts[1:] + [len(tokens)])]
                perm = np.random.default_rng([seed, epoch, int(k)]).permutation(len(docs))
                tokens = np.concatenate([docs[i] for i in perm])
            rounds = (len(tokens) - 1) // step  # whole rounds, each with its one target past the end
            for r in range(rounds):
                start = r * step + rank * B * T
                buf = tokens[start : start + B * T + 1].astype(np.int64)
                yield buf[:-1].reshape(B, T), buf[1:].reshape(B, T), epoch
        epoch += 1


def documents_shards(folder, lengths, seed=0):
    """Train shards of the given lengths, with <|endoftext|> every few tokens."""
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    arrays = []
    for i, n in enumerate(lengths):
        tokens = rng.integers(0, 50000, n).astype(np.uint16)
        tokens[rng.random(n) < 0.15] = EOT_TOKEN
        write_shard(os.path.join(folder, f"d_train_{i:06d}.npy"), tokens)
        arrays.append(tokens)
    return arrays


@pytest.mark.parametrize("world_size", [1, 2])
def test_shards_of_exactly_whole_rounds_are_read_to_the_last_token(tmp_path, world_size):
    """Lengths k*B*T*R + 1 fit their last round exactly: it is read, then the next
    shard starts (an off-by-one `>=` for `>` would skip that last round)."""
    B, T = 2, 3
    step = B * T * world_size
    lengths = [step + 1, 3 * step + 1, 2 * step + 1, 2 * step, step + 2]  # exact, exact, exact, one short, one over
    shards = make_shards(tmp_path, lengths)
    for rank in range(world_size):
        loader = DataLoader(tmp_path, B, T, rank=rank, world_size=world_size)
        expected = restated_batches(shards, B, T, rank, world_size)
        rounds = sum((n - 1) // step for n in lengths)
        for _ in range(2 * rounds + 1):  # two epochs and a bit
            x, y = loader.next_batch()
            ex, ey, epoch = next(expected)
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)
        assert loader.epoch == 2


def test_a_shuffled_loader_draws_a_new_order_every_epoch(tmp_path):
    """Carried across epoch boundaries (and through a state round trip mid-epoch), the
    shuffled loader reads what the restatement reads: each epoch its own shard order
    and document shuffle, so an epoch counter that never moved would fail here."""
    B, T = 2, 8
    shards = documents_shards(tmp_path, [97, 61, 150, 17, 80])
    loader = DataLoader(tmp_path, B, T, shuffle=True, seed=5)
    expected = restated_batches(shards, B, T, shuffle=True, seed=5)
    per_epoch = sum((len(s) - 1) // (B * T) for s in shards if len(s) > B * T)
    epochs_seen = []
    for i in range(3 * per_epoch + 2):
        if i == per_epoch + 3:  # resume mid-epoch 1 in a new loader
            state = loader.state()
            loader = DataLoader(tmp_path, B, T, shuffle=True, seed=5)
            loader.load_state(state)
        x, y = loader.next_batch()
        ex, ey, epoch = next(expected)
        np.testing.assert_array_equal(x, ex, err_msg=f"batch {i} (epoch {epoch})")
        np.testing.assert_array_equal(y, ey)
        epochs_seen.append(epoch)
    assert loader.epoch == 3 and sorted(set(epochs_seen)) == [0, 1, 2, 3]
    orders = [list(np.random.default_rng([5, e]).permutation(4)) for e in range(3)]
    assert len({tuple(o) for o in orders}) > 1  # the seed gives epochs different orders: the test can tell


def test_token_ids_outside_the_vocabulary_are_named(tmp_path):
    from nanogpt_np.data import check_token_ids

    good = make_shards(tmp_path, [100])
    bad = np.full(50, 7, dtype=np.uint16)
    bad[31] = 65514
    path = write_shard(tmp_path / "x_train_000009.npy", bad)
    check_token_ids([tmp_path / "x_train_000000.npy"], 50304)
    with pytest.raises(DataError, match=r"x_train_000009.npy: token 31 is id 65514, outside the vocabulary \[0, 50304\)"):
        check_token_ids([tmp_path / "x_train_000000.npy", path], 50304)
    assert good[0].max() < 50257
    check_token_ids([path], 65536)  # a model with that many tokens reads it
