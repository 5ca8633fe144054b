"""Segmented-conv strategies: each equals the native grouped conv forward and backward; autotuning and its caches."""

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from continuum import SegmentedConv2d
from continuum import strategy as st
from continuum import compiled, timing
from continuum.compiled import (BROADCAST_WIDTHS, FEW_CHANNEL_WIDTHS, batch_norm_kernels, build_all, built,
                                depthwise_kernels, few_channel_cpu, few_channel_kernels)
from continuum.kernels import ConvGeometry, Strategy, block_diagonal, candidates, run_strategy
from continuum.timing import call_times, device_name, kernel_library, machine_key, median_interval

CASES = [
    # in, out, groups, kernel, stride, padding, dilation
    (32, 32, 32, (3, 3), 1, (1, 1), 1),  # depthwise
    (32, 64, 32, (3, 3), 2, (1, 1), 1),  # depthwise, multiplier 2, stride 2
    (32, 64, 8, (3, 3), 2, (1, 1), 1),
    (16, 16, 4, (3, 3), 1, "same", 2),
    (12, 24, 3, (3, 5), 1, (0, 2), 1),
    (8, 8, 2, (3, 3), 1, "valid", 1),
    (8, 8, 1, (1, 1), 1, (0, 0), 1),
    (32, 32, 16, (3, 3), 1, (1, 1), 1),  # 2 channels per segment: rotated
    (32, 32, 8, (3, 3), 2, (1, 1), 1),  # 4, stride 2: not rotated
    (16, 16, 4, (3, 3), 1, (1, 0), 1),  # 4, padding 1 x 0: rotated
    (16, 16, 4, (3, 3), 1, (3, 1), 1),  # 4, padding wider than the kernel reaches: not rotated
    (12, 12, 4, (3, 5), 1, "same", 2),  # 3, dilated: four segments in a block of 15 lanes
    (18, 18, 6, (3, 3), 1, (1, 1), 1),  # 3: five segments in 15 lanes, a last block of one
    (20, 20, 4, (3, 3), 1, (1, 1), 1),  # 5: three segments in 15 lanes, a last block of one
    (24, 24, 4, (3, 3), 1, (1, 1), 1),  # 6: two segments in 12 lanes
    (42, 42, 6, (3, 3), 1, (1, 1), 1),  # 7: two segments in 14 lanes, a last block of two
    (16, 16, 2, (3, 3), 1, (1, 1), 1),  # 8: broadcast, not rotated
    (30, 30, 3, (3, 3), 1, (1, 1), 1),  # 10: broadcast
    (32, 32, 2, (3, 5), 1, "same", 2),  # 16: broadcast, dilated
    (17, 17, 1, (3, 3), 1, (1, 1), 1),  # 17: neither
]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CONTINUUM_CACHE", str(tmp_path))
    monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: None)  # a quiet machine
    st.forget_choices()
    yield
    st.forget_choices()


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{c[1]}-g{c[2]}-s{c[4]}-p{c[5]}")
def test_every_candidate_equals_the_native_conv_forward_and_backward(case, channels_last):
    c_in, c_out, groups, kernel, stride, padding, dilation = case
    geom = ConvGeometry((stride, stride), padding, (dilation, dilation), groups)
    torch.manual_seed(0)
    x = torch.randn(3, c_in, 11, 10, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    w = torch.randn(c_out, c_in // groups, *kernel, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c_out, dtype=torch.float64, requires_grad=True)
    ref = F.conv2d(x, w, b, geom.stride, geom.padding, geom.dilation, groups)
    upstream = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (x, w, b), upstream)
    names = []
    for strategy in candidates(c_in, c_out, kernel, geom):
        y = run_strategy(strategy, x, w, b, geom)
        grads = torch.autograd.grad(y, (x, w, b), upstream)
        assert y.shape == ref.shape
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10, msg=strategy.name)
        for got, want in zip(grads, ref_grads):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=strategy.name)
        names.append(strategy.name)
    divisors = [g for g in range(groups, 0, -1) if groups % g == 0]
    assert {f"grouped/{g}" for g in divisors} | {f"grouped/{g}+cl" for g in divisors} <= set(names)
    assert ("shifted" in names) == (groups == c_in == c_out)
    assert ("fused" in names) == (groups == c_in == c_out and depthwise_kernels() is not None)
    assert ("unfold" in names) == (groups > 1)
    reach = isinstance(padding, str) or max(padding) <= dilation * (max(kernel) - 1)
    few = c_in == c_out and stride == 1 and reach and few_channel_kernels() is not None
    assert ("rotated" in names) == (few and c_in // groups in FEW_CHANNEL_WIDTHS)
    assert ("broadcast" in names) == (few and c_in // groups in BROADCAST_WIDTHS)


def test_block_diagonal_puts_each_segment_on_the_diagonal():
    weight = torch.arange(1, 4 * 2 * 1 * 1 + 1, dtype=torch.float32).view(4, 2, 1, 1)  # 4 groups of 2 -> 1 out
    dense = block_diagonal(weight, groups=4, new_groups=1)[:, :, 0, 0]  # 4 x 8
    expected = torch.zeros(4, 8)
    for g in range(4):
        expected[g, 2 * g: 2 * g + 2] = weight[g, :, 0, 0]
    assert torch.equal(dense, expected)
    assert block_diagonal(weight, 4, 2).shape == (4, 4, 1, 1)


@pytest.mark.parametrize("channels_last", [False, True])
def test_block_diagonal_in_either_memory_format_passes_gradients_back(channels_last):
    weight = torch.randn(12, 2, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weight.requires_grad_(True)
    dense = block_diagonal(weight, groups=6, new_groups=2, channels_last=channels_last)  # 12 x 6 x 3 x 3
    assert dense.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    for g in range(6):  # segment g: outputs 2g, 2g+1; inputs 2(g % 3), 2(g % 3)+1 of group g // 3
        rows, cols = slice(2 * g, 2 * g + 2), slice(2 * (g % 3), 2 * (g % 3) + 2)
        assert torch.equal(dense[rows, cols], weight[rows])
        assert dense[rows].count_nonzero() == weight[rows].count_nonzero()  # zeros elsewhere
    upstream = torch.randn_like(dense)
    (grad,) = torch.autograd.grad(dense, weight, upstream)
    expected = torch.stack([upstream[o, 2 * ((o // 2) % 3): 2 * ((o // 2) % 3) + 2] for o in range(12)])
    assert torch.equal(grad, expected)


def test_strategy_names_round_trip():
    for strategy in (Strategy("grouped", 8), Strategy("grouped", 1, True), Strategy("unfold"), Strategy("shifted")):
        assert Strategy.parse(strategy.name) == strategy


def _autotune_calls(monkeypatch, record: Callable[[torch.Tensor], object] = lambda x: 1) -> list:
    """A list that gets ``record(input)`` for each autotuning from now on (the tuning itself still runs)."""
    calls = []
    tune = st.autotune
    monkeypatch.setattr(st, "autotune", lambda *a, **k: calls.append(record(a[0])) or tune(*a, **k))
    return calls


def _probes(monkeypatch) -> list:
    """A list that gets each busy-machine probe's sleep from now on (the probe itself does not sleep)."""
    probes = []
    sleep = st.time.sleep
    monkeypatch.setattr(st.time, "sleep", lambda s: probes.append(s) if s == st.PROBE_SECONDS else sleep(s))
    return probes


def test_auto_matches_native_and_tunes_each_shape_once(monkeypatch, tmp_path):
    calls = _autotune_calls(monkeypatch, lambda x: x.shape)
    conv = SegmentedConv2d(16, 16, 3, padding=1, segments=4)
    x = torch.randn(2, 16, 8, 8, requires_grad=True)
    with st.conv_strategy("native"):
        ref = conv(x)
    assert calls == []
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)
    conv(x).sum().backward()
    with torch.no_grad():
        conv(x)  # forward-only is tuned separately
    assert len(calls) == 2
    stored = json.loads((tmp_path / "conv_strategies.json").read_text())
    chosen = [v for k, v in stored.items() if k.startswith(f"{st.CACHE_VERSION}|")]
    assert len(chosen) == 2 and all(Strategy.parse(name).kind in ("grouped", "unfold", "rotated") for name in chosen)
    assert any(k.startswith("peak|") for k in stored)

    st.forget_choices()  # a new process: the disk cache answers, nothing is timed again
    monkeypatch.setattr(st, "autotune", lambda *a, **k: pytest.fail("tuned again despite the disk cache"))
    torch.testing.assert_close(conv(x), ref, rtol=1e-5, atol=1e-5)


def test_each_memory_format_gradient_and_thread_count_is_tuned_once(monkeypatch):
    tuned = _autotune_calls(monkeypatch, lambda x: x.stride())
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=2)
    x = torch.randn(2, 8, 6, 6)
    threads = torch.get_num_threads()
    for _ in range(2):
        conv(x)
        conv(x.contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            conv(x)
        torch.set_num_threads(1 if threads > 1 else 2)
        try:
            conv(x)
        finally:
            torch.set_num_threads(threads)
    assert len(tuned) == 4


def test_tracing_records_the_native_grouped_conv_without_tuning(monkeypatch):
    monkeypatch.setattr(st, "autotune", lambda *a, **k: pytest.fail("autotuned while tracing"))
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=2)
    x = torch.randn(1, 8, 5, 5)
    traced = torch.fx.symbolic_trace(conv)
    assert [node.target for node in traced.graph.nodes if node.op == "call_function"] == [F.conv2d]
    scripted = torch.jit.trace(conv, x, check_trace=False)  # checking would run it eagerly, and tune
    assert "aten::_convolution" in str(scripted.graph)
    ref = F.conv2d(x, conv.weight, None, 1, 1, 1, 2)
    torch.testing.assert_close(traced(x), ref)
    torch.testing.assert_close(scripted(x), ref)


def test_native_mode_deterministic_mode_and_bad_mode(monkeypatch):
    monkeypatch.setattr(st, "autotune", lambda *a, **k: pytest.fail("autotuned"))
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=2)
    x = torch.randn(1, 8, 5, 5)
    monkeypatch.setenv("CONTINUUM_CONV_STRATEGY", "native")
    st.forget_choices()  # the environment is read once per process
    conv(x)
    monkeypatch.setenv("CONTINUUM_CONV_STRATEGY", "auto")
    st.forget_choices()
    torch.use_deterministic_algorithms(True)
    try:
        conv(x)
    finally:
        torch.use_deterministic_algorithms(False)
    monkeypatch.setenv("CONTINUUM_CONV_STRATEGY", "fastest")
    st.forget_choices()
    with pytest.raises(ValueError, match="'fastest' is not valid; choose one of auto, native"):
        conv(x)
    with pytest.raises(ValueError, match="'fast' is not valid"):
        with st.conv_strategy("fast"):
            pass


def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path):
    (tmp_path / "conv_strategies.json").write_text("{not json")
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=2)
    conv(torch.randn(1, 8, 5, 5))
    assert json.loads((tmp_path / "conv_strategies.json").read_text())
    st.forget_choices()
    (tmp_path / "conv_strategies.json").write_text('{"a": "grouped/x", "b": 3}')
    conv(torch.randn(1, 8, 5, 5))


def test_autotune_skips_candidates_that_cannot_beat_the_best(monkeypatch):
    monkeypatch.setattr(st, "peak_gemm_flops", lambda device, dtype: 1.0)  # every bound is astronomically slow
    x, w, geom = torch.randn(2, 16, 6, 6), torch.randn(16, 1, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 16)
    best, times, _ = st.autotune(x, w, None, geom, grad=False)
    assert best == Strategy("grouped", 16)  # the first candidate is always timed
    assert sum(t == t for t in times.values()) == 1 and len(times) == len(candidates(16, 16, (3, 3), geom))


def test_choices_survive_into_a_new_process(tmp_path):
    script = ("import sys, torch; from continuum import SegmentedConv2d, strategy; "
              "strategy.autotune = (lambda *a, **k: sys.exit(3)) if sys.argv[1] == 'cached' else strategy.autotune; "
              "strategy.Tuner.busy_reason = lambda self, device, load=None: None; "
              "SegmentedConv2d(8, 8, 3, padding=1, segments=4)(torch.randn(1, 8, 6, 6, requires_grad=True))")
    env = {**os.environ, "CONTINUUM_CACHE": str(tmp_path)}
    subprocess.run([sys.executable, "-c", script, "tune"], check=True, env=env)
    assert subprocess.run([sys.executable, "-c", script, "cached"], env=env).returncode == 0


def test_autocast_is_tuned_apart_and_agrees_with_native(monkeypatch):
    calls = _autotune_calls(monkeypatch)
    conv = SegmentedConv2d(16, 16, 3, padding=1, segments=4)
    x = torch.randn(2, 16, 6, 6)
    conv(x)
    with torch.autocast("cpu", torch.bfloat16):
        fast = conv(x)
        with st.conv_strategy("native"):
            ref = conv(x)
    assert len(calls) == 2 and fast.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(fast, ref, rtol=0.05, atol=0.05)


def _busy(ms: float) -> None:
    """Take ``ms`` milliseconds (a sleep can overshoot by many milliseconds on a loaded machine)."""
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def test_call_times_times_short_calls_more_often_and_gives_up_on_slow_ones():
    calls = []
    assert len(call_times(lambda: calls.append(1), torch.device("cpu"), repeats=3, warmup=2)) == 3
    assert len(calls) == 5
    many = call_times(lambda: _busy(1), torch.device("cpu"), repeats=2, min_total_ms=20, max_repeats=50)
    assert 2 < len(many) <= 20 and sum(many) >= 20  # more than `repeats`, until they add up to 20 ms
    assert len(call_times(lambda: None, torch.device("cpu"), min_total_ms=1e9, max_repeats=7)) == 7
    assert len(call_times(lambda: _busy(2), torch.device("cpu"), repeats=5, give_up_ms=1)) == 1


def _fake_timings(monkeypatch, ms: dict[str, list[float]]) -> dict[str, int]:
    """Make each strategy take the listed milliseconds, call after call (the last repeating), on a clock that only
    these calls move (so the timings are exact however busy the machine is); returns call counts."""
    counts = {name: 0 for name in ms}
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=lambda: clock.now))

    def run(strategy, x, weight, bias, geom):
        times = ms[strategy.name]
        clock.now += times[min(counts[strategy.name], len(times) - 1)] / 1e3
        counts[strategy.name] += 1
        return F.conv2d(x, weight, bias, geom.stride, geom.padding, geom.dilation, geom.groups)

    monkeypatch.setattr(st, "run_strategy", run)
    monkeypatch.setattr(st, "peak_gemm_flops", lambda device, dtype: float("inf"))  # no candidate is skipped
    return counts


def test_autotune_is_not_fooled_by_slow_first_calls(monkeypatch):
    x, w, geom = torch.randn(2, 4, 6, 6), torch.randn(4, 2, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 2)
    names = [s.name for s in candidates(4, 4, (3, 3), geom)]  # grouped/2, grouped/2+cl, unfold, grouped/1, ...
    ms = {name: [30.0] for name in names} | {"grouped/1": [300.0, 5.0]}  # the fastest is slow only when cold
    _fake_timings(monkeypatch, ms)
    best, times, _ = st.autotune(x, w, None, geom, grad=False, finalists=1, screen_ms=0, final_ms=0)
    assert best == Strategy("grouped", 1) and times["grouped/1"] < 30


def test_autotune_always_retimes_the_plain_grouped_conv(monkeypatch):
    x, w, geom = torch.randn(2, 4, 6, 6), torch.randn(4, 2, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 2)
    names = [s.name for s in candidates(4, 4, (3, 3), geom)]
    slow_plain = {"grouped/2": [30.0], "grouped/2+cl": [30.0]}
    counts = _fake_timings(monkeypatch, {name: [5.0] for name in names} | slow_plain)
    best, times, _ = st.autotune(x, w, None, geom, grad=False, finalists=1, screen_ms=0, final_ms=0)
    # screening: a warm-up and a timed call each; finalists: MIN_ROUNDS more calls each, the plain conv among them
    rounds = 2 + st.MIN_ROUNDS
    assert counts["grouped/2"] == counts["grouped/2+cl"] == rounds
    assert sorted(counts.values()) == [2] * (len(names) - 3) + [rounds] * 3
    assert best.name not in ("grouped/2", "grouped/2+cl") and set(times) == set(names)


@pytest.mark.parametrize("other_ms, wins", [(15.0, True), (28.5, False)])
def test_a_near_tie_goes_to_the_plain_grouped_conv(monkeypatch, other_ms, wins):
    x, w, geom = torch.randn(2, 4, 6, 6), torch.randn(4, 2, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 2)
    names = [s.name for s in candidates(4, 4, (3, 3), geom)]
    _fake_timings(monkeypatch, {name: [60.0] for name in names} | {"grouped/2+cl": [30.0], "grouped/1": [other_ms]})
    best, _, evidence = st.autotune(x, w, None, geom, grad=False, finalists=1, screen_ms=0, final_ms=0,
                                    margin=0.2)
    assert evidence.endswith("chosen") == wins
    assert best.name == ("grouped/1" if wins else "grouped/2+cl")


def test_tuning_time_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("CONTINUUM_TUNE_MS", "50")
    assert st.tuning_ms() == 50
    monkeypatch.delenv("CONTINUUM_TUNE_MS")
    assert st.tuning_ms() == 200
    for bad in ("fast", "-1", "nan"):
        monkeypatch.setenv("CONTINUUM_TUNE_MS", bad)
        with pytest.raises(ValueError, match=f"CONTINUUM_TUNE_MS='{bad}' is not valid; give milliseconds >= 0"):
            st.tuning_ms()


@pytest.mark.parametrize("garbage", ["grouped/7", "grouped/-4", "grouped/0+cl", "shifted", "unfold+cl", "wide/2"])
def test_a_cached_choice_that_cannot_compute_the_call_is_retuned_never_used(tmp_path, garbage):
    conv = SegmentedConv2d(8, 16, 3, padding=1, segments=4)
    x = torch.randn(2, 8, 6, 6)
    key = st.cache_key(x, conv.weight, conv.geometry, grad=False)
    peak = f"peak|{torch.__version__}|{st.machine_key(x.device)}|{x.dtype}"
    (tmp_path / "conv_strategies.json").write_text(json.dumps({key: garbage, peak: -1.0}))
    st.forget_choices()
    with torch.no_grad():
        y = conv(x)
    torch.testing.assert_close(y, F.conv2d(x, conv.weight, None, 1, 1, 1, 4))
    stored = json.loads((tmp_path / "conv_strategies.json").read_text())
    assert Strategy.parse(stored[key]) in candidates(8, 16, (3, 3), conv.geometry)
    assert stored[peak] > 0


def test_median_interval_is_the_order_statistics_of_a_binomial():
    assert median_interval(range(1, 10)) == (2, 8)  # n = 9: one value outside on each side (96 % coverage)
    assert median_interval(range(1, 31)) == (10, 21)  # the textbook interval for n = 30
    assert median_interval([5, 1, 3]) == (1, 5)  # too few values for 95 %: the range
    assert median_interval([2.0]) == (2.0, 2.0)


def test_a_lead_within_noise_earns_more_rounds_and_then_goes_to_the_plain_conv(monkeypatch):
    x, w, geom = torch.randn(2, 4, 6, 6), torch.randn(4, 2, 3, 3), ConvGeometry((1, 1), (1, 1), (1, 1), 2)
    names = [s.name for s in candidates(4, 4, (3, 3), geom)]
    # grouped/1 is far faster in two rounds of three and far slower in the third: its median leads, whichever round
    # the pattern starts in, but not beyond noise
    alternating = {"grouped/2+cl": [12.0], "grouped/1": [1.0, 1.0] + [0.5, 0.5, 40.0] * 20}
    counts = _fake_timings(monkeypatch, {name: [6.0] for name in names} | alternating)
    monkeypatch.setattr(st, "MAX_ROUNDS", 13)
    best, _, evidence = st.autotune(x, w, None, geom, grad=False, finalists=1, screen_ms=0, final_ms=0)
    assert best == Strategy("grouped", 2) and "13 rounds" in evidence and "the plain grouped conv kept" in evidence
    assert counts["grouped/2"] == 2 + 13  # rounds were added past MIN_ROUNDS, up to MAX_ROUNDS


def test_a_busy_machine_runs_the_plain_conv_caches_nothing_and_tunes_again_later(monkeypatch, tmp_path):
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=4)
    x = torch.randn(2, 8, 6, 6)
    tuned = _autotune_calls(monkeypatch)
    monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: "another process")
    with torch.no_grad():
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, None, 1, 1, 1, 4))
        assert st.TUNER.choose(x, conv.weight, None, conv.geometry) == Strategy("grouped", 4)
        assert tuned == [] and not _choices_on_disk(tmp_path)  # busy before tuning: nothing timed, nothing cached
        monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: None)
        conv(x)  # quiet now, but the retry is not due yet
        assert tuned == []
        monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: "another process")
        st.TUNER.retry_at.update(dict.fromkeys(st.TUNER.retry_at, 0.0))  # the retry falls due
        conv(x)  # busy again: the wait doubles
        signature = next(iter(st.TUNER.retry_at))
        assert st.TUNER.busy_streak[signature] == 2
        assert st.TUNER.retry_at[signature] - time.monotonic() == pytest.approx(2 * st.RETRY_SECONDS, abs=1)
        monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: None)
        st.TUNER.retry_at.update(dict.fromkeys(st.TUNER.retry_at, 0.0))
        conv(x)
    assert tuned == [1] and not st.TUNER.retry_at and not st.TUNER.busy_streak
    assert _choices_on_disk(tmp_path) == [st.cache_key(x, conv.weight, conv.geometry, grad=False)]


