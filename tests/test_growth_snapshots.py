"""surgeon.growth.snapshots: Trainer output, flat step files and the recorder's own directory,
read in step order and checked; the recorder and its Trainer callback."""

import inspect
import json
import re
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

from surgeon.growth.snapshots import (
    MANIFEST,
    SnapshotError,
    SnapshotRecorder,
    Snapshots,
    open_snapshots,
)
from surgeon.integrations.snapshots import SnapshotCallback

BLOCK = "transformer.h.1."


def tiny_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=16,
                        bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def tensors(step: int, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    """A small snapshot whose values tell its step: w = step, b = -step."""
    return {"w": torch.full((2, 3), float(step)), "b": torch.full((3,), -float(step)), **extra}


def flat(directory: Path, files: dict[str, dict[str, torch.Tensor]]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for name, values in files.items():
        save_file(values, str(directory / name))
    return directory


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real Trainer run: max_steps=6, save_steps=2, and a SnapshotCallback(every=2)."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("trainer")
    model = tiny_gpt2()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 8))]
    extra = {}
    if "save_safetensors" in inspect.signature(TrainingArguments).parameters:
        extra["save_safetensors"] = True  # older transformers; newer ones always write it
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             learning_rate=1e-2, logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, **extra)
    callback = SnapshotCallback(every=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[callback]).train()
    assert callback.recorder is not None and callback.recorder.directory == out / "snapshots"
    (out / "runs").mkdir()  # other folders and files beside the checkpoints are ignored
    (out / "trainer_state.json").write_text("{}")
    return out


def test_trainer_output_dir(trained: Path, tmp_path: Path) -> None:
    assert open_snapshots(trained).path == trained / "snapshots"  # SnapshotCallback's win
    shutil.copytree(trained, tmp_path / "run", ignore=shutil.ignore_patterns("snapshots"))
    trained = tmp_path / "run"
    snaps = open_snapshots(trained)
    assert snaps.layout == "trainer" and snaps.steps == [2, 4, 6] and len(snaps) == 3
    assert [s.path for s in snaps] == [trained / f"checkpoint-{n}" for n in (2, 4, 6)]
    saved = [load_file(str(trained / f"checkpoint-{n}" / "model.safetensors")) for n in (2, 4, 6)]
    assert snaps.keys == sorted(saved[0]) and len(snaps.keys) == 28
    assert snaps.shapes["transformer.h.0.attn.c_attn.weight"] == (32, 96)
    assert snaps.dtypes["transformer.wte.weight"] == torch.float32
    for key in snaps.keys:
        trajectory = snaps.trajectory(key)
        assert len(trajectory) == 3
        assert all(torch.equal(t, s[key]) for t, s in zip(trajectory, saved))
    moved = snaps.trajectory("transformer.h.1.mlp.c_fc.weight")
    assert not torch.equal(moved[0], moved[1]) and not torch.equal(moved[1], moved[2])
    snaps.check_finite()

    block = open_snapshots(trained, keys=BLOCK)
    assert len(block.keys) == 12 and all(k.startswith(BLOCK) for k in block.keys)


def test_callback_records_at_the_trainer_steps(trained: Path) -> None:
    snaps = open_snapshots(trained / "snapshots")
    assert snaps.layout == "recorder" and snaps.steps == [2, 4, 6]
    manifest = json.loads((trained / "snapshots" / MANIFEST).read_text())
    files = [e["file"] for e in manifest["snapshots"]]
    assert files == [f"step-{n}.safetensors" for n in (2, 4, 6)]
    # GPT-2's lm_head is tied to wte: stored once, as save_pretrained does
    assert snaps.tied == {"lm_head.weight": "transformer.wte.weight"}
    checkpoints = open_snapshots(trained)
    assert snaps.keys == checkpoints.keys
    for key in snaps.keys:  # the callback ran at the same parameters as the Trainer's save
        assert all(torch.equal(a, b) for a, b in
                   zip(snaps.trajectory(key), checkpoints.trajectory(key)))
    lm_head = snaps.trajectory("lm_head.weight")
    assert all(torch.equal(a, b) for a, b in
               zip(lm_head, checkpoints.trajectory("transformer.wte.weight")))


