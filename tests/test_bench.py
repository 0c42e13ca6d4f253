"""`rim bench` on the tiny shape with minimal repeats: the report's structure and its ratios (no timing asserts)."""

from __future__ import annotations

import json
import math

import pytest

from rim.bench import REASONING_TOKENS, SHAPES, BenchSettings, Shape, run_bench
from rim.cli import build_parser, compile_train_modes, main
from rim.config import ConfigError


@pytest.mark.slow
def test_bench_all_writes_json_and_markdown_with_finite_ratios(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 2, 32, 4, 2, 64, 256))  # smaller still: a smoke test
    assert main(["bench", "all", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--batch-sizes", "1,2", "--train-batch", "2", "--question-tokens", "12", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench-tiny-all.json").read_text())
    assert {"environment", "settings", "shape_config", "latency", "train", "ratios", "targets"} <= set(results)
    assert {"device", "torch", "transformers", "peft", "commit", "cpu_count", "dtype"} <= set(results["environment"])
    for key in ("b1", "b2"):
        rows = results["latency"][key]
        assert set(rows) == set(REASONING_TOKENS)
        assert rows["rim"]["prompt_tokens"] == 12 + 8 * 4 and rows["cot"]["generated_tokens"] == 37 + 3
    for stage in ("grounding", "refinement"):
        rows = results["train"][stage]
        assert {"plain", "rim_full", "rim_supervised"} <= set(rows)
        assert 0 < rows["supervised_tokens"] < rows["tokens"]
    ratios = results["ratios"]
    assert {"ttft_rim_over_nocot_b1", "ttft_cot_over_rim_b1", "ttft_coconut_over_rim_b2",
            "train_stage1_rim_over_plain", "train_stage2_rim_over_plain", "masked_over_separate",
            "masked_over_separate_train"} <= set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    for i in (1, 2):  # the training target is on RiM's fastest measured step
        fastest = max(ratios[f"train_stage{i}_{name}_over_plain"] for name in ("full", "fused"))
        assert ratios[f"train_stage{i}_fastest_over_plain"] == max(fastest, ratios[f"train_stage{i}_rim_over_plain"])
    assert {t["ratio"] for t in results["targets"]} == {"ttft_rim_over_nocot_b1", "ttft_cot_over_rim_b1",
                                                        "ttft_coconut_over_rim_b1", "masked_over_separate_of_bound",
                                                        "masked_over_separate_train_of_bound"}
    assert ratios["masked_over_separate_train_of_bound"] == pytest.approx(
        ratios["masked_over_separate_train"] / ratios["masked_over_separate_tokens"])
    peak = results["matmul"]["flops"]  # MFU against the rate measured in the same run, for every timed row
    for stage in ("grounding", "refinement"):
        for name in ("plain", "rim_supervised"):
            row = results["train"][stage][name]
            assert row["mfu_measured"] == pytest.approx(6 * results["train"]["parameters"] * row["tokens_per_s"] / peak)
    markdown = (tmp_path / "bench-tiny-all.md").read_text()
    assert "| ttft_cot_over_rim_b1 |" in markdown and markdown in capsys.readouterr().out
    assert "All K readouts, with the backward: one masked pass" in markdown


