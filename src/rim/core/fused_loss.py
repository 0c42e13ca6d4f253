"""The weighted readout loss fused with the LM head: ``weighted_readout_loss`` of the logits
``hidden @ weight.T + bias``, computed a chunk of rows at a time, so that the (N, V) logits and their fp32 copy never
exist whole (the vocabulary may be 128k).

The gradients with respect to the hidden states, the weight and the bias are computed in the forward pass, chunk by
chunk, from softmax minus one-hot: no second pass over the head in the backward, which only scales them by the
incoming gradient. Under autocast the matmuls run in the autocast dtype (as ``F.linear`` would) and the logsumexp in
fp32 (as ``weighted_readout_loss``); the head's weight gradient is summed over the chunks in the compute dtype
(in place: no (V, d) temporary), the others in fp32. When only a few rows of the
weight train (peft's trainable tokens: the memory-token rows of a tied head under LoRA), only their gradient is
computed, not the (V, d) one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 2**25  # logits per chunk: 256 rows at a vocabulary of 128k, 16k rows at 2k


def chunk_rows(vocab: int) -> int:
    """Rows of logits computed at once for a vocabulary of ``vocab`` (about 8 bytes each live per chunk)."""
    return max(1, CHUNK_ELEMENTS // vocab)


class FusedLinearCrossEntropy(torch.autograd.Function):
    """Σ w·NLL / Σ w over the rows of ``hidden @ W.T + bias``, W = ``weight`` with the rows ``index`` replaced by
    ``values`` (when given); see the module docstring. Its backward runs once (the gradients are handed over)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, values, labels, weights, rows: int, grad: bool):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_h, need_w, need_b, _, need_v = (grad and n for n in ctx.needs_input_grad[:5])
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            if index is not None:
                w = w.index_copy(0, index, values.to(dtype))
            b = None if bias is None else bias.to(dtype)
            scale = weights.float() / weights.float().sum().clamp(min=1e-8)
            loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.empty_like(hidden) if need_h else None
            # in the compute dtype, accumulated in place: an fp32 buffer would need a (V, d) temporary per chunk
            # (twice the head in memory and traffic; measured 2.2x slower on an H100 at V = 128k)
            grad_w = torch.zeros_like(weight, dtype=dtype) if need_w else None
            grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None
            grad_v = torch.zeros_like(values, dtype=torch.float32) if need_v else None
            for lo in range(0, h.shape[0], rows):
                hc, yc, sc = h[lo:lo + rows], labels[lo:lo + rows], scale[lo:lo + rows]
                logits = F.linear(hc, w, b).float()
                lse = logits.logsumexp(-1)
                loss += ((lse - logits.gather(1, yc[:, None]).squeeze(1)) * sc).sum()
                if not (need_h or need_w or need_b or need_v):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(len(yc), device=g.device), yc] -= 1
                g.mul_(sc[:, None])
                if need_b:
                    grad_b += g.sum(0)
                g = g.to(dtype)
                if need_h:
                    grad_h[lo:lo + rows] = g @ w
                if need_w:
                    grad_w.addmm_(g.t(), hc)
                if need_v:
                    grad_v += g[:, index].t() @ hc
            if need_w and index is not None:
                grad_w[index] = 0  # those rows of the weight were replaced
        ctx.grads = [grad_h] + [None if g is None else g.to(t.dtype)
                                for g, t in ((grad_w, weight), (grad_b, bias), (grad_v, values))]
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        if ctx.grads is None:
            raise RuntimeError("the fused loss's backward runs once (its gradients are handed over); "
                               "retain_graph is not supported: set train.fused_loss=false")
        grad_h, grad_w, grad_b, grad_v = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.grads)
        ctx.grads = None  # handed over, so autograd can keep the buffers as .grad
        return grad_h, grad_w, grad_b, None, grad_v, None, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                               labels: torch.Tensor, weights: torch.Tensor,
                               replaced: tuple[torch.Tensor, torch.Tensor] | None = None,
                               rows: int | None = None) -> torch.Tensor:
    """``weighted_readout_loss(F.linear(hidden, W, bias), labels, weights)`` with at most ``rows`` rows of logits
    alive at a time (default ``chunk_rows``); hidden (N, d), labels (N,) valid token ids, weights (N,). W is
    ``weight`` (V, d), or with ``replaced`` = (index, values) its rows ``index`` replaced by ``values`` (as peft's
    trainable tokens do). Gradients reach ``hidden``, ``weight``, ``bias`` and ``values`` as far as they require
    them."""
    index, values = replaced or (None, None)
    return FusedLinearCrossEntropy.apply(hidden, weight, bias, index, values, labels, weights,
                                         rows or chunk_rows(weight.shape[0]), torch.is_grad_enabled())
