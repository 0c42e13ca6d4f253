"""The training recipe, top to bottom: setup -> stages (the curriculum as data) -> save.

    rim train configs/demo-rim.yaml train.batch_size=16

Runs through ``accelerate`` (one process by default; ``accelerate launch`` for several). Writes into the run
directory: ``config.yaml`` (resolved), ``metrics.jsonl``, ``layout.txt`` (one decoded example per stage) and
``checkpoint/`` (weights as safetensors, loadable with transformers or peft; tokenizer with the memory tokens;
``rim.json``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from rim.config import Config, ConfigError, StageConfig, flatten, inference_blocks, save_config, to_dict
from rim.core.batch import collate
from rim.core.curriculum import readout_weights, token_weights, weighted_readout_loss
from rim.core.layout import IGNORE, Layout
from rim.core.show import format_layout
from rim.data.tasks import Example, Task, make_task
from rim.eval.evaluate import evaluate, longest_cot
from rim.infer.generate import CUDA_GRAPH_MODES
from rim.methods.base import Method, TokenizedExample, make_method, method_class, tokenize_training
from rim.models.adapter import (compile_model, enable_gradient_checkpointing, make_trainable, masked_loss,
                                 set_dropout, tied_names)
from rim.models.load import build_model
from rim.train.sharding import (full_optimizer_state, full_state_dict, gathered, is_sharded, load_optimizer_state,
                                shard_model)
from rim.train.state import (CheckpointError, Position, config_diff, fsync_tree, latest_valid, load_state,
                             restore_rng, resumable, save_state, verify, write_manifest)


# the run directory's folders that ``write_checkpoint`` replaces, moving the old one aside to ``<name>.old`` meanwhile
REPLACED = ("checkpoint", "best")
# what a run writes (besides config.yaml, layout.txt and eval*/ results) that a rerun must not mix with its own
RUN_OUTPUTS = ("checkpoint", "checkpoints", "best", "metrics.jsonl", *(f"{name}.old" for name in REPLACED))


class RunLog:
    """JSONL metrics (always) and, through ``accelerator``, the configured trackers (TensorBoard, W&B, ...): the
    training loss and learning rate per stage, and selection accuracy. Only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool = True, accelerator=None):
        self.path, self.enabled, self.accelerator = run_dir / "metrics.jsonl", enabled, accelerator

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            if record.get("event") == "train":
                self.accelerator.log({f"loss/{record['stage']}": record["loss"], "lr": record["lr"]},
                                     step=record["step"])
            elif record.get("event") == "select":
                self.accelerator.log({f"select/{record['split']}_accuracy": record["accuracy"]}, step=record["step"])


def make_accelerator(cfg: Config, run_dir: Path | None = None):
    """An Accelerator on the configured device and precision (bf16 autocast on CUDA by default, fp32 on CPU).

    The global batch is ``train.batch_size x train.grad_accum`` examples per optimizer step whatever the number
    of processes: under ``accelerate launch`` / ``torchrun`` with N processes each accumulates grad_accum / N
    micro-batches (grad_accum must be a multiple of N).
    """
    from accelerate import Accelerator, PartialState

    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    processes = PartialState(cpu=not cuda).num_processes
    if cfg.train.grad_accum % processes:
        raise ConfigError(f"config key 'train.grad_accum' ({cfg.train.grad_accum}) must be a multiple of the "
                          f"{processes} processes, so that the global batch stays batch_size x grad_accum")
    return Accelerator(cpu=not cuda, mixed_precision=precision,
                       gradient_accumulation_steps=cfg.train.grad_accum // processes,
                       log_with=cfg.train.trackers or None, project_dir=run_dir)


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


def prepare_data(cfg: Config, task: Task, tokenizer, method: Method) -> list[TokenizedExample]:
    """The tokenized training examples, held to ``data.max_length`` (over-long ones counted in ``task.records``)."""
    examples = task.load(cfg.data.train_split)[: cfg.data.max_train]
    return tokenize_training(method, task, tokenizer, examples, cfg.data, cfg.stages)


