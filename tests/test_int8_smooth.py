"""`--precision int8-smooth` (rine.model.smooth): the tolerant int8 mix against fp32 with a
sensitive head on an encoder whose LayerNorms have outlier channels (as real CLIP's do),
the broken variant that smooths the weights but not the activations, and `auto`'s choice."""

from __future__ import annotations

import copy

import pytest
import torch

from rine.config import HeadConfig
from rine.model import accel, quant, smooth
from rine.model.accel import FastTapEncoder, resolve_precision
from rine.model.head import RINEHead

from support.int8_models import outlier_backbone

needs_int8 = pytest.mark.skipif(
    quant.int8_unavailable(torch.device("cpu")) is not None,
    reason=f"this CPU does not run int8: {quant.int8_unavailable(torch.device('cpu'))}",
)

LAYERS, WIDTH = 6, 128
OUTLIER_CHANNELS, OUTLIER = [5, 40], 20.0
MAX_DP, MEAN_DP = 0.02, 0.002  # the project's tolerance for a fast mode (official head, ViT-L/14)
# This head (logit std 3) amplifies tap errors more than the official one: bf16 itself has a
# mean |dp| of 0.0036 here (0.0016 with the official head on the benchmark). The mean is
# held relative to bf16's, the mode auto ran before, at the same sensitivity; the max
# absolutely. (The absolute mean on the official head: tests/test_precision.py, slow.)
MEAN_VS_BF16 = 1.5


@pytest.fixture(scope="module")
def outliers():
    """(backbone, images, fp32 taps, a head whose fp32 logits have std 3 on the images)."""
    backbone = outlier_backbone(LAYERS, WIDTH, OUTLIER_CHANNELS, OUTLIER)
    pixels = smooth.calibration_pixels(24, seed=7)  # not the calibration's images (seed 0)
    exact = FastTapEncoder(backbone, "fp32")(pixels)
    torch.manual_seed(0)
    head = RINEHead(HeadConfig(in_dim=WIDTH, n_blocks=LAYERS, nproj=2, proj_dim=32)).eval()
    with torch.no_grad():
        logits = head(exact).logits
        last = head.head[-1]
        last.weight.mul_(3.0 / logits.std())
        last.bias.sub_(logits.mean()).mul_(3.0 / logits.std())
    return backbone, pixels, exact, head


