"""surgeon.attach: AION ratio EMAs and ADyT gradient-norm EMAs move once per optimizer step.

Closed forms by hand, GradScaler (unscaled gradients, skipped steps), gradient accumulation,
one collective per step, a 2-rank gloo DDP run against one process, and the Trainer callback.
The models (and the DDP rank process) live in tests/ddp_worker.py.
"""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path
from typing import Any

import ddp_worker
import pytest
import torch
import torch.distributed as dist
from ddp_worker import B, D, Net, T, loss_fn
from torch import nn

import surgeon
import surgeon.nn
from surgeon.integrations.transformers import SurgeonCallback
from surgeon.nn import ADyT, AionResidual, Attachment, attach

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


# ---------------------------------------------------------------------------------------------
# Helpers: ratios and gradient norms computed by hand, in float64.
# ---------------------------------------------------------------------------------------------


def aions(model: nn.Module) -> list[AionResidual]:
    return [m for m in model.modules() if isinstance(m, AionResidual)]


def adyts(model: nn.Module) -> list[ADyT]:
    return [m for m in model.modules() if isinstance(m, ADyT)]


class Recorder:
    """Keeps what each AION saw, (y, x_norm) in float64, to compute its ratio by hand."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: dict[AionResidual, list[tuple[torch.Tensor, torch.Tensor]]] = {
            m: [] for m in aions(model)
        }
        for m in self.calls:
            m.register_forward_pre_hook(self._hook)

    def _hook(self, module: AionResidual, args: tuple[Any, ...]) -> None:
        x, y, *rest = args
        x_in = rest[0] if rest and rest[0] is not None else x
        self.calls[module].append((y.detach().double(), x_in.detach().double()))

    def per_token(self, module: AionResidual) -> torch.Tensor:
        """`E[y]/(E[x_norm]+ε)` for every token of every call since the last `clear`."""
        parts = [
            (y.square().mean(-1) / (x_in.square().mean(-1) + module.epsilon)).flatten()
            for y, x_in in self.calls[module]
        ]
        return torch.cat(parts)

    def ratio(self, module: AionResidual) -> float:
        return self.per_token(module).mean().item()

    def clear(self) -> None:
        for calls in self.calls.values():
            calls.clear()


def grad_norm(module: nn.Module) -> float:
    """L2 norm over all of the module's parameter gradients (weight, bias, alpha0)."""
    return math.sqrt(sum(p.grad.double().square().sum().item() for p in module.parameters()))


def batch(n: int = B) -> torch.Tensor:
    return torch.randn(n, T, D)


def ema(old: float, value: float, keep: float) -> float:
    return keep * old + (1.0 - keep) * value


def corrected(module: ADyT, value: float) -> float:
    """The bias-corrected G that one more update by `value` gives `module` (read before it)."""
    g, t, keep = module.grad_norm_ema.item(), module.grad_norm_steps.item(), module.smoothing
    return (keep * (1.0 - keep**t) * g + (1.0 - keep) * value) / (1.0 - keep ** (t + 1))


def values(buffers: list[torch.Tensor]) -> list[float]:
    return [b.item() for b in buffers]


def assert_values(actual: list[torch.Tensor], expected: list[float], rtol: float = 1e-6) -> None:
    got = torch.stack([a.detach().double() for a in actual])
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=rtol, atol=0)


# ---------------------------------------------------------------------------------------------
# 1. attach: closed forms, nothing moves before the step, remove.
# ---------------------------------------------------------------------------------------------


def test_attach_is_exported_at_the_top_level() -> None:
    assert surgeon.attach is surgeon.nn.attach is attach


