"""GPT-2's whole forward and backward, composed from the layers' reference functions.

This is the model as a lesson: what model.GPT computes, without its buffers
(written vs added gradients, the reused logits buffer, the allreduce that starts
during backward, the GPU's fused block). Key: B batch, T time, C channels,
V vocab; `params` are the model's {name: array} in GPT-2 checkpoint names.

    x = wte[idx] + wpe[:T]                                embedding
    for each block:  x = x + attn_proj(attention(c_attn(ln_1(x))))
                     x = x + mlp_proj(gelu(c_fc(ln_2(x))))
    logits = ln_f(x) @ wte.T                              lm_head, tied to wte
    loss = cross_entropy(logits, targets)

Two things make a model's backward more than its layers' backwards in reverse:
  - A residual `x1 = x + a` sends its gradient to both summands unchanged, and a
    tensor read by two branches (x feeds ln_1 and the residual) gets the sum of
    their gradients. So each block's dx is the residual's gradient plus the
    LayerNorm branch's.
  - wte is used twice, by the embedding and by lm_head, so its gradient is the sum
    of the two contributions.

tests/test_reference_model.py holds `backward` equal to GPT.backward in float64.
"""
from .config import WPE, WTE
from .layers import attention, cross_entropy, embedding, gelu, layernorm, linear


def block_forward(p, h, x, n_head):
    """One block. x: (B, T, C) -> (B, T, C), and the activations its backward reads.
    p: the parameters; h: the block's name prefix, "transformer.h.{i}."."""
    ln1 = layernorm.reference_forward(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"])
    qkv = linear.reference_forward(ln1, p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])  # (B, T, 3C)
    att = attention.reference_forward(qkv, n_head)  # (B, T, C)
    a = linear.reference_forward(att, p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
    x1 = x + a  # the first residual
    ln2 = layernorm.reference_forward(x1, p[h + "ln_2.weight"], p[h + "ln_2.bias"])
    fc = linear.reference_forward(ln2, p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])  # (B, T, 4C)
    g = gelu.reference_forward(fc)
    m = linear.reference_forward(g, p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])  # (B, T, C)
    x2 = x1 + m  # the second residual
    return x2, dict(x=x, ln1=ln1, qkv=qkv, att=att, x1=x1, ln2=ln2, fc=fc, g=g)


def block_backward(p, h, dx2, acts, n_head, grads):
    """dx2: (B, T, C), the gradient at the block's output -> dx at its input; the
    block's parameter gradients go into grads[name]."""
    # forward: x2 = x1 + m             (a sum passes its gradient to both terms)
    dx1, dm = dx2, dx2
    # forward: m = linear(g, mlp.c_proj)
    dg, grads[h + "mlp.c_proj.weight"], grads[h + "mlp.c_proj.bias"] = linear.reference_backward(
        dm, acts["g"], p[h + "mlp.c_proj.weight"], p[h + "mlp.c_proj.bias"])
    # forward: g = gelu(fc)
    dfc = gelu.reference_backward(dg, acts["fc"])
    # forward: fc = linear(ln2, mlp.c_fc)
    dln2, grads[h + "mlp.c_fc.weight"], grads[h + "mlp.c_fc.bias"] = linear.reference_backward(
        dfc, acts["ln2"], p[h + "mlp.c_fc.weight"], p[h + "mlp.c_fc.bias"])
    # forward: ln2 = ln_2(x1)
    dx1_mlp, grads[h + "ln_2.weight"], grads[h + "ln_2.bias"] = layernorm.reference_backward(
        dln2, acts["x1"], p[h + "ln_2.weight"], p[h + "ln_2.bias"])
    dx1 = dx1 + dx1_mlp  # x1 fed the residual and the MLP branch: the gradients add
    # forward: x1 = x + a
    dx, da = dx1, dx1
    # forward: a = linear(att, attn.c_proj)
    datt, grads[h + "attn.c_proj.weight"], grads[h + "attn.c_proj.bias"] = linear.reference_backward(
        da, acts["att"], p[h + "attn.c_proj.weight"], p[h + "attn.c_proj.bias"])
    # forward: att = attention(qkv)
    dqkv = attention.reference_backward(datt, acts["qkv"], n_head)
    # forward: qkv = linear(ln1, attn.c_attn)
    dln1, grads[h + "attn.c_attn.weight"], grads[h + "attn.c_attn.bias"] = linear.reference_backward(
        dqkv, acts["ln1"], p[h + "attn.c_attn.weight"], p[h + "attn.c_attn.bias"])
    # forward: ln1 = ln_1(x)
    dx_attn, grads[h + "ln_1.weight"], grads[h + "ln_1.bias"] = layernorm.reference_backward(
        dln1, acts["x"], p[h + "ln_1.weight"], p[h + "ln_1.bias"])
    return dx + dx_attn  # x fed the residual and the attention branch


def forward(params, idx, targets, n_layer, n_head):
    """idx, targets: (B, T) ints -> logits (B, T, V), loss (0-d), and the activations
    backward reads."""
    p = params
    x = embedding.reference_forward(idx, p[WTE], p[WPE])  # (B, T, C)
    blocks = []
    for i in range(n_layer):
        x, acts = block_forward(p, f"transformer.h.{i}.", x, n_head)
        blocks.append(acts)
    xf = layernorm.reference_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    logits = linear.reference_forward(xf, p[WTE])  # (B, T, V): lm_head is wte, no bias
    loss = cross_entropy.reference_forward(logits, targets)
    return logits, loss, dict(idx=idx, targets=targets, blocks=blocks, x=x, xf=xf, logits=logits)


def backward(params, acts, n_layer, n_head):
    """The gradient of forward's loss: {name: array} for every parameter."""
    p, grads = params, {}
    # forward: loss = cross_entropy(logits, targets)
    dlogits = cross_entropy.reference_backward(1.0, acts["logits"], acts["targets"])  # (B, T, V)
    # forward: logits = linear(xf, wte)          (lm_head: wte's first use)
    dxf, dwte_lm_head, _ = linear.reference_backward(dlogits, acts["xf"], p[WTE])
    # forward: xf = ln_f(x)
    dx, grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = layernorm.reference_backward(
        dxf, acts["x"], p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    for i in reversed(range(n_layer)):
        # forward: x = block_i(x)
        dx = block_backward(p, f"transformer.h.{i}.", dx, acts["blocks"][i], n_head, grads)
    # forward: x = embedding(idx, wte, wpe)      (wte's second use)
    dwte_embedding, grads[WPE] = embedding.reference_backward(dx, acts["idx"], p[WTE], p[WPE])
    grads[WTE] = dwte_embedding + dwte_lm_head  # a weight used twice: its gradients add
    return grads
