"""Checkpoint selection: the paper's split protocol, periodic selection during training, the test-split guard."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from rim.config import ConfigError, load_config
from rim.eval.protocol import split_protocol
from test_cli import rim, write_config


def test_split_protocol_scores_only_unselected_problems():
    # checkpoint 0 is right on problems 0-4 only, checkpoint 1 on 5-9 only: whichever a split selects, its score
    # on the other problems must equal that checkpoint's accuracy on the complement of the selection
    correct = [[i < 5 for i in range(10)], [i >= 5 for i in range(10)]]
    result = split_protocol(correct, n_splits=8, select_size=4, seed=3)
    assert len(result["scores"]) == 8 and result["score_size"] == 6
    for score, best, select in zip(result["scores"], result["chosen"], result["selections"]):
        rest = [i for i in range(10) if i not in select]
        assert len(select) == 4 and len(rest) == 6
        assert score == sum(correct[best][i] for i in rest) / 6  # scored only on problems it was not chosen on
        assert sum(correct[best][i] for i in select) == max(sum(c[i] for i in select) for c in correct)
    assert len({tuple(s) for s in result["selections"]}) > 1  # the splits differ
    assert math.isclose(result["mean"], statistics.mean(result["scores"]))
    assert math.isclose(result["se"], statistics.stdev(result["scores"]) / math.sqrt(8))
    assert split_protocol(correct, n_splits=8, select_size=4, seed=3) == result  # deterministic


def test_split_protocol_selects_the_better_checkpoint_and_breaks_ties_early():
    good, bad = [True] * 20, [False] * 20
    assert split_protocol([bad, good], n_splits=5, select_size=5)["chosen"] == [1] * 5
    assert split_protocol([good, good], n_splits=5, select_size=5)["chosen"] == [0] * 5
    with pytest.raises(ValueError, match="select_size"):
        split_protocol([good], select_size=20)
    with pytest.raises(ValueError, match="same problems"):
        split_protocol([good, good[:5]])


def test_test_split_is_never_used_for_selection():
    with pytest.raises(ConfigError, match="never used for selection"):
        load_config(None, ["eval.select_split=test"])
    with pytest.raises(ConfigError, match="eval.select_split"):
        load_config(None, ["eval.every=10"])


@pytest.mark.slow
def test_selection_on_training_problems_is_refused_or_reported(tmp_path):
    """Selecting on the training split is refused by the config; a selection split made only of training problems
    (GSM8K's valid is drawn from its train) is refused before training, and a partial overlap is warned about and
    logged."""
    from rim.train.loop import train

    with pytest.raises(ConfigError, match="other than data.train_split"):
        load_config(None, ["eval.select_split=train"])

    def line(q: int) -> str:
        return json.dumps({"question": f"{q} + 1", "steps": [f"{q} + 1 = {q + 1}"], "answer": str(q + 1)}) + "\n"

    (tmp_path / "train.jsonl").write_text("".join(line(q) for q in range(8)))
    (tmp_path / "all.jsonl").write_text("".join(line(q) for q in range(3)))
    (tmp_path / "some.jsonl").write_text("".join(line(q) for q in (1, 20, 21)))

    def config(valid: str, out: str):
        files = f"{{train: {tmp_path / 'train.jsonl'}, valid: {tmp_path / valid}, test: {tmp_path / valid}}}"
        return load_config(None, [f"data.options={{files: {files}}}", "data.task=jsonl", "model.tiny_layers=1",
                                  "model.tiny_hidden=16", "model.tiny_heads=2", "train.progress=false",
                                  "train.batch_size=4", "eval.select_split=valid", "eval.every=1",
                                  "stages=[{name: g, kind: grounding, steps: 1},"
                                  " {name: r, kind: refinement, steps: 1}]",
                                  f"output_dir={tmp_path / out}"])

    with pytest.raises(ConfigError, match="3 of the 3 problems of the selection split 'valid' are training problems"):
        train(config("all.jsonl", "all"))
    assert not (tmp_path / "all").exists()  # refused before anything was written: the fixed config runs there
    with pytest.warns(UserWarning, match="1 of the 3 problems"):
        run = train(config("some.jsonl", "some"))
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e for e in events if e["event"] == "select_overlap"] == [
        {"event": "select_overlap", "split": "valid", "shared": 1, "n": 3}]


@pytest.mark.slow
def test_periodic_selection_best_checkpoint_and_protocol(tmp_path):
    cfg = write_config(tmp_path)
    done = rim("train", str(cfg), "train.save_every=2", "eval.select_split=valid", "eval.every=2",
               "eval.select_max=8", "stages.grounding.steps=4", "stages.refinement.steps=2")
    assert done.returncode == 0, done.stderr
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-2", "step-4", "step-6"]
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    selects = [e for e in events if e["event"] == "select"]
    assert [e["step"] for e in selects] == [2, 4, 6] and selects[0]["best"]
    best = json.loads((run / "best/rim.json").read_text())
    chosen = [e for e in selects if e["best"]][-1]
    assert best["step"] == chosen["step"] and best["select_accuracy"] == chosen["accuracy"]
    assert best["select_accuracy"] == max(e["accuracy"] for e in selects)

    done = rim("eval", str(run), "--checkpoint", "best", "--max-eval", "4")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoint"] == "best"

    done = rim("eval", str(run), "--protocol", "splits", "--n-splits", "4", "--select-size", "4")
    assert done.returncode == 0, done.stderr
    summary = json.loads((run / "eval-protocol/results.json").read_text())
    assert summary["checkpoints"] == ["checkpoints/step-2", "checkpoints/step-4", "checkpoints/step-6", "checkpoint"]
    assert summary["score_size"] == 12 and len(summary["scores"]) == 4 and "+-" in done.stdout
    assert summary["split"] == "test" and summary["task"] == "running-sum"  # the model card shows it
    assert "keep_last" not in done.stderr
    (run / "checkpoints/step-8.tmp").mkdir()  # an interrupted save is not a checkpoint
    config = run / "config.yaml"  # as if the run had pruned its checkpoints: the protocol says what it chose among
    config.write_text(config.read_text().replace("keep_last: null", "keep_last: 2"))
    done = rim("eval", str(run), "--protocol", "splits", "--n-splits", "2", "--select-size", "4", "--max-eval", "8")
    assert done.returncode == 0, done.stderr
    assert "train.keep_last=2 deleted older checkpoints; the protocol selects among the 4 that remain" in done.stderr
    done = rim("eval", str(run), "--protocol", "splits", "--checkpoint", "best")
    assert done.returncode == 2 and "takes no --checkpoint" in done.stderr
    (run / "eval-protocol" / "results.json").unlink()
    done = rim("eval", str(run), "--protocol", "splits", "--select-size", "264", "--max-eval", "8")
    assert done.returncode == 2 and "--select-size must be between 1 and 7" in done.stderr  # after one checkpoint
    assert not (run / "eval-protocol" / "results.json").exists()

    # a rerun refuses the folder; with overwrite=true nothing of the earlier run survives
    done = rim("train", str(cfg), "stages.grounding.steps=1", "stages.refinement.steps=1")
    assert done.returncode == 2 and "already holds a run" in done.stderr
    done = rim("train", str(cfg), "stages.grounding.steps=1", "stages.refinement.steps=1", "overwrite=true")
    assert done.returncode == 0, done.stderr
    assert not (run / "checkpoints").exists() and not (run / "best").exists()
    assert not list(run.glob("eval*"))
