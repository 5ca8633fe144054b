"""python -m continuum.bench: its tables have every column and row it promises (bad input: test_hostile.py)."""

import os
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch

from continuum.bench import SHAPES, fwd_bwd, main, paired_ratio, parse_shapes, segment_counts, train_kinds
from continuum.timing import interleaved_times


def test_segment_counts_run_from_one_to_all():
    assert segment_counts(64) == [1, 2, 4, 8, 16, 32, 64]
    assert segment_counts(728) == [1, 2, 4, 8, 91, 182, 364, 728]


def test_interleaved_times_time_every_call_once_a_round_until_each_had_its_time():
    order = []

    def call(name):
        def run():
            order.append(name)
            sum(range(20_000 if name == "a" else 1))  # "a" is slow, the others almost free
        return run

    calls = {name: call(name) for name in "abcd"}
    times = interleaved_times(calls, torch.device("cpu"), rounds=6, min_total_ms=0)
    rounds = [order[i:i + 4] for i in range(0, len(order), 4)]
    assert len(rounds) == 6 and all(sorted(r) == list("abcd") for r in rounds)
    assert len({r[0] for r in rounds}) > 1  # the order changes from round to round
    assert [len(t) for t in times.values()] == [6] * 4 and min(times["a"]) > max(times["b"])
    order.clear()
    interleaved_times(calls, torch.device("cpu"), rounds=1, min_total_ms=1e6, max_rounds=7)
    assert len(order) == 4 * 7  # "b" never adds up to the minimum: stops at max_rounds


def test_a_reference_call_is_timed_every_round_but_adds_none():
    calls = {"layer": lambda: time.sleep(0.002), "copy": lambda: None}
    times = interleaved_times(calls, torch.device("cpu"), rounds=1, min_total_ms=10, references=["copy"])
    assert len(times["layer"]) <= 5 and len(times["copy"]) == len(times["layer"])  # the layer's 10 ms, not 50 rounds
    times = interleaved_times(calls, torch.device("cpu"), rounds=3, min_total_ms=10, references=["layer", "copy"])
    assert [len(t) for t in times.values()] == [3, 3]  # nothing tallied: the rounds asked for


def test_interleaved_times_keep_each_context_together_after_an_untimed_call():
    order = []
    calls = {name: (lambda name=name: order.append(name)) for name in "abcde"}
    times = interleaved_times(calls, torch.device("cpu"), rounds=8, min_total_ms=0, contexts=[["a", "b"], ["c", "d"]])
    assert [len(t) for t in times.values()] == [8] * 5  # one timed call each a round
    context = {"a": "ab", "b": "ab", "c": "cd", "d": "cd", "e": "e"}  # "e", in no context, forms its own
    chunks, i = [], 0
    while i < len(order):  # a context's chunk: an untimed call of one member, then each member once
        size = 1 + len(context[order[i]])
        chunks.append(order[i:i + size])
        i += size
    assert len(chunks) == 8 * 3
    assert all(sorted(chunk[1:]) == list(context[chunk[0]]) for chunk in chunks)
    assert {chunk[0] for chunk in chunks if context[chunk[0]] == "ab"} == {"a", "b"}  # any member sets it up


def test_a_timed_call_computes_the_gradients_and_accumulates_none():
    from continuum.block import SegmentedConv2d
    layer, x = SegmentedConv2d(4, 4, 3, padding=1, segments=2), torch.randn(2, 4, 5, 5, requires_grad=True)
    calls = []
    layer.register_full_backward_hook(lambda module, grad_in, grad_out: calls.append(grad_in[0].shape))
    call = fwd_bwd(layer, x, "native")
    call()
    call()
    assert calls == [x.shape] * 2  # the input gradient, once per call
    assert x.grad is None and all(p.grad is None for p in layer.parameters())


def test_paired_ratio_is_the_median_of_per_round_ratios():
    ratio, low, high = paired_ratio([2.0, 4.0, 8.0, 2.2, 4.4], [1.0, 2.0, 4.0, 1.0, 2.0])
    assert ratio == 2.0 and low <= 2.0 <= high <= 2.2


