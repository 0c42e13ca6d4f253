"""Reasoning in Memory: K memory blocks after the question; grounding, then refinement (PAPER.md sections 2-4)."""

from __future__ import annotations

import torch

from rim.core.batch import collate
from rim.core.layout import (Readout, build_layout, grounding_readouts, inference_prompt, memory_block,
                             refinement_readouts)
from rim.methods.base import Method, register
from rim.models.adapter import MEMORY_TOKENS, masked_forward


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

    @torch.no_grad()
    def block_readouts(self, model, examples, blocks, pad_id, eos_id, max_new_tokens, batch_size):
        """The greedy readout after every block k = 1..K, all K decoded together: one pass per generated token
        over ``question, m_1, r_1, ..., m_K, r_K`` under the RiM mask, instead of K separate decodes.

        Readout k at its last token sees exactly what inference with K = k sees (the mask and position ids of
        training), so the tokens are those of K separate greedy decodes.
        """
        device = next(model.parameters()).device
        out: list[list[list[int]]] = []
        for lo in range(0, len(examples), batch_size):
            questions = [ex.question for ex in examples[lo:lo + batch_size]]
            readouts = [[[] for _ in range(blocks)] for _ in questions]
            done = torch.zeros(len(questions), blocks, dtype=torch.bool)
            for _ in range(max_new_tokens):
                layouts = [build_layout(q, [self.block] * blocks, [Readout(r) for r in rs], eos_id)
                           for q, rs in zip(questions, readouts)]
                batch = {k: v.to(device) for k, v in collate(layouts, pad_id).items()}
                logits = masked_forward(model, batch, self.cfg.readout_sees_question)
                # the last token of block k and its readout so far predicts readout k's next token
                anchors = torch.tensor([[max(i for i, k in enumerate(x.index) if k == j) for j in range(1, blocks + 1)]
                                        for x in layouts], device=device)
                tokens = logits.gather(1, anchors[..., None].expand(-1, -1, logits.shape[-1])).argmax(-1).cpu()
                for i, row in enumerate(tokens.tolist()):
                    for j, token in enumerate(row):
                        if done[i, j]:
                            continue
                        if token == eos_id:
                            done[i, j] = True
                        else:
                            readouts[i][j].append(token)
                if bool(done.all()):
                    break
            out += readouts
        return out