def step_loss(method: Method, model, batch: dict[str, torch.Tensor], weights: torch.Tensor,
              supervised_logits: bool = True, fused_loss: bool = False) -> torch.Tensor:
    """The weighted readout loss of one batch. Logits only at the supervised positions (``batch["supervised"]``),
    so (N, V) instead of (B, L, V); with ``supervised_logits`` off, at every position (the simple reference path,
    equal within floating-point tolerance). ``fused_loss``: at the supervised positions, fused with the LM head
    (``masked_loss``: no logits tensor at all), for methods that run the standard ``Method.forward``."""
    own = method.loss(model, batch, weights, supervised_logits)  # CODI's distillation, SIM-CoT's step decoding
    if own is not None:
        return own
    if not supervised_logits:
        return weighted_readout_loss(method.forward(model, batch), batch["labels"], weights)
    keep = batch["supervised"]
    labels, weights = batch["labels"].flatten()[keep], weights.flatten()[keep]
    if not fused_loss:
        return weighted_readout_loss(method.forward(model, batch, keep), labels, weights)
    if type(method).forward is not Method.forward:
        raise ConfigError(f"train.fused_loss needs the standard forward pass; {method.name} has its own: set "
                          "train.fused_loss=false")
    return masked_loss(model, batch, keep, labels, weights, method.cfg.readout_sees_question)


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
    out when it is drawn, at the stage position ``epoch`` (a float), with an RNG seeded by the draw's position."""

    def __init__(self, data: list[TokenizedExample], method: Method, stage: StageConfig, seed: int):
        self.data, self.method, self.stage, self.seed = data, method, stage, seed
        self.fixed = None if method.dynamic else [method.train_layout(ex, stage) for ex in data]

    def lengths(self) -> list[int]:
        """Sequence length of every example (for dynamic methods, at the start of the stage)."""
        if self.fixed is not None:
            return [len(x) for x in self.fixed]
        return [len(self.method.train_layout(ex, self.stage)) for ex in self.data]

    def layout(self, i: int, epoch: float, pass_index: int) -> Layout:
        """Example ``i`` laid out at stage position ``epoch`` in pass ``pass_index`` over the data."""
        if self.fixed is not None:
            return self.fixed[i]
        rng = random.Random(f"{self.seed}-{self.stage.name}-{pass_index}-{i}")
        return self.method.train_layout(self.data[i], self.stage, epoch, rng)


class TrainingStopped(RuntimeError):
    """Training stopped before the end; the message says why and how to resume."""

    exit_code = 3


class NonFiniteLoss(TrainingStopped):
    """The loss became NaN or infinite."""


class Interrupted(TrainingStopped):
    """SIGTERM or SIGINT arrived; a checkpoint of the last finished step was written."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopSignals:
    """While active, SIGTERM and SIGINT only set ``signum``; the loop checkpoints and stops at the next step."""

    def __init__(self):
        self.signum, self.previous, self.group = 0, {}, None

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, accelerator) -> int:
        """The signal seen by any process (0 if none): every process stops at the same step. The flag is host
        state, so it is reduced over a gloo group on the host: a reduction on the GPU would make the host wait for
        the step's kernels every step."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch.distributed as dist

        if self.group is None:  # collective: every process gets here at its first step
            self.group = dist.new_group(backend="gloo")
        flag = torch.tensor(self.signum)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.group is not None:  # one per training run: several runs in one process (rim compare) add none
            import torch.distributed as dist

            dist.destroy_process_group(self.group)


