"""The plan: which models, calibration, methods × schemes and formats one run produces, validated up front.

``params.yaml`` (the one file both the Prefect flow and ``dvc.yaml`` read) is parsed into a ``Plan`` before any
work. Every key is checked (unknown keys fail listing the valid ones), every method config is built (so a bad bit
width or option fails here), and every (model, quantization, format) combination is run through the format's own
``check`` against a *planned* checkpoint — the shapes of the model's linears and the schemes the method will
produce — so that "AWQ format from 3-bit codes" or "GGUF Q4_0 from group 128" fails before a model is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from turboquant.errors import ConfigError, TurboQuantError
from turboquant.methods import MethodConfig, make_config
from turboquant.methods.base import WeightQuantConfig

TOP_KEYS = {"models", "calibration", "evaluation", "quantize", "gates", "publish"}
MODEL_KEYS = {"id", "revision"}
CALIB_KEYS = {"data", "n_samples", "seqlen", "seed"}
EVAL_KEYS = {"text", "ctx", "max_tokens", "tasks", "task_limit"}
QUANT_KEYS = {"name", "method", "options", "formats"}
PUBLISH_KEYS = {"enabled", "namespace", "private", "naming", "token_secret"}


def _keys(section: str, data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"params '{section}' must be a mapping, not {type(data).__name__}",
                          f"write {section} as key: value pairs ({', '.join(sorted(allowed))})")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ConfigError(f"params '{section}' has unknown key(s) {', '.join(unknown)}",
                          f"use only: {', '.join(sorted(allowed))}")
    return data


#: The type each plan value must have (``None`` allowed where listed), and a sample for the fix.
_TYPES: dict[str, dict[str, tuple[tuple[type, ...], str]]] = {
    "calibration": {"data": ((list,), "[calib.txt]"), "n_samples": ((int,), "128"), "seqlen": ((int,), "2048"),
                    "seed": ((int,), "0")},
    "evaluation": {"text": ((str,), "heldout.txt"), "ctx": ((int,), "512"), "max_tokens": ((int, type(None)), "16384"),
                   "tasks": ((list, type(None)), "[tq_wiki_ppl]"), "task_limit": ((int, type(None)), "100")},
    "publish": {"enabled": ((bool,), "true"), "namespace": ((str, type(None)), "my-org"), "private": ((bool,), "false"),
                "naming": ((dict, type(None)), "{gguf: '{model}-GGUF'}"), "token_secret": ((str, type(None)), "hf-token")},
}
_POSITIVE = {"n_samples", "seqlen", "ctx", "max_tokens", "task_limit"}


def _typed(section: str, data: dict[str, Any]) -> dict[str, Any]:
    """Refuse values of the wrong type (``n_samples: many``) before any work, naming the key and an example."""
    for key, value in data.items():
        types, example = _TYPES[section][key]
        bad = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
        if not bad and key in _POSITIVE and isinstance(value, int) and value < 1:
            bad = True
        if bad:
            raise ConfigError(f"params '{section}.{key}' is {value!r} ({type(value).__name__})",
                              f"write it as {' or '.join(t.__name__ for t in types if t is not type(None))}"
                              f"{' >= 1' if key in _POSITIVE else ''}, e.g. {key}: {example}")
    if section == "calibration" and any(not isinstance(d, str) for d in data.get("data") or []):
        raise ConfigError("params 'calibration.data' lists a non-text entry", "list file paths or Hub dataset ids")
    return data


def read_yaml(path: str | Path, what: str, missing_fix: str) -> Any:
    """The parsed YAML at ``path``; a missing file or a syntax error is a one-line ``ConfigError``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} does not exist", missing_fix)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]})", "fix the YAML syntax") from None


@dataclass(frozen=True)
class FormatTarget:
    format: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        extra = "-".join(str(v) for k, v in sorted(self.options.items()) if k == "gguf_type")
        return f"{self.format}-{extra}" if extra else self.format


@dataclass(frozen=True)
class Quantization:
    name: str
    config: MethodConfig
    formats: tuple[FormatTarget, ...]


