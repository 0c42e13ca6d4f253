"""Configs (strict keys, types, ranges, dotted overrides, every shipped config loads) and data loading errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Literal

import pytest

from rim.config import ConfigError, load_config
from rim.methods import METHODS
from rim.data.tasks import DataError, JsonlTask, RunningSum, make_task, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = [p for p in sorted((ROOT / "configs").glob("**/*.yaml")) + sorted((ROOT / "src/rim/configs").glob("*.yaml"))
           if not p.name.startswith("compare") and p.parent.name != "campaign"]  # compare / campaign specs: own tests


def write(tmp_path: Path, text: str, name: str = "c.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.stages and cfg.method.name in METHODS
    task = make_task(cfg.data.task, cfg.data.options)  # the task accepts the config's options (no data is read)
    assert task.name == cfg.data.task


def test_shipped_configs_exist():
    names = {p.relative_to(ROOT).as_posix() for p in SHIPPED}
    assert {f"configs/paper/gsm8k-aug_{m}_{x}.yaml" for m in ("gpt2", "llama-3.2-1b", "llama-3.2-3b")
            for x in ("rim", "cot", "nocot")} <= names
    assert {f"configs/paper/gsm8k-aug_gpt2_{x}.yaml" for x in ("pause", "coconut", "icot")} <= names
    assert {f"configs/smollm2/{t}_rim.yaml" for t in ("gsm8k", "prosqa", "prontoqa", "mult4x4", "mult5x5")} <= names
    assert {f"configs/smollm2/{x}.yaml" for x in ("gsm8k_pause", "prosqa_coconut", "prosqa_icot", "mult5x5_icot")
            } <= names


def test_unknown_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="'model.lora_rnak'"):
        load_config(write(tmp_path, "model: {lora_rnak: 8}\n"))
    with pytest.raises(ConfigError, match="'stages.1.lrr'"):
        load_config(write(tmp_path, "stages: [{kind: sft, steps: 1}, {kind: sft, steps: 1, lrr: 1}]\n"
                                    "method: {name: cot}\n"))
    with pytest.raises(ConfigError, match="'bogus'"):
        load_config(write(tmp_path, "bogus: 1\n"))
    with pytest.raises(ConfigError, match="'train.batchsize'"):
        load_config(None, ["train.batchsize=4"])


def test_types_and_ranges_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="'train.batch_size': expected int"):
        load_config(None, ["train.batch_size=big"])
    with pytest.raises(ConfigError, match="'method.blocks' must be >= 1"):
        load_config(None, ["method.blocks=0"])
    with pytest.raises(ConfigError, match="'method.memory_tokens' must be >= 1"):
        load_config(None, ["method.memory_tokens=0"])
    with pytest.raises(ConfigError, match="'stages.0.lr' must be > 0"):
        load_config(None, ["stages.0.lr=0"])
    with pytest.raises(ConfigError, match="epochs/steps"):
        load_config(None, ["stages.0.epochs=null"])  # neither epochs nor steps
    with pytest.raises(ConfigError, match="one of sft, rl for nocot"):
        load_config(None, ["method.name=nocot"])  # the default stages are RiM's
    with pytest.raises(ConfigError, match="'full' for model.name=tiny"):
        load_config(None, ["model.train_mode=lora"])
    # hiding the question from the answer is RiM's option: the others decode under a causal mask
    assert not load_config(None, ["method.readout_sees_question=false"]).method.readout_sees_question
    with pytest.raises(ConfigError, match="'method.readout_sees_question' must be true for methods without memory"):
        load_config(None, ["method.name=cot", "method.readout_sees_question=false",
                           "stages=[{name: sft, kind: sft, steps: 2}]"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(None, ["method.blocks"])
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(write(tmp_path, "model: [\n"))


def test_defaults_are_the_papers_recipe():
    cfg = load_config()
    assert [(s.kind, s.epochs, s.reset_optimizer) for s in cfg.stages] == [("grounding", 6, True),
                                                                           ("refinement", 2, True)]
    assert cfg.stages[1].lr < cfg.stages[0].lr and cfg.stages[1].dropout > cfg.stages[0].dropout
    assert (cfg.method.memory_tokens, cfg.method.blocks, cfg.model.lora_rank) == (2, 8, 128)
    assert cfg.model.train_mode == "full"  # auto: the default tiny model trains from scratch
    assert load_config(None, ["model.name=gpt2"]).model.train_mode == "lora"


def test_overrides_by_stage_name_and_index():
    path = ROOT / "configs/cpu/mult4x4_rim.yaml"
    cfg = load_config(path, ["stages.refinement.lr=3e-5", "stages.0.steps=7", "train.seed=3", "method.blocks=5"])
    assert cfg.stages[1].lr == 3e-5 and cfg.stages[0].steps == 7 and cfg.train.seed == 3 and cfg.method.blocks == 5
    with pytest.raises(ConfigError, match="no stage 'polish'"):
        load_config(path, ["stages.polish.lr=1"])


def test_running_sum_task():
    task = RunningSum(digits=4, n_train=200, n_test=50, n_valid=50, seed=1)
    train, test = task.load("train"), task.load("test")
    assert len(train) == 200 and len(test) == 50
    ex = test[0]
    digits = [int(d) for d in ex.question.split()]
    assert [int(s) for s in ex.steps] == [sum(digits[:t]) % 10 for t in range(1, 5)] and ex.answer == ex.steps[-1]
    assert not {e.question for e in train} & {e.question for e in test + task.load("valid")}
    small = RunningSum(digits=2, n_train=20, n_test=40, n_valid=40)  # 100 questions: overlap is likely by chance
    assert not {e.question for e in small.load("valid")} & {e.question for e in small.load("test")}
    assert task.load("test") == test  # deterministic
    assert task.extract_answer(" 3 0 2 #### 7", cot=True) == "7" and task.extract_answer(" 3 0", cot=True) == ""


def test_cot_text_round_trips_through_the_word_tokenizer():
    from rim.models.tiny import word_tokenizer

    task = RunningSum(n_train=10, n_test=5, n_valid=5)
    tok = word_tokenizer(task.vocabulary())
    for ex in task.load("test"):
        text = tok.decode(tok(task.cot_text(ex), add_special_tokens=False)["input_ids"])
        assert text == " ".join(ex.steps) + " #### " + ex.answer
        assert task.extract_answer(text, cot=True) == ex.answer


def test_jsonl_loader_reads_and_names_bad_lines(tmp_path):
    good = {"question": "1 2", "steps": ["1", "3"], "answer": 3}
    path = write(tmp_path, json.dumps(good) + "\n\n" + json.dumps(good) + "\n", "d.jsonl")
    exs = read_jsonl(path)
    assert len(exs) == 2 and exs[0].answer == "3" and exs[0].steps == ("1", "3")
    cases = {
        "{not json": "line 2: not valid JSON",
        json.dumps({"question": "q", "steps": []}): "line 2: missing field 'answer'",
        json.dumps({"question": "q", "steps": "1 2", "answer": "3"}): "line 2: field 'steps' has type str",
        json.dumps({"question": "q", "steps": ["1", ""], "answer": "3"}): "line 2: every item of .steps. must be",
        json.dumps([1, 2]): "line 2: expected a JSON object",
        json.dumps({"question": " ", "steps": [], "answer": "3"}): "line 2: empty question",
    }
    for bad, message in cases.items():
        path = write(tmp_path, json.dumps(good) + "\n" + bad + "\n", "bad.jsonl")
        with pytest.raises(DataError, match=message) as err:
            read_jsonl(path)
        assert "bad.jsonl, line 2: " in str(err.value)


def test_jsonl_task_and_unknown_task(tmp_path):
    path = write(tmp_path, json.dumps({"question": "a b", "steps": ["c"], "answer": "d"}) + "\n", "t.jsonl")
    task = make_task("jsonl", {"files": {"train": str(path)}})
    assert isinstance(task, JsonlTask) and task.load("train")[0].answer == "d"
    assert task.vocabulary() == ["####", "a", "b", "c", "d"]
    with pytest.raises(ConfigError, match=r"no file for split 'test'; data\.options\.files has train"):
        task.load("test")
    with pytest.raises(ConfigError, match="'data.task' must be one of .*, not 'gsm9k'"):
        make_task("gsm9k", {})
    with pytest.raises(ConfigError, match=r"'data\.options\.digitz'; task 'running-sum' takes digits"):
        make_task("running-sum", {"digitz": 3})


@pytest.mark.parametrize("override,message", [
    ("data.task=foo", "'data.task' must be one of"),
    ("data.options.digits=x", "'data.options.digits': expected int, got str 'x'"),
    ("data.options.bogus=1", "unknown config key 'data.options.bogus'"),
    ("data.task=jsonl", "'data.options.files' is required for task 'jsonl'"),
])
def test_task_options_are_checked_against_the_task(override, message):
    """The config is a leaf (it knows no task): the data layer checks ``data.task`` and ``data.options``, as
    ``rim train`` and ``rim compare`` do before anything is written."""
    from rim.data.tasks import check_task_options

    cfg = load_config(None, [override])
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_task_options(cfg.data.task, cfg.data.options)


def test_held_out_splits_that_take_every_question_are_an_error_not_a_hang():
    """digits=2 has 100 questions; 300 test and 300 valid draws take them all (this used to loop forever)."""
    task = make_task("running-sum", {"digits": 2})
    assert len(task.load("test")) == 300
    with pytest.raises(ConfigError, match=r"digits=2 .* 100 distinct questions.* before 'train'"):
        task.load("train")
    assert len(make_task("running-sum", {"digits": 2, "n_test": 20, "n_valid": 20}).load("train")) == 20000
    with pytest.raises(ConfigError, match="has splits train, valid, test, not 'dev'"):
        task.load("dev")


def test_registered_task_is_built_by_name():
    from rim.data.tasks import TASKS, Example, Task, register_task

    @register_task
    class Echo(Task):
        name = "echo-test"

        def __init__(self, n: int = 2):
            self.n = n

        def load(self, split):
            return [Example(str(i), (str(i),), str(i)) for i in range(self.n)]

    try:
        task = make_task("echo-test", {"n": 3}, on_error="skip")
        assert isinstance(task, Echo) and len(task.load("train")) == 3 and task.records.on_error == "skip"
    finally:
        TASKS.pop("echo-test")


def test_task_options_of_types_yaml_does_not_give_are_left_to_the_task(tmp_path):
    """Only YAML's own types are checked: a Path, a Literal, a tuple or a name imported for type checkers only
    pass through to the task's constructor, and a path object passes where a str is hinted."""
    from rim.data.tasks import register_task

    class Mine(RunningSum):
        name = "mine"

        def __init__(self, folder: Path | None = None, mode: Literal["easy", "hard"] = "easy",
                     sizes: tuple[int, ...] = (1,), digits: int = 4):
            super().__init__(digits)
            self.folder, self.mode = folder, mode

    class Odd(RunningSum):
        name = "odd"

        def __init__(self, other: "NotImportedHere | None" = None):  # noqa: F821
            super().__init__()

    from rim.data.tasks import TASKS

    register_task(Mine), register_task(Odd)
    try:
        cfg = load_config(None, ["data.task=mine", f"data.options={{folder: {tmp_path}, mode: hard, sizes: [1, 2]}}"])
        task = make_task(cfg.data.task, cfg.data.options)
        assert (task.folder, task.mode) == (str(tmp_path), "hard")
        with pytest.raises(ConfigError, match="'data.options.digits': expected int"):  # YAML's types still checked
            make_task("mine", load_config(None, ["data.task=mine", "data.options.digits=x"]).data.options)
        assert make_task("odd", {"other": 3}).digits == 4
    finally:
        TASKS.pop("mine"), TASKS.pop("odd")
    assert make_task("multiplication", {"data_dir": tmp_path}).data_dir == tmp_path