def plan_stage(cfg: Config, stage: StageConfig, data: list[TokenizedExample], method: Method, accelerator,
               pos: Position) -> tuple:
    """(layouts, sampler, loader, optimizer steps) of ``stage`` as ``pos`` enters or resumes it; refuses a resumed
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
    return layouts, sampler, loader, total


def run_stage(cfg: Config, stage: StageConfig, model, method: Method, data: list[TokenizedExample], tokenizer,
              accelerator, optimizer, log: RunLog, pos: Position, checkpointer: Checkpointer,
              stop: StopSignals, resumed: dict | None = None, clock: tuple[float, float] | None = None,
              plan: tuple | None = None) -> torch.optim.Optimizer:
    """Train one curriculum stage from ``pos`` (updated as training goes); returns the optimizer (kept when the
    next stage does not reset it). ``resumed``: the optimizer, scheduler and RNG states of a resumed checkpoint.
    ``clock``: the run's training time before this process started it and the ``perf_counter`` then, from which
    ``pos.train_s`` counts (by default, from this stage's start). ``plan``: ``plan_stage``'s, when made already."""
    from accelerate.utils import send_to_device

    first_step = pos.step - pos.stage_step
    checkpointer.stage = pos.stage
    layouts, sampler, loader, total = plan or plan_stage(cfg, stage, data, method, accelerator, pos)
    accumulate = accelerator.gradient_accumulation_steps  # per process: grad_accum / processes
    steps_per_epoch = math.ceil(len(loader) / accumulate)
    sharded, graphs = is_sharded(model), cfg.train.compile in CUDA_GRAPH_MODES
    if optimizer is None or stage.reset_optimizer or resumed is not None:
        optimizer = fresh_optimizer(model, stage, accelerator, optimizer, method.training_parameters())
        if resumed is not None and resumed["optimizer"] is not None and (pos.stage_step or not stage.reset_optimizer):
            saved = with_implementation_of(optimizer, resumed["optimizer"])
            if sharded:  # the moments; the learning rate is set below
                load_optimizer_state(model, optimizer, saved)
            else:
                optimizer.load_state_dict(saved)
    for group in optimizer.param_groups:
        group["lr"] = group["initial_lr"] = stage.lr
        group["weight_decay"] = stage.weight_decay
    scheduler = warmup_constant(optimizer, int(stage.warmup * total))
    if resumed is not None:
        if pos.stage_step > 0:
            scheduler.load_state_dict(resumed["scheduler"])
            for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
                group["lr"] = lr
        restore_rng(resumed["rng"])
    set_dropout(model, stage.dropout)
    model.train()
    # under CUDA graphs a .grad that the backward creates is a graph output, overwritten by the next micro-batch's
    # replay (pytorch#169545): accumulate into buffers allocated here, zeroed in place
    stable_grads = graphs and accumulate > 1
    if stable_grads:
        for p in model.parameters():
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)
    bar = tqdm(total=total, initial=pos.stage_step, desc=f"{stage.name}",
               disable=not (cfg.train.progress and accelerator.is_main_process))
    step, skip = pos.stage_step, pos.batch
    # the logging window, continued from the checkpoint when resuming
    n_loss, tokens = (pos.log_batches, pos.log_tokens) if resumed is not None else (0, 0)
    loss_sum = torch.tensor(pos.log_loss if resumed is not None else 0.0, device=accelerator.device)
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a non-finite loss since the last check
    start = window_start = time.perf_counter()
    clock_base, clock_start = clock or (pos.train_s, start)  # the run's time before it, and when this process began
    window_tokens = 0  # tokens this process has processed since the last log line (or the start of this process)
    while step < total:
        sampler.epoch = pos.epoch
        for i, indices in enumerate(loader):
            if i < skip:
                continue
            batch = method.collate([layouts.layout(j, step / steps_per_epoch, pos.epoch) for j in indices],
                                   tokenizer.pad_token_id, cfg.train.pad_to_multiple or 1)
            batch = send_to_device(batch, accelerator.device, non_blocking=True)  # no stream sync per step
            if graphs:  # the graphs' outputs of the last step are no longer needed
                torch.compiler.cudagraph_mark_step_begin()
            with accelerator.accumulate(model):
                if sharded:  # accelerate's accumulate knows DDP's no_sync, not FSDP2's switch
                    model.set_requires_gradient_sync(accelerator.sync_gradients)
                loss = step_loss(method, model, batch, stage_weights(batch, stage, step / total),
                                 cfg.train.supervised_logits, cfg.train.fused_loss)
                # accelerate divides every micro-batch's loss by the accumulation count; an epoch's last step
                # may have fewer micro-batches, whose gradient is then their mean too, not scaled down
                group = min(accumulate, len(loader) - i // accumulate * accumulate)
                accelerator.backward(loss * (accumulate / group) if group < accumulate else loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    extra = method.training_parameters()  # SIM-CoT's separate decoder (never with FSDP)
                    accelerator.clip_grad_norm_([*model.parameters(), *extra] if extra else model.parameters(),
                                                cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=not stable_grads)
            bad |= ~torch.isfinite(loss.detach())
            loss_sum += loss.detach()
            n_loss += 1
            tokens += batch["input_ids"].numel()
            window_tokens += batch["input_ids"].numel()
            pos.batch = i + 1
            if pos.batch == len(loader):
                pos.epoch, pos.batch = pos.epoch + 1, 0
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            pos.stage_step, pos.step = step, first_step + step
            bar.update(1)
            stage_end = step == total
            signum = stop.agreed(accelerator)  # the same on every process, read once per step
            saves = checkpointer.saves_at(pos.step, stage_end)
            works = saves or checkpointer.selects_at(pos.step, stage_end)  # on_step does something after this step
            if step % cfg.train.log_every == 0 or stage_end or works or signum:
                if accelerator.reduce(bad.float(), "sum") > 0:  # host sync at log intervals, saves and selections
                    raise NonFiniteLoss(f"non-finite loss in stage {stage.name!r} by step {pos.step}; nothing "
                                        "after the last checkpoint was saved (lower the learning rate, then "
                                        "`rim train CONFIG --resume auto`)")
            logs = step % cfg.train.log_every == 0 or stage_end
            if logs:
                mean_loss = accelerator.reduce(loss_sum / n_loss, "mean").item()  # over processes too
                # the item() above waited for the steps' kernels: the window's time is theirs
                seen = accelerator.reduce(torch.tensor(window_tokens, device=accelerator.device), "sum")
                speed = seen.item() / max(time.perf_counter() - window_start, 1e-9)
                bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{speed:,.0f}")
                log.write(event="train", stage=stage.name, step=pos.step, stage_step=step, loss=mean_loss,
                          lr=scheduler.get_last_lr()[0], tokens=tokens, tokens_per_s=speed,
                          elapsed_s=time.perf_counter() - start)
                loss_sum.zero_()
                n_loss = 0
            if saves or signum:  # the window and the time so far go into the checkpoint
                pos.train_s = clock_base + time.perf_counter() - clock_start
                pos.log_loss = accelerator.reduce(loss_sum, "mean").item() if n_loss else 0.0
                pos.log_batches, pos.log_tokens = n_loss, tokens
            if stage_end:  # a checkpoint here resumes at the start of the next stage
                pos.stage, pos.stage_step, pos.epoch, pos.batch = pos.stage + 1, 0, 0, 0
                pos.log_loss, pos.log_batches, pos.log_tokens = 0.0, 0, 0
            checkpointer.on_step(model, pos, optimizer, scheduler, stage_end)
            if logs or works:  # the next window starts here: selection and checkpoints are not training
                window_tokens, window_start = 0, time.perf_counter()
            if signum:
                if not saves:
                    checkpointer.save(model, pos, optimizer, scheduler)
                raise Interrupted(f"stopped by signal {signum} after step {pos.step}; checkpoint "
                                  f"checkpoints/step-{pos.step} written; continue with `--resume auto`", signum)
            if stage_end:
                break
        skip = 0
    bar.close()
    return optimizer


def write_checkpoint(model, tokenizer, cfg: Config, path: Path, extra: dict | None = None, state=None,
                     weights: dict[str, torch.Tensor] | None = None) -> None:
    """Weights (safetensors; a peft adapter in LoRA mode), tokenizer with memory tokens, ``rim.json``, optionally
    the trainer state (``state(folder)`` writes it), and a manifest with every file's hash.

    Written into a temporary sibling folder, flushed to disk, then renamed over ``path``, so a crash never leaves a
    half-written checkpoint under the final name; an earlier checkpoint there is first moved aside to
    ``<name>.old`` and deleted last, so one of the two is always whole. Call on the main process with the unwrapped
    model; ``weights``: its full state dict where the model itself holds only shards (FSDP).
    """
    tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": weights} if weights is not None else {}))
    tokenizer.save_pretrained(tmp)
    meta = {"method": cfg.method.name, "memory_tokens": cfg.method.memory_tokens, "blocks": cfg.method.blocks,
            "train_mode": cfg.model.train_mode, "base_model": cfg.model.name, "task": cfg.data.task, **(extra or {})}
    (tmp / "rim.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
    if state is not None:
        state(tmp)
    write_manifest(tmp)
    fsync_tree(tmp)
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


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


class Checkpointer:
    """Checkpoints during training: every ``train.save_every`` steps into ``checkpoints/step-N`` and, with
    ``eval.select_split``, an evaluation every ``eval.every`` steps (and at each stage end) that keeps the best
    final-block accuracy in ``best/``. The scored split is never the selection split (the config checks it)."""

    def __init__(self, cfg: Config, run_dir: Path, task: Task, tokenizer, method: Method, accelerator, log: RunLog,
                 selection: list[Example], reasoning: int = 0):
        self.cfg, self.run_dir, self.task, self.tokenizer, self.method = cfg, run_dir, task, tokenizer, method
        self.accelerator, self.log, self.best = accelerator, log, -1.0
        self.reasoning = reasoning  # room for text reasoning when selecting: the longest trained chain of thought
        self.stage = 0  # index of the stage being trained (run_stage sets it)
        # the selection problems (``selection_problems``), scored whenever ``selects_at`` says so
        self.examples = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in selection]

    def saves_at(self, step: int, stage_end: bool) -> bool:
        """Whether ``on_step`` writes a checkpoint at this step."""
        every = self.cfg.train.save_every
        return bool(every) and (step % every == 0 or stage_end)

    def selects_at(self, step: int, stage_end: bool) -> bool:
        """Whether ``on_step`` scores the selection split at this step."""
        every = self.cfg.eval.every
        return bool(self.examples) and (bool(every and step % every == 0) or stage_end)

    def on_step(self, model, pos: Position, optimizer, scheduler, stage_end: bool = False) -> None:
        """Called after every optimizer step (``pos.step`` counts over all stages)."""
        if self.selects_at(pos.step, stage_end):
            self.select(model, pos.step)  # first, so the checkpoint below holds this step's best score
        if self.saves_at(pos.step, stage_end):
            self.save(model, pos, optimizer, scheduler)

    def trained_in(self) -> dict:
        """What a checkpoint's ``rim.json`` says of the stage its weights were trained in (``stage``: index)."""
        index = self.stage
        return {"stage": index, "stage_name": self.cfg.stages[index].name, "reasoning": self.reasoning}

    def save(self, model, pos: Position, optimizer, scheduler) -> None:
        """A resumable checkpoint ``checkpoints/step-N``; then only the newest ``train.keep_last`` are kept."""
        config = to_dict(self.cfg)
        moments = (None if optimizer is None else full_optimizer_state(model, optimizer) if is_sharded(model)
                   else optimizer.state_dict())

        def state(folder: Path) -> None:
            save_state(folder, pos, moments, scheduler, self.best, config, self.accelerator.num_processes)

        save_checkpoint(model, self.tokenizer, self.cfg, self.run_dir / "checkpoints" / f"step-{pos.step}",
                        self.accelerator, {"step": pos.step, **self.trained_in()}, state)
        keep = self.cfg.train.keep_last
        if keep and self.accelerator.is_main_process:
            for old in resumable(self.run_dir)[keep:]:
                shutil.rmtree(old)

    def select(self, model, step: int) -> None:
        """Score the selection split (sharded over the processes); keep the checkpoint if it is the best so far."""
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
        if improved:  # the same decision on every process, which all join in saving
            self.best = accuracy
            save_checkpoint(model, self.tokenizer, self.cfg, self.run_dir / "best", self.accelerator,
                            {"step": step, "select_split": self.cfg.eval.select_split, "select_accuracy": accuracy,
                             **self.trained_in()})
        model.train()


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


def resume_point(run_dir: Path, resume: str | None) -> Path | None:
    """The checkpoint to resume from: ``auto`` (the newest intact one in the run, None if there is none) or a
    path; a broken explicit path is an error, a broken newest one falls back to the one before."""
    if resume is None:
        return None
    if resume == "auto":
        return latest_valid(run_dir)
    folder = Path(resume)
    verify(folder)
    return folder


def restore_moved_aside(run_dir: Path) -> None:
    """Finish a replacement of ``checkpoint/`` or ``best/`` that a crash interrupted (see ``write_checkpoint``): a
    ``<name>.old`` without its ``<name>`` is the last whole copy and goes back in place; one beside its ``<name>``
    is a leftover. Other ``*.old`` folders are not rim's and stay."""
    for name in REPLACED:
        old, target = run_dir / f"{name}.old", run_dir / name
        if old.is_dir() and not target.exists():
            os.replace(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)


def trim_log(path: Path, step: int) -> None:
    """Drop the log lines of steps after ``step`` (an interrupted run's lost tail, which the resumed run redoes)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:  # a line torn by the crash
            continue
        if record.get("step", 0) <= step and record.get("event") != "done":
            keep.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
    os.replace(tmp, path)


def drop_after(run_dir: Path, step: int) -> None:
    """Remove what an abandoned stretch after ``step`` left: later step checkpoints (intact or not) and a ``best/``
    selected after it, so that pruning, ``--resume auto`` and the paper's protocol only see the resumed line."""
    for folder in (run_dir / "checkpoints").glob("step-*"):
        name = folder.name.removesuffix(".tmp")
        if name[5:].isdigit() and int(name[5:]) > step:
            shutil.rmtree(folder)
    best = run_dir / "best" / "rim.json"
    if best.is_file() and json.loads(best.read_text(encoding="utf-8")).get("step", 0) > step:
        shutil.rmtree(run_dir / "best")


def train(cfg: Config, run_dir: str | Path | None = None, resume: str | None = None) -> Path:
    """Train the configured method; returns the run directory.

    ``resume``: ``auto`` continues from the newest intact ``checkpoints/step-N`` of the run directory (or starts
    fresh when there is none, unless the run has a final checkpoint, ``best/`` or evaluations), a path continues
    from that checkpoint. Position, optimizer, scheduler and RNG
    states come back, so the resumed run takes the same steps as an uninterrupted one. SIGTERM/SIGINT write a
    checkpoint at the next step boundary and raise ``Interrupted``; a non-finite loss raises ``NonFiniteLoss``.
    """
    from accelerate.utils import set_seed

    run_dir = Path(run_dir or cfg.output_dir)
    accelerator = make_accelerator(cfg, run_dir)
    start_from = resume_point(run_dir, resume)
    earlier = [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()] + sorted(run_dir.glob("eval*"))
    # finished work: a final checkpoint, best/, evaluations, or any step checkpoint (also one that fails to verify)
    finished = [p for p in earlier if p.name.removesuffix(".old") in REPLACED or p.name.startswith("eval")] + [
        p for p in run_dir.glob("checkpoints/step-*") if p.name[5:].isdigit()]
    if start_from is None and earlier and not cfg.overwrite and (resume != "auto" or finished):
        # --resume auto with no step checkpoint starts again, unless the run holds finished work
        hint = ("it has no step checkpoint to resume from (train.save_every)" if resume == "auto"
                else "or continue it with --resume auto")
        raise FileExistsError(f"{run_dir} already holds a run ({', '.join(p.name for p in earlier)}); choose "
                              f"another output_dir or set overwrite=true; {hint}")
    accelerator.wait_for_everyone()  # every process has looked before the main process writes anything
    set_seed(cfg.train.seed)
    pos, resumed, best, diff = Position(), None, -1.0, []
    if start_from is not None:
        pos, resumed, best, old_config = load_state(start_from)
        diff = config_diff(old_config, to_dict(cfg))
        saved_processes = resumed.get("processes", 1)
        if saved_processes != accelerator.num_processes:
            raise CheckpointError(f"{start_from} was written by {saved_processes} processes, this run has "
                                  f"{accelerator.num_processes}; resume with the same number (the data position "
                                  "counts each process's batches)")
    # everything that can refuse the run (model, data, selection split) comes before anything is written
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    model, tokenizer, new_tokens = build_model(cfg.model, task, cfg.train.seed,
                                               method_class(cfg.method.name).special_tokens)
    method = make_method(cfg.method, tokenizer)
    own_modules = method.extend_model(model)  # a method's own modules (CODI's projection), before LoRA wraps it
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model = make_trainable(model, new_tokens, cfg.model.train_mode, cfg.model.lora_rank, cfg.model.lora_alpha,
                           cfg.model.lora_dropout, full_modules=own_modules)
    if start_from is not None:
        load_weights(model, start_from)
    if cfg.train.compile:
        compile_model(model, cfg.train.compile, cfg.train.compile_scope)
    method.at_stage(cfg.stages[-1])  # selection scores the run's final form (Coconut: its last stage's thoughts)
    data = prepare_data(cfg, task, tokenizer, method)
    selection = selection_problems(cfg, task)
    shared = check_selection(cfg, selection, data)
    resumed_plan = None  # a resumed stage's length is checked here too, before anything is written
    if start_from is not None and pos.stage < len(cfg.stages):
        resumed_plan = plan_stage(cfg, cfg.stages[pos.stage], data, method, accelerator, pos)
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        if start_from is None:
            for path in earlier:  # overwrite=true: nothing of the earlier run may mix with this one
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        else:
            restore_moved_aside(run_dir)  # first, so that drop_after sees the best/ that a crash moved aside
            trim_log(run_dir / "metrics.jsonl", pos.step)
            drop_after(run_dir, pos.step)
    if cfg.train.trackers:
        accelerator.init_trackers(cfg.train.tracker_project, config=flat_config(cfg))
    log = RunLog(run_dir, accelerator.is_main_process, accelerator)
    if start_from is not None:
        log.write(event="resume", step=pos.step, checkpoint=str(start_from), config_changes=diff)
        if accelerator.is_main_process:
            print(f"resuming from {start_from} (step {pos.step})"
                  + "".join(f"\n  config changed: {line}" for line in diff))
    if task.records.total_skipped() or task.records.truncated:
        log.write(event="data", skipped=task.records.skipped, skipped_total=task.records.total_skipped(),
                  truncated=task.records.truncated)
    sharded = cfg.train.fsdp and accelerator.num_processes > 1
    if resumed is not None and resumed["optimizer"] is not None:
        resumed["optimizer"] = keyed_optimizer_state(resumed["optimizer"], model, sharded, start_from)
    if sharded:
        model = shard_model(model, accelerator.device, accelerator.mixed_precision)
    else:
        model = accelerator.prepare(model)
    method.prepare_training(accelerator.unwrap_model(model), accelerator.num_processes)  # SIM-CoT's decoder
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.write(event="setup", config=to_dict(cfg), trainable_parameters=n_trainable, train_examples=len(data),
              device=str(accelerator.device), precision=accelerator.mixed_precision,
              processes=accelerator.num_processes, sharded=is_sharded(model))
    if shared:
        log.write(event="select_overlap", split=cfg.eval.select_split, **shared)
    checkpointer = Checkpointer(cfg, run_dir, task, tokenizer, method, accelerator, log, selection,
                                longest_cot(data))
    checkpointer.best = best
    views = [f"== stage {stage.name} ({stage.kind}), loss weights at the start of the stage ==\n"
             + describe_layout(method.train_layout(data[0], stage), tokenizer, stage, cfg.method.readout_sees_question)
             for stage in cfg.stages]
    if accelerator.is_main_process:
        (run_dir / "layout.txt").write_text("\n\n".join(views) + "\n", encoding="utf-8")
    optimizer, start, before = None, time.perf_counter(), pos.train_s  # before: up to the resumed checkpoint
    with StopSignals() as stop:
        while pos.stage < len(cfg.stages):
            optimizer = run_stage(cfg, cfg.stages[pos.stage], model, method, data, tokenizer, accelerator, optimizer,
                                  log, pos, checkpointer, stop, resumed, clock=(before, start), plan=resumed_plan)
            resumed = resumed_plan = None
    checkpointer.stage = len(cfg.stages) - 1
    save_checkpoint(model, tokenizer, cfg, run_dir / "checkpoint", accelerator, checkpointer.trained_in())
    log.write(event="done", steps=pos.step, train_s=before + time.perf_counter() - start)
    accelerator.wait_for_everyone()  # nobody leaves the process group while the main process still writes
    accelerator.end_training()
    return run_dir


def flat_config(cfg: Config) -> dict:
    """The config as ``{dotted key: value}`` with plain values (trackers take only scalars)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(to_dict(cfg)).items()}
