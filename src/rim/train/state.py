"""What exact resume needs besides the weights: position in the curriculum and the data, optimizer, scheduler,
RNG states and the best selection score; plus checkpoint integrity (a content hash of every file).

A resumable checkpoint is a ``checkpoints/step-N`` folder: the weights as ``rim train`` always writes them
(safetensors, or the peft adapter), ``trainer_state.pt`` (tensors and plain data only, read back with
``torch.load(weights_only=True)``), ``trainer_state.json`` (position, best score, resolved config) and
``manifest.json`` (SHA-256 of every other file), written last: a folder without a valid manifest is not used
(``rim.rundir`` owns the folder names, the manifest and the atomic writes).
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rim.errors import CheckpointError
from rim.rundir import STATE_JSON, STATE_PT, verify



@dataclass
class Position:
    """Where training stands: stage index, optimizer steps into the stage and overall, epochs completed in the
    stage and micro-batches consumed in the current epoch; and the training-loss window since the last ``train``
    log line (the sum of its micro-batch losses, averaged over processes, their count, and the tokens seen in the
    stage), so that a resumed run logs what an uninterrupted one does. The window is current in saved states; so
    are ``log_stats`` (an rl stage's rewards) and ``train_s``, from which a resumed run counts on (its ``done``
    event reports the whole run's time)."""

    stage: int = 0
    stage_step: int = 0
    step: int = 0
    epoch: int = 0
    batch: int = 0
    log_loss: float = 0.0
    log_batches: int = 0
    log_tokens: int = 0
    train_s: float = 0.0  # training time up to here, summed over the processes' runs that got here (resumes)
    log_stats: dict = field(default_factory=dict)  # the window's summed statistics besides the loss (rl: reward)


def capture_rng() -> dict:
    """The RNG states a training step draws from (Python, torch CPU and CUDA)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device only (every rank has the same seed)
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_state(folder: Path, position: Position, optimizer_state: dict | None, scheduler, best: float, config: dict,
               processes: int = 1, extra: dict | None = None) -> None:
    """Write the trainer state files into a checkpoint folder (before its manifest); ``extra``: tensors a stage
    needs back when resumed (an rl stage's reference weights, ``rl_reference``)."""
    torch.save({"optimizer": optimizer_state,
                "scheduler": scheduler.state_dict() if scheduler is not None else None,
                "rng": capture_rng(), "processes": processes, **(extra or {})}, folder / STATE_PT)
    (folder / STATE_JSON).write_text(json.dumps({"position": asdict(position), "best": best, "config": config},
                                                indent=1), encoding="utf-8")


def load_state(folder: Path) -> tuple[Position, dict, float, dict]:
    """(position, tensors: optimizer/scheduler/rng, best score, config) of a verified checkpoint."""
    verify(folder)
    try:
        meta = json.loads((folder / STATE_JSON).read_text(encoding="utf-8"))
        tensors = torch.load(folder / STATE_PT, map_location="cpu", weights_only=True)
        return Position(**meta["position"]), tensors, meta["best"], meta["config"]
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:
        raise CheckpointError(f"{folder}: unreadable trainer state ({err})") from None


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every field that differs between two config dicts (lists by index)."""
    out: list[str] = []
    if isinstance(old, dict) and isinstance(new, dict):
        for key in list(old) + [k for k in new if k not in old]:
            out += config_diff(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            out += config_diff(a, b, f"{prefix}{i}.")
        return out
    return [] if old == new else [f"{prefix[:-1]}: {old!r} -> {new!r}"]
