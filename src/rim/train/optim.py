"""The optimizer and learning-rate schedule of a stage, and optimizer states across saves and resumes."""

from __future__ import annotations

from pathlib import Path

import torch

from rim.config import StageConfig
from rim.errors import CheckpointError
from rim.train.sharding import is_sharded, load_optimizer_state


IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def adamw(params: list[torch.nn.Parameter], lr: float, weight_decay: float = 0.0, sharded: bool = False
          ) -> torch.optim.AdamW:
    """AdamW, fused into one kernel per step on a GPU (as Hugging Face's Trainer defaults to since torch 2.8; the
    multi-tensor version makes several passes over the weights and moments); torch's choice elsewhere and for
    sharded (FSDP) weights."""
    fused = bool(params) and not sharded and all(p.device.type == "cuda" for p in params)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def fresh_optimizer(model, stage: StageConfig, accelerator, old=None, extra: list | None = None
                    ) -> torch.optim.Optimizer:
    """A new AdamW over the trainable parameters (and ``extra``, a method's own outside the model:
    ``Method.training_parameters``); the old one's state (2x the trainable weights) is freed."""
    if old is not None:
        old.optimizer.state.clear()
        if old in accelerator._optimizers:  # accelerate keeps every prepared optimizer alive otherwise
            accelerator._optimizers.remove(old)
    params = [p for p in model.parameters() if p.requires_grad] + list(extra or [])
    optimizer = adamw(params, stage.lr, stage.weight_decay, sharded=is_sharded(model))
    optimizer.param_groups[0]["initial_lr"] = stage.lr  # what the scheduler adds; a saved state holds it too
    return accelerator.prepare(optimizer)


def with_implementation_of(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A saved optimizer state with ``optimizer``'s implementation flags (fused, foreach, ...) in its groups, so that a
    run saved on a CPU and resumed on a GPU steps with the fused kernel (``load_state_dict`` would restore the saved
    flags) and its step counters go where the fused kernel needs them."""
    ours = getattr(optimizer, "optimizer", optimizer).param_groups
    if len(ours) != len(state["param_groups"]):  # load_state_dict says what does not match
        return state
    groups = [{**saved, **{k: group[k] for k in IMPLEMENTATION_FLAGS if k in group}}
              for saved, group in zip(state["param_groups"], ours)]
    return {**state, "param_groups": groups}


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then a constant learning rate (the paper's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def keyed_optimizer_state(state: dict, model, by_name: bool, folder: Path) -> dict:
    """A checkpoint's optimizer state keyed by parameter name (``by_name``: what ``load_optimizer_state`` takes
    under FSDP) or by index (``Optimizer.load_state_dict``), whichever way the run that wrote it keyed it, so a run
    resumes with or without ``train.fsdp`` either way. Index i is the i-th trainable parameter in the order
    ``fresh_optimizer`` lists them; a name is its ``named_parameters`` name (a tied weight's first), as
    torch.distributed.checkpoint writes it. ``model``: neither sharded nor wrapped yet."""
    names = [name for name, param in model.named_parameters() if param.requires_grad]
    new_key = dict(enumerate(names)) if by_name else {name: i for i, name in enumerate(names)}
    saved = [key for group in state["param_groups"] for key in group["params"]]
    if all(isinstance(key, str) == by_name for key in saved):
        return state
    if len(saved) != len(names) or set(saved) != set(new_key):
        raise CheckpointError(f"{folder}: its optimizer state holds {len(saved)} parameters that do not match the "
                              f"{len(names)} this model trains")
    return {"state": {new_key[key]: value for key, value in state["state"].items()},
            "param_groups": [{**group, "params": [new_key[key] for key in group["params"]]}
                             for group in state["param_groups"]]}


def stage_optimizer(model, stage: StageConfig, accelerator, optimizer, resumed: dict | None, stage_step: int,
                    total: int, extra: list | None = None
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The optimizer and scheduler a stage trains with: a fresh AdamW where the stage resets it (or a resumed run
    starts), loaded with the resumed checkpoint's moments where they belong to this stage; the stage's learning
    rate and weight decay; warm-up then constant, at the resumed step. ``resumed``: the resumed checkpoint's
    optimizer, scheduler and RNG states (None when the stage starts normally); ``extra``: the method's trainable
    parameters outside the model (``Method.training_parameters``), which join a fresh optimizer."""
    if optimizer is None or stage.reset_optimizer or resumed is not None:
        optimizer = fresh_optimizer(model, stage, accelerator, optimizer, extra)
        if resumed is not None and resumed["optimizer"] is not None and (stage_step or not stage.reset_optimizer):
            saved = with_implementation_of(optimizer, resumed["optimizer"])
            if is_sharded(model):  # the moments; the learning rate is set below
                load_optimizer_state(model, optimizer, saved)
            else:
                optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = stage.lr
        group["weight_decay"] = stage.weight_decay
    scheduler = warmup_constant(optimizer, int(stage.warmup * total))
    if resumed is not None and stage_step > 0:
        scheduler.load_state_dict(resumed["scheduler"])
        for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
            group["lr"] = lr
    return optimizer, scheduler
