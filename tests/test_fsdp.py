"""FSDP: surgeon's parameters are all at least 1-D (FSDP shards no 0-dim parameter), the forwards
compute what 0-dim scalars did, older 0-dim checkpoints still load, `attach` works on FSDP2's
sharded parameters (one all_reduce per step, ranks bit-identical, equal to DDP), and FSDP1 is
refused with a message.

Run as a script (`python tests/test_fsdp.py RANK WORLD INIT_FILE OUT`) it is one rank of the
2-rank gloo run: a converted NanoGPT (aion + hyper or mHC + adyt) trained under `fully_shard` per
block and on the root, then under DDP, with `surgeon.attach`; the results go to OUT.
"""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
sys.path[:0] = [str(ROOT), str(TESTS)]  # as a script, too

import zoo  # noqa: E402
from ddp_worker import run_ranks  # noqa: E402

import surgeon  # noqa: E402
from surgeon.nn import (  # noqa: E402
    ADyT,
    AionResidual,
    HyperConnections,
    ManifoldHyperConnections,
    attach,
)

PASSES = ["aion", "hyper:streams=2", "adyt"]
MHC_PASSES = ["aion", "hyper:streams=2,mhc=true", "adyt"]
SCHEDULE = (1, 2, 1)  # micro-batches accumulated into each optimizer step
B, T, VOCAB = 2, 8, 64  # sequences per rank and micro-batch, tokens, vocabulary
SURGEON_MODULES = (AionResidual, ADyT, HyperConnections, ManifoldHyperConnections)


def converted(passes: list[str] = PASSES) -> nn.Module:
    """A tiny NanoGPT (no dropout) converted with `passes`, the same in every process."""
    torch.manual_seed(0)
    model = zoo.NanoGPT(vocab=VOCAB, dropout=0.0)
    surgeon.apply(model, passes, (zoo.tokens(VOCAB, seq=T),))
    torch.manual_seed(1)
    return model


# ---------------------------------------------------------------------------------------------
# 1. Shapes: no 0-dim parameter anywhere in a converted model.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [
    ["aion"], ["aion:preset=rezero,preserve=false"], ["hyper:streams=2"],
    ["hyper:streams=2,mhc=true"], ["adyt"], ["adyt:adaptive=false"], PASSES,
])
def test_every_parameter_surgeon_creates_is_at_least_1d(passes: list[str]) -> None:
    model = converted(passes)
    zero_dim = [n for n, p in model.named_parameters() if p.dim() == 0]
    assert zero_dim == []
    ours = [(n, p) for m in model.modules() if isinstance(m, SURGEON_MODULES)
            for n, p in m.named_parameters(recurse=False)]
    assert ours
    scalars = {n for m in model.modules() if isinstance(m, SURGEON_MODULES)
               for n in ("alpha0", "beta", "dynamic_alpha_scale", "dynamic_beta_scale",
                         "pre_scale", "post_scale", "res_scale") if hasattr(m, n)}
    assert scalars
    for m in model.modules():
        for name in scalars & set(dict(m.named_parameters(recurse=False))):
            assert tuple(getattr(m, name).shape) == (1,), (type(m).__name__, name)


def _zero_dim_twin(module: nn.Module) -> nn.Module:
    """A copy of `module` whose (1,) parameters are 0-dim, as before."""
    twin = copy.deepcopy(module)
    for m in twin.modules():
        for name, p in list(m.named_parameters(recurse=False)):
            if tuple(p.shape) == (1,):
                setattr(m, name, nn.Parameter(p.detach().reshape(())))
    return twin


def _cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    torch.manual_seed(0)
    aion_eval = AionResidual(alpha0=0.3, beta=0.2).eval()
    hc, mhc = HyperConnections(2, 8, layer_index=1), ManifoldHyperConnections(2, 8)
    for m in (hc, mhc):
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return [("aion-train", AionResidual(alpha0=0.3, beta=0.2), (3, 4, 8)),
            ("aion-eval", aion_eval, (3, 4, 8)), ("aion-1d", AionResidual(), (8,)),
            ("adyt", ADyT(8), (3, 4, 8)), ("dyt", ADyT(8, adaptive=False), (8,)),
            ("hc", hc, (4, 5, 8)), ("mhc", mhc, (4, 5, 8))]


