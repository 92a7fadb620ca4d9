"""Shared fixtures: the zoo lives in tests/zoo.py so scripts can import it too."""

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def remote_code_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Code transformers runs with trust_remote_code is copied into a cache of the test's own,
    not the user's ~/.cache, and imported afresh: the `transformers_modules` package an earlier
    test imported from another cache is set aside for the test and put back afterwards."""
    import transformers.dynamic_module_utils as dynamic

    cache = tmp_path / "modules"
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers_modules"]:
        monkeypatch.delitem(sys.modules, name)
    yield cache
    for name in [m for m in sys.modules if m.split(".")[0] == "transformers_modules"]:
        del sys.modules[name]  # then monkeypatch puts back what was there before


@pytest.fixture
def gloo_group(tmp_path: Path) -> Iterator[None]:
    """A one-process gloo group for the test (skipped where torch has no gloo)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with gloo is not available")
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
