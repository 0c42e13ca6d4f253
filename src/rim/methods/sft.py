"""The two supervised baselines: the answer right after the question (No-CoT), or after the steps as text (CoT)."""

from __future__ import annotations

from rim.core.layout import Readout, build_layout
from rim.methods.base import Method, register


@register
class NoCoT(Method):
    """Supervised fine-tuning on the answer right after the question."""

    name = "nocot"

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        return build_layout(ex.question, [[]], [Readout(ex.answer)], self.eos_id)


@register
class CoT(Method):
    """Supervised fine-tuning on the steps as text, then ``####`` and the answer."""

    name = "cot"
    cot = True

    def train_layout(self, ex, stage, epoch=0.0, rng=None):
        return build_layout(ex.question, [[]], [Readout(ex.cot)], self.eos_id)
