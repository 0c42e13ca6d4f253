"""GRPO's math (Shao et al., 2024, DeepSeekMath; as TRL implements it), for the rl stage (``rim.train.rl``).

A prompt's ``G`` sampled completions form a group. Each completion's advantage is its reward minus the group's
mean, divided by the group's standard deviation (``scale``; Dr. GRPO leaves the division out). The loss of a
completion is the mean over its tokens of

    -exp(log π(y_t) - sg[log π(y_t)]) · A  +  β · (exp(d_t) - d_t - 1),   d_t = log π_ref(y_t) - log π(y_t),

averaged over the completions. The first term's value is -A (the ratio to the detached policy is 1: one update per
sampled batch), its gradient -A ∇log π(y_t); the second is the k3 estimator of KL(π || π_ref), always >= 0.
"""

from __future__ import annotations

import torch


def group_advantages(rewards: torch.Tensor, group: int, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """(N,) advantages of (N,) rewards, consecutive runs of ``group`` completions per prompt: the reward minus its
    group's mean, divided by the group's (unbiased) std + ``eps`` when ``scale``. A group whose completions all earn
    the same reward gets advantage 0: it teaches nothing."""
    if rewards.numel() % group:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group}")
    r = rewards.float().view(-1, group)
    centred = r - r.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (r.std(dim=1, keepdim=True) + eps)
    return centred.flatten()


def token_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """The k3 estimate of KL(π || π_ref) per sampled token: exp(d) - d - 1 with d = log π_ref - log π (>= 0)."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def grpo_loss(logp: torch.Tensor, advantages: torch.Tensor, sequence: torch.Tensor, kl_weight: float = 0.0,
              ref_logp: torch.Tensor | None = None) -> torch.Tensor:
    """GRPO's loss over a batch of completions, from flat per-token values: ``logp`` (T,) the policy's log-probability
    of each sampled token, ``sequence`` (T,) the completion each token belongs to (0..N-1, every one present),
    ``advantages`` (N,), and with ``kl_weight`` > 0 the reference's ``ref_logp`` (T,). Mean over each completion's
    tokens, then over the completions."""
    per_token = -torch.exp(logp - logp.detach()) * advantages[sequence]
    if kl_weight > 0:
        if ref_logp is None:
            raise ValueError("kl_weight > 0 needs the reference's log-probabilities")
        per_token = per_token + kl_weight * token_kl(logp, ref_logp)
    n = advantages.numel()
    lengths = torch.zeros(n, device=logp.device).index_add_(0, sequence, torch.ones_like(logp))
    per_sequence = torch.zeros(n, device=logp.device, dtype=per_token.dtype).index_add(0, sequence, per_token)
    return (per_sequence / lengths.clamp(min=1)).mean()