def test_without_attach_the_training_forward_moves_the_ema() -> None:
    model = Net()  # ema_gamma 0.5, ADyT smoothing 0.5
    rec = Recorder(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn(model(batch())).backward()
    assert_values(
        [m.ratio_ema for m in aions(model)], [ema(1.0, rec.ratio(m), 0.5) for m in rec.calls]
    )
    opt.step()  # nothing updates G without attach
    assert values([m.grad_norm_ema for m in adyts(model)]) == [1.0] * 3


def test_attach_one_step_matches_the_closed_form() -> None:
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model)
    h = surgeon.attach(model, opt)
    assert isinstance(h, Attachment)
    assert h.pending is not None and h.pending.shape == (3, 2)

    loss = loss_fn(model(batch()))
    assert values([m.ratio_ema for m in aions(model)]) == [1.0] * 3  # not moved by the forward
    loss.backward()
    assert values([m.ratio_ema for m in aions(model)]) == [1.0] * 3  # nor by the backward
    assert values([m.grad_norm_ema for m in adyts(model)]) == [1.0] * 3
    # pending holds (Σ per-token ratio, token count) per layer
    assert h.pending[:, 1].tolist() == [B * T] * 3
    sums = [rec.per_token(m).sum().item() for m in rec.calls]
    torch.testing.assert_close(h.pending[:, 0].double(), torch.tensor(sums, dtype=torch.float64))

    want_ema = [ema(1.0, rec.ratio(m), 0.5) for m in rec.calls]
    want_g = [corrected(m, grad_norm(m)) for m in adyts(model)]
    opt.step()
    assert_values([m.ratio_ema for m in aions(model)], want_ema)
    assert_values([m.grad_norm_ema for m in adyts(model)], want_g)
    assert all(abs(v - 1.0) > 1e-3 for v in want_ema + want_g)  # they did move
    assert torch.count_nonzero(h.pending) == 0

    # a second step folds into the EMAs left by the first
    opt.zero_grad()
    rec.clear()
    loss_fn(model(batch())).backward()
    want_ema = [ema(e, rec.ratio(m), 0.5) for e, m in zip(want_ema, rec.calls)]
    want_g = [corrected(m, grad_norm(m)) for m in adyts(model)]
    opt.step()
    assert_values([m.ratio_ema for m in aions(model)], want_ema)
    assert_values([m.grad_norm_ema for m in adyts(model)], want_g)

    # remove: the forward moves the EMA again, the step no longer touches G
    h.remove()
    assert all(m._pending is None for m in aions(model))
    assert len(opt._optimizer_step_pre_hooks) == 0
    opt.zero_grad()
    rec.clear()
    loss_fn(model(batch())).backward()
    assert_values(
        [m.ratio_ema for m in aions(model)],
        [ema(e, rec.ratio(m), 0.5) for e, m in zip(want_ema, rec.calls)],
    )
    g_before = [m.grad_norm_ema.clone() for m in adyts(model)]
    opt.step()
    assert all(torch.equal(a, m.grad_norm_ema) for a, m in zip(g_before, adyts(model)))


def test_manual_step_without_optimizer_and_context_manager() -> None:
    model = Net(layers=2)
    rec = Recorder(model)
    with attach(model) as h:
        loss_fn(model(batch())).backward()
        want_ema = [ema(1.0, rec.ratio(m), 0.5) for m in rec.calls]
        want_g = [corrected(m, grad_norm(m)) for m in adyts(model)]
        assert values([m.ratio_ema for m in aions(model)]) == [1.0, 1.0]
        h.step()
        assert_values([m.ratio_ema for m in aions(model)], want_ema)
        assert_values([m.grad_norm_ema for m in adyts(model)], want_g)
    assert all(m._pending is None for m in aions(model))


def test_non_adaptive_modules_are_left_alone() -> None:
    model = nn.Sequential(ADyT(D, adaptive=False), AionResidual.from_preset("preln"))
    h = attach(model, torch.optim.SGD(model.parameters(), lr=0.1))
    assert h.aion == [] and h.adyt == [] and h.pending is None


