"""The fast codec keeps the plain decode's contract and draws; precision changes stay behind an SNR check."""
from __future__ import annotations

import pytest
import torch

from gpu_worker.fast_codec import FastCodec, snr_db
from gpu_worker.heartcodec import HeartCodecConfig, build_random_heartcodec

FRAMES = 400  # two windows: the second one takes the first one's prefix


@pytest.fixture(scope="module")
def codec():
    return build_random_heartcodec(HeartCodecConfig.tiny(), seed=0)


@pytest.fixture(scope="module")
def codes():
    return torch.randint(0, 8192, (8, FRAMES), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def reference(codec, codes):
    return codec.decode(codes, generator=torch.Generator().manual_seed(0))


def test_fp32_fast_codec_is_bitwise_the_plain_decode(codec, codes, reference):
    out = FastCodec(codec, precision="fp32").decode(codes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, reference)


def test_tf32_fast_codec_restores_the_matmul_setting_and_matches_fp32_on_cpu(codec, codes, reference):
    before = torch.backends.cuda.matmul.allow_tf32
    out = FastCodec(codec, precision="tf32").decode(codes, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, reference)  # TF32 only changes CUDA matmuls
    assert torch.backends.cuda.matmul.allow_tf32 == before


@pytest.mark.parametrize("precision, sq_dtype", [("bf16", None), ("bf16-mixed", None), ("bf16", torch.bfloat16)])
def test_bf16_variants_keep_shape_and_stay_above_30_db(codec, codes, reference, precision, sq_dtype):
    out = FastCodec(codec, precision=precision, sq_dtype=sq_dtype).decode(
        codes, generator=torch.Generator().manual_seed(0))
    assert out.shape == reference.shape == (2, FRAMES * 3840) and out.dtype == torch.float32
    assert snr_db(reference, out) >= 30.0


def test_the_codec_generator_gives_one_randn_per_window_as_the_plain_decode(codec, codes):
    fast_gen, plain_gen = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    FastCodec(codec, precision="bf16").decode(codes, generator=fast_gen)
    codec.decode(codes, generator=plain_gen)
    assert torch.equal(fast_gen.get_state(), plain_gen.get_state())


def test_out_of_range_codes_are_rejected_before_decoding(codec, codes):
    bad = codes.clone()
    bad[3, 10] = 8192
    with pytest.raises(ValueError, match="8192"):
        FastCodec(codec, precision="bf16").decode(bad, generator=torch.Generator())


def test_unknown_precision_is_refused(codec):
    with pytest.raises(ValueError, match="precision"):
        FastCodec(codec, precision="fp8")


def test_snr_of_identical_signals_is_infinite_and_of_noise_is_finite():
    x = torch.randn(2, 1000, generator=torch.Generator().manual_seed(0))
    assert snr_db(x, x) == float("inf")
    assert 19.0 < snr_db(x, x + 0.1 * torch.randn(2, 1000, generator=torch.Generator().manual_seed(1))) < 21.0
