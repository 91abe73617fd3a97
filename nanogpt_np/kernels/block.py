"""The transformer block and the output head as the GPU runs them.

model.py's `_block_forward` / `_block_backward` are the readable block: one layer
call per line, each layer from nanogpt_np/layers/. On CuPy the model runs this
file's schedule of the *same* arithmetic instead (the tests hold it to the
readable block to float64 rounding), arranged for a GPU:

  * every matmul is one cuBLAS gemmEx (kernels/gemm.py) on 2-D operands, in the
    compute dtype, accumulating in float32 (float64 for float64);
  * a weight gradient is written (after zero_grad) or added (gradient
    accumulation) by the gemm itself, straight into the float32 gradient buffer
    (beta = 0 or 1): no temporary, no extra pass;
  * the elementwise work around the matmuls is fused (kernels/fused.cu, layernorm.cu):
        c_attn:   qkv = a @ W.T,  then qkv += b                      (bias_add)
        c_proj:   x = x + (y @ W.T + b), then the next LayerNorm of x  (residual_layernorm_forward)
        c_fc:     h = gelu(m @ W.T + b)                               (bias_gelu_forward)
    and in backward each bias gradient comes out of a pass that runs anyway
    (cast_column_sums turns the float32 residual gradient into the matmul's
    operand; bias_gelu_backward sums dpre while it writes it);
  * LayerNorm writes its output in the compute dtype, and its backward adds dx
    into the residual stream's gradient (`dx += ...`) in the same kernel;
  * in a training step (backward_follows) the loss and dlogits come from one
    cross-entropy kernel over the logits; a forward whose logits are handed out
    (evaluation) runs the loss alone and backward, if any, runs the rest later.

Mixed precision (bf16). The residual stream x and its gradient stay float32, as do
LayerNorm's statistics, the loss, and every gradient that reaches a parameter.
Activations between the layers (LayerNorm outputs, qkv, the attention output, the
MLP's hidden layer, the logits) are bf16. model.compute_params holds bf16 copies
of the weights, cast from the float32 masters at each training forward, as
PyTorch's autocast casts them at each forward. In float32 and float64 the same
schedule runs with one dtype throughout.

Not a layer file: it knows the model (its params, grads and config) on purpose,
the way model.py does. The formulas live in nanogpt_np/layers/.
"""
from . import attention, cross_entropy, fused, gemm, layernorm, reduce
from .loader import accumulate_dtype

WTE = "transformer.wte.weight"
LN_F = "transformer.ln_f"
DLOSS = 1.0  # backward's seed, d(mean loss)/d(mean loss); the step scales the gradients later


def _weight_grad(model, name, dout2, act2):
    """grads[name] (OC, C) = dout2.T @ act2, written right after zero_grad, else added."""
    gemm.matmul(dout2, act2, out=model.grads[name], trans_a=True, beta=0.0 if model._write_grads else 1.0)


def _layout(scope, C):
    """The bias and LayerNorm gradients whose column sums a backward pass makes, with
    their widths (a LayerNorm's weight and bias are adjacent in the flat buffer: one
    slot of 2C holds both, weight first)."""
    if scope == LN_F:
        return [(LN_F + ".weight", 2 * C)]
    return [(scope + name, width * C) for name, width in (("mlp.c_proj.bias", 1), ("mlp.c_fc.bias", 4),
                                                           ("ln_2.weight", 2), ("attn.c_proj.bias", 1),
                                                           ("attn.c_attn.bias", 3), ("ln_1.weight", 2))]


def _scopes(model):
    return [f"transformer.h.{i}." for i in range(model.config.n_layer)] + [LN_F]


def _partials(model, N, C):
    """The model's reduce.Partials: the column partial sums of every bias and LayerNorm
    gradient, one array kept from step to step (allocated at the first backward of
    this N), with each name's offset in the flat gradient buffer."""
    cache = model.__dict__.setdefault("_block_partials", {})
    entry = cache.get(N)
    if entry is None:
        layouts = [_layout(scope, C) for scope in _scopes(model)]
        parts = reduce.Partials(model.xp, fused.n_chunks(N), accumulate_dtype(model.compute_dtype), layouts)
        entry = cache[N] = (parts, {name: model._flat_offset(name) for layout in layouts for name, _ in layout})
    return entry


