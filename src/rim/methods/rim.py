"""Reasoning in Memory: K memory blocks after the question; grounding, then refinement (PAPER.md sections 2-4)."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from rim.config import RL
from rim.core.batch import collate
from rim.core.layout import (BLOCK, QUESTION, Readout, build_layout, grounding_readouts, inference_prompt,
                             memory_block, refinement_readouts)
from rim.core.mask import attention_mask
from rim.infer.generate import (cache_argument, check_positions, decoding_forward, greedy_generate, learned_positions,
                                static_cache, static_length)
from rim.methods.base import Method, register
from rim.models.adapter import MEMORY_TOKENS, check_kept, logits_at, model_mask


@register
class RiM(Method):
    """Memory blocks ``<b> <m>*M </b>``; all readouts of an example in one pass under the RiM mask."""

    name = "rim"
    any_block = True
    special_tokens = MEMORY_TOKENS
    stage_kinds = ("grounding", "refinement", RL)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.block = memory_block(*(self.token[t] for t in MEMORY_TOKENS), cfg.memory_tokens)

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        if stage.kind == "grounding":
            readouts = grounding_readouts(ex.steps, ex.answer)
        elif stage.kind == "refinement":
            readouts = refinement_readouts(ex.answer, stage.blocks or self.cfg.blocks, len(ex.steps))
        else:
            raise ValueError(f"RiM lays out grounding and refinement stages, not {stage.kind!r}")
        return build_layout(ex.question, [self.block] * len(readouts), readouts, self.eos_id)

    def prompt(self, ex, blocks):
        return inference_prompt(ex.question, self.block, blocks)

    def generate(self, model, prompts, pad_id, eos_id, max_new_tokens, use_cache=True, cache=None, compile=None):
        """Greedy answers after ``question + K blocks``. With ``readout_sees_question: false`` the answer tokens do
        not see the question, as in training (the blocks still do, and so does the last block token, which
        predicts the first answer token)."""
        hidden = None if self.cfg.readout_sees_question else [self.question_length(p) for p in prompts]
        return greedy_generate(model, prompts, pad_id, eos_id, max_new_tokens, use_cache, hidden=hidden,
                               **self.decoding(cache, compile))

    def plain_decoding(self):
        return None if self.cfg.readout_sees_question else ("its answer must not see the question "
                                                            "(readout_sees_question: false), which a causal mask "
                                                            "cannot express")

    def question_length(self, prompt: list[int]) -> int:
        """The question's length in a prompt ``question + K blocks`` (K >= 0): what precedes the trailing blocks
        (exact, as a question's ids never hold memory tokens: ``question_ids`` tokenizes their strings as text)."""
        n, size = len(prompt), len(self.block)
        while n > size and prompt[n - size:n] == self.block:
            n -= size
        return n

    def block_readouts(self, model, examples, blocks, pad_id, eos_id, max_new_tokens, batch_size):
        """The greedy readout after every block k = 1..K, all K decoded together from one prefill of the prompt
        with K blocks (``decode_blocks``) instead of K separate decodes."""
        out: list[list[list[int]]] = []
        for lo in range(0, len(examples), batch_size):
            questions = [ex.question for ex in examples[lo:lo + batch_size]]
            out += self.decode_blocks(model, questions, blocks, pad_id, eos_id, max_new_tokens)
        return out

    @torch.no_grad()
    def decode_blocks(self, model, questions: list[list[int]], blocks: int, pad_id: int, eos_id: int,
                      max_new_tokens: int, cache: str | None = None, compile: bool | str | None = None
                      ) -> list[list[list[int]]]:
        """``out[i][k-1]``: the greedy readout of question i after block k, k = 1..K, from one KV-cached batch.

        Under the RiM mask the prefix ``question, m_1 .. m_K`` is plain causal with position ids 0..n-1, and no block
        sees a later one: one prefill serves every k, and the logits at the last token of block k give the first
        token of readout k. Each decoding step then appends the next token of all K readouts side by side to the
        same cache, readout k's at the position it has after a prompt of k blocks and seeing what readout k sees
        in training (``rim.core.mask``): the question (with ``readout_sees_question``), blocks 1..k and its own
        tokens. With ``readout_sees_question`` (the default) these are the tokens of K separate greedy decodes.
        ``cache`` and ``compile`` as for ``generate`` (default: the method's, i.e. ``eval.cache`` and
        ``eval.compile``): a static cache has one shape for every step, so compiled steps replay one graph.
        """
        if max_new_tokens <= 0:
            return [[[] for _ in range(blocks)] for _ in questions]
        decoding = self.decoding(cache, compile)
        limit = learned_positions(model)
        device = next(model.parameters()).device
        # the training layout with empty readouts is the prefix, right-padded: segments, indices and positions
        batch = collate([build_layout(q, [self.block] * blocks, [Readout([])] * blocks, eos_id) for q in questions],
                        pad_id)
        segment, index = batch["segment"], batch["index"]
        n, length = segment.shape
        ends = torch.tensor([[len(q) + k * len(self.block) for k in range(1, blocks + 1)] for q in questions])
        anchors = (torch.arange(n)[:, None] * length + ends - 1).flatten()  # flat (i, last token of block k)
        # readout k sees, of the prefix, blocks 1..k and the question if allowed (never padding); of the K tokens
        # each step appends, only its own
        sees = (segment[:, None] == BLOCK) & (index[:, None] <= torch.arange(1, blocks + 1)[:, None])  # (n, K, L)
        if self.cfg.readout_sees_question:
            sees |= (segment == QUESTION)[:, None]
        own = torch.eye(blocks, dtype=torch.bool).repeat(1, max_new_tokens - 1).expand(n, -1, -1)
        sees = torch.cat([sees, own], dim=2).to(device)  # (n, K, L + K (T - 1)): the columns of the last step
        positions = batch["position_ids"].to(device)
        starts = ends.to(device)  # (n, K): the position of each readout's first token
        # the position of every cache column: the prefix's, then each step's K tokens (sliding windows need them)
        columns = torch.cat([positions, (starts[:, None] + torch.arange(max_new_tokens - 1, device=device)[:, None])
                             .flatten(1)], dim=1)
        prefix = attention_mask(segment, index).to(device)
        width = sees.shape[2]
        if decoding["cache"] == "static":  # the masks span the whole cache, whose unwritten columns they hide
            past, width = static_cache(model, n, width, full_layers=True), static_length(width)
            sees = torch.nn.functional.pad(sees, (0, width - sees.shape[2]))
            prefix = torch.nn.functional.pad(prefix, (0, width - length))
            columns = torch.nn.functional.pad(columns, (0, width - columns.shape[1]))
        else:  # a cache of full layers: the masks span every column, which a sliding-window layer's cache drops
            past = DynamicCache()
        step = decoding_forward(model, decoding["compile"]) if decoding["cache"] == "static" else model
        cache_arg, keep = cache_argument(model), anchors.to(device)
        last = int(ends.max())  # the longest prefix: positions up to last - 1
        check_positions(limit, last)
        with logits_at(model, keep):  # the prefill stays uncompiled
            out = model(input_ids=batch["input_ids"].to(device), position_ids=positions, use_cache=True,
                        attention_mask=model_mask(prefix, model, positions, columns[:, :prefix.shape[2]]),
                        **{cache_arg: past})
        logits, past = check_kept(out.logits, keep).view(n, blocks, -1), out[cache_arg]
        tokens = torch.full((n, blocks, max_new_tokens), eos_id, device=device)
        done = torch.zeros(n, blocks, dtype=torch.bool, device=device)
        for j in range(max_new_tokens):
            token = logits.argmax(-1).masked_fill(done, eos_id)  # a finished readout's tokens are discarded
            tokens[..., j] = token
            done |= token == eos_id
            if j == max_new_tokens - 1 or bool(done.all()):  # one host sync per token: the price of stopping early
                break
            check_positions(limit, last + j + 1)  # this step feeds positions ends + j
            seen = length + blocks * (j + 1)  # the columns written so far, this step's included
            if decoding["cache"] == "static":  # one shape for every step: later steps' columns hidden instead
                mask, keys = sees & (torch.arange(width, device=device) < seen), columns
            else:
                mask, keys = sees[..., :seen], columns[:, :seen]
            out = step(input_ids=token, position_ids=starts + j, use_cache=True, **{cache_arg: past},
                       attention_mask=model_mask(mask, model, starts + j, keys))
            logits, past = out.logits, out[cache_arg]
        return [[r[:r.index(eos_id)] if eos_id in r else r for r in rows] for rows in tokens.tolist()]
