"""Checkpoints of a training run: weights, tokenizer and ``rim.json`` (plus the trainer state in a resumable
``checkpoints/step-N``), written atomically into the run directory (``rim.rundir``) and read back to resume."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rim.config import Config, to_dict
from rim.errors import CheckpointError
from rim.models.adapter import tied_names
from rim.rundir import BEST, FINAL, META, RunDir, verify, write_atomic
from rim.train.selection import Selector
from rim.train.sharding import full_optimizer_state, full_state_dict, is_sharded
from rim.train.state import Position, save_state


def write_checkpoint(model, tokenizer, cfg: Config, path: Path, extra: dict | None = None, state=None,
                     weights: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (safetensors; a peft adapter in LoRA mode), tokenizer with memory tokens, ``rim.json``, optionally
    the trainer state (``state(folder)`` writes it), and a manifest with every file's hash, written atomically
    (``rim.rundir.write_atomic``). Call on the main process with the unwrapped model; ``weights``: its full state
    dict where the model itself holds only shards (FSDP).
    """

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
        tokenizer.save_pretrained(tmp)
        meta = {"method": cfg.method.name, "memory_tokens": cfg.method.memory_tokens, "blocks": cfg.method.blocks,
                "train_mode": cfg.model.train_mode, "base_model": cfg.model.name, "task": cfg.data.task,
                **(extra or {})}
        (tmp / META).write_text(json.dumps(meta, indent=2), encoding="utf-8")
        if state is not None:
            state(tmp)

    write_atomic(path, fill)


def save_checkpoint(model, tokenizer, cfg: Config, path: Path, accelerator, extra: dict | None = None,
                    state=None) -> None:
    """``write_checkpoint`` from the main process, after every process has arrived (and, for a sharded model, has
    joined in gathering the full weights)."""
    accelerator.wait_for_everyone()
    weights = full_state_dict(model) if is_sharded(model) else None
    if accelerator.is_main_process:
        write_checkpoint(accelerator.unwrap_model(model), tokenizer, cfg, path, extra, state, weights)
    accelerator.wait_for_everyone()  # nobody reads it (or moves on) before it is there


def load_weights(model, folder: Path) -> None:
    """Put a checkpoint's trained weights into ``model`` (the adapter of a peft model, else every weight).

    A tied weight may be saved under one of its names only (HF) or under all of them (peft: the LM head's copy of
    the embedding's trainable token rows, which peft then reports as unexpected): either is accepted.
    """
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder}: no safetensors weights")
    weights = {k: v for f in files for k, v in load_file(f).items()}
    aliases = tied_names(model)
    tied = set(aliases) | set(aliases.values())  # every name of a tied tensor
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        result = set_peft_model_state_dict(model, weights)
        adapters = [f".{name}" for name in model.peft_config]  # peft drops the adapter name from saved keys
        tied_saved = {name.replace(a, "") for name in tied for a in adapters}
        unexpected = [k for k in result.unexpected_keys if k not in tied_saved]
        if unexpected:
            raise CheckpointError(f"{folder}: adapter weights that the model lacks: {unexpected[:3]}")
        return
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or set(missing) - tied:
        raise CheckpointError(f"{folder}: weights do not fit the model (missing {sorted(set(missing) - tied)[:3]}, "
                              f"unexpected {unexpected[:3]})")


class Checkpointer:
    """Checkpoints during training: every ``train.save_every`` steps into ``checkpoints/step-N`` and, through its
    ``selector`` (with ``eval.select_split``), the best model on the selection split in ``best/``."""

    def __init__(self, cfg: Config, run: RunDir, tokenizer, accelerator, selector: Selector):
        self.cfg, self.run, self.tokenizer, self.accelerator, self.selector = cfg, run, tokenizer, accelerator, selector
        self.stage = 0  # index of the stage being trained (run_stage sets it)
        self.stage_state: dict = {}  # what the stage needs back on resume (run_stage sets it: an rl reference)

    @property
    def best(self) -> float:
        """The best selection score so far (saved with every step checkpoint)."""
        return self.selector.best

    def saves_at(self, step: int, stage_end: bool) -> bool:
        """Whether ``on_step`` writes a checkpoint at this step."""
        every = self.cfg.train.save_every
        return bool(every) and (step % every == 0 or stage_end)

    def selects_at(self, step: int, stage_end: bool) -> bool:
        """Whether ``on_step`` scores the selection split at this step."""
        return self.selector.selects_at(step, stage_end)

    def on_step(self, model, pos: Position, optimizer, scheduler, stage_end: bool = False) -> None:
        """Called after every optimizer step (``pos.step`` counts over all stages)."""
        if self.selects_at(pos.step, stage_end):  # first, so the checkpoint below holds this step's best score
            if self.selector.select(model, pos.step):
                save_checkpoint(model, self.tokenizer, self.cfg, self.run.folder(BEST), self.accelerator,
                                {"step": pos.step, "select_split": self.cfg.eval.select_split,
                                 "select_accuracy": self.best, **self.trained_in()})
            model.train()
        if self.saves_at(pos.step, stage_end):
            self.save(model, pos, optimizer, scheduler)

    def trained_in(self) -> dict:
        """What a checkpoint's ``rim.json`` says of the stage its weights were trained in (``stage``: index)."""
        index = self.stage
        return {"stage": index, "stage_name": self.cfg.stages[index].name, "reasoning": self.selector.reasoning}

    def save(self, model, pos: Position, optimizer, scheduler) -> None:
        """A resumable checkpoint ``checkpoints/step-N``; then only the newest ``train.keep_last`` are kept."""
        config = to_dict(self.cfg)
        moments = (None if optimizer is None else full_optimizer_state(model, optimizer) if is_sharded(model)
                   else optimizer.state_dict())

        def state(folder: Path) -> None:
            save_state(folder, pos, moments, scheduler, self.best, config, self.accelerator.num_processes,
                       self.stage_state)

        save_checkpoint(model, self.tokenizer, self.cfg, self.run.step_folder(pos.step), self.accelerator,
                        {"step": pos.step, **self.trained_in()}, state)
        keep = self.cfg.train.keep_last
        if keep and self.accelerator.is_main_process:
            self.run.prune(keep)

    def save_final(self, model) -> None:
        """The final weights in ``checkpoint/`` (the last stage's)."""
        self.stage = len(self.cfg.stages) - 1
        save_checkpoint(model, self.tokenizer, self.cfg, self.run.folder(FINAL), self.accelerator, self.trained_in())


def resume_point(run: RunDir, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``auto`` (the newest intact one in the run, None if there is none) or a
    path; a broken explicit path is an error, a broken newest one falls back to the one before."""
    if resume is None:
        return None
    if resume == "auto":
        return run.latest_valid()
    folder = Path(resume)
    verify(folder)
    return folder
