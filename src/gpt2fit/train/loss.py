"""The language-model loss: lm_head matmul + cross-entropy, optionally without full logits.

``lm_loss(hidden, weight, targets)`` returns the SUM of per-token cross-entropy (float32; float64
for float64 inputs). The training step divides by the number of target tokens in the whole
optimizer step, so micro-batches with different numbers of real targets are weighted by tokens.

Two implementations, one contract (same value, same gradients, up to rounding):

``plain``    logits = hidden @ weight.T, upcast to float32, ``F.cross_entropy(reduction="sum")``.
             Materializes [B*T, V] logits: with GPT-2's V = 50257 the float32 log-softmax that
             autograd keeps, plus its gradient and the gradient of the logits, cost ~12 bytes per
             token per vocab entry at the start of backward (B=8, T=1024: 4.9 GB).
``chunked``  A custom ``torch.autograd.Function`` in the style of Liger's fused linear
             cross-entropy, in plain PyTorch (CPU and CUDA): the forward walks over ``chunk_size``
             rows at a time, computes that chunk's logits, its loss and at once its gradients
             (w.r.t. the chunk's hidden rows, and accumulated w.r.t. the weight in float32).
             Only those two gradients are kept for backward, which scales them by grad_output.
             Peak extra memory: one chunk of logits (+ the [V, C] float32 weight gradient).

Numerics of the chunked path mirror the plain one: the matmuls run in the dtype the plain path
would use (the autocast dtype under autocast, else the promoted input dtype), everything after
the logits (log-sum-exp, softmax, gradient of the logits) runs in float32, the weight gradient
is accumulated over chunks in float32, and gradients come back in the dtypes of the inputs.

Targets are already aligned with ``hidden`` (targets[b, t] is the token after position t);
nothing is shifted here. Rows whose target is ``ignore_index`` add nothing to the loss and get a
zero gradient.
"""

import torch
import torch.nn.functional as F

from gpt2fit.errors import UserError

# Rows of logits per chunk. 1024 rows x 50257 vocab = 206 MB of float32 logits per chunk (plus
# a 16-bit copy under autocast): a few percent of a 12 GB card, and matmuls still big enough to
# run at full speed.
DEFAULT_CHUNK_SIZE = 1024

_VOCAB_SLICE = 8192  # rows of the weight gradient accumulated at a time; plan.memory.LOSS_VOCAB_SLICE mirrors it


def lm_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, chunk_size: int | None = None,
            ignore_index: int = -100) -> torch.Tensor:
    """Sum of token cross-entropies of ``hidden @ weight.T`` against ``targets`` (see the module
    docstring). ``hidden``: [B, T, C] or [N, C] after ``ln_f``; ``weight``: [V, C], the lm_head
    (tied to ``wte``); ``targets``: [B, T] or [N] ids; ``chunk_size`` None or 0: the plain path."""
    if chunk_size is not None and int(chunk_size) < 0:
        raise UserError(f"loss chunk_size must be a positive number of rows, got {chunk_size!r}")
    h2, t1 = _flatten(hidden, weight, targets)
    compute_dtype = _compute_dtype(h2, weight)
    if not chunk_size:
        return _plain_loss(h2, weight, t1, ignore_index, compute_dtype)

    chunk = int(chunk_size)
    if torch.is_grad_enabled() and (h2.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(h2, weight, t1, chunk, ignore_index, compute_dtype)
    with torch.no_grad():  # evaluation: same chunked loop, no gradients computed or kept
        loss, _, _ = _chunked_forward(h2, weight, t1, chunk, ignore_index, compute_dtype, False, False)
    return loss


def _flatten(hidden, weight, targets):
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, C], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden size {hidden.shape[-1]} does not match weight {tuple(weight.shape)}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden shape without the last dim "
                         f"{tuple(hidden.shape[:-1])}")
    if targets.dtype != torch.long:
        targets = targets.long()
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def _compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the lm_head matmul runs in: what autocast would pick, else the promoted inputs."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and hidden.is_floating_point():
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _acc_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """float32 for 16/32-bit inputs, float64 for float64 inputs (so float64 tests are exact)."""
    return torch.promote_types(compute_dtype, torch.float32)


