"""The plan: which models, calibration, methods × schemes and formats one run produces, validated up front.

``params.yaml`` (the one file both the Prefect flow and ``dvc.yaml`` read) is parsed into a ``Plan`` before any
work. Every key is checked (unknown keys fail listing the valid ones), every method config is built (so a bad bit
width or option fails here), and every (model, quantization, format) combination is run through the format's own
``check`` against a *planned* checkpoint — the shapes of the model's linears and the schemes the method will
produce — so that "AWQ format from 3-bit codes" or "GGUF Q4_0 from group 128" fails before a model is quantized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from turboquant.device import check_device_name
from turboquant.errors import check_keys, ConfigError, TurboQuantError
from turboquant.fsutil import read_yaml
from turboquant.formats.base import get_format, resolve_options
from turboquant.io.calibration import CalibrationRecipe
from turboquant.io.model import open_model, OpenedModel, read_config
from turboquant.methods import make_config, MethodConfig
from turboquant.methods.base import get_method, WeightQuantConfig
from turboquant.methods.mixed import MixedPrecisionConfig, module_config
from turboquant.quality.gates import Gates
from turboquant.quantize.pipeline import planned_config
from turboquant.tensor import QuantScheme

TOP_KEYS = {"models", "calibration", "evaluation", "quantize", "gates", "publish"}
QUANT_KEYS = {"name", "method", "options", "formats", "device"}


def _keys(section: str, data: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise ConfigError(f"params '{section}' must be a mapping, not {type(data).__name__}",
                          f"write {section} as key: value pairs ({', '.join(sorted(allowed))})")
    check_keys(data, allowed, f"params '{section}' has unknown key(s) {{unknown}}")
    return data


class Section:
    """A typed plan section: its fields and their defaults are the section's schema (one place for both).

    ``TYPES`` holds, per field, the types a value may have (``None`` where listed) and an example for the fix;
    ``POSITIVE`` the integer fields that must be >= 1.
    """

    NAME: ClassVar[str] = ""
    TYPES: ClassVar[dict[str, tuple[tuple[type, ...], str]]] = {}
    POSITIVE: ClassVar[frozenset[str]] = frozenset()

    @classmethod
    def keys(cls) -> set[str]:
        return {f.name for f in fields(cls)}

    @classmethod
    def from_dict(cls, data: Any) -> Any:
        """The section from its params.yaml mapping: unknown keys and wrongly typed values fail naming the key."""
        data = _keys(cls.NAME, data if data is not None else {}, cls.keys())
        for key, value in data.items():
            types, example = cls.TYPES[key]
            bad = not isinstance(value, types) or (isinstance(value, bool) and bool not in types)
            if not bad and key in cls.POSITIVE and isinstance(value, int) and value < 1:
                bad = True
            if bad:
                raise ConfigError(f"params '{cls.NAME}.{key}' is {value!r} ({type(value).__name__})",
                                  f"write it as {' or '.join(t.__name__ for t in types if t is not type(None))}"
                                  f"{' >= 1' if key in cls.POSITIVE else ''}, e.g. {key}: {example}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults included, as plain JSON values (what tasks and DVC stage slices receive)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ModelEntry(Section):
    """One model of the plan: a Hub repo id (optionally pinned to a revision) or a local directory."""

    NAME: ClassVar[str] = "models[]"
    TYPES: ClassVar[dict] = {"id": ((str,), "org/model"), "revision": ((str, type(None)), "main")}

    id: str = ""
    revision: str | None = None

    @classmethod
    def from_dict(cls, data: Any) -> "ModelEntry":
        entry = super().from_dict(data if isinstance(data, dict) else {"id": data})
        if not entry.id:
            raise ConfigError("a model entry has no id", "give each model an id (Hub repo id or local path)")
        return entry

    @property
    def local_dir(self) -> Path | None:
        """The model's directory when ``id`` names one on this machine, else None (a Hub repo)."""
        path = Path(self.id).expanduser()
        return path if path.is_dir() else None


