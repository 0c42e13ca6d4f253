"""The paper's benchmarks from their original files: GSM8K, GSM-Hard, SVAMP, MultiArith, ProsQA, ProntoQA.

Files live under one data directory (``data.options.data_dir`` or the ``RIM_DATA_DIR`` environment variable),
laid out as in ``../shared/data`` (see its SOURCES.md): ``gsm8k/train.jsonl``, ``gsm8k_aug_icot/valid.txt``, ...

GSM8K reasoning steps are the calculator annotations of the solution, in order: exactly the equation-only steps
of GSM8K-Aug::

    "Natalia sold 48/2 = <<48/2=24>>24 clips ... 48+24 = <<48+24=72>>72 clips ... #### 72"
    -> steps ("<<48/2=24>>", "<<48+24=72>>"), answer "72"

Numeric answers are compared as numbers (``1,000`` == ``1000.0``); a gold answer that is not a number is a bad
record (``rim.data.records``: the task's ``data.on_error`` policy stops or skips it).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

from rim.data.records import DataError, field, parse_json, read_json_file, string_list
from rim.data.tasks import COT_SEPARATOR, Example, Task, unknown_split

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
# a number, perhaps with a fraction bar: "3/4" is 0.75, never the 3 in front of it; "3/4/2020" is no fraction
_PLAIN = r"\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|\.\d+"
_NUMBER = re.compile(rf"(-?(?:{_PLAIN}))(?:[ \t]*/[ \t]*({_PLAIN})(?![\d,.]*[ \t]*/))?")
# a whole answer must be one plain number once commas are dropped: "18", "-3", "2.5", ".5"
_ANSWER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def data_file(data_dir: str | None, relative: str) -> Path:
    """``<data_dir>/<relative>``; a missing directory or file raises FileNotFoundError saying where it looked."""
    base = data_dir or os.environ.get("RIM_DATA_DIR")
    if not base:
        raise FileNotFoundError(f"no data directory for {relative}: set data.options.data_dir or RIM_DATA_DIR")
    path = Path(base).expanduser() / relative
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path} (data directory {base!r}; set data.options.data_dir "
                                "or RIM_DATA_DIR to the folder that holds it)")
    return path


def parse_number(text: str) -> float | None:
    """The first number in ``text`` (commas and ``$`` ignored, the Unicode minus sign read as ``-``, a fraction
    ``a/b`` as its value), or None.

    >>> parse_number(" $1,234.5 dollars"), parse_number("3/4 of it"), parse_number("\u22125"), parse_number("none")
    (1234.5, 0.75, -5.0, None)
    """
    match = _NUMBER.search(text.replace("$", "").replace("\u2212", "-"))
    if match is None:
        return None
    try:
        value = float(match.group(1).replace(",", ""))
        return value if match.group(2) is None else value / float(match.group(2).replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return None


def format_number(value: float) -> str:
    """``18.0`` -> ``"18"``, ``2.5`` -> ``"2.5"``: the answer text a model is trained to produce."""
    if isinstance(value, int):  # exact, and no float overflow for very large integers
        return str(value)
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def normalise_answer(answer: object, where: str, key: str = "answer") -> str:
    """A numeric gold answer as text: a string stripped with commas dropped, a JSON number formatted; anything else
    (text that is not one plain number, NaN, infinity, another type) raises DataError.

    >>> normalise_answer(" 1,000 ", "x"), normalise_answer(18, "x"), normalise_answer(2.5, "x")
    ('1000', '18', '2.5')
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field {key!r} has type {type(answer).__name__}", "wrong type")
    if isinstance(answer, str):
        text = answer.strip().replace(",", "")
        if not _ANSWER.fullmatch(text):
            raise DataError(f"{where}: {key} {answer.strip()!r} is not a number", "not a number")
        return text
    if isinstance(answer, float) and not math.isfinite(answer):
        raise DataError(f"{where}: {key} {answer!r} is not a number", "not a number")
    return format_number(answer)


