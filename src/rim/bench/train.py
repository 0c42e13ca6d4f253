"""RiM's training step against a plain causal step, both through the library's loss and optimizer, and one
masked pass against separate passes."""

from __future__ import annotations

import contextlib
import itertools
import statistics
import traceback
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from rim.bench.shapes import BenchSettings, method_config, synthetic_examples
from rim.bench.timing import mfu, peak_memory_mb, profile_step, reset_peak_memory, timed
from rim.config import CUDA_GRAPH_MODES, StageConfig
from rim.core.batch import collate
from rim.core.layout import PAD, Readout, build_layout
from rim.methods.base import TokenizedExample, make_method
from rim.models.adapter import check_kept, compile_model, logits_at, make_trainable, masked_forward, set_dropout
from rim.train.loss import stage_weights, step_loss
from rim.train.optim import adamw


def plain_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The plain Hugging Face step's loss: causal mask, logits everywhere, HF's own loss over every real token."""
    real = batch["segment"] != PAD
    labels = batch["input_ids"].masked_fill(~real, -100)
    return model(input_ids=batch["input_ids"], attention_mask=real.long(), labels=labels, use_cache=False).loss


def bench_train(model, tokenizer, new_ids: list[int], s: BenchSettings, device: torch.device, mode: str,
                out: dict | None = None, save: Callable[[], None] = lambda: None) -> dict:
    """Tokens/s, step time and peak memory of the plain HF step and of RiM's step (full logits, supervised logits,
    fused loss) on each stage's batch; then one masked pass over K readouts against K separate passes (forward
    only, then with the loss's backward); last, for each mode of ``s.compile_train`` and each scope of
    ``s.compile_scopes``, RiM's step (supervised logits) and the plain step compiled, on the batch padded to a
    multiple of ``s.compile_pad`` (the target compares RiM's fastest step with the eager plain step, as the issue
    defines it; the compiled plain step shows how much of that is compiling alone). A compiled row that fails is
    recorded with its error, and the rest of its mode and scope as not run.
    Fills ``out`` row by row and calls ``save`` after each row: a run cut short keeps what it measured."""
    n_params = sum(p.numel() for p in model.parameters())
    model = make_trainable(model, new_ids, mode, lora_rank=128)
    set_dropout(model, 0.0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = adamw(params, lr=1e-6)  # what rim train uses (fused on a GPU, as HF's Trainer): both steps alike
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    method = make_method(method_config("rim", s), tokenizer)
    examples = synthetic_examples(s.train_batch, tokenizer, s, s.seed + 1)
    out = {} if out is None else out
    out.update(train_mode=mode, trainable_parameters=sum(p.numel() for p in params), parameters=n_params)
    stages = (StageConfig(name="grounding", kind="grounding", steps=1, block_weight="uniform"),
              StageConfig(name="refinement", kind="refinement", steps=1))

    def make_batch(stage: StageConfig, multiple: int = 1) -> dict[str, torch.Tensor]:
        layouts = [method.train_layout(ex, stage) for ex in examples]
        return {k: v.to(device) for k, v in method.collate(layouts, tokenizer.pad_token_id, multiple).items()}

    batches = [make_batch(stage) for stage in stages]

    def measure(loss_fn: Callable[[], torch.Tensor], tokens: int, graphs: bool = False) -> dict:
        reset_peak_memory(device)
        step = partial(train_step, loss_fn, optimizer, autocast, graphs)
        seconds = statistics.median(timed(step, device, s.warmup, s.repeats))
        row = {"step_ms": 1e3 * seconds, "tokens_per_s": tokens / seconds, "peak_memory_mb": peak_memory_mb(device),
               "mfu": mfu(n_params, tokens / seconds, device)}
        if s.profile:  # after the timed runs, which it does not slow
            row["profile"] = profile_step(step, device)
        return row

    for stage, batch in zip(stages, batches):
        tokens = batch["input_ids"].numel()
        out[stage.name] = {"tokens": tokens, "supervised_tokens": batch["supervised"].numel()}
        for name, loss_fn in step_losses(model, method, batch, stage).items():
            out[stage.name][name] = measure(loss_fn, tokens)
            save()
    model.eval()
    with torch.no_grad(), autocast:
        out["masked_vs_separate"] = bench_masked_pass(model, method, examples, s, device)
    save()
    model.train()
    with autocast:  # the same with the loss's backward: the measurement was of training passes
        out["masked_vs_separate_train"] = bench_masked_pass(model, method, examples, s, device, backward=True)
    save()
    # last: compiling changes the model in place (the warm-up runs compile)
    # the compiled rows take padded batches, as training in CUDA graphs does (both steps alike)
    padded = [make_batch(stage, s.compile_pad) for stage in stages] if s.compile_train else []
    for stage, padded_batch in zip(stages, padded):
        out[stage.name]["padded_tokens"] = padded_batch["input_ids"].numel()
    for how, scope in itertools.product(s.compile_train, s.compile_scopes):
        torch._dynamo.reset()  # nothing compiled in an earlier mode is reused
        compile_model(model, True if how == "default" else how, scope)
        suffix = "compiled" + ("" if scope == "blocks" else f"_{scope}") + (
            "" if how == "default" else f"_{how.replace('-', '_')}")
        graphs, failed = how in CUDA_GRAPH_MODES, None
        for stage, padded_batch in zip(stages, padded):
            losses = step_losses(model, method, padded_batch, stage)
            for name in ("rim_supervised", "plain"):  # the plain step through the same blocks: like for like
                row = f"{name.split('_')[0]}_{suffix}"
                skips = counters["inductor"]["cudagraph_skips"]
                if failed:  # its compiled code (and CUDA graphs) may be broken: the next mode starts afresh
                    out[stage.name][row] = {"error": f"not run: {failed} failed before it"}
                else:
                    try:
                        out[stage.name][row] = measure(losses[name], out[stage.name]["tokens"], graphs)
                    except Exception as err:  # one failing compile must not cost the other modes' rows
                        out[stage.name][row], failed = {"error": f"{type(err).__name__}: {err}"[:500]}, row
                        traceback.print_exc()
                        optimizer.zero_grad(set_to_none=True)
                    else:
                        if graphs:  # > 0: some blocks ran without graphs (torch's log says why)
                            out[stage.name][row]["cudagraph_skips"] = counters["inductor"]["cudagraph_skips"] - skips
                save()
    return out


def step_losses(model, method, batch: dict[str, torch.Tensor], stage: StageConfig
                ) -> dict[str, Callable[[], torch.Tensor]]:
    """The compared losses of one batch: the plain HF step, and RiM's real step with full or supervised logits or
    the loss fused with the LM head."""
    weights = stage_weights(batch, stage, 0.5)
    return {"plain": lambda: plain_loss(model, batch),
            "rim_full": lambda: step_loss(method, model, batch, weights, supervised_logits=False),
            "rim_supervised": lambda: step_loss(method, model, batch, weights),
            "rim_fused": lambda: step_loss(method, model, batch, weights, fused_loss=True)}


def train_step(loss_fn: Callable[[], torch.Tensor], optimizer: torch.optim.Optimizer, autocast,
               graphs: bool = False) -> None:
    """Forward (under ``autocast``), backward and an optimizer step; ``graphs``: a new step of the CUDA graphs of
    the compiled blocks begins (as in ``rim train``)."""
    if graphs:
        torch.compiler.cudagraph_mark_step_begin()
    with autocast:
        loss = loss_fn()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def bench_masked_pass(model, method, examples: list[TokenizedExample], s: BenchSettings, device: torch.device,
                      backward: bool = False) -> dict:
    """Logits of all K answer readouts: one pass under the RiM mask against K causal passes over
    ``question + k blocks + answer`` (what K separate readouts cost), both with logits at the labels only;
    ``backward``: each pass also takes the cross-entropy of those logits and its backward (as training does)."""
    stage = StageConfig(name="refinement", kind="refinement", steps=1, blocks=s.blocks)
    layouts = [method.train_layout(ex, stage) for ex in examples]
    masked = {k: v.to(device) for k, v in method.collate(layouts, 0).items()}
    separate = []
    for k in range(1, s.blocks + 1):
        single = [build_layout(ex.question, [method.block * k], [Readout(ex.answer)], method.eos_id)
                  for ex in examples]
        separate.append({key: v.to(device) for key, v in collate(single, 0).items()})

    def finish(logits: torch.Tensor, b: dict[str, torch.Tensor]) -> None:
        if backward:
            F.cross_entropy(logits.float(), b["labels"].flatten()[b["supervised"]]).backward()

    def one_pass() -> None:
        finish(masked_forward(model, masked, keep=masked["supervised"]), masked)
        model.zero_grad(set_to_none=True)

    def k_passes() -> None:
        for b in separate:
            with logits_at(model, b["supervised"]):
                finish(check_kept(model(input_ids=b["input_ids"], use_cache=False).logits, b["supervised"]), b)
        model.zero_grad(set_to_none=True)

    one = timed(one_pass, device, s.warmup, s.repeats)
    many = timed(k_passes, device, s.warmup, s.repeats)
    return {"one_masked_ms": 1e3 * statistics.median(one), "separate_ms": 1e3 * statistics.median(many),
            "masked_tokens": masked["input_ids"].numel(), "separate_tokens": sum(b["input_ids"].numel()
                                                                                 for b in separate)}
