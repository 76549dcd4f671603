"""`--precision int8` (rine.model.quant): the int8 encoder against an independent float
emulation of the same quantization and against fp32 with a sensitive head, refusal where
it cannot run, and `resolve_precision`."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rine.cli import main
from rine.inference.detector import Detector
from rine.model import accel, quant
from rine.model.accel import FastTapEncoder, resolve_precision

from conftest import write_image

needs_int8 = pytest.mark.skipif(
    quant.int8_unavailable(torch.device("cpu")) is not None,
    reason=f"this CPU does not run int8: {quant.int8_unavailable(torch.device('cpu'))}",
)


def _images(n: int = 24, seed: int = 0) -> torch.Tensor:
    """Normalised-pixel-like inputs [n, 3, 224, 224] that differ in structure (smooth fields at
    several scales plus noise), so that the taps, and a head's logits, vary across images."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        size = 2 + (i % 6) * 6
        field = F.interpolate(torch.randn(1, 3, size, size, generator=g), size=224, mode="bilinear", align_corners=False)
        out.append(1.5 * field + (0.2 + 0.1 * (i % 4)) * torch.randn(1, 3, 224, 224, generator=g))
    return torch.cat(out)


def _fake_int8_weight(w: torch.Tensor) -> torch.Tensor:
    scale = w.abs().amax(dim=1, keepdim=True) / 127
    return torch.round(w / scale).clamp(-127, 127) * scale


def _fake_uint8(x: torch.Tensor) -> torch.Tensor:
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zp = round(-lo / scale)
    # Rounded in float64, which gives fbgemm's ties: attention outputs are bf16 values, many
    # of them exactly half a step apart (float32's x * (1 / scale) disagreed on 150 of 77k).
    return torch.round(x.double() / scale + zp).clamp(0, 255).sub(zp).float() * scale