def gsm8k_steps(solution: str) -> tuple[str, ...]:
    """The ``<<expr=result>>`` annotations of a GSM8K solution, in order."""
    return tuple(f"<<{expr}>>" for expr in _ANNOTATION.findall(solution.split("####")[0]))


def parse_gsm8k_record(line: str, where: str) -> Example:
    """One line of the original GSM8K JSONL: ``{"question", "answer": "<solution> #### N"}``."""
    rec = parse_json(line, where)
    question, solution = field(rec, "question", where), field(rec, "answer", where)
    if "####" not in solution:
        raise DataError(f"{where}: the answer has no '####' final answer", "bad format")
    answer = normalise_answer(solution.rsplit("####", 1)[1], where, "final answer")
    return Example(question.strip(), gsm8k_steps(solution), answer)


def parse_icot_line(line: str, where: str) -> Example:
    """One iCoT text line of a math problem, ``question||step step ... #### answer`` (steps split on whitespace, as
    Coconut does); the answer must be a number."""
    if "||" not in line or "####" not in line.split("||", 1)[1]:
        raise DataError(f"{where}: expected 'question||steps #### answer'", "bad format")
    question, rest = line.split("||", 1)
    cot, answer = rest.rsplit("####", 1)
    if not question.strip() or not answer.strip():
        raise DataError(f"{where}: empty question or answer", "empty")
    return Example(question.strip(), tuple(cot.split()), normalise_answer(answer, where))


def read_json_list(path: Path) -> list:
    """A JSON file holding one list (a whole-file problem raises DataError under any policy)."""
    data = read_json_file(path)
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list, got {type(data).__name__}", "wrong type")
    return data


def json_records(path: Path) -> list[tuple[str, object]]:
    """``(where, record)`` for every record of a JSON list file; ``where`` is ``"<path>, record <i>"``."""
    return [(f"{path}, record {i}", rec) for i, rec in enumerate(read_json_list(path))]


class NumericTask(Task):
    """A math word-problem task: answers are numbers, compared as numbers."""

    max_new_tokens = 12

    def __init__(self, data_dir: str | None = None):
        self.data_dir = data_dir

    def file(self, relative: str) -> Path:
        return data_file(self.data_dir, relative)

    def is_correct(self, prediction: str, gold: str) -> bool:
        """Equal as numbers, up to 1e-4 absolute (no relative tolerance: 1000001 is not 1000000)."""
        pred, ref = parse_number(prediction), parse_number(gold)
        return pred is not None and ref is not None and math.isclose(pred, ref, rel_tol=0.0, abs_tol=1e-4)


class GSM8K(NumericTask):
    """GSM8K: ``train`` 7,473 and ``test`` 1,319 from the original JSONL, ``valid`` the 500 iCoT validation problems
    (drawn from GSM8K train: do not select checkpoints on it while training on the full train split; use
    ``train_no_valid``, the 6,973 others)."""

    name = "gsm8k"
    FILES = {"train": "gsm8k/train.jsonl", "test": "gsm8k/test.jsonl", "valid": "gsm8k_aug_icot/valid.txt"}

    def load(self, split: str) -> list[Example]:
        if split == "train_no_valid":
            held_out = {ex.question for ex in self.load("valid")}
            return [ex for ex in self.load("train") if ex.question not in held_out]
        if split not in self.FILES:
            raise unknown_split(self.name, split, [*self.FILES, "train_no_valid"])
        path = self.file(self.FILES[split])
        return self.records.lines(path, parse_icot_line if path.suffix == ".txt" else parse_gsm8k_record)