@pytest.mark.parametrize("tuning", ["cold", pytest.param("loaded", marks=pytest.mark.slow)])  # loaded: busy cores
def test_bench_writes_the_conv_table(tmp_path, tuning):
    command = [sys.executable, "-m", "continuum.bench", "--shapes", "tiny,4x3x2", "--repeats", "1", "--tuning",
               tuning, "--out", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    conv = pd.read_csv(tmp_path / "conv_cpu.csv")
    assert len(conv) == 2 * len(segment_counts(16)) + 2 * len(segment_counts(4))
    assert list(conv["shape"].unique()) == ["tiny", "4x3x2"] and set(conv["tuning"]) == {tuning}
    assert list(conv.loc[conv["shape"] == "4x3x2", "batch"].unique()) == [2]
    conv = conv[conv["shape"] == "tiny"]
    assert set(conv["layer"]) == {"SegmentedConv2d", "ContinuumConv"}
    assert list(conv["segments"].astype(str).unique()) == ["1", "2", "4", "8", "all"]
    assert (conv["ours_ms"] == conv[["ours_nchw_ms", "ours_cl_ms"]].min(axis=1)).all()
    assert set(conv["ours_layout"]) <= {"nchw", "cl"}
    for column in ("ours_ms", "native_nchw_ms", "native_cl_ms", "fastest_native_ms", "achieved_gflops", "copy_ms",
                   "copy_gbps", "floor_ms", "x_floor", "strategy", "device"):
        assert conv[column].notna().all(), column
    assert (conv["floor_ms"] > 0).all() and (conv["speedup_vs_native"] > 0).all()
    # the floor's copy timed in each row's rounds: x_floor is a median of per-round ratios, with its interval
    assert ((conv["x_floor_low"] <= conv["x_floor"]) & (conv["x_floor"] <= conv["x_floor_high"])).all()
    assert "their gradients), timed in each row's rounds: tiny float32 " in result.stdout
    # each tuning's evidence, or why it did not tune (busy cores: loaded, or other tests running beside this one)
    assert "conv strategy for " in result.stderr or "not tuned: " in result.stderr
    for _, rows in conv.groupby("layer"):  # each count against the one before it, timed in the same rounds
        assert rows["x_fewer_segments"].iloc[0] != rows["x_fewer_segments"].iloc[0]  # nan: nothing before 1
        assert rows["fewer_ms"].iloc[1:].notna().all() and (rows["x_fewer_segments"].iloc[1:] > 0).all()
        assert (rows["x_fewer_low"] <= rows["x_fewer_segments"]).iloc[1:].all()
        assert (rows["x_fewer_segments"] <= rows["x_fewer_high"]).iloc[1:].all()
    assert (conv["speedup_low"] <= conv["speedup_vs_native"]).all()
    assert (conv["speedup_vs_native"] <= conv["speedup_high"]).all()
    assert "SegmentedConv2d slower than the fastest native alternative:" in result.stdout
    assert "ContinuumConv slower than at the previous segment count:" in result.stdout
    separable = conv.dropna(subset=["timm_separable_ms"])
    assert list(separable["segments"].astype(str)) == ["all"] and list(separable["layer"]) == ["ContinuumConv"]
    assert "| SegmentedConv2d" in result.stdout and "GFLOP/s" in result.stdout
    assert not (tmp_path / "train_cpu.csv").exists()


def test_bench_segments_take_all_as_each_shapes_channel_count(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CONTINUUM_CACHE", str(tmp_path))  # the run points it at a fresh folder; restored after
    quick = ["--repeats", "1", "--min-ms", "0"]
    assert main(["--shapes", "4x3x2,8x3x2", "--segments", "2,all", *quick, "--out", str(tmp_path / "two")]) == 0
    conv = pd.read_csv(tmp_path / "two" / "conv_cpu.csv")
    rows = conv[conv["layer"] == "SegmentedConv2d"]
    assert list(zip(rows["channels"], rows["segments"].astype(str))) == [(4, "2"), (4, "all"), (8, "2"), (8, "all")]
    capsys.readouterr()
    assert main(["--shapes", "4x3x2", "--segments", "all", *quick, "--out", str(tmp_path / "one")]) == 0
    assert "slower than at the previous segment count: no rows to compare" in capsys.readouterr().out


def test_train_compile_times_compiled_trainings_beside_eager_ones(tmp_path, monkeypatch, dynamo_counters):
    assert list(train_kinds(bf16=False, compiled=True)) == ["nchw_auto", "cl_native", "cl_auto", "cl_compiled"]
    kinds = train_kinds(bf16=True, compiled=True)
    assert [name for name, kind in kinds.items() if kind.compile] == ["cl_compiled", "cl_compiled_bf16"]
    assert kinds["cl_compiled_bf16"].precision == "bf16" and kinds["cl_compiled"].channels_last
    monkeypatch.setenv("CONTINUUM_CACHE", str(tmp_path))  # the run points it at a fresh folder; restored after
    assert main(["--no-conv", "--train", "--train-compile", "--train-images", "64", "--train-rounds", "1",
                 "--train-segments", "all", "--out", str(tmp_path)]) == 0
    assert dynamo_counters["stats"]["unique_graphs"] == 2  # the compiled run: training, evaluation; the eager: none
    row = pd.read_csv(tmp_path / "train_cpu.csv").iloc[0]
    assert row["compile_speedup"] == pytest.approx(row["cl_compiled_images_per_s"] / row["cl_auto_images_per_s"])
    assert row["compile_speedup_low"] == row["compile_speedup"] == row["compile_speedup_high"]  # one round
    assert "compile_bf16_speedup" not in row and row["cl_compiled_mfu"] > 0


@pytest.mark.slow
def test_bench_writes_the_train_table(tmp_path):
    command = [sys.executable, "-m", "continuum.bench", "--no-conv", "--train", "--train-images", "128",
               "--train-rounds", "1", "--train-segments", "4,all", "--dtypes", "fp32,bf16", "--out", str(tmp_path)]
    quick_tuning = {"CONTINUUM_TUNE_MS": "1", "CONTINUUM_CACHE": str(tmp_path / "cache")}  # the table, not the picks
    result = subprocess.run(command, capture_output=True, text=True, env=os.environ | quick_tuning)
    assert result.returncode == 0, result.stderr
    train = pd.read_csv(tmp_path / "train_cpu.csv")
    assert list(train["segments"].astype(str)) == ["4", "all"]
    speeds = [f"{kind}_{what}" for kind in ("nchw_auto", "cl_native", "cl_auto", "cl_auto_bf16")
              for what in ("images_per_s", "mfu")]
    assert (train[speeds + ["speedup", "tuner_speedup", "bf16_speedup", "bf16_total_speedup"]] > 0).all().all()
    assert train["bf16_total_speedup"].iloc[0] == pytest.approx(train["cl_auto_bf16_images_per_s"].iloc[0]
                                                                / train["nchw_auto_images_per_s"].iloc[0])
    assert train["speedup"].iloc[0] == pytest.approx(train["cl_auto_images_per_s"].iloc[0]
                                                     / train["nchw_auto_images_per_s"].iloc[0])  # one round
    assert (train["tuner_speedup_low"] == train["tuner_speedup"]).all()  # one round: the interval is its ratio
    assert (train["tuner_speedup_high"] == train["tuner_speedup"]).all()
    assert not (tmp_path / "conv_cpu.csv").exists()


def test_segment_counts_per_shape_are_its_divisors_each_once():
    from continuum.bench import shape_counts
    shape = parse_shapes("12x3x2")[0]
    assert shape_counts(shape, ["all", 5, 4, 12, 1, 4]) == [1, 4, 12]
    assert shape_counts(shape, None) == segment_counts(12)


def test_shapes_are_named_or_written_out():
    shapes = parse_shapes("small_64, 96x28x64,8X4X2")
    assert shapes[0] == SHAPES["small_64"]
    assert [(s.channels, s.size, s.batch) for s in shapes[1:]] == [(96, 28, 64), (8, 4, 2)]


def test_kernel_revisions_takes_a_revisions_sources_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    from conftest import load_benchmark
    from continuum.compiled import SOURCES, depthwise_kernels

    revisions = load_benchmark("kernel_revisions")
    if subprocess.run(["git", "rev-parse", "HEAD"], cwd=SOURCES, capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    folder = revisions.revision_sources("HEAD")
    committed = subprocess.run(["git", "show", "HEAD:continuum/csrc/few_channel.cpp"], cwd=SOURCES,
                               capture_output=True, check=True).stdout
    assert (folder / "few_channel.cpp").read_bytes() == committed and (folder / "thread_sums.h").exists()
    assert folder == revisions.revision_sources("HEAD")  # one folder a commit: its build is reused
    with pytest.raises(ValueError, match="--base no-such-revision: "):
        revisions.revision_sources("no-such-revision")
    for args, message in ((["--base", "HEAD", "--widths", "0"], "--widths=0 is not valid; use a whole number in 1..16"),
                          (["--base", "HEAD", "--widths", "5"], "--widths: none divides the channels"),
                          (["--widths", "2"], "the following arguments are required: --base")):
        monkeypatch.setattr(sys, "argv", ["kernel_revisions.py", "--out", str(tmp_path), *args])
        with pytest.raises(SystemExit) as exit_:
            revisions.main()
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    if depthwise_kernels() is not None:  # width 1: the depthwise kernels' two passes
        passes = revisions.pass_calls(depthwise_kernels(), parse_shapes("16x4x2")[0], 1, seed=0)
        assert list(passes) == ["forward", "backward"] and revisions.source(1) == "depthwise"
        assert passes["forward"]().shape == (2, 16, 4, 4) and [t.shape for t in passes["backward"]()] == [
            (2, 16, 4, 4), (16, 1, 3, 3)]
