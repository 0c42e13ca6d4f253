"""``rim plot`` and ``rim analyze`` on one tiny RiM run (trained once for the module), the ranking metrics against
hand-computed values, and the probe on data it must separate."""

from __future__ import annotations

import doctest
import json

import pytest
import torch

import rim.analyze
import rim.plots
from rim.analyze import auprc, auroc, block_ends, fit_probe
from rim.cli import main
from rim.config import load_config
from rim.rundir import RunDir

PNG = b"\x89PNG\r\n\x1a\n"


def tiny_run(method: str, stages: list[str], out, extra=()):
    from rim.train.loop import train

    return train(load_config(None, [
        "model.tiny_layers=2", "model.tiny_hidden=32", "model.tiny_heads=2", f"method.name={method}",
        "method.blocks=4", "data.options={n_train: 64, n_test: 16, n_valid: 16}", f"stages=[{', '.join(stages)}]",
        "train.batch_size=16", "train.progress=false", "train.device=cpu", "train.log_every=1",
        "eval.latency_examples=1", f"output_dir={out / method}", *extra]))


@pytest.fixture(scope="module")
def rim_run(tmp_path_factory):
    """Grounding 2 steps, refinement 3, a checkpoint every 2 and at stage ends: checkpoints/step-2, step-4, step-5
    (the final weights again) and checkpoint."""
    return tiny_run("rim", ["{name: grounding, kind: grounding, steps: 2}",
                            "{name: refinement, kind: refinement, steps: 3}"],
                    tmp_path_factory.mktemp("runs"), ["train.save_every=2"])


def is_png(path) -> bool:
    """A PNG that decodes to a real plot: a few hundred pixels a side, a white background with drawn pixels on
    it (axes, text, curves or bars: many of them, in several colours), not one flat colour."""
    from matplotlib.image import imread

    if path.read_bytes()[:8] != PNG:
        return False
    rgb = imread(path)[..., :3]  # (H, W, 3) floats in [0, 1]
    drawn = (rgb < 0.9).any(-1).mean()  # fraction of pixels that are not (near) white
    colours = len({tuple(p) for p in (rgb[::4, ::4] * 255).round().reshape(-1, 3).tolist()})
    return min(rgb.shape[:2]) >= 300 and 0.01 < drawn < 0.9 and colours >= 8


def test_doctests_of_plots_and_analyze():
    for module in (rim.plots, rim.analyze):
        assert doctest.testmod(module).failed == 0


def test_ranking_metrics_against_hand_computed_values():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([1, 2, 3], [0, 1, 1]) == 1.0 and auroc([3, 2, 1], [0, 1, 1]) == 0.0
    assert auroc([0.5] * 4, [1, 0, 1, 0]) == 0.5  # all tied: every pair counts one half
    assert auroc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1]) == 0.75
    assert auroc([0.2, 0.3], [1, 1]) is None and auprc([0.2, 0.3], [0, 0]) is None
    assert auprc([1, 2, 3], [0, 1, 1]) == 1.0
    assert auprc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert auprc([0.5, 0.5, 0.5, 0.9], [1, 0, 0, 1]) == 0.75  # the tied three are one threshold: precision 2/4
    assert auprc([0.5] * 4, [1, 0, 1, 0]) == 0.5  # one threshold: the base rate
    assert auprc([0.9, 0.8, 0.7], [0, 1, 0]) == 0.5  # 1 x 1/2


def test_probe_separates_separable_data_and_falls_back_to_the_base_rate():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(200, 8, generator=gen)
    y = x[:, 3] + 0.1 * x[:, 5] > 0
    probe = fit_probe(x[:100], y[:100], l2=0.01)
    assert auroc(probe.predict(x[100:]).tolist(), y[100:].tolist()) > 0.97
    constant = fit_probe(x[:10], torch.ones(10, dtype=torch.bool)).predict(x[10:20])
    assert torch.allclose(constant, torch.full((10,), 10.5 / 11, dtype=torch.float64))


