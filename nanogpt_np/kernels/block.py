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
  * the elementwise work around the matmuls is fused (kernels/fused.cu):
        c_attn:   qkv = a @ W.T,  then qkv += b                      (bias_add)
        c_proj:   x = x + (y @ W.T + b)                               (bias_residual)
        c_fc:     h = gelu(m @ W.T + b)                               (bias_gelu_forward)
    and in backward each bias gradient comes out of a pass that runs anyway
    (cast_column_sums turns the float32 residual gradient into the matmul's
    operand; bias_gelu_backward sums dpre while it writes it);
  * LayerNorm writes its output in the compute dtype, and its backward adds dx
    into the residual stream's gradient (`dx += ...`) in the same kernel.

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
from . import attention, cross_entropy, fused, gemm, layernorm

WTE = "transformer.wte.weight"


def _weight_grad(model, name, dout2, act2):
    """grads[name] (OC, C) = dout2.T @ act2, written right after zero_grad, else added."""
    gemm.matmul(dout2, act2, out=model.grads[name], trans_a=True, beta=0.0 if model._write_grads else 1.0)


def _set_grad(model, name, value):
    grad = model.grads[name]
    if model._write_grads:
        grad[...] = value
    else:
        grad += value


def _linear_backward(model, prefix, dout2, act2, dbias):
    """The linear layer `prefix` (y = act @ W.T + b) given dout2 (N, out) in the
    compute dtype and its bias gradient: sets its gradients, -> d act (N, in)."""
    _set_grad(model, prefix + ".bias", dbias)
    _weight_grad(model, prefix + ".weight", dout2, act2)
    return gemm.matmul(dout2, model.compute_params[prefix + ".weight"])


def _layernorm_backward_into(model, prefix, dout, cache, dx):
    """LayerNorm `prefix`'s backward, adding its input gradient into dx (the
    residual stream's) in the same kernel; sets its weight and bias gradients."""
    _, dw, db = layernorm.backward(dout.reshape(dx.shape), cache, dx_out=dx)
    _set_grad(model, prefix + ".weight", dw)
    _set_grad(model, prefix + ".bias", db)


def block_forward(model, i, x):
    """x: (B, T, C) in the parameter dtype -> x: (B, T, C), cache for block_backward."""
    p, w, h, cd = model.params, model.compute_params, f"transformer.h.{i}.", model.compute_dtype
    B, T, C = x.shape
    a, ln1 = layernorm.forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], out_dtype=cd)  # (B, T, C)
    a2 = a.reshape(-1, C)  # (N, C)
    qkv = gemm.matmul(a2, w[h + "attn.c_attn.weight"], trans_b=True)  # (N, 3C)
    fused.bias_add(qkv, p[h + "attn.c_attn.bias"])
    y, attn = attention.forward(qkv.reshape(B, T, 3 * C), model.config.n_head)  # (B, T, C)
    y2 = y.reshape(-1, C)  # (N, C)
    proj = gemm.matmul(y2, w[h + "attn.c_proj.weight"], trans_b=True)  # (N, C)
    x = fused.bias_residual(x, proj.reshape(B, T, C), p[h + "attn.c_proj.bias"])  # x + a, a new array
    del proj
    m, ln2 = layernorm.forward(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], out_dtype=cd)
    m2 = m.reshape(-1, C)  # (N, C)
    pre = gemm.matmul(m2, w[h + "mlp.c_fc.weight"], trans_b=True)  # (N, 4C), before its bias
    hidden = fused.bias_gelu_forward(pre, p[h + "mlp.c_fc.bias"])  # (N, 4C)
    proj = gemm.matmul(hidden, w[h + "mlp.c_proj.weight"], trans_b=True)  # (N, C)
    x = fused.bias_residual(x, proj.reshape(B, T, C), p[h + "mlp.c_proj.bias"])
    if model.recompute:  # backward rebuilds the LayerNorm outputs and the GELU output (_recomputed)
        a2 = m2 = hidden = None
    return x, (ln1, a2, attn, y2, ln2, m2, pre, hidden)


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


