"""The paper's benchmarks from their original files: GSM8K, GSM-Hard, SVAMP, MultiArith, ProsQA, ProntoQA.

Files live under one data directory (``data.options.data_dir`` or the ``RIM_DATA_DIR`` environment variable),
laid out as in ``../shared/data`` (see its SOURCES.md): ``gsm8k/train.jsonl``, ``gsm8k_aug_icot/valid.txt``, ...

GSM8K reasoning steps are the calculator annotations of the solution, in order: exactly the equation-only steps
of GSM8K-Aug::

    "Natalia sold 48/2 = <<48/2=24>>24 clips ... 48+24 = <<48+24=72>>72 clips ... #### 72"
    -> steps ("<<48/2=24>>", "<<48+24=72>>"), answer "72"

Numeric answers are compared as numbers (``1,000`` == ``1000.0``).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from rim.data.tasks import COT_SEPARATOR, DataError, Example, Task

_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


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
    """The first number in ``text`` (commas and ``$`` ignored), or None.

    >>> parse_number(" $1,234.5 dollars"), parse_number("none")
    (1234.5, None)
    """
    match = _NUMBER.search(text.replace("$", ""))
    if match is None:
        return None
    try:
        return float(match.group().replace(",", ""))
    except ValueError:
        return None


def format_number(value: float) -> str:
    """``18.0`` -> ``"18"``, ``2.5`` -> ``"2.5"``: the answer text a model is trained to produce."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def gsm8k_steps(solution: str) -> tuple[str, ...]:
    """The ``<<expr=result>>`` annotations of a GSM8K solution, in order."""
    return tuple(f"<<{expr}>>" for expr in _ANNOTATION.findall(solution.split("####")[0]))


def parse_gsm8k_record(line: str, where: str) -> Example:
    """One line of the original GSM8K JSONL."""
    try:
        rec = json.loads(line)
        question, solution = rec["question"], rec["answer"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise DataError(f"{where}: not a GSM8K record ({err})") from None
    if "####" not in solution:
        raise DataError(f"{where}: the answer has no '####' final answer")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if parse_number(answer) is None:
        raise DataError(f"{where}: final answer {answer!r} is not a number")
    return Example(question.strip(), gsm8k_steps(solution), answer)


def parse_icot_line(line: str, where: str) -> Example:
    """One iCoT text line ``question||step step ... #### answer`` (steps split on whitespace, as Coconut does)."""
    if "||" not in line or "####" not in line:
        raise DataError(f"{where}: expected 'question||steps #### answer'")
    question, rest = line.split("||", 1)
    cot, answer = rest.rsplit("####", 1)
    if not question.strip() or not answer.strip():
        raise DataError(f"{where}: empty question or answer")
    return Example(question.strip(), tuple(cot.split()), answer.strip().replace(",", ""))


def read_lines(path: Path, parse) -> list[Example]:
    """Parse every non-empty line of a text file; errors name the file and line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                out.append(parse(line.rstrip("\n"), f"{path}, line {number}"))
    return out


def read_json_list(path: Path) -> list:
    """A JSON file holding one list."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err.msg}, line {err.lineno})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list")
    return data


class NumericTask(Task):
    """A math word-problem task: answers are numbers, compared as numbers."""

    max_new_tokens = 12
    cot_tokens_per_step = 16

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
            raise ValueError(f"gsm8k has splits {[*self.FILES, 'train_no_valid']}, not {split!r}")
        path = self.file(self.FILES[split])
        return read_lines(path, parse_icot_line if path.suffix == ".txt" else parse_gsm8k_record)


class GSMHard(NumericTask):
    """GSM-Hard (PAL): GSM8K test questions with larger numbers; ``test`` only, no steps."""

    name = "gsm-hard"
    test_file = "gsm_hard/gsmhardv2.jsonl"  # PAL's {"input", "target"} records

    def load(self, split: str) -> list[Example]:
        if split != "test":
            raise ValueError(f"{self.name} has only a test split, not {split!r}")
        return read_lines(self.file(self.test_file), self._parse)

    @staticmethod
    def _parse(line: str, where: str) -> Example:
        try:
            rec = json.loads(line)
            return Example(rec["input"].strip(), (), format_number(float(rec["target"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
            raise DataError(f"{where}: not a PAL record with 'input' and 'target' ({err})") from None


class MultiArith(GSMHard):
    """MultiArith (PAL's copy): ``test`` only, no steps."""

    name = "multiarith"
    test_file = "multiarith/mawpsmultiarith.jsonl"


class SVAMP(NumericTask):
    """SVAMP: 1,000 problems, body + question; ``test`` only, no steps."""

    name = "svamp"

    def load(self, split: str) -> list[Example]:
        if split != "test":
            raise ValueError(f"svamp has only a test split, not {split!r}")
        path = self.file("svamp/SVAMP.json")
        out = []
        for i, rec in enumerate(read_json_list(path)):
            try:
                question = f"{rec['Body'].strip()} {rec['Question'].strip()}"
                out.append(Example(question, (), format_number(float(rec["Answer"]))))
            except (KeyError, TypeError, ValueError, AttributeError) as err:
                raise DataError(f"{path}, item {i}: not a SVAMP record ({err})") from None
        return out


class CoconutLogic(Task):
    """ProsQA / ProntoQA in Coconut's JSON (``question``, ``steps``, ``answer``): ``valid`` and ``test`` from the
    shipped files; ``train`` generated by rule (``rim.data.logic_gen``; Coconut's train sizes by default), with
    every shipped valid/test question left out."""

    name = "prosqa"
    folder = "prosqa"
    default_train = 17886  # Coconut's ProsQA train size
    max_new_tokens = 32
    cot_tokens_per_step = 24

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
            raise ValueError(f"{self.name} has splits train (generated), valid and test, not {split!r}")
        path = data_file(self.data_dir, f"{self.folder}/{self.folder}_{split}.json")
        out = []
        for i, rec in enumerate(read_json_list(path)):
            try:
                out.append(Example(rec["question"].strip(), tuple(s.strip() for s in rec["steps"]),
                                   rec["answer"].strip()))
            except (KeyError, TypeError, AttributeError) as err:
                raise DataError(f"{path}, item {i}: not a Coconut record ({err})") from None
        return out

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
