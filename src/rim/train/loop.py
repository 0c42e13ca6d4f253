"""The training recipe, top to bottom: setup -> stages (the curriculum as data) -> save.

    rim train configs/cpu/mult4x4_rim.yaml train.batch_size=16

``train`` sets the run up (refusing it before anything is written if anything is wrong), runs each stage with
``run_stage`` and saves the final checkpoint; ``run_stage`` is the step loop. The rest is in its own module:
sampling (``rim.train.sampling``), the loss (``loss``), optimizer (``optim``), signals (``signals``),
checkpoints (``checkpoint``, through ``rim.rundir``), selection (``selection``) and events (``log``). Runs through
``accelerate`` (one process by default; ``accelerate launch`` for several). What it writes: docs/run-directory.md.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rim.config import CUDA_GRAPH_MODES, RL, Config, StageConfig, save_config, to_dict
from rim.data.tasks import Task, check_task_options, make_task
from rim.errors import CheckpointError, ConfigError, Interrupted, NonFiniteLoss
from rim.eval.evaluate import longest_cot
from rim.methods.base import Method, TokenizedExample, make_method, method_class, tokenize_training
from rim.models.adapter import compile_model, enable_gradient_checkpointing, make_trainable, set_dropout
from rim.models.load import build_model
from rim.rundir import RunDir, step_name
from rim.train.checkpoint import Checkpointer, load_weights, resume_point
from rim.train.log import RunLog, describe_layout, describe_prompt, flat_config
from rim.train.loss import stage_weights, step_loss
from rim.train.optim import keyed_optimizer_state, stage_optimizer
from rim.train.rl import GRPO
from rim.train.sampling import StagePlan, plan_stage
from rim.train.selection import Selector, check_selection, selection_problems
from rim.train.sharding import is_sharded, shard_model
from rim.train.signals import StopSignals
from rim.train.state import Position, config_diff, load_state, restore_rng


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


def prepare_data(cfg: Config, task: Task, tokenizer, method: Method) -> list[TokenizedExample]:
    """The tokenized training examples, held to ``data.max_length`` (over-long ones counted in ``task.records``)."""
    examples = task.load(cfg.data.train_split)[: cfg.data.max_train]
    return tokenize_training(method, task, tokenizer, examples, cfg.data, cfg.stages)


@dataclass
class Training:
    """What every stage of one run shares: the set-up objects, the position (updated as training goes) and the
    clock: the run's training time before this process started it (``before``) and the ``perf_counter`` then."""

    cfg: Config
    task: Task
    model: torch.nn.Module
    method: Method
    data: list[TokenizedExample]
    tokenizer: object
    accelerator: object
    log: RunLog
    checkpointer: Checkpointer
    stop: StopSignals
    pos: Position
    before: float
    start: float


@dataclass
class Window:
    """The logging window since the last ``train`` line: summed micro-batch losses and their count, this process's
    tokens in the stage (``tokens``) and since the last line (``recent``, for tokens/s, from ``started``), whether a
    loss was non-finite since the last check (a device flag, read at log steps only), and summed statistics
    besides the loss (``stats``: an rl stage's reward and the like, host numbers)."""

    loss_sum: torch.Tensor
    batches: int
    tokens: int
    recent: int
    started: float
    bad: torch.Tensor
    stats: dict

    @classmethod
    def at(cls, pos: Position, resumed: bool, device) -> Window:
        """The window a stage starts with: continued from the checkpoint when resuming."""
        loss, batches, tokens = (pos.log_loss, pos.log_batches, pos.log_tokens) if resumed else (0.0, 0, 0)
        return cls(torch.tensor(loss, device=device), batches, tokens, 0, time.perf_counter(),
                   torch.zeros((), dtype=torch.bool, device=device), dict(pos.log_stats) if resumed else {})

    def add(self, loss: torch.Tensor, tokens: int, stats: dict | None = None) -> None:
        self.bad |= ~torch.isfinite(loss.detach())
        self.loss_sum += loss.detach()
        self.batches += 1
        self.tokens += tokens
        self.recent += tokens
        for key, value in (stats or {}).items():
            self.stats[key] = self.stats.get(key, 0.0) + value

    def mean_stats(self, accelerator, divide: bool = True) -> dict[str, float]:
        """The window's statistics averaged over its micro-batches (``divide``; else their sums) and processes."""
        if not self.stats:
            return {}
        values = torch.tensor(list(self.stats.values()), dtype=torch.float64, device=accelerator.device)
        values = accelerator.reduce(values / (self.batches if divide else 1), "mean").tolist()
        return dict(zip(self.stats, values))


