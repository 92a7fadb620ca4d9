"""AionResidual: closed form, parity with aion-torch, eval semantics, presets, preserving start."""

from __future__ import annotations

import math

import aion_torch
import pytest
import torch

from surgeon.nn import AionResidual


def batch(d: int = 16, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(3, 5, d, dtype=dtype) for _ in range(3))  # x, y, x_norm


def closed_form_ratio(y: torch.Tensor, x_in: torch.Tensor, eps: float = 1e-8) -> float:
    ey = (y.double() ** 2).mean(-1)
    ex = (x_in.double() ** 2).mean(-1)
    return float((ey / (ex + eps)).mean())


def test_training_forward_matches_closed_form() -> None:
    x, y, xn = batch()
    m = AionResidual(alpha0=0.3, beta=0.2, ema_gamma=0.9)
    out = m(x, y, xn)
    r = closed_form_ratio(y, xn)
    r_s = 0.9 * 1.0 + 0.1 * r
    alpha = 0.3 / (1 + 0.2 * r_s)
    torch.testing.assert_close(out, x + alpha * y, rtol=1e-6, atol=1e-6)
    assert m.ratio_ema.item() == pytest.approx(r_s, rel=1e-6)


def test_ratio_uses_x_when_no_x_norm() -> None:
    x, y, _ = batch()
    m = AionResidual(ema_gamma=0.0)
    m(x, y)
    assert m.ratio_ema.item() == pytest.approx(closed_form_ratio(y, x), rel=1e-6)


@pytest.mark.parametrize("use_x_norm", [True, False])
@pytest.mark.parametrize("gamma", [0.99, 0.5, 1.0])
def test_parity_with_aion_torch(use_x_norm: bool, gamma: float) -> None:
    """Same parameters, same inputs: same outputs, EMAs and gradients over several steps."""
    ours = AionResidual(alpha0=0.2, beta=0.1, ema_gamma=gamma)
    theirs = aion_torch.AionResidual(alpha0=0.2, beta=0.1, ema_gamma=gamma)
    for _ in range(4):
        x, y, xn = (t.requires_grad_() for t in batch())
        args = (x, y, xn) if use_x_norm else (x, y)
        out_ours, out_theirs = ours(*args), theirs(*args)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-6, atol=1e-7)
        g_ours = torch.autograd.grad(out_ours.square().sum(), [ours.alpha0, ours.beta, x, y])
        g_theirs = torch.autograd.grad(
            out_theirs.square().sum(), [theirs.alpha0, theirs.beta, x, y]
        )
        for a, b in zip(g_ours, g_theirs):  # our scalars are (1,), aion-torch's 0-dim
            torch.testing.assert_close(a, b.reshape(a.shape), rtol=1e-5, atol=1e-6)
        if gamma < 1.0:  # aion-torch leaves the EMA untouched without smoothing
            torch.testing.assert_close(ours.ratio_ema, theirs.ratio_ema)
    ours.eval(), theirs.eval()
    x, y, _ = batch()
    torch.testing.assert_close(ours(x, y), theirs(x, y), rtol=1e-6, atol=1e-7)


def test_same_constructor_validation_and_state_dict_as_aion_torch() -> None:
    for bad in ({"alpha0": 0.0}, {"beta": -1.0}, {"ema_gamma": 1.5}, {"epsilon": 0.0}):
        with pytest.raises(ValueError):
            aion_torch.AionResidual(**bad)
        with pytest.raises(ValueError):
            AionResidual(**bad)
    ours, theirs = AionResidual(alpha0=0.3), aion_torch.AionResidual(alpha0=0.7, beta=0.3)
    assert list(ours.state_dict()) == list(theirs.state_dict()) == [
        "alpha0", "beta", "ratio_ema", "step_count", "alpha_cached"]
    assert {k: v.dtype for k, v in ours.state_dict().items()} == {
        k: v.dtype for k, v in theirs.state_dict().items()}
    x, y, xn = batch()
    theirs(x, y, xn), theirs(x, y, xn)  # two training steps move its records
    loaded = AionResidual()
    loaded.load_state_dict(theirs.state_dict())  # strictly: its 0-dim scalars become (1,)
    for key, value in theirs.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value.reshape(getattr(loaded, key).shape)), key
    assert {k: tuple(v.shape) for k, v in loaded.state_dict().items()} == {
        "alpha0": (1,), "beta": (1,), "ratio_ema": (), "step_count": (), "alpha_cached": (1,)}
    assert loaded.step_count.item() == 2
    back = aion_torch.AionResidual()  # strictly, once our (1,) scalars are made 0-dim
    back.load_state_dict({k: v.reshape(()) for k, v in ours.state_dict().items()})
    assert back.alpha0.item() == pytest.approx(0.3) and back.alpha_cached.item() == (
        pytest.approx(0.3))


