"""Inference latency of every method (time to the first answer token, full latency) and the answers after every
block read out in one pass against K decodes."""

from __future__ import annotations

import statistics
from functools import partial

import torch

from rim.bench.shapes import NO_STOP, REASONING_TOKENS, STATIC_METHODS, BenchSettings, method_config, synthetic_examples
from rim.bench.timing import timed
from rim.methods.base import Method, TokenizedExample, make_method


def bench_latency(model, tokenizer, s: BenchSettings, device: torch.device) -> dict:
    """Time to the first answer token and full latency of every method, per batch size (medians); with
    ``s.static_cache`` / ``s.compile`` also No-CoT and RiM with a static KV cache, without / with compiled decoding
    steps (rows ``<method>_static`` / ``<method>_compiled``)."""
    model.eval()
    rows = {name: (name, "dynamic", False) for name in REASONING_TOKENS}
    for name in STATIC_METHODS:
        if s.static_cache:
            rows[f"{name}_static"] = (name, "static", False)
        if s.compile:
            rows[f"{name}_compiled"] = (name, "static", s.compile)
    out = {}
    for batch_size in s.batch_sizes:
        examples = synthetic_examples(batch_size, tokenizer, s, s.seed)
        out[f"b{batch_size}"] = {row: time_method(model, tokenizer, name, examples, s, device, cache, compile)
                                 for row, (name, cache, compile) in rows.items()}
    return out


def time_method(model, tokenizer, name: str, examples: list[TokenizedExample], s: BenchSettings,
                device: torch.device, cache: str = "dynamic", compile: bool | str = False) -> dict:
    """One method's medians over a batch: its prompts through its own ``generate``."""
    method = make_method(method_config(name, s), tokenizer)
    prompts = [method.prompt(ex, s.blocks) for ex in examples]
    reasoning = REASONING_TOKENS[name]
    budget = reasoning + s.answer_tokens
    firsts, totals = [], []

    def decode() -> None:
        gen = method.generate(model, prompts, tokenizer.pad_token_id, NO_STOP, budget, cache=cache, compile=compile)
        firsts.append(gen.step_s[reasoning])
        totals.append(gen.total_s)

    timed(decode, device, s.warmup, s.repeats)
    return {"ttft_ms": 1e3 * statistics.median(firsts[s.warmup:]),
            "latency_ms": 1e3 * statistics.median(totals[s.warmup:]), "prompt_tokens": len(prompts[0]),
            "generated_tokens": budget, "latent_passes": s.thoughts + 1 if name == "coconut" else 0}


def bench_readouts(model, tokenizer, s: BenchSettings, device: torch.device) -> dict:
    """RiM's answers after every block k = 1..K (any-block accuracy), per batch size (medians): all K together
    (``RiM.block_readouts``: one prefill, the K answers side by side in one KV cache) against K decodes of
    ``question + k blocks`` (``Method``'s). The row keeps its name ``one_pass`` (one prefill). With
    ``s.static_cache`` / ``s.compile`` also all K together in a static cache, without / with compiled steps
    (``one_pass_static`` / ``one_pass_compiled``)."""
    method = make_method(method_config("rim", s), tokenizer)
    paths = {"one_pass": method.block_readouts, "k_decodes": partial(Method.block_readouts, method)}
    variants = {"one_pass_static": False} if s.static_cache else {}
    if s.compile:
        variants["one_pass_compiled"] = s.compile
    for path, compile in variants.items():
        static = make_method(method_config("rim", s), tokenizer)
        static.cache, static.compile = "static", compile  # as eval.cache / eval.compile set them
        paths[path] = static.block_readouts
    out = {}
    for batch_size in s.batch_sizes:
        examples = synthetic_examples(batch_size, tokenizer, s, s.seed)
        out[f"b{batch_size}"] = {
            f"{path}_ms": 1e3 * statistics.median(timed(
                partial(fn, model, examples, s.blocks, tokenizer.pad_token_id, NO_STOP, s.answer_tokens, batch_size),
                device, s.warmup, s.repeats))
            for path, fn in paths.items()}
    return out