def test_a_machine_that_turns_busy_while_tuning_drops_the_result_and_waits_at_most_the_cap(monkeypatch, tmp_path):
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=4)
    x = torch.randn(2, 8, 6, 6)
    tuned, checks = _autotune_calls(monkeypatch), []
    # each tuning checks twice: the probe before it finds the machine quiet, the tuning's own window busy; a call
    # tunes twice (TUNING_TRIES) before it gives up
    monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: checks.append(1) or (
        None if len(checks) % 2 else "busy while tuning"))
    monkeypatch.setattr(st, "RETRY_MAX_SECONDS", 20.0)
    with torch.no_grad():
        for _ in range(4):
            st.TUNER.retry_at.update(dict.fromkeys(st.TUNER.retry_at, 0.0))
            conv(x)
    signature = next(iter(st.TUNER.retry_at))
    assert tuned == [1] * 4 * st.TUNING_TRIES and len(checks) == 2 * len(tuned)
    assert st.TUNER.busy_streak[signature] == 4 and not _choices_on_disk(tmp_path)
    assert st.TUNER.retry_at[signature] - time.monotonic() == pytest.approx(20.0, abs=1)  # 15, 30 -> capped at 20


def test_a_busy_spell_within_the_tuning_alone_is_probed_for_again_and_tuned_again_at_once(monkeypatch, tmp_path):
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=4)
    tuned, probes = _autotune_calls(monkeypatch), _probes(monkeypatch)
    verdicts = iter([None, "busy while tuning", None, None])  # probe, tuning, probe again, tuning again
    monkeypatch.setattr(st.Tuner, "busy_reason", lambda self, device, load=None: next(verdicts))
    with torch.no_grad():
        conv(torch.randn(2, 8, 6, 6))
    assert tuned == [1, 1] and len(probes) == 2  # the second probe did not trust the first's quiet reading
    assert len(_choices_on_disk(tmp_path)) == 1 and not st.TUNER.retry_at and not st.TUNER.busy_streak
    assert next(verdicts, "all used") == "all used"


