"""Token shards on disk, and the loader that cuts them into (B, T) batches.

Two shard formats, both a flat run of uint16 GPT-2 token ids:
  - `.npy`, as build-nanogpt's fineweb.py writes them (`np.save` of a uint16 array);
  - `.bin`, as llm.c writes them: a header of 256 int32 (magic 20240520, version 1,
    token count, then zeros), then the tokens.
A split is picked by name: `edufineweb_train_000001.npy`, `tiny_shakespeare_val.bin`.
Every shard is checked before training starts (header, size, dtype, and with
check_token_ids every token id against the vocabulary), so a bad file fails now,
naming the file and the problem, not hours into a run. Nothing is ever
unpickled: `.npy` headers are parsed with allow_pickle off, and the tokens are
memory-mapped, so a 100M-token shard costs no RAM until it is read.

The loader is build-nanogpt's DataLoaderLite. Rank r of R reads its batch at
`base + B*T*r`, and `base` steps by B*T*R, so the ranks read disjoint, adjacent
slices. When the next round of batches no longer fits in the shard, all ranks move
to the next shard together (build-nanogpt tests this on each rank's own position,
which can let ranks drift onto different shards; testing the shared `base` keeps
them in step, and is the same thing for one process). The shard order repeats
forever; each pass is an epoch.

Optionally (off by default) each epoch visits the shards in a shuffled order, and
each shard's documents (split where `<|endoftext|>` starts one) are shuffled. The
shuffles are drawn from (seed, epoch, shard), so `state()` needs only the epoch,
the shard and the position to resume on exactly the next batch.

Another number of ranks. The ranks share one position (epoch, shard, base): the
tokens before `base` in the current shard have all been read, by someone. So a
state saved by M ranks can be continued by N ranks (or with another B):
`load_state(state, reshard=True)` keeps the position and lets the new ranks cut
the rest of the shard their way. No token is read twice within the epoch, and
`tokens` (all ranks' tokens read so far) carries over. What changes: which rank
reads which sequence, and how much of each shard's tail is too short for a round
and skipped, so the losses after such a resume are not bit-identical to a run that
kept its rank count.
"""
import os
import re
import time

import numpy as np

from .tokenizer import EOT_TOKEN

BIN_MAGIC = 20240520
BIN_VERSION = 1
BIN_HEADER_INTS = 256
BIN_HEADER_BYTES = BIN_HEADER_INTS * 4
SHARD_SUFFIXES = (".npy", ".bin")
TOKEN_DTYPE = np.dtype("<u2")  # uint16, little-endian: GPT-2's 50257 ids fit


class DataError(ValueError):
    """A missing, empty or corrupt data shard; the message names the file."""


# ---- reading one shard ------------------------------------------------------------


def read_shard(path):
    """The tokens of one shard as a read-only 1-D uint16 array (memory-mapped)."""
    path = os.fspath(path)
    if path.endswith(".npy"):
        return _read_npy(path)
    if path.endswith(".bin"):
        return _read_bin(path)
    raise DataError(f"{path}: not a shard; shards end in .npy or .bin")


def _read_npy(path):
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
        except ValueError as e:
            raise DataError(f"{path}: not a valid .npy file ({e})") from e
        offset = f.tell()
    if dtype != TOKEN_DTYPE:
        raise DataError(
            f"{path}: tokens have dtype {dtype}, but shards hold uint16 ids; rewrite it with "
            "nanogpt_np.data.write_shard(path, tokens), which refuses ids that do not fit in uint16, "
            "or with scripts/prepare_text.py"
        )
    if len(shape) != 1:
        raise DataError(f"{path}: shape {shape}, but a shard is a 1-D array of tokens")
    expected = offset + shape[0] * TOKEN_DTYPE.itemsize
    _check_size(path, size, expected, shape[0])
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=offset, shape=shape)


def _read_bin(path):
    size = os.path.getsize(path)
    if size < BIN_HEADER_BYTES:
        raise DataError(
            f"{path}: truncated: {size} bytes, shorter than the {BIN_HEADER_BYTES}-byte llm.c header"
        )
    header = np.fromfile(path, dtype="<i4", count=BIN_HEADER_INTS)
    magic, version, ntok = (int(v) for v in header[:3])
    if magic != BIN_MAGIC:
        raise DataError(
            f"{path}: wrong magic number {magic} (llm.c token shards start with {BIN_MAGIC}); "
            "this is not an llm.c data shard, or it is corrupt"
        )
    if version != BIN_VERSION:
        raise DataError(
            f"{path}: llm.c shard version {version}, but only version {BIN_VERSION} (uint16 tokens) "
            "is supported"
        )
    if ntok < 0:
        raise DataError(f"{path}: header says {ntok} tokens")
    _check_size(path, size, BIN_HEADER_BYTES + 2 * ntok, ntok)
    return np.memmap(path, dtype=TOKEN_DTYPE, mode="r", offset=BIN_HEADER_BYTES, shape=(ntok,))