class GSMHard(NumericTask):
    """GSM-Hard (PAL): GSM8K test questions with larger numbers; ``test`` only, no steps."""

    name = "gsm-hard"
    test_file = "gsm_hard/gsmhardv2.jsonl"  # PAL's {"input", "target"} records
    max_new_tokens = 24  # answers of up to 19 characters (-1895420.4999999998): a digit a token, a space, EOS

    def load(self, split: str) -> list[Example]:
        if split != "test":
            raise unknown_split(self.name, split, ["test"])
        return self.records.lines(self.file(self.test_file), self._parse)

    @staticmethod
    def _parse(line: str, where: str) -> Example:
        """One PAL record, ``{"input": question, "target": number}``."""
        rec = parse_json(line, where)
        question = field(rec, "input", where)
        return Example(question.strip(), (), normalise_answer(field(rec, "target", where, (int, float, str)), where,
                                                               "target"))


class MultiArith(GSMHard):
    """MultiArith (PAL's copy): ``test`` only, no steps."""

    name = "multiarith"
    test_file = "multiarith/mawpsmultiarith.jsonl"
    max_new_tokens = 12  # answers of two digits (GSM-Hard's 24 is for its long ones)


class SVAMP(NumericTask):
    """SVAMP: 1,000 problems, body + question; ``test`` only, no steps."""

    name = "svamp"

    def load(self, split: str) -> list[Example]:
        if split != "test":
            raise unknown_split(self.name, split, ["test"])
        path = self.file("svamp/SVAMP.json")
        return self.records.collect(str(path), json_records(path), self._parse)

    @staticmethod
    def _parse(rec: object, where: str) -> Example:
        """One SVAMP record: ``Body`` and ``Question`` make the question, ``Answer`` is a number."""
        question = f"{field(rec, 'Body', where).strip()} {field(rec, 'Question', where).strip()}"
        return Example(question, (), normalise_answer(field(rec, "Answer", where, (int, float, str)), where, "Answer"))


class CoconutLogic(Task):
    """ProsQA / ProntoQA in Coconut's JSON (``question``, ``steps``, ``answer``): ``valid`` and ``test`` from the
    shipped files; ``train`` generated by rule (``rim.data.logic_gen``; Coconut's train sizes by default), with
    every shipped valid/test question left out."""

    name = "prosqa"
    folder = "prosqa"
    default_train = 17886  # Coconut's ProsQA train size
    max_new_tokens = 32

    def __init__(self, data_dir: str | None = None, n_train: int | None = None, seed: int = 0):
        self.data_dir, self.n_train, self.seed = data_dir, n_train or self.default_train, seed

    def generate(self, n: int, seed: int) -> list[Example]:
        from rim.data.logic_gen import generate_prosqa

        return generate_prosqa(n, seed)

    def load(self, split: str) -> list[Example]:
        if split == "train":
            shipped = {ex.question for s in ("valid", "test") for ex in self.load(s)}
            return [ex for ex in self.generate(self.n_train, self.seed) if ex.question not in shipped]
        if split not in ("valid", "test"):
            raise unknown_split(self.name, split, ["train", "valid", "test"])
        path = data_file(self.data_dir, f"{self.folder}/{self.folder}_{split}.json")
        return self.records.collect(str(path), json_records(path), self._parse)

    @staticmethod
    def _parse(rec: object, where: str) -> Example:
        """One Coconut record: ``question`` and ``answer`` text, ``steps`` a list of text."""
        question = field(rec, "question", where)
        steps = string_list(field(rec, "steps", where, list), "steps", where)
        return Example(question.strip(), tuple(s.strip() for s in steps), field(rec, "answer", where).strip())

    def cot_text(self, ex: Example) -> str:
        return " " + " ".join(ex.steps) + f" {COT_SEPARATOR} " + ex.answer


class ProntoQA(CoconutLogic):
    name = "prontoqa"
    folder = "prontoqa"
    default_train = 9000  # Coconut's ProntoQA train size

    def generate(self, n: int, seed: int) -> list[Example]:
        from rim.data.logic_gen import generate_prontoqa

        return generate_prontoqa(n, seed)


BENCHMARKS: dict[str, type[Task]] = {
    "gsm8k": GSM8K, "gsm-hard": GSMHard, "svamp": SVAMP, "multiarith": MultiArith,
    "prosqa": CoconutLogic, "prontoqa": ProntoQA,
}
