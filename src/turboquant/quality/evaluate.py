"""Perplexity, and KL divergence / top-1 agreement against a baseline model.

Perplexity follows the way WikiText-2 numbers are reported (and Hugging Face's perplexity guide): the text file is
tokenized whole, cut into full windows of ``ctx`` tokens starting every ``stride`` tokens (non-overlapping when
``stride == ctx``; a trailing partial window is dropped), and each token is scored once, by the first window whose
new part contains it. Within a window
the loss is exactly transformers' shifted cross-entropy, so ``exp(mean NLL)`` equals what ``model(labels=...)``
reports on the same windows.

KL divergence is the mean over scored tokens of ``KL(P_baseline || P_quantized)`` of the next-token distributions,
as llama.cpp's ``--kl-divergence`` reports it; top-1 agreement is how often both models' argmax tokens agree.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch
from tqdm.auto import tqdm

from turboquant.device import resolve_device
from turboquant.errors import DataError
from turboquant.io.loaders import load_model, load_tokenizer, read_text, tokenize


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go into the model; the last ``n_scored`` of them (minus the first) are scored."""

    begin: int
    end: int
    n_new: int


def windows(n_tokens: int, ctx: int, stride: int | None = None) -> list[Window]:
    """Evaluation windows over a token stream: full ``ctx``-token windows every ``stride`` tokens.

    A trailing partial window is dropped, as GPTQ's and llama.cpp's perplexity tools do (a text shorter than one
    window is scored as a single window); with ``stride < ctx`` each window scores only its new tokens.
    """
    stride = stride or ctx
    if ctx < 2:
        raise DataError(f"context length {ctx} is too short", "pass --ctx of at least 2 tokens")
    if not 0 < stride <= ctx:
        raise DataError(f"stride {stride} must be in 1..ctx ({ctx})", "pass --stride between 1 and --ctx")
    if n_tokens < 2:
        return []
    if n_tokens < ctx:
        return [Window(0, n_tokens, n_tokens)]
    out: list[Window] = []
    prev_end = 0
    for begin in range(0, n_tokens - ctx + 1, stride):
        end = begin + ctx
        out.append(Window(begin, end, end - prev_end))
        prev_end = end
    return out


@dataclass
class EvalResult:
    """What one evaluation measured; ``baseline_*``, ``kl`` and ``top1`` only when a baseline was given."""

    ppl: float
    nll: float
    n_scored: int
    n_windows: int
    ctx: int
    stride: int
    text: str
    baseline_ppl: float | None = None
    ppl_delta_pct: float | None = None
    kl: float | None = None
    kl_p99: float | None = None
    top1: float | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


def model_context(model: "torch.nn.Module | Scorer") -> int | None:
    if isinstance(model, torch.nn.Module):
        return getattr(model.config, "max_position_embeddings", None)
    return model.context


class Scorer(Protocol):
    """Anything that gives next-token logits for a token window: a runtime other than torch (llama.cpp, MLX,
    onnxruntime) implements this to be evaluated exactly like a torch model."""

    context: int | None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[T, vocab]`` (float32) for token ids ``[T]``."""
        ...


def _logits(model: "torch.nn.Module | Scorer", chunk: torch.Tensor) -> torch.Tensor:
    """Logits ``[T, vocab]`` on the host; a torch model is fed on the device its weights are on."""
    if isinstance(model, torch.nn.Module):
        return model(chunk.to(module_device(model))).logits[0].float().cpu()
    return model.logits(chunk[0]).float()


def module_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's first parameter (a model is placed whole), the CPU for a module without any."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _window_logits(model: "torch.nn.Module | Scorer", ids: torch.Tensor, w: Window
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities for the scored positions of window ``w`` and the tokens they predict."""
    chunk = ids[w.begin : w.end].unsqueeze(0)
    logits = _logits(model, chunk)[:-1]
    targets = chunk[0, 1:]
    keep = min(w.n_new, targets.numel())
    return torch.log_softmax(logits[-keep:], dim=-1), targets[-keep:]


