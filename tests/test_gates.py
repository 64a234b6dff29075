import json

import pytest

from turboquant.errors import ConfigError
from turboquant.quality.gates import Gates, judge


def test_defaults_by_bit_width():
    g8, g4, g3 = Gates.for_bits(8), Gates.for_bits(4.25), Gates.for_bits(3)
    assert (g8.max_ppl_delta_pct, g8.max_kl) == (1.0, 0.01)
    assert (g4.max_ppl_delta_pct, g4.max_kl) == (5.0, 0.1)  # mixed 4.25 bits: the 4-bit row
    assert g3.max_kl == 0.2 and Gates.for_bits(4, max_kl=0.05).max_kl == 0.05


def test_passing_and_failing_metrics_list_every_check():
    gates = Gates.for_bits(4)
    good = {"ppl_delta_pct": 1.2, "kl": 0.01, "top1": 0.97, "tasks": {"mc": {"score": 61.0, "baseline": 62.0}}}
    v = judge(good, gates)
    assert v.passed and v.reasons == [] and {c.gate for c in v.checks} == {
        "max_ppl_delta_pct", "max_kl", "min_top1", "max_task_drop:mc"}
    bad = {"ppl_delta_pct": 40.0, "kl": 1.7, "top1": 0.3, "tasks": {"mc": {"score": 50.0, "baseline": 62.0}}}
    v = judge(bad, gates)
    assert not v.passed and len(v.reasons) == 4
    assert any("mean KL divergence 1.7 exceeds 0.1" in r for r in v.reasons)
    assert any("mc score drop (points) 12 exceeds 2" in r for r in v.reasons)
    d = json.loads(json.dumps(v.to_dict()))
    assert d["passed"] is False and d["checks"][0]["threshold"] == 5.0 and d["checks"][0]["value"] == 40.0


def test_unmeasured_or_nan_metric_fails_its_gate():
    v = judge({"ppl_delta_pct": float("nan"), "top1": 0.99}, Gates.for_bits(8))
    assert not v.passed
    assert any("perplexity increase % was not measured" in r for r in v.reasons)
    assert any("mean KL divergence was not measured" in r for r in v.reasons)


@pytest.mark.parametrize("bad", [{"max_kl": -1}, {"max_kl": "0.1"}, {"max_kl": True}, {"kl": 0.1}])
def test_bad_gate_values_are_rejected(bad):
    with pytest.raises(ConfigError):
        Gates.from_dict(bad)
