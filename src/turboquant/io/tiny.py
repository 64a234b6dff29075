"""Tiny, randomly initialised decoder checkpoints of any family built on the fly (tests, demo, benchmarks).

Nothing is downloaded: the tokenizer is copied from a local model when one is given, otherwise a small byte-level
BPE is trained on the supplied text.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from turboquant.io.files import TOKENIZER_FILES, matching_files

def tiny_config(
    model_type: str = "llama",
    hidden: int = 64,
    intermediate: int = 128,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 4096,
    max_positions: int = 1024,
    tie_embeddings: bool | None = False,
    experts: int = 0,
    top_k: int = 2,
):
    """A transformers config object for a small decoder of the given family (``tie_embeddings=None``: the
    family's own default). Gemma's queries are scaled by ``1/sqrt(head_dim)``, as in the released 2B-12B models
    (the config's default ``query_pre_attn_scalar`` is the 256 of their head size).

    ``experts``: a mixture-of-experts family gets that many routed experts (``top_k`` per token) of half the
    MLP width, shared experts where the family has them, and DeepSeek its first block dense and small MLA ranks."""
    from transformers import AutoConfig

    extra = {} if tie_embeddings is None else {"tie_word_embeddings": tie_embeddings}
    if model_type.startswith("gemma"):
        extra["query_pre_attn_scalar"] = hidden // heads
    cfg = AutoConfig.for_model(
        model_type,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        vocab_size=vocab,
        max_position_embeddings=max_positions,
        **extra,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=None,
        rms_norm_eps=1e-5,
    )
    if experts:
        _set_present(cfg, {"num_local_experts": experts, "num_experts": experts, "n_routed_experts": experts,
                           "num_experts_per_tok": top_k, "moe_intermediate_size": intermediate // 2,
                           "shared_expert_intermediate_size": intermediate // 2, "n_shared_experts": 1,
                           "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                           "q_lora_rank": hidden // 2, "kv_lora_rank": hidden // 2,
                           "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32})
        if hasattr(cfg, "qk_rope_head_dim"):  # MLA: RoPE covers the rotary part of each head only, and
            cfg.head_dim = cfg.qk_rope_head_dim  # kv_b_proj expands the latent to every head
            cfg.num_key_value_heads = cfg.num_attention_heads
    return cfg


def _set_present(cfg, values: dict) -> None:
    for key, value in values.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)


#: Heads a replica keeps (its key/value heads: as many, one, or half of them, as the release's ratio says).
REPLICA_HEADS = 2


def replica_config(config: dict):
    """The release's own config (family, flags, RoPE, layer pattern, depth) at small widths: two heads of the
    release's head size, hidden = their width, a small MLP and vocabulary. What depends only on the modelling
    class and its flags (which module feeds which linear) holds on it as on the release; built in well under a
    second. Raises what transformers raises for a config it cannot shrink (e.g. per-dimension RoPE factors)."""
    from transformers import AutoConfig

    cfg = AutoConfig.for_model(**{k: v for k, v in config.items() if k not in ("architectures", "auto_map")})
    heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
    kv = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // max(heads, 1))
    ids = [getattr(cfg, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")]
    flat = [i for v in ids for i in (v if isinstance(v, list) else [v]) if isinstance(i, int)]
    small = {
        "hidden_size": REPLICA_HEADS * head_dim,
        "intermediate_size": 2 * REPLICA_HEADS * head_dim,
        "num_attention_heads": REPLICA_HEADS,
        "num_key_value_heads": REPLICA_HEADS if kv == heads else 1,
        "vocab_size": max([256] + [i + 1 for i in flat]),
    }
    if getattr(cfg, "head_dim", None) is not None:
        small["head_dim"] = head_dim
    for key, value in small.items():
        if hasattr(cfg, key):
            setattr(cfg, key, value)
    return cfg


def save_tiny_model(
    path: str | Path,
    *,
    seed: int = 0,
    tokenizer_from: str | Path | None = None,
    train_text: str | None = None,
    dtype: torch.dtype = torch.float32,
    init_std: float | None = None,
    **config_kwargs,
) -> Path:
    """Build and save a random model (safetensors) with a tokenizer; returns its directory."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**config_kwargs)
    if init_std is not None:
        config.initializer_range = init_std
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer_from is not None:
        for src in matching_files(tokenizer_from, TOKENIZER_FILES):
            shutil.copyfile(src, path / src.name)
    else:
        train_tokenizer(train_text or FALLBACK_TEXT, config.vocab_size).save_pretrained(path)
    return path


def train_tokenizer(text: str, vocab_size: int):
    """A byte-level BPE tokenizer with ``<s>``=0, ``</s>``=1, ``<unk>``=2, trained on ``text``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.splitlines() or [text], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


#: Text a tiny model's tokenizer is trained on (and the demo calibrates on) when no other text is given.
FALLBACK_TEXT = (
    "Quantization maps the weights of a neural network to a small set of integer levels. "
    "Round-to-nearest picks the closest level for every weight on its own; GPTQ corrects the error of each "
    "column using the inverse Hessian of the layer's inputs; AWQ protects the channels that see the largest "
    "activations by scaling them before rounding. A good quantized model keeps the next-token distribution "
    "of the original model: its KL divergence from the baseline stays small and its top-1 predictions agree.\n"
) * 8
