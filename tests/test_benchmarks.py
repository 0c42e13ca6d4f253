"""The paper's benchmark files (../shared/data): counts, GSM8K steps, numeric correctness, clear errors."""

from __future__ import annotations

import json

import pytest

from rim.config import ConfigError

from rim.data.benchmarks import GSM8K, SVAMP, data_file, gsm8k_steps, parse_icot_line, parse_number
from rim.data.tasks import DataError, make_task


COUNTS = {
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("gsm8k", "valid"): 500, ("gsm8k", "train_no_valid"): 6973,
    ("gsm-hard", "test"): 1319, ("svamp", "test"): 1000, ("multiarith", "test"): 600,
    ("prosqa", "valid"): 300, ("prosqa", "test"): 500, ("prontoqa", "valid"): 200, ("prontoqa", "test"): 800,
}


@pytest.mark.parametrize("name,split", sorted(COUNTS))
def test_every_benchmark_split_loads_with_its_published_size(data_dir, name, split):
    exs = make_task(name, {"data_dir": str(data_dir)}).load(split)
    assert len(exs) == COUNTS[name, split]
    assert all(ex.question and ex.answer for ex in exs)


def test_gsm8k_steps_are_the_calculator_annotations(data_dir):
    first = GSM8K(str(data_dir)).load("train")[0]
    assert first.steps == ("<<48/2=24>>", "<<48+24=72>>") and first.answer == "72"
    assert gsm8k_steps("a <<1+2=3>>3 b <<3*4=12>>12\n#### 12 <<9=9>>") == ("<<1+2=3>>", "<<3*4=12>>")
    valid = GSM8K(str(data_dir)).load("valid")[0]  # iCoT text format, same step format
    assert valid.steps == ("<<4-2=2>>", "<<2/.5=4>>", "<<12/4=3>>", "<<100*3=300>>") and valid.answer == "300"


def test_valid_split_is_held_out_of_train_no_valid(data_dir):
    task = GSM8K(str(data_dir))
    valid = {ex.question for ex in task.load("valid")}
    assert not valid & {ex.question for ex in task.load("train_no_valid")}
    assert len(valid & {ex.question for ex in task.load("train")}) == 500  # valid comes from GSM8K train


def test_numbers_compare_as_numbers(data_dir):
    task = SVAMP(str(data_dir))
    assert task.is_correct(" 1,000", "1000") and task.is_correct("$18.00", "18") and task.is_correct("-3", "-3.0")
    assert not task.is_correct("", "3") and not task.is_correct("17", "18")
    assert not task.is_correct("1000001", "1000000") and not task.is_correct("108224700", "108224794.2")
    assert task.is_correct("108224794.2", "108224794.2") and task.is_correct("0.33333", "0.33333")
    assert parse_number("x 2.5e3 y") == 2500.0
    # a fraction is its value, not the number in front of its bar; the Unicode minus sign is a minus
    assert not task.is_correct("3/4", "3") and task.is_correct("1/2", "0.5") and task.is_correct("6 / 4", "1.5")
    assert not task.is_correct("\u22125", "5") and task.is_correct("\u22125", "-5")
    assert parse_number("1/0") is None and parse_number("2,000/4,000") == 0.5 and parse_number("1/1,000") == 0.001
    assert parse_number("3/4/2020") == 3 and parse_number("5 /\n2") == 5  # no fraction: a date, a line break


@pytest.mark.parametrize("name", ["gsm8k", "gsm-hard", "svamp", "multiarith"])
def test_the_answer_budget_holds_every_gold_answer_a_digit_a_token(data_dir, name):
    task = make_task(name, {"data_dir": str(data_dir)})
    assert max(len(ex.answer) for ex in task.load("test")) + 2 <= task.max_new_tokens  # + a leading space, EOS
    assert task.extract_answer(" <<2*3=6>> #### 6", cot=True) == "6"


def test_missing_data_names_the_path(data_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("RIM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="set data.options.data_dir or RIM_DATA_DIR"):
        data_file(None, "gsm8k/train.jsonl")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "gsm8k" / "test.jsonl")):
        GSM8K(str(tmp_path)).load("test")
    monkeypatch.setenv("RIM_DATA_DIR", str(data_dir))
    assert len(GSM8K().load("valid")) == 500


