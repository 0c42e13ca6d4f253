"""Draw one laid-out training example: tokens, segment of each, the mask as ``#``/``.``, the loss weights."""

from __future__ import annotations

import torch

from rim.core.layout import IGNORE, SEGMENT_NAMES, Layout
from rim.core.mask import attention_mask, render_mask


def format_layout(layout: Layout, token_strings: list[str], label_strings: list[str], weights: list[float],
                  readout_sees_question: bool = True) -> str:
    """A table with one row per token (position, token, segment+k, position id, label, weight, mask row)."""
    mask = render_mask(attention_mask(torch.tensor(layout.segment), torch.tensor(layout.index),
                                      readout_sees_question))
    width = max(len(t) for t in token_strings + ["token"])
    lines = [f"{'i':>4} {'token':<{width}} {'segment':<10} {'pos':>4} {'predicts':<12} {'weight':>7}  mask"]
    for i, tok in enumerate(token_strings):
        seg = SEGMENT_NAMES[layout.segment[i]] + (f" {layout.index[i]}" if layout.index[i] else "")
        label = label_strings[i] if layout.labels[i] != IGNORE else ""
        weight = f"{weights[i]:.3f}" if layout.labels[i] != IGNORE else ""
        lines.append(f"{i:>4} {tok:<{width}} {seg:<10} {layout.position_ids[i]:>4} {label:<12} {weight:>7}  {mask[i]}")
    return "\n".join(lines)
