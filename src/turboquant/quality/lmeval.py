"""lm-eval harness tasks against any artifact: an ``lm_eval`` model backed by our scorers.

``ScorerLM`` answers lm-eval's three request types from next-token logits alone, so the same task runs against
a torch model, a transformers-loaded GPTQ/AWQ/compressed-tensors checkpoint, or a llama.cpp / MLX / onnxruntime
scorer — each artifact in its own runtime. Token handling follows lm-eval's Hugging Face backend: trailing spaces
of a context move to the continuation, the continuation's tokens are those the joined text adds after the
context's, and every sequence starts with the tokenizer's BOS token (the prefix lm-eval conditions rolling
log-likelihoods on). Generation is greedy without a KV cache (slow, but the same in every runtime).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from turboquant.quality.evaluate import Scorer, _logits, model_context

#: Local example tasks shipped with TurboQuant (task YAMLs + their JSONL data).
LOCAL_TASKS = Path(__file__).with_name("lm_tasks")


def _base():
    from lm_eval.api.model import LM

    return LM


class ScorerLM(_base()):  # type: ignore[misc]
    def __init__(self, model: "torch.nn.Module | Scorer", tokenizer, max_length: int | None = None,
                 max_gen_toks: int = 64) -> None:
        super().__init__()
        self.model, self.tokenizer = model, tokenizer
        self.max_length = max_length or model_context(model) or 2048
        self.max_gen_toks = max_gen_toks
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.prefix = [] if bos is None else [bos]

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.inference_mode()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log-softmax ``[len(ids), vocab]`` for a sequence of at most ``max_length`` tokens."""
        return torch.log_softmax(_logits(self.model, torch.tensor([ids])), -1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        seq = (context + continuation)[-(self.max_length + 1):]
        n = len(continuation)
        logp = self._logprobs(seq[:-1])[-n:]
        target = torch.tensor(seq[-n:])
        total = logp.gather(1, target[:, None]).sum().item()
        return total, bool((logp.argmax(-1) == target).all())

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        out = []
        for req in requests:
            context, continuation = req.args
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            whole = self._encode(context + continuation)
            ctx_ids = self._encode(context)
            cont = whole[len(ctx_ids):] if whole[: len(ctx_ids)] == ctx_ids else self._encode(continuation)
            out.append(self._score(self.prefix + ctx_ids, cont))
        return out

    def loglikelihood_rolling(self, requests) -> list[float]:
        out = []
        for req in requests:
            tokens = self._encode(req.args[0])
            total, done = 0.0, 0
            while done < len(tokens):
                end = min(done + self.max_length, len(tokens))
                context = (self.prefix + tokens)[max(0, end - self.max_length): done + len(self.prefix)]
                total += self._score(context, tokens[done:end])[0]
                done = end
            out.append(total)
        return out

    def generate_until(self, requests) -> list[str]:
        out = []
        for req in requests:
            context, kwargs = req.args
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids = self.prefix + self._encode(context)
            new: list[int] = []
            for _ in range(int(kwargs.get("max_gen_toks", self.max_gen_toks))):
                nxt = int(self._logprobs(ids[-self.max_length:])[-1].argmax())
                if nxt == self.tokenizer.eos_token_id:
                    break
                ids.append(nxt)
                new.append(nxt)
                text = self.tokenizer.decode(new)
                if any(s in text for s in until):
                    break
            text = self.tokenizer.decode(new)
            for s in until:
                text = text.split(s)[0]
            out.append(text)
        return out


def run_tasks(model: "torch.nn.Module | Scorer", tokenizer, tasks: list[str], limit: int | None = None,
              include_path: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """``{task: {metric: value}}`` from ``lm_eval.simple_evaluate``; local task YAMLs are found in
    ``LOCAL_TASKS`` (and ``include_path``), registered tasks by name when online."""
    import tempfile

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory() as tmp:
        for yaml in LOCAL_TASKS.glob("*.yaml"):  # data paths made absolute: lm-eval resolves them from the cwd
            (Path(tmp) / yaml.name).write_text(yaml.read_text().replace("@LM_TASKS@", str(LOCAL_TASKS)))
        paths = [tmp] + ([str(include_path)] if include_path else [])
        manager = TaskManager(include_path=paths)
        res = simple_evaluate(model=ScorerLM(model, tokenizer), tasks=list(tasks), task_manager=manager,
                              limit=limit, bootstrap_iters=0, log_samples=False)
    return {task: {k.split(",")[0]: v for k, v in metrics.items() if isinstance(v, (int, float)) and "stderr" not in k}
            for task, metrics in res["results"].items()}