def finish_gradients(model, N, C, scope=None):
    """Write (after zero_grad) or add the bias and LayerNorm gradients of `scope` (a
    block's prefix or ln_f's; None: all of them) from their partial sums, in one launch.
    Backward finishes everything at its end; with an allreduce waiting for each block's
    gradients it finishes block by block instead."""
    parts, offsets = _partials(model, N, C)
    names = None if scope is None else [name for name, _ in _layout(scope, C)]
    parts.finish(model.flat_grads, offsets, accumulate=not model._write_grads, names=names)


def _layernorm_backward_with_cast(model, dout, cache, dx_out, place, before):
    """A LayerNorm backward (its gradients' partial sums at `place`) that also makes the
    operand and bias partial sums of the block `before`'s mlp.c_proj, which reads the
    resulting dx first (model._next_cast carries the operand there). dx_out None: dx
    is returned fresh (ln_f)."""
    N, C = dout.size // dout.shape[-1], dout.shape[-1]
    cast = None
    if before is not None:
        d = model.xp.empty((N, C), dtype=model.compute_dtype)
        cast = (d, _partials(model, N, C)[0].place(before + "mlp.c_proj.bias")[1:])
        model._next_cast = d
    dx, _, _ = layernorm.backward(dout, cache, dx_out=dx_out, part=place, cast=cast)
    return dx


def _slot(model, N, C, name):
    return _partials(model, N, C)[0].slot(name)


def _linear_backward(model, prefix, dout2, act2):
    """The linear layer `prefix` (y = act @ W.T + b) given dout2 (N, out) in the
    compute dtype: its weight gradient (the bias's comes from the partial sums),
    -> d act (N, in)."""
    _weight_grad(model, prefix + ".weight", dout2, act2)
    return gemm.matmul(dout2, model.compute_params[prefix + ".weight"])


def _next_layernorm(model, i):
    """The LayerNorm that reads block i's output: block i+1's ln_1, or ln_f after the last."""
    prefix = f"transformer.h.{i + 1}.ln_1" if i + 1 < model.config.n_layer else LN_F
    return model.params[prefix + ".weight"], model.params[prefix + ".bias"]


def block_forward(model, i, x, ln1=None):
    """x: (B, T, C) in the parameter dtype -> x: (B, T, C), cache for block_backward, and
    (output, cache) of the next LayerNorm (next block's ln_1, or ln_f), computed in the
    kernel that adds the block's last residual. ln1: this block's ln_1 so computed by the
    block before (None: computed here)."""
    p, w, h, cd = model.params, model.compute_params, f"transformer.h.{i}.", model.compute_dtype
    B, T, C = x.shape
    if ln1 is None:
        a, ln1 = layernorm.forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], out_dtype=cd)  # (B, T, C)
    else:
        a, ln1 = ln1
    a2 = a.reshape(-1, C)  # (N, C)
    qkv = gemm.matmul(a2, w[h + "attn.c_attn.weight"], trans_b=True)  # (N, 3C)
    fused.bias_add(qkv, p[h + "attn.c_attn.bias"])
    y, attn = attention.forward(qkv.reshape(B, T, 3 * C), model.config.n_head)  # (B, T, C)
    y2 = y.reshape(-1, C)  # (N, C)
    proj = gemm.matmul(y2, w[h + "attn.c_proj.weight"], trans_b=True)  # (N, C)
    # x = x + (proj + b), then m = ln_2(x): one kernel
    x, m, ln2 = layernorm.residual_forward(x, proj.reshape(B, T, C), p[h + "attn.c_proj.bias"],
                                           p[h + "ln_2.weight"], p[h + "ln_2.bias"], out_dtype=cd)
    del proj
    m2 = m.reshape(-1, C)  # (N, C)
    pre = gemm.matmul(m2, w[h + "mlp.c_fc.weight"], trans_b=True)  # (N, 4C), before its bias
    hidden = fused.bias_gelu_forward(pre, p[h + "mlp.c_fc.bias"])  # (N, 4C)
    proj = gemm.matmul(hidden, w[h + "mlp.c_proj.weight"], trans_b=True)  # (N, C)
    # x = x + (proj + b), then the next LayerNorm of x: one kernel
    x, next_a, next_ln = layernorm.residual_forward(x, proj.reshape(B, T, C), p[h + "mlp.c_proj.bias"],
                                                    *_next_layernorm(model, i), out_dtype=cd)
    if model.recompute:  # backward rebuilds the LayerNorm outputs and the GELU output (_recomputed)
        a2 = m2 = hidden = None
    return x, (ln1, a2, attn, y2, ln2, m2, pre, hidden), (next_a, next_ln)


