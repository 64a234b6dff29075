"""tq-deep-llama: a deep, narrow reference model trained here, so GPTQ is benchmarked where error accumulates.

    python benchmarks/deep_ref_model.py            # train (or reuse) it; prints its directory
    python benchmarks/deep_ref_model.py --check    # print the recipe hash and whether it is cached

``../shared/models/tq-ref-llama`` has 6 blocks: quantization error has little depth to build up in, and on it our
GPTQ and the reference tools tie. Released small models are deep and narrow (SmolLM-135M: 30 blocks of width 576,
tied embeddings). This script trains a model of that shape, scaled to what a shared 2-core CPU affords in about 15
minutes: a Llama with RMSNorm, tied input/output embeddings, GQA, RoPE, 24 blocks of width 128, on the
training text of ``../shared/data/calib/`` with the tokenizer of tq-ref-llama (so its calibration tokens are
exactly those of tq-ref-llama). ``heldout/`` and WikiText-2 are never seen in training.

It is *not* committed: the checkpoint goes to ``benchmarks/work/models/tq-deep-llama-<hash>/`` (git-ignored),
named by a hash of the recipe below (and the source bytes); a benchmark that needs it calls ``ensure_model()``,
which trains it when that directory is missing. Training is seeded and runs with a fixed thread count, so the same
recipe on the same torch build gives the same weights (the run's loss curve and the sha256 of the weights are in
``training_summary.json``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TQ_SHARED", ROOT.parent / "shared"))
TOKENIZER_FROM = SHARED / "models" / "tq-ref-llama"
TRAIN_SOURCES = tuple(SHARED / "data" / "calib" / f"{n}.txt" for n in ("wiki", "c4", "tiny", "technical"))
MODELS = ROOT / "benchmarks" / "work" / "models"

#: Everything that decides the weights. Changing any value (or a source file) trains a new model under a new name.
RECIPE = {
    "name": "tq-deep-llama",
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 24,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "vocab_size": 4096,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 1024,
    "init_std": 0.02,
    "residual_init_scaled": True,
    "seq_len": 512,
    "batch_size": 2,
    "steps": 640,
    "warmup_steps": 30,
    "lr": 2e-3,
    "min_lr_ratio": 0.1,
    "betas": (0.9, 0.95),
    "weight_decay": 0.1,
    "grad_clip": 1.0,
    "seed": 0,
    "threads": 1,
}


def recipe_hash() -> str:
    """sha256 (first 12 hex) of the recipe, the training sources' bytes and the tokenizer's bytes."""
    h = hashlib.sha256(json.dumps(RECIPE, sort_keys=True).encode())
    for f in (*TRAIN_SOURCES, TOKENIZER_FROM / "tokenizer.json"):
        h.update(f.name.encode() + b"\0" + hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:12]


def model_dir() -> Path:
    return MODELS / f"{RECIPE['name']}-{recipe_hash()}"


def ensure_model(log=print) -> Path:
    """The trained model's directory, training it first when it is not there yet (about 15 min on 2 cores)."""
    out = model_dir()
    if (out / "model.safetensors").is_file() and (out / "training_summary.json").is_file():
        return out
    log(f"training {out.name} (not cached; ~15 min on 2 cores)")
    train(out, log)
    return out


def _tokens():
    import torch

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER_FROM))
    text = "\n\n".join(f.read_text(encoding="utf-8") for f in TRAIN_SOURCES)
    return torch.tensor(tok(text)["input_ids"], dtype=torch.long)


def _config():
    from transformers import LlamaConfig

    r = RECIPE
    return LlamaConfig(
        hidden_size=r["hidden_size"], intermediate_size=r["intermediate_size"],
        num_hidden_layers=r["num_hidden_layers"], num_attention_heads=r["num_attention_heads"],
        num_key_value_heads=r["num_key_value_heads"], head_dim=r["head_dim"], vocab_size=r["vocab_size"],
        tie_word_embeddings=r["tie_word_embeddings"], rms_norm_eps=r["rms_norm_eps"],
        rope_parameters={"rope_type": "default", "rope_theta": r["rope_theta"]},
        max_position_embeddings=r["max_position_embeddings"], initializer_range=r["init_std"],
        bos_token_id=0, eos_token_id=1, hidden_act="silu", attention_bias=False, mlp_bias=False,
    )


def train(out: Path, log=print) -> None:
    import torch
    from transformers import LlamaForCausalLM

    r = RECIPE
    torch.set_num_threads(r["threads"])
    torch.manual_seed(r["seed"])
    ids = _tokens()
    model = LlamaForCausalLM(_config())
    if r["residual_init_scaled"]:  # GPT-2's init: the layers writing into the residual stream start 1/sqrt(2L)
        std = r["init_std"] / math.sqrt(2 * r["num_hidden_layers"])
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    p.normal_(0.0, std)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim == 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim == 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": r["weight_decay"]},
                             {"params": no_decay, "weight_decay": 0.0}], lr=r["lr"], betas=r["betas"])
    gen = torch.Generator().manual_seed(r["seed"])
    T, B, steps = r["seq_len"], r["batch_size"], r["steps"]

    def lr_at(step: int) -> float:
        if step < r["warmup_steps"]:
            return r["lr"] * (step + 1) / r["warmup_steps"]
        p = (step - r["warmup_steps"]) / max(1, steps - r["warmup_steps"])
        return r["lr"] * (r["min_lr_ratio"] + (1 - r["min_lr_ratio"]) * 0.5 * (1 + math.cos(math.pi * p)))

    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, ids.numel() - T, (B,), generator=gen)
        batch = torch.stack([ids[s : s + T] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(round(loss.item(), 4))
        if step % 40 == 0 or step == steps - 1:
            el = time.perf_counter() - t0
            log(f"  step {step}/{steps} loss {loss.item():.3f} lr {lr_at(step):.2e} {el:.0f} s")
    seconds = time.perf_counter() - t0

    tmp = out.with_name(out.name + ".tmp-train")
    shutil.rmtree(tmp, ignore_errors=True)
    model.eval()
    model.save_pretrained(tmp, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (TOKENIZER_FROM / name).is_file():
            shutil.copyfile(TOKENIZER_FROM / name, tmp / name)
    import transformers

    summary = {
        "recipe": RECIPE, "recipe_hash": recipe_hash(), "train_tokens_available": ids.numel(),
        "tokens_seen": steps * B * T, "seconds": round(seconds, 1), "final_loss_mean_last10": round(sum(losses[-10:]) / len(losses[-10:]), 4),
        "losses": losses, "torch": torch.__version__, "transformers": transformers.__version__,
        "params": sum(p.numel() for p in model.parameters()),
        "weights_sha256": hashlib.sha256((tmp / "model.safetensors").read_bytes()).hexdigest(),
        "sources": [str(f.relative_to(SHARED)) for f in TRAIN_SOURCES],
    }
    (tmp / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.replace(out)
    log(f"trained {out.name}: {summary['tokens_seen']} tokens in {seconds:.0f} s, "
        f"final loss {summary['final_loss_mean_last10']:.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="print the recipe hash and whether the model is cached")
    args = p.parse_args()
    if args.check:
        d = model_dir()
        print(json.dumps({"hash": recipe_hash(), "dir": str(d), "cached": (d / "model.safetensors").is_file()}))
        return
    print(ensure_model(lambda m: print(f"[{time.strftime('%H:%M:%S')}] {m}", flush=True)))


if __name__ == "__main__":
    sys.exit(main())
