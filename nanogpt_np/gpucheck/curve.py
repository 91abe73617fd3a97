"""Section 6: bf16 tracks float32 on real text."""
from pathlib import Path

import numpy as np

from nanogpt_np.kernels import loader

from . import settings
from .table import free_gpu_memory, record
from .training_checks import train


# ---- 6. bf16 tracks float32 on real text -----------------------------------------------------

def text_tokens(path):
    """(token ids, where they came from). A .npy of ids; a text file through GPT-2's
    BPE (nanogpt_np.tokenizer), or its UTF-8 bytes where that tokenizer is not
    installed; no path: the bytes of this Python's standard library sources."""
    if path and str(path).endswith(".npy"):
        tokens = np.load(path, allow_pickle=False).astype(np.int64)
        return tokens, f"{Path(path).name}: {tokens.size:,} GPT-2 tokens"
    if path:
        text = Path(path).read_text(encoding="utf-8")
        try:
            from nanogpt_np.tokenizer import get_encoding

            return np.array(get_encoding().encode_ordinary(text), dtype=np.int64), f"{Path(path).name}, GPT-2 BPE"
        except Exception as e:  # the tokenizer files are not installed here
            data = text.encode("utf-8")
            why = type(e).__name__
            return np.frombuffer(data, dtype=np.uint8).astype(np.int64), f"{Path(path).name}, bytes ({why})"
    from nanogpt_np.corpus import stdlib_files

    root, files = stdlib_files()
    chunks, size = [], 0
    for rel in files:
        data = (root / rel).read_bytes()
        chunks.append(data)
        size += len(data)
        if size > 4_000_000:
            break
    return np.frombuffer(b"".join(chunks), dtype=np.uint8).astype(np.int64), "stdlib sources as bytes"


def section_curve(args):
    cfg, steps, B, T = settings.SIZES["curve"]
    stream, source = text_tokens(args.text)
    stream = stream[stream < cfg.vocab_size]

    def run():
        loader.sync_each_launch(False)
        low, _ = train(cfg, "cupy", stream, steps, B, T, dtype="bf16", lr=6e-4, warmup=10)
        free_gpu_memory()
        full, _ = train(cfg, "cupy", stream, steps, B, T, dtype=np.float32, lr=6e-4, warmup=10)
        free_gpu_memory()
        diff = np.abs(low - full) / np.abs(full)
        return dict(result=f"max rel diff {diff.max():.2e} (step {int(diff.argmax())}), mean {diff.mean():.1e}; loss "
                           f"{full[0]:.3f} -> {full[-1]:.3f} (f32) / {low[-1]:.3f} (bf16); {source}",
                    limit="1e-02", ok=bool(diff.max() <= 1e-2 and full[-1] < full[0]),
                    metrics={"curve_bf16": low.tolist(), "curve_f32": full.tolist()})

    record("6", f"{steps} steps 124M B{B} T{T}: bf16 vs f32 loss", run)