def _recomputed(model, h, cache):
    """--recompute: the LayerNorm outputs from their inputs (in the LayerNorm caches)
    and the GELU output from its input, by the same kernels as forward: the same bits."""
    ln1, a2, attn, y2, ln2, m2, pre, hidden = cache
    p, cd = model.params, model.compute_dtype
    C = y2.shape[-1]
    a2 = layernorm.forward(ln1[0], p[h + "ln_1.weight"], p[h + "ln_1.bias"], out_dtype=cd)[0].reshape(-1, C)
    m2 = layernorm.forward(ln2[0], p[h + "ln_2.weight"], p[h + "ln_2.bias"], out_dtype=cd)[0].reshape(-1, C)
    hidden = fused.bias_gelu_forward(pre, p[h + "mlp.c_fc.bias"])
    return ln1, a2, attn, y2, ln2, m2, pre, hidden


def block_backward(model, i, dx, cache, finish=False):
    """dx: (B, T, C) at the block's output (parameter dtype) -> dx at its input.
    dx is updated in place (the residual path passes it through unchanged). The bias
    and LayerNorm gradients are summed into one partials array by the kernels that
    run anyway, then written or added by one launch (finish_gradients) at the end of
    backward, or at the end of this block with finish=True."""
    h = f"transformer.h.{i}."
    if cache[1] is None:  # forward ran with model.recompute
        cache = _recomputed(model, h, cache)
    ln1, a2, attn, y2, ln2, m2, pre, hidden = cache
    p, cd = model.params, model.compute_dtype
    C = dx.shape[-1]
    N = dx.size // C
    slot = lambda name, width: _slot(model, N, C, h + name)  # noqa: E731
    parts = _partials(model, N, C)[0]
    # forward: x = x + (hidden @ W.T + b)   (mlp.c_proj and the residual). The operand d
    # and the bias's partial sums: made by the LayerNorm backward before (head or next block)
    d = model.__dict__.pop("_next_cast", None)
    if d is None:
        d, _ = fused.cast_column_sums(dx.reshape(-1, C), cd, part=slot("mlp.c_proj.bias", C))  # (N, C) operand
    dhidden = _linear_backward(model, h + "mlp.c_proj", d, hidden)  # (N, 4C)
    del d, hidden
    # forward: hidden = gelu(m @ W.T + b)   (mlp.c_fc); dpre overwrites dhidden
    dpre, _ = fused.bias_gelu_backward(dhidden, pre, p[h + "mlp.c_fc.bias"], part=slot("mlp.c_fc.bias", 4 * C),
                                       out=dhidden)
    del dhidden, pre
    dm = _linear_backward(model, h + "mlp.c_fc", dpre, m2)  # (N, C)
    del dpre
    # forward: m = ln_2(x);  dx += its gradient (weight and bias: adjacent in the flat buffer),
    # and, in the same pass, dx as attn.c_proj's operand and its bias's partial sums
    d = model.xp.empty((N, C), dtype=cd)
    layernorm.backward(dm.reshape(dx.shape), ln2, dx_out=dx, part=parts.place(h + "ln_2.weight"),
                       cast=(d, parts.place(h + "attn.c_proj.bias")[1:]))
    del dm
    # forward: x = x + (y @ W.T + b)   (attn.c_proj and the residual)
    dy = _linear_backward(model, h + "attn.c_proj", d, y2)  # (N, C)
    del d
    # forward: y = attention(qkv); dqkv's column sums (c_attn's bias) come with it: on the
    # bf16 path from FlashAttention-2's last kernel, with no pass of their own
    dqkv = attention.backward(dy.reshape(dx.shape), attn, part=slot("attn.c_attn.bias", 3 * C))
    dqkv = dqkv.reshape(-1, 3 * C)  # (N, 3C)
    del dy, attn
    # forward: qkv = a @ W.T + b   (attn.c_attn)
    da = _linear_backward(model, h + "attn.c_attn", dqkv, a2)  # (N, C)
    del dqkv
    # forward: a = ln_1(x);  dx += its gradient, and the block before's mlp.c_proj operand
    _layernorm_backward_with_cast(model, da.reshape(dx.shape), ln1, dx, parts.place(h + "ln_1.weight"),
                                  f"transformer.h.{i - 1}." if i > 0 else None)
    if finish:
        finish_gradients(model, N, C, h)
    return dx


