"""The peer methods as plug-ins: layouts on a small example, latent passes, generation with and without cache,
batch against single examples, and one short training run of every method."""

from __future__ import annotations

import json
import random
import statistics

import pytest
import torch

from conftest import FAMILIES, WINDOWED, WORDS, make_windowed
from rim.config import MethodConfig, StageConfig, load_config
from rim.core.batch import collate
from rim.core.layout import BLOCK, READOUT, Readout, build_layout
from rim.core.mask import attention_mask
from rim.data.tasks import Example, RunningSum
from rim.methods import METHODS, make_method
from rim.methods.coconut import BOT, EOT, THOUGHT, latent_forward
from rim.methods.icot import removal_offset
from rim.models.adapter import add_tokens
from rim.models.tiny import tiny_model, word_tokenizer

TASK = RunningSum(digits=4)
EXAMPLE = Example("3 7 2 9", ("3", "0", "2", "1"), "1")
SFT = StageConfig(name="sft", kind="sft", steps=1)


def setup(name: str, family: str = "llama", attn: str = "sdpa", **cfg):
    """(model, tokenizer, method) on a tiny random model (attention backend ``attn``) with the method's tokens
    added."""
    tok = word_tokenizer(WORDS)
    model = tiny_model(len(tok), family, layers=2, hidden=32, heads=4, attn_implementation=attn, seed=0)
    add_tokens(tok, model, METHODS[name].special_tokens)
    method = make_method(MethodConfig(name=name, **cfg), tok)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        method.extend_model(model)  # a method's own modules (CODI's projection)
    return model.eval(), tok, method


def words(tok, ids):
    return tok.convert_ids_to_tokens(ids)


def test_every_method_is_registered():
    assert {"nocot", "cot", "rim", "pause", "coconut", "codi", "icot"} <= set(METHODS)


def test_pause_layout_is_causal_with_n_pauses_and_answer_only_loss():
    _, tok, method = setup("pause", blocks=2, memory_tokens=1)  # default N = K (M + 2) = 6
    ex = method.tokenize(TASK, tok, EXAMPLE)
    layout = method.train_layout(ex, SFT)
    assert words(tok, layout.input_ids) == words(tok, ex.question) + ["<pause>"] * 6 + ["1"]
    assert [t for t in layout.labels if t != -100] == ex.answer + [tok.eos_token_id]
    seg, idx = torch.tensor([layout.segment]), torch.tensor([layout.index])
    assert torch.equal(attention_mask(seg, idx)[0], torch.ones(len(layout), len(layout)).tril().bool())
    assert method.prompt(ex, blocks=5) == ex.question + [tok.convert_tokens_to_ids("<pause>")] * 6
    _, _, three = setup("pause", pause_tokens=3)
    assert words(tok, three.prompt(ex, 8)).count("<pause>") == 3


def test_icot_removes_reasoning_from_the_front_over_training():
    _, tok, method = setup("icot", remove_per_epoch=2.0, remove_smoothing=None)
    ex = method.tokenize(TASK, tok, EXAMPLE)
    assert words(tok, ex.extra["reasoning"] + ex.extra["tail"]) == words(tok, ex.cot)  # " 3 0 2 1 #### 1"

    def readout(epoch):
        layout = method.train_layout(ex, SFT, epoch)
        return words(tok, [t for t, s in zip(layout.input_ids, layout.segment) if s == READOUT])

    assert readout(0.0) == ["3", "0", "2", "1", "####", "1"]
    assert readout(0.49) == readout(0.0)
    assert readout(0.5) == ["0", "2", "1", "####", "1"]  # Δ = 2 per epoch: one token per half epoch
    assert readout(1.0) == ["2", "1", "####", "1"]
    assert readout(2.0) == readout(9.0) == ["####", "1"]  # everything removed: the answer after the separator


def test_icot_removal_smoothing_is_geometric():
    rng = random.Random(0)
    draws = [removal_offset(rng, 1.0) for _ in range(20000)]
    q = torch.exp(torch.tensor(-1.0)).item()  # P(o >= 1) = e^-λ
    assert abs(statistics.mean(draws) - q / (1 - q)) < 0.03
    assert abs(sum(d == 0 for d in draws) / len(draws) - (1 - q)) < 0.01


