"""What a GGUF file says about the model besides its weights: architecture metadata, tensor names, tokenizer.

Everything here is read from the checkpoint's ``config.json`` and tokenizer files and mapped with gguf-py's own
tables (``MODEL_ARCH``, ``TensorNameMap``, ``SpecialVocab``), the way llama.cpp's ``convert_hf_to_gguf.py`` does:

* llama / mistral map to llama.cpp's ``llama`` architecture, whose RoPE rotates *interleaved* pairs, while
  Hugging Face rotates the two halves of each head: q/k rows are permuted (``permute_qk``) on the way in and
  back on the way out. The permutation moves whole rows, so quantized rows (codes, scales, zeros) move intact.
* qwen2 (q/k/v biases) and qwen3 (q/k RMS norms) map to ``qwen2`` / ``qwen3``, which use NeoX RoPE (halves, as
  Hugging Face): no permutation.
* Byte-level BPE tokenizers (``tokenizer.json``) become ``tokenizer.ggml.model = gpt2`` with the pre-tokenizer
  llama.cpp must apply to split text the way Hugging Face does. The pre-tokenizer is recognised from the
  ``tokenizer.json`` structure (``PRE_TOKENIZERS``); an unknown one is refused rather than guessed.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from turboquant.errors import ConfigError


class GGUFModelError(ConfigError):
    """A model (architecture, RoPE variant, tokenizer) the GGUF exporter cannot describe to llama.cpp."""


@dataclass(frozen=True)
class ArchEntry:
    """How a Hugging Face ``model_type`` maps to llama.cpp: gguf-py's architecture and whether q/k are permuted."""

    gguf_arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool


ARCHS: dict[str, ArchEntry] = {
    "llama": ArchEntry("LLAMA", permute_qk=True),
    "mistral": ArchEntry("LLAMA", permute_qk=True),
    "qwen2": ArchEntry("QWEN2", permute_qk=False),
    "qwen3": ArchEntry("QWEN3", permute_qk=False),
}

#: RoPE variants (``rope_parameters.rope_type``) written as llama.cpp reads them.
ROPE_TYPES = ("default", "linear", "llama3")

# Byte-level BPE pre-tokenizer regexes as Hugging Face tokenizer.json files spell them, and the
# ``tokenizer.ggml.pre`` name under which llama.cpp applies the same split.
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS: dict[str, str] = {
    "bytelevel-gpt2": "gpt-2",  # ByteLevel(use_regex=True, add_prefix_space=False): GPT-2's own split
    _LLAMA3_REGEX: "llama-bpe",
    _QWEN2_REGEX: "qwen2",
}


def arch_entry(config: dict[str, Any]) -> ArchEntry:
    model_type = config.get("model_type")
    if model_type not in ARCHS:
        raise GGUFModelError(f"model_type '{model_type}' has no GGUF mapping here",
                             f"export a {', '.join(sorted(ARCHS))} model, or use another format")
    return ARCHS[model_type]


def gguf_arch(config: dict[str, Any]):
    import gguf

    return gguf.MODEL_ARCH[arch_entry(config).gguf_arch]


def arch_name(config: dict[str, Any]) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf_arch(config)]


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """transformers 5 keeps RoPE settings in ``rope_parameters``; older configs in ``rope_theta`` / ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def check_config(config: dict[str, Any]) -> None:
    """Refuse what the writer cannot describe exactly (before any work)."""
    arch_entry(config)
    rope = rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise GGUFModelError(f"RoPE type '{rope['rope_type']}' is not mapped to GGUF here",
                             f"export a model with RoPE type {', '.join(ROPE_TYPES)}, or use another format")


# ---------------------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------------------


class NameMap:
    """Hugging Face tensor names ↔ GGUF tensor names, through gguf-py's ``TensorNameMap``."""

    def __init__(self, config: dict[str, Any]) -> None:
        import gguf

        self.config = config
        self.entry = arch_entry(config)
        self.map = gguf.get_tensor_name_map(gguf_arch(config), int(config["num_hidden_layers"]))

    def gguf_name(self, hf_name: str) -> str | None:
        """The GGUF name of a tensor; None for tensors llama.cpp does not store (e.g. RoPE buffers)."""
        if hf_name.endswith("rotary_emb.inv_freq"):
            return None
        name = self.map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise GGUFModelError(f"tensor {hf_name} has no GGUF name for architecture '{arch_name(self.config)}'",
                                 "export a checkpoint of a supported architecture without extra tensors")
        return name

    def permutation(self, hf_name: str) -> tuple[int, int] | None:
        """``(n_heads, head_dim)`` when ``hf_name``'s rows must be permuted for llama.cpp's RoPE, else None."""
        if not self.entry.permute_qk:
            return None
        if ".self_attn.q_proj." in hf_name:
            return int(self.config["num_attention_heads"]), head_dim(self.config)
        if ".self_attn.k_proj." in hf_name:
            heads = int(self.config.get("num_key_value_heads") or self.config["num_attention_heads"])
            return heads, head_dim(self.config)
        return None