def train(cfg: Config, run_dir: str | Path | None = None, resume: str | None = None) -> Path:
    """Train the configured method; returns the run directory.

    ``resume``: ``auto`` continues from the newest intact ``checkpoints/step-N`` of the run directory (or starts
    fresh when there is none, unless the run has a final checkpoint, ``best/`` or evaluations), a path continues
    from that checkpoint. Position, optimizer, scheduler and RNG states come back, so the resumed run takes the
    same steps as an uninterrupted one. SIGTERM/SIGINT write a checkpoint at the next step boundary and raise
    ``Interrupted``; a non-finite loss raises ``NonFiniteLoss``.
    """
    from accelerate.utils import set_seed

    run = RunDir(run_dir or cfg.output_dir)
    cfg.data.options = check_task_options(cfg.data.task, cfg.data.options)
    accelerator = make_accelerator(cfg, run.path)
    start_from = resume_point(run, resume)
    earlier = refuse_earlier_run(run, cfg, resume, start_from)
    accelerator.wait_for_everyone()  # every process has looked before the main process writes anything
    set_seed(cfg.train.seed)
    pos, resumed, best, diff = resumed_state(cfg, start_from, accelerator.num_processes)
    # everything that can refuse the run (model, data, selection split) comes before anything is written
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    model, tokenizer, method = setup_model(cfg, task, start_from)
    data = prepare_data(cfg, task, tokenizer, method)
    selection = selection_problems(cfg, task)
    shared = check_selection(cfg, selection, data)
    resumed_plan = None  # a resumed stage's length is checked here too, before anything is written
    if start_from is not None and pos.stage < len(cfg.stages):
        resumed_plan = plan_stage(cfg, cfg.stages[pos.stage], data, method, accelerator, pos)
    if accelerator.is_main_process:
        prepare_run_dir(run, cfg, earlier, start_from, pos.step)
    if cfg.train.trackers:
        accelerator.init_trackers(cfg.train.tracker_project, config=flat_config(cfg))
    log = RunLog(run, accelerator.is_main_process, accelerator)
    log_start(log, task, start_from, pos.step, diff, accelerator.is_main_process)
    sharded = cfg.train.fsdp and accelerator.num_processes > 1
    if resumed is not None and resumed["optimizer"] is not None:
        resumed["optimizer"] = keyed_optimizer_state(resumed["optimizer"], model, sharded, start_from)
    model = shard_model(model, accelerator.device, accelerator.mixed_precision) if sharded \
        else accelerator.prepare(model)
    method.prepare_training(accelerator.unwrap_model(model), accelerator.num_processes)  # SIM-CoT's decoder
    log.write(event="setup", config=to_dict(cfg), trainable_parameters=sum(p.numel() for p in model.parameters()
                                                                            if p.requires_grad),
              train_examples=len(data), device=str(accelerator.device), precision=accelerator.mixed_precision,
              processes=accelerator.num_processes, sharded=is_sharded(model))
    if shared:
        log.write(event="select_overlap", split=cfg.eval.select_split, **shared)
    selector = Selector(cfg, task, tokenizer, method, accelerator, log, selection, longest_cot(data))
    selector.best = best
    checkpointer = Checkpointer(cfg, run, tokenizer, accelerator, selector)
    if accelerator.is_main_process:
        write_layouts(run, cfg, method, data[0], tokenizer)
    with StopSignals() as stop:
        training = Training(cfg, task, model, method, data, tokenizer, accelerator, log, checkpointer, stop, pos,
                            before=pos.train_s, start=time.perf_counter())  # before: up to the resumed checkpoint
        optimizer = None
        while pos.stage < len(cfg.stages):
            optimizer = run_stage(training, cfg.stages[pos.stage], optimizer, resumed, resumed_plan)
            resumed = resumed_plan = None
    checkpointer.save_final(model)
    log.write(event="done", steps=pos.step, train_s=training.before + time.perf_counter() - training.start)
    accelerator.wait_for_everyone()  # nobody leaves the process group while the main process still writes
    accelerator.end_training()
    return run.path


