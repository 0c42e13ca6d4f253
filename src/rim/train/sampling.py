"""Which examples a stage trains on, in which order: seeded per epoch (a resumed run draws the same order again),
optionally bucketed by length; and a stage's plan (layouts, sampler, loader, optimizer steps)."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler

from rim.config import RL, Config, StageConfig
from rim.core.layout import Layout
from rim.errors import ConfigError
from rim.methods.base import Method, TokenizedExample, stage_prompt
from rim.train.state import Position


def stage_length(stage: StageConfig, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of a stage, from its ``steps`` or ``epochs``.

    ``batches_per_epoch`` is what this process sees (after sharding). accelerate also steps at the end of every
    epoch, so an epoch is ceil(batches / grad_accum) optimizer steps.
    """
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.epochs * math.ceil(batches_per_epoch / grad_accum)))


class LengthBuckets(Sampler[list[int]]):
    """Batches of examples of similar length (less padding), drawn deterministically from (seed, epoch): each pass
    shuffles the examples, sorts every window of ``window`` batches by length, cuts it into batches and shuffles
    the batch order. Only the last batch of a pass can be short, so a pass has as many batches as plain shuffling.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 50):
        self.lengths, self.batch_size, self.window, self.seed, self.epoch = lengths, batch_size, window, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        span, batches = self.batch_size * self.window, []
        for lo in range(0, len(order), span):
            window = sorted(order[lo:lo + span], key=self.lengths.__getitem__)
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        for i in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[i]


class EpochShuffle(Sampler[int]):
    """A fresh permutation of the examples per epoch, a pure function of (seed, epoch), so a resumed run draws the
    same order again. The loop sets ``epoch`` before each pass."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        return iter(torch.randperm(self.n, generator=generator).tolist())


def epoch_seed(seed: int, epoch: int) -> int:
    """One seed per (run seed, epoch) pair."""
    return (seed * 1_000_003 + epoch) % (2**63)


class StageData:
    """A stage's training layouts. Static methods lay every example out once; dynamic ones (iCoT-SI) lay an example
    out when it is drawn, at the stage position ``epoch`` (a float), with an RNG seeded by the draw's position. An rl
    stage has none: it samples its sequences (``rim.train.rl``)."""

    def __init__(self, data: list[TokenizedExample], method: Method, stage: StageConfig, seed: int):
        self.data, self.method, self.stage, self.seed = data, method, stage, seed
        self.fixed = None if method.dynamic or stage.kind == RL else [method.train_layout(ex, stage) for ex in data]

    def lengths(self) -> list[int]:
        """Sequence length of every example (for dynamic methods, at the start of the stage; for an rl stage, its
        prompt's)."""
        if self.stage.kind == RL:
            return [len(stage_prompt(self.method, ex, self.stage)) for ex in self.data]
        if self.fixed is not None:
            return [len(x) for x in self.fixed]
        return [len(self.method.train_layout(ex, self.stage)) for ex in self.data]

    def layout(self, i: int, epoch: float, pass_index: int) -> Layout:
        """Example ``i`` laid out at stage position ``epoch`` in pass ``pass_index`` over the data."""
        if self.fixed is not None:
            return self.fixed[i]
        rng = random.Random(f"{self.seed}-{self.stage.name}-{pass_index}-{i}")
        return self.method.train_layout(self.data[i], self.stage, epoch, rng)


@dataclass
class StagePlan:
    """A stage's training layouts, sampler (its ``epoch`` set before each pass), data loader and optimizer steps
    (per process)."""

    layouts: StageData
    sampler: Sampler
    loader: DataLoader
    total: int


def plan_stage(cfg: Config, stage: StageConfig, data: list[TokenizedExample], method: Method, accelerator,
               pos: Position) -> StagePlan:
    """The plan of ``stage`` as ``pos`` enters or resumes it; refuses a resumed
    position at or past the stage's end (a stage shortened since the checkpoint)."""
    seed = cfg.train.seed + pos.step - pos.stage_step
    layouts = StageData(data, method, stage, seed)
    if cfg.train.bucket_by_length:
        sampler = LengthBuckets(layouts.lengths(), cfg.train.batch_size, seed)
        batching = {"batch_sampler": sampler}
    else:
        sampler = EpochShuffle(len(data), seed)
        batching = {"sampler": sampler, "batch_size": cfg.train.batch_size}
    loader = accelerator.prepare(DataLoader(range(len(data)), collate_fn=list, **batching,
                                            generator=torch.Generator().manual_seed(seed)))
    total = stage_length(stage, len(loader), accelerator.gradient_accumulation_steps)  # per process
    if pos.stage_step >= total:  # only a resumed run gets here: its stage was shortened since the checkpoint
        raise ConfigError(f"stage {stage.name!r} (stages.{pos.stage}) now lasts {total} steps, but the checkpoint is "
                          f"at its step {pos.stage_step}; to resume, give it more steps (stages.{pos.stage}.steps or "
                          ".epochs, or the train.batch_size and train.grad_accum it was saved with)")
    return StagePlan(layouts, sampler, loader, total)
