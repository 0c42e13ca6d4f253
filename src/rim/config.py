"""Typed experiment configuration: one YAML file per experiment, strict dotted overrides on the command line.

    rim train configs/cpu/mult4x4_rim.yaml train.batch_size=16 stages.grounding.lr=3e-4 method.blocks=6

Unknown keys and values of the wrong type are errors that name the key. A stage is addressed by its name or its
position (``stages.0.lr``). The resolved config is written to every run directory.

A leaf of the package: it imports nothing of rim but ``rim.errors``, so every layer may import it. It owns the
vocabularies of its keys (the choices below) and what it checks of each method (``METHOD_FACTS``); the modules that
implement a choice import it from here. Task options are checked against the task's constructor by the data layer
(``rim.data.tasks.check_task_options``), when a command makes the task, before anything is written.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rim.errors import ConfigError

LATENT_METHODS = ("coconut", "codi")  # continuous thoughts fed back pass by pass (rim.methods.latent)
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive")  # accelerate's names
ON_ERROR = ("strict", "skip")  # data.on_error: what a loader does with a bad record (rim.data.records)
TOO_LONG = ("skip", "truncate")  # data.too_long: what becomes of a training example over data.max_length
STEP_SCHEDULES = ("linear", "constant")  # stages.*.step_weight: λ schedules (rim.core.curriculum)
BLOCK_SCHEDULES = ("linear", "uniform", "last")  # stages.*.block_weight: α schedules (rim.core.curriculum)
STAGE_KINDS = ("grounding", "refinement", "latent", "sft", "rl")
RL = "rl"  # the stage kind that trains the answer by reinforcement learning (GRPO; rim.train.rl)
CACHES = ("dynamic", "static")  # eval.cache: KV cache of decoding (rim.infer.generate)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile modes
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune", "cudagraphs")  # record CUDA graphs (on a GPU)
COMPILE_SCOPES = ("blocks", "decoder")  # train.compile_scope (rim.models.adapter.compile_model)
MEMORY_TOKENS = ("<b>", "<m>", "</b>")  # RiM's block start, memory token and block end


@dataclass(frozen=True)
class MethodFacts:
    """What the config checks of a method (``method.name``), known without importing the method's module.

    ``stage_kinds``: the curriculum stage kinds it trains with; ``memory_blocks``: it has one readout per memory
    block (``Method.any_block``); ``own_forward``: it overrides ``Method.forward`` (so ``train.fused_loss``, which
    fuses the standard forward with the loss, does not apply); ``special_tokens``: the tokens it adds to the
    vocabulary (``Method.special_tokens``; loading a trained LoRA run adds them to its base model again).
    ``rim.methods.base.register`` declares a plug-in's facts from its class and refuses a built-in class whose
    facts differ from the ones here.
    """

    stage_kinds: tuple[str, ...] = ("sft",)
    memory_blocks: bool = False
    own_forward: bool = False
    special_tokens: tuple[str, ...] = ()


METHOD_FACTS: dict[str, MethodFacts] = {  # the built-in methods; plug-ins add theirs with declare_method
    "nocot": MethodFacts(stage_kinds=("sft", RL)), "cot": MethodFacts(stage_kinds=("sft", RL)),
    "icot": MethodFacts(stage_kinds=("sft", RL)),
    "pause": MethodFacts(stage_kinds=("sft", RL), special_tokens=("<pause>",)),
    "coconut": MethodFacts(stage_kinds=("latent",), own_forward=True,
                           special_tokens=("<bot>", "<thought>", "<eot>")),
    "codi": MethodFacts(own_forward=True, special_tokens=("<bot>", "<thought>", "<eot>")),  # stage kinds: sft
    "rim": MethodFacts(stage_kinds=("grounding", "refinement", RL), memory_blocks=True, special_tokens=MEMORY_TOKENS),
}


def declare_method(name: str, facts: MethodFacts) -> None:
    """Make ``method.name: <name>`` valid in configs; a name declared with other facts is an error."""
    known = METHOD_FACTS.get(name)
    if known is not None and known != facts:
        raise ValueError(f"method {name!r} is declared as {known}, its class says {facts}")
    METHOD_FACTS[name] = facts


@dataclass
class ModelConfig:
    """Which model, and what of it trains."""

    name: str = "tiny"  # HF hub id, local directory, alias (smollm2-135m), or "tiny" (random init, see tiny_*)
    train_mode: str = "auto"  # lora: LoRA + the memory-token embedding rows; full: every weight; auto: full for tiny
    # (trained from scratch), lora otherwise
    lora_rank: int = 128
    lora_alpha: float | None = None  # None: equal to the rank
    lora_dropout: float = 0.0
    attn_implementation: str = "sdpa"  # must honour custom 4-D masks: sdpa or eager
    trust_remote_code: bool = False
    init_from: str | None = None  # start from a trained run's checkpoint (a run directory; e.g. CoT for Coconut)
    tiny_family: str = "llama"  # for name=tiny: llama or gpt2
    tiny_layers: int = 8
    tiny_hidden: int = 96
    tiny_heads: int = 4


@dataclass
class DataConfig:
    """Which task and data."""

    task: str = "running-sum"
    options: dict = field(default_factory=dict)  # task constructor options, e.g. {digits: 4} or {files: {...}}
    train_split: str = "train"
    eval_split: str = "test"
    max_train: int | None = None  # use only the first N training examples
    max_eval: int | None = None
    prompt_format: str = "plain"  # plain: the question text; chat: the tokenizer's chat template, one user turn
    on_error: str = "strict"  # a malformed record: strict stops with its file, line and reason; skip drops it,
    # counts it by reason (task.records.skipped) and warns (rim.data.records)
    max_length: int | None = None  # longest training sequence in tokens (any stage's layout); None: no limit
    too_long: str = "skip"  # a training example over max_length: skip (dropped and counted) or truncate (the
    # question's leading words are cut until it fits; steps and answer stay whole)


@dataclass
class MethodConfig:
    """The method and its settings: rim, cot, nocot, pause, coconut, codi or icot (``rim.methods``)."""

    name: str = "rim"
    memory_tokens: int = 2  # M, memory tokens per block
    blocks: int = 8  # K, blocks at inference (and in refinement unless a stage sets its own)
    readout_sees_question: bool = True  # rim: false hides the question from every readout (training and decoding)
    pause_tokens: int | None = None  # pause: N <pause> tokens; None: K (M + 2), the tokens of RiM's K blocks
    thoughts_per_step: int = 2  # coconut: c, continuous thoughts per replaced step
    max_latent_steps: int = 3  # coconut: steps replaced at most; stages beyond it drop all language steps
    inference_latent_steps: int | None = None  # coconut: steps' worth of thoughts at inference; None: the last
    # stage's (every checkpoint is scored in the form the run deploys)
    remove_per_epoch: float = 8.0  # icot: Δ, reasoning tokens removed from the front per epoch
    remove_smoothing: float | None = 4.0  # icot: λ of the removal offset P(o) ∝ exp(-λ o); None: off
    latents: int = 6  # codi: continuous thoughts between <bot> and <eot> (the paper's 6)
    projection: bool = True  # codi: each thought's hidden state passes an MLP + LayerNorm before it is fed back
    projection_dim: int | None = None  # codi: the MLP's inner width; None: the model's hidden size
    teacher_weight: float = 1.0  # codi: α, weight of the teacher's (CoT) cross-entropy
    student_weight: float = 1.0  # codi: β, weight of the student's (latent) cross-entropy
    distill_weight: float = 1.0  # codi: γ, weight of the distillation loss (the paper's GPT-2 1, Llama 20)
    distill_loss: str = "l1"  # codi: l1, smooth_l1 or l2 between the student's and teacher's hidden states
    distill_std: bool = True  # codi: divide each layer's distillation loss by the teacher states' std
    drop_last_step: bool = False  # codi: the teacher's CoT without its last step (CODI's released recipe drops it)
    step_supervision: bool = False  # coconut, codi: SIM-CoT's auxiliary decoder decodes each thought group's step
    step_supervision_weight: float = 1.0  # coconut, codi: weight of SIM-CoT's step-decoding loss
    step_decoder: str = "separate"  # separate (SIM-CoT: a trained copy of the LM) or shared (ours: the LM itself)


@dataclass
class StageConfig:
    """One curriculum stage. ``kind``: grounding (RiM stage 1), refinement (RiM stage 2), latent (Coconut stage
    ``latent_steps``), sft (the other methods) or rl (GRPO on the answer after the inference prompt, for every
    method that decodes a plain prompt: ``rim.train.rl``; its own keys are ``group_size`` to ``scale_rewards``)."""

    name: str = "sft"
    kind: str = "sft"
    epochs: float | None = None  # give epochs or steps
    steps: int | None = None
    lr: float = 1e-3
    warmup: float = 0.04  # fraction of the stage's optimizer steps
    weight_decay: float = 0.0
    dropout: float = 0.0
    step_weight: str = "linear"  # λ schedule of step readouts: linear (anneal 1 -> 0) or constant
    anneal_end: float = 1.0  # fraction of the stage by which every λ has reached 0
    block_weight: str = "linear"  # α schedule of answer readouts: linear, uniform or last
    blocks: int | None = None  # K for refinement; None: method.blocks
    reset_optimizer: bool = True  # fresh optimizer moments at this stage's start (each stage has its own warm-up)
    latent_steps: int | None = None  # latent stages: leading steps replaced by continuous thoughts
    group_size: int = 8  # rl: completions sampled per prompt (GRPO's group; train.batch_size prompts per batch)
    kl_weight: float = 0.04  # rl: β of the KL penalty to the policy at the stage's start (0: none, no reference kept)
    temperature: float = 1.0  # rl: sampling temperature of the completions (their log-probabilities use it too)
    scale_rewards: bool = True  # rl: divide each group's advantages by its reward std (GRPO); false: Dr. GRPO


@dataclass
class TrainConfig:
    """Optimisation and hardware."""

    batch_size: int = 32
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU
    precision: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU; or no / bf16 / fp16
    log_every: int = 10
    progress: bool = True
    save_every: int | None = None  # a resumable checkpoint every N optimizer steps (checkpoints/step-N)
    keep_last: int | None = None  # keep only the newest N of those (None: all, as the paper's protocol needs)
    supervised_logits: bool = True  # logits only where a label is (the vocabulary may be 128k); false: everywhere
    fused_loss: bool = False  # the loss fused with the LM head, a chunk of rows at a time: no logits tensor at all
    bucket_by_length: bool = False  # batches of examples of similar length (less padding), drawn from the seed
    gradient_checkpointing: bool = False  # recompute activations in the backward pass: less memory, one more forward
    compile: bool | str = False  # torch.compile the blocks or decoder (compile_scope): true, a mode (reduce-overhead:
    # CUDA graphs) or a backend; compiling costs time on the first batches
    compile_scope: str = "blocks"  # what train.compile compiles: each block on its own, or the whole decoder at once
    pad_to_multiple: int | None = None  # pad each batch's length up to a multiple of this: fewer shapes to compile
    fsdp: bool = False  # shard weights, gradients and optimizer state over the processes (torch FSDP2)
    trackers: list = field(default_factory=list)  # also log to these accelerate trackers: tensorboard, wandb, ...
    tracker_project: str = "rim"  # project / experiment name for the trackers


@dataclass
class EvalConfig:
    """Evaluation."""

    batch_size: int = 64
    blocks: int | None = None  # K at inference; None: method.blocks
    any_block: bool = True  # also decode after every block (RiM): any-block accuracy and per-block readouts
    latency_examples: int = 20  # problems timed one by one at batch 1 for TTFT and latency
    cache: str = "dynamic"  # KV cache of decoding: dynamic, or static (preallocated; what compile needs)
    compile: bool | str = False  # torch.compile the decoding steps (true, a mode such as reduce-overhead, or a backend)
    select_split: str | None = None  # evaluate on this split during training and keep the best checkpoint (best/)
    every: int | None = None  # ... every N optimizer steps (and at the end of each stage)
    select_max: int | None = None  # use only the first N problems of the selection split


@dataclass
class Config:
    """One experiment."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    stages: list[StageConfig] = field(default_factory=lambda: paper_stages())
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output_dir: str = "runs/run"
    overwrite: bool = False  # replace a finished run in output_dir (otherwise that is an error)


