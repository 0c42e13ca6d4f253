"""The fast training path against the simple one: logits only at supervised positions (plain, LoRA, Coconut), the
loss fused with the LM head, gradient checkpointing, batches bucketed by length, compiled blocks."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import FAMILIES, WORDS, make_tiny
from rim.config import ConfigError, MethodConfig, StageConfig, load_config
from rim.core import fused_loss
from rim.core.batch import collate
from rim.core.curriculum import weighted_readout_loss
from rim.core.layout import Readout, build_layout, grounding_readouts, refinement_readouts
from rim.data.tasks import Example, RunningSum
from rim.methods import METHODS, make_method
from rim.models.adapter import (add_memory_tokens, add_tokens, compile_model, enable_gradient_checkpointing,
                                make_trainable, set_dropout)
from rim.models.tiny import tiny_model, word_tokenizer
from rim.train.loss import stage_weights, step_loss
from rim.train.sampling import LengthBuckets
from test_distributed import CONFIG, needs_torchrun, one_and_two_processes_agree

GROUNDING = StageConfig(name="g", kind="grounding", steps=1, block_weight="uniform")
REFINEMENT = StageConfig(name="r", kind="refinement", steps=1)


def rim_batch(mem, stage: StageConfig):
    """Two examples of different lengths (so one is padded) in the stage's layout."""
    if stage.kind == "grounding":
        readouts = [grounding_readouts([[9, 10], [11]], [12, 13]), grounding_readouts([[9], [10], [11, 4]], [12])]
    else:
        readouts = [refinement_readouts([12, 13], 3), refinement_readouts([12], 2)]
    questions = [[4, 5, 6, 7, 8], [5, 6]]
    return collate([build_layout(q, [mem.block(2)] * len(r), r, eos_id=2) for q, r in zip(questions, readouts)],
                   pad_id=0)


def loss_and_grads(model, method, batch, weights, supervised: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    set_dropout(model, 0.0)  # GPT-2 configs default to dropout 0.1: both passes must be deterministic
    model.zero_grad()
    loss = step_loss(method, model, batch, weights, supervised)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]


def assert_same_loss_and_grads(model, method, batch, weights) -> None:
    fast_loss, fast = loss_and_grads(model, method, batch, weights, True)
    full_loss, full = loss_and_grads(model, method, batch, weights, False)
    assert torch.allclose(fast_loss, full_loss, rtol=1e-5, atol=1e-6)
    assert len(fast) == len(full) > 0
    for a, b in zip(fast, full):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", [GROUNDING, REFINEMENT], ids=["grounding", "refinement"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_supervised_logits_give_the_loss_and_gradients_of_full_logits(family, mode, stage):
    model, tok, mem = make_tiny(family)
    model = make_trainable(model, mem.all, mode, lora_rank=2).train()
    method = make_method(MethodConfig(name="rim"), tok)
    batch = rim_batch(mem, stage)
    weights = stage_weights(batch, stage, 0.4)  # some step readouts already annealed to weight 0
    assert batch["supervised"].numel() < batch["labels"].numel() / 2
    assert_same_loss_and_grads(model, method, batch, weights)


