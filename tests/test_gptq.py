"""GPTQ solver: beats RTN on the layer-output loss, matches an unblocked float64 reference, exact layouts."""

import math

import pytest
import torch

from turboquant.errors import ConfigError, DataError
from turboquant.methods import METHODS, make_config
from turboquant.methods.gptq import GptqConfig, quantize_weight, quantize_weight_with_q
from turboquant.methods.rtn import RtnConfig, rtn_quantize
from turboquant.tensor import QuantizedTensor, QuantScheme, qparams_from_range


pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=0, n_tok=2048, d_in=256, d_out=128, outliers=0):
    """Correlated, strongly non-isotropic inputs X = Z @ A (latent scales spanning 100x) and a Gaussian W."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in)
    X = (torch.randn(n_tok, d_in, generator=g) * torch.logspace(0, -2, d_in)) @ A
    if outliers:
        X[:, torch.randperm(d_in, generator=g)[:outliers]] *= 20
    W = torch.randn(d_out, d_in, generator=g)
    return W, X, X.t() @ X


def _out_err(W, W_hat, X):
    return ((W - W_hat.float()) @ X.t()).pow(2).sum().item()


def _naive_gptq(W, H, scheme, damp=0.01):
    """The paper's algorithm without lazy batching, in float64: the blocked solver must agree with it."""
    W, H = W.double().clone(), H.double().clone()
    n = W.shape[1]
    H += damp * H.diagonal().mean() * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    Q = torch.zeros_like(W)
    for i in range(n):
        if i % scheme.group_size == 0:  # fitted on the fully updated weights
            block = W[:, i : i + scheme.group_size]
            s, z = (t.double() for t in qparams_from_range(block.amin(1).float(), block.amax(1).float(), scheme))
        q = (torch.clamp(torch.round(W[:, i] / s) + z, 0, scheme.qmax) - z) * s
        err = (W[:, i] - q) / Hinv[i, i]
        W[:, i:] -= err[:, None] * Hinv[i, i:][None, :]
        Q[:, i] = q
    return Q


