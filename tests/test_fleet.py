"""benchmarks/fleet.py's simulation: it respects dependencies and worker counts, meets its bounds, and a night of
concurrent releases beats one release after another."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("fleet", Path(__file__).resolve().parents[1] / "benchmarks" / "fleet.py")
fleet = importlib.util.module_from_spec(spec)
spec.loader.exec_module(fleet)

STEPS = {"calibrate": 2, "baseline": 3, "quantize gptq-w4-g128": 20, "quantize awq-w4-g128-asym": 60,
         "quantize rtn-w8-g32": 1, "ship gptq-w4-g128-gptq": 10, "ship gptq-w4-g128-compressed-tensors": 12,
         "ship gptq-w4-g128-awq": 10, "ship gptq-w4-g128-mlx": 15, "ship gptq-w4-g128-gguf": 5,
         "ship awq-w4-g128-asym-awq": 10, "ship awq-w4-g128-asym-compressed-tensors": 12,
         "ship rtn-w8-g32-gguf": 5}


def test_one_release_on_enough_workers_takes_its_longest_chain():
    jobs = fleet.release_jobs(STEPS, ("cuda", "cpu"), 1.0)
    assert len([j for j in jobs if j[0].startswith("ship")]) == 8  # the plan's 8 artifacts
    assert fleet.chain(jobs) == 2 + 60 + 12  # calibrate -> awq -> its compressed-tensors export + validation
    alone = fleet.simulate(jobs, 1, {"cuda": 16, "cpu": 16}, concurrent=True)
    assert alone["makespan_s"] == pytest.approx(fleet.chain(jobs))


def test_the_night_meets_its_bounds_and_concurrency_beats_the_old_loop():
    jobs = fleet.release_jobs(STEPS, ("cuda", "cpu"), 1.0)
    workers = {"cuda": 4, "cpu": 4}
    gpu_work = 50 * sum(s for _, pool, s, _ in jobs if pool == "cuda")
    now = fleet.simulate(jobs, 50, workers, concurrent=True)
    before = fleet.simulate(jobs, 50, workers, concurrent=False)
    assert now["makespan_s"] >= gpu_work / 4 and now["busy_s"]["cuda"] == pytest.approx(gpu_work)
    assert before["makespan_s"] == pytest.approx(50 * fleet.chain(jobs))  # one release at a time
    assert now["makespan_s"] < before["makespan_s"] / 2
    assert fleet.simulate(jobs, 50, workers, concurrent=True)["makespan_s"] == now["makespan_s"]  # deterministic


def test_a_gpu_speedup_moves_only_the_gpu_steps():
    slow = dict((s, t) for s, _, t, _ in fleet.release_jobs(STEPS, ("cuda", "cpu"), 1.0))
    fast = dict((s, t) for s, _, t, _ in fleet.release_jobs(STEPS, ("cuda", "cpu"), 10.0))
    assert fast["quantize gptq-w4-g128"] == 2 and fast["quantize rtn-w8-g32"] == slow["quantize rtn-w8-g32"] == 1