def _dp(head, taps: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return (torch.sigmoid(head(taps).logits) - torch.sigmoid(head(exact).logits)).abs()


@needs_int8
def test_int8_smooth_within_tolerance_on_a_sensitive_head(outliers):
    backbone, pixels, exact, head = outliers
    with torch.no_grad():
        ref = head(exact).logits
    assert ref.std() > 2.5 and ref.max() - ref.min() > 8  # logits span several units across images
    encoder = FastTapEncoder(backbone, "int8-smooth")
    plan = smooth.PLANS["int8-smooth"]
    assert any(isinstance(g, quant.Int8Linear) for block in encoder.blocks for g in block)  # int8 really runs
    assert {f"{i}.{g}" for i in range(plan.first_int8(LAYERS), LAYERS) for g in ("qkv", "fc1")} <= set(encoder.smoothed)
    dp = _dp(head, encoder(pixels), exact)
    bf16 = _dp(head, FastTapEncoder(backbone, "bf16")(pixels), exact)
    print(f"int8-smooth max |dp| {dp.max():.4f} mean {dp.mean():.5f}; bf16 {bf16.max():.4f} / {bf16.mean():.5f}")
    assert dp.max() <= MAX_DP and dp.mean() <= MEAN_VS_BF16 * bf16.mean()  # measured 0.0148, 1.02x
    assert dp.mean() > bf16.mean()  # int8 ran: coarser than bf16 alone
    # Without smoothing the same mix is several times worse on these outlier channels.
    smooth.PLANS["unsmoothed"] = smooth.Int8Plan(gemms=plan.gemms, kept_share=plan.kept_share, static=plan.static)
    try:
        plain = _dp(head, FastTapEncoder(backbone, "unsmoothed")(pixels), exact)
    finally:
        del smooth.PLANS["unsmoothed"]
    print(f"unsmoothed: max |dp| {plain.max():.4f} mean {plain.mean():.5f}")
    assert plain.mean() > 2 * dp.mean(), (plain.mean(), dp.mean())


@needs_int8
def test_smoothing_the_weights_but_not_the_activations_is_caught(outliers, monkeypatch):
    """Broken variant: W * s folded into the GEMM but the LayerNorm left as it is (x, not
    x / s, reaches it): the checks above must fail."""
    backbone, pixels, exact, head = outliers
    monkeypatch.setattr(smooth, "smoothed_layernorm", lambda norm, s: copy.deepcopy(norm))
    encoder = FastTapEncoder(backbone, "int8-smooth")
    assert encoder.smoothed  # the weights were smoothed
    dp = _dp(head, encoder(pixels), exact)
    bf16 = _dp(head, FastTapEncoder(backbone, "bf16")(pixels), exact)
    print(f"broken: max |dp| {dp.max():.4f} mean {dp.mean():.5f}")
    assert dp.max() > MAX_DP and dp.mean() > 5 * MEAN_VS_BF16 * bf16.mean()


@needs_int8
def test_int8_smooth_keeps_the_first_blocks_out_of_int8(outliers):
    backbone = outliers[0]
    encoder = FastTapEncoder(backbone, "int8-smooth")
    first = smooth.PLANS["int8-smooth"].first_int8(LAYERS)
    assert 0 < first < LAYERS
    for i, block in enumerate(encoder.blocks):
        assert all(isinstance(g, quant.Int8Linear) == (i >= first) for g in block), i


def test_smoothing_scales_balance_activation_and_weight_ranges():
    act_max = torch.tensor([1.0, 100.0, 0.0])
    weight = torch.tensor([[0.5, 0.01, 0.2], [-0.25, 0.04, 0.1]])
    s = smooth.smoothing_scales(act_max, weight, 0.5)
    # s_j = sqrt(max|x_j| / max|W_j|); a channel that never fires keeps 1
    torch.testing.assert_close(s, torch.tensor([(1.0 / 0.5) ** 0.5, (100.0 / 0.04) ** 0.5, 1.0]))
    # after smoothing both ranges are equal per channel: max|x_j| / s_j == max|W_j| * s_j
    torch.testing.assert_close((act_max / s)[:2], (weight.abs().amax(0) * s)[:2])


def test_auto_picks_int8_smooth_where_int8_runs(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(accel, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(quant, "int8_unavailable", lambda device: None)
    assert resolve_precision("auto", cpu) == "int8-smooth"
    assert resolve_precision("int8", cpu) == "int8"  # the fast, loose mode stays explicit
    assert resolve_precision("bf16", cpu) == "bf16" and resolve_precision("fp32", cpu) == "fp32"
    monkeypatch.setattr(quant, "int8_unavailable", lambda device: "no VNNI")
    assert resolve_precision("auto", cpu) == "bf16"
    with pytest.raises(ValueError, match="int8-smooth is not available here: no VNNI"):
        resolve_precision("int8-smooth", cpu)
    assert resolve_precision("auto", torch.device("cuda")) == "fp16"


@needs_int8
def test_int8_smooth_scores_do_not_depend_on_the_batch(outliers):
    """Static input ranges (fixed at load): an image's taps are the same alone and among
    others, unlike plain int8, whose ranges are the batch's."""
    backbone, pixels, _, _ = outliers
    for precision, same in (("int8-smooth", True), ("int8", False)):
        encoder = FastTapEncoder(backbone, precision)
        alone, among = encoder(pixels[:1]), encoder(pixels[:8])[:1]
        diff = float((alone - among).abs().max() / among.abs().max())
        assert (diff < 1e-5) == same, (precision, diff)


@needs_int8
def test_an_image_beyond_the_static_range_gets_its_own_not_clipped():
    """Static ranges come from synthetic calibration images: a real image can go beyond them.
    Clipping would cut its large inputs to the range's end (here 10 -> 1.25); instead that
    image alone is quantized with its own range, and the others keep the static result
    bit for bit (so batch independence holds)."""
    torch.manual_seed(0)
    weight, bias = torch.randn(64, 32) * 0.1, torch.randn(64) * 0.1
    lin = quant.Int8Linear(weight, bias, act_range=(-1.25, 1.25))
    x = torch.rand(3, 17, 32) * 2 - 1  # within the range
    x[1, 4, 7], x[2, 0, 3] = 10.0, -10.0  # two images with one large input each, one per end
    exact = x @ weight.T + bias
    out = lin(x)
    err = (out - exact).abs().amax(dim=(1, 2))
    assert err[1] < 0.05 and err[2] < 0.05, err  # clipped: about (10 - 1.25) * |w| ~ 0.9
    assert lin.beyond == 2
    assert torch.equal(out[0], lin(x[:1])[0])
    acc = torch.zeros(3, 17, 64)
    lin.add_to(x, acc)  # the residual path (oneDNN's fused sum) does the same
    torch.testing.assert_close(acc, out, rtol=0, atol=1e-6)

    clipping = quant.Int8Linear(weight, bias, act_range=(-1.25, 1.25))
    clipping._beyond = lambda xq, zp: []  # the broken variant: clip
    assert (clipping(x)[1:] - exact[1:]).abs().amax(dim=(1, 2)).min() > 0.3
