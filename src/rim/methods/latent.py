"""What the continuous-thought methods (Coconut, CODI) share: the training batch with every question end in one
column, and the sequential latent passes through one KV cache.

A thought's input embedding is the previous position's last hidden state (through ``project`` where the method has
a projection, CODI's MLP). With every question end in one column (left padding), thought j sits in the same column
for the whole batch, so the passes run through one KV cache: a prefill up to the first thought, one single-column
pass per thought, then the rest of the sequence; gradients flow through the cache into every earlier pass.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from rim.core.batch import collate
from rim.core.curriculum import weighted_readout_loss
from rim.core.layout import PAD, QUESTION, Layout
from rim.infer.generate import cache_argument
from rim.models.adapter import check_kept, logits_at

Project = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LatentLayout(Layout):
    """A latent method's training layout; ``step_targets``: SIM-CoT's targets, one token list per thought group (the
    reasoning step that group stands for), empty without step supervision."""

    step_targets: list[list[int]] = field(default_factory=list)


def left_shift(layout: Layout, n: int, pad_id: int) -> Layout:
    """The layout with ``n`` padding positions in front (segment PAD, position 0, no label)."""
    return Layout(input_ids=[pad_id] * n + layout.input_ids, segment=[PAD] * n + layout.segment,
                  index=[0] * n + layout.index, position_ids=[0] * n + layout.position_ids,
                  labels=[-100] * n + layout.labels, label_readout=[-1] * n + layout.label_readout,
                  readouts=layout.readouts)


def question_shifts(layouts: list[Layout]) -> list[int]:
    """Padding put in front of each layout so that every question ends in the same column."""
    n_question = [x.segment.count(QUESTION) for x in layouts]
    return [max(n_question) - q for q in n_question]


def aligned_collate(layouts: list[Layout], pad_id: int, thought_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """A right-padded batch whose question ends share one column, with ``latent_start`` (the column of the first
    thought, right after the question and ``<bot>``) and ``n_latent`` (thoughts per row, one number per batch)."""
    shifts = question_shifts(layouts)
    batch = collate([left_shift(x, s, pad_id) for x, s in zip(layouts, shifts)], pad_id, multiple)
    batch["attention_mask"] = (batch["segment"] != PAD).long()
    n_latent = {x.input_ids.count(thought_id) for x in layouts}
    if len(n_latent) != 1:
        raise ValueError(f"one batch must have one number of thoughts, got {sorted(n_latent)}")
    batch["latent_start"] = torch.tensor(layouts[0].segment.count(QUESTION) + shifts[0] + 1)  # after <bot>
    batch["n_latent"] = torch.tensor(n_latent.pop())
    return batch


@dataclass
class LatentPass:
    """What ``latent_passes`` computed: ``logits`` (B, L, V), or (N, V) at the kept positions; ``thoughts`` (B, n, H),
    the input embeddings fed at the thought positions (None without thoughts); ``hidden``: at the positions asked
    for, every hidden state the model returns (the embeddings' output first, then each layer's), each (M, H)."""

    logits: torch.Tensor
    thoughts: torch.Tensor | None = None
    hidden: list[torch.Tensor] | None = None


def relocal(flat: torch.Tensor, length: int, lo: int) -> torch.Tensor:
    """Flat indices into (B, length) positions, re-indexed into the (B, length - lo) positions of columns lo.."""
    return flat // length * (length - lo) + flat % length - lo


def latent_passes(model, batch: dict[str, torch.Tensor], use_cache: bool = True, keep: torch.Tensor | None = None,
                  project: Project | None = None, hidden_at: torch.Tensor | None = None) -> LatentPass:
    """The forward pass with the thoughts' input embeddings replaced by the previous position's last hidden state
    (through ``project`` if given).

    ``batch``: ``input_ids``, ``attention_mask`` (B, L; 0 at padding), ``position_ids``, ``latent_start`` (the
    column of the first thought, the same for every row) and ``n_latent``. ``keep``: flat positions whose logits
    are returned (``logits_at``); ``hidden_at``: flat positions whose hidden states are returned. With the cache,
    both must lie in the last pass, after the thoughts (every label of a latent layout does). ``use_cache=False``
    recomputes the whole prefix for every thought: the slow reference the tests compare the cached passes against.
    """
    inner = getattr(model, "module", model)  # the HF model behind a DistributedDataParallel wrapper
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    mask, positions = batch["attention_mask"], batch["position_ids"]
    start, n, length = int(batch["latent_start"]), int(batch["n_latent"]), embeds.shape[1]
    feed = project or (lambda h: h)
    thoughts: list[torch.Tensor] = []

    def final_pass(inputs: torch.Tensor, lo: int, **kwargs) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        """Logits (and hidden states) of the pass over columns lo..L, at ``keep`` (``hidden_at``) re-indexed."""
        local = None if keep is None else relocal(keep, length, lo)
        with logits_at(model, local):
            out = model(inputs_embeds=inputs, attention_mask=mask, position_ids=positions[:, lo:],
                        output_hidden_states=hidden_at is not None, **kwargs)
        hidden = None
        if hidden_at is not None:
            rows = relocal(hidden_at, length, lo)
            hidden = [h.reshape(-1, h.shape[-1])[rows] for h in out.hidden_states]
        return check_kept(out.logits, local), hidden

    def result(logits: torch.Tensor, hidden: list[torch.Tensor] | None) -> LatentPass:
        return LatentPass(logits, torch.cat(thoughts, dim=1) if thoughts else None, hidden)

    if n == 0:
        return result(*final_pass(embeds, 0, use_cache=False))
    if not use_cache:
        for j in range(n):
            col = start + j
            out = model(inputs_embeds=embeds[:, :col], attention_mask=mask[:, :col],
                        position_ids=positions[:, :col], use_cache=False, output_hidden_states=True)
            thoughts.append(feed(out.hidden_states[-1][:, -1:]))
            embeds = torch.cat([embeds[:, :col], thoughts[-1], embeds[:, col + 1:]], dim=1)
        return result(*final_pass(embeds, 0, use_cache=False))
    cache_arg, past, logits, hidden = cache_argument(inner), None, [], None
    pieces = [(0, start)] + [(start + j, start + j + 1) for j in range(n)]
    for lo, hi in pieces:  # the prefill to <bot>, then one pass per thought
        inputs = embeds[:, lo:hi] if hidden is None else hidden
        with logits_at(model, None if keep is None else keep[:0]):  # no logits needed before the last pass
            out = model(inputs_embeds=inputs, attention_mask=mask[:, :hi], position_ids=positions[:, lo:hi],
                        use_cache=True, output_hidden_states=True, **{cache_arg: past})
        past = out[cache_arg]
        logits.append(out.logits)
        hidden = feed(out.hidden_states[-1][:, -1:])  # the prefill makes thought 1's input, thought j thought j+1's
        thoughts.append(hidden)
    thoughts.pop()  # the last thought's output is not fed back: <eot> follows
    last, states = final_pass(embeds[:, start + n:], start + n, use_cache=True, **{cache_arg: past})
    return result(last if keep is not None else torch.cat(logits + [last], dim=1), states)


def supervised_loss(model, batch: dict[str, torch.Tensor], weights: torch.Tensor, supervised_logits: bool = True,
                    **passes) -> tuple[torch.Tensor, LatentPass]:
    """The weighted readout loss of a latent batch (logits at the labelled positions only unless
    ``supervised_logits`` is off), and the ``LatentPass`` it came from; ``passes``: more ``latent_passes`` arguments."""
    keep = batch["supervised"] if supervised_logits else None
    out = latent_passes(model, batch, keep=keep, **passes)
    labels = batch["labels"] if keep is None else batch["labels"].flatten()[keep]
    return weighted_readout_loss(out.logits, labels, weights if keep is None else weights.flatten()[keep]), out
