"""CODI, continuous chain of thought via self-distillation (Shen et al., 2025): one model is both the teacher, which
reads the question and writes its CoT and answer, and the student, which reads the question, ``<bot>``, a fixed
number of continuous thoughts (the paper's 6) and ``<eot>``, then writes the answer. Both train at once:

    loss = α CE(teacher) + β CE(student) + γ distill,

where ``distill`` aligns the student's hidden states with the teacher's at the token that predicts the answer's
first token (the last token of ``####`` here; the paper's ``:`` of ``The answer is:``), in every hidden state the
model returns (the embeddings' output and each layer's), the teacher's held fixed (stop-gradient): per layer the
mean L1 distance (``method.distill_loss``), divided by the standard deviation of the teacher's states there
(``method.distill_std``), averaged over the layers. α = β = γ = 1 by default (the paper's GPT-2 setting; its
Llama recipe uses γ = 20).

A thought's input is the previous position's last hidden state through the projection (``method.projection``): a
two-layer MLP with GELU and a LayerNorm, trained in full (also under LoRA) and saved with the checkpoint. No
curriculum: one stage of kind ``sft``. Inference: ``question <bot>``, the thoughts, ``<eot>``, then greedy decoding
of ``#### answer`` (batched and KV-cached, as Coconut's). ``method.step_supervision`` adds SIM-CoT's step-level
supervision (``rim.methods.simcot``): thought j is decoded into step j.

Ours: the answer format (``#### a`` instead of ``The answer is: a``), the distillation token that follows from it,
and a teacher's CoT with every step unless ``method.drop_last_step`` (CODI's released recipe drops the last step,
which usually states the answer).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rim.core.batch import collate
from rim.core.curriculum import weighted_readout_loss
from rim.core.layout import IGNORE, PAD, Layout, Readout, build_layout
from rim.data.tasks import COT_SEPARATOR
from rim.infer.generate import greedy_generate
from rim.methods.base import Method, register, split_cot, text_ids, tokenize_example
from rim.methods.coconut import BOT, EOT, THOUGHT
from rim.methods.latent import LatentLayout, aligned_collate, latent_passes, question_shifts, supervised_loss
from rim.methods.simcot import StepSupervision, collate_steps, step_targets
from rim.models.adapter import check_kept, hf_model, logits_at

PROJECTION = "codi_projection"  # the projection's module name inside the Hugging Face model


@dataclass
class CodiLayout(LatentLayout):
    """The student's layout (this one), the teacher's (``teacher``), and the distillation token's position in each."""

    teacher: Layout | None = None
    distill: int = -1
    teacher_distill: int = -1

    def __len__(self) -> int:  # the longer of the two sequences (what data.max_length holds to)
        return max(len(self.input_ids), len(self.teacher.input_ids) if self.teacher is not None else 0)


