"""The ``rim`` command line: thin handlers over the library.

    rim demo [--methods all]                   # No-CoT vs CoT vs RiM (and peers) on a synthetic task, tiny model, CPU
    rim train CONFIG [key=value ...] [--resume auto]   # one experiment; writes a run directory
    rim eval RUN [--split test] [--blocks K]   # final-block / any-block accuracy, predictions.jsonl
    rim compare SPEC                           # several methods on one model, data and budget; one table
    rim campaign SPEC --out DIR [--smoke]      # every job as concurrent processes, calibrated, before a deadline
    rim answer RUN "question" [--blocks K]     # answers as JSON lines
    rim export RUN OUT [--gguf f32]            # a standard Hugging Face checkpoint with a model card (and a GGUF)
    rim lm-eval OUT --tasks rim_gsm8k          # lm-evaluation-harness on an exported model, rim's tasks and scoring
    rim plot RUN / rim analyze RUN             # loss, accuracy vs K, per-block accuracy / PCA and probes
    rim show-layout CONFIG [key=value ...]     # one decoded training example per stage
    rim bench all --shape tiny                 # speed: latency and training against the baselines"""

from __future__ import annotations

import argparse
import json
import os
import sys


def positive(text: str) -> int:
    """An argparse type: an integer >= 1 (0 would otherwise read as "not given" further down)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def positive_list(text: str) -> list[int]:
    """An argparse type: comma-separated integers >= 1."""
    try:
        return [positive(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"want comma-separated integers >= 1, not {text!r}") from None


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, not {value}")
    return value


def cmd_demo(args: argparse.Namespace) -> None:
    from rim.demo import run_demo

    from rim.demo import ALL_METHODS

    methods = ALL_METHODS if args.methods == "all" else tuple(m.strip() for m in args.methods.split(","))
    run_demo(args.out, seed=args.seed, methods=methods, overrides=args.overrides)


def cmd_train(args: argparse.Namespace) -> None:
    from rim.config import load_config
    from rim.train.loop import train

    run_dir = train(load_config(args.config, args.overrides), resume=args.resume)
    print(f"run directory: {run_dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from rim.config import ConfigError
    from rim.eval.run import eval_protocol, eval_run

    if args.protocol == "splits":
        if args.checkpoint != "checkpoint":
            raise ConfigError("--protocol splits scores every saved checkpoint; it takes no --checkpoint")
        summary = eval_protocol(args.run, args.split, args.n_splits, args.select_size, device=args.device,
                                max_eval=args.max_eval, blocks=args.blocks, task_name=args.task,
                                overrides=decoding_overrides(args))
        print(f"accuracy {100 * summary['mean']:.2f} +- {100 * summary['se']:.2f} (mean +- SE over "
              f"{summary['n_splits']} splits; selection on {summary['select_size']}, scoring on "
              f"{summary['score_size']}); checkpoints chosen: {sorted(set(summary['chosen_names']))}")
        return
    result = eval_run(args.run, split=args.split, blocks=args.blocks, max_eval=args.max_eval, device=args.device,
                      checkpoint=args.checkpoint, task_name=args.task, overrides=decoding_overrides(args))
    print(json.dumps(result.metrics, indent=2))


def cmd_show_layout(args: argparse.Namespace) -> None:
    from rim.config import load_config
    from rim.data.tasks import make_task
    from rim.methods.base import make_method, method_class
    from rim.models.load import build_model
    from rim.config import RL
    from rim.train.log import describe_layout, describe_prompt

    cfg = load_config(args.config, args.overrides)
    task = make_task(cfg.data.task, cfg.data.options, on_error=cfg.data.on_error)
    _, tokenizer, _ = build_model(cfg.model, task, tokens=method_class(cfg.method.name).special_tokens)
    method = make_method(cfg.method, tokenizer)
    example = method.tokenize(task, tokenizer, task.load(cfg.data.train_split)[args.index], cfg.data.prompt_format)
    for stage in cfg.stages:
        print(f"== stage {stage.name} ({stage.kind}), loss weights at stage progress {args.progress} ==")
        print(describe_prompt(method, example, stage, tokenizer) if stage.kind == RL else
              describe_layout(method.train_layout(example, stage), tokenizer, stage,
                              cfg.method.readout_sees_question, args.progress))


def cmd_compare(args: argparse.Namespace) -> None:
    from rim.compare import collect_runs, demo_spec_path, run_compare
    from rim.config import ConfigError

    if args.collect:
        if args.spec or args.overrides or args.retrain:
            raise ConfigError("--collect reports existing run directories; it takes no SPEC, overrides or --retrain")
        collect_runs(args.collect, args.out)
        return
    spec, overrides = args.spec, args.overrides
    if spec is not None and "=" in spec and not os.path.exists(spec):  # `rim compare a.b=1`: the demo spec
        spec, overrides = None, [spec, *overrides]
    run_compare(spec or demo_spec_path(), overrides, retrain=args.retrain)


def cmd_campaign(args: argparse.Namespace) -> None:
    from rim.campaign.report import report_from_pack
    from rim.campaign.run import run_campaign
    from rim.config import ConfigError

    if args.report:
        if args.spec or args.smoke:
            raise ConfigError("--report reads packed files; it takes no SPEC or --smoke")
        report_from_pack(args.report, args.to or os.path.join(args.report, "report"))
    elif args.spec:
        run_campaign(args.spec, args.out, smoke=args.smoke)
    else:
        raise ConfigError("give a campaign SPEC, or --report DIR")


def cmd_bench(args: argparse.Namespace) -> int:
    from rim.bench import BenchSettings, markdown, run_bench
    from rim.bench.cost import CostSettings, default_recipes

    settings = BenchSettings(question_tokens=args.question_tokens, batch_sizes=tuple(args.batch_sizes),
                             train_batch=args.train_batch, train_mode=args.train_mode, warmup=args.warmup,
                             repeats=args.repeats, static_cache=args.static_cache,
                             compile=compile_setting(args), compile_train=compile_train_modes(args.compile_train),
                             compile_scopes=compile_scopes(args.compile_scope, args.compile_train),
                             profile=args.profile)
    cost = CostSettings(recipes=tuple(args.recipes) if args.recipes else
                        (default_recipes() if args.suite == "epoch" else ()),
                        task=args.epoch_task, split=args.epoch_split, tokenizer=args.tokenizer,
                        batch=args.train_batch, samples=args.repeats, warmup=args.warmup,
                        max_examples=args.epoch_examples, sweep_batches=tuple(args.sweep_batches),
                        sweep_repeats=args.repeats)
    results = run_bench(args.suite, args.shape, args.device, args.out, settings, cost)
    print(markdown(results), end="")
    print(f"written: {args.out}/bench-{args.shape}-{args.suite}.json and .md")
    failed = [f"{stage}/{name}" for stage, rows in (results.get("train") or {}).items() if isinstance(rows, dict)
              for name, row in rows.items() if isinstance(row, dict) and "error" in row]
    if failed:
        print(f"rim: error: rows that failed (the others were measured): {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def cmd_answer(args: argparse.Namespace) -> None:
    from pathlib import Path

    from rim.config import ConfigError
    from rim.serve import answer, open_run, read_questions

    if (args.question is None) == (args.file is None):
        raise ConfigError("give one QUESTION, or --file F (- for standard input), not both")
    if args.file is None and args.question != "-":
        if not args.question.strip():
            raise ConfigError("the question is empty")
        lines, source = [args.question], "the question"
    elif (args.file or "-") == "-":
        lines, source = sys.stdin, "standard input"  # read as it comes: each answer before the next question
    else:
        lines, source = Path(args.file).read_text(encoding="utf-8").splitlines(), args.file
    served = open_run(args.run, args.checkpoint, args.device, args.blocks, args.max_new_tokens,
                      decoding_overrides(args))
    for record in answer(served, read_questions(lines, source), args.block_readouts):
        print(json.dumps(record), flush=True)


def cmd_export(args: argparse.Namespace) -> None:
    from rim.serve import export_run

    print(f"exported: {export_run(args.run, args.out, args.checkpoint, args.blocks, args.max_new_tokens)}")
    if args.gguf:
        from rim.integrations.llamacpp import convert

        print(f"GGUF: {convert(args.out, args.gguf)}")


def cmd_lm_eval(args: argparse.Namespace) -> None:
    if args.tasks_dir:
        from rim.integrations.lmeval import tasks_dir

        print(tasks_dir())
        return
    if args.export is None:
        from rim.config import ConfigError

        raise ConfigError("rim lm-eval: give the exported folder (rim export RUN OUT), e.g. rim lm-eval OUT --tasks "
                          "rim_demo")
    from rim.integrations.lmeval import run

    run(args.export, args.lm_eval_args)


def cmd_plot(args: argparse.Namespace) -> None:
    from rim.plots import plot_run

    for path in plot_run(args.run, args.split, args.max_eval, args.checkpoint, args.device, args.max_blocks):
        print(f"written: {path}")


def cmd_analyze(args: argparse.Namespace) -> None:
    from rim.analyze import analyze_run, summary

    print(summary(analyze_run(args.run, args.checkpoints, args.probe_split, args.score_split, args.max, args.device,
                              args.l2)), end="")


def compile_train_modes(value: str | None) -> tuple[str, ...]:
    """``--compile-train [MODES]``: the compile modes (or backends) to time RiM's training step in."""
    from rim.config import ConfigError, bad_compile

    modes = tuple(m.strip() for m in value.split(",")) if value else ()
    for mode in modes:
        want = bad_compile(mode)
        if want is not None:
            raise ConfigError(f"--compile-train: {mode!r} is neither a compile mode nor a backend; want {want}")
    return modes


