"""examples/train.py, run as a user would: one process and `torchrun --nproc_per_node=2` (gloo),
DDP and FSDP2. Each run is a few steps of the tiny converted Llama (a few seconds): the loss is
finite and falls, the checkpoint reloads with `surgeon.load` to the trained model's logits, and
`--resume` continues from the saved step to the same weights as an uninterrupted run."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import surgeon

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "examples" / "train.py"
TINY = ["--batch", "4", "--seq-len", "32", "--log-every", "1", "--no-progress"]


def run_train(args: list[str], cwd: Path, nproc: int = 1, check: bool = True
              ) -> subprocess.CompletedProcess:
    """examples/train.py with `args`, under `python -m torch.distributed.run` when nproc > 1."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TORCHELASTIC_ERROR_FILE": str(cwd / "torchelastic-error.json")}
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    proc = subprocess.run([*launcher, str(SCRIPT), *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def losses(stdout: str) -> dict[int, float]:
    """{step: logged mean training loss} from the log lines."""
    return {int(m[1]): float(m[2]) for m in re.finditer(r"^step +(\d+)/\d+ +loss (\S+)",
                                                          stdout, re.M)}


def reload_gap(stdout: str) -> float:
    return float(re.search(r"^reload check: max \|logit diff\| (\S+)$", stdout, re.M)[1])


def weights(path: Path) -> dict[str, torch.Tensor]:
    return surgeon.load(path).state_dict()


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_one_process_trains_saves_and_reloads(tmp_path: Path) -> None:
    proc = run_train([*TINY, "--steps", "10", "--out", "run"], tmp_path)
    logged = losses(proc.stdout)
    assert sorted(logged) == list(range(1, 11))
    assert all(math.isfinite(v) for v in logged.values())
    assert logged[10] < logged[1]
    assert reload_gap(proc.stdout) == 0.0
    checkpoint = tmp_path / "run" / "checkpoint-10"
    model = surgeon.load(checkpoint / "model")
    assert [p["_type"] for p in model._surgeon_passes] == ["aion", "hyper", "adyt"]
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["step"] == 10
    assert len(state["optimizer"]["state"]) == len(list(model.parameters()))


def test_resume_continues_to_the_same_weights(tmp_path: Path) -> None:
    """8 steps straight (checkpoint at 4) == 4 steps, then --resume to 8 from checkpoint-4."""
    run_train([*TINY, "--steps", "8", "--save-every", "4", "--out", "straight"], tmp_path)
    proc = run_train([*TINY, "--steps", "8", "--resume", "straight/checkpoint-4", "--out",
                      "resumed"], tmp_path)
    assert "steps 4..8" in proc.stdout
    assert sorted(losses(proc.stdout)) == [5, 6, 7, 8]
    assert_same_weights(tmp_path / "straight" / "checkpoint-8" / "model",
                        tmp_path / "resumed" / "checkpoint-8" / "model")
    # a run directory resumes from its latest complete checkpoint, and keeps writing into it
    proc = run_train([*TINY, "--steps", "10", "--resume", "resumed"], tmp_path)
    assert "steps 8..10" in proc.stdout
    state = torch.load(tmp_path / "resumed" / "checkpoint-10" / "trainer_state.pt",
                       weights_only=True)
    assert state["step"] == 10


def test_trains_a_converted_directory(tmp_path: Path) -> None:
    """--model: a `surgeon convert` output (the 512-token tiny Llama, aion + adyt)."""
    surgeon.convert(str(ROOT / "examples" / "tiny-llama"), tmp_path / "converted",
                    ["aion", "adyt"])
    proc = run_train([*TINY, "--steps", "3", "--model", "converted", "--out", "run"], tmp_path)
    assert all(math.isfinite(v) for v in losses(proc.stdout).values())
    assert reload_gap(proc.stdout) == 0.0
    assert [p["_type"] for p in surgeon.load(tmp_path / "run" / "checkpoint-3" / "model")
            ._surgeon_passes] == ["aion", "adyt"]


def test_torchrun_ddp(tmp_path: Path) -> None:
    proc = run_train([*TINY, "--steps", "6", "--out", "run"], tmp_path, nproc=2)
    assert "DDP, world 2" in proc.stdout
    logged = losses(proc.stdout)
    assert sorted(logged) == list(range(1, 7)) and all(map(math.isfinite, logged.values()))
    assert logged[6] < logged[1]
    assert reload_gap(proc.stdout) == 0.0


def test_torchrun_fsdp2_matches_ddp(tmp_path: Path) -> None:
    """FSDP2 (fully_shard per block + root, surgeon's 0-d parameters as ignored_params) trains
    the same losses as DDP, and its gathered checkpoint reloads to its logits. Without attach:
    attach under FSDP2 is the next test."""
    common = [*TINY, "--steps", "4", "--no-attach"]
    ddp = run_train([*common, "--out", "ddp"], tmp_path, nproc=2)
    fsdp = run_train([*common, "--out", "fsdp", "--fsdp"], tmp_path, nproc=2)
    assert "FSDP2, world 2" in fsdp.stdout
    a, b = losses(ddp.stdout), losses(fsdp.stdout)
    assert a.keys() == b.keys() and all(math.isclose(a[k], b[k], abs_tol=1e-4) for k in a)
    assert reload_gap(fsdp.stdout) == 0.0
    wa = weights(tmp_path / "ddp" / "checkpoint-4" / "model")
    wb = weights(tmp_path / "fsdp" / "checkpoint-4" / "model")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("passes", ["aion,hyper:streams=4", "aion,hyper:streams=4,adyt"])
def test_torchrun_fsdp2_with_attach_and_resume(tmp_path: Path, passes: str) -> None:
    """FSDP2 with `surgeon.attach`, a checkpoint at step 2, and a resume from it that reaches
    the uninterrupted run's weights (attach keeps every rank's statistics equal): bit-identical
    for AION + HC and with ADyT, whose G comes from the sharded gradients' full norm."""
    common = [*TINY, "--steps", "4", "--fsdp"]
    proc = run_train([*common, "--passes", passes, "--save-every", "2", "--out", "run"],
                     tmp_path, nproc=2, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert all(map(math.isfinite, losses(proc.stdout).values()))
    assert reload_gap(proc.stdout) == 0.0
    resumed = run_train([*common, "--resume", "run/checkpoint-2", "--out", "resumed"], tmp_path,
                        nproc=2)
    assert "steps 2..4" in resumed.stdout and sorted(losses(resumed.stdout)) == [3, 4]
    wa = weights(tmp_path / "run" / "checkpoint-4" / "model")
    wb = weights(tmp_path / "resumed" / "checkpoint-4" / "model")
    if "adyt" in passes:
        assert all(torch.allclose(wa[k], wb[k], rtol=0, atol=1e-6) for k in wa)
    else:
        assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("args, message", [
    (["--resume", "empty"], "holds no checkpoint written by examples/train.py"),
    (["--steps", "0"], "--steps and --batch must be at least 1"),
])
def test_bad_arguments_fail_with_a_message(tmp_path: Path, args: list[str], message: str
                                           ) -> None:
    (tmp_path / "empty").mkdir()
    proc = run_train(args, tmp_path, check=False)
    assert proc.returncode != 0 and message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_bf16_autocast_on_cpu_keeps_fp32_statistics(tmp_path: Path) -> None:
    """`--amp bf16` (what CUDA runs by default) trains on CPU; the saved statistics stay fp32."""
    from surgeon.nn import ADyT, AionResidual

    proc = run_train([*TINY, "--steps", "3", "--amp", "bf16", "--out", "run"], tmp_path)
    assert "bf16 autocast" in proc.stdout
    assert all(map(math.isfinite, losses(proc.stdout).values()))
    model = surgeon.load(tmp_path / "run" / "checkpoint-3" / "model")
    stats = [(m.ratio_ema if isinstance(m, AionResidual) else m.grad_norm_ema)
             for m in model.modules() if isinstance(m, (AionResidual, ADyT))]
    assert stats and all(s.dtype == torch.float32 and torch.isfinite(s).all() for s in stats)


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_example", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("amp", [False, True])
def test_a_training_step_computes_nothing_in_float64(amp: bool) -> None:
    """Issue 13 item 5, the part a CPU can check: every op of a training step of the converted
    model (forward, backward, clip, attach's statistics, AdamW) outputs no float64 tensor."""
    from torch.utils._python_dispatch import TorchDispatchMode

    train = load_script()
    model = train.build_tiny(train.split_passes(train.DEFAULT_PASSES), 16, 0).train()
    optimizer = train.make_optimizer(model, 1e-3)
    surgeon.attach(model, optimizer)
    batch = torch.randint(0, train.VOCAB, (2, 17))
    seen: set[str] = set()

    class Float64Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and t.dtype == torch.float64:
                    seen.add(str(func))
            return out

    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if amp else torch.autocast(
        "cpu", enabled=False)
    with Float64Watch():
        for _ in range(2):
            with autocast:
                loss = train.lm_loss(model, batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            train.clip_gradients(model, 1.0, fsdp=False)
            optimizer.step()
    assert not seen, f"float64 results from {sorted(seen)}"
