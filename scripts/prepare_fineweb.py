"""Download FineWeb-Edu (sample-10BT) and tokenize it into 100M-token shards.

    pip install -e '.[fineweb]'        # the `datasets` library
    python3 scripts/prepare_fineweb.py --out edu_fineweb10B
    python3 scripts/train.py --data-dir edu_fineweb10B

As build-nanogpt's fineweb.py: the GPT-2 tokenizer in parallel worker processes,
every document starting with <|endoftext|>, shards of 100M uint16 tokens,
shard 0 the val split (`edufineweb_val_000000.npy`), the other ~99 train.
Needs the network and ~100 GB of disk for the Hugging Face cache and the shards.
The tokenize-and-shard code is nanogpt_np.prepare.shard_documents, tested on local text.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from nanogpt_np.prepare import shard_documents  # noqa: E402


def load_fineweb(remote_name):
    """The dataset's train split, downloaded and cached by `datasets` (imported only here)."""
    try:
        from datasets import load_dataset
    except ImportError:
        sys.exit("prepare_fineweb.py needs the `datasets` library: pip install datasets "
                 "(or pip install -e '.[fineweb]')")
    return load_dataset("HuggingFaceFW/fineweb-edu", name=remote_name, split="train")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="edu_fineweb10B", help="output folder (default edu_fineweb10B)")
    p.add_argument("--remote-name", default="sample-10BT", help="FineWeb-Edu subset (default sample-10BT)")
    p.add_argument("--shard-size", type=int, default=10**8, help="tokens per shard (default 1e8)")
    p.add_argument("--prefix", default="edufineweb", help="shard name prefix (default edufineweb)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                   help="tokenizer processes (default: half the CPUs)")
    args = p.parse_args(argv)
    docs = load_fineweb(args.remote_name)
    val, train = shard_documents(docs, args.out, args.prefix, args.shard_size,
                                 val_tokens=args.shard_size, workers=args.workers, log=print)
    print(f"{len(val)} val and {len(train)} train shard(s) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