@dataclass(frozen=True)
class CalibrationSection(Section):
    """How the calibration set is built: source files or Hub datasets, windows, window length, sampling seed."""

    NAME: ClassVar[str] = "calibration"
    TYPES: ClassVar[dict] = {"data": ((list, tuple), "[calib.txt]"), "n_samples": ((int,), "128"),
                             "seqlen": ((int,), "2048"), "seed": ((int,), "0")}
    POSITIVE: ClassVar[frozenset[str]] = frozenset({"n_samples", "seqlen"})

    data: tuple[str, ...] = ()
    n_samples: int = 128
    seqlen: int = 2048
    seed: int = 0

    def __post_init__(self) -> None:
        if any(not isinstance(d, str) for d in self.data):
            raise ConfigError("params 'calibration.data' lists a non-text entry", "list file paths or Hub dataset ids")

    def recipe(self) -> CalibrationRecipe:
        return CalibrationRecipe(tuple(self.data), n_samples=self.n_samples, seqlen=self.seqlen, seed=self.seed)


@dataclass(frozen=True)
class EvaluationSection(Section):
    """What every artifact is validated on: held-out text, window length, token budget, lm-eval tasks, speed."""

    NAME: ClassVar[str] = "evaluation"
    TYPES: ClassVar[dict] = {"text": ((str, type(None)), "heldout.txt"), "ctx": ((int,), "512"),
                             "max_tokens": ((int, type(None)), "16384"),
                             "tasks": ((list, tuple, type(None)), "[tq_wiki_ppl]"),
                             "task_limit": ((int, type(None)), "100"), "speed": ((bool,), "true")}
    POSITIVE: ClassVar[frozenset[str]] = frozenset({"ctx", "max_tokens", "task_limit"})

    text: str | None = None
    ctx: int = 512
    max_tokens: int | None = None
    tasks: tuple[str, ...] | None = ()
    task_limit: int | None = None
    #: time prompt and decode and measure peak memory per artifact, against the float model in its runtime
    speed: bool = True


