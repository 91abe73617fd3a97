"""GPT-2, as build-nanogpt writes it, assembled from the hand-written layers.

    embedding -> [ ln_1 -> c_attn -> attention -> c_proj -> +residual
                   ln_2 -> c_fc -> gelu -> c_proj -> +residual ] x n_layer
              -> ln_f -> lm_head (tied to wte) -> cross-entropy

Forward runs the layers in order and keeps each one's cache; backward walks the
same list in reverse, handing every layer its cache and adding its parameter
gradients into `model.grads`.
The same sums without this file's buffers (written-or-added gradients, the reused
logits buffer, the allreduce that starts during backward) are in
nanogpt_np/reference.py, composed from the layers' plain references, for reading.

Parameters live in one flat array and each named parameter is a view into it;
the gradients likewise (weights.py, GPTWeights, which GPT extends). Names follow
the GPT-2 checkpoint, and linear weights are (out, in); the names and shapes are in
config.py. GPT.from_pretrained / save_pretrained come from pretrained.py, which
builds on this file (attached in nanogpt_np/__init__.py, so no import runs back up).

Precision (backend.resolve_precision). `dtype` is float32 or float64, or on the
GPU bf16: mixed precision, the GPU default. model.dtype is always the parameter
dtype (master weights, gradients, optimizer state, checkpoints: float32 under
bf16); model.compute_dtype is the dtype of activations and matmul inputs. Under
bf16 model.compute_params holds bf16 copies of the weights in a second flat
buffer, cast from the masters at the start of every forward with targets.

Which block runs. The readable `_block_forward` / `_block_backward` below run on
NumPy, and on CuPy for sampling. Training and evaluation forwards on CuPy run
`self.fused` (nanogpt_np/kernels/block.py), the same arithmetic scheduled for a
GPU: cuBLAS gemms, fused bias/GELU/residual kernels, gradients written by the
gemms themselves; it is where bf16 is handled. Tests hold the two to each other.
"""
import numpy as np

from .backend import PinnedUpload, array_module, get_xp, on_cpu, resolve_precision, to_host
from .config import LM_HEAD, LN_F_WEIGHT, WPE, WTE, GPTConfig, init_std, parameter_shapes  # noqa: F401 (re-exported)
from .cpu import keep_freed_memory
from .ops import layer_ops
from .weights import GPTWeights


