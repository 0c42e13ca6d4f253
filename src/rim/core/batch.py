"""Pad a list of layouts into one training batch of tensors (right padding)."""

from __future__ import annotations

import torch

from rim.core.layout import IGNORE, PAD, Layout


def _pad(rows: list[list[int]], value: int, length: int) -> torch.Tensor:
    return torch.tensor([r + [value] * (length - len(r)) for r in rows], dtype=torch.long)


def collate(layouts: list[Layout], pad_id: int, multiple: int = 1) -> dict[str, torch.Tensor]:
    """Batch layouts: per-token tensors (B, L) and per-readout metadata (B, R).

    L is the longest layout rounded up to a multiple of ``multiple``: with compiled blocks, fewer distinct shapes
    mean fewer recompiles, and CUDA graphs are recorded once per shape (``train.pad_to_multiple``).

    Per token: ``input_ids``, ``segment``, ``index``, ``position_ids``, ``labels``, ``label_readout``.
    Per readout: ``readout_step`` (t, 0 for answers), ``readout_n_steps`` (T), ``readout_block`` (k);
    ``n_blocks`` (B, 1). Padded positions get segment PAD, label IGNORE and readout -1. ``supervised`` (N,): the
    flat indices into (B, L) of the positions with a label, made here on the host so that training can compute
    logits only there without a device sync.
    """
    length = -(-max(len(x) for x in layouts) // multiple) * multiple
    n_readouts = max(len(x.readouts) for x in layouts)
    batch = {
        "input_ids": _pad([x.input_ids for x in layouts], pad_id, length),
        "segment": _pad([x.segment for x in layouts], PAD, length),
        "index": _pad([x.index for x in layouts], 0, length),
        "position_ids": _pad([x.position_ids for x in layouts], 0, length),
        "labels": _pad([x.labels for x in layouts], IGNORE, length),
        "label_readout": _pad([x.label_readout for x in layouts], -1, length),
        "readout_step": _pad([[r.step for r in x.readouts] for x in layouts], 0, n_readouts),
        "readout_n_steps": _pad([[r.n_steps for r in x.readouts] for x in layouts], 0, n_readouts),
        "readout_block": _pad([list(range(1, len(x.readouts) + 1)) for x in layouts], 0, n_readouts),
    }
    batch["n_blocks"] = torch.tensor([[len(x.readouts)] for x in layouts], dtype=torch.long)
    batch["supervised"] = supervised_positions(batch["labels"])
    return batch


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices (N,) of the positions of ``labels`` (B, L) that hold a label, in row-major order.

    >>> supervised_positions(torch.tensor([[IGNORE, 5], [6, IGNORE]])).tolist()
    [1, 2]
    """
    return (labels.flatten() != IGNORE).nonzero().squeeze(1)