@dataclass
class BaselineLogits:
    """A baseline model's next-token distributions over the evaluation windows, saved for reuse.

    Per scored token: the exact log-probability of the true next token and the argmax (so baseline perplexity and
    top-1 agreement are exact), and the whole log-distribution in float16, renormalised when read. Rounding the
    log-probabilities moves the KL only at second order (the perturbation sums to zero under P after
    renormalisation): measured within 1 % of the float32 KL (tested). A top-k truncation was not: on a small
    model the tail beyond the top 64 tokens carried ~30 % of the KL. Computed once per model, text and window
    layout, so every artifact of a run is judged against the same baseline without re-running it.
    """

    ctx: int
    stride: int
    n_tokens: int
    target_logp: torch.Tensor  # [N] float32
    argmax: torch.Tensor  # [N] int32
    logp: torch.Tensor  # [N, vocab] float16

    @classmethod
    @torch.inference_mode()
    def compute(cls, model: "torch.nn.Module | Scorer", ids: torch.Tensor, ctx: int = 512, stride: int | None = None,
                progress: bool = False) -> "BaselineLogits":
        limit = model_context(model)
        ctx = min(ctx, limit) if limit else ctx
        wins = windows(ids.numel(), ctx, stride)
        if not wins:
            raise DataError(f"the evaluation text has only {ids.numel()} tokens", "pass a longer text (at least 2 tokens)")
        target, top, full = [], [], []
        for w in tqdm(wins, desc="baseline", unit="window", disable=not progress, leave=False):
            logp, targets = _window_logits(model, ids, w)
            target.append(logp.gather(1, targets[:, None])[:, 0])
            top.append(logp.argmax(-1).to(torch.int32))
            full.append(logp.to(torch.float16))
        return cls(ctx, stride or ctx, ids.numel(), torch.cat(target), torch.cat(top), torch.cat(full))

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        meta = json.dumps({"ctx": self.ctx, "stride": self.stride, "n_tokens": self.n_tokens})
        save_file({"target_logp": self.target_logp, "argmax": self.argmax, "logp": self.logp},
                  str(path), metadata={"turboquant_baseline": meta})

    @classmethod
    def load(cls, path: str | Path) -> "BaselineLogits":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads(f.metadata()["turboquant_baseline"])
            return cls(meta["ctx"], meta["stride"], meta["n_tokens"],
                       *(f.get_tensor(n) for n in ("target_logp", "argmax", "logp")))

    def matches(self, ids: torch.Tensor, ctx: int, stride: int | None) -> bool:
        return (self.n_tokens, self.ctx, self.stride) == (ids.numel(), ctx, stride or ctx)

    def window_logp(self, sl: slice) -> torch.Tensor:
        return torch.log_softmax(self.logp[sl].float(), dim=-1)


@dataclass
class _Tally:
    nll: float = 0.0
    base_nll: float = 0.0
    n: int = 0
    agree: int = 0
    kls: list[torch.Tensor] = field(default_factory=list)


