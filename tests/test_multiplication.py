"""The iCoT multiplication task: the rule reproduces every shipped line; generated train data is sound."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import shared_data_dir
from rim.data.multiplication import Multiplication, multiplication_line, operands, parse_multiplication_line
from rim.data.tasks import DataError

ICOT = shared_data_dir() / "multiplication_icot"  # the parameters below list its files at collection
if not ICOT.is_dir():
    pytest.skip(f"shipped data not found at {ICOT}", allow_module_level=True)

SIZES = [4, 5, 7, 9, 11]
SHIPPED = sorted(ICOT.glob("*_by_*_mult/*.txt")) + sorted(ICOT.glob("icot_kd_variant/*_by_*_mult/*.txt"))


def test_all_sizes_and_kd_variant_are_shipped(data_dir):
    assert len(SHIPPED) == 2 * len(SIZES) + 2


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ICOT)))
def test_rule_reproduces_every_shipped_line(path: Path):
    n = int(path.parent.name.split("_")[0])
    lines = path.read_text(encoding="utf-8").split("\n")
    assert lines[-1] == "" and len(lines) == 1001  # 1000 lines, each ended by a newline
    for no, line in enumerate(lines[:-1], start=1):
        a, b = operands(line.split("||")[0])
        assert multiplication_line(a, b, n) == line, f"{path}, line {no}"


def test_parse_splits_one_step_per_term():
    line = ("5 6 3 2 * 7 4 3 4||5 5 5 6 1 + 0 0 6 4 9 0 ( 5 5 1 1 1 1 ) + 0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 ) "
            "+ 0 0 0 0 6 4 9 0 #### 5 5 6 0 8 2 0 1")
    ex = parse_multiplication_line(line, "here")
    assert ex.question == "5 6 3 2 * 7 4 3 4"
    assert ex.steps == ("5 5 5 6 1", "0 0 6 4 9 0 ( 5 5 1 1 1 1 )", "0 0 5 9 0 7 0 ( 5 5 6 0 2 8 0 )",
                        "0 0 0 0 6 4 9 0")
    assert ex.answer == "5 5 6 0 8 2 0 1"
    assert multiplication_line(2365, 4347, 4) == line
    assert Multiplication().cot_text(ex) == " " + line.split("||")[1]  # CoT text is the iCoT text exactly


def test_valid_and_test_load_from_data_dir(data_dir):
    task = Multiplication(digits=5, data_dir=str(data_dir))
    valid, test = task.load("valid"), task.load("test")
    assert len(valid) == len(test) == 1000
    assert all(len(ex.steps) == 5 and len(ex.answer.split()) == 10 for ex in valid + test)


@pytest.mark.parametrize("digits", [4, 11])
def test_generated_train(data_dir, digits: int):
    task = Multiplication(digits=digits, data_dir=str(data_dir), n_train=2000, seed=1)
    train = task.load("train")
    assert len(train) == 2000
    assert train == Multiplication(digits=digits, data_dir=str(data_dir), n_train=2000, seed=1).load("train")
    assert train != Multiplication(digits=digits, data_dir=str(data_dir), n_train=2000, seed=2).load("train")
    assert not {ex.question for ex in train} & {ex.question for ex in task.load("valid") + task.load("test")}
    for ex in train:
        a, b = operands(ex.question)
        assert 10 ** (digits - 1) <= min(a, b) and max(a, b) < 10**digits
        assert int(ex.answer.replace(" ", "")[::-1]) == a * b
        line = multiplication_line(a, b, digits)
        assert parse_multiplication_line(line, "round trip") == ex
        assert task.cot_text(ex) == " " + line.split("||")[1]


def test_train_excludes_held_out_questions(data_dir):
    task = Multiplication(digits=4, data_dir=str(data_dir), n_train=10)
    held_out = task._held_out()
    assert len(held_out) > 2000  # valid, test and the kd-variant test of 4 x 4
    assert {ex.question for ex in task.load("valid")} <= held_out


def test_correctness_and_extraction():
    task = Multiplication(digits=4)
    assert task.is_correct(" 5  5 6 0 8 2 0 1\n", "5 5 6 0 8 2 0 1")
    assert not task.is_correct("5 5 6 0 8 2 0", "5 5 6 0 8 2 0 1")
    assert task.extract_answer(" 5 5 5 6 1 + 0 0 0 #### 1 #### 5 5 6 0 8 2 0 1", cot=True) == "5 5 6 0 8 2 0 1"
    assert task.max_new_tokens >= 4 * 2 * 2


def test_missing_data_dir_names_the_path(data_dir, monkeypatch, tmp_path):
    monkeypatch.delenv("RIM_DATA_DIR", raising=False)
    with pytest.raises(FileNotFoundError, match="multiplication_icot/7_by_7_mult.*RIM_DATA_DIR"):
        Multiplication(digits=7).load("test")
    with pytest.raises(FileNotFoundError) as err:
        Multiplication(digits=7, data_dir=str(tmp_path)).load("valid")
    assert str(tmp_path / "multiplication_icot" / "7_by_7_mult" / "valid.txt") in str(err.value)
    assert "data.options.data_dir" in str(err.value)
    monkeypatch.setenv("RIM_DATA_DIR", str(data_dir))
    assert len(Multiplication(digits=7).load("valid")) == 1000


def test_malformed_line_names_file_and_line(tmp_path):
    folder = tmp_path / "multiplication_icot" / "4_by_4_mult"
    folder.mkdir(parents=True)
    good = multiplication_line(2365, 4347, 4)
    (folder / "valid.txt").write_text(f"{good}\n{good.replace('####', '##')}\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"valid\.txt, line 2: no '####'"):
        Multiplication(digits=4, data_dir=str(tmp_path)).load("valid")
    with pytest.raises(DataError, match=re.escape("f.txt, line 12: no '||'")):
        parse_multiplication_line("5 6 * 7 4 #### 1", "f.txt, line 12")
    with pytest.raises(ValueError):
        multiplication_line(10000, 1, 4)