@pytest.mark.slow
def test_block_ends_point_at_the_closing_token(rim_run):
    from rim.eval.run import load_run
    from rim.infer.generate import left_pad

    _, _, tok, method, task = load_run(rim_run, device="cpu")
    exs = [method.tokenize(task, tok, ex) for ex in task.load("valid")[:2]]
    longer = exs[1].question[:1] + method.prompt(exs[1], 3)
    ids, _ = left_pad([method.prompt(exs[0], 3), longer], tok.pad_token_id, "cpu")  # row 0 is left-padded
    for row in ids:
        assert tok.convert_ids_to_tokens(row[block_ends(ids.shape[1], 3, 4)].tolist()) == ["</b>"] * 3


@pytest.mark.slow
def test_plot_writes_the_three_pngs_and_accuracy_vs_k(rim_run, capsys):
    assert main(["plot", str(rim_run), "--split", "valid"]) == 0
    out = rim_run / "plots"
    assert all(is_png(out / name) for name in ("loss.png", "accuracy_vs_k.png", "block_accuracy.png"))
    assert "written:" in capsys.readouterr().out
    result = json.loads((out / "accuracy_vs_k.json").read_text())
    assert result["K"] == list(range(17)) and result["split"] == "valid" and result["n"] == 16
    assert len(result["final_block_accuracy"]) == len(result["any_block_accuracy"]) == 17
    assert all(a >= f for a, f in zip(result["any_block_accuracy"], result["final_block_accuracy"]))
    assert all(a <= b for a, b in zip(result["any_block_accuracy"][1:], result["any_block_accuracy"][2:]))
    assert result["final_block_accuracy"][1:] == result["block_accuracy"]


@pytest.mark.slow
def test_block_k_readout_is_inference_with_k_blocks(rim_run):
    """Final-block accuracy at K = k decoded on its own equals block k's readout from one K = 16 evaluation."""
    from rim.eval.evaluate import evaluate
    from rim.eval.run import load_run

    _, model, tok, method, task = load_run(rim_run, device="cpu")
    exs = [method.tokenize(task, tok, ex) for ex in task.load("valid")]
    result = rim.plots.accuracy_vs_k(rim_run, split="valid", device="cpu")
    with_16 = evaluate(model, tok, task, method, exs, 16, any_block=True, latency_examples=0).records
    for k in (1, 3):
        alone = evaluate(model, tok, task, method, exs, k, any_block=False, latency_examples=0)
        assert alone.metrics["final_block_accuracy"] == result["final_block_accuracy"][k]
        assert [r["prediction"] for r in alone.records] == [r["block_readouts"][k - 1] for r in with_16]


def test_block_accuracy_prefers_the_runs_eval_results(tmp_path):
    computed = {"trained_blocks": 2, "split": "test", "n": 4, "block_accuracy": [0.25, 0.5, 0.75],
                "final_block_accuracy": [0.0, 0.25, 0.5, 0.75], "any_block_accuracy": [0.0, 0.25, 0.5, 0.75]}
    assert rim.plots.block_accuracy_source(tmp_path, "checkpoint", computed)["block_accuracy"] == [0.25, 0.5]
    (tmp_path / "eval-best").mkdir()
    (tmp_path / "eval-best" / "results.json").write_text(json.dumps(
        {"split": "test", "n": 9, "block_accuracy": [0.1, 0.2], "final_block_accuracy": 0.2,
         "any_block_accuracy": 0.3}))
    source = rim.plots.block_accuracy_source(tmp_path, "best", computed)
    assert source["n"] == 9 and source["block_accuracy"] == [0.1, 0.2] and source["source"] == "eval-best/results.json"
    for other in ({"block_accuracy": [0.1, 0.2, 0.3]}, {"split": "valid"}):  # rim eval --blocks 3 / --split valid
        (tmp_path / "eval-best" / "results.json").write_text(json.dumps(
            {"split": "test", "n": 9, "block_accuracy": [0.1, 0.2], "final_block_accuracy": 0.2,
             "any_block_accuracy": 0.3, **other}))
        assert rim.plots.block_accuracy_source(tmp_path, "best", computed)["source"] == "computed (rim plot)"