def test_sharded_trainer_checkpoints(tmp_path: Path) -> None:
    model = tiny_gpt2()
    expected = {}
    for step in (10, 20, 30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        model.save_pretrained(tmp_path / f"checkpoint-{step}", max_shard_size="10KB")
    assert (tmp_path / "checkpoint-10" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "checkpoint-10").glob("model-*-of-*.safetensors"))) > 2
    snaps = open_snapshots(tmp_path)
    assert snaps.steps == [10, 20, 30] and len(snaps.keys) == 28
    assert len({s.file for s in snaps[0].checkpoint.values()}) > 2
    for key in snaps.keys:
        assert all(torch.equal(t, expected[n][key])
                   for t, n in zip(snaps.trajectory(key), (10, 20, 30)))


@pytest.mark.parametrize("names, steps", [
    (["step_10.safetensors", "step_9.safetensors", "step_100.safetensors"], [9, 10, 100]),
    (["model-001000.safetensors", "model-000200.safetensors", "model-000050.safetensors"],
     [50, 200, 1000]),
    (["run2-lr3e4-step-7.safetensors", "run2-lr3e4-step-30.safetensors",
      "run2-lr3e4-step-4.safetensors"], [4, 7, 30]),
    (["checkpoint-3.safetensors", "checkpoint-12.safetensors", "checkpoint-1.safetensors",
      "checkpoint-2.safetensors"], [1, 2, 3, 12]),
])
def test_flat_files_ordered_by_step(tmp_path: Path, names: list[str], steps: list[int]) -> None:
    flat(tmp_path, {name: tensors(int(re.findall(r"\d+", name)[-1])) for name in names})
    (tmp_path / "README.md").write_text("notes")
    snaps = open_snapshots(tmp_path)
    assert snaps.layout == "files" and snaps.steps == steps and snaps.keys == ["b", "w"]
    assert [t[0, 0].item() for t in snaps.trajectory("w")] == [float(s) for s in steps]
    assert [t[0].item() for t in snaps.trajectory("b")] == [-float(s) for s in steps]
    assert sorted(s.path.name for s in snaps) == sorted(names)


def test_recorder_every_keep_and_reopen(tmp_path: Path) -> None:
    model = tiny_gpt2()
    recorder = SnapshotRecorder(model, tmp_path / "snaps", every=2, keep=3)
    block = SnapshotRecorder(model, tmp_path / "block", every=2, include=BLOCK)
    expected, written = {}, []
    for step in range(11):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        if step % 2 == 0:
            expected[step] = {k: v.clone() for k, v in model.state_dict().items()}
        written.append(recorder(step))
        block.maybe_record(step)
    assert written[0] == tmp_path / "snaps" / "step-0.safetensors" and written[1] is None
    assert sorted(p.name for p in (tmp_path / "snaps").iterdir()) == sorted(
        [MANIFEST, "step-10.safetensors", "step-6.safetensors", "step-8.safetensors"])
    manifest = json.loads((tmp_path / "snaps" / MANIFEST).read_text())
    assert manifest["snapshots"] == [{"step": n, "file": f"step-{n}.safetensors"}
                                     for n in (6, 8, 10)]
    assert (manifest["format"], manifest["every"], manifest["keep"]) == ("surgeon-snapshots", 2, 3)
    assert manifest["tied"] == {"lm_head.weight": "transformer.wte.weight"}
    assert "lm_head.weight" not in load_file(str(tmp_path / "snaps" / "step-6.safetensors"))

    snaps = open_snapshots(tmp_path / "snaps")
    assert snaps.steps == [6, 8, 10] == recorder.steps and len(snaps.keys) == 28
    for key in snaps.keys:
        assert all(torch.equal(t, expected[n][key])
                   for t, n in zip(snaps.trajectory(key), (6, 8, 10)))

    only = open_snapshots(tmp_path / "block")
    assert only.steps == [0, 2, 4, 6, 8, 10] and len(only.keys) == 12
    assert all(k.startswith(BLOCK) for k in only.keys)
    key = BLOCK + "attn.c_proj.weight"
    assert all(torch.equal(t, expected[n][key])
               for t, n in zip(only.trajectory(key), only.steps))

    # a new recorder continues the directory; a step not after the last drops the later ones
    again = SnapshotRecorder(model, tmp_path / "snaps", every=2, keep=3)
    again.record(12)
    assert open_snapshots(tmp_path / "snaps").steps == [8, 10, 12]
    again.record(10)
    assert again.steps == [8, 10]
    assert sorted(p.name for p in (tmp_path / "snaps").glob("*.safetensors")) == [
        "step-10.safetensors", "step-8.safetensors"]
    with pytest.raises(SnapshotError, match="holds snapshots of other tensors"):
        SnapshotRecorder(model, tmp_path / "snaps", every=2, include=BLOCK).record(14)