@pytest.mark.slow
def test_bench_latency_times_static_cache_compiled_steps_and_one_pass_readouts(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 2, 32, 4, 2, 64, 256))
    assert main(["bench", "latency", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--batch-sizes", "1,2", "--question-tokens", "12", "--static-cache", "--compile-mode", "eager",
                 "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench-tiny-latency.json").read_text())
    assert results["settings"]["static_cache"] and results["settings"]["compile"] == "eager"
    for key in ("b1", "b2"):
        rows = results["latency"][key]
        variants = {f"{name}_{variant}" for name in ("rim", "nocot") for variant in ("static", "compiled")}
        assert set(rows) == set(REASONING_TOKENS) | variants
        assert rows["rim_compiled"]["prompt_tokens"] == rows["rim"]["prompt_tokens"]
        assert set(results["readouts"][key]) == {"one_pass_ms", "k_decodes_ms", "one_pass_static_ms",
                                                 "one_pass_compiled_ms"}
    ratios = results["ratios"]
    assert {"latency_rim_static_over_rim_b1", "ttft_rim_compiled_over_nocot_compiled_b2",
            "readouts_k_decodes_over_one_pass_b1", "readouts_k_decodes_over_one_pass_b2",
            "readouts_one_pass_compiled_over_one_pass_b2"} <= set(ratios)
    assert all(math.isfinite(v) and v > 0 for v in ratios.values())
    markdown = (tmp_path / "bench-tiny-latency.md").read_text()
    assert "| rim_static |" in markdown and "| 2 |" in markdown and "K decodes ms" in markdown
    assert "all K, compiled steps ms" in markdown


@pytest.mark.slow
def test_a_shape_name_with_dots_keeps_its_whole_file_name(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny-3.2-x", Shape("llama", 1, 32, 4, 2, 64, 256))
    run_bench("train", "tiny-3.2-x", "cpu", tmp_path, BenchSettings(train_batch=2, question_tokens=12, repeats=1,
                                                                    warmup=0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench-tiny-3.2-x-train.json", "bench-tiny-3.2-x-train.md"]


def test_compile_train_takes_modes_or_backends():
    parse = build_parser().parse_args
    assert compile_train_modes(parse(["bench", "train", "--compile-train"]).compile_train) == ("default",)
    assert compile_train_modes(parse(["bench", "train"]).compile_train) == ()
    assert compile_train_modes("default, reduce-overhead,eager") == ("default", "reduce-overhead", "eager")
    with pytest.raises(ConfigError, match="--compile-train: 'fast' is neither"):
        compile_train_modes("default,fast")


@pytest.mark.slow
def test_bench_times_both_steps_through_each_compile_scope_and_mode(tmp_path, monkeypatch):
    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 1, 32, 4, 2, 64, 256))
    assert main(["bench", "train", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "1",
                 "--train-batch", "2", "--question-tokens", "12", "--compile-train", "aot_eager,eager",
                 "--compile-scope", "blocks,decoder", "--profile", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "bench-tiny-train.json").read_text())
    assert results["settings"]["compile_scopes"] == ["blocks", "decoder"]
    compiled = {f"{step}_compiled{scope}{mode}" for step in ("rim", "plain") for scope in ("", "_decoder")
                for mode in ("_aot_eager", "_eager")}
    for stage in ("grounding", "refinement"):  # the compiled rows' batches padded to one length, as in training
        rows = results["train"][stage]
        assert compiled <= set(rows)
        assert rows["padded_tokens"] % (2 * 16) == 0 and rows["padded_tokens"] > rows["tokens"]
    ratios = results["ratios"]
    assert {"train_stage1_compiled_decoder_aot_eager_over_plain", "train_stage2_compiled_decoder_eager_over_plain",
            "train_stage1_compiled_decoder_eager_over_plain_compiled_decoder_eager"} <= set(ratios)
    assert ratios["train_stage1_fastest_over_plain"] >= ratios["train_stage1_compiled_decoder_eager_over_plain"]
    # --profile: one more step of each row under torch.profiler; a CPU has no kernels to count
    profiles = {name: row["profile"] for name, row in results["train"]["grounding"].items() if isinstance(row, dict)}
    assert set(profiles) == {"plain", "rim_full", "rim_supervised", "rim_fused"} | compiled
    assert all(p["wall_ms"] > 0 and p["aten_ops"] > 0 and p["kernels"] == 0 and p["device_busy"] is None
               for p in profiles.values())
    assert "| grounding | rim_supervised |" in (tmp_path / "bench-tiny-train.md").read_text().split("torch.profiler")[1]


def test_the_shape_choices_are_the_benchmarked_shapes():
    shape = next(a for a in build_parser()._subparsers._group_actions[0].choices["bench"]._actions
                 if a.dest == "shape")
    assert set(shape.choices) == set(SHAPES)


@pytest.mark.slow
def test_a_compiled_row_that_fails_is_recorded_and_the_others_are_measured(tmp_path, monkeypatch, capsys):
    import rim.bench.train as bench
    from rim.models.adapter import decoder_stack

    real, hooks = bench.compile_model, []

    def fail(*args):
        raise RuntimeError("no kernel")

    def compile_model(model, how, scope):
        real(model, how, scope)
        for hook in hooks:
            hook.remove()
        if scope == "decoder":  # as if inductor failed on the whole decoder
            hooks.append(decoder_stack(model).register_forward_pre_hook(fail))

    monkeypatch.setattr(bench, "compile_model", compile_model)
    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 1, 32, 4, 2, 64, 256))
    assert main(["bench", "train", "--shape", "tiny", "--device", "cpu", "--repeats", "1", "--warmup", "0",
                 "--train-batch", "2", "--question-tokens", "12", "--compile-train", "eager",
                 "--compile-scope", "decoder,blocks", "--out", str(tmp_path)]) == 1
    assert "rows that failed (the others were measured): grounding/rim_compiled_decoder_eager, " in \
        capsys.readouterr().err
    results = json.loads((tmp_path / "bench-tiny-train.json").read_text())
    rows = results["train"]["grounding"]
    assert rows["rim_compiled_decoder_eager"] == {"error": "RuntimeError: no kernel"}
    assert rows["plain_compiled_decoder_eager"] == {"error": "not run: rim_compiled_decoder_eager failed before it"}
    assert results["train"]["refinement"]["rim_compiled_decoder_eager"]["error"].startswith("not run")
    assert rows["rim_compiled_eager"]["tokens_per_s"] > 0
    assert "train_stage1_compiled_eager_over_plain" in results["ratios"]
    assert not any("decoder" in name for name in results["ratios"])
    assert "| grounding | rim_compiled_decoder_eager | failed: RuntimeError: no kernel |" in \
        (tmp_path / "bench-tiny-train.md").read_text()