@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [128, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_gptq_beats_rtn_on_layer_output(bits, group_size, symmetric):
    W, X, H = _data(bits)
    cfg = GptqConfig(bits=bits, group_size=group_size, symmetric=symmetric)
    qt, Q = quantize_weight_with_q(W, H, cfg)
    rtn = _out_err(W, rtn_quantize(W, cfg.scheme).dequantize(), X)
    ratio = _out_err(W, qt.dequantize(), X) / rtn
    assert ratio <= 0.8, ratio
    assert torch.equal(qt.dequantize(torch.float32), Q)
    assert qt.g_idx is None and qt.codes.max().item() <= cfg.scheme.qmax


def test_act_order_helps_with_outlier_channels():
    W, X, H = _data(3, outliers=4)
    err = {}
    for act_order in (False, True):
        qt = quantize_weight(W, H, GptqConfig(bits=3, group_size=128, act_order=act_order, static_groups=False))
        err[act_order] = _out_err(W, qt.dequantize(), X)
    default = quantize_weight(W, H, GptqConfig(bits=3, group_size=128))  # act-order with static groups
    err["static"] = _out_err(W, default.dequantize(), X)
    rtn = _out_err(W, rtn_quantize(W, QuantScheme(3, 128, True)).dequantize(), X)
    assert err[True] <= err[False] <= rtn
    assert err[True] <= 0.5 * rtn
    assert default.g_idx is None and err["static"] <= err[False], err


def test_defaults_are_static_act_order_with_gptaq():
    """The defaults since issue 21: llm-compressor's "static" act-order (contiguous groups, every format holds
    them) and GPTAQ's asymmetric target; the rest as in AutoGPTQ."""
    cfg = GptqConfig()
    assert (cfg.act_order, cfg.static_groups, cfg.gptaq, cfg.true_sequential, cfg.mse_clip) == (True, True, True,
                                                                                                 True, False)
    assert (cfg.damp_percent, cfg.block_size) == (0.01, 128)


@pytest.mark.parametrize("block_size", [1, 48, 128, 512])
@pytest.mark.parametrize("group_size", [32, 128])
def test_blocked_solver_matches_unblocked_float64_reference(block_size, group_size):
    # block 48 / group 32 makes groups start mid-block and spill past it (their scale needs the pending update)
    W, X, H = _data(1)
    cfg = GptqConfig(bits=4, group_size=group_size, symmetric=False, block_size=block_size, act_order=False,
                     static_groups=False)
    _, Q = quantize_weight_with_q(W, H, cfg)
    ref = _naive_gptq(W, H, cfg.scheme)
    rows_equal = (Q.double() == ref).all(dim=1).float().mean().item()
    assert rows_equal >= 0.97  # a float32 near-tie may flip one code, and the rest of that row follows
    assert _out_err(W, Q, X) == pytest.approx(_out_err(W, ref, X), rel=0.01)


@pytest.mark.parametrize("group_size", [32, 128, -1, 0])
@pytest.mark.parametrize("mse_clip", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_diagonal_hessian_reduces_to_rtn(group_size, mse_clip, act_order):
    # no correlations, no error feedback: GPTQ picks RTN's codes and scales exactly (original column order)
    W, _, H = _data(2)
    cfg = GptqConfig(bits=3, group_size=group_size, symmetric=False, mse_clip=mse_clip,
                     act_order=act_order, static_groups=act_order)
    qt = quantize_weight(W, torch.diag(H.diagonal()), cfg)
    rtn = rtn_quantize(W, cfg.scheme, RtnConfig(bits=3, group_size=group_size, symmetric=False, mse_clip=mse_clip))
    assert torch.equal(qt.codes, rtn.codes) and torch.equal(qt.scale, rtn.scale) and torch.equal(qt.zero, rtn.zero)


@pytest.mark.parametrize("symmetric", [True, False])
def test_act_order_groups_layout_and_exact_dequantize(symmetric):
    W, X, H = _data(4, outliers=4)
    cfg = GptqConfig(bits=4, group_size=32, symmetric=symmetric, act_order=True, static_groups=False)
    qt, Q = quantize_weight_with_q(W, H, cfg)
    assert qt.g_idx is not None and qt.g_idx.dtype == torch.int32 and qt.g_idx.shape == (256,)
    assert torch.bincount(qt.g_idx.long(), minlength=8).tolist() == [32] * 8
    perm = torch.argsort(H.diagonal(), descending=True, stable=True)
    assert torch.equal(qt.g_idx.long(), torch.argsort(perm) // 32)  # AutoGPTQ: groups over the permuted order
    assert qt.g_idx[H.diagonal().argmax()].item() == 0
    assert qt.scale.dtype == torch.float16 and qt.zero.dtype == torch.uint8 and qt.dtype == W.dtype
    assert torch.equal(qt.dequantize(torch.float32), Q)  # bit-exact with what the error feedback assumed
    back = QuantizedTensor.from_tensors(qt.to_tensors("l"), "l", qt.scheme, qt.shape, qt.dtype)
    for a, b in ((back.codes, qt.codes), (back.scale, qt.scale), (back.zero, qt.zero), (back.g_idx, qt.g_idx)):
        assert torch.equal(a, b)
    assert torch.equal(back.dequantize(torch.float32), Q)
    assert _out_err(W, Q, X) < 0.5 * _out_err(W, rtn_quantize(W, cfg.scheme).dequantize(), X)


def test_static_groups_keep_rtn_group_params():
    W, X, H = _data(5, outliers=4)
    cfg = GptqConfig(bits=4, group_size=64, symmetric=False, act_order=True, static_groups=True)
    qt, Q = quantize_weight_with_q(W, H, cfg)
    rtn = rtn_quantize(W, cfg.scheme)
    assert qt.g_idx is None
    assert torch.equal(qt.scale, rtn.scale) and torch.equal(qt.zero, rtn.zero)
    assert torch.equal(qt.dequantize(torch.float32), Q)
    assert _out_err(W, Q, X) < 0.5 * _out_err(W, rtn.dequantize(), X)


def test_deterministic_dead_inputs_and_inputs_untouched():
    W, X, H = _data(6)
    X[:, 7] = 0
    H = X.t() @ X  # input 7 never fires: diag(H)[7] == 0
    W16, H0 = W.half(), H.clone()
    cfg = GptqConfig(bits=4, group_size=64, symmetric=False, act_order=True, static_groups=False)
    a, b = quantize_weight(W16, H, cfg), quantize_weight(W16, H, cfg)
    for x, y in ((a.codes, b.codes), (a.scale, b.scale), (a.zero, b.zero), (a.g_idx, b.g_idx)):
        assert x.numpy().tobytes() == y.numpy().tobytes()
    assert torch.equal(H, H0) and torch.equal(W16, W.half())
    assert a.dtype == torch.float16
    assert (a.dequantize()[:, 7] == 0).all()


@pytest.mark.parametrize("bits,max_ratio", [(2, 0.5), (8, 0.5)])
def test_extreme_bit_widths(bits, max_ratio):
    W, X, H = _data(7)
    cfg = GptqConfig(bits=bits, group_size=128, symmetric=False)
    qt, Q = quantize_weight_with_q(W, H, cfg)
    assert qt.codes.max().item() <= 2**bits - 1 and torch.equal(qt.dequantize(torch.float32), Q)
    err = _out_err(W, Q, X)
    assert err <= max_ratio * _out_err(W, rtn_quantize(W, cfg.scheme).dequantize(), X)
    if bits == 8:
        assert err / (W @ X.t()).pow(2).sum().item() < 1e-4


def test_indefinite_or_broken_hessian_is_refused():
    W, _, H = _data(8, d_in=64, d_out=16)
    bad = torch.eye(64)
    bad[0, 1] = bad[1, 0] = 100.0  # eigenvalue -99: no damping in the retry range fixes it
    with pytest.raises(ConfigError, match="damp_percent"):
        quantize_weight(W, bad, GptqConfig(group_size=32), name="layers.0.mlp.up_proj")
    H[3, 3] = float("nan")
    with pytest.raises(DataError, match="non-finite"):
        quantize_weight(W, H, GptqConfig(group_size=32))
    with pytest.raises(ConfigError, match="shape"):
        quantize_weight(W, H[:32, :32], GptqConfig(group_size=32))


def test_config_round_trip_and_registry():
    cfg = GptqConfig(bits=3, group_size=64, symmetric=False, damp_percent=0.05, block_size=64, act_order=True,
                     static_groups=True, true_sequential=False, mse_clip=True)
    assert GptqConfig.from_json(cfg.to_json()) == cfg
    assert make_config("gptq", **cfg.to_dict()) == cfg
    spec = METHODS["gptq"]
    assert spec.config_cls is GptqConfig and spec.kind == "weight" and spec.needs_calibration
    assert spec.solver is quantize_weight
    with pytest.raises(ConfigError, match="damp_percent") as info:
        GptqConfig.from_dict({"bits": 4, "dampening": 0.1})
    assert "dampening" in str(info.value) and "block_size" in str(info.value)


@pytest.mark.parametrize("bad", [
    {"damp_percent": -0.01}, {"damp_percent": 0}, {"damp_percent": 1.0}, {"damp_percent": float("nan")},
    {"damp_percent": "0.01"}, {"block_size": 0}, {"block_size": -8}, {"block_size": 1.5}, {"block_size": True},
    {"act_order": "yes"}, {"act_order": 1}, {"static_groups": None}, {"true_sequential": 0}, {"mse_clip": "true"},
    {"bits": 9}, {"group_size": 100},
])
def test_bad_config_values_rejected(bad):
    with pytest.raises(ConfigError):
        GptqConfig(**bad)


def test_gptaq_without_input_shift_is_plain_gptq():
    W, X, H = _data(5, d_in=128, d_out=64)
    plain = quantize_weight(W, H, GptqConfig(bits=4, group_size=32))
    same = quantize_weight(W, H, GptqConfig(bits=4, group_size=32, gptaq=True), D=torch.zeros_like(H))
    unused = quantize_weight(W, H, GptqConfig(bits=4, group_size=32, gptaq=True))  # no float stream: plain GPTQ
    assert torch.equal(plain.codes, same.codes) and torch.equal(plain.scale, same.scale)
    assert torch.equal(plain.codes, unused.codes)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptaq_fits_the_float_models_output(act_order):
    """Inputs X carry the error of earlier quantized layers (X = X_float + E): GPTAQ's Q X tracks W X_float."""
    W, Xf, _ = _data(6, d_in=128, d_out=64)
    g = torch.Generator().manual_seed(7)
    X = Xf + 0.3 * Xf @ (torch.randn(128, 128, generator=g) / math.sqrt(128)) * Xf.std(0)
    H, D = X.t() @ X, (Xf - X).t() @ X
    cfg = dict(bits=4, group_size=32, act_order=act_order, static_groups=act_order)
    err = {}
    for gptaq in (False, True):
        qt = quantize_weight(W, H, GptqConfig(**cfg, gptaq=gptaq), D=D)
        err[gptaq] = (qt.dequantize().float() @ X.t() - W @ Xf.t()).pow(2).sum().item()
    assert err[True] <= 0.5 * err[False], err


def test_gptaq_config_validated():
    assert GptqConfig.from_json(GptqConfig(gptaq=True).to_json()).gptaq is True
    with pytest.raises(ConfigError):
        GptqConfig(gptaq="yes")
