"""Calibrated methods on the trained reference model (issue: GPTQ/AWQ quality), held-out evaluation text.

Calibration: 128 x 512 tokens from calib/wiki.txt + calib/c4.txt (never overlapping heldout/). KL divergence against
the float model is the asserted metric (see ../shared/models/README.md); perplexity and top-1 are reported beside.
"""

import pytest

from turboquant.io.calibration import CalibrationRecipe, build_calibration
from turboquant.quality.evaluate import evaluate_many
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

from conftest import CALIB

pytestmark = pytest.mark.slow

RUNS = {
    "rtn-w4": ("rtn", dict(bits=4, group_size=128, symmetric=False), "wiki+c4"),
    "gptq-w4": ("gptq", dict(bits=4, group_size=128, symmetric=False), "wiki+c4"),
    "awq-w4": ("awq", dict(bits=4, group_size=128, symmetric=False), "wiki+c4"),
    "rtn-w3": ("rtn", dict(bits=3, group_size=128, symmetric=False), "wiki+c4"),
    "gptq-w3": ("gptq", dict(bits=3, group_size=128, symmetric=False), "wiki+c4"),
    "gptq-w4-code": ("gptq", dict(bits=4, group_size=128, symmetric=False), "code"),
}
SOURCES = {"wiki+c4": (str(CALIB / "wiki.txt"), str(CALIB / "c4.txt")), "code": (str(CALIB / "code.txt"),)}


@pytest.fixture(scope="module")
def results(ref_model, heldout_text, tmp_path_factory):
    calib = {name: build_calibration(CalibrationRecipe(src, n_samples=128, seqlen=512, seed=0), ref_model)
             for name, src in SOURCES.items()}
    models = {}
    for label, (method, opts, data) in RUNS.items():
        out = tmp_path_factory.mktemp(label) / "q"
        quantize(ref_model, make_config(method, **opts), out, progress=False,
                 calib=calib[data] if method != "rtn" else None)
        models[label] = load_model(out)
    ids = tokenize(load_tokenizer(ref_model), read_text(heldout_text))
    res = evaluate_many(models, ids, ctx=512, baseline=load_model(ref_model))
    for label, r in res.items():
        print(f"{label:14s} KL {r.kl:.6f}  top-1 {r.top1:.4f}  ppl {r.ppl:.3f} ({r.ppl_delta_pct:+.2f}%)")
    return res


def test_gptq_4bit_has_at_most_half_of_rtn_kl(results):
    assert results["gptq-w4"].kl <= 0.5 * results["rtn-w4"].kl
    assert results["gptq-w4"].top1 > results["rtn-w4"].top1


def test_awq_4bit_beats_rtn(results):
    assert results["awq-w4"].kl < results["rtn-w4"].kl


def test_gptq_3bit_beats_rtn_by_a_wide_margin(results):
    assert results["gptq-w3"].kl <= 0.5 * results["rtn-w3"].kl


def test_calibrating_on_code_costs_quality(results):
    assert results["gptq-w4-code"].kl > results["gptq-w4"].kl