@pytest.mark.parametrize("amp, accumulate", [(False, 1), (True, 2)], ids=["fp32", "amp+accum"])
def test_alpha_falls_when_gradients_grow_and_rises_when_they_shrink(amp: bool,
                                                                     accumulate: int) -> None:
    """The adaptive part as the seed describes it: G follows the gradient norm from the first
    step (bias-corrected), so α = α0·(1 + λ/(ε + G)) falls while gradients grow and rises
    while they shrink — under attach, with bf16 autocast + GradScaler and accumulation."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, D), ADyT(D, lam=0.05, smoothing=0.8), nn.Linear(D, 1))
    adyt = model[1]
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: only the gradients' size changes
    attach(model, opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, enabled=amp)
    x = batch()

    def phase(loss_scale: float, steps: int = 12) -> list[float]:
        alphas = []
        for _ in range(steps):
            opt.zero_grad()
            for _ in range(accumulate):
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                    loss = loss_scale * loss_fn(model(x)) / accumulate
                scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            alphas.append(adyt.alpha().item())
        return alphas

    base = phase(1.0, steps=1)
    g1 = adyt.grad_norm_ema.item()
    assert base[0] == pytest.approx(0.5 * (1 + 0.05 / (1e-6 + g1)), rel=1e-5)  # α starts there
    growing = phase(30.0)
    shrinking = phase(0.01, steps=24)
    assert all(b < a for a, b in zip(growing, growing[1:]))  # falls step by step
    assert all(b > a for a, b in zip(shrinking, shrinking[1:]))  # rises step by step
    assert growing[-1] < base[0] < shrinking[-1]
    assert adyt.grad_norm_steps.item() == 37  # one update per optimizer step


# ---------------------------------------------------------------------------------------------
# 2. GradScaler: G sees unscaled gradients; a skipped step moves nothing.
# ---------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1),
    "adamw_fused": lambda params: torch.optim.AdamW(params, lr=1e-2, fused=True),
}


@pytest.mark.parametrize("unscale_first", [False, True], ids=["step", "unscale_then_step"])
@pytest.mark.parametrize(
    "optim",
    ["sgd", "adamw_fused"],
)
def test_grad_scaler(optim: str, unscale_first: bool) -> None:
    scaled = Net()
    plain = copy.deepcopy(scaled)
    opt_s, opt_p = OPTIMIZERS[optim](scaled.parameters()), OPTIMIZERS[optim](plain.parameters())
    h = attach(scaled, opt_s)
    attach(plain, opt_p)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)

    def scaler_step() -> None:
        if unscale_first:  # as when clipping: unscale_, clip, step
            scaler.unscale_(opt_s)
            torch.nn.utils.clip_grad_norm_(scaled.parameters(), 1e6)
        scaler.step(opt_s)
        scaler.update()

    x = batch()
    scaler.scale(loss_fn(scaled(x))).backward()
    loss_fn(plain(x)).backward()
    scaled_g = grad_norm(adyts(scaled)[0])
    assert scaled_g == pytest.approx(2.0**12 * grad_norm(adyts(plain)[0]), rel=1e-6)
    scaler_step()
    opt_p.step()
    assert scaler.get_scale() == 2.0**12  # a real step
    g_s = [m.grad_norm_ema for m in adyts(scaled)]
    g_p = [m.grad_norm_ema for m in adyts(plain)]
    torch.testing.assert_close(torch.stack(g_s), torch.stack(g_p), rtol=1e-6, atol=0)
    assert all(abs(g.item() - 1.0) > 1e-3 for g in g_p)
    for a, b in zip(aions(scaled), aions(plain)):
        assert torch.equal(a.ratio_ema, b.ratio_ema)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)

    # a step GradScaler skips (an inf in one gradient) moves neither EMA nor any parameter
    opt_s.zero_grad()
    rec = Recorder(scaled)
    scaler.scale(loss_fn(scaled(batch()))).backward()
    scaled.blocks[0].fc.weight.grad[0, 0] = float("inf")
    before = {k: v.clone() for k, v in scaled.state_dict().items()}
    scaler_step()
    assert scaler.get_scale() == 2.0**11  # skipped: the scale backed off
    for k, v in scaled.state_dict().items():
        assert torch.equal(v, before[k]), k
    # its ratios wait in pending and count towards the next real step (documented)
    assert h.pending is not None and h.pending[:, 1].tolist() == [B * T] * 3

    opt_s.zero_grad()
    scaler.scale(loss_fn(scaled(batch()))).backward()
    scale = scaler.get_scale()
    want_ema = [ema(m.ratio_ema.item(), rec.ratio(m), 0.5) for m in rec.calls]  # both batches
    want_g = [corrected(m, grad_norm(m) / scale) for m in adyts(scaled)]
    scaler_step()
    assert scaler.get_scale() == scale
    assert_values([m.ratio_ema for m in aions(scaled)], want_ema)
    assert_values([m.grad_norm_ema for m in adyts(scaled)], want_g)


# ---------------------------------------------------------------------------------------------
# 3. Gradient accumulation: k micro-batches, one step, the union batch's ratio.
# ---------------------------------------------------------------------------------------------


class Parallel(nn.Module):
    """Branches side by side on the same input, so what each AION sees does not depend on
    another AION's α (which follows the batch it is given): the per-token ratios are then the
    same however the batch is split into micro-batches."""

    def __init__(self, d: int = D, branches: int = 3) -> None:
        super().__init__()
        self.norms = nn.ModuleList(ADyT(d, smoothing=0.5) for _ in range(branches))
        self.fcs = nn.ModuleList(nn.Linear(d, d) for _ in range(branches))
        self.res = nn.ModuleList(
            AionResidual(alpha0=0.5, beta=0.3, ema_gamma=0.5) for _ in range(branches)
        )
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for norm, fc, res in zip(self.norms, self.fcs, self.res):
            xn = norm(x)
            out = out + res(x, fc(xn), xn)
        return self.head(out)


@pytest.fixture
def step_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts Attachment.step calls (the optimizer hook goes through it)."""
    calls = [0]
    real = Attachment.step

    def spy(self: Attachment, *args: object) -> None:
        calls[0] += 1
        real(self, *args)

    monkeypatch.setattr(Attachment, "step", spy)
    return calls


