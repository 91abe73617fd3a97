"""A GPT-2's parameters: one flat array, a named view per tensor, and the same for
the gradients (and, under bf16, the compute copies the matmuls read).

Names follow the GPT-2 checkpoint (`transformer.h.0.attn.c_attn.weight`, ...), and
linear weights are (out, in), so Hugging Face weights load without renaming. The
optimizer, the gradient clip, the MPI allreduce and the checkpoint can then treat
"all parameters" as one contiguous buffer. model.GPT adds the forward and backward.
"""
import math

import numpy as np

from .backend import get_xp, resolve_precision, to_device, to_host
from .config import LM_HEAD, WTE, init_std, parameter_shapes
from .cpu import fill


class GPTWeights:
    def __init__(self, config, dtype=np.float32, seed=0, backend="numpy", init_weights=True):
        self.config = config
        # parameter dtype and compute dtype: the same, except under bf16 (see model.py)
        self.dtype, self.compute_dtype = resolve_precision(dtype, backend)
        self.xp = get_xp(backend)
        self.backend = backend
        self._shapes = parameter_shapes(config)
        total = sum(math.prod(shape) for _, shape in self._shapes)
        self.flat_params = self.xp.zeros(total, dtype=self.dtype)
        self.flat_grads = self.xp.zeros(total, dtype=self.dtype)
        self.params = self._views(self.flat_params)
        self.grads = self._views(self.flat_grads)
        # the weights the matmuls read: the parameters themselves, or their bf16 copies
        self.compute_flat = self.xp.empty(total, dtype=self.compute_dtype) if self.mixed else self.flat_params
        self.compute_params = self._views(self.compute_flat) if self.mixed else self.params
        self._grads_are_zero = True  # backward may write gradients instead of adding them
        if init_weights:  # False leaves zeros, for weights about to be loaded
            self._init_weights(seed)

    @property
    def mixed(self):
        """True under bf16: parameters in float32, activations and matmuls in bf16."""
        return self.compute_dtype != self.dtype

    def _views(self, flat):
        views, offset = {}, 0
        for name, shape in self._shapes:
            size = math.prod(shape)
            views[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return views

    def _init_weights(self, seed):
        """Normal(0, std) weights, zero biases, LayerNorm weight 1, from one seeded RNG.

        The draws are made on the host in float64, in checkpoint order, so a seed
        gives the same model (up to rounding) in any dtype and on any backend.
        """
        rng = np.random.default_rng(seed)
        for name, shape in self._shapes:
            std = init_std(name, self.config)
            if std is not None:
                self.params[name][...] = to_device(rng.standard_normal(shape) * std, self.xp, self.dtype)
            elif name.endswith(".weight"):
                self.params[name][...] = 1.0
            # biases are already zero

    # ---- parameters and checkpoints -------------------------------------------------

    def parameters(self):
        """{name: array}: the unique trainable arrays (lm_head.weight is wte)."""
        return dict(self.params)

    def num_parameters(self):
        return int(self.flat_params.size)

    def state_dict(self):
        """{name: array} in GPT-2 checkpoint names, including the tied lm_head.weight.

        The arrays are the live parameters, as in PyTorch; copy them to keep a snapshot.
        """
        sd = dict(self.params)
        sd[LM_HEAD] = self.params[WTE]
        return sd

    def load_state_dict(self, state_dict):
        """Copy values in. Raises ValueError naming every missing, unexpected or
        wrongly shaped key; lm_head.weight may be absent (it is tied to wte)."""
        expected = {name: shape for name, shape in self._shapes}
        problems = []
        missing = [n for n in expected if n not in state_dict]
        unexpected = [n for n in state_dict if n not in expected and n != LM_HEAD]
        if missing:
            problems.append("missing keys: " + ", ".join(missing))
        if unexpected:
            problems.append("unexpected keys: " + ", ".join(unexpected))
        for name, value in state_dict.items():
            want = expected.get(name, expected[WTE] if name == LM_HEAD else None)
            if want is not None and tuple(value.shape) != want:
                problems.append(f"{name}: shape {tuple(value.shape)} but this model has {want}")
        if problems:
            raise ValueError(
                f"state_dict does not fit this model ({self.config}): " + "; ".join(problems)
            )
        if LM_HEAD in state_dict and state_dict[LM_HEAD] is not state_dict[WTE]:
            if not np.array_equal(to_host(state_dict[LM_HEAD]), to_host(state_dict[WTE])):
                raise ValueError(
                    "lm_head.weight differs from transformer.wte.weight, but this model ties "
                    "them; drop lm_head.weight or load a checkpoint with tied weights"
                )
        for name in expected:
            self.params[name][...] = to_device(state_dict[name], self.xp, self.dtype)

    def zero_grad(self, fill_zeros=True):
        """Set every gradient to zero. The next backward() then writes its gradients
        into model.grads instead of adding them (the same numbers, one pass less), so
        change model.grads only after backward(), not between zero_grad() and it.

        fill_zeros=False only marks the gradients as to be written: for the GPU
        kernels' backward, which writes every gradient it reaches (no 498 MB pass of
        zeros at GPT-2 124M). Entries no backward reaches (wpe's rows past T) keep
        their value, zero unless something else wrote them."""
        if fill_zeros or getattr(self, "fused", None) is None:
            fill(self.flat_grads, 0)  # self.flat_grads[...] = 0, on all CPU threads
        self._grads_are_zero = True

    def _flat_offset(self, name):
        """Where parameter `name` starts in flat_params / flat_grads (a table made on
        first use: backward asks every step)."""
        offsets = self.__dict__.get("_offsets")
        if offsets is None:
            offsets, offset = {}, 0
            for other, shape in self._shapes:
                offsets[other] = offset
                offset += math.prod(shape)
            self._offsets = offsets
        return offsets[name]