def named_grads(model, method, batch, weights, fused: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss and the gradient of every trainable parameter (None where none arrived) of the fused or the simple
    full-logits path."""
    set_dropout(model, 0.0)
    model.zero_grad()
    loss = step_loss(method, model, batch, weights, supervised_logits=fused, fused_loss=fused)
    loss.backward()
    return loss.detach(), {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
                           if p.requires_grad}


@pytest.mark.parametrize("stage", [GROUNDING, REFINEMENT], ids=["grounding", "refinement"])
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", [*FAMILIES, "gpt2-untied"])
def test_fused_loss_gives_the_loss_and_gradients_of_full_logits(monkeypatch, family, mode, stage):
    if family == "gpt2-untied":  # the head is its own weight: trained in full mode, frozen under LoRA
        tok = word_tokenizer(WORDS)
        model = tiny_model(len(tok), "gpt2", hidden=32, heads=4, tie_word_embeddings=False)
        mem = add_memory_tokens(tok, model)
    else:
        model, tok, mem = make_tiny(family)
    model = make_trainable(model, mem.all, mode, lora_rank=2).train()
    method = make_method(MethodConfig(name="rim"), tok)
    batch = rim_batch(mem, stage)
    weights = stage_weights(batch, stage, 0.4)
    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 3 * len(tok))  # chunks of 3 rows: several run
    assert batch["supervised"].numel() > 3 * fused_loss.chunk_rows(len(tok))
    fused, fused_grads = named_grads(model, method, batch, weights, True)
    full, full_grads = named_grads(model, method, batch, weights, False)
    assert torch.allclose(fused, full, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == full_grads.keys()
    head = model.get_output_embeddings()
    assert any(p.requires_grad for p in head.parameters()) == (family != "gpt2-untied" or mode == "full")
    for name, grad in full_grads.items():
        assert (grad is None) == (fused_grads[name] is None), name  # gradients reach exactly the same tensors
        assert grad is None or torch.allclose(fused_grads[name], grad, rtol=1e-4, atol=1e-6), name


@pytest.mark.parametrize("replaced", [False, True], ids=["whole-weight", "replaced-rows"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_fused_linear_cross_entropy_equals_the_weighted_loss_of_its_logits(autocast, replaced):
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight, bias = torch.randn(40, 8, requires_grad=True), torch.randn(40, requires_grad=True)
    index, values = torch.tensor([3, 17, 39]), torch.randn(3, 8, requires_grad=True)  # peft's trainable tokens
    labels = torch.randint(0, 40, (11,))
    labels[:3] = index  # the replaced rows are some labels too
    weights = torch.rand(11) * (torch.arange(11) % 4 != 0)  # some positions annealed to weight 0
    inputs = (hidden, weight, bias, values) if replaced else (hidden, weight, bias)
    results = []
    for fused in (True, False):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            if fused:
                loss = fused_loss.fused_linear_cross_entropy(hidden, weight, bias, labels, weights,
                                                             (index, values) if replaced else None, rows=4)
            else:
                w = weight.index_copy(0, index, values) if replaced else weight
                loss = weighted_readout_loss(F.linear(hidden, w, bias), labels, weights)
        results.append([loss, *torch.autograd.grad(loss * 3, inputs)])
    tol = {"rtol": 1e-2, "atol": 1e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in zip(*results):
        assert a.dtype == b.dtype and torch.allclose(a, b, **tol)
    with torch.no_grad():  # evaluation: the loss alone, no gradients computed
        assert torch.allclose(fused_loss.fused_linear_cross_entropy(hidden, weight, bias, labels, weights,
                                                                    (index, values) if replaced else None, 4),
                              results[1][0].detach(), **tol)
    zero = fused_loss.fused_linear_cross_entropy(hidden, weight, None, labels, torch.zeros(11))
    assert zero.item() == 0 and zero.requires_grad


def test_fused_loss_is_refused_where_it_would_be_wrong():
    model, tok, mem = make_tiny("llama")
    method = make_method(MethodConfig(name="rim"), tok)
    batch = rim_batch(mem, GROUNDING)
    weights = stage_weights(batch, GROUNDING, 0.0)
    handle = model.get_output_embeddings().register_forward_hook(lambda _m, _a, out: out * 2)  # a logit scale
    with pytest.raises(ValueError, match="fused_loss=false"):
        step_loss(method, model, batch, weights, fused_loss=True)
    handle.remove()
    lora_head = make_trainable(make_tiny("llama")[0], [], "lora", lora_rank=2, target_modules=["q_proj", "lm_head"])
    with pytest.raises(ValueError, match="peft.tuners.lora.layer.Linear is not a plain linear layer"):
        step_loss(method, lora_head, batch, weights, fused_loss=True)
    add_tokens(tok, model, METHODS["coconut"].special_tokens)
    coconut = make_method(MethodConfig(name="coconut"), tok)
    with pytest.raises(ConfigError, match="standard forward"):
        step_loss(coconut, model, batch, weights, fused_loss=True)
    for overrides in (["train.fused_loss=true", "train.supervised_logits=false"],
                      ["train.fused_loss=true", "method.name=coconut", "stages=[{name: a, kind: latent, steps: 1}]"]):
        with pytest.raises(ConfigError, match="train.fused_loss"):
            load_config(None, overrides)


@pytest.mark.slow
def test_training_with_fused_loss_takes_the_same_steps(tmp_path):
    from rim.train.loop import train

    def losses(fused: bool) -> list[float]:
        cfg = load_config(None, [
            "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", "data.options={n_train: 32}",
            "stages=[{name: g, kind: grounding, steps: 3}, {name: r, kind: refinement, steps: 2}]",
            "train.batch_size=8", "train.progress=false", "train.log_every=1", f"train.fused_loss={str(fused).lower()}",
            f"output_dir={tmp_path / str(fused)}", "train.device=cpu"])
        lines = (train(cfg) / "metrics.jsonl").read_text().splitlines()
        return [e["loss"] for e in map(json.loads, lines) if e["event"] == "train"]

    fused, simple = losses(True), losses(False)
    assert len(fused) == 5 and fused == pytest.approx(simple, rel=1e-5)


@pytest.mark.slow
@needs_torchrun
def test_fused_loss_under_ddp_trains_like_one_process_without_it(tmp_path):
    """The fused loss runs inside the DDP-wrapped forward: two gloo processes take one process's steps."""
    (tmp_path / "c.yaml").write_text(CONFIG)
    one_and_two_processes_agree(tmp_path, "train.fused_loss=true")


@pytest.mark.slow
def test_bench_train_times_the_fused_and_compiled_steps(tmp_path, monkeypatch):
    from rim.bench import SHAPES, BenchSettings, Shape, run_bench

    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 2, 32, 4, 2, 64, 256))
    compiled, marks = [], []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append((type(self).__name__, k)))
    from torch._dynamo.utils import counters

    def mark() -> None:  # and pretend that torch ran the step without graphs, as it reports a skip
        marks.append(1)
        counters["inductor"]["cudagraph_skips"] += 1

    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", mark)
    settings = BenchSettings(question_tokens=12, train_batch=2, repeats=2, warmup=1,
                             compile_train=("default", "reduce-overhead"))
    results = run_bench("train", "tiny", "cpu", tmp_path, settings)
    assert compiled == [("LlamaDecoderLayer", {})] * 2 + [("LlamaDecoderLayer", {"mode": "reduce-overhead"})] * 2
    assert len(marks) == 2 * 2 * 3  # every step (1 warm-up, 2 timed) of the two CUDA-graph rows, in both stages
    rows = {"plain", "rim_full", "rim_supervised", "rim_fused", "rim_compiled", "rim_compiled_reduce_overhead",
            "plain_compiled", "plain_compiled_reduce_overhead"}
    for i, stage in enumerate(("grounding", "refinement"), start=1):
        assert rows <= set(results["train"][stage])
        assert {f"train_stage{i}_{row}_over_plain" for row in ("fused", "compiled", "compiled_reduce_overhead")} \
            <= set(results["ratios"])
        assert {f"train_stage{i}_compiled_over_plain_compiled",
                f"train_stage{i}_compiled_reduce_overhead_over_plain_compiled_reduce_overhead"} \
            <= set(results["ratios"])
        speed = {row: results["train"][stage][row]["tokens_per_s"] for row in rows}
        assert results["ratios"][f"train_stage{i}_fastest_over_plain"] == max(  # eager plain, as the target says
            v for k, v in speed.items() if k.startswith("rim_")) / speed["plain"]
    passes = results["train"]["masked_vs_separate"]
    assert results["ratios"]["masked_over_separate_tokens"] == passes["separate_tokens"] / passes["masked_tokens"] > 1
    assert results["train"]["refinement"]["rim_compiled_reduce_overhead"]["cudagraph_skips"] == 3
    assert "cudagraph_skips" not in results["train"]["refinement"]["rim_compiled"]
    assert "| refinement | rim_compiled_reduce_overhead (CUDA graphs skipped 3x) |" in \
        (tmp_path / "bench-tiny-train.md").read_text()