def head_forward(model, x, targets, logits_out=None, lnf=None, backward_follows=False):
    """ln_f, lm_head (tied to wte) and, with targets, the loss.

    x: (B, T, C) -> logits (B, T, V), losses (N,) per position (None without targets),
    cache (None without targets). With targets the logits are in the compute dtype,
    written into logits_out if given; without, they are a fresh array in the parameter
    dtype (the bf16 product is accumulated in float32 and written as float32).
    lnf: ln_f's (output, cache) as the last block computed them (None: computed here).
    backward_follows (a training step; needs targets): the cross-entropy's backward
    runs in the forward's kernel, writing dlogits over the logits at once, and the
    logits returned are None (the buffer no longer holds them)."""
    p, w = model.params, model.compute_params
    B, T, C = x.shape
    if lnf is None:
        xf, lnf = layernorm.forward(x, p[LN_F + ".weight"], p[LN_F + ".bias"], out_dtype=model.compute_dtype)
    else:
        xf, lnf = lnf
    xf2 = xf.reshape(-1, C)  # (N, C)
    V = w[WTE].shape[0]
    if targets is None:
        logits = gemm.matmul(xf2, w[WTE], trans_b=True, out_dtype=model.dtype)  # (N, V)
        return logits.reshape(B, T, V), None, None
    out = None if logits_out is None else logits_out.reshape(-1, V)
    logits = gemm.matmul(xf2, w[WTE], out=out, trans_b=True).reshape(B, T, V)
    if backward_follows:  # one kernel: losses, and dlogits over the logits
        losses, dlogits = cross_entropy.forward_backward(logits, targets, DLOSS)
        return None, losses, (lnf, xf2, None, dlogits)
    losses, ce = cross_entropy.forward_losses(logits, targets)
    return logits, losses, (lnf, xf2, ce, None)


def head_backward(model, cache, finish=False):
    """-> dx: (B, T, C), the gradient at ln_f's input (parameter dtype)."""
    lnf, xf2, ce, dlogits = cache
    w = model.compute_params
    if dlogits is None:  # forward left the logits: their gradient now, written over them
        dlogits = cross_entropy.backward(DLOSS, ce)  # (B, T, V)
    del ce
    dlogits2 = dlogits.reshape(-1, dlogits.shape[-1])  # (N, V)
    # forward: logits = xf @ wte.T  (lm_head, tied: the embedding's gradient is added later)
    _weight_grad(model, WTE, dlogits2, xf2)
    dxf = gemm.matmul(dlogits2, w[WTE])  # (N, C)
    del dlogits, dlogits2
    N, C = xf2.shape
    last = f"transformer.h.{model.config.n_layer - 1}." if model.config.n_layer else None
    dx = _layernorm_backward_with_cast(model, dxf.reshape(*lnf[0].shape), lnf, None,
                                       _partials(model, N, C)[0].place(LN_F + ".weight"), last)
    if finish:
        finish_gradients(model, N, C, LN_F)
    return dx


def loss_on_device(model, losses, scale, accumulate):
    """The mean of the per-position losses (N,), times scale, written (or, with
    accumulate, added) into a device scalar the model keeps -> that scalar, 0-d."""
    if getattr(model, "_loss_scalar", None) is None or model._loss_scalar.dtype != losses.dtype:
        model._loss_scalar = model.xp.zeros(1, dtype=losses.dtype)
    reduce.loss_mean(losses, model._loss_scalar, scale / losses.size, accumulate)
    return model._loss_scalar.reshape(())


def refresh_compute_params(model):
    """Cast the float32 master weights into the bf16 copies the matmuls read
    (one kernel over the flat buffer)."""
    fused.cast(model.flat_params, model.compute_dtype, out=model.compute_flat)