@torch.no_grad()
def _emulated_int8_taps(backbone, pixels: torch.Tensor, encoder: FastTapEncoder) -> tuple[torch.Tensor, float]:
    """The int8 encoder written out in float32 from the HF modules, independently of
    rine.model.quant: weights rounded to int8 per output channel, every GEMM input to uint8
    over the whole batch; q/k/v rounded to bf16 where the encoder's attention runs in bf16.

    -> (taps [N, blocks, width], the largest relative difference between each of the
    encoder's int8 GEMMs and its emulation, both fed the emulation's activations). Whole
    taps can only match in the first block: a 1e-5 difference flips the rounding of a few
    activations, and each flip is a whole quantization step, so differences grow by about
    10x a block; fed the same inputs, each GEMM must match to float32 rounding and ties."""
    clip = backbone.clip
    hidden = clip.pre_layrnorm(clip.embeddings(pixels))
    b, t, d = hidden.shape
    heads = clip.config.num_attention_heads
    bf16_attention = not encoder.attn_fp32
    worst = 0.0

    def lin(x, m):
        return F.linear(_fake_uint8(x), _fake_int8_weight(m.weight), m.bias)

    def check(got, want):
        nonlocal worst
        worst = max(worst, float((got.float() - want).norm() / want.norm()))

    taps = []
    for i, layer in enumerate(clip.encoder.layers):
        a = layer.self_attn
        qkv_lin, out_lin, fc1, fc2 = encoder.blocks[i]
        y = layer.layer_norm1(hidden)
        qkv = [lin(y, m) for m in (a.q_proj, a.k_proj, a.v_proj)]
        if bf16_attention:
            qkv = [z.bfloat16() for z in qkv]
        check(qkv_lin(y), torch.cat(qkv, dim=-1).float())
        q, k, v = (z.view(b, t, heads, -1).transpose(1, 2) for z in qkv)
        o = F.scaled_dot_product_attention(q, k, v, scale=(d // heads) ** -0.5).transpose(1, 2).reshape(b, t, d).float()
        update = lin(o, a.out_proj)
        check(out_lin.add_to(o, hidden.clone()) - hidden, update)
        hidden = hidden + update
        normed = layer.layer_norm2(hidden)
        taps.append(normed[:, 0])
        if i + 1 < len(clip.encoder.layers):
            z = lin(normed, layer.mlp.fc1)
            act = z * torch.sigmoid(1.702 * z)
            check(fc1(normed) / 1.702, act)  # fc1 is folded: swish(1.702 z) = 1.702 quick_gelu(z)
            update = lin(act, layer.mlp.fc2)
            check(fc2.add_to(act * 1.702, hidden.clone()) - hidden, update)
            hidden = hidden + update
    return torch.stack(taps, dim=1), worst


def _close_to_fp32(logits: torch.Tensor, ref: torch.Tensor) -> bool:
    """The int8 bound on the tiny model with the std-3 head below: rms logit error under
    0.35 (measured 0.22; bf16 0.064) and no probability off by 0.15 (measured 0.09)."""
    dp = (torch.sigmoid(logits) - torch.sigmoid(ref)).abs()
    return bool((logits - ref).pow(2).mean().sqrt() < 0.35 and dp.max() < 0.15)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images and blocks of |a - b| / |b| per tap vector."""
    return float(((a - b).norm(dim=-1) / b.norm(dim=-1)).mean())


@pytest.fixture(scope="module")
def sensitive(tiny_detector):
    """(backbone, images, fp32 taps, a head whose fp32 logits have std 3 on the images)."""
    backbone = tiny_detector.model.backbone
    pixels = _images()
    exact = FastTapEncoder(backbone, "fp32")(pixels)
    head = copy.deepcopy(tiny_detector.model.head).eval()
    with torch.no_grad():
        logits = head(exact).logits
        last = head.head[-1]
        last.weight.mul_(3.0 / logits.std())
        last.bias.sub_(logits.mean()).mul_(3.0 / logits.std())
    return backbone, pixels, exact, head


@needs_int8
def test_int8_encoder_matches_an_independent_emulation(sensitive):
    backbone, pixels, exact, _ = sensitive
    encoder = FastTapEncoder(backbone, "int8")
    taps = encoder(pixels)
    assert taps.dtype == torch.float32 and taps.shape == exact.shape
    emulated, gemm_diff = _emulated_int8_taps(backbone, pixels, encoder)
    error = _rel(taps, exact)
    assert 3e-3 < error < 0.05  # the int8 error itself: percent-level
    # Each int8 GEMM matches its emulation to float32 rounding (measured <= 1.2e-4; a scale off
    # by 1/127 would give 8e-3); the first block's taps,
    # computed from the same pixels, 20x closer than int8 is to fp32 (measured 45x).
    assert gemm_diff < 1e-3
    assert _rel(taps[:, 0], emulated[:, 0]) < _rel(taps[:, 0], exact[:, 0]) / 20


@needs_int8
def test_int8_probabilities_close_to_fp32_with_a_sensitive_head(sensitive):
    backbone, pixels, exact, head = sensitive
    ref = head(exact).logits
    assert ref.std() > 2.5 and ref.max() - ref.min() > 8  # logits span several units across images
    p_ref = torch.sigmoid(ref)
    assert (p_ref < 0.1).sum() >= 3 and (p_ref > 0.9).sum() >= 3 and ((p_ref - 0.5).abs() < 0.3).sum() >= 3
    int8 = head(FastTapEncoder(backbone, "int8")(pixels)).logits
    bf16 = head(FastTapEncoder(backbone, "bf16")(pixels)).logits
    assert _close_to_fp32(int8, ref) and _close_to_fp32(bf16, ref)
    assert (int8 - ref).abs().mean() > 1.5 * (bf16 - ref).abs().mean()  # int8 really ran: coarser than bf16


@needs_int8
def test_the_closeness_check_fails_with_a_broken_weight_scale(sensitive, monkeypatch):
    """Negative control: weights dequantized 4 % too large (a wrong scale) must fail the checks above."""
    backbone, pixels, exact, head = sensitive
    good = quant.quantize_weight

    def broken(weight):
        q, scale = good(weight)
        return q, scale * 1.04

    monkeypatch.setattr(quant, "quantize_weight", broken)
    encoder = FastTapEncoder(backbone, "int8")
    taps = encoder(pixels)
    emulated, gemm_diff = _emulated_int8_taps(backbone, pixels, encoder)
    assert gemm_diff > 1e-3
    assert _rel(taps[:, 0], emulated[:, 0]) > _rel(taps[:, 0], exact[:, 0]) / 20
    assert not _close_to_fp32(head(taps).logits, head(exact).logits)  # rms dlogit 0.67


@needs_int8
def test_int8_detector_end_to_end(tiny_checkpoint_dir, tmp_path, capsys):
    images = [write_image(tmp_path / f"{i}.png", size=(240 + 16 * i, 256), seed=i) for i in range(3)]
    det = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="int8", keep_reference=False)
    ref = Detector.from_pretrained(str(tiny_checkpoint_dir), precision="fp32")
    assert det.precision == "int8" and isinstance(det.encoder.blocks[0][0], quant.Int8Linear)
    got = np.array([p.prob_fake for p in det.predict(images)])
    want = np.array([p.prob_fake for p in ref.predict(images)])
    assert np.abs(got - want).max() < 0.05 and not np.array_equal(got, want)
    assert main(["detect", *map(str, images), "--model", str(tiny_checkpoint_dir), "--precision", "int8", "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("\n") == 4  # header + 3 rows


def test_int8_is_a_precision_but_never_auto(monkeypatch):
    monkeypatch.setattr(quant, "cpu_int8_isa", lambda: "amx_int8")
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: True)
    cpu = torch.device("cpu")
    assert "int8" in accel.PRECISIONS
    assert resolve_precision("int8", cpu) == "int8"
    assert resolve_precision("auto", cpu) == "int8-smooth"  # plain int8 is outside the tolerance: explicit only
    monkeypatch.setattr(quant, "cpu_int8_isa", lambda: None)
    assert resolve_precision("auto", cpu) == "bf16"
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", cpu) == "fp32"


@pytest.mark.parametrize("flags, isa", [({"avx2", "avx512f", "avx512_bf16"}, None), ({"avx2", "avx_vnni"}, "avx_vnni"),
                                        ({"avx512_vnni", "amx_int8"}, "amx_int8")])
def test_int8_isa_from_cpu_flags(monkeypatch, flags, isa):
    monkeypatch.setattr(quant, "_cpu_flags", lambda: flags)
    quant.cpu_int8_isa.cache_clear()
    try:
        assert quant.cpu_int8_isa() == isa
    finally:
        quant.cpu_int8_isa.cache_clear()


def test_int8_refused_on_a_cpu_without_vnni(monkeypatch, tiny_detector, tiny_checkpoint_dir, tmp_path, capsys):
    monkeypatch.setattr(quant, "cpu_int8_isa", lambda: None)
    with pytest.raises(ValueError, match="VNNI.*AMX-INT8"):
        resolve_precision("int8", torch.device("cpu"))
    with pytest.raises(ValueError, match="VNNI"):
        FastTapEncoder(tiny_detector.model.backbone, "int8")
    with pytest.raises(ValueError, match="int8 is not available here"):
        Detector.from_pretrained(str(tiny_checkpoint_dir), precision="int8")
    image = write_image(tmp_path / "a.png")
    assert main(["detect", str(image), "--model", str(tiny_checkpoint_dir), "--precision", "int8"]) == 2
    err = capsys.readouterr().err
    assert "int8" in err and "VNNI" in err and "Traceback" not in err


def test_int8_refused_on_cuda_with_a_reason():
    with pytest.raises(ValueError, match="CPUs only.*fp16"):
        resolve_precision("int8", torch.device("cuda"))


def test_int8_refuses_compile(tiny_detector):
    if quant.int8_unavailable(torch.device("cpu")):
        pytest.skip("no int8 on this CPU")
    with pytest.raises(ValueError, match="--compile"):
        FastTapEncoder(tiny_detector.model.backbone, "int8", compile=True)
    with pytest.raises(ValueError, match="--compile does not apply to --precision int8"):
        Detector(tiny_detector.model, tiny_detector.config, precision="int8", compile=True)


def test_weight_quantization_is_per_output_channel():
    w = torch.randn(8, 32, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 1, 8)[:, None]
    q, scale = quant.quantize_weight(w)
    assert q.dtype == torch.int8 and scale.shape == (8,)
    assert (q.abs().amax(dim=1) == 127).all()  # every row uses the full range, whatever its size
    err = (q.float() * scale[:, None] - w).abs()
    assert (err <= scale[:, None] / 2 + 1e-12).all()
    assert quant.activation_qparams(torch.tensor([0.5, 2.0])) == (pytest.approx(2.0 / 255), 0)  # 0 included
    with pytest.raises(ValueError, match="not finite"):
        quant.activation_qparams(torch.tensor([0.0, float("nan")]))