def test_convs_tuned_in_a_row_share_one_probe_and_a_stale_reading_is_probed_again(monkeypatch):
    probes = _probes(monkeypatch)
    convs = [SegmentedConv2d(8, 8, 3, padding=1, segments=4), SegmentedConv2d(8, 16, 3, padding=1, segments=2)]
    with torch.no_grad():
        for conv in convs:
            conv(torch.randn(2, 8, 6, 6))  # two calls tuned in a row: the second trusts the first's quiet window
        assert len(probes) == 1
        st.TUNER.quiet_until = time.monotonic() - 1  # the quiet reading is now older than QUIET_TRUSTED_SECONDS
        convs[0](torch.randn(2, 8, 7, 7))
    assert len(probes) == 2


def _choices_on_disk(folder) -> list[str]:
    """The keys of the strategy choices in the disk cache (not its peak rates and reference times)."""
    path = folder / "conv_strategies.json"
    return [k for k in json.loads(path.read_text()) if k.startswith(f"{st.CACHE_VERSION}|")] if path.exists() else []


def test_another_process_on_the_cores_is_seen_as_busy(monkeypatch):
    monkeypatch.undo()  # the real busy check
    spin = "import time\nend = time.time() + 3\nwhile time.time() < end: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(os.cpu_count() or 1)]
    try:
        time.sleep(0.3)
        with st.OtherLoad() as load:
            time.sleep(0.5)
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert "other processes kept" in st.Tuner().busy_reason(torch.device("cpu"), load)


