"""Golden tests of the paper's math: layouts, masks, position ids, λ/α schedules, weighted loss."""

import math

import pytest
import torch

from rim.core.batch import collate
from rim.core.curriculum import block_weight, readout_weights, step_weight, token_weights, weighted_readout_loss
from rim.core.layout import (
    BLOCK, IGNORE, QUESTION, READOUT, Readout, build_layout, grounding_readouts, inference_prompt, memory_block,
    refinement_readouts,
)
from rim.core.mask import additive_mask, attention_mask, render_mask

Q = [10, 11]
BLK = memory_block(1, 2, 3, m=1)  # <b> <m> </b>
STEPS, ANSWER, EOS = [[20], [21]], [30], 0
_ = IGNORE


def grounding():
    readouts = grounding_readouts(STEPS, ANSWER)
    return build_layout(Q, [BLK] * len(readouts), readouts, EOS)


def refinement(k=2):
    return build_layout(Q, [BLK] * k, refinement_readouts(ANSWER, k), EOS)


def mask_of(layout, sees_question=True):
    return render_mask(attention_mask(torch.tensor(layout.segment), torch.tensor(layout.index), sees_question))


def test_memory_block_and_prompt():
    assert memory_block(7, 8, 9, m=3) == [7, 8, 8, 8, 9]
    assert inference_prompt(Q, BLK, 2) == [10, 11, 1, 2, 3, 1, 2, 3]
    with pytest.raises(ValueError, match="M"):
        memory_block(7, 8, 9, m=0)
    with pytest.raises(ValueError, match="K"):
        refinement_readouts(ANSWER, 0)


def test_grounding_layout_literal():
    lay = grounding()
    assert lay.input_ids == [10, 11, 1, 2, 3, 20, 1, 2, 3, 21, 1, 2, 3, 30]
    assert lay.segment == [QUESTION] * 2 + ([BLOCK] * 3 + [READOUT]) * 3
    assert lay.index == [0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3]
    assert lay.position_ids == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8, 8, 9, 10, 11]
    assert lay.labels == [_, _, _, _, 20, 0, _, _, 21, 0, _, _, 30, 0]
    assert lay.label_readout == [-1, -1, -1, -1, 0, 0, -1, -1, 1, 1, -1, -1, 2, 2]
    assert [(r.step, r.n_steps) for r in lay.readouts] == [(1, 2), (2, 2), (0, 2)]


def test_refinement_layout_literal():
    lay = refinement(k=2)
    assert lay.input_ids == [10, 11, 1, 2, 3, 30, 1, 2, 3, 30]
    assert lay.position_ids == [0, 1, 2, 3, 4, 5, 5, 6, 7, 8]
    assert lay.labels == [_, _, _, _, 30, 0, _, _, 30, 0]
    assert lay.label_readout == [-1, -1, -1, -1, 0, 0, -1, -1, 1, 1]


def test_last_readout_positions_equal_inference():
    lay = refinement(k=3)
    last = [i for i, (s, k) in enumerate(zip(lay.segment, lay.index)) if not (s == READOUT and k < 3)]
    assert [lay.input_ids[i] for i in last] == inference_prompt(Q, BLK, 3) + ANSWER
    assert [lay.position_ids[i] for i in last] == list(range(len(last)))


GROUNDING_MASK = [
    "#.............",
    "##............",
    "###...........",
    "####..........",
    "#####.........",
    "######........",
    "#####.#.......",
    "#####.##......",
    "#####.###.....",
    "#####.####....",
    "#####.###.#...",
    "#####.###.##..",
    "#####.###.###.",
    "#####.###.####",
]


def test_grounding_mask_literal_both_flags():
    assert mask_of(grounding()) == GROUNDING_MASK
    no_q = list(GROUNDING_MASK)
    no_q[5], no_q[9], no_q[13] = "..####........", "..###.####....", "..###.###.####"
    assert mask_of(grounding(), sees_question=False) == no_q


def test_refinement_mask_literal_both_flags():
    expected = [
        "#.........",
        "##........",
        "###.......",
        "####......",
        "#####.....",
        "######....",
        "#####.#...",
        "#####.##..",
        "#####.###.",
        "#####.####",
    ]
    assert mask_of(refinement()) == expected
    expected[5], expected[9] = "..####....", "..###.####"
    assert mask_of(refinement(), sees_question=False) == expected


def test_single_empty_block_is_plain_causal():
    """No-CoT / CoT: one readout after an empty block is an ordinary causal LM example."""
    lay = build_layout(Q, [[]], [Readout([20, 21, 30])], EOS)
    assert lay.labels == [_, 20, 21, 30, 0]
    assert lay.position_ids == [0, 1, 2, 3, 4]
    assert mask_of(lay) == ["#" * i + "." * (5 - i) for i in range(1, 6)]


