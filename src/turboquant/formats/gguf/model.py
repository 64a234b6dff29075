"""What a GGUF file says about the model besides its weights: architecture metadata, tensor names, tokenizer.

Everything here is read from the checkpoint's ``config.json`` and tokenizer files and mapped with gguf-py's own
tables (``MODEL_ARCH``, ``TensorNameMap``, ``SpecialVocab``), the way llama.cpp's ``convert_hf_to_gguf.py`` does:

* A family (``FAMILIES``) names its llama.cpp architecture and the few facts the tables lack, taken from
  llama.cpp's converter: whether q/k rows are permuted (llama.cpp's ``llama``, ``granite`` and ``smollm3`` RoPE
  rotates *interleaved* pairs while Hugging Face rotates the halves of each head; the permutation moves whole
  rows, so quantized rows move intact), Gemma's ``1 + w`` norms, soft-caps, multipliers and logit scales.
  Common hyperparameters (sizes, RoPE base and rotated dimensions, norm epsilons, sliding windows per layer)
  come from the config as the converter derives them.
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
class MetaKey:
    """A config field written as a GGUF key (``gguf.Keys`` group and name: ``LLM.LOGIT_SCALE``) of type ``kind``."""

    field: str
    key: str
    kind: type = float

    def template(self) -> str:
        import gguf

        group, name = self.key.split(".")
        return getattr(getattr(gguf.Keys, group), name)


@dataclass(frozen=True)
class Family:
    """What llama.cpp's converter (``convert_hf_to_gguf.py``, the llama.cpp that llama-cpp-python 0.3.36 vendors)
    knows about one Hugging Face ``model_type`` beyond gguf-py's tables, kept as data.

    Tensor names come from gguf-py's ``TensorNameMap`` for ``arch`` and the common hyperparameters from the config
    (``add_architecture``); a family only says what the tables cannot:

    * ``permute_qk``: llama.cpp runs this architecture with interleaved ("normal") RoPE while Hugging Face rotates
      halves, so q/k rows (and biases) are permuted (``qk_row_order``).
    * ``norm_shift``: added to every ``*norm.weight`` (Gemma's ``1 + w``, Nemotron's LayerNorm1P; llama.cpp
      multiplies by ``w``).
    * ``keys``: config fields written as family keys (soft-caps, multipliers, logit scales, parallel residual).
    * ``defaults``: values the modelling class fixes instead of reading a config field (OLMo's LayerNorm epsilon).
    * ``swa``: llama.cpp applies a sliding window to this architecture (``sliding_window`` and the per-layer
      ``sliding_window_pattern``), or only to the layer count ``swa_layers`` (EXAONE 4's 32B); where it does
      not, a model that slides a window shorter than its context is exported with a recorded conversion note.
    * ``attention_scale``: llama.cpp fixes the query scale at ``1/sqrt(head_dim)`` (Gemma): a model whose
      ``query_pre_attn_scalar`` says otherwise is refused.
    * ``no_rope_step``: llama.cpp skips RoPE on every n-th layer (SmolLM3): the config's ``no_rope_layers`` must say
      the same.
    """

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False
    norm_shift: float = 0.0
    keys: tuple[MetaKey, ...] = ()
    defaults: tuple[tuple[str, Any], ...] = ()
    swa: bool = False
    swa_layers: int = 0
    attention_scale: bool = False
    no_rope_step: int = 0


_GRANITE_KEYS = (MetaKey("attention_multiplier", "Attention.SCALE"),
                 MetaKey("embedding_multiplier", "LLM.EMBEDDING_SCALE"),
                 MetaKey("residual_multiplier", "LLM.RESIDUAL_SCALE"), MetaKey("logits_scaling", "LLM.LOGIT_SCALE"))
_SOFTCAPS = (MetaKey("attn_logit_softcapping", "LLM.ATTN_LOGIT_SOFTCAPPING"),
             MetaKey("final_logit_softcapping", "LLM.FINAL_LOGIT_SOFTCAPPING"))
_LOGIT_SCALE = (MetaKey("logit_scale", "LLM.LOGIT_SCALE"),)

FAMILIES: dict[str, Family] = {
    "llama": Family("LLAMA", permute_qk=True),
    "mistral": Family("LLAMA", permute_qk=True),
    "internlm3": Family("LLAMA", permute_qk=True),
    "arcee": Family("ARCEE", permute_qk=True),
    "granite": Family("GRANITE", permute_qk=True, keys=_GRANITE_KEYS),
    "smollm3": Family("SMOLLM3", permute_qk=True, no_rope_step=4),
    "olmo": Family("OLMO", permute_qk=True, keys=(MetaKey("clip_qkv", "Attention.CLAMP_KQV"),),
                   defaults=(("layer_norm_eps", 1e-5),)),
    "qwen2": Family("QWEN2"),
    "qwen3": Family("QWEN3"),
    "gemma": Family("GEMMA", norm_shift=1.0, attention_scale=True),
    "gemma2": Family("GEMMA2", norm_shift=1.0, swa=True, attention_scale=True, keys=_SOFTCAPS),
    "gemma3_text": Family("GEMMA3", norm_shift=1.0, swa=True, attention_scale=True, keys=_SOFTCAPS[1:]),
    "phi": Family("PHI2"),
    "phi3": Family("PHI3"),
    "olmo2": Family("OLMO2", swa=True),
    "olmo3": Family("OLMO2", swa=True),
    "cohere": Family("COMMAND_R", keys=_LOGIT_SCALE),
    "cohere2": Family("COHERE2", swa=True, keys=_LOGIT_SCALE),
    "stablelm": Family("STABLELM", keys=(MetaKey("use_parallel_residual", "LLM.USE_PARALLEL_RESIDUAL", bool),)),
    "nemotron": Family("NEMOTRON", norm_shift=1.0),
    "starcoder2": Family("STARCODER2"),
    "glm4": Family("GLM4"),
    "exaone4": Family("EXAONE4", swa_layers=64),
    "ernie4_5": Family("ERNIE4_5"),
    "seed_oss": Family("SEED_OSS"),
    "jais2": Family("JAIS2"),
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


def family(config: dict[str, Any]) -> Family:
    model_type = config.get("model_type")
    if model_type not in FAMILIES:
        raise GGUFModelError(f"model_type '{model_type}' has no GGUF mapping here (llama.cpp's converter knows it "
                             "or not, but its tensor layout and metadata are not verified in llama.cpp here)",
                             f"export a {', '.join(sorted(FAMILIES))} model to GGUF, or use another format")
    return FAMILIES[model_type]


def gguf_arch(config: dict[str, Any]):
    import gguf

    return gguf.MODEL_ARCH[family(config).arch]


def arch_name(config: dict[str, Any]) -> str:
    import gguf

    return gguf.MODEL_ARCH_NAMES[gguf_arch(config)]


def head_dim(config: dict[str, Any]) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def rope_parameters(config: dict[str, Any]) -> dict[str, Any]:
    """The RoPE settings of full-attention layers: transformers 5 keeps them in ``rope_parameters`` (per layer type
    for families whose sliding layers use another base), older configs in ``rope_theta`` / ``rope_scaling``."""
    params = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    params = dict(params.get("full_attention", params))
    params.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def sliding_rope_theta(config: dict[str, Any]) -> float | None:
    """RoPE base of the sliding-window layers when it differs by layer type (Gemma 3's local base)."""
    params = config.get("rope_parameters") or {}
    local = params.get("sliding_attention") if isinstance(params, dict) else None
    if isinstance(local, dict) and local.get("rope_theta") is not None:
        return float(local["rope_theta"])
    return float(config["rope_local_base_freq"]) if config.get("rope_local_base_freq") else None


def sliding_layers(config: dict[str, Any]) -> list[bool] | None:
    """Which layers are sliding-window layers, None when none is. Written whatever the window's size: the layer
    type also picks the RoPE base (Gemma 3's local layers)."""
    if not config.get("sliding_window") or config.get("use_sliding_window") is False:
        return None
    types = config.get("layer_types")
    pattern = [t == "sliding_attention" for t in types] if types else [True] * int(config["num_hidden_layers"])
    return pattern if any(pattern) else None


def window_is_short(config: dict[str, Any]) -> bool:
    """A sliding window shorter than the context: attention differs from full attention beyond it."""
    return sliding_layers(config) is not None and \
        int(config["sliding_window"]) < int(config.get("max_position_embeddings") or 0)


def rope_dims(config: dict[str, Any]) -> int:
    """Rotated dimensions per head (``partial_rotary_factor`` of the head: Phi-3, GLM-4, StableLM)."""
    factor = float(rope_parameters(config).get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0)
    return int(head_dim(config) * factor)


def check_config(config: dict[str, Any]) -> None:
    """Refuse what the writer cannot describe exactly, or what llama.cpp would compute differently (before any
    work)."""
    fam = family(config)
    rope = rope_parameters(config)
    if rope["rope_type"] not in ROPE_TYPES:
        raise GGUFModelError(f"RoPE type '{rope['rope_type']}' is not mapped to GGUF here",
                             f"export a model with RoPE type {', '.join(ROPE_TYPES)}, or use another format")
    scalar = config.get("query_pre_attn_scalar")
    if fam.attention_scale and scalar is not None and int(scalar) != head_dim(config):
        raise GGUFModelError(f"{config['model_type']}: query_pre_attn_scalar={scalar} differs from head_dim "
                             f"{head_dim(config)}, and llama.cpp scales queries by 1/sqrt(head_dim)",
                             "use another format for this model (its GGUF would score differently in llama.cpp)")
    if fam.no_rope_step:
        expected = [int((i + 1) % fam.no_rope_step != 0) for i in range(int(config["num_hidden_layers"]))]
        if [int(v) for v in config.get("no_rope_layers") or expected] != expected:
            raise GGUFModelError(f"{config['model_type']}: no_rope_layers differs from llama.cpp's fixed pattern "
                                 f"(no RoPE on every {fam.no_rope_step}th layer)",
                                 "use another format for this model (its GGUF would score differently in llama.cpp)")


def conversion_notes(config: dict[str, Any]) -> list[str]:
    """What llama.cpp computes differently from the model, recorded in the file and the manifest."""
    fam = family(config)
    if window_is_short(config) and not (fam.swa or fam.swa_layers == int(config["num_hidden_layers"])):
        return [f"llama.cpp's {arch_name(config)} runs every layer with full attention where the model slides a "
                f"{config['sliding_window']}-token window (same output up to that many tokens)"]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Tensor names
# ---------------------------------------------------------------------------------------------------------------


class NameMap:
    """Hugging Face tensor names ↔ GGUF tensor names, through gguf-py's ``TensorNameMap``."""

    def __init__(self, config: dict[str, Any]) -> None:
        import gguf

        self.config = config
        self.family = family(config)
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

    def value_shift(self, hf_name: str) -> float:
        """What llama.cpp's form of a float tensor adds to the Hugging Face one (Gemma's ``1 + w`` norms)."""
        return self.family.norm_shift if hf_name.endswith("norm.weight") else 0.0

    def permutation(self, hf_name: str) -> tuple[int, int] | None:
        """``(n_heads, head_dim)`` when ``hf_name``'s rows must be permuted for llama.cpp's RoPE, else None."""
        if not self.family.permute_qk:
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


def first_set(config: dict[str, Any], fam: Family, *fields: str) -> Any:
    """The first of ``fields`` the config sets (else the family's fixed value), as the converter's
    ``find_hparam`` looks them up."""
    fixed = dict(fam.defaults)
    return next((config[f] for f in fields if config.get(f) is not None),
                next((fixed[f] for f in fields if f in fixed), None))


def add_architecture(writer, config: dict[str, Any]) -> None:
    """The hyperparameters llama.cpp reads, as llama.cpp's converter derives them from a config (its
    ``TextModel.set_gguf_parameters`` plus the family's ``keys``)."""
    import gguf

    fam = family(config)
    arch = arch_name(config)
    hd = head_dim(config)
    writer.add_context_length(int(config["max_position_embeddings"]))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    if (rms := first_set(config, fam, "rms_norm_eps", "norm_eps")) is not None:
        writer.add_layer_norm_rms_eps(float(rms))
    if (eps := first_set(config, fam, "layer_norm_eps", "layer_norm_epsilon", "norm_epsilon", "norm_eps")) is not None:
        writer.add_layer_norm_eps(float(eps))
    writer.add_vocab_size(int(config["vocab_size"]))
    rope = rope_parameters(config)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_rope_dimension_count(rope_dims(config))
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if (local := sliding_rope_theta(config)) is not None:
        writer.add_rope_freq_base_swa(local)
    if (pattern := sliding_layers(config)) is not None:
        writer.add_sliding_window(int(config["sliding_window"]))
        writer.add_sliding_window_pattern(pattern)
    if rope.get("original_max_position_embeddings"):
        writer.add_rope_scaling_orig_ctx_len(int(rope["original_max_position_embeddings"]))
    for key in fam.keys:
        if config.get(key.field) is not None:
            value = key.kind(config[key.field])
            (writer.add_bool if key.kind is bool else writer.add_float32)(key.template().format(arch=arch), value)


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


#: llama.cpp sets token attributes by ``general.name`` (``llama_vocab::load``) and aborts loading when a name
#: matches and one of the tokens is missing.
NAME_TOKEN_RULES: dict[tuple[str, ...], tuple[str, ...]] = {
    ("phi-3", "phi3"): ("</s>", "<unk>", "<s>", "<|endoftext|>"),
}


def check_name_rules(name: str, model_dir: Path) -> None:
    """Refuse a model name that makes llama.cpp look up tokens this tokenizer does not have."""
    tok = read_tokenizer_json(model_dir)
    present = set(tok["model"]["vocab"]) | {a["content"] for a in tok.get("added_tokens", [])}
    for patterns, tokens in NAME_TOKEN_RULES.items():
        missing = [t for t in tokens if t not in present]
        if any(p in name.lower() for p in patterns) and missing:
            raise GGUFModelError(f"llama.cpp treats a model named '{name}' as Phi-3 and needs its token "
                                 f"{missing[0]}, which this tokenizer lacks (the file would not load)",
                                 "export from a directory (or repo) whose name does not contain "
                                 + " / ".join(patterns))


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