class GPT(GPTWeights):
    """GPT-2: the parameters (GPTWeights), forward, backward, and sampling."""

    def __init__(self, config, dtype=np.float32, seed=0, backend="numpy", init_weights=True):
        # the layer implementations: nanogpt_np.layers on NumPy, CUDA kernels on CuPy
        self.ops = layer_ops(get_xp(backend))
        if on_cpu(get_xp(backend)):
            keep_freed_memory()  # activations are reused step after step (see cpu.py)
        param_dtype, compute_dtype = resolve_precision(dtype, backend)
        if compute_dtype != param_dtype and self.fused is None:
            raise ValueError("dtype bf16 needs the GPU kernels, but NANOGPT_KERNELS=0 is set; unset it "
                             "or use --dtype float32")
        super().__init__(config, dtype, seed, backend, init_weights)
        self._caches = None  # set by forward(idx, targets), consumed by backward()
        self._write_grads = False  # _grads_are_zero, as the running backward() found it
        self._logits = None  # the logits buffer that training forwards reuse
        # True: forward keeps neither the LayerNorm outputs nor the GELU output, and
        # backward recomputes them (the same bits) from what it keeps (see _block_backward)
        self.recompute = False

    @property
    def fused(self):
        """The GPU schedule of the block (kernels/block.py) when the layers are the
        CUDA kernels, else None (the readable block runs)."""
        return getattr(self.ops, "block", None)

    # ---- forward --------------------------------------------------------------------

    def _check_tokens(self, a, what):
        """Shape and dtype checks; for host arrays also the range of the ids, read on the
        host before any copy. A device array's ids are not read (that would be a host
        sync): an id outside [0, vocab_size) there gives NaN embeddings and a NaN loss."""
        if not hasattr(a, "ndim"):
            a = np.asarray(a)
        if a.ndim != 2:
            raise ValueError(f"{what} must be a 2-D integer array of shape (B, T); got shape {tuple(a.shape)}")
        if a.dtype.kind not in "iu":
            raise ValueError(
                f"{what} must hold integer token ids; got dtype {a.dtype}. Tokenize text first, "
                "or cast with .astype(np.int64)"
            )
        if a.size == 0:
            raise ValueError(f"{what} is empty (shape {tuple(a.shape)}); give at least one token per row")
        if array_module(a) is np:  # on the host (a device array's ids stay unread)
            lo, hi = int(a.min()), int(a.max())
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                bad = lo if lo < 0 else hi
                raise ValueError(
                    f"{what} holds token id {bad}, outside [0, {V}); this model's vocab_size is {V}. "
                    "Check the tokenizer, or build the model with a larger vocab_size"
                )
        return a

    def _on_device(self, a, what):
        """Checked token ids on the model's device. Host ids on the GPU go through a
        device int32 buffer kept per (what, shape), copied from pinned memory: no
        allocation and no wait for the copy (backend.PinnedUpload)."""
        if self.xp is np or array_module(a) is not np:
            return self.xp.asarray(a)
        return self._upload_buffer(what, a.shape).upload(a)

    def _upload_buffer(self, what, shape):
        """The PinnedUpload of int32 ids kept for (what, shape), made on first use."""
        uploads = self.__dict__.setdefault("_uploads", {})
        key = (what, tuple(shape))
        if key not in uploads:
            uploads[key] = PinnedUpload(self.xp, shape, np.int32)
        return uploads[key]

    def _check_inputs(self, idx, targets):
        idx = self._check_tokens(idx, "idx")
        T = idx.shape[1]
        if T > self.config.block_size:
            raise ValueError(
                f"sequence length T={T} exceeds block_size={self.config.block_size}; "
                f"crop idx to its last {self.config.block_size} tokens"
            )
        if targets is not None:
            targets = self._check_tokens(targets, "targets")
            if targets.shape != idx.shape:
                raise ValueError(f"targets shape {tuple(targets.shape)} differs from idx shape {tuple(idx.shape)}")
        if targets is not None and self.xp is not np and array_module(idx) is np and array_module(targets) is np:
            return self._batch_on_device(idx, targets)
        idx = self._on_device(idx, "idx")
        return idx, (None if targets is None else self._on_device(targets, "targets"))

    def _batch_on_device(self, idx, targets):
        """Host idx and targets on the GPU in one copy: one (2, B, T) int32 buffer kept
        per shape, from pinned memory (a training step's one host-to-device copy of its
        batch) -> its two (B, T) halves, views of that buffer."""
        both = self._upload_buffer("batch", (2, *idx.shape)).upload((idx, targets))  # (2, B, T)
        return both[0], both[1]

    def forward(self, idx, targets=None):
        """idx, targets: (B, T) ints -> logits (B, T, V), loss (float, or None without targets).

        With targets, the activations backward() needs are kept, and backward()
        later overwrites the returned logits with dlogits (see cross_entropy.py):
        copy the logits first if you need them after backward(). The logits of a
        forward with targets also live in a buffer that the next such forward of the
        same shape reuses (the biggest array of the model, allocated once, not every
        step); a forward without targets returns a fresh array. Under bf16 the
        logits of a forward with targets are bf16 (ml_dtypes.bfloat16, cast with
        .astype to read them), those of a forward without targets float32.
        """
        logits, loss = self.forward_on_device(idx, targets)
        return logits, (None if loss is None else float(loss))

    def forward_on_device(self, idx, targets=None, loss_scale=1.0, accumulate_loss=False, refresh=True,
                          backward_follows=False):
        """forward() without reading the loss on the host: loss is a 0-d array on the
        model's device (on the GPU kernels, a buffer the next such forward overwrites;
        a float on NumPy), times loss_scale. On the GPU kernels accumulate_loss=True
        adds it into that buffer instead (the mean over micro-steps, on the device).
        refresh=False skips casting the bf16 weight copies, for a caller that knows they
        are current (kernels/graph.py's step: its AdamW writes them).
        backward_follows=True (a training step: needs targets) promises that backward()
        comes next and that nothing reads the logits: the logits returned are None, and
        on the GPU kernels the cross-entropy's backward runs in the forward's kernel
        (one launch; dlogits are written over the logits at once)."""
        if backward_follows and targets is None:
            raise ValueError("backward_follows=True needs targets (a forward without targets has no "
                             "backward); pass targets, or leave backward_follows False")
        idx, targets = self._check_inputs(idx, targets)
        self._caches = None  # free the previous step's activations first
        p, keep = self.params, targets is not None
        if self.mixed and refresh:
            self.fused.refresh_compute_params(self)  # bf16 copies of the (possibly updated) weights
        x, emb_cache = self.ops.embedding.forward(idx, p[WTE], p[WPE])  # (B, T, C)
        block_caches, ln = [], None  # ln: the GPU kernels' next LayerNorm, fused with the residual add
        for i in range(self.config.n_layer):
            if self.fused is None:
                x, cache = self._block_forward(i, x)
            else:
                x, cache, ln = self.fused.block_forward(self, i, x, ln)
            if keep:
                block_caches.append(cache)
        # training reuses one logits buffer from step to step; inference gets a fresh array
        logits_out = self._logits_buffer(idx.shape) if keep else None
        if self.fused is None:
            logits, loss, head_cache = self._head_forward(x, targets, logits_out)
            loss = None if loss is None else loss * loss_scale
        else:
            logits, losses, head_cache = self.fused.head_forward(self, x, targets, logits_out, ln, backward_follows)
            loss = None if losses is None else self.fused.loss_on_device(self, losses, loss_scale, accumulate_loss)
        if not keep:
            return logits, None
        self._caches = (emb_cache, block_caches, head_cache)
        return (None if backward_follows else logits), loss

    def _head_forward(self, x, targets, logits_out=None):
        """ln_f, lm_head (tied to wte) and the loss: x (B, T, C) -> logits (B, T, V),
        loss (or None without targets), cache."""
        p = self.params
        x, lnf_cache = self.ops.layernorm.forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
        into = {} if logits_out is None else {"out": logits_out}
        logits, head_cache = self.ops.linear.forward(x, p[WTE], None, **into)  # (B, T, V), tied to wte
        if targets is None:
            return logits, None, None
        loss, ce_cache = self.ops.cross_entropy.forward(logits, targets)
        return logits, loss, (lnf_cache, head_cache, ce_cache)

    def _logits_buffer(self, idx_shape):
        """The (B, T, V) array a training forward writes its logits into, kept from
        step to step: allocating 200 MB afresh (GPT-2 124M, B=1, T=1024) costs page
        faults every step."""
        shape = (*idx_shape, self.config.vocab_size)
        if self._logits is None or self._logits.shape != shape:
            self._logits = None  # let the old one go before making the new one
            self._logits = self.xp.empty(shape, dtype=self.compute_dtype)
        return self._logits

    def _block_forward(self, i, x, attend=None):
        """One transformer block. x: (B, T, C) -> (B, T, C), and the caches for backward.

        attend(qkv) -> y, when given, replaces the causal attention: sampling
        (generate.py) passes one that reads and extends a key/value cache.
        """
        p, h = self.params, f"transformer.h.{i}."
        a, ln1 = self.ops.layernorm.forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
        a, c_attn = self.ops.linear.forward(a, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (B, T, 3C)
        if attend is None:
            a, attn = self.ops.attention.forward(a, self.config.n_head)  # (B, T, C)
        else:
            a, attn = attend(a), None
        a, attn_proj = self.ops.linear.forward(a, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
        x = x + a  # a new array: the old x stays in ln1's cache
        m, ln2 = self.ops.layernorm.forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
        m, c_fc = self.ops.linear.forward(m, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # (B, T, 4C)
        m, act = self.ops.gelu.forward(m)
        m, mlp_proj = self.ops.linear.forward(m, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])  # (B, T, C)
        x = x + m
        if self.recompute:  # drop the linear layers' inputs that backward can rebuild cheaply
            c_attn, c_fc, mlp_proj = ((None,) + cache[1:] for cache in (c_attn, c_fc, mlp_proj))
        return x, (ln1, c_attn, attn, attn_proj, ln2, c_fc, act, mlp_proj)

    def _recomputed(self, h, caches):
        """The block's caches with what --recompute dropped rebuilt: ln_1's and ln_2's
        outputs from their (x, mean, rstd), the GELU output from its input. The same
        operations as forward's, so the same bits."""
        ln1, c_attn, attn, attn_proj, ln2, c_fc, act, mlp_proj = caches
        p, layernorm = self.params, self.ops.layernorm
        c_attn = (layernorm.recompute_output(ln1, p[h + "ln_1.bias"]),) + c_attn[1:]
        c_fc = (layernorm.recompute_output(ln2, p[h + "ln_2.bias"]),) + c_fc[1:]
        mlp_proj = (self.ops.gelu.forward(act)[0],) + mlp_proj[1:]  # act: GELU's cache is its input
        return ln1, c_attn, attn, attn_proj, ln2, c_fc, act, mlp_proj

    # ---- backward -------------------------------------------------------------------

    def backward(self, grads_final=None):
        """Gradient of the last forward's mean loss, ADDED into model.grads (right
        after zero_grad() the layers write into model.grads directly: the same sums).

        Returns {name: array} with the keys of parameters(). The activations are
        released as backward walks past them; a second backward() needs a new forward.

        grads_final(offset), if given, is called whenever flat_grads[offset:] has
        become final: the flat buffer is in forward order and backward runs the
        other way, so the finished part is always a suffix. Data parallelism uses it
        to start each bucket's allreduce early (distributed.GradientBuckets).
        """
        report = grads_final or (lambda offset: None)
        if self._caches is None:
            raise ValueError(
                "backward() needs a preceding forward(idx, targets) with targets; "
                "call forward with targets first (each forward allows one backward)"
            )
        emb_cache, block_caches, head_cache = self._caches
        self._caches = None
        # Fresh (zeroed) gradients are written directly by the layers; otherwise
        # (gradient accumulation) each layer's gradient is added in.
        self._write_grads, self._grads_are_zero = self._grads_are_zero, False
        g = self.grads
        # the GPU kernels finish the bias and LayerNorm gradients in one launch at the end,
        # or block by block when someone waits for each block's gradients (an allreduce)
        finish = grads_final is not None
        if self.fused is None:
            dx = self._head_backward(head_cache)
        else:
            dx = self.fused.head_backward(self, head_cache, finish=finish)
        del head_cache
        report(self._flat_offset(LN_F_WEIGHT))  # ln_f; wte (lm_head) waits for the embedding
        for i in reversed(range(self.config.n_layer)):
            if self.fused is None:
                dx = self._block_backward(i, dx, block_caches.pop())
            else:
                dx = self.fused.block_backward(self, i, dx, block_caches.pop(), finish=finish)
            report(self._flat_offset(f"transformer.h.{i}.ln_1.weight"))  # block i's first parameter
        # forward: x = wte[idx] + wpe[:T]; adds into wte's gradient next to lm_head's
        if self.fused is not None and not finish:
            self.fused.finish_gradients(self, dx.size // dx.shape[-1], dx.shape[-1])
        write_wpe = {"write_wpe": True} if self.fused is not None and self._write_grads else {}
        self.ops.embedding.backward(dx, emb_cache, dwte=g[WTE], dwpe=g[WPE], **write_wpe)
        report(0)
        return dict(self.grads)

    def _head_backward(self, caches):
        """-> dx: (B, T, C) at ln_f's input; the head's gradients added into model.grads."""
        lnf_cache, head_cache, ce_cache = caches
        dlogits = self.ops.cross_entropy.backward(1.0, ce_cache)  # (B, T, V), in the logits buffer
        del ce_cache
        # forward: logits = x @ wte.T   (lm_head, tied)
        lm_head_out = self._grad_out("transformer.wte", bias=False)  # the tied weight's gradient
        dx, dwte, _ = self.ops.linear.backward(dlogits, head_cache, **lm_head_out)
        del dlogits, head_cache
        self._add_grad(WTE, dwte)
        del dwte
        # forward: x = ln_f(x)
        dx, dw, db = self.ops.layernorm.backward(dx, lnf_cache)
        self.grads["transformer.ln_f.weight"] += dw
        self.grads["transformer.ln_f.bias"] += db
        return dx

    def _grad_out(self, prefix, bias=True):
        """Keyword arguments that let linear.backward write the layer `prefix`'s
        gradients straight into model.grads. Only right after zero_grad(), when
        writing equals adding; it saves a temporary and a pass over it."""
        if not self._write_grads:
            return {}
        out = {"dweight_out": self.grads[prefix + ".weight"]}
        if bias:
            out["dbias_out"] = self.grads[prefix + ".bias"]
        return out

    def _add_grad(self, name, grad):
        if grad is not None and grad is not self.grads[name]:  # not already written in place
            self.grads[name] += grad

    def _add_grads(self, prefix, dweight, dbias):
        self._add_grad(prefix + ".weight", dweight)
        self._add_grad(prefix + ".bias", dbias)

    def _block_backward(self, i, dx, caches):
        """dx: (B, T, C) at the block's output -> dx at its input."""
        h = f"transformer.h.{i}."
        if caches[1][0] is None:  # forward ran with self.recompute
            caches = self._recomputed(h, caches)
        ln1, c_attn, attn, attn_proj, ln2, c_fc, act, mlp_proj = caches
        # forward: x = x + m  (dx flows to both the skip path and the MLP)
        dm, dw, db = self.ops.linear.backward(dx, mlp_proj, **self._grad_out(h + "mlp.c_proj"))
        self._add_grads(h + "mlp.c_proj", dw, db)
        dm = self.ops.gelu.backward(dm, act)
        dm, dw, db = self.ops.linear.backward(dm, c_fc, **self._grad_out(h + "mlp.c_fc"))
        self._add_grads(h + "mlp.c_fc", dw, db)
        dm, dw, db = self.ops.layernorm.backward(dm, ln2)
        self._add_grads(h + "ln_2", dw, db)
        dx = dx + dm
        # forward: x = x + a
        da, dw, db = self.ops.linear.backward(dx, attn_proj, **self._grad_out(h + "attn.c_proj"))
        self._add_grads(h + "attn.c_proj", dw, db)
        da = self.ops.attention.backward(da, attn)
        da, dw, db = self.ops.linear.backward(da, c_attn, **self._grad_out(h + "attn.c_attn"))
        self._add_grads(h + "attn.c_attn", dw, db)
        da, dw, db = self.ops.layernorm.backward(da, ln1)
        self._add_grads(h + "ln_1", dw, db)
        dx += da
        return dx

    # ---- sampling -------------------------------------------------------------------

    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, seed=None, use_cache=True):
        """Extend idx (B, T) by max_new_tokens sampled tokens -> (B, T + max_new_tokens).

        temperature 0 is greedy (argmax). top_k keeps the k most likely tokens before
        sampling. seed makes the draw reproducible. The context is cropped to the last
        block_size tokens. With use_cache (the default) each new token runs one
        position against a key/value cache (see generate.py); use_cache=False runs
        the whole context again for each token, the reference both must agree with.
        """
        from .generate import check_sampling_args, generate_cached

        idx = to_host(self._check_tokens(idx, "idx")).astype(np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.config.vocab_size):
            self._check_tokens(idx, "idx")  # the host check, for ids that were on the device
        check_sampling_args(max_new_tokens, temperature, top_k)
        rng = np.random.default_rng(seed)
        if use_cache:
            return generate_cached(self, idx, max_new_tokens, temperature, top_k, rng, sample_next)
        for _ in range(max_new_tokens):
            context = idx[:, -self.config.block_size :]
            logits, _ = self.forward(context)
            next_token = sample_next(to_host(logits[:, -1, :]), temperature, top_k, rng)  # (B,)
            idx = np.concatenate([idx, next_token[:, None]], axis=1)
        return idx

    def __repr__(self):
        dtype = "bf16 (float32 parameters)" if self.mixed else self.dtype.name
        return (
            f"GPT({self.config}, dtype={dtype}, backend={self.backend}, "
            f"parameters={self.num_parameters():,})"
        )


def sample_next(logits, temperature, top_k, rng):
    """One token per row from logits (B, V): greedy at temperature 0, else a draw
    from softmax(logits / temperature) restricted to the top_k most likely tokens."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return logits.argmax(axis=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k, None]  # (B, 1)
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs /= probs.sum(axis=-1, keepdims=True)
    u = rng.random((probs.shape[0], 1))
    # inverse CDF: the first token whose cumulative probability passes u
    return np.minimum((np.cumsum(probs, axis=-1) < u).sum(axis=-1), probs.shape[-1] - 1)

