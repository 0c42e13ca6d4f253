"""GSM8K-Aug: every local format and the hub path (monkeypatched, no network) give the same Examples."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from rim.data.benchmarks import GSM8K
from rim.data.gsm8k_aug import GSM8KAug, parse_record, read_gsm8k_aug
from rim.data.tasks import DataError, Example


# (question, steps, answer as written in the source); the last answer has a thousands comma
PROBLEMS = [
    ("Janet has 16 eggs, eats 3 and bakes 4. She sells the rest at $2. How much does she make?",
     ["<<16-3-4=9>>", "<<9*2=18>>"], "18"),
    ("A robe takes 2 bolts of blue and half that of white. How many bolts?", ["<<2/2=1>>", "<<2+1=3>>"], "3"),
    ("A box holds 250 pens. How many pens are in 4 boxes?", ["<<250*4=1000>>"], "1,000"),
]
EXPECTED = [Example(q, tuple(s), a.replace(",", "")) for q, s, a in PROBLEMS]


def gsm8k_solution(steps: list[str], answer: str) -> str:
    """An original GSM8K solution: prose with calculator annotations, then ``#### answer``."""
    body = " ".join(f"So {s[2:-2]} = {s}{s[2:-2].split('=')[-1]} here." for s in steps)
    return f"{body}\n#### {answer}"


def write_sources(tmp_path: Path) -> dict[str, Path]:
    """The same problems in every local format."""
    files = {
        "icot.txt": "\n".join(f"{q}||{' '.join(s)} #### {a}" for q, s, a in PROBLEMS) + "\n",
        "coconut.json": json.dumps([{"question": q, "steps": s, "answer": a} for q, s, a in PROBLEMS]),
        "coconut.jsonl": "".join(json.dumps({"question": q, "steps": s, "answer": a}) + "\n" for q, s, a in PROBLEMS),
        "zen-e.jsonl": "".join(json.dumps({"question": q, "cot": " ".join(s), "answer": a}) + "\n"
                               for q, s, a in PROBLEMS),
        "gsm8k.jsonl": "".join(json.dumps({"question": q, "answer": gsm8k_solution(s, a)}) + "\n"
                               for q, s, a in PROBLEMS),
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return {name: tmp_path / name for name in files}


def test_every_local_format_loads_to_the_same_examples(tmp_path):
    for name, path in write_sources(tmp_path).items():
        assert GSM8KAug(str(path)).load("train") == EXPECTED, name


def test_max_train_keeps_the_first_problems(tmp_path):
    path = write_sources(tmp_path)["icot.txt"]
    assert GSM8KAug(str(path), max_train=2).load("train") == EXPECTED[:2]
    with pytest.raises(ValueError, match="max_train"):
        GSM8KAug(str(path), max_train=0)


def test_schemas_with_list_or_string_steps_and_numeric_answers():
    where = "rec"
    assert parse_record({"question": " q ", "cot": ["<<1+1=2>>", "<<2*2=4>>"], "answer": 4}, where) == \
        Example("q", ("<<1+1=2>>", "<<2*2=4>>"), "4")
    assert parse_record({"question": "q", "steps": "<<1+1=2>>  <<2*2=4>>", "answer": "#### 4"}, where).steps == \
        ("<<1+1=2>>", "<<2*2=4>>")
    assert parse_record({"question": "q", "steps": [], "answer": "-2.5"}, where).answer == "-2.5"


def test_hub_source_goes_through_load_dataset(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, split=None, revision=None, **kwargs):
        calls.append((path, split, revision, kwargs))
        return datasets.Dataset.from_list([{"question": q, "steps": s, "answer": a} for q, s, a in PROBLEMS])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = GSM8KAug("whynlp/gsm8k-aug", train_split="train[:3]", revision="abc123")
    assert task.load("train") == EXPECTED
    assert calls == [("whynlp/gsm8k-aug", "train[:3]", "abc123", {})]
    task.load("train")  # the parsed problems are kept: no second download / parse
    assert len(calls) == 1


def test_hub_error_names_source_and_record_index(monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = [{"question": "q", "cot": "<<1+1=2>>", "answer": "2"},
            {"question": "q", "cot": "<<1+1=2>>", "answer": "two"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.Dataset.from_list(rows))
    with pytest.raises(DataError, match=r"zen-E/GSM8k-Aug \(train split\), record 1: answer 'two' is not a number"):
        GSM8KAug("zen-E/GSM8k-Aug").load("train")


def test_missing_datasets_library_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes "import datasets" raise ImportError
    with pytest.raises(ImportError, match="pip install datasets"):
        GSM8KAug("whynlp/gsm8k-aug").load("train")


@pytest.mark.parametrize("name,text,message", [
    ("bad.txt", "q||<<1+1=2>> #### 2\nno separator here\n", r"bad\.txt, line 2: expected"),
    ("bad.txt", "q||<<1+1=2>> #### 2\n\nq||<<1+1=2>> #### abc\n", r"bad\.txt, line 3: answer 'abc' is not a number"),
    ("bad.jsonl", '{"question": "q", "steps": [], "answer": "1"}\n{"question": "q", "steps": []}\n',
     r"bad\.jsonl, line 2: missing field 'answer'"),
    ("bad.jsonl", '{"question": "q", "steps": [], "answer": "1"}\n{oops\n', r"bad\.jsonl, line 2: not valid JSON"),
    ("bad.jsonl", '{"question": "q", "answer": "no solution marker"}\n', r"line 1: no 'steps' or 'cot' field"),
    ("bad.json", json.dumps([{"question": "q", "cot": "<<1=1>>", "answer": "1"}, {"answer": "1", "cot": ""}]),
     r"bad\.json, record 1: missing field 'question'"),
    ("bad.json", json.dumps([{"question": "q", "steps": ["<<1=1>>", 3], "answer": "1"}]),
     r"bad\.json, record 0: every item of 'steps'"),
    ("bad.json", json.dumps({"question": "q"}), r"bad\.json: expected a JSON list"),
])
def test_malformed_records_name_the_file_and_line_or_record(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        GSM8KAug(str(path)).load("train")


def test_bad_local_sources_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_gsm8k_aug(str(tmp_path / "missing.jsonl"))
    (tmp_path / "data.csv").write_text("question,answer\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_gsm8k_aug(str(tmp_path / "data.csv"))
    (tmp_path / "empty.txt").write_text("\n", encoding="utf-8")
    with pytest.raises(DataError, match="no examples"):
        read_gsm8k_aug(str(tmp_path / "empty.txt"))
    with pytest.raises(ValueError, match="splits"):
        GSM8KAug(str(tmp_path / "empty.txt")).load("dev")


def test_valid_and_test_are_gsm8k_files_from_the_data_directory(data_dir):
    task = GSM8KAug("unused/hub-id", data_dir=str(data_dir))  # valid/test never touch the train source
    test = task.load("test")
    assert len(test) == 1319 and test == GSM8K(str(data_dir)).load("test")
    assert len(task.load("valid")) == 500
