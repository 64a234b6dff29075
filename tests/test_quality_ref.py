"""Quality on the trained reference model, evaluated on held-out text (see ../shared/models/README.md)."""

import pytest

from turboquant.quality.evaluate import evaluate_many
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
from turboquant.methods import make_config
from turboquant.quantize.pipeline import quantize

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ref_setup(ref_model, heldout_text):
    ids = tokenize(load_tokenizer(ref_model), read_text(heldout_text))
    return load_model(ref_model), ids


@pytest.fixture(scope="module")
def rtn_results(ref_setup, ref_model, tmp_path_factory):
    baseline, ids = ref_setup
    models = {}
    for label, opts in {"w8g128": dict(bits=8, group_size=128), "w4g128": dict(bits=4, group_size=128, symmetric=False),
                        "w4chan": dict(bits=4, group_size=-1, symmetric=False)}.items():
        qdir = quantize(ref_model, make_config("rtn", **opts), tmp_path_factory.mktemp(label) / "q", progress=False)
        models[label] = load_model(qdir)
    return evaluate_many(models, ids, ctx=512, baseline=baseline)


def test_baseline_perplexity_matches_published_number(rtn_results):
    assert rtn_results["w8g128"].baseline_ppl == pytest.approx(38.04, abs=0.01)
    assert rtn_results["w8g128"].n_windows == 72


def test_rtn_8bit_g128_is_nearly_lossless(rtn_results):
    r = rtn_results["w8g128"]
    assert abs(r.ppl_delta_pct) < 0.5
    assert r.kl < 1e-4 and r.top1 > 0.99


def test_rtn_4bit_groups_beat_per_channel(rtn_results):
    g, c = rtn_results["w4g128"], rtn_results["w4chan"]
    assert g.kl < c.kl
    assert 5e-4 < g.kl < 0.01 and g.top1 > 0.95