def test_a_slow_reference_workload_means_busy(monkeypatch, tmp_path):
    times = iter([2.0, 3.0, 5.0, 2.2, 4.2, 4.0])
    tuner = st.Tuner()
    monkeypatch.undo()  # the real busy check, with the fake reference times
    monkeypatch.setenv("CONTINUUM_CACHE", str(tmp_path))  # undone too: no quiet time from other tests
    monkeypatch.setattr(st, "reference_ms", lambda device: next(times))
    assert tuner.busy_reason(torch.device("cpu")) is None  # first seen: the quiet time
    assert tuner.busy_reason(torch.device("cpu")) is None  # 1.5x: a slow spell, not busy
    assert tuner.busy_reason(torch.device("cpu")) is None  # 2.5x, then 1.1x when timed again: a spell that passed
    assert "4.00 ms, 2.00x its quiet 2.00 ms" in tuner.busy_reason(torch.device("cpu"))  # slow twice: busy


@pytest.mark.parametrize("cached_ms, kept", [(30.0, False), (2.0, True)])
def test_a_cached_choice_is_checked_once_per_process_and_dropped_when_it_loses(monkeypatch, tmp_path, cached_ms,
                                                                                kept):
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=4)
    x = torch.randn(2, 8, 6, 6)
    key = st.cache_key(x, conv.weight, conv.geometry, grad=False)
    (tmp_path / "conv_strategies.json").write_text(json.dumps({key: "grouped/1"}))
    counts = _fake_timings(monkeypatch, {"grouped/1": [cached_ms], "grouped/4": [10.0], "grouped/4+cl": [10.0]})
    monkeypatch.setattr(st, "autotune", lambda *a, **k: pytest.fail("tuned despite the disk cache"))
    with torch.no_grad():
        conv(x)
        conv(x)
    assert counts["grouped/4+cl"] == 1 + st.VALIDATION_ROUNDS  # checked once: a warm-up and the rounds
    stored = json.loads((tmp_path / "conv_strategies.json").read_text())
    assert stored[key] == ("grouped/1" if kept else "grouped/4")


