"""The native int4 kernel (AVX512-VNNI or AVX2): parity with the float32 reference, no_kernel, weight
packing, build cache.

The kernel quantizes each activation row to int8 in blocks of BLOCK (32) values with scale
d = max|x| / 127, so each activation moves by at most d/2 and each output by at most
sum_blocks d/2 * sum|w| over the block: the parity tests assert that bound element by element (plus
float32 summation slack), and, for Gaussian activations, a relative error under 1% (the expected ~0.5%
is the int8 rounding noise, d/sqrt(12) per activation).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from bot.model import int4
from bot.model.kernels import build, layout, ops
from tests.model.fixture import require_native_kernel

BLOCK = layout.BLOCK
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session", autouse=True)
def cache_dir(request: pytest.FixtureRequest) -> Path:
    # Compiling takes ~30 s: build once into pytest's cache so later sessions only load. Packing weights
    # builds the kernel too (for its repacking), so every test here configures the cache first.
    cache = getattr(request.config, "cache", None)  # absent under -p no:cacheprovider
    path = build.default_cache_dir() if cache is None else Path(cache.mkdir("int4-kernels"))
    build.configure(cache_dir=path)
    return path


@pytest.fixture(scope="session")
def kernel(cache_dir: Path) -> None:
    require_native_kernel()


def official(out: int, in_features: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    qweight = torch.randint(-128, 128, (out, in_features // 2), dtype=torch.int8, generator=gen)
    scale = (torch.rand(out, generator=gen) * 0.02 + 0.001).half()
    return qweight, scale


def dequantized(qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The checkpoint's own definition: even column in the high nibble, arithmetic shifts."""
    even = qweight >> 4
    odd = (qweight << 4) >> 4
    q = torch.stack((even, odd), dim=-1).view(qweight.shape[0], -1)
    return q.float() * scale.float()[:, None]