@pytest.mark.parametrize("family", FAMILIES)
def test_coconut_supervised_logits_equal_full_logits_with_and_without_cache(family):
    from rim.methods.coconut import latent_forward

    tok = word_tokenizer(WORDS)
    model = tiny_model(len(tok), family, layers=2, hidden=32, heads=4, seed=0).train()
    add_tokens(tok, model, METHODS["coconut"].special_tokens)
    method = make_method(MethodConfig(name="coconut", thoughts_per_step=2, max_latent_steps=2), tok)
    task = RunningSum(digits=4)
    examples = [method.tokenize(task, tok, e) for e in (Example("3 7 2 9", ("3", "0", "2", "1"), "1"),
                                                          Example("5 1", ("5", "6"), "6"))]
    stage = StageConfig(name="s1", kind="latent", steps=1, latent_steps=1)
    batch = method.collate([method.train_layout(ex, stage) for ex in examples], tok.pad_token_id)
    weights = stage_weights(batch, stage, 0.0)
    assert_same_loss_and_grads(model, method, batch, weights)
    keep = batch["supervised"]
    with torch.no_grad():
        uncached = latent_forward(model, batch, use_cache=False, keep=keep)
        full = latent_forward(model, batch).flatten(0, 1)[keep]
    assert torch.allclose(uncached, full, atol=1e-5)


