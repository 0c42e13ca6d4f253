"""Coconut, chain of continuous thought (Hao et al., 2024): the last hidden state is fed back as the next input
embedding, c "thoughts" per reasoning step, one sequential forward pass per thought.

Curriculum (stages of kind ``latent``): stage k replaces the first k language steps with k x c thoughts between
``<bot>`` and ``<eot>``, up to k = ``method.max_latent_steps`` (the rest of the steps stay text); a stage beyond it
drops every remaining language step, and the model answers right after max x c thoughts (as the original's stages
past ``max_latent_stage``). Stage ``latent_steps: 0`` is plain CoT in the same format ("stage 0");
``model.init_from`` starts from a trained CoT run instead. Every stage resets the optimizer by default.

Differences from the original code: each stage uses min(k, max) x c thoughts for every example (the original gives
each example of the stages past the maximum only as many thoughts as it has steps), and generation is batched and
KV-cached. Every checkpoint decodes with the thoughts of the run's last stage (``inference_thoughts``).

Training aligns every question end in one column (left padding), so thought j sits in the same column for the
whole batch and the passes run through one KV cache: a prefill to ``<bot>``, one single-column pass per thought,
then the rest of the sequence; gradients flow through the cache into every earlier pass.
"""

from __future__ import annotations

import torch

from rim.core.batch import collate
from rim.core.layout import PAD, QUESTION, Layout, Readout, build_layout
from rim.infer.generate import cache_argument, greedy_generate
from rim.methods.base import Method, register, split_cot, tokenize_example
from rim.models.adapter import check_kept, logits_at

BOT, THOUGHT, EOT = "<bot>", "<thought>", "<eot>"


def left_shift(layout: Layout, n: int, pad_id: int) -> Layout:
    """The layout with ``n`` padding positions in front (segment PAD, position 0, no label)."""
    return Layout(input_ids=[pad_id] * n + layout.input_ids, segment=[PAD] * n + layout.segment,
                  index=[0] * n + layout.index, position_ids=[0] * n + layout.position_ids,
                  labels=[-100] * n + layout.labels, label_readout=[-1] * n + layout.label_readout,
                  readouts=layout.readouts)


