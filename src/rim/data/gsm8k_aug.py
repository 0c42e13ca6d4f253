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

from collections.abc import Iterable
from pathlib import Path

from rim.data.benchmarks import GSM8K, NumericTask, gsm8k_steps, json_records, normalise_answer, parse_icot_line
from rim.data.records import DataError, Records, field, parse_json, string_list
from rim.data.tasks import COT_SEPARATOR, Example, unknown_split

LOCAL_SUFFIXES = (".txt", ".json", ".jsonl")


def _steps(value: object, key: str, where: str) -> tuple[str, ...]:
    """Steps given as one string (split on whitespace, as Coconut does for iCoT) or as a list of strings."""
    if isinstance(value, str):
        return tuple(value.split())
    return tuple(s.strip() for s in string_list(value, key, where))


def parse_record(rec: object, where: str) -> Example:
    """One GSM8K-Aug record in any of the known schemas (see the module docstring)."""
    question = field(rec, "question", where)
    answer = field(rec, "answer", where, (str, int, float))
    step_key = next((k for k in ("steps", "cot") if rec.get(k) is not None), None)
    if step_key is not None:
        steps = _steps(rec[step_key], step_key, where)
        if isinstance(answer, str) and COT_SEPARATOR in answer:  # some dumps keep "#### N" in the answer
            answer = answer.rsplit(COT_SEPARATOR, 1)[1]
    elif isinstance(answer, str) and COT_SEPARATOR in answer:  # an original GSM8K solution
        steps, answer = gsm8k_steps(answer), answer.rsplit(COT_SEPARATOR, 1)[1]
    else:
        raise DataError(f"{where}: no 'steps' or 'cot' field and the answer has no '{COT_SEPARATOR}' solution "
                        f"(fields: {sorted(rec)})", "missing field")
    return Example(question.strip(), steps, normalise_answer(answer, where))


def _parse_line(line: str, where: str) -> Example:
    return parse_record(parse_json(line, where), where)


def _hub_rows(source: str, split: str, revision: str | None) -> Iterable:
    """Rows of a hub dataset (or local dataset folder)."""
    try:
        import datasets  # imported here: only hub sources need it
    except ImportError:
        raise ImportError(f"loading {source!r} needs the Hugging Face datasets library: pip install datasets "
                          "(or give a local .txt / .json / .jsonl file)") from None
    return datasets.load_dataset(source, split=split, revision=revision)


def read_gsm8k_aug(source: str, train_split: str = "train", revision: str | None = None,
                   limit: int | None = None, records: Records | None = None) -> list[Example]:
    """The first ``limit`` (all if None) good problems of a local file or hub dataset, as Examples. A bad record
    raises DataError naming the file and line (or the source, split and record index), or is skipped and counted
    under ``records``' policy; reading stops at the limit, so a small max_train does not parse all 385k records."""
    records = records or Records()
    path = Path(source).expanduser()
    if path.is_file():
        if path.suffix == ".txt":
            return records.lines(path, parse_icot_line, limit)
        if path.suffix == ".jsonl":
            return records.lines(path, _parse_line, limit)
        if path.suffix == ".json":
            return records.collect(str(path), json_records(path), parse_record, limit)
        raise ValueError(f"{path}: unsupported file type {path.suffix!r}; use one of {LOCAL_SUFFIXES} "
                         "or a hub dataset id")
    if path.suffix in LOCAL_SUFFIXES:
        # a file name that does not exist would otherwise be sent to the hub and fail there less clearly
        raise FileNotFoundError(f"GSM8K-Aug file not found: {path}")
    where = f"{source} ({train_split} split)"
    rows = enumerate(_hub_rows(source, train_split, revision))
    return records.collect(where, ((f"{where}, record {i}", rec) for i, rec in rows), parse_record, limit)


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
            gsm8k = GSM8K(self.data_dir)
            gsm8k.records = self.records  # the same policy for bad records, and one place for their counts
            return gsm8k.load(split)
        if split != "train":
            raise unknown_split(self.name, split, ["train", "valid", "test"])
        if self._train is None:  # kept: vocabulary() and training both read the 385k problems
            self._train = read_gsm8k_aug(self.source, self.train_split, self.revision, self.max_train,
                                         self.records)
        return list(self._train)