def distillation_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], kind: str = "l1",
                      by_std: bool = True) -> torch.Tensor:
    """Mean over hidden-state layers of the distance between the student's and the (already detached) teacher's
    states (each (M, H)): ``l1``, ``smooth_l1`` or ``l2`` (mean over elements), divided by the teacher states' std
    (squared for ``l2``) when ``by_std``."""
    distance = {"l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss, "l2": F.mse_loss}[kind]
    losses = []
    for s, t in zip(student, teacher, strict=True):
        loss = distance(s.float(), t.float())
        if by_std:
            loss = loss / t.float().std().clamp(min=1e-8) ** (2 if kind == "l2" else 1)
        losses.append(loss)
    return torch.stack(losses).mean()


def make_projection(size: int, inner: int) -> nn.Module:
    """CODI's projection of a thought's hidden state: Linear, GELU, Linear, LayerNorm."""
    return nn.Sequential(nn.Linear(size, inner), nn.GELU(), nn.Linear(inner, size), nn.LayerNorm(size))


@register
class Codi(Method):
    """Teacher ``question steps #### answer`` and student ``question <bot> <thought>*n <eot> #### answer``."""

    name = "codi"
    cot = True
    special_tokens = (BOT, THOUGHT, EOT)
    stage_kinds = ("sft",)

    def __init__(self, cfg, tokenizer):
        super().__init__(cfg, tokenizer)
        self.steps = StepSupervision(cfg, self.eos_id) if cfg.step_supervision else None

    def tokenize(self, task, tokenizer, ex, prompt_format="plain"):
        out = tokenize_example(task, tokenizer, ex, prompt_format)
        reasoning, tail = split_cot(task, tokenizer, ex, ex.steps[:-1] if self.cfg.drop_last_step else None)
        n = len(out.answer)
        if not n or tail[-n:] != out.answer:  # the tail must end in the answer's own tokens, to find the token before
            tail = text_ids(tokenizer, " " + COT_SEPARATOR) + out.answer
        out.extra.update(reasoning=reasoning, tail=tail, before_answer=len(tail) - n)
        return out

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        block = [self.token[BOT]] + [self.token[THOUGHT]] * self.cfg.latents + [self.token[EOT]]
        tail, reasoning, before = ex.extra["tail"], ex.extra["reasoning"], ex.extra["before_answer"]
        student = build_layout(ex.question, [block], [Readout(tail)], self.eos_id)
        teacher = build_layout(ex.question, [[]], [Readout(reasoning + tail)], self.eos_id)
        targets = step_targets(ex.steps, tail, self.cfg.latents) if self.steps is not None else []
        # the distillation token: the last one before the answer (the first answer token is its label)
        return CodiLayout(**vars(student), step_targets=targets, teacher=teacher,
                          distill=len(ex.question) + len(block) + before - 1,
                          teacher_distill=len(ex.question) + len(reasoning) + before - 1)

    def plain_decoding(self):
        return "CODI feeds projected hidden states back as input embeddings, which a stock engine does not do"

    def prompt(self, ex, blocks):
        return ex.question + [self.token[BOT]]

    def collate(self, layouts, pad_id, multiple=1):
        """The student batch (question ends in one column, ``rim.methods.latent``) with the teacher's batch under
        ``teacher`` and the distillation tokens' flat positions in each (``distill``, ``teacher_distill``)."""
        batch = aligned_collate(layouts, pad_id, self.token[THOUGHT], multiple)
        teacher = collate([x.teacher for x in layouts], pad_id, multiple)
        teacher["attention_mask"] = (teacher["segment"] != PAD).long()
        width, teacher_width = batch["input_ids"].shape[1], teacher["input_ids"].shape[1]
        batch["distill"] = torch.tensor([i * width + x.distill + shift
                                         for i, (x, shift) in enumerate(zip(layouts, question_shifts(layouts)))])
        batch["teacher_distill"] = torch.tensor([i * teacher_width + x.teacher_distill for i, x in enumerate(layouts)])
        batch["teacher"] = teacher
        if self.steps is not None:
            batch["step_targets"] = collate_steps([x.step_targets for x in layouts])
        return batch

    def extend_model(self, model):
        if not self.cfg.projection:
            return []
        base = hf_model(model)
        if not hasattr(base, PROJECTION):
            weight = base.get_input_embeddings().weight
            size = weight.shape[1]
            base.add_module(PROJECTION, make_projection(size, self.cfg.projection_dim or size).to(weight.device,
                                                                                                weight.dtype))
        return [PROJECTION]

    def projection(self, model):
        """The projection inside ``model`` (through DDP and peft wrappers), or None without one."""
        return getattr(hf_model(model), PROJECTION) if self.cfg.projection else None

    def forward(self, model, batch, keep=None):
        """The student's logits."""
        return latent_passes(model, batch, keep=keep, project=self.projection(model)).logits

    def teacher_pass(self, model, teacher: dict[str, torch.Tensor], distill: torch.Tensor,
                     supervised_logits: bool = True) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The teacher's cross-entropy (mean over its labelled tokens) and its hidden states at the flat positions
        ``distill``, detached (the distillation target)."""
        keep = teacher["supervised"] if supervised_logits else None
        with logits_at(model, keep):
            out = model(input_ids=teacher["input_ids"], attention_mask=teacher["attention_mask"],
                        position_ids=teacher["position_ids"], output_hidden_states=True)
        labels = teacher["labels"] if keep is None else teacher["labels"].flatten()[keep]
        ce = weighted_readout_loss(check_kept(out.logits, keep), labels, (labels != IGNORE).float())
        return ce, [h.reshape(-1, h.shape[-1])[distill].detach() for h in out.hidden_states]

    def loss(self, model, batch, weights, supervised_logits=True):
        cfg = self.cfg
        student, out = supervised_loss(model, batch, weights, supervised_logits, project=self.projection(model),
                                       hidden_at=batch["distill"])
        teacher, target = self.teacher_pass(model, batch["teacher"], batch["teacher_distill"], supervised_logits)
        total = (cfg.teacher_weight * teacher + cfg.student_weight * student
                 + cfg.distill_weight * distillation_loss(out.hidden, target, cfg.distill_loss, cfg.distill_std))
        if self.steps is not None:
            total = total + cfg.step_supervision_weight * self.steps.loss(model, out.thoughts, batch["step_targets"])
        return total

    def prepare_training(self, model, processes=1):
        if self.steps is not None:
            self.steps.prepare(model, processes)

    def training_parameters(self):
        return [] if self.steps is None else self.steps.parameters()

    def generate(self, model, prompts, pad_id, eos_id, max_new_tokens, use_cache=True, cache=None, compile=None):
        return greedy_generate(model, prompts, pad_id, eos_id, max_new_tokens, use_cache, latents=self.cfg.latents,
                               after_latents=[self.token[EOT]], project=self.projection(model),
                               **self.decoding(cache, compile))
