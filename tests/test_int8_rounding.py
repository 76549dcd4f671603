"""The int8 mode's activation rounding (rine.model.quant.round_to_uint8) against fbgemm's
`torch.quantize_per_tensor(...).int_repr()`, bit for bit, and the one CPU-flags probe
(rine.model.cpu_features) that accel and quant share."""

from __future__ import annotations

import warnings

import pytest
import torch

from rine.model import accel, cpu_features, quant
from rine.model.quant import round_to_uint8

has_fbgemm_rounding = pytest.mark.skipif(
    not hasattr(torch, "quantize_per_tensor"), reason="this PyTorch no longer has quantize_per_tensor"
)
# (scale, zero point): a power of two (its ties are exact: x = (k + 0.5) * scale), odd zero
# points (where adding the zero point before or after the integer rounding differ), fbgemm's
# own product-versus-quotient example, and scales as activation_qparams makes them.
QPARAMS = [(0.25, 3), (2.0**-7, 128), (0.00214854861, 0), (8 / 255, 127), (0.0371153, 77), (3.1e-5, 255)]


def _fbgemm(x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated in 2.13
        return torch.quantize_per_tensor(x, scale, zp, torch.quint8).int_repr()


def _inv(scale: float) -> float:
    return float(torch.tensor(scale, dtype=torch.float32).reciprocal())


def _hard_inputs(scale: float, zp: int, n: int = 4099, seed: int = 0) -> torch.Tensor:
    """x float32 [n] (odd n: a vector kernel's tail too) around every rounding boundary:
    exact ties of x / scale + zp, values a few float32 steps beside them, values below 0
    and above 255 once quantized, uniform values across the range, +-inf and +-1e30."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(-40, 300, (n,), generator=g).double()
    ties = ((k + 0.5 - zp) * scale).float()  # exact ties where the scale is a power of two
    near = ((k + 0.5 - zp) / _inv(scale)).float()  # ties of x * (1/scale) + zp, up to one step
    for step in range(3):
        towards = torch.where(torch.rand(n, generator=g) < 0.5, -torch.inf, torch.inf)
        moved = torch.nextafter(near, towards)
        near = torch.where(torch.rand(n, generator=g) < 0.5, moved, near) if step else moved
    uniform = ((torch.rand(n, generator=g) * 400 - 70 - zp) * scale).float()
    extremes = torch.tensor([torch.inf, -torch.inf, 1e30, -1e30, 0.0, -0.0])
    x = torch.cat([ties, near, ((k + 0.5 - zp) / _inv(scale)).float(), uniform, extremes])
    return x[torch.randperm(len(x), generator=g)]


@has_fbgemm_rounding
@pytest.mark.parametrize("scale, zp", QPARAMS)
def test_round_to_uint8_equals_fbgemm_bit_for_bit(scale, zp):
    x = _hard_inputs(scale, zp)
    t = x.double() * _inv(scale) + zp  # exact: a float32 product has at most 48 bits
    # the inputs reach every case: saturation on both sides and (near-)ties in range
    assert (t < -0.5).sum() > 500 and (t > 255.5).sum() > 500
    in_range = (t > 0) & (t < 255)
    assert ((t - t.floor() - 0.5).abs()[in_range] < 1e-3).sum() > 1000
    expected = _fbgemm(x, scale, zp)
    got = round_to_uint8(x, scale, zp)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, expected), f"{int((got != expected).sum())} of {len(x)} values differ"
    # 2-D, as the encoder calls it ([images x tokens, width])
    x2 = x[:4096].reshape(64, 64)
    assert torch.equal(round_to_uint8(x2, scale, zp), _fbgemm(x2, scale, zp))


def _broken(variant: str, x: torch.Tensor, scale: float, zp: int) -> torch.Tensor:
    inv = _inv(scale)
    t = torch.add(torch.tensor(float(zp)), x, alpha=inv)
    if variant == "floor":
        return t.floor().clamp(0, 255).to(torch.uint8)
    if variant == "half away from zero":
        return (t.abs() + 0.5).floor().copysign(t).clamp(0, 255).to(torch.uint8)
    if variant == "no clamp":
        return t.round().clamp(-(2.0**31), 2.0**31 - 128).to(torch.int32).to(torch.uint8)  # wraps
    if variant == "divide by scale":
        return torch.round(x / scale + zp).clamp(0, 255).to(torch.uint8)
    if variant == "zero point after rounding":
        return torch.round(x * inv).add(zp).clamp(0, 255).to(torch.uint8)
    if variant == "product rounded first":
        return torch.round(x * inv + zp).clamp(0, 255).to(torch.uint8)
    raise AssertionError(variant)


@has_fbgemm_rounding
@pytest.mark.parametrize(
    "variant, qparams",
    [("floor", (0.25, 3)), ("half away from zero", (0.25, 4)), ("no clamp", (0.25, 3)),
     ("divide by scale", (0.00214854861, 0)), ("zero point after rounding", (0.25, 3)),
     ("product rounded first", (0.0371153, 77))],
)
def test_the_inputs_catch_nearly_right_roundings(variant, qparams):
    """Each broken rounding differs from fbgemm's on the inputs above: the equality test
    would fail for it (so it could not pass by the inputs being too easy)."""
    scale, zp = qparams
    x = _hard_inputs(scale, zp)
    assert not torch.equal(_broken(variant, x, scale, zp), _fbgemm(x, scale, zp))


def test_quantize_activation_uses_the_tensor_ops_where_fbgemm_is_gone(monkeypatch):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(257, 96, generator=g) * 3 + 0.5
    quant.rounding_kernel.cache_clear()
    try:
        with_fbgemm = quant.quantize_activation(x)
        monkeypatch.delattr(torch, "quantize_per_tensor")
        quant.rounding_kernel.cache_clear()
        assert quant.rounding_kernel() is round_to_uint8
        without = quant.quantize_activation(x)
    finally:
        quant.rounding_kernel.cache_clear()
    assert with_fbgemm[1:] == without[1:]
    assert torch.equal(with_fbgemm[0], without[0])
    q, scale, zp = without
    assert q.dtype == torch.uint8 and q.min() == 0 and q.max() == 255  # the range fills [0, 255]
    torch.testing.assert_close((q.float() - zp) * scale, x, atol=scale / 2 + 1e-6, rtol=0)


@pytest.mark.skipif(quant.int8_unavailable(torch.device("cpu")) is not None, reason="this CPU does not run int8")
def test_int8_gemm_is_unchanged_by_the_rounding_kernel(monkeypatch):
    g = torch.Generator().manual_seed(2)
    w, b, x = torch.randn(48, 96, generator=g) * 0.05, torch.randn(48, generator=g), torch.randn(2 * 257, 96, generator=g)
    acc = torch.randn(2 * 257, 48, generator=g)
    mlp, out = quant.Int8Linear(w, b, post="swish"), quant.Int8Linear(w, b)
    assert quant.rounding_kernel() is not round_to_uint8  # fbgemm's, while PyTorch has it
    expected, expected_sum = mlp(x), out.add_to(x, acc.clone())
    monkeypatch.setattr(quant, "rounding_kernel", lambda: round_to_uint8)
    assert torch.equal(mlp(x), expected)
    assert torch.equal(out.add_to(x, acc.clone()), expected_sum)  # the fused residual add


def test_accel_and_quant_share_one_cpu_flags_probe():
    assert accel._cpu_flags is quant._cpu_flags is cpu_features.cpu_flags


def test_cpu_flags_join_torch_probe_and_proc_cpuinfo(monkeypatch, tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512_vnni\nbugs\t\t: spectre\n", encoding="ascii")
    real_open = open
    monkeypatch.setattr(cpu_features, "open", lambda path, *a, **k: real_open(cpuinfo, *a, **k), raising=False)
    probe = {"amx_int8": True, "avx512_bf16": False, "l2_cache_size": 2097152, "cpu_name": "x"}
    monkeypatch.setattr(torch._C._cpu, "_get_cpu_capability", lambda: probe)
    assert cpu_features.cpu_flags() == {"fpu", "avx2", "avx512_vnni", "amx_int8"}

    def no_file(*a, **k):
        raise OSError("no /proc here")

    monkeypatch.setattr(cpu_features, "open", no_file, raising=False)
    assert cpu_features.cpu_flags() == {"amx_int8"}  # e.g. macOS or Windows: the probe alone
    monkeypatch.delattr(torch._C._cpu, "_get_cpu_capability")
    assert cpu_features.cpu_flags() == set()
