"""GPTQ: Hessian-aware weight quantization with error feedback (Frantar et al., 2022, arXiv:2210.17323).

The columns of ``W`` ``[out, in]`` are quantized one at a time; the error each one leaves is spread over the
columns not yet quantized so that the layer output ``W X^T`` on calibration inputs moves as little as possible
(the Optimal Brain Quantization update; ``H = sum x x^T`` is that loss's Hessian up to a factor 2). As in the
paper, the inverse Hessian is used through its upper Cholesky factor ``Hinv`` (row ``i`` of it is exactly the
update column ``i`` sends to the later columns), and updates are applied lazily, ``block_size`` columns at a
time, so the bulk of the work is one matrix product per block.

This is a pure solver: the pipeline accumulates ``H`` per linear and calls ``quantize_weight``. Details follow
the reference implementations: dead inputs, relative damping, act-order (``desc_act``), static groups and
AutoGPTQ's ``g_idx`` convention. Defaults: act-order with static groups (llm-compressor's default "static"
ordering: no ``g_idx``, so every format can hold the result) and GPTAQ's asymmetric target (below), which on
deep models removes error the layers before left in the inputs (``benchmarks/gptq_depth.py``).

One deliberate difference: a group that starts mid-block takes its scale from the weights as updated by *every*
earlier column (the reference uses the block-start values there; the two agree whenever ``group_size`` is a
multiple of ``block_size``, as with the default 128 / 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from turboquant.errors import ConfigError, DataError
from turboquant.methods.base import HESSIAN, check_type, register_method, WeightQuantConfig
from turboquant.methods.rtn import RtnConfig, group_qparams
from turboquant.tensor import QuantizedTensor, group_view, quantize_codes

#: Calibration-free methods an under-calibrated expert falls back to.
EXPERT_FALLBACKS = ("rtn", "hqq")

_DAMP_TRIES = 4  # damping tried: damp_percent * 10**k for k < _DAMP_TRIES


@dataclass(frozen=True)
class GptqConfig(WeightQuantConfig):
    """GPTQ options on top of the scheme (names as in AutoGPTQ).

    ``damp_percent``: fraction of the mean Hessian diagonal added to the diagonal (numerical stability);
    ``block_size``: lazy-update width (speed only; results match up to float rounding);
    ``act_order``: quantize columns by decreasing ``diag(H)`` (salient inputs first, so their error is absorbed
    by the many columns still open); on by default;
    ``static_groups``: fit every group's scale on the original weights up front (with or without ``act_order``),
    so groups stay contiguous (no ``g_idx``) even with ``act_order``; on by default (``false`` with
    ``act_order``: groups formed in act-order, ``g_idx``, only the gptq and compressed-tensors formats hold it);
    ``true_sequential``: the pipeline re-collects inputs after each sub-layer of a block (unused by the solver);
    ``mse_clip``: search each group's clipping range (RTN's MSE search) instead of using min/max;
    ``gptaq``: asymmetric calibration (GPTAQ, Li et al., 2025, arXiv:2504.02692): fit ``Q X`` to the *float*
    model's output ``W X_float`` instead of ``W X``, so each layer also undoes the error the quantized layers
    before it left in its input ``X`` (the pipeline then carries the float model's activations beside the
    quantized ones, on every block path); on by default (it costs about one more float forward of every block and a second ``XᵀX``-sized product).

    Mixture-of-experts blocks: ``calibrate_all_experts`` runs every expert on every calibration token for its
    statistics (the block output keeps the real routing; llm-compressor's default too), so rarely routed experts
    still get a full Hessian; ``min_expert_tokens``: an expert linear whose statistics saw fewer tokens is
    quantized by ``expert_fallback`` (``rtn`` or ``hqq``, calibration-free) instead, recorded per expert.
    """

    damp_percent: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = True
    true_sequential: bool = True
    mse_clip: bool = False
    gptaq: bool = True
    calibrate_all_experts: bool = True
    min_expert_tokens: int = 16
    expert_fallback: str = "rtn"

    def __post_init__(self) -> None:
        super().__post_init__()
        check_type("damp_percent", self.damp_percent, (int, float), "use a fraction in (0, 1), e.g. 0.01")
        if not (math.isfinite(self.damp_percent) and 0 < self.damp_percent < 1):
            raise ConfigError(
                f"damp_percent={self.damp_percent!r} is out of range", "use a fraction in (0, 1), e.g. 0.01 or 0.1"
            )
        check_type("block_size", self.block_size, int, "use a positive integer number of columns, e.g. 128")
        if self.block_size < 1:
            raise ConfigError(f"block_size={self.block_size} is not positive", "use a positive integer, e.g. 128")
        for name in ("act_order", "static_groups", "true_sequential", "mse_clip", "gptaq", "calibrate_all_experts"):
            check_type(name, getattr(self, name), bool, "use true or false")
        check_type("min_expert_tokens", self.min_expert_tokens, int, "use a token count, e.g. 16")
        if self.min_expert_tokens < 0:
            raise ConfigError(f"min_expert_tokens={self.min_expert_tokens} is negative", "use a token count, e.g. 16")
        if self.expert_fallback not in EXPERT_FALLBACKS:
            raise ConfigError(f"expert_fallback={self.expert_fallback!r} is not a calibration-free method",
                              f"use one of {', '.join(EXPERT_FALLBACKS)}")
        if self.expert_fallback == "hqq" and self.symmetric:
            raise ConfigError("expert_fallback=hqq is asymmetric while this GPTQ scheme is symmetric",
                              "use expert_fallback: rtn, or symmetric: false")

    @property
    def permutes_groups(self) -> bool:
        """Act-order without static groups fits each group in column order of ``diag(H)``: codes get a ``g_idx``."""
        return self.act_order and not self.static_groups and self.group_size > 0


def _inverse_hessian_factor(H: torch.Tensor, damp_percent: float, shape: tuple[int, int], name: str) -> torch.Tensor:
    """``Hinv``: upper Cholesky factor of ``(H + damp * I)^-1``, damping x10 per retry while ``H`` is not PD.

    Computed without forming the inverse: the Cholesky factor of ``H`` with its index order reversed gives
    ``H = R R^T`` with ``R`` upper triangular, so ``H^-1 = (R^-1)^T R^-1`` and ``Hinv = R^-1`` (one
    factorization and one triangular solve: faster and more accurate than the reference's
    ``cholesky(cholesky_inverse(cholesky(H)), upper=True)``, equal up to rounding).
    """
    mean_diag = H.diagonal().mean()
    eye = torch.eye(H.shape[0], device=H.device)
    for k in range(_DAMP_TRIES):
        Hd = H.flip(0, 1)  # a copy, in reversed order
        Hd.diagonal().add_(mean_diag * (damp_percent * 10**k))
        L, info = torch.linalg.cholesky_ex(Hd)
        if info.item() == 0:
            Hinv = torch.linalg.solve_triangular(L.flip(0, 1), eye, upper=True)
            if bool(torch.isfinite(Hinv).all()):
                return Hinv
    raise ConfigError(
        f"the GPTQ Hessian of {name} {list(shape)} is not positive definite even with "
        f"damp_percent={damp_percent * 10 ** (_DAMP_TRIES - 1):g}",
        "calibrate on more (and more varied) tokens, or raise damp_percent (e.g. 0.1)",
    )


def quantize_weight_with_q(
    W: torch.Tensor, H: torch.Tensor, cfg: GptqConfig, *, name: str = "this layer", D: torch.Tensor | None = None
) -> tuple[QuantizedTensor, torch.Tensor]:
    """``quantize_weight`` that also returns the solver's float32 ``Q`` ``[out, in]`` (original column order).

    ``Q`` holds the weights the error feedback assumed; ``QuantizedTensor.dequantize(torch.float32)`` equals it
    bit for bit (both compute ``(code - zero) * scale`` in float32 with the float16-exact scale).
    """
    scheme = cfg.scheme
    scheme.check_shape(tuple(W.shape), name)
    out_f, n = W.shape
    if tuple(H.shape) != (n, n):
        raise ConfigError(f"the Hessian of {name} has shape {tuple(H.shape)}, expected ({n}, {n})",
                          "accumulate H = sum x x^T over the layer's inputs")
    dev = W.device
    W_ = W.detach().to(dev, torch.float32, copy=True)  # never touch the caller's tensors
    H = H.detach().to(dev, torch.float32, copy=True)
    if not bool(torch.isfinite(H).all()):
        raise DataError(f"the GPTQ Hessian of {name} has non-finite entries",
                        "check the calibration data and the model's activations (fp16 overflow?)")
    D = D.detach().to(dev, torch.float32) if cfg.gptaq and D is not None else None
    if D is not None and not bool(torch.isfinite(D).all()):
        raise DataError(f"the GPTAQ cross term of {name} has non-finite entries",
                        "check the calibration data and the model's activations (fp16 overflow?)")
    dead = H.diagonal() == 0  # inputs that never fired: any weight works, quantize them as exact zeros
    H.diagonal()[dead] = 1
    W_[:, dead] = 0

    gs, qmax = scheme.group_size, scheme.qmax
    rcfg = RtnConfig(bits=cfg.bits, group_size=cfg.group_size, symmetric=cfg.symmetric, mse_clip=cfg.mse_clip)
    refit = gs > 0 and not cfg.static_groups  # fit each group when the solver reaches it, on updated weights
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if cfg.act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    Hinv = _inverse_hessian_factor(H, cfg.damp_percent, (out_f, n), name)
    if D is not None:
        W_ += _asymmetric_correction(W_ @ D, Hinv, perm)
    if refit:
        S = torch.empty(n // gs, out_f, device=dev)  # scale / zero tables, one row per group
        Z = torch.empty(n // gs, out_f, device=dev)
        col_group = [j // gs for j in range(n)]
    else:  # per-tensor, per-channel and static groups: fitted up front on the original weights, as RTN would
        scale, zero = group_qparams(group_view(W_, scheme), scheme, rcfg)
        S, Z = scale.t().contiguous(), zero.t().contiguous()
        orig = perm.tolist() if perm is not None else range(n)
        col_group = [c // gs for c in orig] if gs > 0 else [0] * n
    if perm is not None:
        W_ = W_[:, perm]

    W_ = W_.t().contiguous()  # [in, out]: column j of W is the contiguous row j here
    codes, Q = torch.empty_like(W_), torch.empty_like(W_)
    B = cfg.block_size
    for i1 in range(0, n, B):
        i2 = min(i1 + B, n)
        Hinv1 = Hinv[i1:i2, i1:i2]
        Err1 = torch.empty(i2 - i1, out_f, device=dev)
        for j in range(i1, i2):
            k, g = j - i1, col_group[j]
            if refit and j % gs == 0:
                S[g], Z[g] = _fit_group(W_, Hinv, Err1, i1, i2, j, gs, rcfg)
            s, z, w = S[g], Z[g], W_[j]
            c = quantize_codes(w, s, z, qmax)
            q = (c - z) * s
            torch.div(w - q, Hinv1[k, k], out=Err1[k])
            # in-block update of the later columns, a rank-1 product (addmm_: much faster than addr_ on CPU)
            W_[j + 1 : i2].addmm_(Hinv1[k, k + 1 :, None], Err1[k, None], alpha=-1)
            codes[j], Q[j] = c, q
        W_[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1)  # lazy batch update of all later columns

    g_idx = None
    if perm is not None:
        invperm = torch.argsort(perm)
        codes, Q = codes[invperm], Q[invperm]
        if refit:
            g_idx = (invperm // gs).to(torch.int32)  # groups were formed over the permuted order
    qt = QuantizedTensor(
        codes=codes.t().to(torch.uint8).contiguous(),
        scale=S.t().to(torch.float16).contiguous(),
        zero=Z.t().to(torch.uint8).contiguous(),
        scheme=scheme,
        g_idx=g_idx,
        dtype=W.dtype,
    )
    return qt, Q.t().contiguous()


def _asymmetric_correction(WD: torch.Tensor, Hinv: torch.Tensor, perm: torch.Tensor | None) -> torch.Tensor:
    """GPTAQ's shift ``W* - W = W D (H + damp I)^-1`` (original column order), from the solver's own factor
    ``Hinv`` (``Hinvᵀ Hinv = (H + damp I)^-1`` in ``perm`` order): ``|| Q X - W X_float ||²`` equals
    ``|| (Q - W*) X ||²`` plus a constant (``W* X`` is the least-squares fit of ``W X_float`` on ``X``, with
    ``D = (X_float - X)ᵀ X / n``), so GPTQ on ``W*`` with the usual ``H`` solves the asymmetric problem, damped
    exactly as the solver is."""
    if perm is None:
        return WD @ Hinv.t() @ Hinv
    return (WD[:, perm] @ Hinv.t() @ Hinv)[:, torch.argsort(perm)]


def _fit_group(
    Wt: torch.Tensor, Hinv: torch.Tensor, Err1: torch.Tensor, i1: int, i2: int, j: int, gs: int, rcfg: RtnConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero ``[out]`` of the group of (permuted) columns ``j .. j+gs`` from their current values.

    Rows ``j .. i2`` of ``Wt`` already hold this block's in-block updates; rows past ``i2`` still lack the lazy
    update from the ``j - i1`` columns quantized so far in this block, so it is applied here to a copy.
    """
    cur = Wt[j : j + gs].t().contiguous()  # [out, gs]
    if j + gs > i2 and j > i1:
        cur[:, i2 - j :] -= Err1[: j - i1].t() @ Hinv[i1:j, i2 : j + gs]
    scale, zero = group_qparams(cur.unsqueeze(1), rcfg.scheme, rcfg)
    return scale[:, 0], zero[:, 0]


@register_method(
    "gptq", GptqConfig, "GPTQ: Hessian-aware error feedback from calibration data (act-order, groups)",
    kind="weight", needs_calibration=True, devices=("cuda", "cpu"), block_procedure=HESSIAN,
)
def quantize_weight(W: torch.Tensor, H: torch.Tensor, cfg: GptqConfig, *, name: str = "this layer",
                    D: torch.Tensor | None = None) -> QuantizedTensor:
    """GPTQ-quantize ``W`` ``[out, in]`` given ``H`` ``[in, in]`` = sum of ``x x^T`` over calibration tokens.

    ``D`` (with ``cfg.gptaq``): ``(X_float - X)ᵀ X`` on the same scale as ``H``. ``name`` (the layer's) only
    appears in error messages.
    """
    return quantize_weight_with_q(W, H, cfg, name=name, D=D)[0]