def test_compile_scope_is_checked():
    from rim.cli import compile_scopes

    assert compile_scopes("decoder, blocks") == ("decoder", "blocks")
    assert compile_scopes(None, None) == ("blocks",)
    with pytest.raises(ConfigError, match="--compile-scope: want blocks and/or decoder"):
        compile_scopes("model")
    with pytest.raises(ConfigError, match="give --compile-train too"):
        compile_scopes("decoder", None)


@pytest.mark.slow
def test_a_bench_cut_short_keeps_the_rows_it_measured(tmp_path, monkeypatch):
    """Written after every training row: a part that fails (or a timeout) loses only what was not measured."""
    import rim.bench.train as bench

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    monkeypatch.setitem(SHAPES, "tiny", Shape("llama", 1, 32, 4, 2, 64, 256))
    monkeypatch.setattr(bench, "bench_masked_pass", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        run_bench("train", "tiny", "cpu", tmp_path, BenchSettings(train_batch=2, question_tokens=12, repeats=1,
                                                                  warmup=0))
    results = json.loads((tmp_path / "bench-tiny-train.json").read_text())
    for stage in ("grounding", "refinement"):
        assert {"plain", "rim_full", "rim_supervised", "rim_fused"} <= set(results["train"][stage])
    assert {"train_stage2_rim_over_plain", "train_stage2_fastest_over_plain"} <= set(results["ratios"])
    assert "masked_over_separate" not in results["ratios"] and "masked_vs_separate" not in results["train"]
    assert "| refinement | rim_fused |" in (tmp_path / "bench-tiny-train.md").read_text()