def qk_row_order(n_heads: int, dim: int) -> np.ndarray:
    """Row ``i`` of the GGUF tensor is row ``order[i]`` of the Hugging Face one.

    Hugging Face's rotary embedding pairs dimension ``j`` with ``j + dim/2`` in each head; llama.cpp's ``llama``
    RoPE pairs ``2j`` with ``2j + 1``: GGUF row ``2j`` (``2j+1``) of a head is HF row ``j`` (``j + dim/2``).
    """
    return np.arange(n_heads * dim).reshape(n_heads, 2, dim // 2).transpose(0, 2, 1).reshape(-1)


# ---------------------------------------------------------------------------------------------------------------
# Architecture metadata
# ---------------------------------------------------------------------------------------------------------------


def add_architecture(writer, config: dict[str, Any]) -> None:
    """The hyperparameters llama.cpp reads for the llama / qwen2 / qwen3 graphs."""
    hd = head_dim(config)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    writer.add_vocab_size(int(config["vocab_size"]))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(hd)
    if rope["rope_type"] == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))


def rope_freq_factors(config: dict[str, Any]) -> np.ndarray | None:
    """Llama 3.1's per-frequency RoPE divisors (llama.cpp's ``rope_freqs.weight``), None for other RoPE types.

    Wavelengths shorter than ``original / high_freq_factor`` keep their frequency, longer than
    ``original / low_freq_factor`` are divided by ``factor``, and those between are interpolated smoothly
    (Meta's Llama 3.1 reference implementation).
    """
    rope = rope_parameters(config)
    if rope["rope_type"] != "llama3":
        return None
    dim = head_dim(config)
    inv_freq = 1.0 / (float(rope["rope_theta"]) ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    original = float(rope["original_max_position_embeddings"])
    out = np.empty_like(inv_freq)
    for i, f in enumerate(inv_freq):
        wavelen = 2 * math.pi / f
        if wavelen < original / high:
            out[i] = 1.0
        elif wavelen > original / low:
            out[i] = factor
        else:
            smooth = (original / wavelen - low) / (high - low)
            out[i] = 1.0 / ((1 - smooth) / factor + smooth)
    return out.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Vocab:
    """The tokenizer as GGUF stores it (``tokenizer.ggml.*``)."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    scores: list[float]


def read_tokenizer_json(model_dir: Path) -> dict[str, Any]:
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise GGUFModelError(f"{model_dir} has no tokenizer.json",
                             "keep the model's tokenizer.json in the checkpoint (GGUF embeds the tokenizer)")
    return json.loads(path.read_text(encoding="utf-8"))


def pre_tokenizer_name(tokenizer: dict[str, Any]) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE tokenizer.json; refuses unknown splits."""
    pre = tokenizer.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    key = None
    if len(steps) == 1 and steps[0].get("type") == "ByteLevel" and steps[0].get("use_regex", True):
        key = "bytelevel-gpt2" if not steps[0].get("add_prefix_space") else None
    elif (len(steps) == 2 and steps[0].get("type") == "Split" and steps[1].get("type") == "ByteLevel"
          and not steps[1].get("use_regex", True) and not steps[1].get("add_prefix_space")
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")):
        key = (steps[0].get("pattern") or {}).get("Regex")
    if key not in PRE_TOKENIZERS:
        raise GGUFModelError(
            f"the tokenizer's pre-tokenizer ({json.dumps(pre)[:120]}) is not one llama.cpp is known to reproduce here",
            "export a model whose byte-level BPE splits text like one of: "
            + ", ".join(sorted(set(PRE_TOKENIZERS.values()))),
        )
    return PRE_TOKENIZERS[key]


def check_tokenizer(model_dir: Path) -> None:
    tok = read_tokenizer_json(model_dir)
    model = tok.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise GGUFModelError(
            f"tokenizer model {model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''} "
            "is not byte-level BPE",
            "export a model with a byte-level BPE tokenizer.json (GPT-2 / Llama 3 / Qwen style)")
    if (tok.get("decoder") or {}).get("type") != "ByteLevel":
        raise GGUFModelError("the tokenizer's decoder is not ByteLevel", "export a byte-level BPE tokenizer")
    pre_tokenizer_name(tok)


def build_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """Tokens in id order with their llama.cpp types: special added tokens are CONTROL, other added tokens
    USER_DEFINED, ids the tokenizer does not use (up to the model's ``vocab_size``) UNUSED padding."""
    import gguf

    tok = read_tokenizer_json(model_dir)
    by_id: dict[int, tuple[str, int]] = {i: (t, gguf.TokenType.NORMAL) for t, i in tok["model"]["vocab"].items()}
    for added in tok.get("added_tokens", []):
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    top = max(by_id) + 1
    if top > n_vocab:
        raise GGUFModelError(f"the tokenizer has ids up to {top - 1}, beyond the model's vocab_size {n_vocab}",
                             "export a model whose tokenizer matches its embedding matrix")
    tokens, types = [], []
    for i in range(n_vocab):
        text, kind = by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    return Vocab("gpt2", pre_tokenizer_name(tok), tokens, types, [0.0] * n_vocab)


def add_tokenizer(writer, model_dir: Path, n_vocab: int) -> None:
    """tokens, types, scores, merges, special ids, add_bos/add_eos and chat template."""
    import gguf

    vocab = build_vocab(model_dir, n_vocab)
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_scores(vocab.scores)
    special = gguf.SpecialVocab(model_dir, load_merges=True, n_vocab=n_vocab)
    special.add_to_gguf(writer, quiet=True)
