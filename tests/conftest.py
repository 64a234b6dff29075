"""Shared fixtures: tiny models built on the fly, and the read-only reference data under ../shared."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from prefect_server import EPHEMERAL_STARTUP_S, PrefectServer
from turboquant.io.tiny import save_tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared"
REF_MODEL = SHARED / "models" / "tq-ref-llama"
HELDOUT = SHARED / "data" / "heldout" / "all.txt"
WIKITEXT = SHARED / "data" / "wikitext-2-raw" / "wiki.test.raw"
CALIB = SHARED / "data" / "calib"

# Prefect's embedded server gets 20 s to start by default, which a busy 2-core machine misses; in-process flows and
# Secret blocks of the tests use it (subprocesses get the same through prefect_server.prefect_env).
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_S)


def pytest_configure(config):
    missing = [p for p in (REF_MODEL / "config.json", HELDOUT) if not p.exists()]
    if missing:
        raise pytest.UsageError(f"reference data missing: {missing[0]} (tests expect ../shared beside the repo)")


@pytest.fixture
def one_thread():
    """Tiny problems: one intra-op thread is faster, and immune to OpenMP stalls on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory) -> str:
    """One real Prefect server (``prefect server start``) for the whole session, for tests whose runs need blocks
    (the nightly's Secret): its subprocesses talk to it instead of each starting an embedded server under load."""
    server = PrefectServer(tmp_path_factory.mktemp("prefect-session"))
    try:
        yield server.api_url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ref_model() -> Path:
    return REF_MODEL


@pytest.fixture(scope="session")
def heldout_text() -> Path:
    return HELDOUT


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2-layer random Llama (hidden 64) with the reference model's tokenizer."""
    return save_tiny_model(
        tmp_path_factory.mktemp("tiny") / "tiny-llama",
        hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2, vocab=4096, tokenizer_from=REF_MODEL,
    )


@pytest.fixture
def tiny_model_copy(tiny_model, tmp_path) -> Path:
    """A private, writable copy of the tiny model (for tests that corrupt it)."""
    import shutil

    dst = tmp_path / "model"
    shutil.copytree(tiny_model, dst)
    return dst


def splice(base: Path, other: Path, out: Path, layer: int) -> Path:
    """A mixed-precision checkpoint: ``base`` with decoder block ``layer`` (shard and metadata) taken from ``other``."""
    import json
    import shutil

    from turboquant.io.checkpoint import METADATA_FILE

    shutil.copytree(base, out)
    shard = sorted(p.name for p in other.glob("model-*.safetensors"))[layer]
    shutil.copyfile(other / shard, out / shard)
    meta, other_meta = (json.loads((d / METADATA_FILE).read_text()) for d in (out, other))
    prefix = f"model.layers.{layer}."
    meta["modules"].update({m: info for m, info in other_meta["modules"].items() if m.startswith(prefix)})
    (out / METADATA_FILE).write_text(json.dumps(meta))
    return out


@pytest.fixture(scope="session")
def refused(tmp_path_factory):
    """Checkpoints grouped formats (MLX, ONNX) cannot hold: per-channel over 96 / 192 inputs, GPTQ act-order."""
    from turboquant.io.calibration import CalibrationRecipe, build_calibration
    from turboquant.methods import make_config
    from turboquant.quantize.pipeline import quantize

    root = tmp_path_factory.mktemp("refused")
    wide = save_tiny_model(root / "wide", hidden=96, intermediate=192, layers=1, heads=4, kv_heads=2, vocab=512)
    chan = quantize(wide, make_config("rtn", bits=4, group_size=-1), root / "chan", progress=False)
    calib = build_calibration(CalibrationRecipe(sources=(str(CALIB / "tiny.txt"),), n_samples=2, seqlen=32), wide)
    act = quantize(wide, make_config("gptq", bits=4, group_size=32, act_order=True, static_groups=False), root / "act", calib=calib,
                   progress=False)
    return {"chan96": chan, "act_order": act}


#: The write token the local Hub test server accepts (distinctive, so tests can grep outputs for it).
HUB_TOKEN = "hf_tqTestToken0123456789abcdefXYZ"


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    """A local Hub-compatible server on 127.0.0.1 (tests/hub_server.py). HF_ENDPOINT and HF_TOKEN point at it,
    HF_HOME is a private temporary directory (no user cache or login is read or written), Xet is off, and
    turboquant's Hub retries use tiny delays."""
    from hub_server import HubServer, configure_client

    import turboquant.io.hub as hub

    server = HubServer(token=HUB_TOKEN).start()
    configure_client(monkeypatch, server, tmp_path / "hf-home", HUB_TOKEN)
    monkeypatch.setattr(hub, "DEFAULT_RETRY", hub.RetryPolicy(attempts=4, base_delay=0.01, max_delay=0.05))
    yield server
    server.stop()
