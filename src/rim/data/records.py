"""Reading data records under one error policy, shared by every file loader.

A loader turns its source into ``(where, raw)`` items (``"train.jsonl, line 7"`` and that line's bytes, or
``"SVAMP.json, record 3"`` and that JSON value) and hands ``Records.collect`` a function that parses one raw item
into an Example or raises DataError naming ``where`` and the reason. The policy (``data.on_error``) decides:

- ``strict`` (the default): the first bad record stops loading, with its file, line (or record) and reason;
- ``skip``: bad records are dropped and counted by reason in ``Records.skipped[source]``, and one warning per
  source names the file, the counts and the first few records.

A problem of the whole source (a JSON list file that is not valid JSON or not UTF-8, or no good record at all)
stops loading under either policy.
"""

from __future__ import annotations

import codecs
import json
import math
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from rim.config import ON_ERROR
from rim.errors import DataError

SHOWN = 3  # bad records quoted in a skip warning

T = TypeVar("T")


def utf8(raw: bytes, start_of_file: bool = True) -> str:
    """``raw`` as UTF-8 text, without a byte-order mark if it starts the file (editors on Windows write one there;
    anywhere else it is a character). A UnicodeDecodeError counts its offsets in ``raw``, the mark included."""
    skip = len(codecs.BOM_UTF8) if start_of_file and raw.startswith(codecs.BOM_UTF8) else 0
    try:
        return raw[skip:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnicodeDecodeError("utf-8", raw, err.start + skip, err.end + skip, err.reason) from None


def decode(raw: bytes, where: str, start_of_file: bool = False) -> str:
    """``utf8(raw, start_of_file)``; bytes that are not UTF-8 raise DataError (with the offset) instead of a
    traceback."""
    try:
        return utf8(raw, start_of_file)
    except UnicodeDecodeError as err:
        raise DataError(f"{where}: not UTF-8 (byte {err.start}: {raw[err.start:err.start + 1]!r})",
                        "not UTF-8") from None


def parse_json(text: str, where: str) -> Any:
    """``json.loads(text)``; invalid JSON (or JSON nested too deep to read) raises DataError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(f"{where}: not valid JSON (nested too deeply)", "not JSON") from None
    except ValueError as err:  # JSONDecodeError, or an integer too long to convert
        raise DataError(f"{where}: not valid JSON ({getattr(err, 'msg', err)})", "not JSON") from None


def read_json_file(path: Path) -> Any:
    """The JSON value of a whole file; bad UTF-8 or JSON raise DataError naming the file and line."""
    data = path.read_bytes()
    try:
        return json.loads(utf8(data))
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise DataError(f"{path}, line {line}: not UTF-8 (byte {err.start} of the file)", "not UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg})", "not JSON") from None
    except (ValueError, RecursionError) as err:
        raise DataError(f"{path}: not valid JSON ({err!r})", "not JSON") from None


def field(rec: object, key: str, where: str, kinds: type | tuple[type, ...] = str) -> Any:
    """``rec[key]``, checked: not an object, a missing (or null) field, a value of another type (a bool is never a
    number) or a blank string raise DataError."""
    if not isinstance(rec, Mapping):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}", "wrong type")
    if rec.get(key) is None:
        raise DataError(f"{where}: missing field {key!r} (fields: {sorted(map(str, rec))})", "missing field")
    value = rec[key]
    if not isinstance(value, kinds) or isinstance(value, bool):
        raise DataError(f"{where}: field {key!r} has type {type(value).__name__}", "wrong type")
    if isinstance(value, str) and not value.strip():
        raise DataError(f"{where}: empty {key}", "empty")
    if isinstance(value, float) and not math.isfinite(value):  # JSON parsers read NaN and Infinity
        raise DataError(f"{where}: {key} {value} is not a number", "not a number")
    return value


def string_list(value: object, key: str, where: str) -> list[str]:
    """``value`` as a list of non-blank strings (reasoning steps); anything else raises DataError."""
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{where}: field {key!r} has type {type(value).__name__}", "wrong type")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DataError(f"{where}: every item of {key!r} must be a non-empty string (item {i} has type "
                            f"{type(item).__name__})", "wrong type")
        if not item.strip():
            raise DataError(f"{where}: every item of {key!r} must be a non-empty string (item {i} is blank)", "empty")
    return list(value)


class Records:
    """An error policy (``on_error``: strict or skip) and what it skipped, ``skipped[source][reason]``.

    A task holds one (``Task.records``); training also counts over-long examples here (``rim.methods.base``).
    """

    def __init__(self, on_error: str = "strict"):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, not {on_error!r}")
        self.on_error = on_error
        self.skipped: dict[str, dict[str, int]] = {}
        self.truncated: dict[str, int] = {}  # examples shortened to data.max_length, per source

    def total_skipped(self) -> int:
        """Records dropped so far, over every source and reason."""
        return sum(n for counts in self.skipped.values() for n in counts.values())

    def collect(self, source: str, items: Iterable[tuple[str, Any]], parse: Callable[[Any, str], T],
                limit: int | None = None) -> list[T]:
        """``parse(raw, where)`` of every item (only until ``limit`` good ones if set) under the policy."""
        out: list[T] = []
        bad: list[DataError] = []
        for where, raw in items:
            try:
                out.append(parse(raw, where))
            except DataError as err:
                if self.on_error == "strict":
                    raise
                bad.append(err)
            if limit is not None and len(out) >= limit:
                break
        if bad:
            self.skip(source, Counter(err.reason for err in bad), [str(err) for err in bad[:SHOWN]])
        if not out:
            raise DataError(f"{source}: no examples" + (f" ({len(bad)} bad records skipped)" if bad else ""))
        return out

    def lines(self, path: str | Path, parse: Callable[[str, str], T], limit: int | None = None) -> list[T]:
        """Every non-blank line of a UTF-8 text file, parsed by ``parse(line, where)`` (no line end) under the
        policy; ``where`` is ``"<path>, line <n>"``."""

        def parse_line(item: tuple[bytes, bool], where: str) -> T:
            raw, first = item
            return parse(decode(raw, where, first).rstrip("\r\n"), where)

        with open(path, "rb") as f:
            items = ((f"{path}, line {n}", (raw, n == 1)) for n, raw in enumerate(f, start=1) if raw.strip())
            return self.collect(str(path), items, parse_line, limit)

    def skip(self, source: str, counts: Counter, first: list[str]) -> None:
        """Record ``counts`` (reason -> records) dropped from ``source`` and warn, quoting the ``first`` few."""
        self.skipped[source] = dict(counts)  # set, not added: reading the same file again counts it once
        reasons = ", ".join(f"{reason}: {n}" for reason, n in counts.most_common())
        warnings.warn(f"{source}: skipped {counts.total()} records ({reasons}); first: {'; '.join(first)}",
                      stacklevel=2)
