"""Load a trained run directory and evaluate it (``rim eval RUN``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from rim.config import Config, inference_blocks, load_config
from rim.data.tasks import Task, make_task
from rim.errors import ConfigError
from rim.eval.evaluate import EvalResult, evaluate, training_reasoning, write_predictions
from rim.eval.protocol import split_protocol
from rim.methods.base import Method, make_method, method_class
from rim.models.load import checkpoint_model, checkpoint_tokenizer
from rim.rundir import FINAL, RunDir, eval_name, protocol_name


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when available (unless told otherwise), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run(run_dir: str | Path, device: str = "auto", checkpoint: str = FINAL,
             overrides: list[str] | None = None) -> tuple[Config, torch.nn.Module, object, Method, Task]:
    """Config, trained model (eval mode), tokenizer, method and task of a run directory.

    ``checkpoint``: ``checkpoint`` (the final one), ``best`` (best on the selection split) or a path inside the
    run directory such as ``checkpoints/step-400``. ``overrides``: ``key=value`` over the run's config for this
    load only, e.g. ``eval.cache=static`` (the method decodes as ``eval.cache`` and ``eval.compile`` say).
    """
    run = RunDir(run_dir)
    ckpt = run.checkpoint(checkpoint)
    cfg = load_config(run.config_path, overrides)
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    method_class(cfg.method.name)  # a plug-in method's facts are declared when its module is imported
    tokenizer = checkpoint_tokenizer(ckpt, cfg)
    method = make_method(cfg.method, tokenizer)
    own = type(method).extend_model is not Method.extend_model  # its own modules' weights load after the model's
    model = checkpoint_model(ckpt, cfg, task, extend=method.extend_model if own else None)
    method.cache, method.compile = cfg.eval.cache, cfg.eval.compile
    method.at_stage(cfg.stages[-1])  # every checkpoint decodes in the run's final form (Coconut: its thoughts)
    reasoning = run.meta(checkpoint).get("reasoning")  # older rim: none
    if isinstance(reasoning, int) and not isinstance(reasoning, bool):
        method.reasoning = reasoning
    return cfg, model.to(pick_device(device)).eval(), tokenizer, method, task


def eval_run(run_dir: str | Path, split: str | None = None, blocks: int | None = None, max_eval: int | None = None,
             device: str = "auto", out_name: str | None = None, checkpoint: str = FINAL,
             task_name: str | None = None, full: bool = True, overrides: list[str] | None = None) -> EvalResult:
    """Evaluate a run on a split; writes ``<out_name>/results.json`` and ``predictions.jsonl`` into the run dir.

    ``task_name`` scores another task than the trained one (out-of-distribution, e.g. ``gsm-hard``), read from
    the same data directory. Results go to ``eval[-<task>][-<checkpoint>]/`` unless ``out_name`` says otherwise.
    ``full=False`` skips the per-block decodes and the latency timing (final-block accuracy only); ``overrides``:
    as for ``load_run``.
    """
    from accelerate import PartialState

    state = PartialState(cpu=device == "cpu" or not torch.cuda.is_available())  # joins `accelerate launch`/torchrun
    if device == "auto" and state.num_processes > 1:
        device = str(state.device)
    cfg, model, tokenizer, method, task = load_run(run_dir, device, checkpoint, overrides)
    reasoning = training_reasoning(cfg, task, method, tokenizer)  # from the trained task, whatever is scored
    if task_name is not None:
        task = make_task(task_name, {k: v for k, v in cfg.data.options.items() if k == "data_dir"})
    if out_name is None:
        out_name = eval_name(task_name, checkpoint)
    for name, value in (("blocks", blocks), ("max_eval", max_eval)):
        if value is not None and value < 1:  # 0 must not read as "not given"
            raise ConfigError(f"{name} must be >= 1, not {value}")
    split = split or cfg.data.eval_split
    limit = max_eval if max_eval is not None else cfg.data.max_eval
    examples = task.load(split)[:limit]
    tokenized = [method.tokenize(task, tokenizer, ex, cfg.data.prompt_format) for ex in examples]
    k = blocks if blocks is not None else inference_blocks(cfg)
    result = evaluate(model, tokenizer, task, method, tokenized, k, cfg.eval.batch_size, cfg.eval.any_block and full,
                      cfg.eval.latency_examples if full else 0, reasoning)
    result.metrics.update(task=task.name, split=split, checkpoint=checkpoint, eval_blocks=k,
                          max_eval=limit,
                          device=str(next(model.parameters()).device))
    if state.is_main_process:  # every process holds all records (evaluate gathers them); one writes
        out = RunDir(run_dir).write_results(out_name, result.metrics)
        write_predictions(result.records, out / "predictions.jsonl")
    return result


def eval_protocol(run_dir: str | Path, split: str | None = None, n_splits: int = 16, select_size: int = 264,
                  seed: int = 0, device: str = "auto", max_eval: int | None = None, blocks: int | None = None,
                  task_name: str | None = None, overrides: list[str] | None = None) -> dict:
    """The paper's protocol over every checkpoint of a run (``rim.eval.protocol.split_protocol``); writes
    ``eval-protocol/results.json`` and each checkpoint's predictions."""
    run = RunDir(run_dir)
    names = run.checkpoints()
    out_dir = protocol_name(task_name)
    if not names:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoints")
    keep = load_config(run.config_path).train.keep_last
    if keep:
        warnings.warn(f"{run_dir}: train.keep_last={keep} deleted older checkpoints; the protocol selects among the "
                      f"{len(names)} that remain, not among every checkpoint the run wrote", stacklevel=2)
    correct, per_checkpoint, task = [], {}, task_name
    for name in names:
        out_name = f"{out_dir}/{name.replace('/', '_')}"  # one folder per checkpoint
        result = eval_run(run_dir, split, blocks, max_eval, device, out_name, name, task_name, full=False,
                          overrides=overrides)
        split, task = result.metrics["split"], result.metrics["task"]
        correct.append([r["correct"] for r in result.records])
        if not 0 < select_size < len(correct[0]):  # checked on the first checkpoint, not after all of them
            raise ConfigError(f"--select-size must be between 1 and {len(correct[0]) - 1} (the {split!r} split "
                              f"scores {len(correct[0])} problems here), not {select_size}")
        per_checkpoint[name] = result.metrics["final_block_accuracy"]
    summary = split_protocol(correct, n_splits, select_size, seed)
    summary.update(checkpoints=names, chosen_names=[names[c] for c in summary["chosen"]],
                   accuracy_per_checkpoint=per_checkpoint, split=split, task=task)
    from accelerate import PartialState

    if PartialState().is_main_process:
        run.write_results(out_dir, summary)
    return summary