def refuse_earlier_run(run: RunDir, cfg: Config, resume: str | None, start_from: Path | None) -> list[Path]:
    """What an earlier run left in the folder (removed with ``overwrite=true``); a FileExistsError if a new run
    would mix with it. ``--resume auto`` with no step checkpoint starts again, unless the run holds finished work."""
    earlier = run.earlier_outputs()
    if start_from is None and earlier and not cfg.overwrite and (resume != "auto" or run.finished_work()):
        hint = ("it has no step checkpoint to resume from (train.save_every)" if resume == "auto"
                else "or continue it with --resume auto")
        raise FileExistsError(f"{run} already holds a run ({', '.join(p.name for p in earlier)}); choose "
                              f"another output_dir or set overwrite=true; {hint}")
    return earlier


def resumed_state(cfg: Config, start_from: Path | None, processes: int) -> tuple[Position, dict | None, float, list]:
    """(position, optimizer/scheduler/RNG states, best selection score, config changes) of the checkpoint resumed
    from; a fresh start's when there is none."""
    if start_from is None:
        return Position(), None, -1.0, []
    pos, resumed, best, old_config = load_state(start_from)
    saved_processes = resumed.get("processes", 1)
    if saved_processes != processes:
        raise CheckpointError(f"{start_from} was written by {saved_processes} processes, this run has "
                              f"{processes}; resume with the same number (the data position counts each "
                              "process's batches)")
    return pos, resumed, best, config_diff(old_config, to_dict(cfg))


def setup_model(cfg: Config, task: Task, start_from: Path | None) -> tuple[torch.nn.Module, object, Method]:
    """The model to train (trainable as ``model.train_mode`` says; a resumed checkpoint's weights; compiled if
    asked), its tokenizer and the method, which decodes in the run's final form (Coconut: its last stage's
    thoughts) when selection scores it."""
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
    method.at_stage(cfg.stages[-1])
    return model, tokenizer, method


def prepare_run_dir(run: RunDir, cfg: Config, earlier: list[Path], start_from: Path | None, step: int) -> None:
    """Write the resolved config; remove an earlier run's outputs (``overwrite=true``), or, when resuming, what
    the resumed line does not include."""
    run.path.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run.config_path)
    if start_from is None:
        for path in earlier:  # overwrite=true: nothing of the earlier run may mix with this one
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    else:
        run.restore_moved_aside()  # first, so that drop_after sees the best/ that a crash moved aside
        run.trim_events(step)
        run.drop_after(step)


def log_start(log: RunLog, task: Task, start_from: Path | None, step: int, diff: list[str], main: bool) -> None:
    """The ``resume`` event (and its console line) and the ``data`` event of skipped or truncated records."""
    if start_from is not None:
        log.write(event="resume", step=step, checkpoint=str(start_from), config_changes=diff)
        if main:
            print(f"resuming from {start_from} (step {step})" + "".join(f"\n  config changed: {line}" for line in diff))
    if task.records.total_skipped() or task.records.truncated:
        log.write(event="data", skipped=task.records.skipped, skipped_total=task.records.total_skipped(),
                  truncated=task.records.truncated)


