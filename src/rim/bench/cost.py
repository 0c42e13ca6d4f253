"""Training cost at the card's limit (``rim bench epoch|sweep``): what an epoch of real layouts costs each method,
how tokens/s and memory grow with the batch, and the card's own matmul rate that model FLOP utilisation is
measured against.

    rim bench epoch --shape smollm2-135m --tokenizer .devcache/smollm2-tokenizer   # GPU: GSM8K layouts, 6 methods
    rim bench sweep --shape smollm2-135m --sweep-batches 32,64,128,256,512         # GPU: plain and RiM by batch
    rim bench epoch --shape tiny --epoch-task running-sum                          # CPU smoke

- **Epoch cost.** Every method's real training layouts (its own ``tokenize`` and ``train_layout``, its
  curriculum from a config, by default the paper's GPT-2 recipes in ``configs/paper``) of a real training split
  (GSM8K ``train_no_valid``), tokenized by a real tokenizer, on a model of the named shape with random weights
  (speed does not depend on them). For each stage of each recipe: the median time of a training step (forward,
  loss, backward, AdamW: what ``rim train`` runs, Coconut's n + 1 sequential passes included) over the same
  sampled batches of examples for every method, times the steps of an epoch. A method's epoch is the mean over its
  curriculum, stages weighted by their epochs. Ratios: RiM's epoch over CoT's, Coconut's over RiM's.
- **Batch sweep.** The plain Hugging Face step and RiM's step (supervised logits) on batches of RiM layouts of
  growing size: tokens/s, MFU and peak memory; a batch that does not fit is recorded as such and ends the sweep.
- **Matmul rate.** The median rate of a square matmul (8192³ in bf16 on a GPU, 1024³ in fp32 on a CPU) on the
  same device in the same run: MFU = 6 N tokens/s over it (4 N for LoRA, whose frozen weights get no gradient).
"""

from __future__ import annotations

import contextlib
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

from rim.config import load_config
from rim.methods.base import Method, TokenizedExample, make_method, method_class

PAPER_RECIPES = tuple(f"configs/paper/gsm8k-aug_gpt2_{m}.yaml" for m in ("nocot", "cot", "pause", "icot",
                                                                           "coconut", "codi", "rim"))


@dataclass
class CostSettings:
    """What the epoch-cost and sweep suites measure."""

    recipes: tuple[str, ...] = PAPER_RECIPES  # configs whose method and stages are timed (their data is not used)
    task: str = "gsm8k"
    split: str = "train_no_valid"
    tokenizer: str | None = None  # a saved Hugging Face tokenizer; None: the tiny word tokenizer of the task
    prompt_format: str = "plain"
    batch: int = 32  # layouts per step, the same for every method
    samples: int = 6  # timed steps per stage, each on its own sampled batch (after ``warmup`` steps)
    warmup: int = 2
    max_examples: int | None = None  # the split's first examples only (an epoch is still counted over them all)
    sweep_batches: tuple[int, ...] = (32, 64, 128, 256, 512)
    sweep_repeats: int = 5
    seed: int = 0


def matmul_rate(device: torch.device, n: int | None = None, repeats: int = 10) -> dict:
    """FLOP/s of an ``n``-cubed matmul (bf16 on a GPU, fp32 on a CPU): the dense rate this card reaches here."""
    cuda = device.type == "cuda"
    n = n or (8192 if cuda else 1024)
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    from rim.bench.timing import timed

    seconds = statistics.median(timed(lambda: a @ b, device, 3, repeats))
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "ms": 1e3 * seconds, "flops": 2 * n**3 / seconds}


def rate_text(flops: float) -> str:
    """A FLOP/s rate in the unit that suits it.

    >>> rate_text(7.5e14), rate_text(8.1e10)
    ('750.0 TFLOP/s', '81.0 GFLOP/s')
    """
    return f"{flops / 1e12:.1f} TFLOP/s" if flops >= 1e12 else f"{flops / 1e9:.1f} GFLOP/s"


def mfu_measured(row: dict, n_params: int, peak_flops: float, lora: bool) -> None:
    """Add ``mfu_measured`` (6 N tokens/s over the measured matmul rate) and, for LoRA, ``mfu_measured_4n``."""
    if "tokens_per_s" in row:
        row["mfu_measured"] = 6 * n_params * row["tokens_per_s"] / peak_flops
        if lora:
            row["mfu_measured_4n"] = 4 * n_params * row["tokens_per_s"] / peak_flops