def test_recorder_in_a_plain_loop_with_shared_memory(tmp_path: Path) -> None:
    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.arange(6.0).reshape(2, 3))
            self.register_buffer("row", self.w.data[1])  # another view of w's memory
            self.tied = self.w  # same parameter under two names: stored once

    net = Net()
    opt = torch.optim.SGD(net.parameters(), lr=1.0)
    recorder = SnapshotRecorder(net, tmp_path, every=1)
    for step in range(1, 4):
        opt.zero_grad()
        (net.w.sum() * step).backward()
        opt.step()
        recorder(step)
    assert recorder.steps == [1, 2, 3]
    saved = load_file(str(tmp_path / "step-3.safetensors"))
    assert sorted(saved) == ["row", "w"]
    assert torch.equal(saved["w"], torch.arange(6.0).reshape(2, 3) - 6.0)
    assert torch.equal(saved["row"], torch.tensor([-3.0, -2.0, -1.0]))
    snaps = open_snapshots(tmp_path)
    assert [t[0, 0].item() for t in snaps.trajectory("tied")] == [-1.0, -3.0, -6.0]


def test_non_finite_values_are_named_on_read(tmp_path: Path) -> None:
    bad = tensors(4)
    bad["w"][1, 2] = float("nan")
    inf = tensors(6)
    inf["b"][0] = float("inf")
    flat(tmp_path, {"step_2.safetensors": tensors(2), "step_4.safetensors": bad,
                    "step_6.safetensors": inf})
    snaps = open_snapshots(tmp_path)  # values are not read when opening
    with pytest.raises(SnapshotError) as err:
        snaps.trajectory("w")
    assert "'w' holds NaN (1 of 6 values) at step 4" in str(err.value)
    assert str(tmp_path / "step_4.safetensors") in str(err.value)
    with pytest.raises(SnapshotError, match=r"'b' holds Inf \(1 of 3 values\) at step 6"):
        snaps.trajectory("b")
    with pytest.raises(SnapshotError, match="'b' holds Inf"):
        snaps.check_finite()
    with pytest.raises(SnapshotError, match="'w' holds NaN"):
        snaps.check_finite(["w"])
    with pytest.raises(SnapshotError, match="have no key 'x'"):
        snaps.trajectory("x")


def write_pickle_checkpoints(d: Path) -> Path:
    for n in (1, 2, 3):
        (d / f"checkpoint-{n}").mkdir(parents=True)
        torch.save(tensors(n), d / f"checkpoint-{n}" / "pytorch_model.bin")
        torch.save({}, d / f"checkpoint-{n}" / "optimizer.pt")
    return d / "checkpoint-1" / "pytorch_model.bin"


def write_manifest(d: Path, manifest: object) -> Path:
    flat(d, {f"step-{n}.safetensors": tensors(n) for n in (1, 2, 3)})
    text = manifest if isinstance(manifest, str) else json.dumps(manifest)
    (d / MANIFEST).write_text(text)
    return d / MANIFEST