def write_layouts(run: RunDir, cfg: Config, method: Method, example: TokenizedExample, tokenizer) -> None:
    """``layout.txt``: one decoded training example per stage, with the loss weights at the stage's start (an rl
    stage: its prompt)."""
    views = [f"== stage {stage.name} ({stage.kind}), loss weights at the start of the stage ==\n"
             + (describe_prompt(method, example, stage, tokenizer) if stage.kind == RL
                else describe_layout(method.train_layout(example, stage), tokenizer, stage,
                                     cfg.method.readout_sees_question))
             for stage in cfg.stages]
    run.layout_path.write_text("\n\n".join(views) + "\n", encoding="utf-8")


def run_stage(t: Training, stage: StageConfig, optimizer=None, resumed: dict | None = None,
              plan: StagePlan | None = None) -> torch.optim.Optimizer:
    """Train one curriculum stage from ``t.pos`` (updated as training goes); returns the optimizer (kept when the
    next stage does not reset it). ``resumed``: the optimizer, scheduler and RNG states of a resumed checkpoint.
    ``plan``: ``plan_stage``'s, when made already."""
    from accelerate.utils import send_to_device

    cfg, model, accelerator, pos = t.cfg, t.model, t.accelerator, t.pos
    first_step = pos.step - pos.stage_step
    t.checkpointer.stage = pos.stage
    plan = plan or plan_stage(cfg, stage, t.data, t.method, accelerator, pos)
    rl = None  # an rl stage samples its batches; its reference comes back from a checkpoint inside the stage
    if stage.kind == RL:
        reference = resumed.get("rl_reference") if resumed is not None and pos.stage_step else None
        rl = GRPO(stage, t.task, t.method, t.tokenizer, model, accelerator, t.data, reference)
    t.checkpointer.stage_state = rl.state() if rl is not None else {}
    accumulate = accelerator.gradient_accumulation_steps  # per process: grad_accum / processes
    steps_per_epoch = math.ceil(len(plan.loader) / accumulate)
    graphs = cfg.train.compile in CUDA_GRAPH_MODES
    optimizer, scheduler = stage_optimizer(model, stage, accelerator, optimizer, resumed, pos.stage_step, plan.total,
                                           t.method.training_parameters())
    if resumed is not None:
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
    bar = tqdm(total=plan.total, initial=pos.stage_step, desc=f"{stage.name}",
               disable=not (cfg.train.progress and accelerator.is_main_process))
    step, skip = pos.stage_step, pos.batch
    window = Window.at(pos, resumed is not None, accelerator.device)
    stage_start = window.started
    while step < plan.total:
        plan.sampler.epoch = pos.epoch
        for i, indices in enumerate(plan.loader):
            if i < skip:
                continue
            if rl is None:
                batch = t.method.collate([plan.layouts.layout(j, step / steps_per_epoch, pos.epoch) for j in indices],
                                         t.tokenizer.pad_token_id, cfg.train.pad_to_multiple or 1)
                batch = send_to_device(batch, accelerator.device, non_blocking=True)  # no stream sync per step
                tokens, stats = batch["input_ids"].numel(), None
            if graphs:  # the graphs' outputs of the last step are no longer needed
                torch.compiler.cudagraph_mark_step_begin()
            with accelerator.accumulate(model):
                if is_sharded(model):  # accelerate's accumulate knows DDP's no_sync, not FSDP2's switch
                    model.set_requires_gradient_sync(accelerator.sync_gradients)
                if rl is None:
                    loss = step_loss(t.method, model, batch, stage_weights(batch, stage, step / plan.total),
                                     cfg.train.supervised_logits, cfg.train.fused_loss)
                else:  # sampled now, from the weights of this step
                    loss, tokens, stats = rl.loss(model, [t.data[j] for j in indices])
                # accelerate divides every micro-batch's loss by the accumulation count; an epoch's last step
                # may have fewer micro-batches, whose gradient is then their mean too, not scaled down
                group = min(accumulate, len(plan.loader) - i // accumulate * accumulate)
                accelerator.backward(loss * (accumulate / group) if group < accumulate else loss)
                if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                    extra = t.method.training_parameters()  # SIM-CoT's separate decoder (never with FSDP)
                    accelerator.clip_grad_norm_([*model.parameters(), *extra] if extra else model.parameters(),
                                                cfg.train.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=not stable_grads)
            window.add(loss, tokens, stats)
            pos.batch = i + 1
            if pos.batch == len(plan.loader):
                pos.epoch, pos.batch = pos.epoch + 1, 0
            if not accelerator.sync_gradients:
                continue
            scheduler.step()
            step += 1
            pos.stage_step, pos.step = step, first_step + step
            bar.update(1)
            stage_end = step == plan.total
            after_step(t, stage, optimizer, scheduler, window, bar, stage_end, stage_start)
            if stage_end:
                break
        skip = 0
    bar.close()
    return optimizer


def after_step(t: Training, stage: StageConfig, optimizer, scheduler, window: Window, bar, stage_end: bool,
               stage_start: float) -> None:
    """After an optimizer step: check the loss, log the window, select and checkpoint when due, stop on a signal."""
    cfg, accelerator, pos, step = t.cfg, t.accelerator, t.pos, t.pos.stage_step
    signum = t.stop.agreed(accelerator)  # the same on every process, read once per step
    saves = t.checkpointer.saves_at(pos.step, stage_end)
    works = saves or t.checkpointer.selects_at(pos.step, stage_end)  # on_step does something after this step
    if step % cfg.train.log_every == 0 or stage_end or works or signum:
        if accelerator.reduce(window.bad.float(), "sum") > 0:  # host sync at log intervals, saves and selections
            raise NonFiniteLoss(f"non-finite loss in stage {stage.name!r} by step {pos.step}; nothing after the "
                                "last checkpoint was saved (lower the learning rate, then `rim train CONFIG "
                                "--resume auto`)")
    logs = step % cfg.train.log_every == 0 or stage_end
    if logs:
        log_window(t, stage, scheduler, window, bar, stage_start)
    if saves or signum:  # the window and the time so far go into the checkpoint
        pos.train_s = t.before + time.perf_counter() - t.start
        pos.log_loss = accelerator.reduce(window.loss_sum, "mean").item() if window.batches else 0.0
        pos.log_batches, pos.log_tokens = window.batches, window.tokens
        pos.log_stats = window.mean_stats(accelerator, divide=False)
    if stage_end:  # a checkpoint here resumes at the start of the next stage
        pos.stage, pos.stage_step, pos.epoch, pos.batch = pos.stage + 1, 0, 0, 0
        pos.log_loss, pos.log_batches, pos.log_tokens, pos.log_stats = 0.0, 0, 0, {}
    t.checkpointer.on_step(t.model, pos, optimizer, scheduler, stage_end)
    if logs or works:  # the next window starts here: selection and checkpoints are not training
        window.recent, window.started = 0, time.perf_counter()
    if signum:
        if not saves:
            t.checkpointer.save(t.model, pos, optimizer, scheduler)
        raise Interrupted(f"stopped by signal {signum} after step {pos.step}; checkpoint "
                          f"{step_name(pos.step)} written; continue with `--resume auto`", signum)


def log_window(t: Training, stage: StageConfig, scheduler, window: Window, bar, stage_start: float) -> None:
    """A ``train`` event: the window's mean loss (over processes too), learning rate, tokens and tokens/s."""
    accelerator, pos = t.accelerator, t.pos
    mean_loss = accelerator.reduce(window.loss_sum / window.batches, "mean").item()
    # the item() above waited for the steps' kernels: the window's time is theirs
    seen = accelerator.reduce(torch.tensor(window.recent, device=accelerator.device), "sum")
    speed = seen.item() / max(time.perf_counter() - window.started, 1e-9)
    bar.set_postfix(loss=f"{mean_loss:.4f}", tok_s=f"{speed:,.0f}")
    t.log.write(event="train", stage=stage.name, step=pos.step, stage_step=pos.stage_step, loss=mean_loss,
                lr=scheduler.get_last_lr()[0], tokens=window.tokens, tokens_per_s=speed,
                elapsed_s=time.perf_counter() - stage_start, **window.mean_stats(accelerator))
    window.loss_sum.zero_()
    window.batches = 0
    window.stats = {}