def load_tokenizer(s: CostSettings, task, special_tokens: tuple[str, ...]):
    """The tokenizer the layouts are made with, with every timed method's special tokens added."""
    if s.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(s.tokenizer)
    else:
        from rim.models.tiny import word_tokenizer

        tokenizer = word_tokenizer(task.vocabulary())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)},
                                 replace_extra_special_tokens=False)
    return tokenizer


def load_recipes(paths: tuple[str, ...]) -> list:
    """The configs of ``paths`` (their method and stages); unknown keys are errors as for ``rim train``."""
    return [load_config(path) for path in paths]


def sampled_batches(n_examples: int, batch: int, count: int, seed: int) -> list[list[int]]:
    """``count`` batches of example indices, drawn without replacement within each batch; the same for every
    method, so each method lays out the same problems.

    >>> sampled_batches(10, 3, 2, 0) == sampled_batches(10, 3, 2, 0)
    True
    """
    rng = random.Random(seed)
    return [rng.sample(range(n_examples), min(batch, n_examples)) for _ in range(count)]


def stage_cost(method: Method, model, examples: list[TokenizedExample], stage, batches: list[list[int]],
               pad_id: int, s: CostSettings, device: torch.device, optimizer, autocast,
               steps_per_epoch: int) -> dict:
    """Median step time of ``stage`` over ``batches`` (the first ``s.warmup`` untimed), and seconds per epoch."""
    from accelerate.utils import send_to_device

    from rim.bench.timing import peak_memory_mb, reset_peak_memory, sync
    from rim.bench.train import train_step
    from rim.train.loss import stage_weights, step_loss

    rng = random.Random(s.seed)
    epochs = stage.epochs or 1.0
    times, tokens = [], []
    reset_peak_memory(device)
    for i, idx in enumerate(batches):
        epoch = epochs * (i + 0.5) / len(batches)  # a dynamic method's layouts across its stage (iCoT's removal)
        layouts = [method.train_layout(examples[j], stage, epoch, rng) for j in idx]
        batch = send_to_device(method.collate(layouts, pad_id), device)  # CODI's nests teacher and student
        weights = stage_weights(batch, stage, (i + 0.5) / len(batches))
        sync(device)
        t0 = time.perf_counter()
        train_step(partial(step_loss, method, model, batch, weights), optimizer, autocast)
        sync(device)
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
            tokens.append(real_tokens(batch))
    step_s = statistics.median(times)
    return {"step_ms": 1e3 * step_s, "tokens_per_step": statistics.mean(tokens), "steps_per_epoch": steps_per_epoch,
            "epoch_s": step_s * steps_per_epoch, "epochs": epochs, "peak_memory_mb": peak_memory_mb(device)}


def real_tokens(batch: dict) -> int:
    """Tokens of a collated batch that are not padding, with those of a nested batch that the same step also runs
    (CODI's teacher pass under ``teacher``)."""
    from rim.core.layout import PAD

    own = int((batch["segment"] != PAD).sum()) if "segment" in batch else int(batch["attention_mask"].sum())
    return own + sum(real_tokens(v) for v in batch.values() if isinstance(v, dict))


