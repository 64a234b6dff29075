import pytest
import torch

from turboquant.errors import ConfigError
from turboquant.tensor import (
    QuantizedTensor,
    QuantScheme,
    pack_bits,
    pack_words,
    packed_length,
    unpack_bits,
    unpack_words,
)


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 31, 32, 128, 129])
def test_pack_unpack_round_trip_is_bit_exact(bits, n):
    g = torch.Generator().manual_seed(bits * 1000 + n)
    codes = torch.randint(0, 2**bits, (3, 5, n), generator=g, dtype=torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, packed_length(n, bits))
    assert torch.equal(unpack_bits(packed, bits, n), codes)


@pytest.mark.parametrize("bits,n,expected_bytes", [(2, 8, 2), (3, 8, 3), (4, 8, 4), (8, 8, 8), (3, 10, 6), (4, 9, 5)])
def test_packed_length(bits, n, expected_bytes):
    assert packed_length(n, bits) == expected_bytes


def test_pack_words_matches_gptq_int32_layout():
    codes = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.uint8)
    word = pack_words(codes, 4)
    assert word.dtype == torch.int32 and word.shape == (1, 1)
    assert word.item() == 0x87654321 - (1 << 32)  # nibble k holds code k, least significant first
    two_bit = pack_words(torch.tensor([[3] + [0] * 15], dtype=torch.uint8), 2)
    assert two_bit.item() == 3
    eight = pack_words(torch.tensor([[0x11, 0x22, 0x33, 0x44]], dtype=torch.uint8), 8)
    assert eight.item() == 0x44332211


def test_three_bit_stream_crosses_word_boundaries():
    codes = torch.zeros(1, 32, dtype=torch.uint8)
    codes[0, 10] = 0b101  # bits 30..32: straddles the first and second int32 word
    words = pack_words(codes, 3)
    assert words.shape == (1, 3)
    assert words[0, 0].item() == (1 << 30) and words[0, 1].item() == 1 and words[0, 2].item() == 0
    assert torch.equal(unpack_words(words, 3, 32), codes)


@pytest.mark.parametrize(
    "kwargs", [{"bits": 1}, {"bits": 9}, {"bits": 4.0}, {"group_size": 100}, {"group_size": 4}, {"group_size": -2},
               {"symmetric": "yes"}, {"bits": True}]
)
def test_scheme_rejects_out_of_range(kwargs):
    with pytest.raises(ConfigError) as e:
        QuantScheme(**kwargs)
    assert "Fix:" in str(e.value) and "\n" not in str(e.value)


def test_scheme_group_must_divide_input_dim():
    with pytest.raises(ConfigError, match="does not divide the input dimension 96"):
        QuantScheme(4, 64).check_shape((8, 96), "w")
    QuantScheme(4, 32).check_shape((8, 96), "w")


def test_scheme_dict_round_trip_and_unknown_keys():
    s = QuantScheme(3, 64, False)
    assert QuantScheme.from_dict(s.to_dict()) == s
    with pytest.raises(ConfigError, match=r"unknown scheme key\(s\)"):
        QuantScheme.from_dict({"bits": 4, "groupsize": 128})


def test_storage_bits_counts_codes_scales_and_zeros():
    assert QuantScheme(4, 128, True).storage_bits(10, 256) == 4 * 2560 + 10 * 2 * 16
    assert QuantScheme(4, 128, False).storage_bits(10, 256) == 4 * 2560 + 10 * 2 * 20
    assert QuantScheme(8, 0, True).storage_bits(10, 256) == 8 * 2560 + 16
    assert QuantScheme(4, 128, False).storage_bits(10, 256, fractional_zero=True) == 4 * 2560 + 10 * 2 * 32


def test_dequantize_follows_g_idx():
    scheme = QuantScheme(4, 8, True)
    codes = torch.randint(0, 16, (2, 16), dtype=torch.uint8)
    scale = torch.tensor([[1.0, 2.0], [0.5, 4.0]], dtype=torch.float16)
    zero = torch.full((2, 2), 8, dtype=torch.uint8)
    g_idx = torch.tensor([1, 0] * 8, dtype=torch.int32)
    qt = QuantizedTensor(codes, scale, zero, scheme, g_idx=g_idx)
    expected = (codes.float() - 8) * scale.float()[:, g_idx.long()]
    assert torch.equal(qt.dequantize(), expected)
    plain = QuantizedTensor(codes, scale, zero, scheme)
    assert torch.equal(plain.dequantize(), (codes.float() - 8) * scale.float().repeat_interleave(8, dim=1))


def test_quantized_tensor_validates_shapes():
    with pytest.raises(ValueError, match="do not match"):
        QuantizedTensor(torch.zeros(2, 16, dtype=torch.uint8), torch.ones(2, 3, dtype=torch.float16),
                        torch.zeros(2, 3, dtype=torch.uint8), QuantScheme(4, 8))


def test_to_from_tensors_round_trip_with_fractional_zero():
    scheme = QuantScheme(3, 8, False)
    codes = torch.randint(0, 8, (4, 16), dtype=torch.uint8)
    qt = QuantizedTensor(codes, torch.rand(4, 2).half(), (torch.rand(4, 2) * 7).half(), scheme,
                         g_idx=torch.arange(16, dtype=torch.int32) % 2)
    flat = qt.to_tensors("m")
    assert set(flat) == {"m.qcodes", "m.qscale", "m.qzero", "m.g_idx"}
    back = QuantizedTensor.from_tensors(flat, "m", scheme, (4, 16), torch.float32)
    assert torch.equal(back.dequantize(), qt.dequantize()) and not back.integer_zero