@pytest.mark.parametrize("name, module, shape", _cases(), ids=[c[0] for c in _cases()])
def test_forward_is_what_0dim_scalars_computed(
    name: str, module: nn.Module, shape: tuple[int, ...]
) -> None:
    """Bit-identical outputs and gradients, the same shapes (a (1,) adds no dimension)."""
    twin = _zero_dim_twin(module)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3))

    def run(m: nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if isinstance(m, AionResidual):
            out = m(x, 0.5 * x.flip(-1), x * 2)
        elif isinstance(m, ADyT):
            out = m(x)
        else:
            branch_input, residuals, beta = m.width_connection(x)
            out = m.depth_connection(branch_input.tanh(), residuals, beta)
        grads = torch.autograd.grad(out.square().sum(), list(m.parameters()))
        return out, [g.reshape(-1) for g in grads]

    out, grads = run(module)
    want, want_grads = run(twin)
    assert out.shape == want.shape == (x.shape[0] // getattr(module, "num_streams", 1)
                                       * getattr(module, "num_streams", 1), *x.shape[1:])
    assert torch.equal(out, want), name
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w), name
    if isinstance(module, (AionResidual, ADyT)):
        assert module.alpha().shape == (), name


def test_aion_return_stats_and_alpha_stay_scalars() -> None:
    m = AionResidual()
    out, stats = m(torch.randn(2, 8), torch.randn(2, 8), return_stats=True)
    assert out.shape == (2, 8) and isinstance(stats["alpha"], float)
    assert m.alpha_cached.shape == (1,) and m.ratio_ema.shape == ()


# ---------------------------------------------------------------------------------------------
# 2. Checkpoints with 0-dim scalars (older surgeon, peers) still load strictly.
# ---------------------------------------------------------------------------------------------


def test_a_state_dict_with_0dim_scalars_loads_strictly() -> None:
    model = converted()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    old = {k: (v.reshape(()) if tuple(v.shape) == (1,) else v)
           for k, v in model.state_dict().items()}
    assert sum(v.dim() == 0 for v in old.values()) >= 21
    fresh = converted()
    fresh.load_state_dict(old)  # strict
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key


def test_an_old_checkpoint_with_0dim_scalars_reloads(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = converted()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    surgeon.save(model, tmp_path, base="zoo:NanoGPT")
    files = sorted(tmp_path.glob("*.safetensors"))
    assert files
    reshaped = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        for k, v in tensors.items():
            if tuple(v.shape) == (1,):
                tensors[k], reshaped = v.reshape(()).clone(), reshaped + 1
        save_file(tensors, str(file), metadata=meta)
    assert reshaped >= 21
    loaded = surgeon.load(tmp_path, trust_remote_code=True)  # a zoo factory base
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert all(p.dim() >= 1 for p in loaded.parameters())


# ---------------------------------------------------------------------------------------------
# 3. FSDP1 is refused; FSDP2 on two gloo ranks agrees with itself and with DDP.
# ---------------------------------------------------------------------------------------------



@pytest.mark.usefixtures("gloo_group")
def test_attach_refuses_fsdp1_flat_parameters() -> None:
    from torch.distributed.fsdp import FullyShardedDataParallel

    with pytest.warns(UserWarning):  # NO_SHARD at world size 1
        wrapped = FullyShardedDataParallel(converted(), device_id=torch.device("cpu"))
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"does not support FSDP1 .*fully_shard") as err:
        attach(wrapped, opt)
    assert "\n" not in str(err.value)


