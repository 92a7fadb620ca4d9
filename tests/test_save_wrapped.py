"""`surgeon.save` of a converted model inside the wrappers training puts around it: torch.compile,
DDP and DataParallel (what accelerate's prepare returns), FSDP1 and FSDP2 (single-process gloo
groups on CPU). Each writes the checkpoint the bare model writes: its keys (no `_orig_mod.` or
`_fsdp_wrapped_module.`), its values, the base class by its own name, and it reloads equal."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import surgeon
from surgeon.checkpoint import CheckpointError
from surgeon.errors import SurgeonError

transformers = pytest.importorskip("transformers")

TINY = Path(__file__).resolve().parents[1] / "examples" / "tiny-llama"
IDS = torch.tensor([[1, 5, 9, 3, 7, 2]])



@pytest.fixture(scope="module")
def converted() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(TINY)
    model = transformers.LlamaForCausalLM(config).eval()
    surgeon.apply(model, ["aion", "adyt"])
    return model


def fresh(converted: nn.Module) -> nn.Module:
    """A converted model of its own (the wrappers below change the module they wrap)."""
    import copy

    return copy.deepcopy(converted)


def ddp(m: nn.Module) -> nn.Module:
    return nn.parallel.DistributedDataParallel(m)


def fsdp1(m: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel(m, device_id=torch.device("cpu"))  # surgeon's are all >= 1-D


def fsdp2(m: nn.Module) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in m.model.layers:  # every parameter surgeon adds is at least 1-D: all shard
        fully_shard(layer)
    return fully_shard(m)


# name, wrap, needs a process group
WRAPPERS: list = [
    pytest.param(torch.compile, False, id="compile"),
    pytest.param(nn.DataParallel, False, id="data-parallel"),
    pytest.param(ddp, True, id="ddp"),
    pytest.param(lambda m: torch.compile(ddp(m)), True, id="compile-ddp"),
    pytest.param(fsdp1, True, id="fsdp1"),
    pytest.param(fsdp2, True, id="fsdp2"),
]


@pytest.mark.parametrize("wrap, distributed", WRAPPERS)
def test_a_wrapped_model_saves_as_the_bare_one(converted, tmp_path, request, wrap: Callable,
                                               distributed: bool):
    if distributed:
        request.getfixturevalue("gloo_group")
    model = fresh(converted)
    expected = {k: v.detach().clone() for k, v in model.state_dict().items()}
    surgeon.save(model, tmp_path / "bare")
    surgeon.save(wrap(model), tmp_path / "wrapped")

    recipe = json.loads((tmp_path / "wrapped" / "surgeon.json").read_text())
    bare = json.loads((tmp_path / "bare" / "surgeon.json").read_text())
    assert recipe["base"] == bare["base"] == {"kind": "transformers", "class": "LlamaForCausalLM"}
    assert recipe["manifest"] == bare["manifest"]
    assert recipe["digests"]["weights"] == bare["digests"]["weights"]  # the same bytes
    loaded = surgeon.load(tmp_path / "wrapped")
    state = loaded.state_dict()
    assert sorted(state) == sorted(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, surgeon.load(tmp_path / "bare")(IDS).logits)


def test_an_unconverted_model_in_a_wrapper_is_named(tmp_path, gloo_group):
    model = ddp(nn.Linear(4, 4))
    with pytest.raises(CheckpointError, match=r"^Linear \(inside DistributedDataParallel\) was "
                                              "not converted with surgeon.apply"):
        surgeon.save(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def _two_rank_save(rank: int, store: str, out: str) -> None:
    """One rank of `test_two_ranks_write_once_and_share_a_failure`: DDP over gloo, then
    surgeon.save on every rank, twice (the second time DST exists and overwrite is off)."""
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        config = transformers.AutoConfig.from_pretrained(TINY)
        model = transformers.LlamaForCausalLM(config).eval()
        surgeon.apply(model, ["adyt"])
        results = []
        for _ in range(2):
            try:
                surgeon.save(ddp(model) if not results else model, out, overwrite=False)
                results.append("saved")
            except SurgeonError as e:
                results.append(f"error: {e}")
        Path(f"{out}.rank{rank}").write_text(json.dumps(results))
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    # Skip the interpreter's teardown: a C++ thread torch leaves behind can abort a process at
    # exit ("terminate called without an active exception"), after the results are written.
    os._exit(0)


def test_two_ranks_write_once_and_share_a_failure(tmp_path):
    """Under DDP each rank calls save: rank 0 writes, the other waits for it and, where rank 0
    fails (DST exists without overwrite), fails with its message instead of hanging."""
    import torch.multiprocessing as mp

    out = tmp_path / "dst"
    context = mp.spawn(_two_rank_save, args=(str(tmp_path / "store"), str(out)), nprocs=2,
                       join=False)
    try:
        for _ in range(12):
            if context.join(timeout=10):
                break
        else:
            for p in context.processes:
                p.kill()
            pytest.fail("the ranks did not finish")
    except mp.ProcessExitedException as e:
        written = [r for r in (0, 1) if (tmp_path / f"dst.rank{r}").exists()]
        raise AssertionError(f"{e} (results written by ranks {written})") from e
    first, second = zip(*(json.loads((tmp_path / f"dst.rank{r}").read_text()) for r in (0, 1)))
    assert first == ("saved", "saved")
    assert sorted(surgeon.load(out).state_dict()) == json.loads(
        (out / "surgeon.json").read_text())["manifest"]["parameters"]
    assert second[0].startswith(f"error: {out} already exists")
    assert second[1].startswith(f"error: rank 0 could not write {out}: {out} already exists")