def test_gradient_accumulation_gives_the_union_batch(step_calls: list[int]) -> None:
    accum = Parallel()
    whole = copy.deepcopy(accum)
    opt_a = torch.optim.SGD(accum.parameters(), lr=0.1)
    opt_w = torch.optim.SGD(whole.parameters(), lr=0.1)
    attach(accum, opt_a)
    attach(whole, opt_w)
    rec = Recorder(accum)

    k = 3
    micro = [batch() for _ in range(k)]
    for mb in micro:
        (loss_fn(accum(mb)) / k).backward()
        assert values([m.ratio_ema for m in aions(accum)]) == [1.0] * 3
    assert values([m.grad_norm_ema for m in adyts(accum)]) == [1.0] * 3
    assert step_calls[0] == 0
    want_g = [corrected(m, grad_norm(m)) for m in adyts(accum)]  # the accumulated gradients
    opt_a.step()
    assert step_calls[0] == 1
    loss_fn(whole(torch.cat(micro))).backward()
    opt_w.step()
    assert step_calls[0] == 2
    torch.testing.assert_close(
        torch.stack([m.ratio_ema for m in aions(accum)]),
        torch.stack([m.ratio_ema for m in aions(whole)]),
        rtol=1e-6,
        atol=0,
    )
    assert_values(
        [m.ratio_ema for m in aions(accum)], [ema(1.0, rec.ratio(m), 0.5) for m in rec.calls]
    )
    assert_values([m.grad_norm_ema for m in adyts(accum)], want_g)

    # a second accumulated step (2 micro-batches) moves the stats once more, by their union
    opt_a.zero_grad()
    rec.clear()
    prev_ema = values([m.ratio_ema for m in aions(accum)])
    for _ in range(2):
        (loss_fn(accum(batch())) / 2).backward()
    assert values([m.ratio_ema for m in aions(accum)]) == prev_ema
    want_ema = [ema(e, rec.ratio(m), 0.5) for e, m in zip(prev_ema, rec.calls)]
    want_g = [corrected(m, grad_norm(m)) for m in adyts(accum)]
    opt_a.step()
    assert step_calls[0] == 3
    assert_values([m.ratio_ema for m in aions(accum)], want_ema)
    assert_values([m.grad_norm_ema for m in adyts(accum)], want_g)


# ---------------------------------------------------------------------------------------------
# 4. One collective per step for all layers (single-process gloo group).
# ---------------------------------------------------------------------------------------------

COLLECTIVES = (
    "all_reduce",
    "all_reduce_coalesced",
    "broadcast",
    "reduce",
    "all_gather",
    "all_gather_into_tensor",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "all_to_all",
    "all_to_all_single",
    "barrier",
)



