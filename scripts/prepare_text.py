"""Tokenize text files into training shards, with a validation split.

    python3 scripts/prepare_text.py ../shared/data/tinyshakespeare.txt --out data/shakespeare
    python3 scripts/train.py --preset tiny --data-dir data/shakespeare

Each file is one document (it starts with <|endoftext|>); the first --val-fraction
of all tokens becomes `{prefix}_val_000000.npy`, the rest `{prefix}_train_*.npy`.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_np.prepare import prepare_text_files  # noqa: E402


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be a whole number >= 1")
    return value


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    p.add_argument("--out", required=True, help="output folder for the shards")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of tokens for val, in (0, 1) (default 0.1)")
    p.add_argument("--shard-size", type=positive, default=10**8, help="tokens per shard (default 1e8)")
    p.add_argument("--prefix", default="text", help="shard name prefix (default: text)")
    p.add_argument("--workers", type=positive, default=1, help="tokenizer processes (default 1)")
    p.add_argument("--errors", choices=("strict", "replace"), default="strict",
                   help="bytes that are not UTF-8: strict refuses the file, replace reads them as U+FFFD")
    args = p.parse_args(argv)
    missing = [f for f in args.files if not os.path.isfile(f)]
    if missing:
        p.error(f"no such file: {', '.join(missing)}")
    try:
        val, train = prepare_text_files(args.files, args.out, args.val_fraction, args.shard_size,
                                        args.prefix, args.workers, log=lambda *a: print(*a, flush=True),
                                        errors=args.errors)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted; nothing was written to {args.out}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(130)  # now: the tokenizer threads still running are not waited for
    print(f"{len(val)} val and {len(train)} train shard(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
