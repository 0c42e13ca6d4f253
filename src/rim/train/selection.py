"""Checkpoint selection during training: which problems select (never the scored split, warned about when they
overlap the training problems), and scoring them as training goes (``best/`` keeps the best)."""

from __future__ import annotations

import contextlib
import warnings

import torch

from rim.config import CUDA_GRAPH_MODES, Config, inference_blocks
from rim.data.tasks import Example, Task
from rim.errors import ConfigError
from rim.eval.evaluate import evaluate
from rim.methods.base import Method, TokenizedExample
from rim.train.log import RunLog
from rim.train.sharding import gathered


def selection_problems(cfg: Config, task: Task) -> list[Example]:
    """The problems ``eval.select_split`` scores during training (its first ``eval.select_max``); none without it."""
    return task.load(cfg.eval.select_split)[: cfg.eval.select_max] if cfg.eval.select_split else []


def check_selection(cfg: Config, selection: list[Example], data: list[TokenizedExample]) -> dict | None:
    """Refuse a selection split made only of training problems; warn when some of its problems are training
    problems (GSM8K's ``valid`` is drawn from its ``train``) and return ``{"shared": n, "n": size}`` to log."""
    if not selection:
        return None
    trained = {ex.example.question for ex in data}
    shared = sum(ex.question in trained for ex in selection)
    if not shared:
        return None
    where = (f"{shared} of the {len(selection)} problems of the selection split {cfg.eval.select_split!r} are "
             f"training problems of data.train_split {cfg.data.train_split!r}")
    if shared == len(selection):
        raise ConfigError(f"eval.select_split: {where}; select on held-out problems (for gsm8k: "
                          "data.train_split=train_no_valid with eval.select_split=valid)")
    warnings.warn(f"{where}: selection partly measures memory", stacklevel=2)
    return {"shared": shared, "n": len(selection)}


class Selector:
    """Scores the selection split (``eval.select_split``) during training, every ``eval.every`` steps and at each
    stage end, and keeps the best final-block accuracy. The scored split is never the selection split (the config
    checks it)."""

    def __init__(self, cfg: Config, task: Task, tokenizer, method: Method, accelerator, log: RunLog,
                 selection: list[Example], reasoning: int = 0):
        self.cfg, self.task, self.tokenizer, self.method, self.accelerator, self.log = (cfg, task, tokenizer, method,
                                                                                        accelerator, log)
        self.best = -1.0
        self.reasoning = reasoning  # room for text reasoning when selecting: the longest trained chain of thought
        # the selection problems (``selection_problems``), scored whenever ``selects_at`` says so
        self.examples = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in selection]

    def selects_at(self, step: int, stage_end: bool) -> bool:
        """Whether the selection split is scored after this step."""
        every = self.cfg.eval.every
        return bool(self.examples) and (bool(every and step % every == 0) or stage_end)

    def select(self, model, step: int) -> bool:
        """Score the selection split (sharded over the processes); True if it is the best so far (the same
        decision on every process, which then all join in saving ``best/``)."""
        inner = self.accelerator.unwrap_model(model)
        k = inference_blocks(self.cfg)
        # decoding through blocks compiled into CUDA graphs would record graphs for every length it meets, and a
        # compiled decoder would be recompiled for the KV cache at every length
        train = self.cfg.train
        eager = train.compile in CUDA_GRAPH_MODES or (bool(train.compile) and train.compile_scope == "decoder")
        with gathered(inner), torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
            result = evaluate(inner, self.tokenizer, self.task, self.method, self.examples, k,
                              self.cfg.eval.batch_size, any_block=False, latency_examples=0, reasoning=self.reasoning)
        accuracy = result.metrics["final_block_accuracy"]  # the same on every process (records are gathered)
        improved = accuracy > self.best
        self.log.write(event="select", step=step, split=self.cfg.eval.select_split, accuracy=accuracy, best=improved)
        if improved:
            self.best = accuracy
        return improved