@pytest.mark.slow
def test_loss_plot_stages_and_lambda_curves(rim_run):
    events = RunDir(rim_run).events()
    assert rim.plots.stage_spans(events) == [("grounding", 0, 2), ("refinement", 2, 5)]
    cfg = load_config(rim_run / "config.yaml")
    assert rim.plots.median_steps(cfg) == 4
    curves = rim.plots.lambda_curves(cfg.stages[0], 4, 2)  # progress 0 and 0.5: the front at step 0, then 2
    assert curves.tolist() == [[1, 0], [1, 0], [1, 1], [1, 1]]


@pytest.mark.slow
def test_analyze_writes_pca_and_probes_on_disjoint_questions(rim_run, capsys):
    assert main(["analyze", str(rim_run), "--probe-split", "valid", "--score-split", "test"]) == 0
    out = rim_run / "analysis"
    assert is_png(out / "pca.png")
    printed = capsys.readouterr().out
    assert "question specificity" in printed and "AUROC" in printed
    result = json.loads((out / "analysis.json").read_text())
    assert set(result) >= {"position", "blocks", "pca", "probe"} and "</b>" in result["position"]
    names = [row["checkpoint"] for row in result["pca"]["checkpoints"]]
    assert (rim_run / "checkpoints" / "step-5").is_dir()  # the final weights: analysed once, as checkpoint
    assert names == ["init", "checkpoints/step-2", "checkpoints/step-4", "checkpoint"]
    for row in result["pca"]["checkpoints"]:
        assert row["across_question_distance"] > 0 and row["within_question_distance"] > 0
        assert row["question_specificity"] > 0 and len(row["explained_variance"]) == 2
    probe = result["probe"]
    assert probe["checkpoint"] == "checkpoint" and probe["n_probe"] + probe["dropped_shared_questions"] == 16
    assert [row["block"] for row in probe["per_block"]] == [1, 2, 3, 4]
    assert {"auroc", "auprc", "fit_accuracy", "score_accuracy"} <= set(probe["per_block"][0])
    sel = probe["selection"]
    assert sel["final_block_accuracy"] <= sel["any_block_accuracy"]
    assert sel["probe_selected_accuracy"] <= sel["any_block_accuracy"] and sum(sel["chosen_blocks"]) == 16
    questions = json.loads((out / "questions.json").read_text())
    assert len(questions["score"]) == 16 and not set(questions["probe"]) & set(questions["score"])


@pytest.mark.slow
def test_analyze_refuses_scoring_on_the_probe_split(rim_run, capsys):
    assert main(["analyze", str(rim_run), "--probe-split", "test", "--score-split", "test"]) == 2
    assert "fitted on other problems" in capsys.readouterr().err


def test_analyze_refuses_splits_that_leave_no_probe_problems():
    from rim.config import ConfigError
    from rim.data.tasks import Example, Task

    class Same(Task):  # a valid file that is a copy of the test file
        def load(self, split):
            return [Example("1 2", ("3",), "3"), Example("4 5", ("9",), "9")]

    with pytest.raises(ConfigError, match="no problems to fit the probes on: .* 0 of the 'valid' split's 2"):
        rim.analyze.held_out_examples(Same(), "valid", "test", None)


@pytest.mark.slow
def test_plot_of_a_method_without_blocks_is_only_the_loss(tmp_path):
    run = tiny_run("nocot", ["{name: sft, kind: sft, steps: 2}"], tmp_path)
    assert [p.name for p in rim.plots.plot_run(run, device="cpu")] == ["loss.png"]
    assert is_png(run / "plots" / "loss.png")
    assert sorted(p.name for p in (run / "plots").iterdir()) == ["loss.png"]


def test_the_png_check_decodes_the_image_and_rejects_a_blank_one(tmp_path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4, 4))
    FigureCanvasAgg(fig)
    fig.savefig(tmp_path / "blank.png", dpi=100)
    assert not is_png(tmp_path / "blank.png")  # a valid PNG header, nothing drawn
    fig.subplots().plot([0, 1, 2], [0, 1, 0], color="C1")
    fig.savefig(tmp_path / "line.png", dpi=100)
    assert is_png(tmp_path / "line.png")