def coconut_stage(k):
    return StageConfig(name=f"s{k}", kind="latent", steps=1, latent_steps=k)


def test_coconut_layouts_replace_steps_with_thoughts_stage_by_stage():
    _, tok, method = setup("coconut", thoughts_per_step=2, max_latent_steps=2)
    ex = method.tokenize(TASK, tok, EXAMPLE)

    def parts(k):
        layout = method.train_layout(ex, coconut_stage(k))
        block = words(tok, [t for t, s in zip(layout.input_ids, layout.segment) if s == BLOCK])
        readout = words(tok, [t for t, s in zip(layout.input_ids, layout.segment) if s == READOUT])
        return block, readout

    assert parts(0) == ([BOT, EOT], ["3", "0", "2", "1", "####", "1"])  # stage 0: CoT in Coconut's format
    assert parts(1) == ([BOT, THOUGHT, THOUGHT, EOT], ["0", "2", "1", "####", "1"])
    assert parts(2) == ([BOT] + [THOUGHT] * 4 + [EOT], ["2", "1", "####", "1"])  # the maximum: 2 steps replaced
    assert parts(3) == ([BOT] + [THOUGHT] * 4 + [EOT], ["####", "1"])  # beyond it: every language step dropped
    assert parts(5) == parts(3)
    assert words(tok, method.prompt(ex, 8)) == words(tok, ex.question) + [BOT]


def reference_latent_logits(model, ids: list[int], first_thought: int, n: int) -> torch.Tensor:
    """One unpadded sequence, thoughts filled one at a time by full recomputation (the definition)."""
    embeds = model.get_input_embeddings()(torch.tensor([ids]))
    for j in range(n):
        col = first_thought + j
        hidden = model(inputs_embeds=embeds[:, :col], output_hidden_states=True).hidden_states[-1]
        embeds = torch.cat([embeds[:, :col], hidden[:, -1:], embeds[:, col + 1:]], dim=1)
    return model(inputs_embeds=embeds).logits[0]


@pytest.mark.parametrize("family", FAMILIES)
def test_coconut_batched_cached_passes_equal_the_definition(family):
    model, tok, method = setup("coconut", family, thoughts_per_step=2, max_latent_steps=2)
    examples = [method.tokenize(TASK, tok, e) for e in (EXAMPLE, Example("5 1", ("5", "6"), "6"))]
    layouts = [method.train_layout(ex, coconut_stage(1)) for ex in examples]
    batch = method.collate(layouts, tok.pad_token_id)
    assert int(batch["n_latent"]) == 2
    cols = batch["input_ids"][:, int(batch["latent_start"])]
    assert (cols == tok.convert_tokens_to_ids(THOUGHT)).all()  # thought 1 in one column for the whole batch
    with torch.no_grad():
        cached, uncached = latent_forward(model, batch), latent_forward(model, batch, use_cache=False)
    assert torch.allclose(cached, uncached, atol=1e-5)
    for row, (ex, layout) in enumerate(zip(examples, layouts)):
        with torch.no_grad():
            ref = reference_latent_logits(model, layout.input_ids, len(ex.question) + 1, 2)
        real = batch["attention_mask"][row].bool()
        assert torch.allclose(cached[row][real], ref, atol=1e-5)
    # the thoughts matter: the same tokens without feeding hidden states back give other logits
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      position_ids=batch["position_ids"]).logits
    assert not torch.allclose(plain, cached, atol=1e-3)


def test_coconut_gradients_flow_through_every_thought():
    model, tok, method = setup("coconut", thoughts_per_step=2, max_latent_steps=2)
    model.train()
    ex = method.tokenize(TASK, tok, EXAMPLE)
    batch = method.collate([method.train_layout(ex, coconut_stage(2))], tok.pad_token_id)
    grads = []
    for use_cache in (True, False):
        model.zero_grad()
        logits = latent_forward(model, batch, use_cache)
        torch.nn.functional.cross_entropy(logits[0], batch["labels"][0], ignore_index=-100).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