@pytest.mark.usefixtures("gloo_group")
def test_attach_refuses_a_mesh_it_cannot_sum_over() -> None:
    """HSDP's 2-D mesh replicates shards: summing them over the group would count them twice."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = converted(["adyt"])
    fully_shard(model, mesh=init_device_mesh("cpu", (1, 1), mesh_dim_names=("rep", "shard")))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=r"1-D mesh .* mesh of shape \(1, 1\)"):
        attach(model, opt)


def _batches(world: int) -> list[list[torch.Tensor]]:
    """Per step, its micro-batches of the union over ranks: (world·B, T+1) tokens."""
    gen = torch.Generator().manual_seed(1234)
    return [[torch.randint(0, VOCAB, (world * B, T + 1), generator=gen) for _ in range(k)]
            for k in SCHEDULE]


def _loss(model: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def _full(t: torch.Tensor) -> torch.Tensor:
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def _train(rank: int, world: int, kind: str, passes: list[str]) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    model = converted(passes)
    if kind == "fsdp":
        mesh = init_device_mesh("cpu", (world,))
        for block in model.transformer.h:
            fully_shard(block, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
        sharded = sum(hasattr(p, "to_local") for p in model.parameters())
    else:
        wrapped, sharded = DistributedDataParallel(model), 0
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    handle = attach(wrapped, opt)
    calls, real = [0], dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return real(*args, **kwargs)

    per_step = []
    for micro in _batches(world):
        for i, batch in enumerate(micro):
            last = i == len(micro) - 1
            sync = contextlib.nullcontext() if last or kind == "fsdp" else wrapped.no_sync()
            if kind == "fsdp":
                wrapped.set_requires_gradient_sync(last)
            with sync:
                (_loss(wrapped, batch[rank * B:(rank + 1) * B]) / len(micro)).backward()
        calls[0], dist.all_reduce = 0, counting
        try:
            opt.step()
        finally:
            dist.all_reduce = real
        per_step.append(calls[0])
        opt.zero_grad()
    handle.remove()
    return {"params": {n: _full(p) for n, p in model.named_parameters()},
            "buffers": {n: b.detach().clone() for n, b in model.named_buffers()},
            "all_reduce_per_step": per_step, "sharded": sharded}


def main(rank: int, world: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = {(kind, mhc): _train(rank, world, kind, MHC_PASSES if mhc else PASSES)
                  for mhc in (False, True) for kind in ("fsdp", "ddp")}
        torch.save(result, Path(out))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_fsdp2_two_ranks_agree_bitwise_and_match_ddp(tmp_path: Path) -> None:
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    world = 2
    outs = [tmp_path / f"rank{r}.pt" for r in range(world)]
    run_ranks([[sys.executable, __file__, str(r), str(world), str(tmp_path / "rdv"), str(outs[r])]
               for r in range(world)], ROOT, timeout=300)
    ranks = [torch.load(out) for out in outs]
    for mhc in (False, True):
        _check_fsdp_against_ddp([r[("fsdp", mhc)] for r in ranks], ranks[0][("ddp", mhc)],
                                MHC_PASSES if mhc else PASSES)


def _check_fsdp_against_ddp(fsdp_ranks: list[dict[str, Any]], ddp: dict[str, Any],
                            passes: list[str]) -> None:
    fsdp = fsdp_ranks[0]
    assert fsdp["sharded"] == len(fsdp["params"]), passes  # every parameter a DTensor
    for r, got in enumerate(fsdp_ranks):
        assert got["all_reduce_per_step"] == [1] * len(SCHEDULE), (passes, r)
    buffers = fsdp["buffers"]
    kinds = {n.rsplit(".", 1)[1] for n in buffers}
    assert {"ratio_ema", "grad_norm_ema", "step_count", "alpha_cached"} <= kinds
    for part in ("params", "buffers"):
        for name, value in fsdp[part].items():
            assert torch.equal(value, fsdp_ranks[1][part][name]), (passes, part, name)
            torch.testing.assert_close(value, ddp[part][name], rtol=1e-5, atol=1e-6,
                                       msg=f"{passes} {part} {name}")
    for name, value in buffers.items():
        if name.endswith("step_count"):
            assert value.item() == len(SCHEDULE), name
        elif name.endswith("grad_norm_ema"):
            assert abs(value.item() - 1.0) > 1e-3, name  # it moved, from the full norm
    start = converted(passes).state_dict()
    # The sharded scalars train (mHC's own scales get tiny or no gradients while the streams are
    # equal, as they start, so they are left out here).
    scalars = [n for n in fsdp["params"] if n.endswith(
        (".alpha0", ".beta", ".dynamic_alpha_scale", ".dynamic_beta_scale"))]
    assert len(scalars) >= (10 if "mhc" in passes[1] else 18), passes
    assert [n for n in scalars if torch.equal(fsdp["params"][n], start[n])] == [], passes


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4])
