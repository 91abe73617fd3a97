"""GPT-2's shape: GPTConfig, the parameter names and shapes (GPT-2 checkpoint order),
and build-nanogpt's initialisation. Plain data: no arrays are made here, so a config
read from a file can be checked before anything is allocated.
"""
import math
from dataclasses import dataclass

import numpy as np

WTE = "transformer.wte.weight"
WPE = "transformer.wpe.weight"
LN_F_WEIGHT = "transformer.ln_f.weight"
LM_HEAD = "lm_head.weight"  # tied: the same array as WTE


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (rows of wpe)
    vocab_size: int = 50257  # GPT-2's; training pads it to 50304, a multiple of 128
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        for field in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
                raise ValueError(f"GPTConfig.{field} must be a positive integer, got {value!r}")
            setattr(self, field, int(value))
        if self.n_embd % self.n_head:
            raise ValueError(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                "choose n_embd = n_head * head_size"
            )

    def to_dict(self):
        return {f: getattr(self, f) for f in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd")}


def parameter_shapes(config):
    """[(name, shape)] of every trainable array, in GPT-2 checkpoint order."""
    C, L = config.n_embd, config.n_layer
    shapes = [(WTE, (config.vocab_size, C)), (WPE, (config.block_size, C))]
    for i in range(L):
        h = f"transformer.h.{i}."
        shapes += [
            (h + "ln_1.weight", (C,)),
            (h + "ln_1.bias", (C,)),
            (h + "attn.c_attn.weight", (3 * C, C)),
            (h + "attn.c_attn.bias", (3 * C,)),
            (h + "attn.c_proj.weight", (C, C)),
            (h + "attn.c_proj.bias", (C,)),
            (h + "ln_2.weight", (C,)),
            (h + "ln_2.bias", (C,)),
            (h + "mlp.c_fc.weight", (4 * C, C)),
            (h + "mlp.c_fc.bias", (4 * C,)),
            (h + "mlp.c_proj.weight", (C, 4 * C)),
            (h + "mlp.c_proj.bias", (C,)),
        ]
    shapes += [("transformer.ln_f.weight", (C,)), ("transformer.ln_f.bias", (C,))]
    return shapes


def init_std(name, config):
    """build-nanogpt's init: None for LayerNorm/bias (constant), else the normal's std."""
    if ".ln_" in name or name.startswith("transformer.ln_f") or name.endswith(".bias"):
        return None
    if name.endswith("attn.c_proj.weight") or name.endswith("mlp.c_proj.weight"):
        # residual projections: each block adds two of them to the stream, so their
        # variance is scaled down to keep the stream's growth independent of depth
        return 0.02 / math.sqrt(2 * config.n_layer)
    return 0.02
