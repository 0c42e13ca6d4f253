"""The rl stage: GRPO on the answer after the run's inference prompt (``kind: rl``; the math in ``rim.core.grpo``).

For each training problem of a batch the policy samples ``group_size`` completions after the method's inference
prompt (for RiM ``question + K blocks``, K the stage's ``blocks`` or ``method.blocks``) at ``temperature``, up to
the task's answer budget, with the same decoding as evaluation (``greedy_generate``, sampling instead of argmax).
The reward of a completion is the task's ``is_correct`` of the answer extracted from it (1 or 0; no format
reward). One update per sampled batch: the loss is GRPO's over the completions, with a KL penalty (``kl_weight``)
to the policy at the stage's start (the reference: a copy of the trainable weights only, taken when the stage
starts and saved in every step checkpoint of the stage, so a run resumed inside the stage has the same one; copied
into the model's own parameters for the reference's forward pass and back after it).

The gradient of each answer token's log-probability flows through the whole prompt, the memory blocks included:
the stage trains exactly the parameters the other stages train (LoRA and the new token rows, or every weight).

rim's own loop runs it, not TRL's ``GRPOTrainer``: the stage then shares the loop's exact resume (data position,
optimizer, RNG states, the reference), checkpoints, selection, accelerate set-up and run directory with every other
stage, and needs nothing the GPU machines lack (TRL is not installed there). docs/method.md says more.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rim.config import StageConfig
from rim.core.grpo import group_advantages, grpo_loss, token_kl
from rim.data.tasks import Task
from rim.errors import ConfigError
from rim.eval.evaluate import answer_budget, longest_cot
from rim.infer.generate import greedy_generate
from rim.methods.base import Method, TokenizedExample, stage_prompt
from rim.models.adapter import check_kept, logits_at


@dataclass
class Samples:
    """Sampled completions of a batch: prompts (each repeated ``group_size`` times), completions (with their EOS
    when they ended before the budget), rewards, and whether each ended."""

    prompts: list[list[int]]
    completions: list[list[int]]
    rewards: torch.Tensor
    ended: list[bool]


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of the trainable parameters by name: the KL reference (what ``swapped_in`` copies in)."""
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def completion_batch(prompts: list[list[int]], completions: list[list[int]], pad_id: int, device
                     ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """The model inputs of ``prompt + completion`` sequences (right-padded, positions 0..n-1, as in decoding) and,
    per completion token: the flat position whose logits predict it (``keep``), the token (``labels``) and its
    completion's index (``sequence``)."""
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    keep, labels, sequence = [], [], []
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, :len(p) + len(c)] = torch.tensor(p + c)
        mask[i, :len(p) + len(c)] = 1
        keep += range(i * width + len(p) - 1, i * width + len(p) - 1 + len(c))
        labels += c
        sequence += [i] * len(c)
    positions = torch.arange(width).expand(len(rows), -1)
    inputs = {"input_ids": ids.to(device), "attention_mask": mask.to(device), "position_ids": positions.to(device)}
    return inputs, *(torch.tensor(x, device=device) for x in (keep, labels, sequence))


