"""The rl stage (GRPO on the answer, ``rim.train.rl``): its math against hand computations, its gradient on a tiny
model against per-sequence policy-gradient sums, the parameters it trains, its config checks and a run through it
(resume inside the stage is in tests/test_resume.py)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rim.config import ConfigError, load_config
from rim.core.grpo import group_advantages, grpo_loss, token_kl
from rim.data.tasks import RunningSum
from rim.infer.generate import greedy_generate
from rim.models.tiny import tiny_model, word_tokenizer
from rim.train import loop, optim
from rim.train.rl import GRPO, Samples, completion_batch

TINY = ["model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", "train.progress=false",
        "train.device=cpu", "train.batch_size=4", "train.log_every=1", "method.blocks=2",
        "data.options={digits: 3, n_train: 24, n_test: 8, n_valid: 8}"]
RL_STAGES = ("stages=[{name: grounding, kind: grounding, steps: 3, lr: 3e-3},"
             " {name: refinement, kind: refinement, steps: 2, lr: 1e-3},"
             " {name: rl, kind: rl, steps: 3, lr: 1e-3, group_size: 4, temperature: 1.5}]")


def test_group_advantages_by_hand():
    rewards = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1])
    # group 1: mean 1/4, unbiased std sqrt((3/4)^2 + 3 (1/4)^2) / 3) = 1/2; group 2: all equal, advantage 0
    expected = torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0])
    assert torch.allclose(group_advantages(rewards, 4, scale=False), expected)
    assert torch.allclose(group_advantages(rewards, 4), expected / (0.5 + 1e-4))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_grpo_loss_and_gradient_by_hand():
    """Two completions of 2 and 1 tokens: loss = mean over completions of the mean over their tokens of
    -A + β k3, and d loss / d logp_t = (-A_s + β (1 - exp(ref_t - logp_t))) / (N n_s)."""
    logp = torch.tensor([-0.5, -1.2, -0.1], requires_grad=True)
    ref = torch.tensor([-0.7, -1.0, -0.4])
    sequence = torch.tensor([0, 0, 1])
    adv = torch.tensor([1.5, -0.5])
    beta = 0.3
    k3 = [math.exp(r - p) - (r - p) - 1 for p, r in zip(logp.tolist(), ref.tolist())]
    by_hand = 0.5 * (0.5 * ((-1.5 + beta * k3[0]) + (-1.5 + beta * k3[1])) + (0.5 + beta * k3[2]))
    loss = grpo_loss(logp, adv, sequence, beta, ref)
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)
    loss.backward()
    n, share = 2, [2, 2, 1]
    grad = [(-adv[s].item() + beta * (1 - math.exp(r - p))) / (n * share[t])
            for t, (s, p, r) in enumerate(zip(sequence.tolist(), logp.tolist(), ref.tolist()))]
    assert torch.allclose(logp.grad, torch.tensor(grad), atol=1e-6)
    assert torch.allclose(token_kl(logp.detach(), ref), torch.tensor(k3), atol=1e-6)
    assert (token_kl(torch.randn(50), torch.randn(50)) >= 0).all()
    with pytest.raises(ValueError, match="reference"):
        grpo_loss(logp, adv, sequence, beta)


class FakeAccelerator:
    """What GRPO uses of an Accelerator, for a model that nothing wraps."""

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return torch.autocast("cpu", enabled=False)


def grpo_on_tiny(stage_overrides: str, seed: int = 0):
    cfg = load_config(None, [*TINY, "method.name=rim", f"stages=[{{name: rl, kind: rl, steps: 1, {stage_overrides}}}]"])
    from rim.methods.base import make_method, method_class
    from rim.models.load import build_model

    task = RunningSum(digits=3, n_train=24, n_test=8, n_valid=8)
    model, tokenizer, _ = build_model(cfg.model, task, seed, method_class("rim").special_tokens)
    method = make_method(cfg.method, tokenizer)
    data = [method.tokenize(task, tokenizer, ex) for ex in task.load("train")]
    model.train()
    return cfg, GRPO(cfg.stages[0], task, method, tokenizer, model, FakeAccelerator(), data), model, data


def test_grpo_gradient_equals_per_sequence_policy_gradient():
    """The batched loss (padding, kept positions, temperature, KL 0) has the gradient of
    sum_i -(A_i / (N n_i)) sum_t log softmax(logits_t / T)[y_t], each sequence run alone."""
    cfg, grpo, model, data = grpo_on_tiny("group_size: 2, kl_weight: 0.0, temperature: 0.7")
    examples = data[:2]
    prompts = [grpo.method.prompt(ex, 2) for ex in examples for _ in range(2)]
    eos = grpo.tokenizer.eos_token_id
    completions = [[5, 6, eos], [7, eos], [4], [3, 9, 9, eos]]
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0])
    grpo.sample = lambda _model, _examples: Samples(prompts, completions, rewards, [True, True, False, True])
    model.eval()  # no dropout: the two computations see the same function
    loss, tokens, stats = grpo.loss(model, examples)
    loss.backward()
    batched = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    adv = group_advantages(rewards, 2)
    total = 0.0
    for i, (p, c) in enumerate(zip(prompts, completions)):
        logits = model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)] / 0.7
        logp = torch.log_softmax(logits, -1).gather(1, torch.tensor(c)[:, None]).sum()
        total = total - adv[i] * logp / (len(completions) * len(c))
    total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(batched[name], p.grad, atol=1e-5), name
    assert stats["reward"] == 0.5 and stats["signal"] == 1.0 and stats["ended"] == 0.75
    assert tokens == 4 * max(len(p) + len(c) for p, c in zip(prompts, completions))


def test_completion_batch_keeps_the_positions_that_predict_each_completion_token():
    inputs, keep, labels, sequence = completion_batch([[1, 2, 3], [4]], [[7, 8], [9, 10, 11]], 0, "cpu")
    assert inputs["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 10, 11, 0]]
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert keep.tolist() == [2, 3, 5, 6, 7] and labels.tolist() == [7, 8, 9, 10, 11]
    assert sequence.tolist() == [0, 0, 1, 1, 1]


def test_samples_follow_the_inference_prompt_and_rewards_follow_is_correct():
    _, grpo, model, data = grpo_on_tiny("group_size: 3, temperature: 1.0")
    torch.manual_seed(0)
    samples = grpo.sample(model, data[:2])
    assert model.training  # sampling left the model as it found it
    assert samples.prompts == [grpo.method.prompt(ex, 2) for ex in data[:2] for _ in range(3)]
    eos = grpo.tokenizer.eos_token_id
    for i, (tokens, ended) in enumerate(zip(samples.completions, samples.ended)):
        assert ended == (tokens[-1:] == [eos])
        text = grpo.tokenizer.decode([t for t in tokens if t != eos], skip_special_tokens=True)
        gold = data[i // 3].example.answer
        assert samples.rewards[i].item() == float(grpo.task.is_correct(grpo.task.extract_answer(text), gold))


def test_sampling_is_greedy_at_a_vanishing_temperature_and_seeded():
    tok = word_tokenizer([str(d) for d in range(10)])
    model = tiny_model(len(tok), "llama", layers=2, hidden=32, heads=2).eval()
    prompts = [[1, 5, 6], [1, 7]]
    greedy = greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, 6).tokens
    assert greedy_generate(model, prompts, tok.pad_token_id, tok.eos_token_id, 6, temperature=1e-6).tokens == greedy
    torch.manual_seed(3)
    first = greedy_generate(model, prompts * 8, tok.pad_token_id, tok.eos_token_id, 6, temperature=2.0).tokens
    torch.manual_seed(3)
    assert greedy_generate(model, prompts * 8, tok.pad_token_id, tok.eos_token_id, 6, temperature=2.0).tokens == first
    assert len({tuple(t) for t in first}) > 2  # at temperature 2 the samples differ


def test_rl_stage_config_checks_name_the_key():
    base = [*TINY, "method.name=rim"]
    stage = "stages=[{name: rl, kind: rl, steps: 2, %s}]"
    with pytest.raises(ConfigError, match=r"stages.0.group_size"):
        load_config(None, [*base, stage % "group_size: 1"])
    with pytest.raises(ConfigError, match=r"stages.0.temperature"):
        load_config(None, [*base, stage % "temperature: 0"])
    with pytest.raises(ConfigError, match=r"stages.0.kl_weight"):
        load_config(None, [*base, stage % "kl_weight: -1"])
    with pytest.raises(ConfigError, match=r"method.readout_sees_question"):
        load_config(None, [*base, "method.readout_sees_question=false", stage % "lr: 1e-3"])
    with pytest.raises(ConfigError, match=r"stages.0.kind.*coconut"):
        load_config(None, [*TINY, "method.name=coconut", stage % "lr: 1e-3"])
    assert load_config(None, [*TINY, "method.name=nocot", stage % "lr: 1e-3"]).stages[0].kind == "rl"


@pytest.mark.slow
def test_rl_stage_trains_the_parameters_refinement_trains(tmp_path, monkeypatch):
    """A LoRA run (tiny Llama saved locally): the rl stage's optimizer holds exactly refinement's parameters, it
    changes them (and nothing frozen), its train events carry the reward, and the run evaluates as any other."""
    from rim.cli import main

    tok = word_tokenizer(RunningSum(digits=3).vocabulary())
    tiny_model(len(tok), "llama", layers=2, hidden=32, heads=2).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    trained, snapshots = {}, {}
    fresh = optim.fresh_optimizer

    def spy(model, stage, *args, **kwargs):
        opt = fresh(model, stage, *args, **kwargs)
        trained[stage.name] = [n for n, p in model.named_parameters() if p.requires_grad]
        snapshots[stage.name] = {n: p.detach().clone() for n, p in model.named_parameters()}
        return opt

    monkeypatch.setattr(optim, "fresh_optimizer", spy)
    cfg = load_config(None, [*TINY, "method.name=rim", RL_STAGES, f"model.name={tmp_path / 'base'}",
                             "model.train_mode=lora", "model.lora_rank=4", f"output_dir={tmp_path / 'run'}",
                             "stages.rl.lr=5e-2"])
    captured = {}
    original = loop.after_step

    def after_step(t, stage, *args, **kwargs):
        if stage.name == "rl":
            captured["after"] = {n: p.detach().clone() for n, p in t.model.named_parameters()}
            opt = args[0].optimizer if hasattr(args[0], "optimizer") else args[0]
            in_optimizer = {id(p) for group in opt.param_groups for p in group["params"]}
            captured["trainable"] = [(n, id(p) in in_optimizer) for n, p in t.model.named_parameters()
                                     if p.requires_grad]
        original(t, stage, *args, **kwargs)

    monkeypatch.setattr(loop, "after_step", after_step)
    sample = GRPO.sample

    def varied(self, model, examples):  # a random model's answers are all wrong: give every group a signal
        out = sample(self, model, examples)
        out.rewards = torch.arange(len(out.rewards)).remainder(2).float()
        return out

    monkeypatch.setattr(GRPO, "sample", varied)
    run = loop.train(cfg)
    assert trained["rl"] == trained["refinement"] and any("lora" in n for n in trained["rl"])
    # after rl steps (with the KL reference swapped in and out) the model still trains the optimizer's own tensors
    assert captured["trainable"] == [(n, True) for n in trained["rl"]]
    before, after = snapshots["rl"], captured["after"]
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and changed <= set(trained["rl"])
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rl_events = [e for e in events if e["event"] == "train" and e["stage"] == "rl"]
    assert [e["reward"] for e in rl_events] == [0.5] * 3
    assert rl_events[0]["kl"] < 1e-9 < rl_events[-1]["kl"]  # the policy starts as its reference, then moves away
    assert "== stage rl (rl)" in (run / "layout.txt").read_text()
    assert main(["eval", str(run), "--device", "cpu", "--max-eval", "4"]) == 0
    assert json.loads((run / "eval" / "results.json").read_text())["n"] == 4


@pytest.mark.slow
def test_rl_cpu_comparison_script_smoke(tmp_path):
    """bench/rl_cpu.py (the issue's CPU comparison) with --smoke: base, refine and rl arms train, are scored on valid
    and test, and land in the report; run again, it only reads what finished."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "bench" / "rl_cpu.py"
    cmd = [sys.executable, str(script), "--smoke", "--out", str(tmp_path), "--seeds", "0", "--variants", "demo",
           "--extra", "2", "--jobs", "1"]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    report = json.loads((tmp_path / "report.json").read_text())
    assert sorted(report) == ["demo/base-s0", "demo/refine-s0", "demo/rl-s0"]
    for scores in report.values():
        assert 0 <= scores["test"]["final_block_accuracy"] <= 1 and len(scores["test"]["block_accuracy"]) == 8
    assert report["demo/rl-s0"]["stages"]["rl"]["steps"] == 2 and "reward" in report["demo/rl-s0"]["stages"]["rl"]
    assert report["demo/refine-s0"]["stages"]["refinement"]["steps"] == 2
    assert "| demo | rl | 1 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "report.png").stat().st_size > 10_000
    logs = {p.name: p.read_text() for p in (tmp_path / "demo").glob("*.log")}
    again = subprocess.run(cmd, check=True, capture_output=True, text=True)
    assert {p.name: p.read_text() for p in (tmp_path / "demo").glob("*.log")} == logs  # nothing trained or scored
    assert "demo/rl-s0: valid" in again.stdout
    subprocess.run([*cmd, "--time-steps", "1"], check=True, capture_output=True, text=True)
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert sorted(timing) == ["demo/refine", "demo/rl"] and all(t["s_per_step"] > 0 for t in timing.values())
