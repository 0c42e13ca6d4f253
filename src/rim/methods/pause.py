"""Pause tokens: N fixed ``<pause>`` tokens between question and answer, plain causal mask, answer-only loss, no
curriculum. The control for "blocks without RiM's mask and curriculum" (PAPER.md section 7).

By default N equals the tokens RiM spends on its K blocks, K (M + 2), so both get the same extra compute.
"""

from __future__ import annotations

from rim.core.layout import Readout, build_layout
from rim.methods.base import Method, register


@register
class Pause(Method):
    """``question <pause>*N answer``, trained like No-CoT; the pauses are in the prompt at inference."""

    name = "pause"
    special_tokens = ("<pause>",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        n = cfg.pause_tokens if cfg.pause_tokens is not None else cfg.blocks * (cfg.memory_tokens + 2)
        self.pauses = [self.token["<pause>"]] * n

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        return build_layout(ex.question, [self.pauses], [Readout(ex.answer)], self.eos_id)

    def prompt(self, ex, blocks):
        return ex.question + self.pauses