@pytest.mark.parametrize("name", ["coconut", "codi", "pause", "icot"])
def test_generation_cached_equals_uncached_and_batch_equals_singles(name):
    model, tok, method = setup(name, max_latent_steps=2, thoughts_per_step=2, latents=3)
    exs = [method.tokenize(TASK, tok, Example(q, ("0",), "0")) for q in ("3 7 2 9", "5", "1 2 3 4 5 6 7")]
    prompts = [method.prompt(ex, 4) for ex in exs]
    pad = tok.pad_token_id
    eos = tok.convert_tokens_to_ids("?")  # a random model rarely emits EOS; any fixed id works as a stop token
    cached = method.generate(model, prompts, pad, eos, 6)
    assert cached.tokens == method.generate(model, prompts, pad, eos, 6, use_cache=False).tokens
    assert cached.tokens == [method.generate(model, [p], pad, eos, 6).tokens[0] for p in prompts]
    assert len(cached.step_s) >= 1


def test_coconut_generation_starts_after_the_thoughts():
    model, tok, method = setup("coconut", max_latent_steps=1, thoughts_per_step=3)
    ex = method.tokenize(TASK, tok, EXAMPLE)
    gen = method.generate(model, [method.prompt(ex, 8)], tok.pad_token_id, -1, 1)  # -1: no stop token
    ids = method.prompt(ex, 8) + [tok.convert_tokens_to_ids(THOUGHT)] * 3 + [tok.convert_tokens_to_ids(EOT)]
    with torch.no_grad():
        ref = reference_latent_logits(model, ids, len(ex.question) + 1, 3)
    assert gen.tokens[0] == [int(ref[-1].argmax())]


def test_coconut_with_no_thoughts_at_inference_feeds_eot_like_stage_0():
    model, tok, method = setup("coconut", max_latent_steps=2, inference_latent_steps=0)
    ex = method.tokenize(TASK, tok, EXAMPLE)
    gen = method.generate(model, [method.prompt(ex, 8)], tok.pad_token_id, -1, 1)
    ids = method.prompt(ex, 8) + [tok.convert_tokens_to_ids(EOT)]
    with torch.no_grad():
        assert gen.tokens[0] == [int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())]


def tiny_config(method: str, stages: list[str], tmp_path, extra=()):
    return load_config(None, [
        "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", f"method.name={method}",
        "data.options={n_train: 64, n_test: 8, n_valid: 8}", f"stages=[{', '.join(stages)}]",
        "train.batch_size=16", "train.progress=false", "train.device=cpu", "eval.latency_examples=1",
        f"output_dir={tmp_path / method}", *extra])


@pytest.mark.parametrize("method,stages,extra", [
    ("pause", ["{name: sft, kind: sft, steps: 2}"], []),
    ("icot", ["{name: sft, kind: sft, epochs: 2}"], ["method.remove_per_epoch=2"]),
    ("coconut", ["{name: s0, kind: latent, steps: 2, latent_steps: 0}",
                 "{name: s1, kind: latent, steps: 2, latent_steps: 1}"], ["method.max_latent_steps=1"]),
])
@pytest.mark.slow
def test_each_method_trains_and_evaluates(tmp_path, method, stages, extra):
    from rim.eval.run import eval_run
    from rim.train.loop import train

    run = train(tiny_config(method, stages, tmp_path, extra))
    metrics = eval_run(run).metrics
    assert metrics["method"] == method and metrics["n"] == 8 and metrics["ttft_ms"] > 0
    assert metrics["any_block_accuracy"] is None
    layout = (run / "layout.txt").read_text()
    assert {"pause": "<pause>", "icot": "####", "coconut": "<thought>"}[method] in layout


