"""HF `Trainer` end to end on a traced and converted model (aion + hyper + adyt): it trains with
`SurgeonCallback` (Trainer's loss kwargs reach the rewritten blocks), with gradient
accumulation and gradient checkpointing, and what `trainer.save_model` and `checkpoint-*`
write reloads with `surgeon.load` to the same weights and outputs."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgeon
from surgeon.graph.tracing import TracedModule
from surgeon.integrations.transformers import SurgeonCallback
from tests.zoo import hf_llama

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 8, length: int = 8) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, 128, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def converted() -> torch.nn.Module:
    torch.manual_seed(0)
    model = hf_llama()
    surgeon.apply(model, ["aion", "hyper", "adyt"], {"input_ids": torch.arange(16).reshape(2, 8)})
    assert any(isinstance(m, TracedModule) for m in model.modules())
    return model


def trainer_for(model: torch.nn.Module, out: Path, **options: object) -> transformers.Trainer:
    args = transformers.TrainingArguments(
        output_dir=str(out), use_cpu=True, report_to=[], per_device_train_batch_size=2,
        max_steps=4, learning_rate=1e-3, logging_steps=1, save_steps=2, save_strategy="steps",
        disable_tqdm=True, seed=0, **options)
    return transformers.Trainer(model=model, args=args, train_dataset=Tokens(),
                                callbacks=[SurgeonCallback()])


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("options", [
    {},
    {"gradient_accumulation_steps": 2},
    {"activation_checkpointing": True},
], ids=["plain", "accumulation", "checkpointing"])
def test_trains_and_saves_reloadably(tmp_path: Path, options: dict) -> None:
    model = converted()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = trainer_for(model, tmp_path / "run", **options)
    result = trainer.train()
    assert math.isfinite(result.training_loss)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Trainer passed its loss kwargs (num_items_in_batch) down: the blocks re-specialised
    layers = [m for m in model.modules() if isinstance(m, TracedModule)
              and m._surgeon_name.startswith("model.layers.")]
    assert layers and all(m.__dict__.get("_surgeon_specs") for m in layers)
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    ids = torch.arange(12).reshape(2, 6)
    for where in (tmp_path / "final", tmp_path / "run" / "checkpoint-4"):
        assert (where / "surgeon.json").is_file()
        back = surgeon.load(where)
        same_weights(model, back)
        with torch.no_grad():
            assert torch.equal(back(input_ids=ids).logits, model(input_ids=ids).logits)
    assert (tmp_path / "run" / "checkpoint-2" / "surgeon.json").is_file()


def test_resume_from_checkpoint_continues_bit_identically(tmp_path: Path) -> None:
    straight = converted()
    trainer_for(straight, tmp_path / "a").train()
    resumed = converted()
    trainer_for(resumed, tmp_path / "b").train()
    again = converted()
    trainer_for(again, tmp_path / "b").train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    same_weights(straight, resumed)
    same_weights(straight, again)


def _ddp_worker(out: str) -> None:
    """One rank of `test_trains_under_torchrun_ddp` (run by torchrun, gloo on CPU)."""
    model = converted()
    trainer = trainer_for(model, Path(out) / "run", gradient_accumulation_steps=2)
    trainer.train()
    assert trainer.args.world_size == 2
    assert isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel)
    trainer.save_model(str(Path(out) / "final"))
    rank = int(os.environ["RANK"])
    torch.save({k: v.detach().clone() for k, v in model.state_dict().items()},
               Path(out) / f"rank{rank}.pt")


def test_trains_under_torchrun_ddp(tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         __file__, str(tmp_path)], cwd=root, env=env, capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)
    back = surgeon.load(tmp_path / "final")
    assert all(torch.equal(v, a[k]) for k, v in back.state_dict().items())


def test_a_copy_saves_itself(tmp_path: Path) -> None:
    """The save hook is bound to its model: a deep copy of it saves the copy."""
    import copy

    from surgeon.integrations.transformers import save_with_recipe

    model = converted()
    save_with_recipe(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        next(twin.parameters()).add_(1.0)
    twin.save_pretrained(str(tmp_path / "twin"))
    same_weights(twin, surgeon.load(tmp_path / "twin"))


if __name__ == "__main__":
    _ddp_worker(sys.argv[1])
