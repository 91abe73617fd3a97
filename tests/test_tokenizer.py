import hashlib

import pytest

from nanogpt_np import tokenizer


def test_bpe_files_have_tiktokens_hashes():
    for path, expected in zip(tokenizer.bpe_files(), (tokenizer.VOCAB_BPE_SHA256, tokenizer.ENCODER_JSON_SHA256)):
        with open(path, "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == expected


def test_pattern_is_tiktokens_gpt2_pattern():
    from tiktoken_ext import openai_public

    assert tokenizer.GPT2_PATTERN == openai_public.r50k_pat_str


def test_known_encoding_and_eot():
    enc = tokenizer.get_encoding()
    assert enc.encode("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert enc.eot_token == 50256 and enc.n_vocab == 50257
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [50256]
    text = "def f(x):\n    return x ** 2  # ünïcödé"
    assert enc.decode(enc.encode(text)) == text


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "vocab.bpe"
    bad.write_text("not the file")
    with pytest.raises(RuntimeError, match="vocab.bpe has sha256"):
        tokenizer.verify_file(str(bad), tokenizer.VOCAB_BPE_SHA256)