def compile_scopes(value: str | None, modes: str | None = "default") -> tuple[str, ...]:
    """``--compile-scope SCOPES``: what ``--compile-train`` (``modes``) compiles (``train.compile_scope``'s values;
    blocks when not given)."""
    from rim.config import ConfigError
    from rim.config import COMPILE_SCOPES

    if value is None:
        return ("blocks",)
    if not modes:
        raise ConfigError("--compile-scope times compiled steps: give --compile-train too")
    scopes = tuple(dict.fromkeys(s.strip() for s in value.split(",")))
    if not scopes or not set(scopes) <= set(COMPILE_SCOPES):
        raise ConfigError(f"--compile-scope: want {' and/or '.join(COMPILE_SCOPES)}, comma-separated; not {value!r}")
    return scopes


def compile_setting(args: argparse.Namespace) -> bool | str:
    """``--compile`` / ``--compile-mode MODE``: False, True (the device's default mode) or the mode."""
    from rim.config import ConfigError, bad_compile

    if args.compile_mode is None:
        return args.compile
    want = bad_compile(args.compile_mode)
    if want is not None:
        raise ConfigError(f"--compile-mode must be {want}, not {args.compile_mode!r}")
    return args.compile_mode


def decoding_overrides(args: argparse.Namespace) -> list[str]:
    """``--cache`` and ``--compile`` (``--compile-mode``) as overrides of the run's ``eval.cache`` and
    ``eval.compile``: compiling implies the static cache it needs, and ``--cache dynamic`` without ``--compile``
    also turns off a compile the run's config sets."""
    compile = compile_setting(args)
    cache = args.cache or ("static" if compile else None)
    overrides = [f"eval.cache={cache}"] if cache else []
    if compile or cache == "dynamic":
        overrides.append(f"eval.compile={compile}")
    return overrides