@pytest.fixture
def collectives(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Any]]:
    """Every torch.distributed collective called, as (name, group)."""
    calls: list[tuple[str, Any]] = []
    for name in COLLECTIVES:
        real = getattr(dist, name, None)
        if real is None:
            continue

        def counted(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.append((_name, kwargs.get("group")))
            return _real(*args, **kwargs)

        monkeypatch.setattr(dist, name, counted)
    return calls


@pytest.mark.usefixtures("gloo_group")
def test_one_all_reduce_per_step_for_all_layers(collectives: list[tuple[str, Any]]) -> None:
    model = Net(layers=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = Recorder(model)
    attach(model, opt)
    for step in range(2):
        opt.zero_grad()
        rec.clear()
        want = [m.ratio_ema.item() for m in aions(model)]
        for _ in range(2):  # two micro-batches
            (loss_fn(model(batch())) / 2).backward()
        assert collectives == []  # nothing in forward or backward
        want = [ema(e, rec.ratio(m), 0.5) for e, m in zip(want, rec.calls)]
        opt.step()
        assert [name for name, _ in collectives] == ["all_reduce"]
        collectives.clear()
        assert_values([m.ratio_ema for m in aions(model)], want)  # world size 1: the same union


@pytest.mark.usefixtures("gloo_group")
def test_no_collective_without_aion_and_the_process_group_is_used(
    collectives: list[tuple[str, Any]],
) -> None:
    only_adyt = nn.Sequential(ADyT(D), nn.Linear(D, D), ADyT(D), nn.Linear(D, 1))
    opt = torch.optim.SGD(only_adyt.parameters(), lr=0.1)
    h = attach(only_adyt, opt)
    assert h.pending is None
    loss_fn(only_adyt(batch())).backward()
    want = [corrected(m, grad_norm(m)) for m in adyts(only_adyt)]
    opt.step()
    assert collectives == []
    assert_values([m.grad_norm_ema for m in adyts(only_adyt)], want)

    group = dist.new_group([0])
    collectives.clear()
    model = Net(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    attach(model, opt, process_group=group)
    loss_fn(model(batch())).backward()
    opt.step()
    assert collectives == [("all_reduce", group)]


# ---------------------------------------------------------------------------------------------
# 5. Two ranks under DDP (gloo, CPU): bit-identical buffers, equal to one process.
# ---------------------------------------------------------------------------------------------


def test_ddp_two_ranks_agree_bitwise_and_match_one_process(tmp_path: Path) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    cmd = [sys.executable, str(TESTS / "ddp_worker.py")]
    args = [str(world), str(tmp_path / "rendezvous")]
    ddp_worker.run_ranks([[*cmd, str(r), *args, str(outs[r])] for r in range(world)], ROOT,
                         timeout=120)

    ranks = [torch.load(out) for out in outs]
    ref = ddp_worker.reference_run(world)
    steps = len(ddp_worker.SCHEDULE)
    buffers = ref["buffers"]
    assert {n.rsplit(".", 1)[1] for n in buffers} == {
        "ratio_ema", "grad_norm_ema", "grad_norm_steps", "step_count", "alpha_cached",
        "input_scale"}
    assert len(buffers) == 3 * 3 + 3 * 3  # AION: 3 buffers a layer, ADyT: 3
    for r, got in enumerate(ranks):
        assert got["all_reduce_per_step"] == [1] * steps, r  # one collective per step
        assert got["buffers"].keys() == buffers.keys()
    for name, want in buffers.items():
        assert torch.equal(ranks[0]["buffers"][name], ranks[1]["buffers"][name]), name
        torch.testing.assert_close(ranks[0]["buffers"][name], want, rtol=1e-6, atol=0, msg=name)
        if name.endswith(("step_count", "grad_norm_steps")):  # one update per optimizer step
            assert want.item() == steps, name
        elif name.endswith("input_scale"):  # calibration's, fixed in training (none here)
            assert want.item() == 1.0, name
        else:
            assert abs(want.item() - 1.0) > 1e-3, name  # it moved
    for name, want in ref["params"].items():
        assert torch.equal(ranks[0]["params"][name], ranks[1]["params"][name]), name
        torch.testing.assert_close(ranks[0]["params"][name], want, rtol=1e-5, atol=1e-6)
    # without attach each rank's EMAs follow its own data (buffers are not broadcast here)
    control = zip(ranks[0]["control_ratio_ema"], ranks[1]["control_ratio_ema"])
    assert not any(torch.equal(a, b) for a, b in control)


# ---------------------------------------------------------------------------------------------
# 6. The Trainer callback.
# ---------------------------------------------------------------------------------------------


class Wrapper:
    """An optimizer wrapper that is not a torch optimizer (as some trainers have)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()


class SubclassWrapper(torch.optim.Optimizer):
    """A wrapper that subclasses torch.optim.Optimizer without calling its __init__, as
    accelerate's AcceleratedOptimizer (which the HF Trainer hands its callbacks) does."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.optimizer.param_groups

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        return self.optimizer.step(closure)


def test_callback_attaches_at_begin_and_removes_at_end(step_calls: list[int]) -> None:
    model = Net(layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cb = SurgeonCallback()
    with pytest.raises(RuntimeError):
        cb.on_train_begin(None, None, None, model=model, optimizer=None)
    cb.on_train_begin(None, None, None, model=model, optimizer=Wrapper(opt))
    cb.on_train_begin(None, None, None, model=model, optimizer=Wrapper(opt))  # re-attaches once
    assert len(opt._optimizer_step_pre_hooks) == 1
    rec = Recorder(model)
    loss_fn(model(batch())).backward()
    assert values([m.ratio_ema for m in aions(model)]) == [1.0, 1.0]
    want = [ema(1.0, rec.ratio(m), 0.5) for m in rec.calls]
    Wrapper(opt).step()
    assert step_calls[0] == 1
    assert_values([m.ratio_ema for m in aions(model)], want)
    cb.on_train_end(None, None, None, model=model, optimizer=opt)
    assert cb.attachment is None
    assert len(opt._optimizer_step_pre_hooks) == 0
    assert all(m._pending is None for m in aions(model))


def test_attach_through_an_optimizer_subclass_wrapper() -> None:
    model = Net(layers=2)
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    wrapped = SubclassWrapper(inner)
    attach(model, wrapped)
    loss_fn(model(batch())).backward()
    want = [corrected(m, grad_norm(m)) for m in adyts(model)]
    wrapped.step()
    assert_values([m.grad_norm_ema for m in adyts(model)], want)


class AionMLP(nn.Module):
    """A decoder layer's MLP whose output goes through an AION residual: `x + α·mlp(x)`."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.mlp = mlp
        self.res = AionResidual(ema_gamma=0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res(x, self.mlp(x))


def test_trainer_callback(tmp_path: Path, step_calls: list[int]) -> None:
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate")
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    model = LlamaForCausalLM(config)
    model.model.norm = ADyT.from_norm(model.model.norm, smoothing=0.5)
    model.model.layers[0].mlp = AionMLP(model.model.layers[0].mlp)
    adyt, aion = model.model.norm, model.model.layers[0].mlp.res
    seq, per_device, accum, steps = 8, 2, 2, 3
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, seq))]

    surgeon_cb = SurgeonCallback()

    class Probe(TrainerCallback):
        """Before each optimizer step (after clipping): the values attach must fold in."""

        def __init__(self) -> None:
            self.g, self.ratio, self.counts, self.optimizer = 1.0, 1.0, [], None

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            pending = surgeon_cb.attachment.pending
            total, count = pending[0].tolist()
            self.counts.append(count)
            self.ratio = ema(self.ratio, total / count, 0.5)
            self.g = corrected(adyt, grad_norm(adyt))
            self.optimizer = kw["optimizer"]

    probe = Probe()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accum,
        max_steps=steps,
        learning_rate=1e-3,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[surgeon_cb, probe])
    trainer.train()

    assert trainer.state.global_step == steps
    assert step_calls[0] == steps  # once per optimizer step, not per micro-batch
    assert probe.counts == [accum * per_device * seq] * steps
    assert adyt.grad_norm_ema.item() == pytest.approx(probe.g, rel=1e-6)
    assert aion.ratio_ema.item() == pytest.approx(probe.ratio, rel=1e-6)
    assert abs(probe.g - 1.0) > 1e-3 and abs(probe.ratio - 1.0) > 1e-3
    # detached after training
    assert surgeon_cb.attachment is None and aion._pending is None
    inner = probe.optimizer
    while not hasattr(inner, "_optimizer_step_pre_hooks"):
        inner = inner.optimizer
    assert len(inner._optimizer_step_pre_hooks) == 0


def test_attaching_twice_replaces_the_first_attachment() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), ADyT(4, smoothing=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    first = surgeon.attach(model, opt)
    surgeon.attach(model, opt)
    assert first._handle is None  # removed
    model(torch.randn(2, 4)).sum().backward()
    grads = [p.grad for p in model[1].parameters()]
    g = torch.linalg.vector_norm(torch.stack([x.norm() for x in grads]))
    opt.step()
    torch.testing.assert_close(model[1].grad_norm_ema, g)  # moved once: G_1 = g_1
    assert model[1].grad_norm_steps.item() == 1


def test_an_overflowed_batch_does_not_poison_the_ema() -> None:
    aion = AionResidual(ema_gamma=0.5)
    handle = surgeon.attach(aion)
    y = torch.randn(2, 3, 4)
    y[0, 0, 0] = float("inf")
    aion(torch.randn(2, 3, 4), y)
    handle.step()
    assert aion.ratio_ema.item() == 1.0 and handle.pending.abs().sum().item() == 0
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    aion(x, y)
    handle.step()
    assert torch.isfinite(aion.ratio_ema) and aion.ratio_ema.item() != 1.0