def paper_stages() -> list[StageConfig]:
    """The paper's curriculum (PAPER.md section 4): grounding for 6 epochs, then refinement for 2 epochs with the
    optimizer reset, a lower learning rate and more dropout (the two learning rates and dropouts are ours)."""
    return [StageConfig(name="grounding", kind="grounding", epochs=6, lr=1e-4, dropout=0.0, block_weight="uniform"),
            StageConfig(name="refinement", kind="refinement", epochs=2, lr=5e-5, dropout=0.1, block_weight="linear")]


def _check_type(value: Any, hint: Any, key: str) -> Any:
    """Check (and gently coerce int -> float) a value against a type hint; raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for option in typing.get_args(hint):
            if option is type(None):
                continue
            try:
                return _check_type(value, option, key)
            except ConfigError as err:
                errors.append(err)
        raise errors[0]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    expected = origin or hint
    if expected is Any or (isinstance(value, expected) and not (expected is int and isinstance(value, bool))):
        return value
    advice = (" (YAML reads unquoted no, yes, off and on as booleans: quote the word, e.g. precision: 'no')"
              if expected is str and isinstance(value, bool) else "")
    raise ConfigError(f"config key {key!r}: expected {getattr(expected, '__name__', expected)}, "
                      f"got {type(value).__name__} {value!r}{advice}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r}: expected a mapping, "
                          f"got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown config key {prefix + unknown[0]!r}; {cls.__name__} has {sorted(names)}")
    kwargs = {}
    for name, value in data.items():
        key, hint = prefix + name, hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value, key + ".")
        elif name == "stages":
            if not isinstance(value, list) or not value:
                raise ConfigError("config key 'stages': expected a non-empty list of stages")
            kwargs[name] = [_build(StageConfig, s, f"stages.{i}.") for i, s in enumerate(value)]
        else:
            kwargs[name] = _check_type(value, hint, key)
    return cls(**kwargs)


def _apply_override(data: dict, dotted: str, value: Any) -> None:
    """Set ``a.b.c=value`` in a nested dict; list items by index or by their ``name``."""
    node: Any = data
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            matches = [j for j, s in enumerate(node)
                       if str(j) == part or (isinstance(s, dict) and s.get("name") == part)]
            if not matches:
                raise ConfigError(f"config key {dotted!r}: no stage {part!r}")
            part = matches[0]
        elif not isinstance(node, dict):
            raise ConfigError(f"config key {dotted!r}: {'.'.join(parts[:i])!r} is not a mapping")
        if last:
            node[part] = value
        else:
            if isinstance(node, dict) and part not in node:
                node[part] = {}
            node = node[part]


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (or the defaults) and apply ``key=value`` overrides (values parsed as YAML)."""
    data = {}
    if path is not None:
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {err}") from None
    data = to_dict(_build(Config, data, ""))  # fill defaults so overrides can reach any key
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, raw = item.split("=", 1)
        _apply_override(data, key.strip(), yaml.safe_load(raw))
    config = _build(Config, data, "")
    validate(config)
    return config


