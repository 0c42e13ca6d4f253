"""Reasoning in Memory: K memory blocks after the question; grounding, then refinement (PAPER.md sections 2-4)."""

from __future__ import annotations

from rim.core.layout import build_layout, grounding_readouts, inference_prompt, memory_block, refinement_readouts
from rim.methods.base import Method, register
from rim.models.adapter import MEMORY_TOKENS


@register
class RiM(Method):
    """Memory blocks ``<b> <m>*M </b>``; all readouts of an example in one pass under the RiM mask."""

    name = "rim"
    any_block = True
    special_tokens = MEMORY_TOKENS
    stage_kinds = ("grounding", "refinement")

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.block = memory_block(*(self.token[t] for t in MEMORY_TOKENS), cfg.memory_tokens)

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        if stage.kind == "grounding":
            readouts = grounding_readouts(ex.steps, ex.answer)
        elif stage.kind == "refinement":
            readouts = refinement_readouts(ex.answer, stage.blocks or self.cfg.blocks, len(ex.steps))
        else:
            raise ValueError(f"RiM has grounding and refinement stages, not {stage.kind!r}")
        return build_layout(ex.question, [self.block] * len(readouts), readouts, self.eos_id)

    def prompt(self, ex, blocks):
        return inference_prompt(ex.question, self.block, blocks)
