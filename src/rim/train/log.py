"""What training reports: events in the run's ``metrics.jsonl`` (and the configured trackers), the decoded layout
of one example per stage (``layout.txt``, ``rim show-layout``) and the config as flat scalars for trackers."""

from __future__ import annotations

from rim.config import Config, StageConfig, flatten, to_dict
from rim.core.batch import collate
from rim.core.layout import IGNORE, Layout
from rim.core.show import format_layout
from rim.methods.base import stage_prompt
from rim.rundir import RunDir
from rim.train.loss import stage_weights

RL_STATS = ("reward", "signal", "completion_tokens", "ended", "kl")  # what an rl stage's train events add


class RunLog:
    """JSONL metrics (always) and, through ``accelerator``, the configured trackers (TensorBoard, W&B, ...): the
    training loss and learning rate per stage, and selection accuracy. Only the main process writes."""

    def __init__(self, run: RunDir, enabled: bool = True, accelerator=None):
        self.run, self.enabled, self.accelerator = run, enabled, accelerator

    def write(self, **record) -> None:
        """Append one event (``event=...`` and its fields) to ``metrics.jsonl``; pass the loss and selection on."""
        if self.enabled:
            self.run.append_event(record)
        if self.accelerator is not None and self.accelerator.trackers:
            if record.get("event") == "train":
                extra = {f"rl/{key}": record[key] for key in RL_STATS if key in record}
                self.accelerator.log({f"loss/{record['stage']}": record["loss"], "lr": record["lr"], **extra},
                                     step=record["step"])
            elif record.get("event") == "select":
                self.accelerator.log({f"select/{record['split']}_accuracy": record["accuracy"]}, step=record["step"])


def describe_layout(layout: Layout, tokenizer, stage: StageConfig, sees_question: bool = True,
                    progress: float = 0.0) -> str:
    """``format_layout`` with token strings from the tokenizer and the stage's loss weights at ``progress``."""
    tokens = tokenizer.convert_ids_to_tokens(layout.input_ids)
    labels = [tokenizer.convert_ids_to_tokens(t) if t != IGNORE else "" for t in layout.labels]
    weights = stage_weights(collate([layout], pad_id=0), stage, progress)[0].tolist()
    return format_layout(layout, tokens, labels, weights, sees_question)


def describe_prompt(method, example, stage: StageConfig, tokenizer) -> str:
    """An rl stage's view of an example: the inference prompt its completions are sampled after, and the reward."""
    prompt = stage_prompt(method, example, stage)
    return (f"prompt ({len(prompt)} tokens): {' '.join(tokenizer.convert_ids_to_tokens(prompt))}\n"
            f"then {stage.group_size} completions sampled at temperature {stage.temperature}; reward 1 where the "
            f"answer is correct ({example.example.answer!r}), else 0; GRPO loss, KL weight {stage.kl_weight}")


def flat_config(cfg: Config) -> dict:
    """The config as ``{dotted key: value}`` with plain values (trackers take only scalars)."""
    return {key: value if isinstance(value, (int, float, str, bool)) else str(value)
            for key, value in flatten(to_dict(cfg)).items()}
