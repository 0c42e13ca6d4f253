"""The training recipe, top to bottom: setup -> stages (the curriculum as data) -> save.

    rim train configs/demo-rim.yaml train.batch_size=16

Runs through ``accelerate`` (one process by default; ``accelerate launch`` for several). Writes into the run
directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``layout.txt`` (one decoded example per stage) and
``checkpoint/`` (weights as safetensors, loadable with transformers or peft; tokenizer with the memory tokens;
``rim.json``).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from rim.config import Config, StageConfig, save_config, to_dict
from rim.core.batch import collate
from rim.core.curriculum import readout_weights, token_weights, weighted_readout_loss
from rim.core.layout import IGNORE, Layout
from rim.core.show import format_layout
from rim.data.tasks import Task, make_task
from rim.eval.evaluate import evaluate
from rim.methods.base import Method, TokenizedExample, make_method, method_class
from rim.models.adapter import compile_blocks, enable_gradient_checkpointing, make_trainable, set_dropout
from rim.models.load import build_model


# what a run writes (besides config.yaml, layout.txt and eval*/ results) that a rerun must not mix with its own
RUN_OUTPUTS = ("checkpoint", "checkpoints", "best", "metrics.jsonl")


class RunLog:
    """Console + JSONL metrics; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool = True):
        self.path, self.enabled = run_dir / "metrics.jsonl", enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


def make_accelerator(cfg: Config):
    """An Accelerator on the configured device and precision (bf16 autocast on CUDA by default, fp32 on CPU)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    return Accelerator(cpu=not cuda, mixed_precision=precision, gradient_accumulation_steps=cfg.train.grad_accum)


def describe_layout(layout: Layout, tokenizer, stage: StageConfig, sees_question: bool = True,
                    progress: float = 0.0) -> str:
    """``format_layout`` with token strings from the tokenizer and the stage's loss weights at ``progress``."""
    tokens = tokenizer.convert_ids_to_tokens(layout.input_ids)
    labels = [tokenizer.convert_ids_to_tokens(t) if t != IGNORE else "" for t in layout.labels]
    weights = stage_weights(collate([layout], pad_id=0), stage, progress)[0].tolist()
    return format_layout(layout, tokens, labels, weights, sees_question)


def stage_weights(batch: dict[str, torch.Tensor], stage: StageConfig, progress: float) -> torch.Tensor:
    """Per-token loss weights (B, L) of a batch at this point of the stage: λ for steps, α for answers."""
    w = readout_weights(batch["readout_step"], batch["readout_n_steps"], batch["readout_block"], batch["n_blocks"],
                        progress, stage.step_weight, stage.block_weight, stage.anneal_end)
    return token_weights(batch["label_readout"], w)


def stage_length(stage: StageConfig, batches_per_epoch: int, grad_accum: int) -> int:
    """Optimizer steps of a stage, from its ``steps`` or ``epochs``.

    ``batches_per_epoch`` is what this process sees (after sharding). accelerate also steps at the end of every
    epoch, so an epoch is ceil(batches / grad_accum) optimizer steps.
    """
    if stage.steps is not None:
        return stage.steps
    return max(1, math.ceil(stage.epochs * math.ceil(batches_per_epoch / grad_accum)))


def fresh_optimizer(model, stage: StageConfig, accelerator, old=None) -> torch.optim.Optimizer:
    """A new AdamW over the trainable parameters; the old one's state (2x the trainable weights) is freed."""
    if old is not None:
        old.optimizer.state.clear()
        if old in accelerator._optimizers:  # accelerate keeps every prepared optimizer alive otherwise
            accelerator._optimizers.remove(old)
    params = [p for p in model.parameters() if p.requires_grad]
    return accelerator.prepare(torch.optim.AdamW(params, lr=stage.lr, weight_decay=stage.weight_decay))