def test_records_move_like_aion_torch_in_training_and_stay_in_eval() -> None:
    """`step_count` counts training forwards, `alpha_cached` is the α the forward used."""
    ours = AionResidual(alpha0=0.2, beta=0.1, ema_gamma=0.9)
    theirs = aion_torch.AionResidual(alpha0=0.2, beta=0.1, ema_gamma=0.9)
    assert ours.alpha_cached.item() == pytest.approx(0.2) and ours.step_count.item() == 0
    for _ in range(3):
        x, y, xn = batch()
        ours(x, y, xn), theirs(x, y, xn)
    assert ours.step_count.item() == theirs.step_count.item() == 3
    torch.testing.assert_close(ours.alpha_cached, theirs.alpha_cached.detach().reshape(1))
    ours.eval()
    ours(x, y), ours(x, y)
    assert ours.step_count.item() == 3
    torch.testing.assert_close(ours.alpha_cached, theirs.alpha_cached.detach().reshape(1))
    rezero = AionResidual.from_preset("rezero")
    assert rezero.alpha_cached.item() == 0.0
    rezero(x, y)
    assert rezero.step_count.item() == 1


def test_a_state_dict_without_the_records_loads_strictly() -> None:
    """Older surgeon checkpoints hold only alpha0, beta and ratio_ema: the records are rebuilt
    (α from the loaded values, no updates counted), also into a meta module with assign=True."""
    old = {"alpha0": torch.tensor(0.6), "beta": torch.tensor(0.5), "ratio_ema": torch.tensor(2.0)}
    want = 0.6 / (1 + 0.5 * 2.0)
    for device in ("cpu", "meta"):
        with torch.device(device):
            m = AionResidual()
        m.step_count.fill_(5) if device == "cpu" else None
        m.load_state_dict(old, assign=device == "meta")
        assert not m.alpha_cached.is_meta and not m.step_count.is_meta, device
        assert m.alpha_cached.item() == pytest.approx(want) and m.step_count.item() == 0, device
        assert m.step_count.dtype == torch.int32, device
    with pytest.raises(RuntimeError, match="Missing key.*beta"):  # real parameters still count
        AionResidual().load_state_dict({k: v for k, v in old.items() if k != "beta"})


@pytest.mark.parametrize("x_shape, y_shape, match", [
    ((4, 8), (4, 9), r"Input shapes must match: x.shape=.*4, 8.*, y.shape=.*4, 9"),
    ((4, 8), (1, 8), r"Input shapes must match"),  # no broadcasting, as in aion-torch
    ((0, 8), (4, 8), "Input tensor x cannot be empty"),
    ((4, 8), (4, 0), "Input tensor y cannot be empty"),
    ((0, 8), (0, 8), "Input tensor x cannot be empty"),
])
@pytest.mark.parametrize("training", [True, False])
def test_bad_inputs_give_aion_torchs_value_error(
    x_shape: tuple[int, ...], y_shape: tuple[int, ...], match: str, training: bool
) -> None:
    for cls in (AionResidual, aion_torch.AionResidual):
        m = cls().train(training)
        with pytest.raises(ValueError, match=match):
            m(torch.randn(x_shape), torch.randn(y_shape))


@pytest.mark.parametrize("training", [True, False])
def test_return_stats_like_aion_torch(training: bool) -> None:
    ours = AionResidual(alpha0=0.2, beta=0.1).train(training)
    theirs = aion_torch.AionResidual(alpha0=0.2, beta=0.1).train(training)
    x, y, xn = batch()
    if not training:  # aion-torch's eval needs one training step to hold the same α
        ours.train()(x, y, xn), theirs.train()(x, y, xn)
        ours.eval(), theirs.eval()
    out, stats = ours(x, y, xn, return_stats=True)
    out_t, stats_t = theirs(x, y, xn, return_stats=True)
    torch.testing.assert_close(out, out_t)
    assert list(stats) == ["alpha", "ratio"] and all(type(v) is float for v in stats.values())
    assert stats == pytest.approx(stats_t, rel=1e-6)
    rezero = AionResidual.from_preset("preln").train(training)
    _, stats = rezero(x, y, xn, return_stats=True)
    assert stats["alpha"] == 1.0
    assert stats["ratio"] == pytest.approx(closed_form_ratio(y, xn) if training else 1.0,
                                           rel=1e-6)


def test_extra_repr_starts_like_aion_torchs() -> None:
    theirs = aion_torch.AionResidual(alpha0=0.2, beta=0.1, ema_gamma=0.95).extra_repr()
    ours = AionResidual(alpha0=0.2, beta=0.1, ema_gamma=0.95).extra_repr()
    assert ours == theirs + ", epsilon=1e-08, preset=aion"
    with torch.device("meta"):
        assert AionResidual().extra_repr().startswith("alpha0=?, beta=?, ema_gamma=0.99")


