"""The paper's evaluation protocol: checkpoint selection on random splits of the test set, scored on the rest.

GSM8K test (1,319 problems) is split 16 times at random into 264 problems for selection and 1,055 for scoring;
each split picks the checkpoint with the most correct selection problems and scores it on its own scoring part;
the result is the mean over splits +- its standard error. A checkpoint is never scored on problems it was
selected on. The clean alternative selects on a separate validation split (``eval.select_split``) instead.
"""

from __future__ import annotations

import math
import random
import statistics


def split_protocol(correct: list[list[bool]], n_splits: int = 16, select_size: int = 264, seed: int = 0) -> dict:
    """Select-and-score over random splits; ``correct[c][i]``: checkpoint c got problem i right.

    Ties in selection go to the earliest checkpoint. Returns mean and standard error of the scoring accuracy,
    each split's score, chosen checkpoint index and selection problems.

    >>> r = split_protocol([[True, False, False, False], [True, True, True, True]], n_splits=4, select_size=2)
    >>> r["mean"], r["se"], r["chosen"]
    (1.0, 0.0, [1, 1, 1, 1])
    """
    n = len(correct[0])
    if any(len(row) != n for row in correct):
        raise ValueError("every checkpoint must be scored on the same problems")
    if not 0 < select_size < n:
        raise ValueError(f"select_size must be between 1 and {n - 1}, got {select_size}")
    rng = random.Random(seed)
    scores, chosen, selections = [], [], []
    for _ in range(n_splits):
        order = list(range(n))
        rng.shuffle(order)
        select, score = order[:select_size], order[select_size:]
        best = max(range(len(correct)), key=lambda c: (sum(correct[c][i] for i in select), -c))
        scores.append(sum(correct[best][i] for i in score) / len(score))
        chosen.append(best)
        selections.append(sorted(select))
    se = statistics.stdev(scores) / math.sqrt(n_splits) if n_splits > 1 else 0.0
    return {"mean": statistics.mean(scores), "se": se, "scores": scores, "chosen": chosen, "selections": selections,
            "n_splits": n_splits, "select_size": select_size, "score_size": n - select_size}
