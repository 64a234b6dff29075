import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from turboquant.errors import DataError
from turboquant.quality.evaluate import Window, evaluate, evaluate_paths, windows
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize


def test_windows_non_overlapping_drop_the_tail():
    assert windows(1030, 512) == [Window(0, 512, 512), Window(512, 1024, 512)]
    assert windows(100, 512) == [Window(0, 100, 100)]
    assert windows(1, 512) == []


def test_strided_windows_score_each_token_once():
    ws = windows(1000, 512, stride=256)
    assert ws == [Window(0, 512, 512), Window(256, 768, 256)]
    assert sum(w.n_new for w in ws) == ws[-1].end
    with pytest.raises(DataError, match="stride"):
        windows(1000, 512, stride=600)


@pytest.fixture(scope="module")
def tiny_setup(tiny_model, heldout_text):
    tok = load_tokenizer(tiny_model)
    ids = tokenize(tok, read_text(heldout_text))[:2100]
    return load_model(tiny_model), ids


def test_perplexity_equals_transformers_loss(tiny_setup, tiny_model):
    model, ids = tiny_setup
    result = evaluate(model, ids, ctx=256)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, ids.numel() - 256 + 1, 256):
            chunk = ids[begin : begin + 256].unsqueeze(0)
            total += hf(chunk, labels=chunk).loss.item() * 255
            count += 255
    assert result.n_scored == count == 8 * 255 and result.n_windows == 8
    assert result.ppl == pytest.approx(math.exp(total / count), rel=1e-5)


def test_strided_perplexity_matches_transformers_masked_loss(tiny_setup, tiny_model):
    model, ids = tiny_setup
    ids = ids[:768]
    result = evaluate(model, ids, ctx=256, stride=128)
    hf = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows(ids.numel(), 256, 128):
            chunk = ids[w.begin : w.end].unsqueeze(0)
            labels = chunk.clone()
            labels[:, : -w.n_new] = -100
            scored = (labels[:, 1:] != -100).sum().item()
            nll += hf(chunk, labels=labels).loss.item() * scored
            n += scored
    assert result.n_scored == n
    assert result.ppl == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_model_against_itself_has_zero_kl_and_full_agreement(tiny_setup):
    model, ids = tiny_setup
    r = evaluate(model, ids, ctx=256, baseline=model)
    assert r.kl == pytest.approx(0.0, abs=1e-7) and r.top1 == 1.0 and r.ppl_delta_pct == pytest.approx(0.0, abs=1e-9)


def test_kl_grows_with_damage(tiny_setup, tiny_model):
    model, ids = tiny_setup
    damaged = load_model(tiny_model)
    with torch.no_grad():
        damaged.model.layers[0].mlp.down_proj.weight.mul_(1.5)
    mild = load_model(tiny_model)
    with torch.no_grad():
        mild.model.layers[0].mlp.down_proj.weight.mul_(1.05)
    r_big = evaluate(damaged, ids, ctx=256, baseline=model)
    r_small = evaluate(mild, ids, ctx=256, baseline=model)
    assert 0 < r_small.kl < r_big.kl and r_big.top1 <= r_small.top1 <= 1.0


def test_text_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_text(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(DataError, match="is empty"):
        read_text(tmp_path / "empty.txt")


def test_evaluate_paths_refuses_mismatched_baseline(tmp_path, tiny_model, heldout_text):
    from turboquant.io.tiny import save_tiny_model

    other = save_tiny_model(tmp_path / "other", hidden=64, intermediate=128, layers=1, vocab=512,
                            tokenizer_from=tiny_model)
    with pytest.raises(DataError, match="vocabulary"):
        evaluate_paths(tiny_model, heldout_text, baseline=other, max_tokens=300)


def test_saved_baseline_topk_kl_matches_the_exact_kl(tmp_path):
    """A baseline saved once (float16 log-probs) gives the same perplexities and top-1, and KL within 1 %."""
    from conftest import HELDOUT, REF_MODEL
    from turboquant.quality.evaluate import BaselineLogits, evaluate_many
    from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize
    from turboquant.methods import make_config
    from turboquant.quantize.pipeline import quantize

    ids = tokenize(load_tokenizer(REF_MODEL), read_text(HELDOUT))[:4096]
    base = load_model(REF_MODEL)
    q = load_model(quantize(REF_MODEL, make_config("rtn", bits=3, group_size=128), tmp_path / "q", progress=False))
    exact = evaluate_many({"q": q}, ids, ctx=256, baseline=base)["q"]
    BaselineLogits.compute(base, ids, ctx=256).save(tmp_path / "base.safetensors")
    cached = BaselineLogits.load(tmp_path / "base.safetensors")
    approx = evaluate_many({"q": q}, ids, ctx=256, baseline=cached)["q"]
    assert approx.ppl == exact.ppl and approx.n_scored == exact.n_scored
    assert abs(approx.baseline_ppl - exact.baseline_ppl) < 1e-6 * exact.baseline_ppl
    assert approx.top1 == exact.top1
    assert abs(approx.kl / exact.kl - 1) < 0.01, (approx.kl, exact.kl)
    with pytest.raises(Exception, match="recompute the baseline"):
        evaluate_many({"q": q}, ids, ctx=128, baseline=cached)
