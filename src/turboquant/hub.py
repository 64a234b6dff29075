"""Hugging Face Hub access: pinned, minimal snapshot downloads resolved to a commit sha.

Everything goes through ``huggingface_hub``, so HF_TOKEN / stored login, HF_ENDPOINT, HF_HUB_OFFLINE and the
local cache behave as users expect.
"""

from __future__ import annotations

import re
from pathlib import Path

from turboquant.errors import ModelLoadError

#: What a quantization run needs from a model repo; pickles are fetched only when explicitly allowed.
MODEL_FILE_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "vocab.*",
    "merges.txt",
    "*.tiktoken",
    "chat_template.*",
    "LICENSE*",
    "NOTICE*",
    "README.md",
]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]

_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def check_repo_id(repo_id: str) -> None:
    """Refuse repo ids that are not ``[namespace/]name`` of safe characters (path traversal included)."""
    if not _REPO_ID.match(repo_id) or ".." in repo_id or repo_id.endswith((".", "-")) or "--" in repo_id:
        raise ModelLoadError(
            f"'{repo_id}' is neither a local model directory nor a valid Hub repo id",
            "pass an existing directory, or a repo id like 'org/model' (letters, digits, '-', '_', '.')",
        )


def fetch_snapshot(repo_id: str, revision: str | None = None, allow_pickle: bool = False) -> tuple[Path, str]:
    """Download (or reuse from cache) the files a run needs; returns ``(local_dir, commit_sha)``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub import errors as hf_errors

    check_repo_id(repo_id)
    patterns = MODEL_FILE_PATTERNS + (PICKLE_PATTERNS if allow_pickle else [])
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except hf_errors.GatedRepoError:
        raise ModelLoadError(
            f"model '{repo_id}' is gated", "accept its license on the Hub and log in (`hf auth login` or HF_TOKEN)"
        ) from None
    except hf_errors.RepositoryNotFoundError:
        raise ModelLoadError(
            f"model repo '{repo_id}' was not found (or is private)", "check the id, or log in if it is private"
        ) from None
    except hf_errors.RevisionNotFoundError:
        raise ModelLoadError(
            f"revision '{revision}' does not exist in '{repo_id}'", "pass an existing branch, tag or commit sha"
        ) from None
    except hf_errors.LocalEntryNotFoundError:
        raise ModelLoadError(
            f"model '{repo_id}' is not in the local cache and the Hub cannot be reached (offline?)",
            "connect to the network, unset HF_HUB_OFFLINE, or pass a local directory",
        ) from None
    except hf_errors.HfHubHTTPError as e:
        raise ModelLoadError(
            f"the Hub refused '{repo_id}': {str(e).splitlines()[0]}", "check HF_ENDPOINT, your token and the repo id"
        ) from None
    return path, path.name
