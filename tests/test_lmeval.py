"""lm-eval tasks through ScorerLM: log-likelihoods equal transformers' own, local example tasks run offline."""

import json

import pytest
import torch

from conftest import REF_MODEL
from turboquant.io.loaders import load_model, load_tokenizer
from turboquant.quality.lmeval import LOCAL_TASKS, ScorerLM, run_tasks


class _Req:
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def ref():
    return load_model(REF_MODEL), load_tokenizer(REF_MODEL)


def test_rolling_loglikelihood_equals_transformers_loss(ref):
    model, tok = ref
    text = json.loads((LOCAL_TASKS / "tq_wiki_ppl.jsonl").read_text().splitlines()[0])["text"]
    ll = ScorerLM(model, tok).loglikelihood_rolling([_Req(text)])[0]
    ids = torch.tensor([tok(text)["input_ids"]])  # BOS + text, as ScorerLM conditions on
    with torch.no_grad():
        loss = model(ids, labels=ids).loss.item()
    assert abs(-ll / (ids.shape[1] - 1) - loss) < 1e-5


def test_loglikelihood_moves_context_spaces_and_reports_greedy(ref):
    model, tok = ref
    lm = ScorerLM(model, tok)
    (a, greedy_a), (b, _) = lm.loglikelihood([_Req("Once upon a time, there ", "was"), _Req("Once upon a time, there", " was")])
    assert a == b and a < 0
    ctx = "Once upon a time, there"
    nxt = tok.decode([int(torch.log_softmax(model(torch.tensor([[tok.bos_token_id] + tok(ctx, add_special_tokens=False)["input_ids"]])).logits[0, -1], -1).argmax())])
    assert lm.loglikelihood([_Req(ctx, nxt)])[0][1] is True


def test_local_example_tasks_run_offline(ref):
    model, tok = ref
    res = run_tasks(model, tok, ["tq_story_cloze", "tq_wiki_ppl"])
    assert res["tq_story_cloze"]["sample_len"] == 15 and 0 <= res["tq_story_cloze"]["acc"] <= 1
    assert 1 < res["tq_wiki_ppl"]["byte_perplexity"] < 10 and res["tq_wiki_ppl"]["sample_len"] == 20
