"""Training and inference layouts of RiM: which token goes where, with which position id and which label.

Glossary (PAPER.md sections 2-4): a *memory block* is ``<b> <m>*M </b>``; the question ``x`` is followed by
blocks ``m_1..m_n``; the *readout* ``r_k`` is the text the model must produce right after block ``k`` (a reasoning
step in the grounding stage, the answer in the refinement stage). In training all readouts of one example share
one physical sequence, interleaved::

    x  m_1  r_1  m_2  r_2  ...  m_n  r_n

and the attention mask (``rim.core.mask``) keeps every readout invisible to everything but itself. Position ids
number blocks as if the readouts were absent, so the last readout sees exactly what it sees at inference, where
the prompt is ``x m_1 .. m_K`` and the answer is decoded after it.

The same layout covers the baselines: No-CoT is one readout (the answer) after an empty block, CoT one readout
(steps + answer) after an empty block, pause tokens one readout after one block of pause tokens. With a single
block the RiM mask equals the plain causal mask, so nothing about them is special.

Labels sit at the position that *predicts* them (already shifted): the last token before a readout predicts its
first token, and the last readout token predicts EOS. This module is pure Python; it does not import torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

QUESTION, BLOCK, READOUT, PAD = 0, 1, 2, 3
SEGMENT_NAMES = {QUESTION: "question", BLOCK: "block", READOUT: "readout", PAD: "pad"}
IGNORE = -100  # label of a position that is not supervised


@dataclass(frozen=True)
class Readout:
    """One supervised readout: its tokens and what it stands for.

    ``step`` is the 1-based reasoning step t it grounds (0 for an answer readout); ``n_steps`` is the example's T.
    """

    ids: list[int]
    step: int = 0
    n_steps: int = 0


@dataclass
class Layout:
    """One laid-out example; all lists have the same length L (the physical sequence).

    ``segment`` is QUESTION/BLOCK/READOUT per token, ``index`` the 1-based block or readout number k (0 in the
    question), ``labels`` the next-token target at each position (IGNORE where unsupervised) and ``label_readout``
    the 0-based readout that each label belongs to (-1 where unsupervised). ``readouts`` keeps the readout metadata
    that the loss weights need.
    """

    input_ids: list[int] = field(default_factory=list)
    segment: list[int] = field(default_factory=list)
    index: list[int] = field(default_factory=list)
    position_ids: list[int] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    label_readout: list[int] = field(default_factory=list)
    readouts: list[Readout] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.input_ids)

    def _append(self, ids: list[int], segment: int, index: int, first_position: int) -> None:
        self.input_ids += ids
        self.segment += [segment] * len(ids)
        self.index += [index] * len(ids)
        self.position_ids += range(first_position, first_position + len(ids))
        self.labels += [IGNORE] * len(ids)
        self.label_readout += [-1] * len(ids)


def memory_block(begin_id: int, memory_id: int, end_id: int, m: int) -> list[int]:
    """Token ids of one memory block: ``<b>`` + M x ``<m>`` + ``</b>``.

    >>> memory_block(7, 8, 9, m=2)   # <b> <m> <m> </b>
    [7, 8, 8, 9]
    """
    if m < 1:
        raise ValueError(f"M (memory tokens per block) must be >= 1, got {m}")
    return [begin_id] + [memory_id] * m + [end_id]


def build_layout(question: list[int], blocks: list[list[int]], readouts: list[Readout], eos_id: int) -> Layout:
    """Lay out ``x, m_1, r_1, ..., m_n, r_n`` with position ids and shifted labels.

    ``blocks[k]`` are the tokens of block k+1 (may be empty, e.g. for No-CoT and CoT); readout k follows block k.
    Example with question ``q1 q2``, two blocks ``B B`` and readouts ``s`` and ``a`` (EOS = ``E``)::

        token     q1 q2 | B  B  | s  | B  B  | a
        segment    Q  Q | B  B  | R  | B  B  | R
        index      0  0 | 1  1  | 1  | 2  2  | 2
        position   0  1 | 2  3  | 4  | 4  5  | 6     <- blocks numbered as if readouts were absent
        label      .  . | .  s  | E  | .  a  | E     <- the last block token predicts the readout
    """
    if len(blocks) != len(readouts):
        raise ValueError(f"need one block per readout, got {len(blocks)} blocks and {len(readouts)} readouts")
    if not question:
        raise ValueError("empty question")
    out = Layout(readouts=list(readouts))
    out._append(question, QUESTION, 0, 0)
    next_block_position = len(question)
    for k, (block, readout) in enumerate(zip(blocks, readouts), start=1):
        out._append(block, BLOCK, k, next_block_position)
        next_block_position += len(block)
        anchor = len(out) - 1  # last token before the readout: it predicts the readout's first token
        out._append(readout.ids, READOUT, k, next_block_position)
        targets = readout.ids + [eos_id]
        for offset, target in enumerate(targets):
            out.labels[anchor + offset] = target
            out.label_readout[anchor + offset] = k - 1
    return out


def grounding_readouts(steps: list[list[int]], answer: list[int]) -> list[Readout]:
    """Stage 1 (grounding) readouts: step t after block t, then the answer after one extra block.

    >>> [(r.ids, r.step) for r in grounding_readouts([[5], [6]], [9])]
    [([5], 1), ([6], 2), ([9], 0)]
    """
    n = len(steps)
    return [Readout(s, step=t, n_steps=n) for t, s in enumerate(steps, start=1)] + [Readout(answer, 0, n)]


def refinement_readouts(answer: list[int], k: int, n_steps: int = 0) -> list[Readout]:
    """Stage 2 (refinement) readouts: the answer after every one of the K blocks.

    >>> [r.ids for r in refinement_readouts([9], k=3)]
    [[9], [9], [9]]
    """
    if k < 1:
        raise ValueError(f"K (number of memory blocks) must be >= 1, got {k}")
    return [Readout(answer, 0, n_steps) for _ in range(k)]


def inference_prompt(question: list[int], block: list[int], k: int) -> list[int]:
    """The inference prompt ``x + K blocks``; the answer is greedy-decoded after it.

    >>> inference_prompt([1, 2], [7, 8, 9], k=2)
    [1, 2, 7, 8, 9, 7, 8, 9]
    """
    return question + block * k