def test_gradient_checkpointing_keeps_loss_and_gradients():
    model, tok, mem = make_tiny("llama")
    method = make_method(MethodConfig(name="rim"), tok)
    batch = rim_batch(mem, GROUNDING)
    weights = stage_weights(batch, GROUNDING, 0.0)
    plain_loss, plain = loss_and_grads(model.train(), method, batch, weights, True)
    enable_gradient_checkpointing(model)
    assert model.model.gradient_checkpointing
    loss, grads = loss_and_grads(model, method, batch, weights, True)
    assert torch.allclose(loss, plain_loss) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(grads, plain))
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(None, ["method.name=coconut", "stages=[{name: a, kind: latent, steps: 1}]",
                           "train.gradient_checkpointing=true"])


def test_length_buckets_cover_every_example_once_with_less_padding():
    lengths = [(i * 37) % 101 for i in range(500)]
    buckets = LengthBuckets(lengths, batch_size=16, seed=3, window=8)
    first = list(buckets)
    buckets.epoch = 1
    second = list(buckets)
    assert len(first) == len(buckets) == 32 and first != second  # a new draw every epoch
    assert sorted(i for b in first for i in b) == list(range(500))
    assert [len(b) for b in first].count(16) == 31
    assert first == list(LengthBuckets(lengths, batch_size=16, seed=3, window=8))  # (seed, epoch) fix the draws

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = torch.randperm(500, generator=torch.Generator().manual_seed(3)).tolist()
    assert padded(first) < 0.6 * padded([shuffled[i:i + 16] for i in range(0, 500, 16)])


