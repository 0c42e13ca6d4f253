"""Static KV cache and compiled decoding steps: the same greedy tokens as the dynamic cache and as no cache, for
left-padded batches that stop per sequence, on Llama and GPT-2 and through the methods' own ``generate``."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_tiny
from rim.cli import build_parser, compile_setting, decoding_overrides, main
from rim.config import ConfigError, load_config
from rim.data.tasks import Example, RunningSum
from rim.infer.generate import greedy_generate, static_cache
from rim.models.tiny import tiny_model, word_tokenizer
from test_methods import TASK, setup, spread
from test_serve import RIM_STAGES, answers, tiny_run


def varied_stop(free: list[list[int]]) -> int:
    """A generated token that, as the stop token, ends the sequences at different steps."""
    def ends(t):
        return {r.index(t) if t in r else len(r) for r in free}
    return next(t for r in free for t in r if len(ends(t)) > 1)


def decodes(generate, prompts, **options) -> list[list[int]]:
    """Tokens of ``generate`` with a dynamic cache, a static cache, no cache, and ``options`` (static); all equal."""
    runs = [generate(prompts), generate(prompts, cache="static"), generate(prompts, use_cache=False)]
    if options:
        runs.append(generate(prompts, cache="static", **options))
    assert all(run.tokens == runs[0].tokens for run in runs[1:])
    assert all(len(run.step_s) == len(runs[0].step_s) for run in runs[1:])
    return runs[0].tokens


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_decodes_like_dynamic_and_uncached_with_padding_and_early_stop(family):
    model, tok, mem = make_tiny(family)
    spread(model)
    block = mem.block(2)
    prompts = [[1, 4, 5, 6] + block * 2, [4, 5] + block, [9, 8, 7, 6, 5, 4, 3] + block * 3]  # lengths 12, 6, 19

    def generate(prompts, eos=-1, **options):
        return greedy_generate(model, prompts, tok.pad_token_id, eos, 6, **options)

    free = decodes(generate, prompts)
    assert len({tuple(t) for t in free}) > 1
    stop = varied_stop(free)
    tokens = decodes(lambda p, **o: generate(p, stop, **o), prompts, compile="eager")
    assert len({len(t) for t in tokens}) > 1  # each sequence stopped at its own EOS
    assert tokens == [greedy_generate(model, [p], tok.pad_token_id, stop, 6, cache="static").tokens[0]
                      for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["rim", "nocot", "coconut", "codi"])
def test_methods_decode_alike_with_a_static_cache_and_compiled_steps(name):
    model, tok, method = setup(name, memory_tokens=1, max_latent_steps=2, thoughts_per_step=2, latents=2)
    spread(model)
    exs = [method.tokenize(TASK, tok, Example(q, ("0",), "0")) for q in ("3 7 2 9", "5", "1 2 3 4 5 6 7")]
    prompts = [method.prompt(ex, 3) for ex in exs]

    def generate(prompts, eos=-1, **options):
        return method.generate(model, prompts, tok.pad_token_id, eos, 6, **options)

    stop = varied_stop(decodes(generate, prompts))
    tokens = decodes(lambda p, **o: generate(p, stop, **o), prompts, compile="eager")
    assert len({len(t) for t in tokens}) > 1
    method.cache, method.compile = "static", "eager"  # the method's own setting (eval.cache / eval.compile)
    assert generate(prompts, stop).tokens == tokens


def test_a_static_cache_is_reused_by_calls_of_the_same_size():
    model, _, _ = make_tiny("llama")
    first = static_cache(model, 3, 10)
    assert static_cache(model, 3, 40) is first  # one size class (multiples of 64): no new tensors to compile for
    assert static_cache(model, 2, 40) is not first and static_cache(model, 2, 100).get_max_length() == 128
    greedy_generate(model, [[1, 4, 5]], 0, -1, 3, cache="static")
    again = static_cache(model, 1, 5)
    assert int(again.get_seq_length()) == 0  # reset for the next call


def test_bad_decoding_options_are_refused():
    model, _, _ = make_tiny("gpt2")
    with pytest.raises(ValueError, match="unknown cache 'paged'"):
        greedy_generate(model, [[1, 4]], 0, 2, 3, cache="paged")
    with pytest.raises(ValueError, match="needs use_cache=True"):
        greedy_generate(model, [[1, 4]], 0, 2, 3, use_cache=False, cache="static")
    with pytest.raises(ValueError, match="compile needs cache='static'"):
        greedy_generate(model, [[1, 4]], 0, 2, 3, compile=True)
    assert load_config(None, ["eval.cache=static", "eval.compile=reduce-overhead"]).eval.compile == "reduce-overhead"
    with pytest.raises(ConfigError, match="eval.compile"):
        load_config(None, ["eval.compile=true"])
    with pytest.raises(ConfigError, match="eval.cache"):
        load_config(None, ["eval.cache=paged"])


def test_cli_decoding_flags_become_eval_overrides():
    parser = build_parser()

    def overrides(*flags):
        return decoding_overrides(parser.parse_args(["eval", "RUN", *flags]))

    assert overrides() == []
    assert overrides("--cache", "static") == ["eval.cache=static"]
    assert overrides("--compile") == ["eval.cache=static", "eval.compile=True"]  # compile needs the static cache
    assert overrides("--compile-mode", "max-autotune") == ["eval.cache=static", "eval.compile=max-autotune"]
    assert load_config(None, overrides("--compile")).eval.compile is True
    # --cache dynamic turns off a compile that the run's config sets
    assert overrides("--cache", "dynamic") == ["eval.cache=dynamic", "eval.compile=False"]
    run_config = ["eval.cache=static", "eval.compile=eager"]
    assert load_config(None, [*run_config, *overrides("--cache", "dynamic")]).eval.compile is False
    # the flag takes no value: a run directory after it stays the positional argument
    args = build_parser().parse_args(["eval", "--compile", "runs/x"])
    assert args.run == "runs/x" and decoding_overrides(args) == ["eval.cache=static", "eval.compile=True"]
    with pytest.raises(ConfigError, match="--compile-mode must be .*reduce-overhead.*, not 'fast'"):
        overrides("--compile-mode", "fast")
    bench = build_parser().parse_args(["bench", "latency", "--compile-mode", "eager"])
    assert compile_setting(bench) == "eager"


@pytest.mark.slow
def test_rim_eval_and_answer_decode_alike_with_static_cache_and_compile(tmp_path, monkeypatch, capsys):
    """A LoRA run: ``rim eval`` compiles the peft model's forward, ``rim answer`` the merged model's."""
    tok = word_tokenizer(RunningSum(digits=3).vocabulary())
    tiny_model(len(tok), "llama", layers=2, hidden=32, heads=2).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    run = tiny_run(tmp_path / "run", "rim", RIM_STAGES,
                   [f"model.name={tmp_path / 'base'}", "model.train_mode=lora", "model.lora_rank=4"])

    def predictions(*flags):
        assert main(["eval", str(run), "--device", "cpu", "--max-eval", "6", *flags]) == 0
        return (run / "eval" / "predictions.jsonl").read_text()

    assert predictions("--cache", "static") == predictions() == predictions("--compile-mode", "eager")
    capsys.readouterr()
    dynamic = [r["output"] for r in answers(monkeypatch, capsys, run)]
    assert [r["output"] for r in answers(monkeypatch, capsys, run, "--compile-mode", "eager")] == dynamic


def test_static_cache_on_a_sliding_window_model_and_an_empty_budget():
    """A model whose layers all use a sliding window (Mistral-shaped, window 8) with prompts longer than the window:
    the static cache decodes like the dynamic one and like no cache. A budget of 0 tokens gives empty outputs."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mistral", vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  num_key_value_heads=2, intermediate_size=64, max_position_embeddings=256,
                                  sliding_window=8)
    torch.manual_seed(0)
    model = spread(AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")).eval()
    prompts = [list(range(3, 23)), list(range(5, 17))]
    dynamic = greedy_generate(model, prompts, 0, -1, 10).tokens
    assert len(set(map(tuple, dynamic))) == 2 and all(len(t) == 10 for t in dynamic)
    assert greedy_generate(model, prompts, 0, -1, 10, cache="static").tokens == dynamic
    assert greedy_generate(model, prompts, 0, -1, 10, use_cache=False).tokens == dynamic
    for cache in ("dynamic", "static"):
        assert greedy_generate(model, prompts, 0, -1, 0, cache=cache).tokens == [[], []]


def test_decoding_past_learned_positions_is_a_clear_error_when_it_gets_there():
    """GPT-2's learned positions fail with an index error past n_positions: a ConfigError says so before the
    pass that would. Exactly the model's positions still decode (the last token is never fed), a decode that
    stops before the limit is not refused, and a rotary model (no position table) decodes past its number."""
    from conftest import WORDS
    from rim.config import MethodConfig
    from rim.infer.generate import learned_positions
    from rim.methods import make_method
    from rim.models.adapter import add_memory_tokens

    tok = word_tokenizer(WORDS)
    models = {family: tiny_model(len(tok), family, layers=1, hidden=16, heads=2, max_positions=12).eval()
              for family in FAMILIES}
    for model in models.values():
        add_memory_tokens(tok, model)
    gpt2, llama = models["gpt2"], models["llama"]
    assert learned_positions(gpt2) == 12 and learned_positions(llama) is None
    prompt = [1, 4, 5, 6, 7, 8, 9, 10]
    assert len(greedy_generate(gpt2, [prompt], 0, -1, 5).tokens[0]) == 5  # positions 0..11
    with pytest.raises(ConfigError, match="reached position 12 and the model has 12 positions"):
        greedy_generate(gpt2, [prompt], 0, -1, 6)
    first = greedy_generate(gpt2, [prompt], 0, -1, 1).tokens[0][0]
    assert greedy_generate(gpt2, [prompt], 0, first, 20).tokens == [[]]  # stops at once: never gets there
    assert len(greedy_generate(llama, [prompt], 0, -1, 20).tokens[0]) == 20
    rim = make_method(MethodConfig(name="rim", memory_tokens=1), tok)  # blocks of 3 tokens
    assert len(rim.decode_blocks(gpt2, [[1, 4, 5]], 2, 0, -1, 4)[0][1]) == 4  # 3 + 2 x 3 + 4 - 1 = 12
    with pytest.raises(ConfigError, match="reached position 12"):
        rim.decode_blocks(gpt2, [[1, 4, 5]], 2, 0, -1, 5)
    assert len(rim.decode_blocks(llama, [[1, 4, 5]], 2, 0, -1, 9)[0][1]) == 9
