import pytest
import torch

from turboquant.errors import ConfigError
from turboquant.methods import METHODS, get_method, make_config
from turboquant.methods.rtn import RtnConfig, rtn_quantize
from turboquant.tensor import QuantScheme


def _weight(seed=0, shape=(64, 256), heavy_tail=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g)
    if heavy_tail:
        torch.manual_seed(seed)
        w = w + torch.distributions.StudentT(2.0).sample(shape) * 0.05
    return w


def sqnr_db(w, w_hat):
    return 10 * torch.log10(w.pow(2).sum() / (w - w_hat).pow(2).sum()).item()


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1, 0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_error_is_at_most_half_a_step(bits, group_size, symmetric):
    w = _weight(bits)
    qt = rtn_quantize(w, QuantScheme(bits, group_size, symmetric))
    assert qt.codes.max().item() <= 2**bits - 1
    step = qt.scale.float()[:, qt.group_index()]
    err = (qt.dequantize() - w).abs()
    assert (err <= 0.5 * step * (1 + 1e-3) + 1e-6).all()
    if symmetric:
        assert (qt.zero == 2 ** (bits - 1)).all()


@pytest.mark.parametrize("bits,min_db", [(8, 40.0), (4, 18.0), (3, 12.0), (2, 5.0)])
def test_rtn_sqnr_on_gaussian_weights(bits, min_db):
    w = _weight(1, (256, 512))
    assert sqnr_db(w, rtn_quantize(w, QuantScheme(bits, 128, False)).dequantize()) > min_db


def test_smaller_groups_and_mse_clip_lower_the_error():
    w = _weight(2, (128, 512), heavy_tail=True)
    err = {}
    for g in (-1, 128, 32):
        err[g] = (rtn_quantize(w, QuantScheme(4, g, False)).dequantize() - w).pow(2).mean().item()
    assert err[32] < err[128] < err[-1]
    mse = get_method("rtn").solver(w, RtnConfig(bits=4, group_size=128, symmetric=False, mse_clip=True))
    assert (mse.dequantize() - w).pow(2).mean().item() < 0.95 * err[128]


def test_scales_are_float16_exact_and_codes_reproduce_weights():
    w = _weight(3)
    qt = rtn_quantize(w, QuantScheme(4, 64, False))
    assert qt.scale.dtype == torch.float16 and qt.zero.dtype == torch.uint8
    recon = (qt.codes.float() - qt.zero.float().repeat_interleave(64, 1)) * qt.scale.float().repeat_interleave(64, 1)
    assert torch.equal(recon, qt.dequantize())


def test_all_zero_group_quantizes_to_zero():
    w = torch.zeros(4, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    qt = rtn_quantize(w, QuantScheme(4, 32, False))
    assert torch.isfinite(qt.dequantize()).all()
    assert torch.equal(qt.dequantize()[1:], torch.zeros(3, 64))


def test_rtn_config_json_round_trip_and_strict_keys():
    cfg = RtnConfig(bits=3, group_size=64, symmetric=False, mse_clip=True)
    assert RtnConfig.from_json(cfg.to_json()) == cfg
    assert '"method": "rtn"' in cfg.to_json()
    with pytest.raises(ConfigError) as e:
        make_config("rtn", bits=4, groupsize=128)
    assert "groupsize" in str(e.value) and "group_size" in str(e.value)


@pytest.mark.parametrize("bad", [{"bits": 9}, {"group_size": 3}, {"mse_clip": "yes"}, {"mse_grid": 0},
                                 {"mse_maxshrink": 1.5}, {"symmetric": 1}])
def test_rtn_config_rejects_bad_values(bad):
    with pytest.raises(ConfigError):
        make_config("rtn", **bad)


def test_registry_lists_methods_and_rejects_unknown():
    assert {"fp16", "bf16", "rtn"} <= set(METHODS)
    with pytest.raises(ConfigError, match="unknown method 'rtm'.*rtn"):
        get_method("rtm")


def test_casts():
    w = torch.tensor([1e6, -1e6, 0.1, 1.0])
    assert get_method("fp16").solver(w, make_config("fp16")).dtype == torch.float16
    assert torch.isfinite(get_method("fp16").solver(w, make_config("fp16"))).all()
    assert get_method("bf16").solver(w, make_config("bf16")).dtype == torch.bfloat16
    ints = torch.arange(3)
    assert get_method("fp16").solver(ints, make_config("fp16")).dtype == ints.dtype
    with pytest.raises(ConfigError, match="takes no options"):
        make_config("fp16", bits=4)