@pytest.mark.parametrize("name", ["rim", "coconut"])
@pytest.mark.parametrize("family", FAMILIES)
def test_padding_to_a_multiple_keeps_the_loss_and_gradients(family, name):
    """``train.pad_to_multiple``: the longer batch computes the same loss and gradients (its padding is masked out,
    and the supervised positions are re-indexed into the wider rows)."""
    tok = word_tokenizer(WORDS)
    model = tiny_model(len(tok), family, layers=2, hidden=32, heads=4, seed=0).train()
    add_tokens(tok, model, METHODS[name].special_tokens)
    method = make_method(MethodConfig(name=name, thoughts_per_step=1, max_latent_steps=1), tok)
    kind = [k for k in method.stage_kinds if k != "rl"][-1]  # the last supervised kind (rl samples its batches)
    stage = StageConfig(name="s", kind=kind, steps=1, latent_steps=1)
    examples = [method.tokenize(RunningSum(digits=4), tok, e) for e in (Example("3 7 2 9", ("3", "0", "2", "1"), "1"),
                                                                        Example("5 1", ("5", "6"), "6"))]
    layouts = [method.train_layout(ex, stage) for ex in examples]
    results = []
    for multiple in (1, 16):
        batch = method.collate(layouts, tok.pad_token_id, multiple)
        results.append(loss_and_grads(model, method, batch, stage_weights(batch, stage, 0.0), True))
        results[-1] += (batch,)
    (loss, grads, batch), (padded_loss, padded_grads, padded) = results
    assert padded["input_ids"].shape[1] % 16 == 0 and padded["input_ids"].shape[1] > batch["input_ids"].shape[1]
    assert padded["labels"].flatten()[padded["supervised"]].tolist() == \
        batch["labels"].flatten()[batch["supervised"]].tolist()
    assert torch.allclose(padded_loss, loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(padded_grads, grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_compile_model_passes_the_mode_or_backend(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: calls.append(k))
    model, _, mem = make_tiny("llama", layers=2)
    for how, options in ((True, {}), ("reduce-overhead", {"mode": "reduce-overhead"}), ("eager", {"backend": "eager"})):
        compile_model(model, how)
        assert calls[-2:] == [options] * 2


@pytest.mark.parametrize("scope", ["blocks", "decoder"])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU (bench/run_gpu.sh runs it there)"))])
@pytest.mark.slow
def test_training_compiled_for_cuda_graphs_takes_the_same_steps(tmp_path, monkeypatch, device, scope):
    """``train.compile=reduce-overhead`` with padded batches (real inductor; on a CPU without the CUDA graphs
    themselves), each block or the whole decoder compiled, accumulating two micro-batches per step (into gradient
    buffers that outlive the graphs' replays): the same losses as eager training (fp32), a new graph step marked
    before every micro-batch, and selection decoding run eagerly (it would otherwise record graphs for every
    length it meets)."""
    from rim.train import loop

    marks, stances = [], []
    mark, set_stance = torch.compiler.cudagraph_mark_step_begin, torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1) or mark())
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **k: stances.append(stance) or set_stance(
        stance, **k))
    base = ["model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2",
            "data.options={n_train: 32, n_valid: 4}", "eval.select_split=valid", "eval.every=2",
            "stages=[{name: g, kind: grounding, steps: 3}, {name: r, kind: refinement, steps: 2}]",
            "train.batch_size=8", "train.grad_accum=2", "train.progress=false", "train.log_every=1",
            f"train.device={device}", "train.precision='no'"]

    def losses(*extra: str) -> list[float]:
        run = loop.train(load_config(None, [*base, *extra, f"output_dir={tmp_path / str(len(extra))}"]))
        events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return [e["loss"] for e in events if e["event"] == "train"]

    eager = losses()
    assert not marks and not stances
    compiled = losses("train.compile=reduce-overhead", "train.pad_to_multiple=8", f"train.compile_scope={scope}")
    assert compiled == pytest.approx(eager, rel=1e-5) and len(eager) == 5
    assert len(marks) == 10 and stances.count("force_eager") == 4  # steps 2 and 4, and the ends of the stages (3, 5)


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "decoder"])
def test_training_through_a_compiled_decoder_selects_eagerly(tmp_path, monkeypatch, scope):
    """Without CUDA graphs (here the aot_eager backend: torch.compile's tracing, no code generation), compiled
    training takes eager training's steps; selection decoding runs eagerly with a compiled decoder (through a KV
    cache it would be recompiled at every length) and through the compiled blocks otherwise."""
    from rim.train import loop

    stances, set_stance = [], torch.compiler.set_stance
    monkeypatch.setattr(torch.compiler, "set_stance", lambda stance, **k: stances.append(stance) or set_stance(
        stance, **k))
    base = ["model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", "data.options={n_train: 16, "
            "n_valid: 4}", "eval.select_split=valid", "eval.every=2", "stages=[{name: g, kind: grounding, steps: 2}]",
            "train.batch_size=8", "train.progress=false", "train.log_every=1", "train.device=cpu"]

    def losses(*extra: str) -> list[float]:
        run = loop.train(load_config(None, [*base, *extra, f"output_dir={tmp_path / str(len(extra))}"]))
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"event": "train"' in line]

    eager = losses()
    compiled = losses("train.compile=aot_eager", f"train.compile_scope={scope}")
    assert compiled == pytest.approx(eager, rel=1e-5) and len(eager) == 2
    assert stances.count("force_eager") == (1 if scope == "decoder" else 0)  # one selection, at step 2


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a GPU"))])
def test_adamw_is_fused_on_a_gpu_unless_sharded(device):
    from rim.train.optim import adamw

    params = [torch.nn.Parameter(torch.zeros(3, device=device))]
    assert bool(adamw(params, 1e-3).defaults["fused"]) == (device == "cuda")
    assert not adamw(params, 1e-3, sharded=True).defaults["fused"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", ["blocks", "decoder"])
@pytest.mark.parametrize("mode", ["full", "lora"])
def test_compile_model_compiles_each_block_or_the_decoder(monkeypatch, mode, scope):
    compiled = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, *a, **k: compiled.append(type(self).__name__))
    for family, block, decoder in (("llama", "LlamaDecoderLayer", "LlamaModel"), ("gpt2", "GPT2Block", "GPT2Model")):
        model, _, mem = make_tiny(family, layers=3)
        expected = [block] * 3 if scope == "blocks" else [decoder]
        assert compile_model(make_trainable(model, mem.all, mode, lora_rank=2), True, scope) == len(expected)
        assert compiled[-len(expected):] == expected


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["full", "lora"])
@pytest.mark.parametrize("family", FAMILIES)
def test_the_decoder_under_the_rim_mask_traces_as_one_graph(family, mode):
    """What ``train.compile_scope: decoder`` compiles, called as RiM's training step calls it (4-D mask, RiM
    positions): one graph, no break (a break would split it into several graphs and CUDA-graph replays)."""
    from rim.models.adapter import decoder_stack

    model, tok, mem = make_tiny(family)
    model = make_trainable(model, mem.all, mode, lora_rank=2).train()
    batch = rim_batch(mem, REFINEMENT)
    decoder, calls = decoder_stack(model), []
    hook = decoder.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    step_loss(make_method(MethodConfig(name="rim"), tok), model, batch, stage_weights(batch, REFINEMENT, 0.0))
    hook.remove()
    (args, kwargs), = calls
    assert kwargs["attention_mask"].dim() == 4
    explained = torch._dynamo.explain(decoder)(*args, **kwargs)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