def bench_epoch(shape_name: str, device: torch.device, s: CostSettings, mode: str,
                out: dict | None = None, save: Callable[[], None] = lambda: None) -> dict:
    """Seconds per epoch of ``s.task``'s ``s.split`` for every recipe's method, stage by stage (see the module
    docstring). Fills ``out`` method by method and calls ``save`` after each: a run cut short keeps what it
    measured."""
    from rim.bench.shapes import bench_tokens
    from rim.data.tasks import make_task
    from rim.train.optim import adamw

    out = {} if out is None else out
    recipes = load_recipes(s.recipes)
    task = make_task(s.task, {})
    problems = task.load(s.split)
    steps_per_epoch = math.ceil(len(problems) / s.batch)
    problems = problems[: s.max_examples]
    specials = tuple(dict.fromkeys((*bench_tokens(), *(t for cfg in recipes for t in
                                                         method_class(cfg.method.name).special_tokens))))
    tokenizer = load_tokenizer(s, task, specials)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    batches = sampled_batches(len(problems), s.batch, s.warmup + s.samples, s.seed)
    out.update(task=s.task, split=s.split, examples=len(task.load(s.split)), batch=s.batch, train_mode=mode,
               tokenizer=s.tokenizer or "tiny word tokenizer", methods={})
    for cfg in recipes:
        method = make_method(cfg.method, tokenizer)
        model, params = recipe_model(shape_name, device, s.seed, tokenizer, specials, method, mode)
        examples = [method.tokenize(task, tokenizer, ex, s.prompt_format) for ex in problems]
        row = {"stages": {}, "parameters": sum(p.numel() for p in model.parameters()),
               "trainable_parameters": sum(p.numel() for p in params)}
        try:
            for stage in cfg.stages:
                optimizer = adamw(params, lr=1e-6)  # a fresh optimizer per stage, as the recipes reset it
                row["stages"][stage.name] = stage_cost(method, model, examples, stage, batches,
                                                       tokenizer.pad_token_id, s, device, optimizer, autocast,
                                                       steps_per_epoch)
                del optimizer
        except torch.OutOfMemoryError as err:
            row["error"] = f"out of memory: {err}"[:300]
            torch.cuda.empty_cache()
        del model, params
        stages = row["stages"].values()
        if stages and "error" not in row:
            total = sum(st["epochs"] for st in stages)
            row["epoch_s"] = sum(st["epoch_s"] * st["epochs"] for st in stages) / total
            row["curriculum_s"] = sum(st["epoch_s"] * st["epochs"] for st in stages)
        out["methods"][cfg.method.name] = row
        out["ratios"] = epoch_ratios(out["methods"])
        save()
    return out


def recipe_model(shape_name: str, device: torch.device, seed: int, tokenizer, specials: tuple[str, ...],
                 method: Method, mode: str) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A fresh model of the shape for one method, made trainable as ``rim train`` makes it (the method's own
    modules, CODI's projection, train in full; SIM-CoT's decoder joins the optimizer), and its trainable
    parameters."""
    from rim.bench.shapes import SHAPES, shape_model
    from rim.models.adapter import add_tokens, make_trainable, set_dropout

    model, _ = shape_model(SHAPES[shape_name], device, seed)
    model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    new_ids = add_tokens(tokenizer, model, specials)
    own = method.extend_model(model)
    model = make_trainable(model, new_ids, mode, lora_rank=128, full_modules=own).to(device)
    set_dropout(model, 0.0)
    model.train()
    method.prepare_training(model)
    return model, [p for p in model.parameters() if p.requires_grad] + list(method.training_parameters())


def epoch_ratios(methods: dict) -> dict[str, float]:
    """RiM's epoch over CoT's (target <= 1.5) and Coconut's over RiM's (target >= 3), where both are measured.

    >>> epoch_ratios({"rim": {"epoch_s": 2.0}, "cot": {"epoch_s": 1.6}, "coconut": {"epoch_s": 7.0}})
    {'epoch_rim_over_cot': 1.25, 'epoch_coconut_over_rim': 3.5}
    """
    epoch = {name: row["epoch_s"] for name, row in methods.items() if "epoch_s" in row}
    pairs = (("rim", "cot"), ("coconut", "rim"))
    return {f"epoch_{a}_over_{b}": epoch[a] / epoch[b] for a, b in pairs if a in epoch and b in epoch}


def bench_sweep(model, tokenizer, new_ids: list[int], settings, s: CostSettings, device: torch.device, mode: str,
                peak_flops: float, out: dict | None = None, save: Callable[[], None] = lambda: None) -> dict:
    """Tokens/s, MFU (measured) and peak memory of the plain step and RiM's step (supervised logits, grounding
    layouts as ``rim bench train``) at each batch of ``s.sweep_batches``; the first batch that does not fit ends
    the sweep (a larger one would not fit either)."""
    from rim.bench.shapes import method_config, synthetic_examples
    from rim.bench.timing import peak_memory_mb, reset_peak_memory, timed
    from rim.bench.train import step_losses, train_step
    from rim.config import StageConfig
    from rim.models.adapter import make_trainable, set_dropout
    from rim.train.optim import adamw

    n_params = sum(p.numel() for p in model.parameters())
    model = make_trainable(model, new_ids, mode, lora_rank=128)
    set_dropout(model, 0.0)
    model.train()
    optimizer = adamw([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    method = make_method(method_config("rim", settings), tokenizer)
    stage = StageConfig(name="grounding", kind="grounding", steps=1, block_weight="uniform")
    out = {} if out is None else out
    out.update(train_mode=mode, parameters=n_params, rows={})
    fits = {"plain": None, "rim_supervised": None}
    for size in s.sweep_batches:
        examples = synthetic_examples(size, tokenizer, settings, settings.seed + 1)
        layouts = [method.train_layout(ex, stage) for ex in examples]
        batch = {k: v.to(device) for k, v in method.collate(layouts, tokenizer.pad_token_id).items()}
        tokens = batch["input_ids"].numel()
        losses = step_losses(model, method, batch, stage)
        for name in ("plain", "rim_supervised"):
            key = f"{name}_b{size}"
            if fits[name] is False:
                out["rows"][key] = {"error": "not run: a smaller batch did not fit"}
                continue
            reset_peak_memory(device)
            try:
                step = partial(train_step, losses[name], optimizer, autocast)
                seconds = statistics.median(timed(step, device, 1, s.sweep_repeats))
            except torch.OutOfMemoryError:
                optimizer.zero_grad(set_to_none=True)
                torch.cuda.empty_cache()
                out["rows"][key], fits[name] = {"batch": size, "error": "out of memory"}, False
            else:
                row = {"batch": size, "tokens": tokens, "step_ms": 1e3 * seconds, "tokens_per_s": tokens / seconds,
                       "peak_memory_mb": peak_memory_mb(device)}
                mfu_measured(row, n_params, peak_flops, mode == "lora")
                out["rows"][key] = row
                out[f"largest_batch_{name}"] = size
            save()
        del batch, losses
    return out


def epoch_markdown(epoch: dict) -> list[str]:
    """The epoch-cost table: one row per method, its stages' step times in the last column."""
    lines = [f"Seconds per epoch of {epoch['task']} {epoch['split']} ({epoch['examples']} problems, batch "
             f"{epoch['batch']}, {epoch['train_mode']}; tokenizer {epoch['tokenizer']}):", "",
             "| method | epoch s (curriculum mean) | whole curriculum s | stages: step ms (tokens/step) |",
             "|---|---|---|---|"]
    for name, row in epoch["methods"].items():
        if "error" in row:
            lines.append(f"| {name} | failed: {row['error'][:120]} | - | - |")
            continue
        stages = ", ".join(f"{k} {v['step_ms']:.1f} ({v['tokens_per_step']:.0f})" for k, v in row["stages"].items())
        lines.append(f"| {name} | {row['epoch_s']:.1f} | {row['curriculum_s']:.1f} | {stages} |")
    lines += [""] + [f"- {k}: {v:.2f}" for k, v in epoch.get("ratios", {}).items()]
    return lines + [""]


