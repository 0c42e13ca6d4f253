"""An exported model folder (``rim export``) read back: its ``rim.json`` and the prompt rule it records.

The prompt is built by rim's own ``question_ids`` (plain: the question with the tokenizer's special tokens; chat:
one user turn of the chat template with the assistant prompt) followed by the exported suffix, so every engine
driven from here sees exactly the token ids ``rim answer`` and ``rim eval`` decode after.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rim.config import ConfigError
from rim.methods.base import question_ids

REQUIRED = ("method", "prompt_format", "prompt_suffix_ids", "blocks")


def read_meta(folder: str | Path) -> dict:
    """``rim.json`` of an exported folder; a missing file or key is a ConfigError naming the file."""
    path = Path(folder) / "rim.json"
    if not path.is_file():
        raise ConfigError(f"{path}: not found; is {folder} a folder written by `rim export`?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as err:
        raise ConfigError(f"{path}: not JSON ({err})") from None
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ConfigError(f"{path}: missing key {missing[0]!r} (written by an older rim? export again)")
    return meta


@dataclass
class PromptRule:
    """How an exported model is prompted: the question in ``prompt_format``, then ``suffix_ids``; for a method
    with memory blocks, ``block`` is one block's ids (the suffix is ``block`` * K)."""

    prompt_format: str
    suffix_ids: list[int]
    blocks: int | None
    block: list[int] | None

    @classmethod
    def from_meta(cls, meta: dict) -> PromptRule:
        """The rule ``rim.json`` records; the suffix of a method with blocks must be one block K times."""
        ids, k = list(meta["prompt_suffix_ids"]), meta["blocks"]
        block = None
        if k is not None:
            if k < 1 or len(ids) % k:
                raise ConfigError(f"rim.json: prompt_suffix_ids ({len(ids)} ids) are not {k} equal blocks")
            block = ids[:len(ids) // k]
            if block * k != ids:
                raise ConfigError(f"rim.json: prompt_suffix_ids are not one block repeated {k} times")
        return cls(meta["prompt_format"], ids, k, block)

    def suffix(self, blocks: int | None = None) -> list[int]:
        """The suffix for K = ``blocks`` (default: the exported K); K applies to methods with memory blocks only."""
        if blocks is None:
            return list(self.suffix_ids)
        if self.block is None:
            raise ConfigError("blocks: this model's method has no memory blocks")
        if blocks < 1:
            raise ConfigError(f"blocks must be >= 1, not {blocks}")
        return self.block * blocks

    def prompt(self, tokenizer, question: str, blocks: int | None = None) -> list[int]:
        """Token ids to decode after: rim's ``question_ids`` of the question, then the suffix."""
        return question_ids(tokenizer, question, self.prompt_format) + self.suffix(blocks)