def shard_dir(d: Path) -> Path:
    flat(d, {f"model-0000{i}-of-00003.safetensors": tensors(i) for i in (1, 2, 3)})
    return d / "model-00001-of-00003.safetensors"


def index_dir(d: Path) -> Path:
    shard_dir(d)
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {}}))
    return d


def corrupt(d: Path) -> Path:
    flat(d, {f"step_{n}.safetensors": tensors(n) for n in (1, 2, 3)})
    (d / "step_2.safetensors").write_bytes(b"\x00" * 4)
    return d / "step_2.safetensors"


def is_file(d: Path) -> Path:
    d.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors(1), str(d))
    return d


BAD: list[tuple[str, Callable[[Path], object], str]] = [
    ("empty", lambda d: d.mkdir(), "no snapshots in"),
    ("missing", lambda d: None, "does not exist"),
    ("file", is_file, "is a file, not a directory of snapshots"),
    ("two", lambda d: flat(d, {"step_1.safetensors": tensors(1), "step_2.safetensors":
                               tensors(2)}),
     "found 2 snapshots in {d} (steps: 1, 2), growth needs at least 3; save more often"),
    ("duplicate", lambda d: flat(d, {"step_5.safetensors": tensors(5), "model-005.safetensors":
                                     tensors(5), "step_6.safetensors": tensors(6)}),
     "two snapshots in {d} are step 5: "),
    ("missing key", lambda d: flat(d, {"s1.safetensors": tensors(1), "s2.safetensors":
                                       tensors(2), "s3.safetensors": {"w": torch.zeros(2, 3)}}),
     "step 3 ({d}/s3.safetensors) has no key 'b', which step 1 ({d}/s1.safetensors) has "
     "(1 key differs)"),
    ("extra key", lambda d: flat(d, {"s1.safetensors": tensors(1), "s2.safetensors":
                                     tensors(2, c=torch.ones(1)), "s3.safetensors": tensors(3)}),
     "step 1 ({d}/s1.safetensors) has no key 'c', which step 2"),
    ("shape", lambda d: flat(d, {"s1.safetensors": tensors(1), "s2.safetensors": tensors(2),
                                 "s3.safetensors": {**tensors(3), "w": torch.zeros(3, 3)}}),
     "'w' is float32 [2, 3] in step 1 ({d}/s1.safetensors) but float32 [3, 3] in step 3 "
     "({d}/s3.safetensors)"),
    ("dtype", lambda d: flat(d, {"s1.safetensors": tensors(1), "s2.safetensors": {
        **tensors(2), "b": torch.zeros(3, dtype=torch.bfloat16)}, "s3.safetensors": tensors(3)}),
     "'b' is float32 [3] in step 1 ({d}/s1.safetensors) but bfloat16 [3] in step 2"),
    ("pickle checkpoints", write_pickle_checkpoints,
     "{d}/checkpoint-1/pytorch_model.bin is a pickle checkpoint; surgeon reads safetensors only"),
    ("pickle files", lambda d: (d.mkdir(), torch.save(tensors(1), d / "step_1.pt")),
     "{d}/step_1.pt is a pickle checkpoint; surgeon reads safetensors only"),
    ("incomplete checkpoint", lambda d: (flat(d / "checkpoint-1", {"model.safetensors":
                                                                  tensors(1)}),
                                         (d / "checkpoint-2").mkdir()),
     "{d}/checkpoint-2 has no model.safetensors or model.safetensors.index.json"),
    ("adapter", lambda d: flat(d / "checkpoint-1", {"adapter_model.safetensors": tensors(1)}),
     "{d}/checkpoint-1 holds a PEFT adapter"),
    ("one checkpoint", index_dir, "{d} is one sharded checkpoint"),
    ("shards", shard_dir, "{d}/model-00001-of-00003.safetensors is a shard of one checkpoint"),
    ("no step", lambda d: flat(d, {"model.safetensors": tensors(1)}),
     "{d}/model.safetensors has no step in its name"),
    ("corrupt", corrupt, "snapshot of step 2: {d}/step_2.safetensors is not a safetensors file"),
    ("bad manifest", lambda d: write_manifest(d, "{"), "{d}/surgeon-snapshots.json cannot be read"),
    ("manifest format", lambda d: write_manifest(d, {"format": "x", "version": 1,
                                                     "snapshots": []}),
     "{d}/surgeon-snapshots.json is not a valid snapshot manifest (format is 'x'"),
    ("manifest file", lambda d: write_manifest(d, {
        "format": "surgeon-snapshots", "version": 1,
        "snapshots": [{"step": n, "file": f"step-{n}.safetensors"} for n in (1, 2, 3, 4)]}),
     "{d}/surgeon-snapshots.json lists 'step-4.safetensors' for step 4, which is not a file"),
]