def latent_forward(model, batch: dict[str, torch.Tensor], use_cache: bool = True, keep: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Logits (B, L, V) with the thoughts' input embeddings replaced by the previous position's last hidden state;
    (N, V) at the flat positions ``keep`` only (``logits_at``).

    ``batch``: ``input_ids``, ``attention_mask`` (B, L; 0 at padding), ``position_ids``, ``latent_start`` (the
    column of the first thought, the same for every row) and ``n_latent``. ``use_cache=False`` recomputes the
    whole prefix for every thought: the slow reference the tests compare the cached passes against. With the cache,
    ``keep`` must lie in the last pass, from ``<eot>`` on, which holds every label of a Coconut layout.
    """
    inner = getattr(model, "module", model)  # the HF model behind a DistributedDataParallel wrapper
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    mask, positions = batch["attention_mask"], batch["position_ids"]
    start, n, length = int(batch["latent_start"]), int(batch["n_latent"]), embeds.shape[1]

    def final_pass(inputs: torch.Tensor, lo: int, **kwargs) -> torch.Tensor:
        """Logits of the pass over columns lo..L, at ``keep`` re-indexed into its (B, L - lo) positions."""
        local = None if keep is None else keep // length * (length - lo) + keep % length - lo
        with logits_at(model, local):
            out = model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions[:, lo:], **kwargs)
        return check_kept(out.logits, local)

    if n == 0:
        return final_pass(embeds, 0, use_cache=False)
    if not use_cache:
        for j in range(n):
            col = start + j
            out = model(inputs_embeds=embeds[:, :col], attention_mask=mask[:, :col],
                        position_ids=positions[:, :col], use_cache=False, output_hidden_states=True)
            embeds = torch.cat([embeds[:, :col], out.hidden_states[-1][:, -1:], embeds[:, col + 1:]], dim=1)
        return final_pass(embeds, 0, use_cache=False)
    cache_arg, past, logits, hidden = cache_argument(inner), None, [], None
    pieces = [(0, start)] + [(start + j, start + j + 1) for j in range(n)]
    for lo, hi in pieces:  # the prefill to <bot>, then one pass per thought
        inputs = embeds[:, lo:hi] if hidden is None else hidden
        with logits_at(model, None if keep is None else keep[:0]):  # no logits needed before <eot>
            out = model(inputs_embeds=inputs, attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                        use_cache=True, output_hidden_states=True, **{cache_arg: past})
        past = out[cache_arg]
        logits.append(out.logits)
        hidden = out.hidden_states[-1][:, -1:]
    last = final_pass(embeds[:, start + n:], start + n, use_cache=True, **{cache_arg: past})
    return last if keep is not None else torch.cat(logits + [last], dim=1)


@register
class Coconut(Method):
    """``question <bot> <thought>*n <eot> remaining steps #### answer``; answer extracted after ``####``."""

    name = "coconut"
    cot = True
    special_tokens = (BOT, THOUGHT, EOT)
    stage_kinds = ("latent",)

    def tokenize(self, task, tokenizer, ex, prompt_format="plain"):
        out = tokenize_example(task, tokenizer, ex, prompt_format)
        for k in range(self.cfg.max_latent_steps + 2):  # the language part left at each curriculum stage
            reasoning, tail = split_cot(task, tokenizer, ex, ex.steps[k:] if k <= self.cfg.max_latent_steps else ())
            out.extra[f"rest{k}"] = reasoning + tail
        return out

    def n_latent(self, latent_steps: int) -> int:
        """Thoughts in a stage that replaces ``latent_steps`` steps."""
        return min(latent_steps, self.cfg.max_latent_steps) * self.cfg.thoughts_per_step

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        k = min(stage.latent_steps or 0, self.cfg.max_latent_steps + 1)  # every stage past the maximum is alike
        block = [self.token[BOT]] + [self.token[THOUGHT]] * self.n_latent(k) + [self.token[EOT]]
        return build_layout(ex.question, [block], [Readout(ex.extra[f"rest{k}"])], self.eos_id)

    def plain_decoding(self):
        return "Coconut feeds hidden states back as input embeddings, which a stock engine does not do"

    def prompt(self, ex, blocks):
        return ex.question + [self.token[BOT]]

    def collate(self, layouts, pad_id, multiple=1):
        """Right-padded batch whose question ends share one column (see the module docstring)."""
        n_question = [x.segment.count(QUESTION) for x in layouts]
        width = max(n_question)
        batch = collate([left_shift(x, width - q, pad_id) for x, q in zip(layouts, n_question)], pad_id,
                        multiple)
        batch["attention_mask"] = (batch["segment"] != PAD).long()
        n_latent = {x.input_ids.count(self.token[THOUGHT]) for x in layouts}
        if len(n_latent) != 1:
            raise ValueError(f"one batch must have one number of thoughts, got {sorted(n_latent)}")
        batch["latent_start"] = torch.tensor(width + 1)  # after <bot>
        batch["n_latent"] = torch.tensor(n_latent.pop())
        return batch

    def forward(self, model, batch, keep=None):
        return latent_forward(model, batch, keep=keep)

    def inference_thoughts(self) -> int:
        """Thoughts fed at inference: ``method.inference_latent_steps``' worth if set, else those of the run's last
        stage (``at_stage``; every checkpoint, also one from stage 0, is scored in the form the run deploys, so the
        protocol never picks a CoT-decoded checkpoint as Coconut's), else the maximum."""
        steps = self.cfg.inference_latent_steps
        if steps is None:
            steps = self.cfg.max_latent_steps if self.stage is None else self.stage.latent_steps or 0
        return self.n_latent(steps)

    def generate(self, model, prompts, pad_id, eos_id, max_new_tokens, use_cache=True, cache=None, compile=None):
        n = self.inference_thoughts()
        return greedy_generate(model, prompts, pad_id, eos_id, max_new_tokens, use_cache, latents=n,
                               after_latents=[self.token[EOT]], **self.decoding(cache, compile))