def test_the_cache_key_names_everything_that_changes_the_answer():
    conv = SegmentedConv2d(8, 8, 3, padding=1, segments=4)
    x = torch.randn(2, 8, 6, 6)
    key = st.cache_key(x.requires_grad_(), conv.weight, conv.geometry, grad=True)
    for part in (st.CACHE_VERSION, torch.__version__, kernel_library("cpu"), machine_key(x.device), "float32",
                 "nchw/nchw", "fwd+bwd"):
        assert part in key.split("|")
    first_layer = st.cache_key(x.detach(), conv.weight, conv.geometry, grad=True)  # no input gradient wanted
    assert "fwd+kernel bwd" in first_layer.split("|") and first_layer.replace("fwd+kernel bwd", "fwd+bwd") == key
    assert "threads" in device_name(x.device) and kernel_library("cpu").startswith("onednn ")
    assert machine_key(x.device).startswith(device_name(x.device) + " flags ")
    cl = st.cache_key(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.geometry, grad=False)
    assert "cl/nchw" in cl.split("|") and "fwd" in cl.split("|")


@pytest.fixture
def build_names(monkeypatch) -> SimpleNamespace:
    """A ``cpp_extension`` that builds nothing: ``.names`` records each name a kernel is built (or found) under,
    ``.compiler`` is the compiler it reports; building on, whatever ``$CONTINUUM_BUILD_KERNELS`` says."""
    fake = SimpleNamespace(names=[], compiler="c++")
    fake.load = lambda name, *_, **__: fake.names.append(name)
    fake.get_cxx_compiler = lambda: fake.compiler
    monkeypatch.setattr(compiled, "_cpp_extension", lambda: fake)
    monkeypatch.setattr(compiled, "building_allowed", lambda: True)
    return fake