def add_compile_flags(p: argparse.ArgumentParser, what: str) -> None:
    """Two flags rather than one with an optional value, which would take a positional argument after it."""
    p.add_argument("--compile", action="store_true",
                   help=f"{what}; mode reduce-overhead (CUDA graphs) on a GPU, inductor's default elsewhere")
    p.add_argument("--compile-mode", default=None, metavar="MODE",
                   help="--compile with this mode: default, reduce-overhead, max-autotune, "
                        "max-autotune-no-cudagraphs, or a torch.compile backend (eager: tracing only)")


def add_decoding_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", choices=["dynamic", "static"], default=None,
                   help="KV cache of decoding (default: eval.cache of the run, dynamic)")
    add_compile_flags(p, "torch.compile the decoding steps (static cache)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rim", description="Reasoning in Memory (RiM): latent reasoning with "
                                     "memory blocks for Hugging Face causal LMs.")
    parser.add_argument("--data-dir", default=None, help="folder of the benchmark data files (sets RIM_DATA_DIR)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="train No-CoT, CoT and RiM on a synthetic task with a tiny model and compare")
    p.add_argument("--out", default="runs/demo", help="output directory (default: runs/demo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="nocot,cot,rim",
                   help="comma-separated methods (nocot, cot, rim, pause, icot, coconut) or 'all' "
                        "(default: nocot,cot,rim)")
    p.add_argument("overrides", nargs="*", help="config overrides for every method, e.g. train.batch_size=32")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train one experiment from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. stages.grounding.lr=3e-4")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from the newest intact checkpoints/step-N of the run (auto) or from PATH")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="evaluate a run directory")
    p.add_argument("run", help="run directory written by `rim train`")
    p.add_argument("--split", default=None, help="split to score (default: data.eval_split of the run)")
    p.add_argument("--blocks", type=positive, default=None, help="K, memory blocks at inference (default: trained K)")
    p.add_argument("--max-eval", type=positive, default=None, help="score only the first N problems")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--task", default=None, help="score another task (out of distribution), e.g. gsm-hard, svamp")
    p.add_argument("--checkpoint", default="checkpoint",
                   help="checkpoint (final, default), best (best on eval.select_split) or checkpoints/step-N")
    p.add_argument("--protocol", choices=["single", "splits"], default="single",
                   help="splits: the paper's protocol over every saved checkpoint (train.save_every): select on "
                        "random subsets of the split, score on the rest, mean +- SE")
    p.add_argument("--n-splits", type=positive, default=16)
    p.add_argument("--select-size", type=positive, default=264)
    add_decoding_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("compare", help="train and score several methods on one model, data and budget; one table")
    p.add_argument("spec", nargs="?", default=None,
                   help="compare spec YAML (default: the packaged No-CoT / CoT / RiM demo comparison)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for every method, e.g. train.batch_size=32")
    p.add_argument("--retrain", action="store_true", help="train every run again, even finished ones")
    p.add_argument("--collect", nargs="+", metavar="RUN_DIR", default=None,
                   help="only report these scored run directories (row label: the folder name)")
    p.add_argument("--out", default="runs/compare/collected", help="report folder for --collect")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("campaign", help="every method x seed of a spec as concurrent processes on one device, sized by "
                       "a calibration, cut at a deadline, packed into a few files (rim.campaign)")
    p.add_argument("spec", nargs="?", default=None, help="campaign spec YAML (configs/campaign/)")
    p.add_argument("--out", default="runs/campaign-out", help="folder for the packed files (at most 8)")
    p.add_argument("--smoke", action="store_true", help="the spec's smoke setting (tiny model, CPU rehearsal)")
    p.add_argument("--report", metavar="PACK_DIR", default=None, help="only write the tables from packed files")
    p.add_argument("--to", default=None, help="report folder for --report (default PACK_DIR/report)")
    p.set_defaults(func=cmd_campaign)

    p = sub.add_parser("bench", help="speed against the baselines: latency of every method, RiM's training step")
    p.add_argument("suite", choices=["latency", "train", "all", "epoch", "sweep"],
                   help="latency, train or all; epoch: seconds per epoch of real layouts for each method's recipe; "
                        "sweep: plain and RiM training steps at growing batch sizes (tokens/s, MFU, memory)")
    p.add_argument("--shape", default="tiny", choices=["tiny", "tiny-deep", "gpt2", "smollm2-135m", "llama-3.2-1b"],
                   help="model shape, random weights (default: tiny, the demo's model; tiny-deep: its width at "
                        "SmolLM2's 30 layers)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--out", default="runs/bench", help="folder for bench-<shape>-<suite>.json and .md")
    p.add_argument("--repeats", type=positive, default=10, help="timed runs per measurement (median)")
    p.add_argument("--warmup", type=non_negative, default=2, help="untimed runs before them")
    p.add_argument("--batch-sizes", type=positive_list, default=[1, 64],
                   help="latency batch sizes, comma-separated (default: 1,64)")
    p.add_argument("--train-batch", type=positive, default=32, help="training batch size (default: 32)")
    p.add_argument("--train-mode", default="auto", choices=["auto", "full", "lora"],
                   help="what trains (auto: full for tiny, LoRA rank 128 otherwise, as rim train)")
    p.add_argument("--question-tokens", type=positive, default=100)
    p.add_argument("--static-cache", action="store_true",
                   help="latency: also No-CoT and RiM with a static KV cache (rows nocot_static, rim_static)")
    add_compile_flags(p, "latency: also No-CoT and RiM with a static cache and compiled decoding steps (rows "
                         "*_compiled)")
    p.add_argument("--compile-train", nargs="?", const="default", default=None, metavar="MODES",
                   help="train: also RiM's and the plain step torch.compile'd (see --compile-scope), in each of "
                        "these comma-separated modes (default when none is given; e.g. default,reduce-overhead): rows "
                        "rim_compiled and rim_compiled_<mode>; the compiling happens in the warm-up runs")
    p.add_argument("--profile", action="store_true",
                   help="train: also profile one more step of each row (torch.profiler): operators the host "
                        "dispatched, kernels, kernel time and the fraction of the step the device was busy")
    p.add_argument("--compile-scope", default=None, metavar="SCOPES",
                   help="with --compile-train: what is compiled, comma-separated: blocks (each transformer block, "
                        "as train.compile_scope's default) and/or decoder (the whole stack at once: rows "
                        "rim_compiled_decoder[_<mode>])")
    p.add_argument("--recipes", type=lambda v: v.split(","), default=None, metavar="CONFIGS",
                   help="epoch: comma-separated configs whose method and stages are timed (default: the paper's "
                        "GPT-2 recipes, configs/paper/gsm8k-aug_gpt2_<method>.yaml)")
    p.add_argument("--epoch-task", default="gsm8k", help="epoch: the task whose training split is laid out")
    p.add_argument("--epoch-split", default="train_no_valid", help="epoch: its split (an epoch is all of it)")
    p.add_argument("--epoch-examples", type=positive, default=None,
                   help="epoch: lay out only the split's first N problems (batches are sampled from them)")
    p.add_argument("--tokenizer", default=None,
                   help="epoch: a saved Hugging Face tokenizer folder (default: the tiny word tokenizer of the task)")
    p.add_argument("--sweep-batches", type=positive_list, default=[32, 64, 128, 256, 512],
                   help="sweep: training batch sizes (default: 32,64,128,256,512)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("answer", help="answer questions with a trained run; one JSON line per question")
    p.add_argument("run", help="run directory written by `rim train`")
    p.add_argument("question", nargs="?", default=None, help="the question (- : one question a line on stdin)")
    p.add_argument("--file", default=None, metavar="F",
                   help="questions one a line (text, or JSON with a 'question' field); - for standard input")
    p.add_argument("--blocks", type=positive, default=None, help="K, memory blocks at inference (default: trained K)")
    p.add_argument("--block-readouts", action="store_true",
                   help="also the answer read out after each block k = 1..K (methods with memory blocks)")
    p.add_argument("--checkpoint", default="checkpoint", help="checkpoint (default), best or checkpoints/step-N")
    p.add_argument("--max-new-tokens", type=positive, default=None,
                   help="generation budget (default: the task's answer budget; CoT-style: plus the longest "
                        "reasoning the run trained on)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    add_decoding_flags(p)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("export", help="write a run as a standard Hugging Face checkpoint with a model card")
    p.add_argument("run", help="run directory written by `rim train`")
    p.add_argument("out", help="new folder for the exported model")
    p.add_argument("--checkpoint", default="checkpoint", help="checkpoint (default), best or checkpoints/step-N")
    p.add_argument("--blocks", type=positive, default=None,
                   help="K in the model card and rim.json (default: trained K)")
    p.add_argument("--max-new-tokens", type=positive, default=None,
                   help="max_new_tokens of generation_config.json (default: as for rim answer)")
    p.add_argument("--gguf", choices=["f32", "f16", "bf16", "q8_0"], default=None,
                   help="also write OUT/model-TYPE.gguf for llama.cpp with its own converter (needs the llamacpp "
                        "extra, or RIM_LLAMA_CPP_DIR)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("lm-eval", help="score an exported model with lm-evaluation-harness on rim's tasks",
                       description="lm-eval's `run` command with rim's model plugin and task YAMLs: rim lm-eval OUT "
                                   "--tasks rim_gsm8k [--limit N --batch_size B --output_path DIR ...]")
    p.add_argument("export", nargs="?", help="folder written by `rim export`")
    p.add_argument("--tasks-dir", action="store_true", help="print the folder of rim's task YAMLs and stop")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER, help="arguments of `lm-eval run`, e.g. --tasks rim_demo")
    p.set_defaults(func=cmd_lm_eval)

    p = sub.add_parser("show-layout", help="print one decoded training example of a config, per stage")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.add_argument("--index", type=non_negative, default=0, help="which training example (default: 0)")
    p.add_argument("--progress", type=float, default=0.0, help="stage progress in [0, 1] for the λ weights")
    p.set_defaults(func=cmd_show_layout)
    p = sub.add_parser("plot", help="plots of a run into RUN/plots: loss, accuracy vs K, per-block accuracy")
    p.add_argument("run", help="run directory written by `rim train`")
    p.add_argument("--split", default=None, help="split for the accuracy plots (default: data.eval_split of the run)")
    p.add_argument("--max-eval", type=positive, default=None, help="score only the first N problems")
    p.add_argument("--max-blocks", type=positive, default=16, help="largest K in accuracy vs K (default: 16)")
    p.add_argument("--checkpoint", default="checkpoint", help="checkpoint (default), best or checkpoints/step-N")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("analyze", help="PCA of block states across checkpoints; per-block correctness probes")
    p.add_argument("run", help="run directory written by `rim train`")
    p.add_argument("--checkpoints", default="all",
                   help="all (init, every checkpoints/step-N, checkpoint) or a comma-separated list; the probes use "
                        "the last one")
    p.add_argument("--probe-split", default="valid", help="split the probes are fitted on (default: valid)")
    p.add_argument("--score-split", default="test", help="split the probes are scored on (default: test)")
    p.add_argument("--max", type=positive, default=None, help="at most N problems of each split")
    p.add_argument("--l2", type=float, default=0.1, help="L2 penalty of the logistic-regression probes")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.set_defaults(func=cmd_analyze)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``rim`` console script."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # dotted overrides may also follow options (`rim train c.yaml --flag x a.b=1`); anything else is an error
    bad = [item for item in extra if item.startswith("-") or "=" not in item or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    if args.data_dir:
        os.environ["RIM_DATA_DIR"] = args.data_dir
    from rim.errors import CheckpointError, ConfigError, DataError, TrainingStopped

    finished = False
    try:
        code = args.func(args)  # None, or a command's own exit status
        finished = True
    except (ConfigError, DataError, CheckpointError, FileNotFoundError, FileExistsError) as err:
        print(f"rim: error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:  # rim train, and the runs of rim compare and rim demo
        print(f"rim: {err}", file=sys.stderr)
        return err.exit_code
    finally:
        leave_process_group(finished)
    return code or 0


def leave_process_group(finished: bool) -> None:
    """Leave the process group a command joined under torchrun (``rim eval`` does; training's accelerator leaves by
    itself): left to interpreter shutdown, gloo's threads can abort the process after its work is done.

    After a command that ``finished``, every process first waits for the others, so none tears its connections down
    while another still works (rank 0 times latency and writes results after the last collective); a process that
    failed leaves at once, since the others may never reach the barrier (torchrun stops them)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if finished:
            dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
