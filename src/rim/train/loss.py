"""The training loss of one batch: the stage's loss weights (λ for steps, α for answers) and the weighted readout
loss, with logits only where a label is (or fused with the LM head)."""

from __future__ import annotations

import torch

from rim.config import StageConfig
from rim.core.curriculum import readout_weights, token_weights, weighted_readout_loss
from rim.errors import ConfigError
from rim.methods.base import Method
from rim.models.adapter import masked_loss


def stage_weights(batch: dict[str, torch.Tensor], stage: StageConfig, progress: float) -> torch.Tensor:
    """Per-token loss weights (B, L) of a batch at this point of the stage: λ for steps, α for answers."""
    w = readout_weights(batch["readout_step"], batch["readout_n_steps"], batch["readout_block"], batch["n_blocks"],
                        progress, stage.step_weight, stage.block_weight, stage.anneal_end)
    return token_weights(batch["label_readout"], w)


def step_loss(method: Method, model, batch: dict[str, torch.Tensor], weights: torch.Tensor,
              supervised_logits: bool = True, fused_loss: bool = False) -> torch.Tensor:
    """The weighted readout loss of one batch. Logits only at the supervised positions (``batch["supervised"]``),
    so (N, V) instead of (B, L, V); with ``supervised_logits`` off, at every position (the simple reference path,
    equal within floating-point tolerance). ``fused_loss``: at the supervised positions, fused with the LM head
    (``masked_loss``: no logits tensor at all), for methods that run the standard ``Method.forward``."""
    own = method.loss(model, batch, weights, supervised_logits)  # CODI's distillation, SIM-CoT's step decoding
    if own is not None:
        return own
    if not supervised_logits:
        return weighted_readout_loss(method.forward(model, batch), batch["labels"], weights)
    keep = batch["supervised"]
    labels, weights = batch["labels"].flatten()[keep], weights.flatten()[keep]
    if not fused_loss:
        return weighted_readout_loss(method.forward(model, batch, keep), labels, weights)
    if type(method).forward is not Method.forward:
        raise ConfigError(f"train.fused_loss needs the standard forward pass; {method.name} has its own: set "
                          "train.fused_loss=false")
    return masked_loss(model, batch, keep, labels, weights, method.cfg.readout_sees_question)
