"""Load a trained run directory and evaluate it (``rim eval RUN``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rim.config import Config, load_config
from rim.data.tasks import Task, make_task
from rim.eval.evaluate import EvalResult, evaluate, write_predictions
from rim.methods.base import Method, make_method, tokenize_example
from rim.models.adapter import add_memory_tokens, ensure_pad_token, memory_token_ids


def pick_device(name: str = "auto") -> torch.device:
    """CUDA when available (unless told otherwise), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_run(run_dir: str | Path, device: str = "auto") -> tuple[Config, torch.nn.Module, object, Method, Task]:
    """Config, trained model (eval mode), tokenizer, method and task of a run directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir = Path(run_dir)
    ckpt = run_dir / "checkpoint"
    if not (ckpt / "rim.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no finished checkpoint (rim.json missing); did `rim train` complete?")
    cfg = load_config(run_dir / "config.yaml")
    task = make_task(cfg.data.task, cfg.data.options)
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    ensure_pad_token(tokenizer)
    if cfg.model.train_mode == "full":
        model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32,
                                                     attn_implementation=cfg.model.attn_implementation)
    else:
        from peft import PeftModel

        from rim.models.load import load_base

        base, base_tokenizer = load_base(cfg.model, task)
        add_memory_tokens(base_tokenizer, base)  # same rows, same mean init as in training
        model = PeftModel.from_pretrained(base, ckpt)
    memory = memory_token_ids(tokenizer)
    method = make_method(cfg.method, memory.block(cfg.method.memory_tokens), tokenizer.eos_token_id)
    return cfg, model.to(pick_device(device)).eval(), tokenizer, method, task


def eval_run(run_dir: str | Path, split: str | None = None, blocks: int | None = None, max_eval: int | None = None,
             device: str = "auto", out_name: str = "eval") -> EvalResult:
    """Evaluate a run on a split; writes ``<out_name>/results.json`` and ``predictions.jsonl`` into the run dir."""
    cfg, model, tokenizer, method, task = load_run(run_dir, device)
    split = split or cfg.data.eval_split
    examples = task.load(split)[: max_eval or cfg.data.max_eval]
    tokenized = [tokenize_example(task, tokenizer, ex) for ex in examples]
    k = blocks or cfg.eval.blocks or cfg.method.blocks
    result = evaluate(model, tokenizer, task, method, tokenized, k, cfg.eval.batch_size, cfg.eval.any_block,
                      cfg.eval.latency_examples)
    result.metrics.update(split=split, device=str(next(model.parameters()).device))
    out = Path(run_dir) / out_name
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result.metrics, indent=2), encoding="utf-8")
    write_predictions(result.records, out / "predictions.jsonl")
    return result