def rounding_bound(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Largest |error| per output element that int8 activation rounding can cause ([N, out])."""
    n, k = x.shape
    pad = -k % BLOCK
    xb = torch.nn.functional.pad(x.float(), (0, pad)).view(n, -1, BLOCK)
    wb = torch.nn.functional.pad(w.abs(), (0, pad)).view(w.shape[0], -1, BLOCK)
    half_step = xb.abs().amax(dim=2) / 127 / 2  # [N, blocks]
    return torch.einsum("nb,obk->no", half_step, wb)


def assert_within_rounding(
    y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, ref: torch.Tensor, output_unit_roundoff: float = 0.0
) -> None:
    bound = rounding_bound(x, w)
    slack = 1e-5 * (x.float().abs() @ w.abs().T) + 1e-6  # float32 summation order
    output_rounding = output_unit_roundoff * (ref.abs() + bound)
    excess = (y.float() - ref).abs() - bound - slack - output_rounding
    assert excess.max().item() <= 0, f"error exceeds the int8 rounding bound by {excess.max().item()}"


SHAPES = [  # (out, in, tokens): odd token counts hit each 4/3/2/1-token remainder; odd sizes are padded
    (32, 128, 1),
    (100, 200, 3),
    (37, 72, 5),
    (64, 4096, 7),
    (48, 13696, 2),
    (96, 384, 9),
]


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("out", "in_features", "tokens"), SHAPES)
@pytest.mark.parametrize("with_bias", [False, True])
def test_float32_matches_reference_within_int8_rounding(
    out: int, in_features: int, tokens: int, with_bias: bool
) -> None:
    qweight, scale = official(out, in_features)
    w = dequantized(qweight, scale)
    x = torch.randn(tokens, in_features, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(out) if with_bias else None
    ref = x @ w.T + (bias if bias is not None else 0)

    y = ops.int4_linear(x, layout.PackedInt4.from_official(qweight, scale), bias)

    assert y.dtype == torch.float32 and y.shape == (tokens, out)
    assert_within_rounding(y, x, w, ref)
    assert ((y - ref).norm() / (x @ w.T).norm()).item() < 0.01


@pytest.mark.usefixtures("kernel")
def test_bfloat16_activations_give_bfloat16_within_rounding() -> None:
    qweight, scale = official(80, 256)
    w = dequantized(qweight, scale)
    x = torch.randn(6, 256).bfloat16()
    bias = torch.randn(80)
    ref = x.float() @ w.T + bias

    y = ops.int4_linear(x, layout.PackedInt4.from_official(qweight, scale), bias)

    assert y.dtype == torch.bfloat16
    assert_within_rounding(y, x, w, ref, output_unit_roundoff=2**-8)  # plus one bfloat16 rounding


@pytest.mark.usefixtures("kernel")
def test_leading_dimensions_and_empty_batches() -> None:
    qweight, scale = official(64, 128)
    packed = layout.PackedInt4.from_official(qweight, scale)
    x = torch.randn(2, 3, 128)

    y = ops.int4_linear(x, packed)

    assert y.shape == (2, 3, 64)
    assert torch.equal(y[1, 2], ops.int4_linear(x[1, 2:3], packed)[0])
    assert ops.int4_linear(torch.empty(0, 128), packed).shape == (0, 64)


@pytest.mark.usefixtures("kernel")
def test_extreme_nibbles_and_activation_outliers() -> None:
    # Every byte value, so all 16 nibbles appear in both positions; one huge activation per row, and a
    # row of large positive values (the +8 weight offset's correction then dwarfs the result).
    qweight = torch.arange(-128, 128, dtype=torch.int8).repeat(32, 2)  # [32, 512]
    scale = torch.full((32,), 0.5).half()
    w = dequantized(qweight, scale)
    x = torch.randn(3, 1024)
    x[:2, 5] = 1000.0
    x[2] = x[2].abs() + 50

    y = ops.int4_linear(x, layout.PackedInt4.from_official(qweight, scale))

    assert_within_rounding(y, x, w, x @ w.T)


@pytest.mark.usefixtures("no_kernel")
@pytest.mark.parametrize(("out", "in_features", "tokens"), SHAPES[:3])
def test_fallback_is_the_exact_float32_reference(out: int, in_features: int, tokens: int) -> None:
    qweight, scale = official(out, in_features)
    x = torch.randn(tokens, in_features)
    bias = torch.randn(out)

    y = ops.int4_linear(x, layout.PackedInt4.from_official(qweight, scale), bias)

    assert not build.available()
    assert build.backend_name() == "disabled by configuration"
    assert torch.equal(y, x @ dequantized(qweight, scale).T + bias)
    y16 = ops.int4_linear(x.bfloat16(), layout.PackedInt4.from_official(qweight, scale))
    assert torch.equal(y16, (x.bfloat16().float() @ dequantized(qweight, scale).T).bfloat16())


def test_unavailable_reasons_are_reported(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset({"avx2", "avx512f"}))
    with caplog.at_level(logging.WARNING, logger=build.__name__):
        module, reason = build._load(Path("/nonexistent"))
    assert module is None
    assert reason == "CPU lacks avx512f/avx512bw/avx512vl/avx512_vnni and avx2/fma"
    assert reason in caplog.text

    monkeypatch.setattr(build, "cpu_flags", lambda: frozenset(build.ISA_FLAGS["avx2"]))
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert build._load(Path("/nonexistent")) == (None, "no C++ compiler (no-such-compiler-xyz)")


@pytest.mark.usefixtures("kernel")
def test_the_build_uses_the_fastest_instruction_set_the_cpu_has() -> None:
    assert build.kernel().isa == build.expected_isa(build.cpu_flags())
    amx = " + amx" if build.kernel().amx_enabled() else ""
    assert build.backend_name() == f"native ({build.kernel().isa}{amx})"
    if not {"amx_tile", "amx_int8"} <= build.cpu_flags():
        assert not build.set_amx(True)
    avx512 = frozenset(build.ISA_FLAGS["avx512-vnni"])
    assert build.expected_isa(avx512 | {"avx2", "fma"}) == "avx512-vnni"
    assert build.expected_isa(frozenset({"avx2", "fma", "avx512f", "avx512bw"})) == "avx2"
    assert build.expected_isa(frozenset({"avx2", "avx"})) is None


@pytest.fixture
def amx() -> Iterator[None]:
    if not build.set_amx(True):
        pytest.skip("no AMX-INT8 here (CPU or OS)")
    yield
    build.set_amx(True)


@pytest.mark.usefixtures("kernel", "amx")
@pytest.mark.parametrize(("out", "in_features"), [(40, 100), (4608, 4096), (96, 13696)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_amx_route_gives_the_same_bits_as_vnni_and_as_one_row_at_a_time(
    out: int, in_features: int, dtype: torch.dtype
) -> None:
    qweight, scale = official(out, in_features, seed=3)
    packed = layout.PackedInt4.from_official(qweight, scale)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(4))
    gen = torch.Generator().manual_seed(5)
    for tokens in (15, 16, 17, 64, 65, 130):  # below the AMX threshold, one tile, remainders, passes
        x = (torch.randn(tokens, in_features, generator=gen) * 3).to(dtype)
        x[0, 7] = 400.0  # an outlier: its block's scale differs from the others'
        with_amx = ops.int4_linear(x, packed, bias)
        assert build.set_amx(False) is False
        without = ops.int4_linear(x, packed, bias)
        build.set_amx(True)
        alone = torch.cat([ops.int4_linear(x[i : i + 1], packed, bias) for i in range(tokens)])
        assert torch.equal(with_amx, without), tokens
        assert torch.equal(with_amx, alone), tokens


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("out", "in_features"), [(37, 72), (64, 4096), (48, 13696)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_batch_size_gives_each_row_the_bits_it_gets_alone(
    out: int, in_features: int, dtype: torch.dtype
) -> None:
    """Batched decoding relies on it: 5-8 rows take turns over the weights chunk by chunk, other
    counts go group by group, and a row's output must not depend on which (odd block counts too)."""
    qweight, scale = official(out, in_features, seed=6)
    packed = layout.PackedInt4.from_official(qweight, scale)
    bias = torch.randn(out, generator=torch.Generator().manual_seed(7))
    x = (torch.randn(12, in_features, generator=torch.Generator().manual_seed(8)) * 2).to(dtype)
    x[5, 3] = 300.0  # an outlier in the second token group
    alone = torch.cat([ops.int4_linear(x[i : i + 1], packed, bias) for i in range(12)])
    for tokens in range(2, 13):
        assert torch.equal(ops.int4_linear(x[:tokens], packed, bias), alone[:tokens]), tokens


def test_packing_round_trips_exactly() -> None:
    qweight, scale = official(70, 300)
    packed = layout.PackedInt4.from_official(qweight, scale)
    full = dequantized(qweight, scale)

    assert (packed.out_features, packed.in_features, packed.padded_in) == (70, 300, 320)
    assert torch.equal(packed.dequantize(), full)
    assert torch.equal(packed.dequantize(33, 66), full[33:66])


@pytest.mark.usefixtures("kernel")
@pytest.mark.parametrize(("out", "in_features"), [(70, 300), (64, 256), (3, 2)])
def test_compiled_packing_equals_the_torch_packing(out: int, in_features: int) -> None:
    qweight, _ = official(out, in_features)
    assert torch.equal(build.kernel().pack_official(qweight), layout.pack_python(qweight))


def test_official_quantization_packs_into_the_kernel_layout_exactly() -> None:
    weight = torch.randn(40, 256).half()
    weight[3] = 0  # an all-zero row must not divide by zero

    packed = layout.PackedInt4.from_official(*int4.quantize(weight))

    # chatglm2's quantize(): fp16 arithmetic throughout.
    scale = weight.abs().max(dim=-1).values / 7
    q = torch.round(weight / scale[:, None]).nan_to_num(0).float()
    assert torch.equal(packed.dequantize(), q * scale.float()[:, None])
    assert (packed.dequantize() - weight.float()).abs().le(scale.float()[:, None] / 2 + 1e-3).all()


def test_bad_inputs_are_rejected() -> None:
    qweight, scale = official(32, 128)
    packed = layout.PackedInt4.from_official(qweight, scale)
    with pytest.raises(ValueError, match="int8"):
        layout.PackedInt4.from_official(qweight.view(torch.uint8), scale)
    with pytest.raises(ValueError, match="scale"):
        layout.PackedInt4.from_official(qweight, scale[:10])
    with pytest.raises(ValueError, match="128 features"):
        ops.int4_linear(torch.randn(2, 100), packed)
    with pytest.raises(TypeError, match="float32 or bfloat16"):
        ops.int4_linear(torch.randn(2, 128).half(), packed)
    with pytest.raises(ValueError, match="bias"):
        ops.int4_linear(torch.randn(2, 128), packed, torch.zeros(31))


@pytest.mark.usefixtures("kernel")
def test_second_process_loads_the_cached_build() -> None:
    library = Path(build.kernel().__file__)  # <cache dir>/int4_native-<key>/<name>.so, whoever built it
    mtime = library.stat().st_mtime_ns
    script = (
        "import logging, sys; from pathlib import Path; logging.basicConfig(level=logging.INFO);"
        "from bot.model.kernels import build; build.configure(cache_dir=Path(sys.argv[1]));"
        "assert build.available(), build.backend_name()"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(library.parent.parent)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == 0, done.stderr
    isa = build.kernel().isa
    assert f"int4 matmul kernel: native {isa} (loaded from cache, {library.parent})" in done.stderr
    assert library.stat().st_mtime_ns == mtime


def test_a_kernel_that_fails_its_self_test_is_not_used() -> None:
    class Broken:
        def pack_official(self, qweight: torch.Tensor) -> torch.Tensor:
            return layout.pack_python(qweight)

        def int4_linear(self, x: torch.Tensor, *_: object) -> torch.Tensor:
            return torch.zeros(x.shape[0], 40)

    with pytest.raises(build.Unavailable, match="self-test failed"):
        build._self_test(Broken())
