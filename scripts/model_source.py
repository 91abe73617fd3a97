"""The options that pick a model to run, shared by sample.py and hellaswag.py.

One of:
  --pretrained NAME_OR_DIR   Hugging Face GPT-2: "gpt2", "gpt2-medium", "gpt2-large",
                             "gpt2-xl" (local Hugging Face cache, else downloaded),
                             or a directory with config.json + model.safetensors
  --llmc-bin PATH            an llm.c model file such as gpt2_124M.bin
  --ckpt PATH                a training checkpoint of scripts/train.py (log/model_XXXXX.npz)
"""
import numpy as np

from nanogpt_np import GPT, GPTConfig, checkpoint
from nanogpt_np.backend import BACKENDS
from nanogpt_np import pretrained


def add_model_args(parser):
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--pretrained", metavar="NAME_OR_DIR",
                        help="Hugging Face GPT-2 name (gpt2, gpt2-medium, gpt2-large, gpt2-xl) or a "
                             "directory with config.json and model.safetensors")
    source.add_argument("--llmc-bin", metavar="PATH", help="an llm.c model file (e.g. gpt2_124M.bin)")
    source.add_argument("--ckpt", metavar="PATH", help="a checkpoint of scripts/train.py (log/model_XXXXX.npz)")
    parser.add_argument("--no-download", action="store_true",
                        help="with --pretrained NAME: fail instead of downloading when not cached")
    parser.add_argument("--backend", choices=BACKENDS, default="numpy", help="numpy (CPU) or cupy (GPU)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    return source


def load_model(args):
    dtype = np.dtype(args.dtype)
    if args.pretrained is not None:
        return GPT.from_pretrained(args.pretrained, dtype=dtype, backend=args.backend,
                                   download=not args.no_download)
    if args.ckpt is not None:
        return load_training_checkpoint(args.ckpt, dtype, args.backend)
    return pretrained.load_llmc(args.llmc_bin, dtype=dtype, backend=args.backend)


def load_training_checkpoint(path, dtype, backend):
    """The model of a training checkpoint (its weights only), in the dtype asked for."""
    ckpt = checkpoint.load_checkpoint(path)
    model = GPT(GPTConfig(**ckpt["meta"]["model_config"]), dtype=dtype, backend=backend, init_weights=False)
    model.load_state_dict(ckpt["params"])
    return model


if __name__ == "__main__":  # not a command of its own: say whose options these are
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="model_source.py", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__ + "\nThis file is not a command: run scripts/sample.py or scripts/hellaswag.py "
                              "with these options.")
    add_model_args(parser)
    if not {"-h", "--help"} & set(sys.argv[1:]):
        parser.print_help(sys.stderr)
        sys.exit(2)
    parser.parse_args()
