"""Load a trained run directory and evaluate it (``rim eval RUN``)."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import warnings
from pathlib import Path

import torch

from rim.config import Config, ConfigError, inference_blocks, load_config
from rim.data.tasks import Task, make_task
from rim.eval.evaluate import EvalResult, evaluate, training_reasoning, write_predictions
from rim.eval.protocol import split_protocol
from rim.methods.base import Method, make_method, method_class
from rim.models.adapter import add_tokens, ensure_pad_token
from rim.train.state import CheckpointError


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when available (unless told otherwise), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run(run_dir: str | Path, device: str = "auto", checkpoint: str = "checkpoint",
             overrides: list[str] | None = None) -> tuple[Config, torch.nn.Module, object, Method, Task]:
    """Config, trained model (eval mode), tokenizer, method and task of a run directory.

    ``checkpoint``: ``checkpoint`` (the final one), ``best`` (best on the selection split) or a path inside the
    run directory such as ``checkpoints/step-400``. ``overrides``: ``key=value`` over the run's config for this
    load only, e.g. ``eval.cache=static`` (the method decodes as ``eval.cache`` and ``eval.compile`` say).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    ckpt = run_dir / checkpoint
    if not (ckpt / "rim.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no finished checkpoint (rim.json missing); did `rim train` complete?")
    cfg = load_config(run_dir / "config.yaml", overrides)
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    remote = cfg.model.trust_remote_code  # as in training: a checkpoint's own code runs only if the user said so
    tokenizer = AutoTokenizer.from_pretrained(ckpt, trust_remote_code=remote)
    ensure_pad_token(tokenizer)
    method = make_method(cfg.method, tokenizer)
    if cfg.model.train_mode == "full":
        own = type(method).extend_model is not Method.extend_model  # its modules' weights load below, not as unknown
        with quiet_load_report() if own else contextlib.nullcontext():
            model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, trust_remote_code=remote,
                                                         attn_implementation=cfg.model.attn_implementation)
        load_own_modules(model, method.extend_model(model), ckpt)
    else:
        from peft import PeftModel

        from rim.models.load import load_base

        base, base_tokenizer = load_base(cfg.model, task)
        add_tokens(base_tokenizer, base, method_class(cfg.method.name).special_tokens)  # as in training
        method.extend_model(base)  # its own modules (CODI's projection), which peft loads as modules_to_save
        model = PeftModel.from_pretrained(base, ckpt)
    method.cache, method.compile = cfg.eval.cache, cfg.eval.compile
    method.at_stage(cfg.stages[-1])  # every checkpoint decodes in the run's final form (Coconut: its thoughts)
    try:
        reasoning = json.loads((ckpt / "rim.json").read_text(encoding="utf-8")).get("reasoning")  # older rim: none
    except (ValueError, AttributeError) as err:
        raise CheckpointError(f"{ckpt / 'rim.json'}: unreadable ({err})") from err
    if isinstance(reasoning, int) and not isinstance(reasoning, bool):
        method.reasoning = reasoning
    return cfg, model.to(pick_device(device)).eval(), tokenizer, method, task


@contextlib.contextmanager
def quiet_load_report():
    """Within the block, transformers does not warn about weights the model lacks (a method's own modules, which
    ``load_own_modules`` loads)."""
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        yield
    finally:
        report.setLevel(level)


def load_own_modules(model: torch.nn.Module, names: list[str], ckpt: Path) -> None:
    """Load the weights of a method's own modules (``Method.extend_model``; Hugging Face's ``from_pretrained`` drops
    them as unknown) from a full-mode checkpoint's safetensors."""
    if not names:
        return
    from safetensors.torch import load_file

    weights = {k: v for f in sorted(ckpt.glob("*.safetensors")) for k, v in load_file(f).items()}
    for name in names:
        own = {k[len(name) + 1:]: v for k, v in weights.items() if k.startswith(name + ".")}
        if not own:
            raise CheckpointError(f"{ckpt}: no weights of {name} (the method's own module) in the checkpoint")
        getattr(model, name).load_state_dict(own)


def eval_run(run_dir: str | Path, split: str | None = None, blocks: int | None = None, max_eval: int | None = None,
             device: str = "auto", out_name: str | None = None, checkpoint: str = "checkpoint",
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
        out_name = "eval" + (f"-{task_name}" if task_name else "")
        out_name += "" if checkpoint == "checkpoint" else "-" + checkpoint.replace("/", "_")
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
    out = Path(run_dir) / out_name
    if state.is_main_process:  # every process holds all records (evaluate gathers them); one writes
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
        write_predictions(result.records, out / "predictions.jsonl")
    return result


def checkpoints_of(run_dir: str | Path) -> list[str]:
    """The run's checkpoints in training order: ``checkpoints/step-N`` by N, then the final ``checkpoint``."""
    run_dir = Path(run_dir)
    steps = [p for p in run_dir.glob("checkpoints/step-*")  # not step-N.tmp, left by an interrupted save
             if re.fullmatch(r"step-\d+", p.name) and (p / "rim.json").is_file()]
    names = [str(p.relative_to(run_dir)) for p in sorted(steps, key=lambda p: int(p.name[5:]))]
    return names + (["checkpoint"] if (run_dir / "checkpoint" / "rim.json").is_file() else [])


def eval_protocol(run_dir: str | Path, split: str | None = None, n_splits: int = 16, select_size: int = 264,
                  seed: int = 0, device: str = "auto", max_eval: int | None = None, blocks: int | None = None,
                  task_name: str | None = None, overrides: list[str] | None = None) -> dict:
    """The paper's protocol over every checkpoint of a run (``rim.eval.protocol.split_protocol``); writes
    ``eval-protocol/results.json`` and each checkpoint's predictions."""
    names = checkpoints_of(run_dir)
    out_dir = "eval-protocol" + (f"-{task_name}" if task_name else "")
    if not names:
        raise FileNotFoundError(f"{run_dir}: no finished checkpoints")
    keep = load_config(Path(run_dir) / "config.yaml").train.keep_last
    if keep:
        warnings.warn(f"{run_dir}: train.keep_last={keep} deleted older checkpoints; the protocol selects among the "
                      f"{len(names)} that remain, not among every checkpoint the run wrote", stacklevel=2)
    correct, per_checkpoint, task = [], {}, task_name
    for name in names:
        out_name = f"{out_dir}/{name.replace('/', '_')}"
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
        path = Path(run_dir) / out_dir / "results.json"
        path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary
