import hashlib
import json

import pytest
import torch

from turboquant.io.calibration import (CalibrationRecipe, CalibrationSet, build_calibration, check_vocab, read_documents)
from turboquant.errors import ConfigError, DataError

from conftest import CALIB, REF_MODEL


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_same_recipe_gives_same_bytes(tmp_path):
    recipe = CalibrationRecipe((str(CALIB / "c4.txt"),), n_samples=16, seqlen=64, seed=3)
    a = build_calibration(recipe, REF_MODEL).save(tmp_path / "a.safetensors")
    b = build_calibration(recipe, REF_MODEL).save(tmp_path / "b.safetensors")
    assert _sha(a) == _sha(b)
    other = build_calibration(CalibrationRecipe(recipe.sources, 16, 64, seed=4), REF_MODEL).save(tmp_path / "c.st")
    assert _sha(other) != _sha(a)
    loaded = CalibrationSet.load(a)
    assert loaded.input_ids.shape == (16, 64) and loaded.recipe == recipe
    assert loaded.provenance["sources_sha256"][str(CALIB / "c4.txt")] == _sha(CALIB / "c4.txt")
    assert len(loaded.provenance["tokenizer_sha256"]) == 64


def test_windows_are_slices_of_the_tokenized_text():
    from turboquant.io.loaders import load_tokenizer

    recipe = CalibrationRecipe((str(CALIB / "tiny.txt"),), n_samples=4, seqlen=32, seed=0)
    calib = build_calibration(recipe, REF_MODEL)
    ids = torch.tensor(load_tokenizer(REF_MODEL)(read_documents(recipe.sources)[0])["input_ids"])
    for row in calib.input_ids:
        starts = (ids.unfold(0, 32, 1) == row).all(1).nonzero()
        assert starts.numel() >= 1


def test_seqlen_is_capped_at_model_context():
    calib = build_calibration(CalibrationRecipe((str(CALIB / "tiny.txt"),), n_samples=2, seqlen=4096), REF_MODEL,
                              max_context=1024)
    assert calib.input_ids.shape == (2, 1024) and calib.recipe.seqlen == 1024


def test_json_lines_and_parquet_sources(tmp_path):
    import datasets

    rows = [{"content": f"document number {i} " * 20} for i in range(10)]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    for name in ("d.jsonl", "d.parquet"):
        docs = read_documents((str(tmp_path / name),), text_field="content")
        assert docs == [r["content"] for r in rows]
    with pytest.raises(DataError, match="no 'text' column.*--text-field"):
        read_documents((str(tmp_path / "d.jsonl"),))


def test_bad_calibration_inputs(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no text"):
        build_calibration(CalibrationRecipe((str(tmp_path / "empty.txt"),), 4, 16), REF_MODEL)
    (tmp_path / "short.txt").write_text("just a few words")
    with pytest.raises(DataError, match="fewer than one window of 512"):
        build_calibration(CalibrationRecipe((str(tmp_path / "short.txt"),), 4, 512), REF_MODEL)
    with pytest.raises(DataError, match="does not exist"):
        build_calibration(CalibrationRecipe((str(tmp_path / "missing.txt"),), 4, 16), REF_MODEL)
    with pytest.raises(ConfigError, match="no calibration data"):
        CalibrationRecipe(())
    with pytest.raises(ConfigError, match="n_samples=0"):
        CalibrationRecipe(("x",), n_samples=0)
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(DataError, match="not a calibration file"):
        CalibrationSet.load(tmp_path / "junk.safetensors")


def test_vocab_mismatch_is_refused():
    calib = CalibrationSet(torch.tensor([[5, 9000]]), CalibrationRecipe(("x",), 1, 2))
    with pytest.raises(DataError, match="token id 9000 is outside the model's vocabulary \\(4096\\)"):
        check_vocab(calib, 4096)


def test_chat_template_wraps_each_document(tmp_path):
    import shutil

    tok_dir = tmp_path / "chat-tok"
    tok_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copyfile(REF_MODEL / name, tok_dir / name)
    cfg = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }}</s>{% endfor %}"
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    (tmp_path / "docs.jsonl").write_text("\n".join(json.dumps({"text": f"question {i} " * 30}) for i in range(4)))
    recipe = CalibrationRecipe((str(tmp_path / "docs.jsonl"),), n_samples=2, seqlen=32, chat_template=True)
    calib = build_calibration(recipe, tok_dir)
    plain = build_calibration(CalibrationRecipe(recipe.sources, 2, 32), tok_dir)
    eos = 1
    assert calib.input_ids.shape == (2, 32)
    assert not torch.equal(calib.input_ids, plain.input_ids)
    assert calib.provenance["n_text_tokens"] > plain.provenance["n_text_tokens"]
    with pytest.raises(DataError, match="no chat template"):
        build_calibration(recipe, REF_MODEL)
    assert eos in build_calibration(CalibrationRecipe(recipe.sources, 1, calib.provenance["n_text_tokens"] - 1,
                                                      chat_template=True), tok_dir).input_ids
