"""Readout weights of the two-stage curriculum (PAPER.md section 4) and the weighted readout loss.

- λ_t(s), the weight of the readout of reasoning step t in the grounding stage, at stage progress s in [0, 1]:
  ``linear`` anneals 1 -> 0 earliest steps first, relative to each sample's own T: the front
  f = T * s / anneal_end sweeps over the steps and λ_t = clip(t - f, 0, 1); ``constant`` keeps λ_t = 1.
- α_k, the weight of the answer readout after block k of K: ``linear`` (α_k = k / K, increasing in k),
  ``uniform`` (1) or ``last`` (only block K).

The loss is the token NLL of every readout, averaged within a readout, then a weighted mean over readouts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rim.config import BLOCK_SCHEDULES, STEP_SCHEDULES


def step_weight(t: torch.Tensor, n_steps: torch.Tensor, progress: float, schedule: str = "linear",
                anneal_end: float = 1.0) -> torch.Tensor:
    """λ_t at stage progress ``progress`` for step numbers ``t`` (1-based) of samples with ``n_steps`` steps.

    With ``linear`` and T = 4, anneal_end = 1: at progress 0 all λ = 1; at 0.5 the front is at step 2::

        progress   λ_1  λ_2  λ_3  λ_4
        0.00       1    1    1    1
        0.25       0    1    1    1
        0.50       0    0    1    1
        0.625      0    0    0.5  1
        1.00       0    0    0    0
    """
    if schedule == "constant":
        return torch.ones_like(t, dtype=torch.float32)
    if schedule != "linear":
        raise ValueError(f"unknown step weight schedule {schedule!r}; choose from {STEP_SCHEDULES}")
    front = n_steps.float() * min(progress / anneal_end, 1.0)
    return (t.float() - front).clamp(0.0, 1.0)


def block_weight(k: torch.Tensor, n_blocks: torch.Tensor, schedule: str = "linear") -> torch.Tensor:
    """α_k for answer readouts after block ``k`` (1-based) of ``n_blocks``.

    >>> block_weight(torch.tensor([1, 2, 4]), torch.tensor(4)).tolist()
    [0.25, 0.5, 1.0]
    """
    if schedule == "linear":
        return k.float() / n_blocks.float()
    if schedule == "uniform":
        return torch.ones_like(k, dtype=torch.float32)
    if schedule == "last":
        return (k == n_blocks).float()
    raise ValueError(f"unknown block weight schedule {schedule!r}; choose from {BLOCK_SCHEDULES}")


def readout_weights(step: torch.Tensor, n_steps: torch.Tensor, block: torch.Tensor, n_blocks: torch.Tensor,
                    progress: float, step_schedule: str = "linear", block_schedule: str = "linear",
                    anneal_end: float = 1.0) -> torch.Tensor:
    """Weight of every readout, (B, R): λ for step readouts (``step`` > 0), α for answer readouts (``step`` == 0).

    ``n_steps`` and ``n_blocks`` broadcast against ``step`` (e.g. shape (B, 1)).
    """
    lam = step_weight(step, n_steps, progress, step_schedule, anneal_end)
    alpha = block_weight(block, n_blocks, block_schedule)
    return torch.where(step > 0, lam, alpha)


def token_weights(label_readout: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spread readout weights (B, R) over label positions (B, L): each readout's weight divided by its length.

    ``label_readout`` holds, per position, the 0-based readout its label belongs to, or -1 (unsupervised).
    Summed over a readout's positions the token weights give back the readout's weight, so the loss below is a
    weighted mean over readouts of the per-readout mean NLL.
    """
    supervised = label_readout >= 0
    idx = label_readout.clamp(min=0)
    counts = torch.zeros_like(weights).scatter_add_(1, idx, supervised.float())  # (B, R) tokens per readout
    per_token = (weights / counts.clamp(min=1)).gather(1, idx)
    return per_token * supervised


def weighted_readout_loss(logits: torch.Tensor, labels: torch.Tensor, tok_weights: torch.Tensor) -> torch.Tensor:
    """Σ w·NLL / Σ w over supervised positions; logits (N, V) or (B, L, V), labels and weights matching.

    Returns 0 (with a gradient path) when every weight is 0, e.g. a grounding batch whose steps are all annealed
    away and that has no answer readout.
    """
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1).clamp(min=0),
                          reduction="none")
    w = tok_weights.reshape(-1).to(nll.dtype)
    return (nll * w).sum() / w.sum().clamp(min=1e-8)
