"""SIM-CoT's step-level supervision (Wei et al., 2025), an option of the latent methods (``coconut``, ``codi``):
an auxiliary decoder learns to decode each group of continuous thoughts into the reasoning step it stands for, and
that loss, weighted, is added to the method's own. The decoder exists only in training: it is never saved, and
generation never runs it.

The decoder reads the group's thoughts (the input embeddings fed at their positions), then the step's tokens
embedded by the LM's own input embedding (SIM-CoT shares the word embedding), and predicts the step and EOS; its
positions count from 1, as SIM-CoT's. Its loss is SIM-CoT's: the summed token NLL of each decoded step, averaged
over the steps of the batch (every group of every example).

``method.step_decoder``: ``separate`` (SIM-CoT's): a copy of the LM made when training starts, trained with it
(its own LoRA adapters in LoRA mode); ``shared`` (ours): the LM itself decodes the steps, no extra weights.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from rim.config import ConfigError, MethodConfig
from rim.core.layout import IGNORE

def step_targets(steps: list[list[int]], tail: list[int], groups: int) -> list[list[int]]:
    """What each of ``groups`` thought groups decodes into: one step each, the last group every step left over
    (SIM-CoT); with fewer steps than groups, the remaining groups decode ``tail`` (the answer part, ``#### a``; ours,
    where SIM-CoT repeats the answer as a pseudo-step).

    >>> step_targets([[1], [2], [3]], [9], 2)
    [[1], [2, 3]]
    >>> step_targets([[1]], [9], 3)
    [[1], [9], [9]]
    """
    if groups <= 0:
        return []
    if len(steps) >= groups:
        return [list(s) for s in steps[:groups - 1]] + [[t for s in steps[groups - 1:] for t in s]]
    return [list(s) for s in steps] + [list(tail)] * (groups - len(steps))


def collate_steps(targets: list[list[list[int]]]) -> torch.Tensor:
    """(B, G, T) token ids of every example's step targets, padded with IGNORE."""
    groups = {len(t) for t in targets}
    if len(groups) != 1:
        raise ValueError(f"one batch must have one number of thought groups, got {sorted(groups)}")
    width = max((len(s) for t in targets for s in t), default=0)
    return torch.tensor([[s + [IGNORE] * (width - len(s)) for s in t] for t in targets], dtype=torch.long).reshape(
        len(targets), groups.pop(), width)


class StepSupervision:
    """The auxiliary decoder and its loss for one training run (``prepare`` makes the decoder)."""

    def __init__(self, cfg: MethodConfig, eos_id: int):
        self.cfg, self.eos_id, self.decoder = cfg, eos_id, None

    def prepare(self, model, processes: int = 1) -> None:
        """A ``separate`` decoder: a copy of ``model`` (the unwrapped LM about to be trained), in training mode."""
        if self.cfg.step_decoder != "separate" or self.decoder is not None:
            return
        if processes > 1:  # its gradients would not be averaged over the processes (it is outside DDP)
            raise ConfigError("method.step_decoder=separate trains on one process only; use method.step_decoder="
                              "shared with several processes")
        self.decoder = copy.deepcopy(model).train()

    def parameters(self) -> list[torch.nn.Parameter]:
        """The decoder's trainable parameters (none for ``shared``)."""
        return [] if self.decoder is None else [p for p in self.decoder.parameters() if p.requires_grad]

    def loss(self, model, thoughts: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
        """The step-decoding loss of a batch: ``thoughts`` (B, n, H), ``targets`` (B, G, T) from ``collate_steps``;
        thought group g is thoughts g*c .. (g+1)*c - 1, c = n / G. Zero without thoughts (a stage-0 batch)."""
        batch, groups, width = targets.shape
        if thoughts is None or groups == 0:
            return torch.zeros((), device=targets.device)
        c = thoughts.shape[1] // groups
        if c * groups != thoughts.shape[1]:
            raise ValueError(f"{thoughts.shape[1]} thoughts do not split into {groups} groups")
        decoder = self.decoder if self.decoder is not None else model
        inner = getattr(model, "module", model)
        flat = targets.reshape(batch * groups, width)
        real = flat != IGNORE
        lengths = real.sum(1)
        steps = inner.get_input_embeddings()(flat.clamp(min=0))
        prefix = thoughts.reshape(batch * groups, c, thoughts.shape[-1]).to(steps.dtype)
        embeds = torch.cat([prefix, steps], dim=1)  # (S, c + T)
        columns = torch.arange(c + width, device=flat.device)
        mask = (columns[None] < (c + lengths)[:, None]).long()
        positions = (columns + 1).expand(batch * groups, -1)
        labels = torch.full((batch * groups, c + width), IGNORE, dtype=torch.long, device=flat.device)
        labels[:, c - 1:c - 1 + width] = flat  # the last thought predicts the step's first token, and so on
        labels[torch.arange(batch * groups, device=flat.device), c - 1 + lengths] = self.eos_id  # then EOS
        logits = decoder(inputs_embeds=embeds, attention_mask=mask, position_ids=positions).logits
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1).clamp(min=0),
                              reduction="none").reshape(labels.shape)
        return (nll * (labels != IGNORE)).sum(1).mean()