@dataclass(frozen=True)
class Plan:
    models: tuple[dict[str, Any], ...]
    calibration: dict[str, Any]
    evaluation: dict[str, Any]
    quantize: tuple[Quantization, ...]
    gates: dict[str, Any]
    publish: dict[str, Any]

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_yaml(path, "plan file", "pass the path of a params.yaml") or {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        data = _keys("params", data, TOP_KEYS)
        models = data.get("models") or []
        if not isinstance(models, list) or not models:
            raise ConfigError("params 'models' is empty", "list at least one model (id: repo or path)")
        models = tuple(_keys("models[]", m if isinstance(m, dict) else {"id": m}, MODEL_KEYS) for m in models)
        for m in models:
            if not isinstance(m.get("id"), str) or not m["id"]:
                raise ConfigError("a model entry has no id", "give each model an id (Hub repo id or local path)")
        calibration = _typed("calibration", _keys("calibration", data.get("calibration") or {}, CALIB_KEYS))
        evaluation = _typed("evaluation", _keys("evaluation", data.get("evaluation") or {}, EVAL_KEYS))
        publish = _typed("publish", _keys("publish", data.get("publish") or {}, PUBLISH_KEYS))
        if publish.get("enabled") and not isinstance(publish.get("namespace"), str):
            raise ConfigError("publish is enabled but publish.namespace is not set",
                              "set publish.namespace to your Hub user or organisation (or enabled: false)")
        quants = data.get("quantize") or []
        if not isinstance(quants, list) or not quants:
            raise ConfigError("params 'quantize' is empty", "list at least one method with its scheme and formats")
        parsed = tuple(_quantization(q) for q in quants)
        names = [q.name for q in parsed]
        if len(set(names)) != len(names):
            raise ConfigError(f"quantization names repeat ({', '.join(sorted(set(n for n in names if names.count(n) > 1)))})",
                              "give every quantize entry a unique name")
        from turboquant.methods import get_method

        if any(get_method(q.config.method).needs_calibration for q in parsed) and not calibration.get("data"):
            raise ConfigError("a calibrated method (gptq / awq / mixed) is planned but calibration.data is empty",
                              "list calibration files under calibration.data")
        gates = data.get("gates") or {}
        from turboquant.gates import Gates

        Gates.from_dict(gates)  # validated now; defaults by bit width are applied per artifact
        return cls(models, calibration, evaluation, parsed, dict(gates), publish)

    def require_formats(self, model_dir: Path, model: str) -> None:
        """Raise for the first (quantization, format) ``model_dir``'s shapes make impossible, naming both."""
        for name, label, err in self.check_formats(model_dir):
            if err is not None:
                raise ConfigError(f"{model} {name} -> {label}: {err.problem}", err.fix)

    def check_formats(self, model_dir: Path) -> list[tuple[str, str, TurboQuantError | None]]:
        """``(quantization, format label, error or None)`` for every combination on ``model_dir``'s shapes."""
        from turboquant.formats.base import get_format, resolve_options

        out = []
        for q in self.quantize:
            planned = PlannedCheckpoint.build(model_dir, q.config)
            for target in q.formats:
                try:
                    spec = get_format(target.format)
                    spec.check(planned, resolve_options(spec, target.options))
                    out.append((q.name, target.label, None))
                except TurboQuantError as e:
                    out.append((q.name, target.label, e))
        return out


def _quantization(q: Any) -> Quantization:
    q = _keys("quantize[]", q, QUANT_KEYS)
    if not isinstance(q.get("method"), str):
        raise ConfigError("a quantize entry has no method", "set method: rtn | gptq | awq | hqq | fp16 | bf16")
    options = q.get("options") or {}
    config = make_config(q["method"], **_keys(f"quantize[{q['method']}].options", options, set(options)))
    name = q.get("name") or _default_name(config)
    formats = []
    for f in q.get("formats") or []:
        f = {"format": f} if isinstance(f, str) else _keys(f"quantize[{name}].formats[]", f, set(f))
        if "format" not in f:
            raise ConfigError(f"a format entry of {name} has no 'format'", "write e.g. - format: gguf")
        formats.append(FormatTarget(f["format"], {k: v for k, v in f.items() if k != "format"}))
    if not formats:
        raise ConfigError(f"quantization {name} lists no formats", "add formats: [gptq, gguf, ...]")
    return Quantization(name, config, tuple(formats))


def _default_name(config: MethodConfig) -> str:
    if isinstance(config, WeightQuantConfig):
        s = config.scheme
        group = {0: "tensor", -1: "channel"}.get(s.group_size, f"g{s.group_size}")
        return f"{config.method}-w{s.bits}-{group}{'' if s.symmetric else '-asym'}"
    return config.method


@dataclass
class PlannedCheckpoint:
    """What a quantized checkpoint *will* look like (shapes, schemes) — enough for the formats' checks.

    Mirrors the reading side of ``checkpoint.QuantizedCheckpoint``; checks that need the codes themselves (e.g.
    GPTQ v1's zero points of 0) run again, for real, at export.
    """

    path: Path
    method: str
    meta: dict[str, Any]
    modules: dict[str, dict[str, Any]]
    tensors: Any
    planned: bool = True

    @classmethod
    def build(cls, model_dir: Path, config: MethodConfig) -> "PlannedCheckpoint":
        from turboquant.model import open_model

        opened = open_model(model_dir)
        modules: dict[str, dict[str, Any]] = {}
        if config.method == "mixed":
            return cls._build_mixed(opened, config)
        if isinstance(config, WeightQuantConfig):
            act_order = bool(getattr(config, "act_order", False)) and not getattr(config, "static_groups", False) \
                and config.scheme.group_size > 0
            fractional = config.method == "hqq" and not getattr(config, "integer_zero", False)
            for i in range(opened.n_layers):
                for linear in opened.arch.linears:
                    name = f"{opened.arch.block_prefix(i)}{linear}"
                    info = opened.checkpoint.tensors[f"{name}.weight"]
                    modules[name] = {"shape": list(info.shape), "dtype": _dtype(info.dtype),
                                     "scheme": config.scheme.to_dict(), "act_order": act_order,
                                     "fractional_zero": fractional}
        meta = {"method": config.method, "config": config.to_dict(), "source": opened.source.describe()}
        return cls(Path(opened.source.path), config.method, meta, modules, opened.checkpoint)

    @classmethod
    def _build_mixed(cls, opened, config) -> "PlannedCheckpoint":
        """Per-layer widths are chosen only once sensitivities are measured: every candidate width is planned on
        some layer (round-robin), so a format that cannot hold one of them fails now, not after quantizing."""
        from turboquant.tensor import QuantScheme

        act_order = bool(config.base_options.get("act_order")) and not config.base_options.get("static_groups")
        modules: dict[str, dict[str, Any]] = {}
        names = [f"{opened.arch.block_prefix(i)}{linear}" for i in range(opened.n_layers) for linear in opened.arch.linears]
        for k, name in enumerate(names):
            bits = config.plan.get(name) or config.candidate_bits[k % len(config.candidate_bits)]
            info = opened.checkpoint.tensors[f"{name}.weight"]
            modules[name] = {"shape": list(info.shape), "dtype": _dtype(info.dtype),
                             "scheme": QuantScheme(bits, config.group_size, config.symmetric).to_dict(),
                             "act_order": act_order and config.group_size > 0, "fractional_zero": False}
        meta = {"method": config.method, "config": config.to_dict(), "source": opened.source.describe()}
        return cls(Path(opened.source.path), config.method, meta, modules, opened.checkpoint)

    @property
    def config(self) -> dict[str, Any]:
        from turboquant.model import read_config

        return read_config(self.path)

    def scheme(self, module: str):
        from turboquant.tensor import QuantScheme

        return QuantScheme.from_dict(self.modules[module]["scheme"])

    def plain_names(self) -> list[str]:
        weights = {f"{m}.weight" for m in self.modules}
        return [n for n in self.tensors.names() if n not in weights]


def _dtype(safetensors_dtype: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(safetensors_dtype, "float32")
