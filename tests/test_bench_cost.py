"""`rim bench epoch` and `rim bench sweep` on the tiny shape: the numbers each row is made of, and the layouts
timed being each method's own (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest

from rim.bench import SHAPES, Shape
from rim.bench.cost import CostSettings, bench_epoch, epoch_ratios, real_tokens, sampled_batches
from rim.bench.report import ratios
from rim.cli import main
from rim.config import load_config
from rim.data.tasks import make_task
from rim.methods.base import make_method

pytestmark = pytest.mark.slow

TASK = "data: {task: running-sum, options: {digits: 4, n_train: 40}}\nmodel: {name: tiny, train_mode: full}\n"
RECIPES = {
    "rim": "method: {name: rim, memory_tokens: 2, blocks: 3}\nstages:\n"
           "  - {name: grounding, kind: grounding, epochs: 3}\n  - {name: refinement, kind: refinement, epochs: 1}\n",
    "cot": "method: {name: cot}\nstages: [{name: sft, kind: sft, epochs: 2}]\n",
    "coconut": "method: {name: coconut, thoughts_per_step: 1, max_latent_steps: 4}\nstages:\n"
               "  - {name: s0, kind: latent, latent_steps: 0, epochs: 1}\n"
               "  - {name: s4, kind: latent, latent_steps: 4, epochs: 1}\n",
    "icot": "method: {name: icot, remove_per_epoch: 8.0}\nstages: [{name: sft, kind: sft, epochs: 2}]\n",
    "codi": "method: {name: codi, latents: 2, step_supervision: true}\nstages: [{name: sft, kind: sft, epochs: 1}]\n",
}


@pytest.fixture
def small_tiny(monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 2, 32, 4, 2, 64, 256))


def write_recipes(tmp_path) -> tuple[str, ...]:
    paths = []
    for name, text in RECIPES.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(TASK + text)
        paths.append(str(path))
    return tuple(paths)


def test_epoch_cost_times_every_stage_of_every_recipe_on_its_own_layouts(tmp_path, small_tiny):
    s = CostSettings(recipes=write_recipes(tmp_path), task="running-sum", split="train", batch=4, samples=2,
                     warmup=1, max_examples=12)
    import torch

    out = bench_epoch("tiny", torch.device("cpu"), s, "full")
    task = make_task("running-sum", {})
    n = len(task.load("train"))
    assert out["examples"] == n and list(out["methods"]) == list(RECIPES)
    assert all("error" not in row for row in out["methods"].values())  # CODI with its projection and SIM-CoT too
    batches = sampled_batches(12, 4, 3, 0)
    for path in s.recipes:
        cfg = load_config(path)
        row = out["methods"][cfg.method.name]
        assert list(row["stages"]) == [st.name for st in cfg.stages]
        for stage in cfg.stages:
            st = row["stages"][stage.name]
            assert st["steps_per_epoch"] == math.ceil(n / 4)
            assert st["epoch_s"] == pytest.approx(st["step_ms"] / 1e3 * st["steps_per_epoch"])
        weights = [st.epochs for st in cfg.stages]
        assert row["epoch_s"] == pytest.approx(sum(row["stages"][st.name]["epoch_s"] * w for st, w in
                                                   zip(cfg.stages, weights)) / sum(weights))
    # the tokens timed are each method's own layouts of the same sampled problems (the static methods: exactly)
    from rim.bench.cost import load_tokenizer

    problems = task.load("train")[:12]
    tokenizer = load_tokenizer(s, task, ("<b>", "<m>", "</b>", "<bot>", "<thought>", "<eot>"))
    for path in s.recipes[:3]:
        cfg = load_config(path)
        method = make_method(cfg.method, tokenizer)
        examples = [method.tokenize(task, tokenizer, ex) for ex in problems]
        for stage in cfg.stages:
            per_batch = [sum(len(method.train_layout(examples[j], stage)) for j in idx) for idx in batches[1:]]
            assert out["methods"][cfg.method.name]["stages"][stage.name]["tokens_per_step"] == pytest.approx(
                sum(per_batch) / len(per_batch))
            collated = method.collate([method.train_layout(examples[j], stage) for j in batches[1]], 0)
            assert real_tokens(collated) == per_batch[0]
    assert out["ratios"] == epoch_ratios(out["methods"]) and set(out["ratios"]) == {"epoch_rim_over_cot",
                                                                                   "epoch_coconut_over_rim"}


def test_bench_epoch_and_sweep_commands_write_their_tables(tmp_path, small_tiny):
    recipes = ",".join(write_recipes(tmp_path)[:2])
    assert main(["bench", "epoch", "--shape", "tiny", "--device", "cpu", "--recipes", recipes, "--epoch-task",
                 "running-sum", "--epoch-split", "train", "--epoch-examples", "8", "--train-batch", "4",
                 "--repeats", "1", "--warmup", "0", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench-tiny-epoch.json").read_text())
    assert results["ratios"]["epoch_rim_over_cot"] == pytest.approx(
        results["epoch"]["methods"]["rim"]["epoch_s"] / results["epoch"]["methods"]["cot"]["epoch_s"])
    assert "epoch_rim_over_cot <= 1.5" in (tmp_path / "bench-tiny-epoch.md").read_text()
    assert main(["bench", "sweep", "--shape", "tiny", "--device", "cpu", "--sweep-batches", "2,3",
                 "--question-tokens", "12", "--repeats", "1", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench-tiny-sweep.json").read_text())
    sweep, peak = results["sweep"], results["matmul"]["flops"]
    assert set(sweep["rows"]) == {f"{n}_b{b}" for n in ("plain", "rim_supervised") for b in (2, 3)}
    assert sweep["largest_batch_plain"] == sweep["largest_batch_rim_supervised"] == 3
    for row in sweep["rows"].values():
        assert row["mfu_measured"] == pytest.approx(6 * sweep["parameters"] * row["tokens_per_s"] / peak)
    assert sweep["rows"]["plain_b3"]["tokens"] == 3 * sweep["rows"]["plain_b2"]["tokens"] // 2


def test_masked_pass_targets_are_shares_of_the_token_bound():
    out = ratios({"train": {"masked_vs_separate": {"separate_ms": 60.0, "one_masked_ms": 10.0,
                                                   "separate_tokens": 620, "masked_tokens": 100},
                            "masked_vs_separate_train": {"separate_ms": 50.0, "one_masked_ms": 10.0}}})
    assert out["masked_over_separate_of_bound"] == pytest.approx(6.0 / 6.2)
    assert out["masked_over_separate_train_of_bound"] == pytest.approx(5.0 / 6.2)