def _plain_loss(h2, weight, t1, ignore_index, compute_dtype):
    if torch.is_autocast_enabled(h2.device.type):
        logits = h2 @ weight.t()  # autocast casts both operands (and caches the weight cast)
    else:
        logits = h2.to(compute_dtype) @ weight.to(compute_dtype).t()
    logits = logits.to(_acc_dtype(compute_dtype))
    return F.cross_entropy(logits, t1, ignore_index=ignore_index, reduction="sum")


def _chunked_forward(h2, weight, t1, chunk, ignore_index, compute_dtype, need_h, need_w):
    """Loss sum and (optionally) its gradients w.r.t. h2 and weight, one chunk of rows at a time."""
    acc = _acc_dtype(compute_dtype)
    n_rows = h2.shape[0]
    with torch.autocast(h2.device.type, enabled=False):  # dtypes are managed explicitly here
        w = weight.to(compute_dtype)  # no copy when weight already has the compute dtype
        loss = torch.zeros((), dtype=acc, device=h2.device)
        grad_h = torch.empty(h2.shape, dtype=h2.dtype, device=h2.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, n_rows, chunk):
            end = min(start + chunk, n_rows)
            h = h2[start:end].to(compute_dtype)
            t = t1[start:end]
            valid = t != ignore_index
            safe_t = torch.where(valid, t, torch.zeros_like(t))
            logits = (h @ w.t()).to(acc)  # [n, V]; the only vocab-sized buffer, one chunk long
            target_logit = logits.gather(1, safe_t.unsqueeze(1)).squeeze(1)
            # log-sum-exp by hand, in place (torch.logsumexp would allocate another [n, V])
            row_max = logits.amax(dim=1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            sum_exp = exp.sum(dim=1, keepdim=True)
            lse = (row_max + sum_exp.log()).squeeze(1)
            loss = loss + torch.where(valid, lse - target_logit, torch.zeros_like(lse)).sum()
            if not (need_h or need_w):
                continue
            # d(sum CE)/d logits = softmax - onehot(target), zero on ignored rows; in place.
            grad_logits = exp.div_(sum_exp)
            grad_logits.scatter_add_(1, safe_t.unsqueeze(1), -valid.to(acc).unsqueeze(1))
            grad_logits.mul_(valid.to(acc).unsqueeze(1))
            g = grad_logits.to(compute_dtype)  # the same tensor when compute_dtype is float32/64
            del logits, exp, grad_logits
            if need_h:
                grad_h[start:end] = (g @ w).to(h2.dtype)
            if need_w:
                if g.dtype == acc:
                    grad_w.addmm_(g.t(), h)  # no [V, C] temporary
                else:  # 16-bit matmul, float32 accumulation; in vocab slices so that neither the
                    # 16-bit product nor its float32 cast is ever a full [V, C] temporary
                    for v0 in range(0, g.shape[1], _VOCAB_SLICE):
                        grad_w[v0:v0 + _VOCAB_SLICE].add_(g[:, v0:v0 + _VOCAB_SLICE].t() @ h)
            del g
        if grad_w is not None:
            grad_w = grad_w.to(weight.dtype)
    return loss, grad_h, grad_w


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales them."""

    @staticmethod
    def forward(ctx, h2, weight, t1, chunk, ignore_index, compute_dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_h, grad_w = _chunked_forward(h2, weight, t1, chunk, ignore_index, compute_dtype, need_h, need_w)
        ctx.save_for_backward(grad_h, grad_w)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        grad_h, grad_w = ctx.saved_tensors
        # Out of place, so a retain_graph=True second backward still sees the unscaled grads.
        if grad_h is not None:
            grad_h = grad_h * grad_output.to(grad_h.dtype)
        if grad_w is not None:
            grad_w = grad_w * grad_output.to(grad_w.dtype)
        return grad_h, grad_w, None, None, None, None
