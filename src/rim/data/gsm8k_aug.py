"""GSM8K-Aug: the ~385k augmented GSM8K training problems with equation-only steps (iCoT / Coconut / CODI).

The training set is not shipped with the benchmark files; it is read from a source you name:

- a local file: iCoT text (``.txt``, one ``question||<<a>> <<b>> #### answer`` per line), a JSON list of records
  (``.json``) or one record per line (``.jsonl``);
- a Hugging Face hub dataset id (``whynlp/gsm8k-aug``, ``zen-E/GSM8k-Aug``, ...) or a local dataset folder, read
  with ``datasets.load_dataset(source, split=train_split, revision=revision)`` (``pip install datasets``).

Each record is normalised to an Example whatever its schema (told apart by its keys)::

    {"question", "steps": [...] or "a b", "answer"}     Coconut JSON, whynlp/gsm8k-aug
    {"question", "cot": "a b" or [...], "answer"}       zen-E/GSM8k-Aug
    {"question", "answer": "... <<a>>a ... #### N"}     an original GSM8K solution (steps = its annotations)

``valid`` and ``test`` are GSM8K's (``rim.data.benchmarks.GSM8K``: the iCoT valid 500 and the GSM8K test 1,319
from the data directory), so a model trained here is evaluated on exactly the files ``gsm8k`` uses.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from pathlib import Path

from rim.data.benchmarks import GSM8K, NumericTask, format_number, gsm8k_steps, parse_icot_line, read_json_list
from rim.data.tasks import COT_SEPARATOR, DataError, Example

LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")
# a whole answer must be one plain number once commas are dropped: "18", "-3", "2.5", ".5"
_ANSWER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)")


def normalise_answer(answer: object, where: str) -> str:
    """The gold answer as text: stripped, commas dropped; a non-numeric answer raises DataError.

    >>> normalise_answer(" 1,000 ", "x"), normalise_answer(18, "x"), normalise_answer(2.5, "x")
    ('1000', '18', '2.5')
    """
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise DataError(f"{where}: field 'answer' has type {type(answer).__name__}")
    text = format_number(answer) if isinstance(answer, (int, float)) else answer.strip().replace(",", "")
    if not _ANSWER.fullmatch(text):
        raise DataError(f"{where}: answer {answer!r} is not a number")
    return text


def _steps(value: object, key: str, where: str) -> tuple[str, ...]:
    """Steps given as one string (split on whitespace, as Coconut does for iCoT) or as a list of strings."""
    if isinstance(value, str):
        return tuple(value.split())
    if isinstance(value, (list, tuple)):
        if not all(isinstance(s, str) and s.strip() for s in value):
            raise DataError(f"{where}: every item of {key!r} must be a non-empty string")
        return tuple(s.strip() for s in value)
    raise DataError(f"{where}: field {key!r} has type {type(value).__name__}")


def parse_record(rec: object, where: str) -> Example:
    """One GSM8K-Aug record in any of the known schemas (see the module docstring)."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a record with 'question' and 'answer', got {type(rec).__name__}")
    for key in ("question", "answer"):
        if rec.get(key) is None:
            raise DataError(f"{where}: missing field {key!r} (fields: {sorted(rec)})")
    question, answer = rec["question"], rec["answer"]
    if not isinstance(question, str) or not question.strip():
        raise DataError(f"{where}: field 'question' must be a non-empty string")
    step_key = next((k for k in ("steps", "cot") if rec.get(k) is not None), None)
    if step_key is not None:
        steps = _steps(rec[step_key], step_key, where)
        if isinstance(answer, str) and COT_SEPARATOR in answer:  # some dumps keep "#### N" in the answer
            answer = answer.rsplit(COT_SEPARATOR, 1)[1]
    elif isinstance(answer, str) and COT_SEPARATOR in answer:  # an original GSM8K solution
        steps, answer = gsm8k_steps(answer), answer.rsplit(COT_SEPARATOR, 1)[1]
    else:
        raise DataError(f"{where}: no 'steps' or 'cot' field and the answer has no '{COT_SEPARATOR}' solution "
                        f"(fields: {sorted(rec)})")
    return Example(question.strip(), steps, normalise_answer(answer, where))


def _icot_lines(path: Path) -> Iterator[Example]:
    """iCoT text lines; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                where = f"{path}, line {number}"
                ex = parse_icot_line(line.rstrip("\n"), where)
                yield Example(ex.question, ex.steps, normalise_answer(ex.answer, where))


def _jsonl_records(path: Path) -> Iterator[Example]:
    """One JSON record per line; errors name the file and line."""
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{where}: not valid JSON ({err.msg})") from None
            yield parse_record(rec, where)


def _json_records(path: Path) -> Iterator[Example]:
    """A JSON list of records; errors name the file and record index."""
    return (parse_record(rec, f"{path}, record {i}") for i, rec in enumerate(read_json_list(path)))


def _hub_records(source: str, split: str, revision: str | None) -> Iterator[Example]:
    """Rows of a hub dataset (or local dataset folder); errors name the source, split and record index."""
    try:
        import datasets  # imported here: only hub sources need it
    except ImportError:
        raise ImportError(f"loading {source!r} needs the Hugging Face datasets library: pip install datasets "
                          "(or give a local .txt / .json / .jsonl file)") from None
    rows: Iterable = datasets.load_dataset(source, split=split, revision=revision)
    return (parse_record(rec, f"{source} ({split} split), record {i}") for i, rec in enumerate(rows))


def read_gsm8k_aug(source: str, train_split: str = "train", revision: str | None = None,
                   limit: int | None = None) -> list[Example]:
    """The first ``limit`` (all if None) problems of a local file or hub dataset, as Examples."""
    path = Path(source).expanduser()
    if path.is_file():
        readers = {".txt": _icot_lines, ".jsonl": _jsonl_records, ".json": _json_records}
        if path.suffix not in readers:
            raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES} "
                             "or a hub dataset id")
        records = readers[path.suffix](path)
    elif path.suffix in LOCAL_SUFFIXES:
        # a file name that does not exist would otherwise be sent to the hub and fail there less clearly
        raise FileNotFoundError(f"GSM8K-Aug file not found: {path}")
    else:
        records = _hub_records(source, train_split, revision)
    # islice stops reading at the limit: a small max_train does not parse all 385k records
    out = list(islice(records, limit))
    if not out:
        raise DataError(f"{source}: no examples")
    return out


class GSM8KAug(NumericTask):
    """GSM8K-Aug: ``train`` from ``source`` (a local file or hub dataset id), ``valid`` / ``test`` from GSM8K."""

    name = "gsm8k-aug"

    def __init__(self, source: str = "whynlp/gsm8k-aug", data_dir: str | None = None, train_split: str = "train",
                 revision: str | None = None, max_train: int | None = None):
        super().__init__(data_dir)
        if max_train is not None and max_train < 1:
            raise ValueError(f"max_train must be a positive number of problems, not {max_train!r}")
        self.source, self.train_split, self.revision, self.max_train = source, train_split, revision, max_train
        self._train: list[Example] | None = None

    def load(self, split: str) -> list[Example]:
        if split in ("valid", "test"):
            return GSM8K(self.data_dir).load(split)
        if split != "train":
            raise ValueError(f"gsm8k-aug has splits ['train', 'valid', 'test'], not {split!r}")
        if self._train is None:  # kept: vocabulary() and training both read the 385k problems
            self._train = read_gsm8k_aug(self.source, self.train_split, self.revision, self.max_train)
        return list(self._train)