def test_malformed_lines_name_file_and_line(data_dir, tmp_path):
    (tmp_path / "gsm8k").mkdir()
    good = json.dumps({"question": "q", "answer": "x <<1+1=2>>2\n#### 2"})
    (tmp_path / "gsm8k/test.jsonl").write_text(good + "\n" + json.dumps({"question": "q", "answer": "#### two"}) + "\n")
    with pytest.raises(DataError, match=r"test.jsonl, line 2: final answer 'two' is not a number"):
        GSM8K(str(tmp_path)).load("test")
    with pytest.raises(DataError, match="f.txt, line 3: expected 'question"):
        parse_icot_line("no separator", "f.txt, line 3")
    with pytest.raises(ConfigError, match="'prosqa' has splits train, valid, test, not 'training'"):
        make_task("prosqa", {"data_dir": str(data_dir)}).load("training")


@pytest.mark.parametrize("name", ["prosqa", "prontoqa"])
def test_logic_train_split_is_generated_without_shipped_questions(data_dir, name):
    task = make_task(name, {"data_dir": str(data_dir), "n_train": 50, "seed": 1})
    train = task.load("train")
    assert 45 <= len(train) <= 50 and all(ex.steps for ex in train)
    assert not {ex.question for ex in train} & {ex.question for s in ("valid", "test") for ex in task.load(s)}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rim", "cot"])
def test_a_benchmark_task_trains_and_evaluates(data_dir, tmp_path, method, monkeypatch):
    """Multiplication 4x4 (generated train, shipped valid) end to end with a tiny model: task-agnostic harness.
    The generation budget is the scored task's answer budget plus, for CoT, the longest chain of thought the run
    trained on, also out of distribution (MultiArith's problems carry no steps to size it from)."""
    from transformers import AutoTokenizer

    from rim.config import load_config
    from rim.eval import evaluate
    from rim.eval.run import eval_run
    from rim.methods.base import text_ids
    from rim.train.loop import train

    budgets = []
    original = evaluate.score
    monkeypatch.setattr(evaluate, "score", lambda *a: budgets.append(a[6]) or original(*a))

    stages = (["stages.0.steps=2", "stages.1.steps=2"] if method == "rim"
              else ["stages=[{name: sft, kind: sft, steps: 2}]"])
    cfg = load_config(None, [f"method.name={method}", "method.blocks=2", "model.tiny_layers=1", "model.tiny_hidden=16",
                             "model.tiny_heads=2", "data.task=multiplication", "data.eval_split=valid",
                             f"data.options={{digits: 4, n_train: 32, data_dir: {data_dir}}}", "data.max_eval=4",
                             "stages.0.epochs=null", "stages.1.epochs=null", "train.batch_size=8",
                             "train.progress=false", "eval.latency_examples=1", f"output_dir={tmp_path / 'run'}",
                             *stages])
    train(cfg)
    metrics = eval_run(tmp_path / "run").metrics
    assert metrics["n"] == 4 and metrics["split"] == "valid"
    layout = (tmp_path / "run/layout.txt").read_text()
    assert "readout 4" in layout if method == "rim" else "####" in layout
    ood = eval_run(tmp_path / "run", split="test", max_eval=3, task_name="multiarith").metrics  # out of distribution
    assert ood["task"] == "multiarith" and ood["n"] == 3
    assert (tmp_path / "run/eval-multiarith/results.json").is_file()
    tok = AutoTokenizer.from_pretrained(tmp_path / "run/checkpoint")
    task = make_task("multiplication", {"digits": 4, "n_train": 32, "data_dir": data_dir})
    longest = max(len(text_ids(tok, task.cot_text(ex))) for ex in task.load("train"))
    assert json.loads((tmp_path / "run/checkpoint/rim.json").read_text())["reasoning"] == longest  # what eval reads
    room = longest if method == "cot" else 0
    assert longest > 20 and budgets == [task.max_new_tokens + room, make_task("multiarith", {}).max_new_tokens + room]