def sweep_markdown(sweep: dict, peak: dict) -> list[str]:
    """The batch-sweep table."""
    lines = [f"Batch sweep ({sweep['train_mode']}; grounding layouts; matmul rate {rate_text(peak['flops'])} "
             f"at {peak['n']}³ {peak['dtype']}):", "",
             "| step | batch | tokens | step ms | tokens/s | peak MiB | MFU (6N, measured) |",
             "|---|---|---|---|---|---|---|"]
    for key, row in sweep["rows"].items():
        name = key.rsplit("_b", 1)[0]
        if "error" in row:
            lines.append(f"| {name} | {key.rsplit('_b', 1)[1]} | {row['error']} | - | - | - | - |")
            continue
        peak_mb = "-" if row["peak_memory_mb"] is None else f"{row['peak_memory_mb']:.0f}"
        lines.append(f"| {name} | {row['batch']} | {row['tokens']} | {row['step_ms']:.1f} | "
                     f"{row['tokens_per_s']:,.0f} | {peak_mb} | {row.get('mfu_measured', float('nan')):.3f} |")
    return lines + [""]


def default_recipes(root: Path | None = None) -> tuple[str, ...]:
    """The paper recipes, found from the working directory or the repository that holds this file."""
    for base in (Path.cwd(), root or Path(__file__).resolve().parents[2]):
        if all((base / p).is_file() for p in PAPER_RECIPES):
            return tuple(str(base / p) for p in PAPER_RECIPES)
    raise FileNotFoundError(f"the paper recipes ({PAPER_RECIPES[0]}, ...) were not found; pass --recipes")
