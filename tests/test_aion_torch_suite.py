"""aion-torch's own test suite, run against `surgeon.nn.AionResidual`: the drop-in claim, tested
by the peer's tests rather than ours.

`tests/peers/aion_torch_test_aion_adapter.py` is aion-torch 1.0.2's `tests/test_aion_adapter.py`
(MIT; vendored from its sdist, since the installed wheel ships no tests). It is loaded here with
its one import line swapped for surgeon's class, and every test of it runs; the deliberate
differences are skipped by name, each with its reason (DELIBERATE).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

import surgeon.nn

PEER = Path(__file__).parent / "peers" / "aion_torch_test_aion_adapter.py"
PEER_IMPORT = "from aion_torch.aion_adapter import AionResidual"
OURS_IMPORT = "from surgeon.nn import AionResidual"
PEER_TESTS = 52  # test methods in aion-torch 1.0.2's file (one needs CUDA)

_EVAL_NEEDS_THE_RATIO = (
    "with ema_gamma=1 surgeon's ratio_ema holds the latest batch ratio, because eval computes "
    "α from the current parameters and ratio_ema; aion-torch leaves ratio_ema at 1 and reuses "
    "the α of the last training step (alpha_cached) in eval")
DELIBERATE: dict[str, str] = {
    "test_distributed_training_sync": (
        "no collective in the forward: aion-torch all-reduces every layer's ratio in each "
        "training forward (and reads it back with .item()); surgeon sums all layers' ratios "
        "with one all_reduce per optimizer step after surgeon.attach"),
    "test_no_ema_smoothing": _EVAL_NEEDS_THE_RATIO,
    "test_ema_gamma_boundary_values": _EVAL_NEEDS_THE_RATIO,
}


def load_peer() -> types.ModuleType:
    """The peer's test module, executed with `AionResidual` imported from surgeon.nn."""
    source = PEER.read_text()
    assert source.count(PEER_IMPORT) == 1, f"{PEER} no longer imports AionResidual as expected"
    module = types.ModuleType("aion_torch_peer_suite")
    module.__file__ = str(PEER)
    exec(compile(source.replace(PEER_IMPORT, OURS_IMPORT), str(PEER), "exec"), module.__dict__)
    return module


_peer = load_peer()


def _skipped(reason: str) -> Any:
    def test(self: Any) -> None:
        pytest.skip(f"deliberate difference from aion-torch: {reason}")

    return test


class TestAionTorchSuite(_peer.TestAionResidual):
    """Every test of aion-torch's `TestAionResidual`, on surgeon's module."""


for _name, _reason in DELIBERATE.items():
    setattr(TestAionTorchSuite, _name, _skipped(_reason))


def test_the_peer_suite_runs_on_surgeons_module() -> None:
    """The swap took, the suite is whole, and each deliberate skip names a test it has."""
    assert _peer.AionResidual is surgeon.nn.AionResidual
    names = {n for n in vars(_peer.TestAionResidual) if n.startswith("test_")}
    assert len(names) == PEER_TESTS
    assert set(DELIBERATE) <= names