@pytest.mark.parametrize("make, fragment", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_snapshot_directories(tmp_path: Path, make: Callable[[Path], object],
                                  fragment: str) -> None:
    d = tmp_path / "snaps"
    make(d)
    with pytest.raises(SnapshotError) as err:
        open_snapshots(d)
    message = str(err.value)
    assert fragment.format(d=d) in message and str(d) in message
    assert "\n" not in message


def test_key_prefixes_must_match(tmp_path: Path) -> None:
    flat(tmp_path, {f"step_{n}.safetensors": tensors(n) for n in (1, 2, 3)})
    snaps: Snapshots = open_snapshots(tmp_path, keys=["w"])
    assert snaps.keys == ["w"]
    with pytest.raises(SnapshotError, match=r"no key in .*step_1.safetensors \(step 1\) starts "
                                            r"with 'model.'"):
        open_snapshots(tmp_path, keys="model.")
    # a mismatch outside the selected keys does not matter
    save_file({"w": torch.full((2, 3), 4.0)}, str(tmp_path / "step_4.safetensors"))
    assert open_snapshots(tmp_path, keys="w").steps == [1, 2, 3, 4]
    with pytest.raises(SnapshotError, match="found 4 snapshots .* at least 5"):
        open_snapshots(tmp_path, min_count=5, keys="w")
    with pytest.raises(SnapshotError, match="min_count=0 must be an int >= 1"):
        open_snapshots(tmp_path, min_count=0)
    with pytest.raises(SnapshotError, match=r"keys=\[''\]: give key prefixes"):
        open_snapshots(tmp_path, keys=[""])
    snaps.check_finite("w")
    with pytest.raises(SnapshotError, match="no key in the snapshots in .* starts with 'q'"):
        snaps.check_finite("q")


@pytest.mark.parametrize("kwargs, fragment", [
    ({"every": 0}, "every=0: record every N steps with an int N >= 1"),
    ({"every": 1.5}, "every=1.5"),
    ({"every": 2, "keep": 2}, "keep=2: growth needs at least 3 snapshots"),
    ({"every": 2, "include": "model.layers.3."}, "no key in the model's state_dict starts with "
                                                 "'model.layers.3.'"),
    ({"every": 2, "include": []}, "include=[]: give key prefixes"),
])
def test_bad_recorder_arguments(tmp_path: Path, kwargs: dict, fragment: str) -> None:
    with pytest.raises(SnapshotError) as err:
        SnapshotRecorder(tiny_gpt2(), tmp_path, **kwargs)
    assert fragment in str(err.value)
    if "include" not in kwargs:
        with pytest.raises(SnapshotError, match=fragment.split(":")[0]):
            SnapshotCallback(**kwargs)


def test_recorder_refuses_a_file_and_bad_steps(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("")
    with pytest.raises(SnapshotError, match=f"{tmp_path / 'f'} is a file"):
        SnapshotRecorder(tiny_gpt2(), tmp_path / "f", every=1)
    recorder = SnapshotRecorder(torch.nn.Linear(2, 2), tmp_path / "d", every=1)
    with pytest.raises(SnapshotError, match="step -1 must be a non-negative int"):
        recorder.record(-1)
    assert not list((tmp_path / "d").iterdir())