def _check_size(path, size, expected, ntok):
    if ntok == 0:
        raise DataError(f"{path}: the shard holds no tokens")
    if size < expected:
        raise DataError(
            f"{path}: truncated: {size} bytes, but its header promises {ntok} tokens "
            f"({expected} bytes); the write was probably interrupted, so recreate it"
        )
    if size > expected:
        raise DataError(
            f"{path}: {size - expected} bytes after the {ntok} tokens its header declares; "
            "the file is corrupt or not a token shard"
        )


# ---- writing one shard (atomically) -------------------------------------------------


def write_shard(path, tokens):
    """Write tokens to `path` (.npy or llm.c .bin), via a temporary file and a rename,
    so a killed process never leaves a half-written shard under the real name."""
    path = os.fspath(path)
    tokens = np.asarray(tokens)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= 2**16):
        raise ValueError(f"{path}: token ids must fit in uint16, got range [{tokens.min()}, {tokens.max()}]")
    tokens = tokens.astype(TOKEN_DTYPE, copy=False).reshape(-1)
    if not path.endswith(SHARD_SUFFIXES):
        raise ValueError(f"{path}: a shard name must end in .npy or .bin")
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if path.endswith(".npy"):
                np.save(f, tokens, allow_pickle=False)
            else:
                header = np.zeros(BIN_HEADER_INTS, dtype="<i4")
                header[:3] = BIN_MAGIC, BIN_VERSION, tokens.size
                f.write(header.tobytes())
                f.write(tokens.tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a full disk or a Ctrl-C: no half shard left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ---- finding a split's shards -------------------------------------------------------


def find_shards(data_dir, split):
    """Sorted paths of the shards in data_dir whose name has `split` as a word
    (`x_train_000001.npy`, `x_val.bin`)."""
    data_dir = os.fspath(data_dir)
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} is a file, not a folder of shards; give the folder "
                        "scripts/prepare_text.py --out wrote, or omit --data-dir")
    if not os.path.isdir(data_dir):
        raise DataError(f"data directory {data_dir} does not exist; prepare shards with "
                        "scripts/prepare_text.py or scripts/prepare_fineweb.py, or omit --data-dir")
    word = re.compile(rf"(^|[_.\-]){re.escape(split)}([_.\-]|$)")
    names = sorted(
        n for n in os.listdir(data_dir)
        if n.endswith(SHARD_SUFFIXES) and word.search(n[: -len(".npy")])
    )
    if not names:
        raise DataError(
            f"no {split} shards in {data_dir}: expected files named like *_{split}_*.npy or "
            f"*_{split}*.bin; prepare them with scripts/prepare_text.py or scripts/prepare_fineweb.py"
        )
    return [os.path.join(data_dir, n) for n in names]


# ---- every token id checked before training ------------------------------------------

SCAN_CHUNK = 1 << 24  # tokens per piece of a shard's scan (32 MiB of uint16)


def check_token_ids(paths, vocab_size, log=None, every_seconds=5.0):
    """Raise DataError naming the first shard holding an id outside [0, vocab_size)
    (uint16 ids are never negative, so the maximum decides). Reads each shard once,
    in pieces; says how far it is every `every_seconds` when it takes that long."""
    t0 = last = time.perf_counter()
    total = len(paths)
    for done, path in enumerate(paths):
        tokens = read_shard(path)
        for start in range(0, tokens.size, SCAN_CHUNK):
            piece = np.asarray(tokens[start : start + SCAN_CHUNK])
            top = int(piece.max())
            if top >= vocab_size:
                at = start + int(np.argmax(piece >= vocab_size))
                raise DataError(
                    f"{path}: token {at:,} is id {int(piece[at - start])}, outside the vocabulary [0, {vocab_size}) "
                    f"(the shard's largest id is {int(tokens.max())}); it was made for another tokenizer or is "
                    "corrupt: re-create it with scripts/prepare_text.py, or raise --vocab-size if the model "
                    "is meant to have more tokens")
            if log and time.perf_counter() - last > every_seconds:
                last = time.perf_counter()
                log(f"checking token ids: shard {done + 1} of {total} ({time.perf_counter() - t0:.0f}s)")
    if log and last != t0:
        log(f"checked the token ids of {total} shard(s) in {time.perf_counter() - t0:.1f}s")


# ---- the loader -----------------------------------------------------------------------


