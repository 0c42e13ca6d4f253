"""iCoT-SI, stepwise internalization (Deng et al., 2024): CoT fine-tuning in which the reasoning tokens are removed
from the front as training goes on, ``method.remove_per_epoch`` (Δ) tokens per epoch, until the model answers
right after the question. No latent tokens. With ``method.remove_smoothing`` (λ) each example removes o extra
tokens, P(o) ∝ exp(-λ o), which smooths the jump at each removal step.

Not included: the optimizer reset at every removal step of the original recipe (stages reset it instead).
"""

from __future__ import annotations

import math
import random

from rim.core.layout import Readout, build_layout
from rim.methods.base import Method, register, split_cot, tokenize_example


def removal_offset(rng: random.Random, smoothing: float) -> int:
    """Extra tokens to remove: o >= 0 with P(o) ∝ exp(-smoothing * o) (a geometric distribution).

    >>> removal_offset(random.Random(0), 1e9)
    0
    """
    keep = 1.0 - math.exp(-smoothing)  # P(stop at each o)
    o = 0
    while rng.random() >= keep:
        o += 1
    return o


@register
class ICoTSI(Method):
    """``question  reasoning[r:]  #### answer`` with r growing over training; answer extracted after ``####``."""

    name = "icot"
    cot = True
    dynamic = True

    def tokenize(self, task, tokenizer, ex, prompt_format="plain"):
        out = tokenize_example(task, tokenizer, ex, prompt_format)
        out.extra["reasoning"], out.extra["tail"] = split_cot(task, tokenizer, ex)
        return out

    def removed(self, epoch: float, rng: random.Random | None = None) -> int:
        """Reasoning tokens removed from the front at ``epoch`` epochs into the stage."""
        r = math.floor(self.cfg.remove_per_epoch * epoch + 1e-9)
        if rng is not None and self.cfg.remove_smoothing is not None:
            r += removal_offset(rng, self.cfg.remove_smoothing)
        return r

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        reasoning = ex.extra["reasoning"][self.removed(epoch, rng):]
        return build_layout(ex.question, [[]], [Readout(reasoning + ex.extra["tail"])], self.eos_id)
