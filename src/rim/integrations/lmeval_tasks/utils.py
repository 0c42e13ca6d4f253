"""lm-eval loads ``!function utils.NAME`` from this file: rim's dataset loader and scoring
(``rim.integrations.lmeval``)."""

from rim.integrations.lmeval import rim_dataset, rim_results  # noqa: F401