def test_padding_rows_and_columns():
    batch = collate([refinement(1), refinement(2)], pad_id=99)
    mask = attention_mask(batch["segment"], batch["index"])
    assert batch["input_ids"].shape == (2, 10)
    assert (batch["input_ids"][0, 6:] == 99).all() and (batch["labels"][0, 6:] == IGNORE).all()
    assert not mask[0, :6, 6:].any()                       # nothing real attends to padding
    assert torch.equal(mask[0, 6:, 6:], torch.eye(4, dtype=torch.bool))  # padding sees only itself
    assert batch["n_blocks"].tolist() == [[1], [2]]
    add = additive_mask(mask, torch.float32)
    assert add.shape == (2, 1, 10, 10) and add[0, 0, 0, 0] == 0 and add[0, 0, 0, 1] == torch.finfo(torch.float32).min


def test_step_weight_endpoints_monotone_earliest_first_relative_to_t():
    t4 = torch.arange(1, 5)
    assert step_weight(t4, torch.tensor(4), 0.0).tolist() == [1, 1, 1, 1]
    assert step_weight(t4, torch.tensor(4), 1.0).tolist() == [0, 0, 0, 0]
    assert step_weight(t4, torch.tensor(4), 0.5).tolist() == [0, 0, 1, 1]
    assert step_weight(t4, torch.tensor(4), 0.625).tolist() == [0, 0, 0.5, 1]
    grid = torch.linspace(0, 1, 21)
    curves = torch.stack([step_weight(t4, torch.tensor(4), float(p)) for p in grid])  # (21, 4)
    assert (curves[1:] <= curves[:-1]).all()                 # non-increasing in progress
    assert (curves[:, :-1] <= curves[:, 1:]).all()           # earlier steps never weigh more: earliest first
    # relative to each sample's own T: a 2-step and an 8-step sample are both half annealed at progress 0.5
    assert step_weight(torch.arange(1, 3), torch.tensor(2), 0.5).tolist() == [0, 1]
    assert step_weight(torch.arange(1, 9), torch.tensor(8), 0.5).tolist() == [0, 0, 0, 0, 1, 1, 1, 1]
    # anneal_end: all steps annealed once progress reaches it, then stays 0
    assert step_weight(t4, torch.tensor(4), 0.8, anneal_end=0.8).sum() == 0
    assert step_weight(t4, torch.tensor(4), 0.9, schedule="constant").tolist() == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="unknown step weight"):
        step_weight(t4, torch.tensor(4), 0.5, schedule="cosine")


def test_block_weight_increasing():
    k = torch.arange(1, 9)
    alpha = block_weight(k, torch.tensor(8))
    assert alpha[-1] == 1 and math.isclose(alpha[0].item(), 1 / 8) and (alpha[1:] > alpha[:-1]).all()
    assert block_weight(k, torch.tensor(8), "uniform").tolist() == [1.0] * 8
    assert block_weight(k, torch.tensor(8), "last").tolist() == [0.0] * 7 + [1.0]


def test_readout_weights_mix_steps_and_answer():
    batch = collate([grounding()], pad_id=99)
    w = readout_weights(batch["readout_step"], batch["readout_n_steps"], batch["readout_block"], batch["n_blocks"],
                        progress=0.5, block_schedule="uniform")
    assert w.tolist() == [[0.0, 1.0, 1.0]]  # λ_1 annealed, λ_2 on, answer 1


def test_weighted_loss_is_weighted_mean_of_readout_means():
    torch.manual_seed(0)
    label_readout = torch.tensor([[-1, 0, 0, 1, 1, 1]])
    labels = torch.tensor([[IGNORE, 1, 2, 3, 4, 0]])
    logits = torch.randn(1, 6, 5)
    weights = torch.tensor([[0.25, 1.0]])
    tw = token_weights(label_readout, weights)
    assert torch.allclose(tw, torch.tensor([[0, 0.125, 0.125, 1 / 3, 1 / 3, 1 / 3]]))
    nll = torch.nn.functional.cross_entropy(logits[0], labels[0].clamp(min=0), reduction="none")
    expected = (0.25 * nll[1:3].mean() + 1.0 * nll[3:].mean()) / 1.25
    assert torch.allclose(weighted_readout_loss(logits, labels, tw), expected)
    zero = weighted_readout_loss(logits, labels, torch.zeros_like(tw))
    assert zero.item() == 0.0