@torch.inference_mode()
def evaluate_many(
    models: "dict[str, torch.nn.Module | Scorer]",
    ids: torch.Tensor,
    ctx: int = 512,
    stride: int | None = None,
    baseline: "torch.nn.Module | Scorer | BaselineLogits | None" = None,
    text_name: str = "",
    progress: bool = False,
) -> dict[str, EvalResult]:
    """``evaluate`` for several models over the same windows, running the baseline once per window (or reading
    its saved ``BaselineLogits``, whose window layout must match)."""
    cached = baseline if isinstance(baseline, BaselineLogits) else None
    live = None if cached is not None else baseline
    limits = [model_context(m) for m in models.values()] + [model_context(live) if live is not None else None]
    ctx = min([ctx] + [limit for limit in limits if limit])
    wins = windows(ids.numel(), ctx, stride)
    if not wins:
        raise DataError(f"the evaluation text has only {ids.numel()} tokens", "pass a longer text (at least 2 tokens)")
    if cached is not None and not cached.matches(ids, ctx, stride):
        raise DataError(f"the saved baseline covers other windows ({cached.n_tokens} tokens, ctx {cached.ctx})",
                        "recompute the baseline for this text and --ctx")
    tallies = {name: _Tally() for name in models}
    offset = 0
    for w in tqdm(wins, desc="eval", unit="window", disable=not progress, leave=False):
        base_logp = _window_logits(live, ids, w)[0] if live is not None else None
        for name, model in models.items():
            t = tallies[name]
            logp, targets = _window_logits(model, ids, w)
            n = targets.numel()
            t.nll -= logp.gather(1, targets[:, None]).sum().item()
            t.n += n
            if base_logp is not None:
                t.base_nll -= base_logp.gather(1, targets[:, None]).sum().item()
                t.kls.append((base_logp.exp() * (base_logp - logp)).sum(-1))
                t.agree += (base_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            elif cached is not None:
                sl = slice(offset, offset + n)
                b = cached.window_logp(sl)
                t.base_nll -= cached.target_logp[sl].sum().item()
                t.kls.append((b.exp() * (b - logp)).sum(-1))
                t.agree += (cached.argmax[sl].long() == logp.argmax(-1)).sum().item()
        offset += min(w.n_new, w.end - w.begin - 1)  # the tokens _window_logits scores
    return {name: _result(t, len(wins), ctx, stride, text_name, baseline is not None) for name, t in tallies.items()}


def _result(t: _Tally, n_windows: int, ctx: int, stride: int | None, text_name: str, with_baseline: bool
            ) -> EvalResult:
    mean_nll = t.nll / t.n
    result = EvalResult(ppl=math.exp(mean_nll), nll=mean_nll, n_scored=t.n, n_windows=n_windows, ctx=ctx,
                        stride=stride or ctx, text=text_name)
    if with_baseline:
        kl = torch.cat(t.kls).clamp_min(0)
        result.baseline_ppl = math.exp(t.base_nll / t.n)
        result.ppl_delta_pct = 100.0 * (result.ppl / result.baseline_ppl - 1.0)
        result.kl = kl.mean().item()
        result.kl_p99 = torch.quantile(kl, 0.99).item() if kl.numel() > 1 else kl.item()
        result.top1 = t.agree / t.n
    return result


def evaluate(
    model: torch.nn.Module,
    ids: torch.Tensor,
    ctx: int = 512,
    stride: int | None = None,
    baseline: torch.nn.Module | None = None,
    text_name: str = "",
    progress: bool = False,
) -> EvalResult:
    """Perplexity of ``model`` on token stream ``ids``; KL and top-1 against ``baseline`` when given."""
    return evaluate_many({"model": model}, ids, ctx, stride, baseline, text_name, progress)["model"]


def evaluate_paths(
    model: str | Path,
    text: str | Path,
    ctx: int = 512,
    stride: int | None = None,
    baseline: str | Path | None = None,
    max_tokens: int | None = None,
    progress: bool = False,
    device: str | torch.device | None = None,
) -> EvalResult:
    """``evaluate`` from paths: the tokenizer is the one stored with the (quantized) model; both models run on
    ``device`` (``device.resolve_device``)."""
    tokenizer = load_tokenizer(model)
    ids = tokenize(tokenizer, read_text(text))
    if max_tokens:
        ids = ids[:max_tokens]
    dev = resolve_device(device)
    m = load_model(model).to(dev)
    base = load_model(baseline).to(dev) if baseline is not None else None
    if base is not None and base.config.vocab_size != m.config.vocab_size:
        raise DataError(
            f"baseline vocabulary ({base.config.vocab_size}) differs from the model's ({m.config.vocab_size})",
            "compare a quantized model only against the model it was made from",
        )
    return evaluate(m, ids, ctx=ctx, stride=stride, baseline=base, text_name=str(text), progress=progress)


def write_json(result: EvalResult, path: str | Path) -> None:
    Path(path).write_text(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