def bad_compile(value: bool | str) -> str | None:
    """What ``eval.compile``, ``train.compile`` (or ``--compile-mode``) must be, when ``value`` is not that; None
    when it is. Imports dynamo (about a second) only for a name that is not one of the modes."""
    if isinstance(value, bool) or value in COMPILE_MODES:
        return None
    from torch._dynamo import list_backends

    if value in list_backends(exclude_tags=()):
        return None
    return (f"true, false, a mode ({', '.join(COMPILE_MODES)}) or a torch.compile backend (such as eager or "
            "inductor; torch._dynamo.list_backends(exclude_tags=()) lists them)")


def validate(cfg: Config) -> None:
    """Range and choice checks that types cannot express."""
    compile_want, train_compile_want = bad_compile(cfg.eval.compile), bad_compile(cfg.train.compile)
    graphs = cfg.train.compile in CUDA_GRAPH_MODES
    facts = METHOD_FACTS.get(cfg.method.name)
    kinds = facts.stage_kinds if facts else ()
    checks = [
        (facts is not None, "method.name", f"one of {', '.join(sorted(METHOD_FACTS))}"),
        (cfg.method.memory_tokens >= 1, "method.memory_tokens", ">= 1"),
        (cfg.method.pause_tokens is None or cfg.method.pause_tokens >= 1, "method.pause_tokens", ">= 1"),
        (cfg.method.thoughts_per_step >= 1, "method.thoughts_per_step", ">= 1"),
        (cfg.method.max_latent_steps >= 1, "method.max_latent_steps", ">= 1"),
        (cfg.method.inference_latent_steps is None or cfg.method.inference_latent_steps >= 0,
         "method.inference_latent_steps", ">= 0"),
        (cfg.method.remove_per_epoch >= 0, "method.remove_per_epoch", ">= 0"),
        (cfg.method.remove_smoothing is None or cfg.method.remove_smoothing > 0, "method.remove_smoothing", "> 0"),
        (cfg.data.prompt_format in ("plain", "chat"), "data.prompt_format", "plain or chat"),
        (cfg.data.on_error in ON_ERROR, "data.on_error", " or ".join(ON_ERROR)),
        (cfg.data.too_long in TOO_LONG, "data.too_long", " or ".join(TOO_LONG)),
        (cfg.data.max_length is None or cfg.data.max_length >= 1, "data.max_length", ">= 1"),
        (cfg.data.max_train is None or cfg.data.max_train >= 1, "data.max_train", ">= 1"),
        (cfg.data.max_eval is None or cfg.data.max_eval >= 1, "data.max_eval", ">= 1"),
        (cfg.method.blocks >= 1, "method.blocks", ">= 1"),
        (cfg.model.train_mode in ("auto", "lora", "full"), "model.train_mode", "auto, lora or full"),
        (cfg.model.lora_rank >= 1, "model.lora_rank", ">= 1"),
        (cfg.model.lora_alpha is None or cfg.model.lora_alpha > 0, "model.lora_alpha", "> 0"),
        (0 <= cfg.model.lora_dropout < 1, "model.lora_dropout", "in [0, 1)"),
        (cfg.model.tiny_family in ("llama", "gpt2"), "model.tiny_family", "llama or gpt2"),
        (min(cfg.model.tiny_layers, cfg.model.tiny_hidden, cfg.model.tiny_heads) >= 1,
         "model.tiny_layers/tiny_hidden/tiny_heads", ">= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size", ">= 1"),
        (cfg.train.grad_accum >= 1, "train.grad_accum", ">= 1"),
        (cfg.train.max_grad_norm >= 0, "train.max_grad_norm", ">= 0 (0: no clipping)"),
        (cfg.train.log_every >= 1, "train.log_every", ">= 1"),
        (cfg.train.precision in ("auto", "no", "bf16", "fp16"), "train.precision", "auto, no, bf16 or fp16"),
        (not (cfg.train.fsdp and cfg.train.precision == "fp16"), "train.precision",
         "auto, no or bf16 with train.fsdp (fp16 would need a sharded gradient scaler)"),
        (cfg.method.readout_sees_question or (facts is not None and facts.memory_blocks),
         "method.readout_sees_question", "true for methods without memory blocks (their answers are decoded under "
         "a causal mask, which shows the question; hiding it in training only would train another model)"),
        (not (cfg.train.fsdp and cfg.method.name in LATENT_METHODS), "train.fsdp",
         f"false for {cfg.method.name} (its latent passes embed outside the model's forward, where FSDP holds only "
         "shards)"),
        (cfg.method.latents >= 1, "method.latents", ">= 1"),
        (cfg.method.projection_dim is None or cfg.method.projection_dim >= 1, "method.projection_dim", ">= 1"),
        (min(cfg.method.teacher_weight, cfg.method.student_weight, cfg.method.distill_weight,
             cfg.method.step_supervision_weight) >= 0,
         "method.teacher_weight/student_weight/distill_weight/step_supervision_weight", ">= 0"),
        (cfg.method.distill_loss in ("l1", "smooth_l1", "l2"), "method.distill_loss", "l1, smooth_l1 or l2"),
        (cfg.method.step_decoder in ("separate", "shared"), "method.step_decoder", "separate or shared"),
        (not cfg.method.step_supervision or cfg.method.name in LATENT_METHODS, "method.step_supervision",
         f"false for {cfg.method.name} (SIM-CoT supervises continuous thoughts: coconut or codi)"),
        (not (cfg.model.name == "tiny" and cfg.model.train_mode == "lora"), "model.train_mode",
         "'full' for model.name=tiny (a randomly initialised model is trained from scratch)"),
    ]
    for i, stage in enumerate(cfg.stages):
        key = f"stages.{i}"
        checks += [
            (stage.kind in STAGE_KINDS, f"{key}.kind", f"{', '.join(STAGE_KINDS[:-1])} or {STAGE_KINDS[-1]}"),
            ((stage.epochs is None) != (stage.steps is None), f"{key}.epochs/steps", "exactly one of the two set"),
            (stage.epochs is None or stage.epochs > 0, f"{key}.epochs", "> 0"),
            (stage.steps is None or stage.steps >= 1, f"{key}.steps", ">= 1"),
            (stage.lr > 0, f"{key}.lr", "> 0"),
            (stage.weight_decay >= 0, f"{key}.weight_decay", ">= 0"),
            (stage.step_weight in STEP_SCHEDULES, f"{key}.step_weight", " or ".join(STEP_SCHEDULES)),
            (stage.block_weight in BLOCK_SCHEDULES, f"{key}.block_weight", ", ".join(BLOCK_SCHEDULES)),
            (0 <= stage.warmup < 1, f"{key}.warmup", "in [0, 1)"),
            (0 <= stage.dropout < 1, f"{key}.dropout", "in [0, 1)"),
            (0 < stage.anneal_end <= 1, f"{key}.anneal_end", "in (0, 1]"),
            (stage.blocks is None or stage.blocks >= 1, f"{key}.blocks", ">= 1"),
            (not kinds or stage.kind in kinds, f"{key}.kind", f"one of {', '.join(kinds)} for {cfg.method.name}"),
            (stage.latent_steps is None or stage.latent_steps >= 0, f"{key}.latent_steps", ">= 0"),
            (stage.group_size >= 2, f"{key}.group_size", ">= 2 (GRPO's advantages compare completions of a prompt)"),
            (stage.kl_weight >= 0, f"{key}.kl_weight", ">= 0"),
            (stage.temperature > 0, f"{key}.temperature", "> 0"),
        ]
        if stage.kind == RL:
            checks += [
                (cfg.method.readout_sees_question, "method.readout_sees_question",
                 f"true with an rl stage ({key}): its completions are sampled after the plain inference prompt"),
                (not cfg.train.fsdp, "train.fsdp", f"false with an rl stage ({key}; sampling from sharded weights is "
                 "untested)"),
                (not graphs, "train.compile", f"not a CUDA-graph mode with an rl stage ({key}): its sequences change "
                 "length with every sampled batch"),
            ]
    checks += [
        (cfg.eval.select_split not in ("test", cfg.data.eval_split), "eval.select_split",
         "a split other than the scored one (the test split is never used for selection)"),
        (cfg.eval.select_split is None or cfg.eval.select_split != cfg.data.train_split, "eval.select_split",
         "a split other than data.train_split (selecting on training problems measures memory)"),
        (cfg.eval.every is None or cfg.eval.every >= 1, "eval.every", ">= 1"),
        (cfg.eval.every is None or cfg.eval.select_split is not None, "eval.select_split",
         "set when eval.every is set"),
        (cfg.train.save_every is None or cfg.train.save_every >= 1, "train.save_every", ">= 1"),
        (cfg.train.keep_last is None or cfg.train.keep_last >= 1, "train.keep_last", ">= 1"),
        (all(t in TRACKERS for t in cfg.train.trackers), "train.trackers", f"a list of {', '.join(TRACKERS)}"),
        (not (cfg.train.gradient_checkpointing and cfg.method.name in LATENT_METHODS), "train.gradient_checkpointing",
         f"false for {cfg.method.name} (its latent passes need the KV cache, which checkpointing turns off)"),
        (not cfg.train.fused_loss or cfg.train.supervised_logits, "train.fused_loss",
         "false when train.supervised_logits is false (it computes the loss at the supervised positions only)"),
        (not cfg.train.fused_loss or not (facts and facts.own_forward),
         "train.fused_loss", f"false for {cfg.method.name} (its forward pass is not the standard one)"),
        (train_compile_want is None, "train.compile", train_compile_want),
        (cfg.train.compile_scope in COMPILE_SCOPES, "train.compile_scope", " or ".join(COMPILE_SCOPES)),
        (cfg.train.compile_scope == "blocks" or not (cfg.train.compile and cfg.train.fsdp), "train.compile_scope",
         "blocks with train.fsdp (FSDP shards the model block by block; a compiled decoder with it is untested)"),
        (cfg.train.pad_to_multiple is None or cfg.train.pad_to_multiple >= 1, "train.pad_to_multiple", ">= 1"),
        (not graphs or cfg.train.pad_to_multiple is not None, "train.pad_to_multiple",
         f"set when train.compile is {cfg.train.compile} (CUDA graphs are recorded once per batch shape, length "
         "and batch size; a multiple of 8 to 64 keeps the padding and the number of lengths small)"),
        (not graphs or cfg.method.name not in LATENT_METHODS, "train.compile",
         f"not a CUDA-graph mode for {cfg.method.name} (its latent passes change the sequence length pass by pass)"),
        (not graphs or not (cfg.train.fsdp or cfg.train.gradient_checkpointing),
         "train.compile", "not a CUDA-graph mode with train.fsdp or train.gradient_checkpointing (untested: FSDP "
         "gathers weights inside the blocks, and checkpointing reruns their forward inside the backward)"),
        (cfg.eval.select_max is None or cfg.eval.select_max >= 1, "eval.select_max", ">= 1"),
        (cfg.eval.batch_size >= 1, "eval.batch_size", ">= 1"),
        (cfg.eval.blocks is None or cfg.eval.blocks >= 1, "eval.blocks", ">= 1"),
        (cfg.eval.latency_examples >= 0, "eval.latency_examples", ">= 0"),
        (cfg.eval.cache in CACHES, "eval.cache", " or ".join(CACHES)),
        (not cfg.eval.compile or cfg.eval.cache == "static", "eval.compile", "false unless eval.cache is static"),
        (compile_want is None, "eval.compile", compile_want),
    ]
    for ok, key, want in checks:
        if not ok:
            raise ConfigError(f"config key {key!r} must be {want}")
    if cfg.model.train_mode == "auto":
        cfg.model.train_mode = "full" if cfg.model.name == "tiny" else "lora"


def inference_blocks(cfg: Config) -> int:
    """K at inference where a command gives none: ``eval.blocks``, else the trained ``method.blocks``."""
    return cfg.eval.blocks or cfg.method.blocks


def to_dict(cfg: Config) -> dict:
    """The config as plain data (for YAML)."""
    return dataclasses.asdict(cfg)


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config data as ``{dotted key: value}``; list items by index (``stages.0.lr``)."""
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return {prefix[:-1]: data}
    out: dict[str, Any] = {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}{key}."))
    return out


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