def test_the_cpu_is_named_by_its_family_and_model_and_its_flags_key_what_was_tuned(monkeypatch, build_names):
    """Two VMs may both call their CPU "AMD EPYC" (Zen 3 without AVX-512, Zen 4 with it): a kernel built or a choice
    tuned on one must not be taken for the other."""
    zen3 = {"model name": "AMD EPYC", "cpu family": "25", "model": "1", "flags": "fpu avx2 fma"}
    zen4 = {"model name": "AMD EPYC", "cpu family": "25", "model": "17", "flags": "fpu avx2 fma avx512f"}
    keys = {}
    for name, info in (("zen3", zen3), ("zen4", zen4), ("zen4 masked", {**zen4, "flags": "fpu avx2 fma"})):
        monkeypatch.setattr(timing, "cpu_info", lambda info=info: info)
        timing.cpu_flags.cache_clear()
        keys[name] = (timing.cpu_model(), machine_key(torch.device("cpu")))
        built.__wrapped__("depthwise")  # the name the library is built (or found) under
    assert keys["zen3"][0] == "AMD EPYC family 25 model 1" and keys["zen4"][0] == "AMD EPYC family 25 model 17"
    assert keys["zen4"][0] == keys["zen4 masked"][0] and len({key for _, key in keys.values()}) == 3
    builds = build_names.names
    assert len(set(builds)) == 3 and all(name.startswith("continuum_depthwise_") for name in builds)
    monkeypatch.setattr(timing, "cpu_info", lambda: {})  # off Linux: what the platform says
    timing.cpu_flags.cache_clear()
    try:
        assert timing.cpu_model() and timing.cpu_flags() == frozenset()
    finally:
        monkeypatch.undo()
        timing.cpu_flags.cache_clear()  # this CPU's flags again


def test_each_checkout_environment_and_compiler_keeps_its_own_build(monkeypatch, tmp_path, build_names):
    """torch writes the source's path, its own headers' and libraries' paths and the compiler into a build's command:
    two checkouts (or environments) sharing the extensions folder under one name would each rebuild the other's."""
    other_checkout = tmp_path / "checkout" / "csrc"
    shutil.copytree(compiled.SOURCES, other_checkout)  # the same sources, byte for byte, elsewhere
    other_torch = tmp_path / "env" / "torch"
    other_torch.mkdir(parents=True)
    built.__wrapped__("depthwise")
    built.__wrapped__("depthwise")  # the same inputs: the same build
    built.__wrapped__("depthwise", other_checkout)
    with monkeypatch.context() as patch:
        patch.setattr(torch, "__file__", str(other_torch / "__init__.py"))
        built.__wrapped__("depthwise")
    build_names.compiler = "clang++"
    built.__wrapped__("depthwise")
    names = build_names.names
    assert names[0] == names[1] and len(set(names)) == 4
    assert all(name.startswith("continuum_depthwise_") for name in names)