@contextmanager
def swapped_in(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> Iterator[None]:
    """Within the block the named parameters hold ``weights`` (copied in place, and their own values copied back
    after): the parameter objects stay the optimizer's, whatever aliases them (a tied embedding and LM head share
    one peft token-row module, which ``torch.func.functional_call`` restores wrongly). No autograd graph may hold
    these parameters meanwhile: run it before the policy's forward."""
    params = dict(model.named_parameters())
    own = {}
    with torch.no_grad():
        for name, value in weights.items():
            own[name] = params[name].detach().clone()
            params[name].copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for name, value in own.items():
                params[name].copy_(value)


def token_logprobs(model, inputs: dict[str, torch.Tensor], keep: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """log π(label) at each kept position, from logits / ``temperature`` (the distribution sampled from)."""
    with logits_at(model, keep):
        out = model(**inputs, use_cache=False)
    logits = check_kept(out.logits, keep).float() / temperature
    return F.log_softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]


class GRPO:
    """One rl stage's sampling and loss. ``reference``: the KL reference's weights (a resumed checkpoint's), else
    taken from the model now (only when ``kl_weight`` > 0)."""

    def __init__(self, stage: StageConfig, task: Task, method: Method, tokenizer, model,
                 accelerator, data: list[TokenizedExample], reference: dict[str, torch.Tensor] | None = None):
        why = method.plain_decoding()
        if why is not None:
            raise ConfigError(f"stage {stage.name!r} (kind rl) samples after the plain inference prompt, but {why}")
        self.stage, self.task, self.method = stage, task, method
        self.tokenizer, self.accelerator = tokenizer, accelerator
        self.budget = answer_budget(task, method, longest_cot(data))
        inner = accelerator.unwrap_model(model)
        device = next(inner.parameters()).device
        self.reference = None
        if stage.kl_weight > 0:
            self.reference = ({k: v.to(device) for k, v in reference.items()} if reference is not None
                              else trainable_weights(inner))

    def state(self) -> dict:
        """What a step checkpoint of the stage keeps besides the weights: the reference."""
        return {} if self.reference is None else {"rl_reference": self.reference}

    @torch.no_grad()
    def sample(self, model, examples: list[TokenizedExample]) -> Samples:
        """``group_size`` completions per example, sampled from ``model`` (unwrapped; in eval mode), and rewards."""
        group, eos = self.stage.group_size, self.tokenizer.eos_token_id
        prompts = [stage_prompt(self.method, ex, self.stage) for ex in examples for _ in range(group)]
        was_training = model.training
        model.eval()
        with self.accelerator.autocast():
            gen = greedy_generate(model, prompts, self.tokenizer.pad_token_id, eos, self.budget,
                                  temperature=self.stage.temperature)
        model.train(was_training)
        ended = [len(tokens) < self.budget for tokens in gen.tokens]  # EOS came (it is cut from the tokens)
        rewards = []
        for i, tokens in enumerate(gen.tokens):
            answer = self.task.extract_answer(self.tokenizer.decode(tokens, skip_special_tokens=True),
                                              cot=self.method.cot)
            rewards.append(float(self.task.is_correct(answer, examples[i // group].example.answer)))
        completions = [tokens + [eos] if end else tokens for tokens, end in zip(gen.tokens, ended)]
        return Samples(prompts, completions, torch.tensor(rewards), ended)

    def loss(self, model, examples: list[TokenizedExample]) -> tuple[torch.Tensor, int, dict[str, float]]:
        """(GRPO's loss of fresh samples for ``examples``, tokens run through the model, statistics to log)."""
        inner = self.accelerator.unwrap_model(model)
        samples = self.sample(inner, examples)
        device = next(inner.parameters()).device
        inputs, keep, labels, sequence = completion_batch(samples.prompts, samples.completions,
                                                          self.tokenizer.pad_token_id, device)
        temperature = self.stage.temperature
        ref_logp = None
        if self.reference is not None:  # first: the swap must not touch weights that a graph holds
            with torch.no_grad(), self.accelerator.autocast(), swapped_in(inner, self.reference):
                ref_logp = token_logprobs(inner, inputs, keep, labels, temperature)
        logp = token_logprobs(model, inputs, keep, labels, temperature)
        advantages = group_advantages(samples.rewards, self.stage.group_size, self.stage.scale_rewards).to(device)
        loss = grpo_loss(logp, advantages, sequence, self.stage.kl_weight, ref_logp)
        grouped = samples.rewards.view(-1, self.stage.group_size)
        stats = {"reward": samples.rewards.mean().item(),
                 "signal": (grouped.std(dim=1) > 0).float().mean().item(),  # groups that teach anything
                 "completion_tokens": labels.numel() / len(samples.completions),
                 "ended": sum(samples.ended) / len(samples.ended)}
        if ref_logp is not None:
            stats["kl"] = token_kl(logp.detach(), ref_logp).mean().item()
        return loss, inputs["input_ids"].numel(), stats
