"""The RiM attention mask (PAPER.md section 3): one forward pass trains every readout of an example.

Rules, with Q = question, B_k = block k, R_k = readout k (all of them also causal in physical order):

- Q attends to Q (plain causal);
- B_k attends to Q and to B_1..B_k, never to a readout;
- R_k attends to B_1..B_k and to its own tokens, to Q when ``readout_sees_question`` (default on), never to R_j, j != k;
- padding attends only to itself (so no softmax row is empty) and nothing attends to padding.
"""

from __future__ import annotations

import torch

from rim.core.layout import BLOCK, PAD, QUESTION, READOUT


def attention_mask(segment: torch.Tensor, index: torch.Tensor, readout_sees_question: bool = True) -> torch.Tensor:
    """Boolean mask, True where query i may attend to key j; shape (..., L, L) from (..., L) inputs.

    For the 2-step grounding layout ``q q | B B | s | B B | a`` (``#`` = attend)::

               q q B B s B B a
        q      # . . . . . . .
        q      # # . . . . . .
        B1     # # # . . . . .
        B1     # # # # . . . .
        r1     # # # # # . . .      <- with readout_sees_question=False the q columns are '.'
        B2     # # # # . # . .
        B2     # # # # . # # .
        r2     # # # # . # # #
    """
    seg_q, seg_k = segment.unsqueeze(-1), segment.unsqueeze(-2)  # (..., L, 1), (..., 1, L)
    idx_q, idx_k = index.unsqueeze(-1), index.unsqueeze(-2)
    length = segment.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment.device).tril()

    query_may_see_question = (seg_q == QUESTION) | (seg_q == BLOCK) | ((seg_q == READOUT) & readout_sees_question)
    sees_question = (seg_k == QUESTION) & query_may_see_question
    sees_block = (seg_k == BLOCK) & ((seg_q == BLOCK) | (seg_q == READOUT)) & (idx_k <= idx_q)
    sees_own_readout = (seg_k == READOUT) & (seg_q == READOUT) & (idx_k == idx_q)
    mask = (sees_question | sees_block | sees_own_readout) & causal
    is_pad = seg_q == PAD
    return mask | (is_pad & torch.eye(length, dtype=torch.bool, device=segment.device))


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, L, L) boolean mask -> (B, 1, L, L) additive float mask (0 = attend, dtype min = blocked).

    Hugging Face models take a 4-D mask as-is; a float mask works for both the eager and the SDPA backends,
    whereas eager attention would silently add a boolean mask as 0/1.
    """
    blocked = torch.finfo(dtype).min
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, blocked).unsqueeze(1)


def render_mask(mask: torch.Tensor) -> list[str]:
    """Draw a (L, L) boolean mask as rows of ``#`` (attend) and ``.`` (blocked)."""
    return ["".join("#" if v else "." for v in row) for row in mask.tolist()]
