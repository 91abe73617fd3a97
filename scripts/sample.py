"""Sample text from a GPT-2, with a key/value cache (one position per new token).

    python scripts/sample.py --pretrained gpt2 --prompt "Hello, I'm a language model," \
        --num-samples 4 --max-new-tokens 64 --top-k 50 --seed 42
"""
import argparse
import sys
import time

import numpy as np

from model_source import add_model_args, load_model
from nanogpt_np.pretrained import GPT2_VOCAB, resize_vocab
from nanogpt_np.tokenizer import EOT_TOKEN, get_encoding


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--prompt", default="Hello, I'm a language model,",
                   help="text to continue ('' starts from <|endoftext|>)")
    p.add_argument("--num-samples", type=int, default=4, help="continuations, sampled as one batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    p.add_argument("--top-k", type=int, default=50, help="sample among the k most likely tokens (0: all)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--no-cache", action="store_true", help="run the whole context for every token (slow)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.num_samples < 1:
        sys.exit("error: --num-samples must be at least 1")
    enc = get_encoding()
    try:
        model = load_model(args)
        if model.config.vocab_size > GPT2_VOCAB:
            # padding rows are no token: drop them so they can never be sampled
            model = resize_vocab(model, GPT2_VOCAB)
        prompt = enc.encode(args.prompt) if args.prompt else [EOT_TOKEN]
        T = model.config.block_size
        if len(prompt) > T:  # generate crops its context to the window; say so, not silently
            print(f"note: the prompt is {len(prompt)} tokens, longer than the model's context of {T}: its first "
                  f"{len(prompt) - T} tokens are not seen (the samples still print the whole prompt)",
                  file=sys.stderr)
        idx = np.tile(np.array(prompt, dtype=np.int64), (args.num_samples, 1))  # (B, T)
        t0 = time.perf_counter()
        out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                             top_k=args.top_k or None, seed=args.seed, use_cache=not args.no_cache)
        seconds = time.perf_counter() - t0
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"error: {e}")
    for i, row in enumerate(out):
        print(f"sample {i}: {enc.decode(row.tolist())}")
    tokens = args.num_samples * args.max_new_tokens
    print(f"{tokens} tokens in {seconds:.2f} s ({tokens / max(seconds, 1e-9):.1f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
