"""Which files of a model directory are what: the one list of tokenizer, chat-template, generation-config and
license files that every output carries, the exact tokenizer files that identify a vocabulary, and what a run
fetches from the Hub."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CONFIG_FILE = "config.json"
#: The files that define a tokenizer, in the order ``calibration.tokenizer_hash`` reads them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json")
#: Files of the source model every artifact carries unchanged when the source has them (glob patterns).
CARRIED_FILE_PATTERNS = ("generation_config.json", "tokenizer*", "special_tokens_map.json", "added_tokens.json",
                         "vocab.*", "merges.txt", "*.tiktoken", "chat_template.*", "LICENSE*", "license*", "NOTICE*",
                         "USE_POLICY.md")
#: What travels with the canonical checkpoint: the config and the carried files.
AUX_FILE_PATTERNS = (CONFIG_FILE, *CARRIED_FILE_PATTERNS)
#: What a quantization run needs from a model repo; pickles are fetched only when explicitly allowed.
MODEL_FILE_PATTERNS = ["*.safetensors", "*.safetensors.index.json", *AUX_FILE_PATTERNS, "README.md"]
PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]


def matching_files(directory: str | Path, patterns: Iterable[str]) -> list[Path]:
    """The regular files directly in ``directory`` that match any of ``patterns``, sorted by name."""
    found: set[Path] = set()
    for pattern in patterns:
        found.update(p for p in Path(directory).glob(pattern) if p.is_file())
    return sorted(found)