def block_backward(model, i, dx, cache):
    """dx: (B, T, C) at the block's output (parameter dtype) -> dx at its input.
    dx is updated in place (the residual path passes it through unchanged)."""
    h = f"transformer.h.{i}."
    if cache[1] is None:  # forward ran with model.recompute
        cache = _recomputed(model, h, cache)
    ln1, a2, attn, y2, ln2, m2, pre, hidden = cache
    p, cd = model.params, model.compute_dtype
    C = dx.shape[-1]
    # forward: x = x + (hidden @ W.T + b)   (mlp.c_proj and the residual)
    d, dbias = fused.cast_column_sums(dx.reshape(-1, C), cd)  # (N, C) matmul operand, (C,)
    dhidden = _linear_backward(model, h + "mlp.c_proj", d, hidden, dbias)  # (N, 4C)
    del d, hidden
    # forward: hidden = gelu(m @ W.T + b)   (mlp.c_fc)
    dpre, dbias = fused.bias_gelu_backward(dhidden, pre, p[h + "mlp.c_fc.bias"])
    del dhidden, pre
    dm = _linear_backward(model, h + "mlp.c_fc", dpre, m2, dbias)  # (N, C)
    del dpre
    # forward: m = ln_2(x);  dx += its gradient
    _layernorm_backward_into(model, h + "ln_2", dm, ln2, dx)
    # forward: x = x + (y @ W.T + b)   (attn.c_proj and the residual)
    d, dbias = fused.cast_column_sums(dx.reshape(-1, C), cd)
    dy = _linear_backward(model, h + "attn.c_proj", d, y2, dbias)  # (N, C)
    del d
    # forward: y = attention(qkv)
    dqkv = attention.backward(dy.reshape(dx.shape), attn).reshape(-1, 3 * C)  # (N, 3C)
    del dy, attn
    # forward: qkv = a @ W.T + b   (attn.c_attn)
    da = _linear_backward(model, h + "attn.c_attn", dqkv, a2, fused.column_sums(dqkv))  # (N, C)
    del dqkv
    # forward: a = ln_1(x);  dx += its gradient
    _layernorm_backward_into(model, h + "ln_1", da, ln1, dx)
    return dx


def head_forward(model, x, targets, logits_out=None):
    """ln_f, lm_head (tied to wte) and, with targets, the loss.

    x: (B, T, C) -> logits (B, T, V), loss (0-d array or None), cache (None without
    targets). With targets the logits are in the compute dtype, written into
    logits_out if given; without, they are a fresh array in the parameter dtype
    (the bf16 product is accumulated in float32 and written as float32)."""
    p, w = model.params, model.compute_params
    B, T, C = x.shape
    xf, lnf = layernorm.forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"],
                                out_dtype=model.compute_dtype)
    xf2 = xf.reshape(-1, C)  # (N, C)
    V = w[WTE].shape[0]
    if targets is None:
        logits = gemm.matmul(xf2, w[WTE], trans_b=True, out_dtype=model.dtype)  # (N, V)
        return logits.reshape(B, T, V), None, None
    out = None if logits_out is None else logits_out.reshape(-1, V)
    logits = gemm.matmul(xf2, w[WTE], out=out, trans_b=True).reshape(B, T, V)
    loss, ce = cross_entropy.forward(logits, targets)
    return logits, loss, (lnf, xf2, ce)


def head_backward(model, cache):
    """-> dx: (B, T, C), the gradient at ln_f's input (parameter dtype)."""
    lnf, xf2, ce = cache
    w = model.compute_params
    dlogits = cross_entropy.backward(1.0, ce)  # (B, T, V), over the logits
    dlogits2 = dlogits.reshape(-1, dlogits.shape[-1])  # (N, V)
    # forward: logits = xf @ wte.T  (lm_head, tied: the embedding's gradient is added later)
    _weight_grad(model, WTE, dlogits2, xf2)
    dxf = gemm.matmul(dlogits2, w[WTE])  # (N, C)
    del dlogits, dlogits2
    dx, dw, db = layernorm.backward(dxf.reshape(*lnf[0].shape), lnf)
    _set_grad(model, "transformer.ln_f.weight", dw)
    _set_grad(model, "transformer.ln_f.bias", db)
    return dx


def refresh_compute_params(model):
    """Cast the float32 master weights into the bf16 copies the matmuls read
    (one kernel over the flat buffer)."""
    fused.cast(model.flat_params, model.compute_dtype, out=model.compute_flat)