@pytest.mark.slow
def test_coconut_starts_from_a_trained_cot_run(tmp_path):
    from rim.eval.run import load_run
    from rim.train.loop import train

    cot = train(tiny_config("cot", ["{name: sft, kind: sft, steps: 2}"], tmp_path))
    cfg = tiny_config("coconut", ["{name: s1, kind: latent, steps: 1, latent_steps: 1}"], tmp_path,
                      [f"model.init_from={cot}", "method.max_latent_steps=1", "stages.s1.lr=1e-9"])
    run = train(cfg)
    _, cot_model, _, _, _ = load_run(cot, device="cpu")
    _, coconut_model, tok, _, _ = load_run(run, device="cpu")
    name = "model.layers.0.self_attn.q_proj.weight"
    before, after = dict(cot_model.named_parameters())[name], dict(coconut_model.named_parameters())[name]
    assert torch.allclose(before, after, atol=1e-5)  # started from the CoT weights (lr ~ 0)
    assert tok.convert_tokens_to_ids([BOT, THOUGHT, EOT]) == [len(tok) - 3, len(tok) - 2, len(tok) - 1]


@pytest.mark.slow
def test_coconut_decodes_every_checkpoint_in_the_runs_final_form(tmp_path, monkeypatch):
    """Selection and every checkpoint (also one from stage 0, which would otherwise be scored as CoT and could be
    picked as Coconut's) decode with the thoughts of the run's last stage, not the maximum; rim.json names the stage
    a checkpoint comes from and the reasoning room of the budget; method.inference_latent_steps overrides."""
    from rim.eval.run import load_run
    from rim.methods.coconut import Coconut
    from rim.train.loop import train

    seen = []
    original = Coconut.generate
    monkeypatch.setattr(Coconut, "generate", lambda self, *a, **k: seen.append(self.inference_thoughts())
                        or original(self, *a, **k))
    stages = [f"{{name: s{k}, kind: latent, steps: 2, latent_steps: {k}}}" for k in range(2)]
    run = train(tiny_config("coconut", stages, tmp_path, ["method.max_latent_steps=2", "eval.select_split=valid",
                                                           "eval.every=2", "train.save_every=2"]))
    assert seen == [2, 2]  # the last stage's 1 step x c = 2 thoughts (the maximum would be 4)
    for name, stage in [("checkpoints/step-2", 0), ("checkpoints/step-4", 1), ("checkpoint", 1)]:
        meta = json.loads((run / name / "rim.json").read_text())
        assert meta["stage"] == stage and meta["reasoning"] > 0
        assert load_run(run, "cpu", name)[3].inference_thoughts() == 2
    assert load_run(run, "cpu", "checkpoints/step-2", ["method.inference_latent_steps=2"])[3].inference_thoughts() == 4


def test_stage_kinds_are_checked_per_method():
    from rim.config import ConfigError

    with pytest.raises(ConfigError, match="one of latent for coconut"):
        load_config(None, ["method.name=coconut", "stages=[{name: a, kind: sft, steps: 1}]"])
    with pytest.raises(ConfigError, match="method.name"):
        load_config(None, ["method.name=colar"])


def spread(model, std: float = 0.3):
    """Larger random weights: greedy outputs that depend on the input (not one token repeated)."""
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for p in model.parameters():
            p.normal_(0, std)
    return model


def varied_stop(readouts: list[list[list[int]]]) -> int:
    """A generated token that, as the stop token, ends the readouts at different steps."""
    flat = [r for rs in readouts for r in rs]

    def ends(t):
        return {r.index(t) if t in r else len(r) for r in flat}
    return next(t for r in flat for t in r if len(ends(t)) > 1)


@pytest.mark.parametrize("family", FAMILIES)
def test_rim_reads_all_blocks_from_one_cached_prefill_like_k_decodes(family):
    from rim.methods.base import Method

    model, tok, method = setup("rim", family, memory_tokens=1)
    spread(model)
    exs = [method.tokenize(TASK, tok, Example(q, ("0",), "0")) for q in ("3 7 2 9", "5", "1 2 3 4 5 6 7")]
    free = method.block_readouts(model, exs, 4, tok.pad_token_id, -1, 6, batch_size=2)  # -1: no stop token
    assert free == Method.block_readouts(method, model, exs, 4, tok.pad_token_id, -1, 6, batch_size=2)
    assert len({tuple(map(tuple, r)) for r in free}) > 1  # not a degenerate all-equal output
    # a generated token as the stop token, chosen so that readouts end at different steps, each on its own
    stop = varied_stop(free)
    together = method.block_readouts(model, exs, 4, tok.pad_token_id, stop, 6, batch_size=2)
    assert together == Method.block_readouts(method, model, exs, 4, tok.pad_token_id, stop, 6, batch_size=2)
    assert len({len(r) for rs in together for r in rs}) > 1


