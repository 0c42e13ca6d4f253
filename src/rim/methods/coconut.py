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

Training aligns every question end in one column and runs the passes through one KV cache (``rim.methods.latent``).
``method.step_supervision`` adds SIM-CoT's step-level supervision (``rim.methods.simcot``): thought group j (c
thoughts) is decoded into step j by an auxiliary decoder that only training uses.
"""

from __future__ import annotations

import torch

from rim.core.layout import Readout, build_layout
from rim.infer.generate import greedy_generate
from rim.methods.base import Method, register, split_cot, tokenize_example
from rim.methods.latent import LatentLayout, aligned_collate, latent_passes, supervised_loss
from rim.methods.simcot import StepSupervision, collate_steps, step_targets

BOT, THOUGHT, EOT = "<bot>", "<thought>", "<eot>"


def latent_forward(model, batch: dict[str, torch.Tensor], use_cache: bool = True, keep: torch.Tensor | None = None
                   ) -> torch.Tensor:
    """Logits (B, L, V) with the thoughts' input embeddings replaced by the previous position's last hidden state;
    (N, V) at the flat positions ``keep`` only (``rim.methods.latent.latent_passes``)."""
    return latent_passes(model, batch, use_cache, keep).logits


@register
class Coconut(Method):
    """``question <bot> <thought>*n <eot> remaining steps #### answer``; answer extracted after ``####``."""

    name = "coconut"
    cot = True
    special_tokens = (BOT, THOUGHT, EOT)
    stage_kinds = ("latent",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.steps = StepSupervision(cfg, self.eos_id) if cfg.step_supervision else None

    def tokenize(self, task, tokenizer, ex, prompt_format="plain"):
        out = tokenize_example(task, tokenizer, ex, prompt_format)
        for k in range(self.cfg.max_latent_steps + 2):  # the language part left at each curriculum stage
            reasoning, tail = split_cot(task, tokenizer, ex, ex.steps[k:] if k <= self.cfg.max_latent_steps else ())
            out.extra[f"rest{k}"] = reasoning + tail
        out.extra["tail"] = split_cot(task, tokenizer, ex, ())[1]
        return out

    def n_latent(self, latent_steps: int) -> int:
        """Thoughts in a stage that replaces ``latent_steps`` steps."""
        return min(latent_steps, self.cfg.max_latent_steps) * self.cfg.thoughts_per_step

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        k = min(stage.latent_steps or 0, self.cfg.max_latent_steps + 1)  # every stage past the maximum is alike
        block = [self.token[BOT]] + [self.token[THOUGHT]] * self.n_latent(k) + [self.token[EOT]]
        layout = build_layout(ex.question, [block], [Readout(ex.extra[f"rest{k}"])], self.eos_id)
        targets = []
        if self.steps is not None:  # SIM-CoT: group j (c thoughts) stands for step j; past the maximum, the last
            # group stands for every step left
            replaced = ex.steps[:k] if k <= self.cfg.max_latent_steps else ex.steps
            targets = step_targets(replaced, ex.extra["tail"], min(k, self.cfg.max_latent_steps))
        return LatentLayout(**vars(layout), step_targets=targets)

    def plain_decoding(self):
        return "Coconut feeds hidden states back as input embeddings, which a stock engine does not do"

    def prompt(self, ex, blocks):
        return ex.question + [self.token[BOT]]

    def collate(self, layouts, pad_id, multiple=1):
        """Right-padded batch whose question ends share one column (``rim.methods.latent``); with step supervision,
        ``step_targets`` (B, G, T)."""
        batch = aligned_collate(layouts, pad_id, self.token[THOUGHT], multiple)
        if self.steps is not None:
            batch["step_targets"] = collate_steps([x.step_targets for x in layouts])
        return batch

    def forward(self, model, batch, keep=None):
        return latent_forward(model, batch, keep=keep)

    def prepare_training(self, model, processes=1):
        if self.steps is not None:
            self.steps.prepare(model, processes)

    def training_parameters(self):
        return [] if self.steps is None else self.steps.parameters()

    def loss(self, model, batch, weights, supervised_logits=True):
        """Without step supervision, the standard loss; with it, that plus the weighted step-decoding loss."""
        if self.steps is None:
            return None
        answer, out = supervised_loss(model, batch, weights, supervised_logits)
        return answer + self.cfg.step_supervision_weight * self.steps.loss(model, out.thoughts, batch["step_targets"])

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
