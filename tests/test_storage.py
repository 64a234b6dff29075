"""Storage named by URL: directories and files travel with a sha256 index, arrive whole or not at all."""

from __future__ import annotations

import pytest

from turboquant.errors import ConfigError, DataError
from turboquant.io.storage import get_dir, get_file, put_dir, put_file, storage_url


@pytest.fixture
def checkpoint(tmp_path):
    d = tmp_path / "ckpt"
    (d / "sub").mkdir(parents=True)
    (d / "a.safetensors").write_bytes(b"\x00\x01" * 1000)
    (d / "sub" / "turboquant.json").write_text('{"method": "rtn"}')
    return d


@pytest.mark.parametrize("scheme", ["file", "memory"])
def test_a_directory_round_trips_byte_for_byte(checkpoint, tmp_path, scheme):
    url = (tmp_path / "store").as_uri() if scheme == "file" else f"memory://tq-{tmp_path.name}"
    sent = put_dir(checkpoint, url, "model/release/quantized/rtn")
    assert sent["url"] == f"{url}/model/release/quantized/rtn" and set(sent["files"]) == {"a.safetensors",
                                                                                         "sub/turboquant.json"}
    files = get_dir(sent["url"], tmp_path / "arrived")
    assert files == sent["files"]
    for rel in files:
        assert (tmp_path / "arrived" / rel).read_bytes() == (checkpoint / rel).read_bytes()


def test_changed_bytes_are_refused_naming_the_file_and_nothing_is_left(checkpoint, tmp_path):
    url = (tmp_path / "store").as_uri()
    sent = put_dir(checkpoint, url, "k")
    (tmp_path / "store" / "k" / "sub" / "turboquant.json").write_text('{"method": "gptq"}')
    with pytest.raises(DataError, match=r"k/sub/turboquant.json arrived with sha256 .* not the uploaded"):
        get_dir(sent["url"], tmp_path / "arrived")
    assert not (tmp_path / "arrived").exists() and not list(tmp_path.glob(".tmp-*"))


def test_an_incomplete_upload_is_not_read(checkpoint, tmp_path):
    url = (tmp_path / "store").as_uri()
    put_dir(checkpoint, url, "k")
    (tmp_path / "store" / "k" / ".turboquant-files.json").unlink()  # as if the uploader died before its index
    with pytest.raises(DataError, match="holds no complete upload"):
        get_dir(f"{url}/k", tmp_path / "arrived")


def test_one_file_and_the_url_forms(checkpoint, tmp_path, monkeypatch):
    url = put_file(checkpoint / "a.safetensors", str((tmp_path / "store").as_uri()), "calibration")
    assert get_file(url, tmp_path / "got").read_bytes() == (checkpoint / "a.safetensors").read_bytes()
    monkeypatch.setenv("TURBOQUANT_STORAGE", str(tmp_path / "plain"))
    assert storage_url() == (tmp_path / "plain").as_uri()  # a path is stored as file://, never read as a key
    monkeypatch.delenv("TURBOQUANT_STORAGE")
    assert storage_url() is None
    with pytest.raises(ConfigError, match="storage URL 'nosuch://x' cannot be opened"):
        storage_url("nosuch://x")