@torch.no_grad()
def masked_decodes(method, model, questions: list[list[int]], blocks: int, eos_id: int,
                   max_new_tokens: int) -> list[list[list[int]]]:
    """The definition of the readouts: readout k of each question alone, greedy, every token from a full pass over
    ``x m_1 .. m_k r_k`` under the RiM mask and position ids (the method's ``readout_sees_question``); no cache,
    no padding, no other readout in the sequence."""
    out = []
    for q in questions:
        out.append([])
        for k in range(1, blocks + 1):
            readout: list[int] = []
            while len(readout) < max_new_tokens:
                layout = build_layout(q, [method.block] * k, [Readout([])] * (k - 1) + [Readout(readout)], eos_id)
                token = int(method.forward(model, collate([layout], 0))[0, -1].argmax())
                if token == eos_id:
                    break
                readout.append(token)
            out[-1].append(readout)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("sees_question", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_rim_cached_block_readouts_follow_the_mask_and_positions(family, sees_question, attn):
    """Questions of different lengths in one padded batch, more examples than ``batch_size``, readouts that stop
    at their own EOS: every readout equals the definition and K decodes (dynamic and static cache)."""
    from rim.methods.base import Method

    model, tok, method = setup("rim", family, attn, memory_tokens=2, readout_sees_question=sees_question)
    spread(model)
    exs = [method.tokenize(TASK, tok, Example(q, ("0",), "0")) for q in ("3 7 2 9", "5", "1 2 3 4 5 6 7", "8 8")]
    questions, pad = [ex.question for ex in exs], tok.pad_token_id
    free = method.block_readouts(model, exs, 4, pad, -1, 5, batch_size=3)
    assert free == masked_decodes(method, model, questions, 4, -1, 5)
    assert all(len(r) == 5 for rs in free for r in rs)
    assert len({tuple(rs[0]) for rs in free}) > 1 and any(len({tuple(r) for r in rs}) > 1 for rs in free)
    _, _, other = setup("rim", family, attn, memory_tokens=2, readout_sees_question=not sees_question)
    assert other.block_readouts(model, exs, 4, pad, -1, 5, batch_size=3) != free  # the flag matters here
    stop = varied_stop(free)
    stopped = method.block_readouts(model, exs, 4, pad, stop, 5, batch_size=3)
    assert stopped == masked_decodes(method, model, questions, 4, stop, 5)
    assert len({len(r) for rs in stopped for r in rs}) > 1
    # K decodes through RiM.generate, which hides the question from the answer when training did
    assert stopped == Method.block_readouts(method, model, exs, 4, pad, stop, 5, batch_size=3)
    prompts = [method.prompt(ex, 3) for ex in exs]
    assert method.generate(model, prompts, pad, stop, 5, cache="static").tokens == [rs[2] for rs in stopped]
    assert method.block_readouts(model, exs, 4, pad, stop, 1, batch_size=3) == [[r[:1] for r in rs] for rs in stopped]
    assert method.block_readouts(model, exs, 4, pad, stop, 0, batch_size=3) == [[[]] * 4] * 4
    # a static cache (one shape for every step), with the steps compiled: the same readouts
    method.cache, method.compile = "static", "eager"  # eval.cache / eval.compile
    assert method.block_readouts(model, exs, 4, pad, -1, 5, batch_size=3) == free
    assert method.block_readouts(model, exs, 4, pad, stop, 5, batch_size=3) == stopped


def test_only_prompt_plus_plain_decoding_counts_as_plain():
    """What ``rim export`` may write as a stock checkpoint: not Coconut, not RiM whose answer must not see the
    question."""
    assert all(setup(name)[2].plain_decoding() is None for name in ("nocot", "cot", "pause", "icot", "rim"))
    assert "readout_sees_question" in setup("rim", readout_sees_question=False)[2].plain_decoding()
    assert "hidden states" in setup("coconut")[2].plain_decoding()
    assert "hidden states" in setup("codi")[2].plain_decoding()


@pytest.mark.parametrize("sees_question", [True, False])
@pytest.mark.parametrize("kind", WINDOWED)
def test_rim_cached_block_readouts_past_a_sliding_window(kind, sees_question):
    """A model with sliding-window layers, whose cache would keep only the window, and readouts past it: the
    all-block readouts apply the windows by position (as training does) and equal K separate decodes, where the
    model applies them itself."""
    from rim.methods.base import Method

    model, tok, _ = make_windowed(kind, window=6)
    method = make_method(MethodConfig(name="rim", memory_tokens=2, readout_sees_question=sees_question), tok)
    spread(model, 0.05 if kind == "gemma3_text" else 0.3)  # Gemma's (1 + w) norms saturate at 0.3
    exs = [method.tokenize(TASK, tok, Example(q, ("0",), "0")) for q in ("3 7 2 9", "5", "1 2 3 4 5 6 7")]
    readouts = method.block_readouts(model, exs, 4, tok.pad_token_id, -1, 4, batch_size=3)
    assert readouts == masked_decodes(method, model, [ex.question for ex in exs], 4, -1, 4)
    assert readouts == Method.block_readouts(method, model, exs, 4, tok.pad_token_id, -1, 4, batch_size=3)
    assert len({tuple(map(tuple, r)) for r in readouts}) > 1
    method.cache = "static"  # every layer of the static cache keeps every column; the masks apply the windows
    assert method.block_readouts(model, exs, 4, tok.pad_token_id, -1, 4, batch_size=3) == readouts


@pytest.mark.parametrize("name", ["rim", "pause", "coconut"])
def test_token_strings_in_the_data_are_text(name):
    """A question, step or answer holding a special token's string (HTML's ``<b>`` is RiM's block token) is
    tokenized as that text, in plain and chat prompts: the data can never inject a method's tokens. The chat
    template's own markers stay special tokens."""
    _, tok, method = setup(name)
    tok.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|bot|>"]}, replace_extra_special_tokens=False)
    tok.chat_template = "<s> <|user|> {{ messages[0]['content'] | trim }} <|bot|>"
    bos, unk, user, bot, three, seven = tok.convert_tokens_to_ids(["<s>", "<unk>", "<|user|>", "<|bot|>", "3", "7"])
    hostile = "3 " + " ".join(METHODS[name].special_tokens) + " 7"  # a word tokenizer splits them to <unk>
    text = [three, *[unk] * len(METHODS[name].special_tokens), seven]
    ex = method.tokenize(TASK, tok, Example(hostile, (hostile,), hostile), "plain")
    assert ex.question == [bos, *text] and ex.steps == [text] and ex.answer == text
    assert not set(method.token.values()) & set(ex.cot)
    assert method.tokenize(TASK, tok, Example(hostile, ("1",), "1"), "chat").question == [bos, user, *text, bot]
    # without such strings the whole chat prompt is tokenized at once, to the same ids
    chat = method.tokenize(TASK, tok, Example("3 7", ("1",), "1"), "chat").question
    assert chat == [bos, user, three, seven, bot]


def test_generated_tokens_count_an_eos_only_when_one_was_generated():
    from rim.eval.evaluate import score

    model, tok, method = setup("nocot")
    spread(model)
    exs = [method.tokenize(TASK, tok, Example(q, ("0",), "0")) for q in ("3 7 2 9", "5", "1 2 3 4 5 6 7")]
    outputs = method.decode(model, [method.prompt(ex, 1) for ex in exs], tok.pad_token_id, tok.eos_token_id, 3, 3)
    assert any(len(o) == 3 for o in outputs)  # stopped by the budget of 3, with no EOS
    records = score(model, tok, TASK, method, exs, 1, 3, 3, False)
    assert [r["generated_tokens"] for r in records] == [3 if len(o) == 3 else len(o) + 1 for o in outputs]