class DataLoader:
    """(B, T) batches of one split for rank `rank` of `world_size`.

    next_batch() -> (x, y): int64 host arrays (B, T), y is x shifted by one token.
    Move them to the model's device with backend.to_device.
    """

    def __init__(self, data_dir, B, T, split="train", rank=0, world_size=1, shuffle=False, seed=0):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.B, self.T, self.split = int(B), int(T), split
        self.rank, self.world_size = int(rank), int(world_size)
        self.shuffle, self.seed = bool(shuffle), int(seed)
        self.data_dir = os.fspath(data_dir)
        self.shards = self._usable_shards(find_shards(self.data_dir, split))
        self.reset()

    @property
    def round_tokens(self):
        """Tokens all ranks read in one round of batches, plus the one target past the end."""
        return self.B * self.T * self.world_size + 1

    def _usable_shards(self, paths):
        """Validate every shard now; skip (with a note) any too short for one round."""
        lengths = {p: read_shard(p).size for p in paths}
        usable = [p for p in paths if lengths[p] >= self.round_tokens]
        short = [p for p in paths if lengths[p] < self.round_tokens]
        need = f"one batch for {self.world_size} rank(s) needs B*T*ranks+1 = {self.round_tokens} tokens"
        if not usable:
            raise DataError(
                f"every {self.split} shard in {self.data_dir} is too short: {need}, but the longest has "
                f"{max(lengths.values())}; use a smaller --batch-size / --block-size or more data"
            )
        if short and self.rank == 0:
            print(f"note: skipping {len(short)} {self.split} shard(s) shorter than {self.round_tokens} "
                  f"tokens ({need}): {', '.join(os.path.basename(p) for p in short)}")
        return usable

    def reset(self):
        """Back to the first batch of the first shard (build-nanogpt resets val this way)."""
        self.epoch, self.shard_index, self.base = 0, 0, 0
        self.tokens_read = 0  # by all ranks together, since the start of the run
        self._load_current_shard()

    def shard_order(self, epoch):
        """Indices into self.shards in the order epoch `epoch` visits them."""
        if not self.shuffle:
            return np.arange(len(self.shards))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))

    def _load_current_shard(self):
        shard_id = int(self.shard_order(self.epoch)[self.shard_index])
        tokens = read_shard(self.shards[shard_id])
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, shard_id])
            tokens = shuffle_documents(tokens, rng)
        self.tokens = tokens

    def next_batch(self):
        B, T = self.B, self.T
        start = self.base + B * T * self.rank
        buf = np.asarray(self.tokens[start : start + B * T + 1], dtype=np.int64)
        x = buf[:-1].reshape(B, T)  # inputs
        y = buf[1:].reshape(B, T)  # targets: the next token of each input
        self.base += B * T * self.world_size
        self.tokens_read += B * T * self.world_size
        if self.base + self.round_tokens > self.tokens.size:  # the next round would run off the end
            self._advance_shard()
        return x, y

    def _advance_shard(self):
        self.base, self.shard_index = 0, self.shard_index + 1
        if self.shard_index == len(self.shards):
            self.shard_index, self.epoch = 0, self.epoch + 1
        self._load_current_shard()

    # ---- resuming ---------------------------------------------------------------------

    def state(self):
        """Where the next batch comes from, as JSON-able values."""
        return {
            "split": self.split, "B": self.B, "T": self.T,
            "rank": self.rank, "world_size": self.world_size,
            "shuffle": self.shuffle, "seed": self.seed,
            "shards": [os.path.basename(p) for p in self.shards],
            "epoch": self.epoch, "shard_index": self.shard_index, "base": self.base,
            "tokens": self.tokens_read,
        }

    def load_state(self, state, reshard=False):
        """Continue from state(): the next batch is the one the saved loader would have
        read. reshard=True: the state may come from another number of ranks or another
        B; the position is kept and this loader's ranks cut the rest of the shard."""
        mine = self.state()
        keys = ["split", "T", "shuffle", "shards"] + ([] if reshard else ["B", "rank", "world_size"])
        if self.shuffle:
            keys.append("seed")  # the seed picks the order only when shuffling
        for key in keys:
            if state[key] != mine[key]:
                raise DataError(
                    f"loader state was saved with {key}={state[key]!r}, but this loader has "
                    f"{key}={mine[key]!r} ({self.data_dir}); resume with the same data, batch "
                    "shape, number of ranks and shuffle settings"
                )
        if not 0 <= state["shard_index"] < len(self.shards):
            raise DataError(f"loader state shard_index {state['shard_index']} is outside the {len(self.shards)} "
                            f"{self.split} shard(s) of {self.data_dir}")
        self.epoch, self.shard_index, self.base = state["epoch"], state["shard_index"], state["base"]
        self.tokens_read = int(state.get("tokens", 0))  # absent in states saved before it was kept
        self._load_current_shard()
        fits = self.base + (0 if reshard else self.round_tokens) <= self.tokens.size
        if self.base < 0 or not fits:
            raise DataError(f"loader state position {self.base} is past what shard {self.shards[self.shard_index]} "
                            f"holds ({self.tokens.size} tokens); the state does not belong to this data")
        if reshard and self.base + self.round_tokens > self.tokens.size:
            self._advance_shard()  # what is left of the shard is too short for this loader's round


def shuffle_documents(tokens, rng):
    """The shard's documents in a random order. A document starts at each
    <|endoftext|>; tokens before the first one (the tail of a document cut at the
    previous shard's end) count as one more document."""
    starts = np.flatnonzero(np.asarray(tokens) == EOT_TOKEN)
    if starts.size == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts])
    documents = np.split(np.asarray(tokens), starts[1:])
    order = rng.permutation(len(documents))
    return np.concatenate([documents[i] for i in order])
