"""benchmarks/bench.py's Meter on CPU: a step that captured a CUDA graph (a new row width: seconds of
eager warm-up) is timed apart from the steady steps, and both rates are reported."""

import importlib.util
import logging
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[2]
spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _run(meter, steps):
    """Drive the callback as the Trainer does: (seconds, tokens, captures logged) per step."""
    clock = [0.0]
    bench.time.perf_counter, real = (lambda: clock[0]), bench.time.perf_counter
    loader = SimpleNamespace(collate_fn=lambda rows: rows)
    try:
        meter.on_train_begin(None, SimpleNamespace(max_steps=len(steps)), None, loader)
        for i, (seconds, tokens, captures) in enumerate(steps):
            state = SimpleNamespace(global_step=i)
            loader.collate_fn({"num_tokens": tokens})
            meter.on_step_begin(None, state, None)
            for _ in range(captures):
                logging.getLogger("summarizer.speed.graph_step").info("train.cuda_graph: captured")
            clock[0] += seconds
            meter.on_step_end(None, SimpleNamespace(global_step=i + 1), None)
        meter.on_train_end(None, None, None)
    finally:
        bench.time.perf_counter = real


def test_steps_that_capture_a_graph_are_timed_apart():
    meter = bench.Meter(pad_id=0, warmup=2, profile=0)
    # warm-up (the first capture in it), then 1.0 s steps of 100 tokens, two of which captured
    steps = [(5.0, 100, 1), (1.0, 100, 0), (1.0, 100, 0), (4.0, 100, 1), (1.0, 100, 0)]
    steps += [(1.0, 300, 0), (6.0, 100, 2), (1.0, 100, 0)]
    _run(meter, steps)
    f = meter.figures()
    assert f["steps"] == 8 and f["tokens_total"] == 1000
    # steady: steps 2, 4, 5, 7 -> 600 tokens in 4 s
    assert f["tokens_per_second"] == pytest.approx(150.0)
    assert f["seconds_per_step"] == pytest.approx(1.0)
    assert f["tokens_per_step"] == pytest.approx(150.0)
    # with the captures: steps 2..7 -> 800 tokens in 14 s
    assert f["tokens_per_second_incl_capture"] == pytest.approx(800 / 14)
    assert f["graph_captures"] == 4 and f["graph_captures_timed"] == 3  # steps 3 and 6
    assert f["step_captured"] == [0, 3, 6]
    assert f["step_seconds"] == [s for s, _, _ in steps]
    assert f["tokens_per_second_whole_run"] == pytest.approx(1000 / 20)
    assert bench.whole_run(f, {"tokens_per_second_whole_run": 25.0}) == "50, 2.00x"
    # the handler is gone after training: a later run's captures are not counted here
    logging.getLogger("summarizer.speed.graph_step").info("train.cuda_graph: captured")
    assert meter.captures.count == 4
    # only the capture lines count
    meter.captures.emit(logging.makeLogRecord({"msg": "train.cuda_graph: rows of 4096"}))
    assert meter.captures.count == 4


def test_without_captures_both_rates_agree():
    meter = bench.Meter(pad_id=0, warmup=1, profile=0)
    _run(meter, [(3.0, 50, 0), (0.5, 100, 0), (0.5, 200, 0)])
    f = meter.figures()
    assert f["tokens_per_second"] == f["tokens_per_second_incl_capture"] == pytest.approx(300.0)
    assert f["graph_captures"] == 0 and f["tokens_per_second_whole_run"] == pytest.approx(87.5)


def test_the_profiled_steps_are_the_runs_middle_and_left_out_of_the_rate():
    meter = bench.Meter(pad_id=0, warmup=1, profile=2)
    # 10 steps: profiled from step (10 - 2) // 2 = 4, i.e. steps 4 and 5 (the profiler slows them)
    steps = [(3.0, 10, 1)] + [(1.0, 10, 0)] * 3 + [(9.0, 10, 0)] * 2 + [(1.0, 10, 0)] * 4
    _run(meter, steps)
    assert meter.profile_at == 4
    meter.busy = 0.9  # as the profiler (CUDA only) would have set it
    f = meter.figures()
    assert f["tokens_per_second"] == pytest.approx(10.0)  # 7 steps of 1 s


def test_rouge_l_of_token_ids_is_rouge_scores():
    # LCS of [1, 2, 3, 4] and [1, 3, 4, 5] is 3: precision = recall = 3/4
    assert bench.rouge_l([[1, 2, 3, 4]], [[1, 3, 4, 5]]) == pytest.approx(75.0)
    assert bench.rouge_l([[], [7]], [[], [8]]) == pytest.approx(50.0)  # empty pair: equal
    assert bench.rouge_l([[12, 12, 3]], [[12, 3]]) == pytest.approx(80.0)  # ids, not digits