@pytest.mark.slow
def test_compile_model_switches_scope_and_refuses_a_model_without_a_decoder():
    model, _, _ = make_tiny("llama", layers=2)
    compile_model(model, "eager", "blocks")
    compile_model(model, "eager", "decoder")
    compiled = [m for m in model.modules() if m._compiled_call_impl is not None]
    assert compiled == [model.get_decoder()]
    model.get_decoder = lambda: model
    with pytest.raises(ValueError, match="train.compile_scope=blocks"):
        compile_model(model, True, "decoder")
    with pytest.raises(ValueError, match="compile scope"):
        compile_model(model, True, "everything")


@pytest.mark.slow
def test_training_with_buckets_and_checkpointing_takes_the_plain_runs_steps(tmp_path):
    """Gradient checkpointing recomputes the forward in the backward: with batches bucketed by length, a run with
    it logs the losses of the same run without it, step for step (and bucketing draws other batches than plain
    shuffling, so the bucketed runs are not the plain run again)."""
    from rim.train.loop import train

    def losses(*extra: str) -> list[float]:
        cfg = load_config(None, [
            "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", "data.options={n_train: 48}",
            "stages=[{name: g, kind: grounding, steps: 2}, {name: r, kind: refinement, steps: 1}]",
            "train.batch_size=16", "train.progress=false", "train.log_every=1", "train.device=cpu",
            f"output_dir={tmp_path / str(len(extra))}", *extra])
        run = train(cfg)
        assert (run / "checkpoint" / "rim.json").is_file()
        return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"event": "train"' in line]

    plain = losses()
    bucketed = losses("train.bucket_by_length=true")
    both = losses("train.bucket_by_length=true", "train.gradient_checkpointing=true")
    assert len(both) == len(bucketed) == 3
    assert both == pytest.approx(bucketed, rel=1e-5)
    assert bucketed != pytest.approx(plain, rel=1e-5)


def test_single_readout_layout_keeps_one_position_per_label():
    tok = word_tokenizer(WORDS)
    layout = build_layout([1, 4, 5], [[]], [Readout([6, 7])], eos_id=2)
    batch = collate([layout, build_layout([1, 4], [[]], [Readout([6])], eos_id=2)], pad_id=tok.pad_token_id)
    labels = batch["labels"].flatten()[batch["supervised"]]
    assert labels.tolist() == [6, 7, 2, 6, 2]