def test_the_cpp_kernels_are_built_here_and_left_out_where_they_cannot_be(monkeypatch, building_on):
    depthwise, two_per_segment = ConvGeometry((1, 1), (1, 1), (1, 1), 16), ConvGeometry((1, 1), (1, 1), (1, 1), 8)
    assert depthwise_kernels() is not None  # a compiler and ninja are here: the C++ kernels build
    assert build_all() == [batch_norm_kernels(), depthwise_kernels(), few_channel_kernels()]  # the same modules
    assert Strategy("fused") in candidates(16, 16, (3, 3), depthwise)
    if few_channel_cpu():
        assert few_channel_kernels() is not None and Strategy("rotated") in candidates(16, 16, (3, 3), two_per_segment)
    else:
        assert few_channel_kernels() is None
    monkeypatch.setenv("CONTINUUM_BUILD_KERNELS", "0")
    built.cache_clear()
    try:
        assert depthwise_kernels() is None and Strategy("fused") not in candidates(16, 16, (3, 3), depthwise)
        assert few_channel_kernels() is None and Strategy("rotated") not in candidates(16, 16, (3, 3), two_per_segment)
        assert build_all() == [None, None, None]
    finally:
        built.cache_clear()


@pytest.mark.parametrize("kind, groups", [("fused", 16), ("rotated", 8), ("broadcast", 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpp_kernels_refuse_what_they_cannot_run(dtype, kind, groups):
    x, w = torch.randn(2, 16, 5, 5, dtype=dtype), torch.randn(16, 16 // groups, 3, 3, dtype=dtype)
    geom = ConvGeometry((1, 1), (1, 1), (1, 1), groups)
    if dtype == torch.float32:
        with torch.autocast("cpu", torch.bfloat16), pytest.raises(ValueError, match="without autocast"):
            run_strategy(Strategy(kind), x, w, None, geom)
    else:
        with pytest.raises(ValueError, match="float32 or float64 on the CPU"):
            run_strategy(Strategy(kind), x, w, None, geom)


@pytest.fixture
def few_channel():
    """Skips the test where the rotated and broadcast kernels cannot be built (asked at run time: collection never
    waits for the build)."""
    if few_channel_kernels() is None:
        pytest.skip("the rotated and broadcast kernels need AVX-512 or AVX2 and a compiler")


@pytest.mark.usefixtures("few_channel")
@pytest.mark.parametrize("kind, k", [("rotated", 4), ("broadcast", 8)])
def test_the_few_channel_kernels_refuse_strides_and_compute_a_kernel_gradient_alone(kind, k):
    torch.manual_seed(0)
    x = torch.randn(2, 4 * k, 7, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(4 * k, k, 3, 3, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="stride 1"):
        run_strategy(Strategy(kind), x, w, None, ConvGeometry((2, 2), (1, 1), (1, 1), 4))
    geom = ConvGeometry((1, 1), (1, 1), (1, 1), 4)
    y = run_strategy(Strategy(kind), x, w, None, geom)  # x needs no gradient: only the kernel's is computed
    upstream = torch.randn_like(y)
    (got,) = torch.autograd.grad(y, w, upstream)
    (want,) = torch.autograd.grad(F.conv2d(x, w, None, 1, 1, 1, 4), w, upstream)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("few_channel")
def test_the_few_channel_kernels_are_built_for_the_declared_widths_alone():
    assert FEW_CHANNEL_WIDTHS == range(2, 8)  # the widths measured faster than oneDNN (results/bench/README.md)
    assert BROADCAST_WIDTHS == range(8, 17)
    kernels = few_channel_kernels()
    for widths, forward, layout in ((FEW_CHANNEL_WIDTHS, kernels.forward, lambda k: (3, 3, k, 4 * k)),
                                    (BROADCAST_WIDTHS, kernels.broadcast_forward, lambda k: (3, 3, 4 * k, k))):
        for k in (widths.start - 1, widths.stop):  # just outside: refused by the built kernel
            x = torch.randn(1, 4 * k, 5, 5).contiguous(memory_format=torch.channels_last)
            with pytest.raises(RuntimeError, match=f"channels per group: {widths.start} to {widths.stop - 1}"):
                forward(x, torch.randn(layout(k)), [1, 1], [1, 1], [1, 1])


@pytest.mark.usefixtures("few_channel")
@pytest.mark.parametrize("k", [*FEW_CHANNEL_WIDTHS, *BROADCAST_WIDTHS])
def test_the_few_channel_kernels_are_exact_at_every_row_width_and_edge(k):
    kind = "rotated" if k in FEW_CHANNEL_WIDTHS else "broadcast"
    torch.manual_seed(k)  # 16-24 columns: every remainder of the pixel blocks, whole blocks inside and edge blocks
    # 5 groups; at 2-4 channels per group 16 too, whole blocks of two or three registers (AVX-512); at 8 and 12 4, the
    # kernel gradient's blocks of groups packed two to a register
    groups_tried = {2: (5, 16), 3: (5, 16), 4: (5, 16), 8: (5, 4), 12: (5, 4)}.get(k, (5,))
    for width, padding, groups in itertools.product(range(16, 25), (0, 1, 2), groups_tried):
        x = torch.randn(2, groups * k, 3, width, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        w = torch.randn(groups * k, k, 3, 3, dtype=torch.float64, requires_grad=True)
        geom = ConvGeometry((1, 1), (padding, padding), (max(padding, 1),) * 2, groups)  # padding 2: dilation 2,
        y = run_strategy(Strategy(kind), x, w, None, geom)  # taps beyond the row's left and right edges
        ref = F.conv2d(x, w, None, 1, padding, geom.dilation, groups)
        upstream = torch.randn_like(ref)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        for got, want in zip(torch.autograd.grad(y, (x, w), upstream), torch.autograd.grad(ref, (x, w), upstream)):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.usefixtures("few_channel")
@pytest.mark.parametrize("k", [*FEW_CHANNEL_WIDTHS, *BROADCAST_WIDTHS])
def test_the_few_channel_kernels_float32_passes_match_float64_at_every_block_tail(k):
    # float32 runs the vector instructions (float64 plain arrays): whole-register stores that spill into the next
    # block, masked ones at a pixel's last block, sums padded to whole registers; 8, 16 and 32 groups: streaming
    # stores where every block is whole registers (2, 3, 4, 16 and, with AVX2, 8 channels per group), staged first
    # where whole groups fill whole registers (at 8-15 16 or 32 groups do), the kernel gradient packed two groups to
    # a register at 8 and 12; with AVX-512, blocks of two or three registers at 2-4 channels per group (at 3 the groups
    # cross from one into the next). The last: rows of 6,000-6,400 floats, so that the kernel gradient sweeps each
    # image in two bands of output rows (five and one) and the forward fetches rows ahead across the two images
    kind = "rotated" if k in FEW_CHANNEL_WIDTHS else "broadcast"
    torch.manual_seed(k)
    for groups, width in ((1, 5), (3, 7), (5, 17), (8, 9), (16, 6), (32, 5), (64 // k, 100)):
        x = torch.randn(2, groups * k, 6, width, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        w = torch.randn(groups * k, k, 3, 3, dtype=torch.float64)
        geom = ConvGeometry((1, 1), (1, 1), (1, 1), groups)
        x32, w32 = x.float().requires_grad_(True), w.float().requires_grad_(True)
        y = run_strategy(Strategy(kind), x32, w32, None, geom)
        upstream = torch.randn(y.shape, dtype=torch.float64)
        x64, w64 = x.requires_grad_(True), w.requires_grad_(True)
        ref = F.conv2d(x64, w64, None, 1, 1, 1, groups)
        got = [y, *torch.autograd.grad(y, (x32, w32), upstream.float())]
        for a, b in zip(got, [ref, *torch.autograd.grad(ref, (x64, w64), upstream)]):
            torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())


def test_on_a_cpu_with_its_load_measured_a_slow_reference_alone_is_not_busy(monkeypatch):
    monkeypatch.undo()  # the real busy check
    monkeypatch.setattr(st, "reference_ms", lambda device: pytest.fail("the reference ran"))
    with st.OtherLoad() as load:
        pass
    load.share = 0.0  # measured: quiet
    assert st.Tuner().busy_reason(torch.device("cpu"), load) is None


def test_the_fused_float32_passes_match_float64_at_every_channel_tail_and_image_edge():
    if depthwise_kernels() is None:
        pytest.skip("the fused kernel needs a compiler")
    torch.manual_seed(0)  # 3 x 3, stride 1, padding 1 in float32: the register-blocked path on AVX-512 CPUs (the
    # backward two rows at a time, the forward six: a last block with rows outside the image at every height but 12;
    # streaming stores where the channels fill 16-float vectors). The last two have rows so wide (over 8,192 floats)
    # that a band of rows is two rows backward and six forward: each image several bands, its last one shorter.
    for channels, height, width in ((16, 5, 4), (20, 3, 7), (5, 1, 1), (33, 2, 1), (48, 1, 3), (32, 4, 2), (64, 7, 5),
                                    (16, 12, 3), (17, 13, 2), (48, 13, 180), (40, 13, 205)):
        x = torch.randn(3, channels, height, width, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
        w = torch.randn(channels, 1, 3, 3, dtype=torch.float64)
        upstream = torch.randn_like(x)
        want = torch.autograd.grad(F.conv2d(x.requires_grad_(), w.requires_grad_(), None, 1, 1, 1, channels),
                                   (x, w), upstream)
        x32, w32 = (t.detach().float().requires_grad_() for t in (x, w))
        y = run_strategy(Strategy("fused"), x32, w32, None, ConvGeometry((1, 1), (1, 1), (1, 1), channels))
        torch.testing.assert_close(y.double(), F.conv2d(x, w, None, 1, 1, 1, channels), rtol=1e-5, atol=1e-5)
        grads = torch.autograd.grad(y, (x32, w32), upstream.float())
        for got, expected, summed in zip(grads, want, (9, 3 * height * width)):  # products summed per entry
            # float32's rounding grows with the sum: thousands of products per kernel-gradient entry in the wide rows
            tolerance = 1e-5 if summed < 1000 else 2e-6 * float(expected.abs().max())
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=tolerance)
    bias = torch.randn(48)
    x = torch.randn(2, 48, 6, 6).contiguous(memory_format=torch.channels_last)
    w = torch.randn(48, 1, 3, 3)
    torch.testing.assert_close(run_strategy(Strategy("fused"), x, w, bias, ConvGeometry((1, 1), (1, 1), (1, 1), 48)),
                               F.conv2d(x, w, bias, 1, 1, 1, 48), rtol=1e-5, atol=1e-5)