def test_eval_uses_current_parameters_not_a_stale_alpha() -> None:
    """aion-torch's eval reuses the α cached at the last training step; ours recomputes it."""
    m = AionResidual()
    x, y, xn = batch()
    m(x, y, xn)
    with torch.no_grad():
        m.alpha0.fill_(0.5)
    m.eval()
    alpha = 0.5 / (1 + m.beta.item() * m.ratio_ema.item())
    torch.testing.assert_close(m(x, y), x + alpha * y)
    ema = m.ratio_ema.clone()
    m(x, y, xn)
    assert torch.equal(m.ratio_ema, ema), "eval must not move the EMA"


def test_backward_in_eval_after_a_training_step() -> None:
    m = AionResidual()
    x, y, xn = batch()
    m(x, y, xn).sum().backward()
    m.eval()
    out = m(x, y.requires_grad_())
    out.sum().backward()
    out2 = m(x, y)
    out2.sum().backward()  # aion-torch: "backward through the graph a second time"
    assert m.alpha0.grad is not None and torch.isfinite(m.alpha0.grad)


def test_gradient_reaches_y_through_the_batch_ratio() -> None:
    """In training, α depends on this batch's ratio, so ∂out/∂y has a term beyond α."""
    m = AionResidual(alpha0=1.0, beta=1.0, ema_gamma=0.0)
    x, y, _ = batch()
    y.requires_grad_()
    (g,) = torch.autograd.grad(m(x, y).sum(), y)
    alpha = m.alpha0.item() / (1 + m.ratio_ema.item())
    assert not torch.allclose(g, torch.full_like(g, alpha))


def test_energy_in_fp32_under_bf16_autocast() -> None:
    x, y, xn = batch()
    m = AionResidual(ema_gamma=0.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x.bfloat16(), y.bfloat16(), xn.bfloat16())
    assert out.dtype == torch.bfloat16 and m.ratio_ema.dtype == torch.float32
    expected = closed_form_ratio(y.bfloat16().double(), xn.bfloat16().double())
    assert m.ratio_ema.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(
    "preset, alpha0, learn_alpha0",
    [("aion", 0.1, True), ("deepnorm", 1 / math.sqrt(2 * 6), False), ("preln", 1.0, False),
     ("rezero", 0.0, True)],
)
def test_presets(preset: str, alpha0: float, learn_alpha0: bool) -> None:
    m = AionResidual.from_preset(preset, num_layers=6)
    assert m.alpha0.item() == pytest.approx(alpha0)
    assert m.alpha0.requires_grad == learn_alpha0
    assert m.beta.requires_grad == (preset == "aion") and m.adaptive == (preset == "aion")
    x, y, xn = batch()
    out = m(x, y, xn)
    if preset != "aion":  # α = alpha0 exactly, the EMA untouched
        torch.testing.assert_close(out, x + alpha0 * y)
        assert m.ratio_ema.item() == 1.0


def test_preset_errors() -> None:
    with pytest.raises(ValueError, match="unknown AION preset"):
        AionResidual.from_preset("postln")
    with pytest.raises(ValueError, match="num_layers"):
        AionResidual.from_preset("deepnorm")


def test_preserving_start_is_exact() -> None:
    x, y, xn = batch()
    m = AionResidual()
    m.preserve_(m.batch_ratio(x, y, xn))
    assert m.ratio_ema.item() == pytest.approx(closed_form_ratio(y, xn), rel=1e-6)
    m.eval()
    assert m.alpha().item() == 1.0
    assert torch.equal(m(x, y), x + y)
    m.train()  # the first training step moves α only by the batch's deviation from the EMA
    torch.testing.assert_close(m(x, y, xn), x + y, rtol=1e-6, atol=1e-6)


def test_records_after_attach_move_once_per_real_step() -> None:
    """After `surgeon.attach` the forward leaves every buffer alone; each optimizer step that
    moves the EMA sets `alpha_cached` to the α at the new EMA and counts one update."""
    from surgeon.nn import attach

    m = AionResidual(alpha0=0.4, beta=0.2, ema_gamma=0.5)
    handle = attach(m)
    x, y, xn = batch()
    m(x, y, xn)
    assert m.step_count.item() == 0 and m.alpha_cached.item() == pytest.approx(0.4)
    handle.step(found_inf=torch.tensor(1.0))  # a step GradScaler skips: nothing moves
    assert m.step_count.item() == 0 and m.alpha_cached.item() == pytest.approx(0.4)
    handle.step()
    r_s = 0.5 * 1.0 + 0.5 * closed_form_ratio(y, xn)
    assert m.ratio_ema.item() == pytest.approx(r_s, rel=1e-6)
    assert m.alpha_cached.item() == pytest.approx(0.4 / (1 + 0.2 * r_s), rel=1e-6)
    assert m.step_count.item() == 1
    handle.step()  # no forward since: no update
    assert m.step_count.item() == 1
    handle.remove()