def warmup_constant(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then a constant learning rate (the paper's schedule)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup_steps)))


def prepare_data(cfg: Config, task: Task, tokenizer, method: Method) -> list[TokenizedExample]:
    """The tokenized training examples."""
    examples = task.load(cfg.data.train_split)[: cfg.data.max_train]
    return [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in examples]


def step_loss(method: Method, model, batch: dict[str, torch.Tensor], weights: torch.Tensor,
              supervised_logits: bool = True) -> torch.Tensor:
    """The weighted readout loss of one batch. Logits only at the supervised positions (``batch["supervised"]``),
    so (N, V) instead of (B, L, V); with ``supervised_logits`` off, at every position (the simple reference path,
    equal within floating-point tolerance)."""
    if not supervised_logits:
        return weighted_readout_loss(method.forward(model, batch), batch["labels"], weights)
    keep = batch["supervised"]
    return weighted_readout_loss(method.forward(model, batch, keep), batch["labels"].flatten()[keep],
                                 weights.flatten()[keep])


class LengthBuckets(Sampler[list[int]]):
    """Batches of examples of similar length (less padding), drawn deterministically from ``seed``: each pass
    shuffles the examples, sorts every window of ``window`` batches by length, cuts it into batches and shuffles
    the batch order. Only the last batch of a pass can be short, so a pass has as many batches as plain shuffling.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, window: int = 50):
        self.lengths, self.batch_size, self.window = lengths, batch_size, window
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        order = torch.randperm(len(self.lengths), generator=self.generator).tolist()
        span, batches = self.batch_size * self.window, []
        for lo in range(0, len(order), span):
            window = sorted(order[lo:lo + span], key=self.lengths.__getitem__)
            batches += [window[i:i + self.batch_size] for i in range(0, len(window), self.batch_size)]
        for i in torch.randperm(len(batches), generator=self.generator).tolist():
            yield batches[i]


class StageData(Dataset):
    """A stage's training layouts. Static methods lay every example out once; dynamic ones (iCoT-SI) lay it out
    when it is drawn, at the stage position ``epoch`` that the loop keeps current, with a per-draw seeded RNG."""

    def __init__(self, data: list[TokenizedExample], method: Method, stage: StageConfig, seed: int):
        self.data, self.method, self.stage, self.seed, self.epoch, self.draws = data, method, stage, seed, 0.0, 0
        self.fixed = None if method.dynamic else [method.train_layout(ex, stage) for ex in data]

    def __len__(self) -> int:
        return len(self.data)

    def lengths(self) -> list[int]:
        """Sequence length of every example (for dynamic methods, at the start of the stage)."""
        if self.fixed is not None:
            return [len(x) for x in self.fixed]
        return [len(self.method.train_layout(ex, self.stage)) for ex in self.data]

    def __getitem__(self, i: int) -> Layout:
        if self.fixed is not None:
            return self.fixed[i]
        self.draws += 1
        rng = random.Random(f"{self.seed}-{self.stage.name}-{self.draws}")
        return self.method.train_layout(self.data[i], self.stage, self.epoch, rng)


def run_stage(cfg: Config, stage: StageConfig, model, method: Method, data: list[TokenizedExample], tokenizer,
              accelerator, optimizer, log: RunLog, first_step: int, checkpointer: Checkpointer | None = None
              ) -> tuple[torch.optim.Optimizer, int]:
    """Train one curriculum stage; returns the optimizer (kept when the next stage does not reset it)."""
    layouts = StageData(data, method, stage, cfg.train.seed + first_step)
    seed = cfg.train.seed + first_step
    collate_fn = partial(method.collate, pad_id=tokenizer.pad_token_id)
    if cfg.train.bucket_by_length:
        loader = DataLoader(layouts, batch_sampler=LengthBuckets(layouts.lengths(), cfg.train.batch_size, seed),
                            collate_fn=collate_fn)
    else:
        loader = DataLoader(layouts, batch_size=cfg.train.batch_size, shuffle=True, collate_fn=collate_fn,
                            generator=torch.Generator().manual_seed(seed))
    loader = accelerator.prepare(loader)
    total = stage_length(stage, len(loader), cfg.train.grad_accum)
    steps_per_epoch = math.ceil(len(loader) / cfg.train.grad_accum)
    if optimizer is None or stage.reset_optimizer:
        optimizer = fresh_optimizer(model, stage, accelerator, optimizer)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = stage.lr
    scheduler = warmup_constant(optimizer, int(stage.warmup * total))
    set_dropout(model, stage.dropout)
    model.train()
    bar = tqdm(total=total, desc=f"{stage.name}", disable=not (cfg.train.progress and accelerator.is_main_process))
    step, loss_sum, n_loss, tokens, start = 0, torch.zeros((), device=accelerator.device), 0, 0, time.perf_counter()
    while step < total:
        for batch in loader:
            with accelerator.accumulate(model):
                loss = step_loss(method, model, batch, stage_weights(batch, stage, step / total),
                                 cfg.train.supervised_logits)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            n_loss += 1
            tokens += batch["input_ids"].numel()
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            layouts.epoch = step / steps_per_epoch
            bar.update(1)
            if step % cfg.train.log_every == 0 or step == total:
                mean_loss = (loss_sum / n_loss).item()  # the only host sync, once per log interval
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                log.write(event="train", stage=stage.name, step=first_step + step, stage_step=step, loss=mean_loss,
                          lr=scheduler.get_last_lr()[0], tokens=tokens, elapsed_s=time.perf_counter() - start)
                loss_sum.zero_()
                n_loss = 0
            if checkpointer is not None:
                checkpointer.on_step(model, first_step + step, stage_end=step == total)
            if step >= total:
                break
    bar.close()
    return optimizer, first_step + total


def write_checkpoint(model, tokenizer, cfg: Config, path: Path, extra: dict | None = None) -> None:
    """Weights (safetensors; a peft adapter in LoRA mode), tokenizer with memory tokens, and ``rim.json``.

    Written into a temporary sibling folder that then replaces ``path``, so a crash never leaves a half-written
    checkpoint under the final name. Call on the main process with the unwrapped model.
    """
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    meta = {"method": cfg.method.name, "memory_tokens": cfg.method.memory_tokens, "blocks": cfg.method.blocks,
            "train_mode": cfg.model.train_mode, "base_model": cfg.model.name, "task": cfg.data.task, **(extra or {})}
    (tmp / "rim.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)


def save_checkpoint(model, tokenizer, cfg: Config, path: Path, accelerator, extra: dict | None = None) -> None:
    """``write_checkpoint`` from the main process, after every process has arrived."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_checkpoint(accelerator.unwrap_model(model), tokenizer, cfg, path, extra)


class Checkpointer:
    """Checkpoints during training: every ``train.save_every`` steps into ``checkpoints/step-N`` and, with
    ``eval.select_split``, an evaluation every ``eval.every`` steps (and at each stage end) that keeps the best
    final-block accuracy in ``best/``. The scored split is never the selection split (the config checks it)."""

    def __init__(self, cfg: Config, run_dir: Path, task: Task, tokenizer, method: Method, accelerator, log: RunLog):
        self.cfg, self.run_dir, self.task, self.tokenizer, self.method = cfg, run_dir, task, tokenizer, method
        self.accelerator, self.log, self.best = accelerator, log, -1.0
        self.examples = []
        if cfg.eval.select_split:
            exs = task.load(cfg.eval.select_split)[: cfg.eval.select_max]
            self.examples = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in exs]

    def on_step(self, model, step: int, stage_end: bool = False) -> None:
        """Called after every optimizer step (``step`` counts over all stages)."""
        every = self.cfg.train.save_every
        if every and (step % every == 0 or stage_end):
            save_checkpoint(model, self.tokenizer, self.cfg, self.run_dir / "checkpoints" / f"step-{step}",
                            self.accelerator, {"step": step})
        every = self.cfg.eval.every
        if self.examples and ((every and step % every == 0) or stage_end):
            self.select(model, step)

    def select(self, model, step: int) -> None:
        """Score the selection split; keep the checkpoint if it is the best so far."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            inner = self.accelerator.unwrap_model(model)
            k = self.cfg.eval.blocks or self.cfg.method.blocks
            result = evaluate(inner, self.tokenizer, self.task, self.method, self.examples, k,
                              self.cfg.eval.batch_size, any_block=False, latency_examples=0)
            accuracy = result.metrics["final_block_accuracy"]
            improved = accuracy > self.best
            self.log.write(event="select", step=step, split=self.cfg.eval.select_split, accuracy=accuracy,
                           best=improved)
            if improved:
                self.best = accuracy
                write_checkpoint(inner, self.tokenizer, self.cfg, self.run_dir / "best",
                                 {"step": step, "select_split": self.cfg.eval.select_split,
                                  "select_accuracy": accuracy})
        model.train()


def train(cfg: Config, run_dir: str | Path | None = None) -> Path:
    """Train the configured method; returns the run directory."""
    from accelerate.utils import set_seed

    run_dir = Path(run_dir or cfg.output_dir)
    earlier = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()] + sorted(run_dir.glob("eval*"))
    if earlier and not cfg.overwrite:
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(p.name for p in earlier)}); choose "
                              "another output_dir or set overwrite=true")
    accelerator = make_accelerator(cfg)
    set_seed(cfg.train.seed)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        for path in earlier:  # overwrite=true: nothing of the earlier run may mix with this one
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    log = RunLog(run_dir, accelerator.is_main_process)
    task = make_task(cfg.data.task, cfg.data.options)
    model, tokenizer, new_tokens = build_model(cfg.model, task, cfg.train.seed,
                                               method_class(cfg.method.name).special_tokens)
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = make_trainable(model, new_tokens, cfg.model.train_mode, cfg.model.lora_rank, cfg.model.lora_alpha,
                           cfg.model.lora_dropout)
    if cfg.train.compile:
        compile_blocks(model)
    method = make_method(cfg.method, tokenizer)
    data = prepare_data(cfg, task, tokenizer, method)
    model = accelerator.prepare(model)
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.write(event="setup", config=to_dict(cfg), trainable_parameters=n_trainable, train_examples=len(data),
              device=str(accelerator.device), precision=accelerator.mixed_precision)
    checkpointer = Checkpointer(cfg, run_dir, task, tokenizer, method, accelerator, log)
    optimizer, step, views, start = None, 0, [], time.perf_counter()
    for stage in cfg.stages:
        views.append(f"== stage {stage.name} ({stage.kind}), loss weights at the start of the stage ==\n"
                     + describe_layout(method.train_layout(data[0], stage), tokenizer, stage,
                                       cfg.method.readout_sees_question))
        if accelerator.is_main_process:
            (run_dir / "layout.txt").write_text("\n\n".join(views) + "\n", encoding="utf-8")
        optimizer, step = run_stage(cfg, stage, model, method, data, tokenizer, accelerator, optimizer, log, step,
                                    checkpointer)
    save_checkpoint(model, tokenizer, cfg, run_dir / "checkpoint", accelerator)
    log.write(event="done", steps=step, train_s=time.perf_counter() - start)
    return run_dir