@dataclass(frozen=True)
class PublishSection(Section):
    """Where approved artifacts go on the Hub, and how their repos are named."""

    NAME: ClassVar[str] = "publish"
    TYPES: ClassVar[dict] = {"enabled": ((bool,), "true"), "namespace": ((str, type(None)), "my-org"),
                             "private": ((bool,), "false"), "naming": ((dict, type(None)), "{gguf: '{model}-GGUF'}"),
                             "token_secret": ((str, type(None)), "hf-token")}

    enabled: bool = False
    namespace: str | None = None
    private: bool = False
    naming: dict[str, str] | None = None
    token_secret: str | None = None

    def __post_init__(self) -> None:
        if self.enabled and not isinstance(self.namespace, str):
            raise ConfigError("publish is enabled but publish.namespace is not set",
                              "set publish.namespace to your Hub user or organisation (or enabled: false)")


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
    """One planned quantization: its method config, the formats it is exported to, and the device it computes
    on (None: the pool's, ``$TURBOQUANT_DEVICE`` of its worker, else auto)."""

    name: str
    config: MethodConfig
    formats: tuple[FormatTarget, ...]
    device: str | None = None


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelEntry, ...]
    calibration: CalibrationSection
    evaluation: EvaluationSection
    quantize: tuple[Quantization, ...]
    gates: dict[str, Any]
    publish: PublishSection

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Plan":
        return cls.from_dict(read_yaml(path, "plan file", "pass the path of a params.yaml") or {})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        data = _keys("params", data, TOP_KEYS)
        models = data.get("models") or []
        if not isinstance(models, list) or not models:
            raise ConfigError("params 'models' is empty", "list at least one model (id: repo or path)")
        models = tuple(ModelEntry.from_dict(m) for m in models)
        calibration = CalibrationSection.from_dict(data.get("calibration"))
        evaluation = EvaluationSection.from_dict(data.get("evaluation"))
        publish = PublishSection.from_dict(data.get("publish"))
        quants = data.get("quantize") or []
        if not isinstance(quants, list) or not quants:
            raise ConfigError("params 'quantize' is empty", "list at least one method with its scheme and formats")
        parsed = tuple(_quantization(q) for q in quants)
        names = [q.name for q in parsed]
        if len(set(names)) != len(names):
            raise ConfigError(f"quantization names repeat ({', '.join(sorted(set(n for n in names if names.count(n) > 1)))})",
                              "give every quantize entry a unique name")

        if any(get_method(q.config.method).needs_calibration for q in parsed) and not calibration.data:
            raise ConfigError("a calibrated method (gptq / awq / mixed) is planned but calibration.data is empty",
                              "list calibration files under calibration.data")
        gates = data.get("gates") or {}

        Gates.from_dict(gates)  # validated now; defaults by bit width are applied per artifact
        return cls(models, calibration, evaluation, parsed, dict(gates), publish)

    def require_formats(self, model_dir: Path, model: str) -> None:
        """Raise for the first (quantization, format) ``model_dir``'s shapes make impossible, naming both."""
        for name, label, err in self.check_formats(model_dir):
            if err is not None:
                raise ConfigError(f"{model} {name} -> {label}: {err.problem}", err.fix)

    def check_formats(self, model: Path | OpenedModel) -> list[tuple[str, str, TurboQuantError | None]]:
        """``(quantization, format label, error or None)`` for every combination on the model's shapes: the
        scheme must cover every linear, then each format's own check runs on the planned checkpoint."""
        opened = model if isinstance(model, OpenedModel) else open_model(model)
        out = []
        for q in self.quantize:
            try:
                config, _ = planned_config(opened, q.config)
            except TurboQuantError as e:
                out += [(q.name, target.label, e) for target in q.formats]
                continue
            planned = PlannedCheckpoint.of(opened, config)
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
    device = q.get("device")
    if device is not None and not isinstance(device, str):
        raise ConfigError(f"quantize[{name}].device must be a device name, not {device!r}",
                          "use auto, cpu, cuda, cuda:N or mps")
    return Quantization(name, config, tuple(formats), check_device_name(device) if device else None)


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
    def of(cls, opened: OpenedModel, config: MethodConfig) -> "PlannedCheckpoint":
        """The checkpoint ``config`` (as ``quantize.pipeline.planned_config`` resolved it) will make of ``opened``
        (whose tensors may be only shapes: triage)."""
        modules: dict[str, dict[str, Any]] = {}
        if isinstance(config, MixedPrecisionConfig):
            return cls._build_mixed(opened, config)
        if isinstance(config, WeightQuantConfig):
            act_order, fractional = config.permutes_groups, config.fractional_zeros
            for name in opened.linear_inputs():
                info = opened.checkpoint.tensors[f"{name}.weight"]
                modules[name] = {"shape": list(info.shape), "dtype": _dtype(info.dtype),
                                 "scheme": module_config(config, name).scheme.to_dict(), "act_order": act_order,
                                 "fractional_zero": fractional}
        meta = {"method": config.method, "config": config.to_dict(), "source": opened.source.describe()}
        return cls(Path(opened.source.path), config.method, meta, modules, opened.checkpoint)

    @classmethod
    def _build_mixed(cls, opened, config) -> "PlannedCheckpoint":
        """Per-layer widths are chosen only once sensitivities are measured: every candidate width is planned on
        some layer (round-robin), so a format that cannot hold one of them fails now, not after quantizing."""

        act_order = config.permutes_groups
        modules: dict[str, dict[str, Any]] = {}
        names = opened.arch.linear_names()
        for k, name in enumerate(names):
            bits = config.plan.get(name) or config.candidate_bits[k % len(config.candidate_bits)]
            info = opened.checkpoint.tensors[f"{name}.weight"]
            modules[name] = {"shape": list(info.shape), "dtype": _dtype(info.dtype),
                             "scheme": QuantScheme(bits, config.group_size, config.symmetric).to_dict(),
                             "act_order": act_order, "fractional_zero": False}
        meta = {"method": config.method, "config": config.to_dict(), "source": opened.source.describe()}
        return cls(Path(opened.source.path), config.method, meta, modules, opened.checkpoint)

    @property
    def config(self) -> dict[str, Any]:
        return read_config(self.path)

    def scheme(self, module: str):
        return QuantScheme.from_dict(self.modules[module]["scheme"])

    def plain_names(self) -> list[str]:
        weights = {f"{m}.weight" for m in self.modules}
        return [n for n in self.tensors.names() if n not in weights]


def _dtype(safetensors_dtype: str) -> str:
    return {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}.get(safetensors_dtype, "float32")
