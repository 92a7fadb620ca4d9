"""`surgeon grow` on the layouts the README shows, and what growth must not change.

A `SnapshotRecorder(include=<last block>)` directory passes `--check` and grows with
`--checkpoint` (without it: one line naming the option); a Trainer run with `SnapshotCallback`
grows from `OUTPUT_DIR` (its `snapshots/`, its last saved model); `--init zero` on T5 keeps the
logits exactly on either side and at either end (the block-0-only relative_attention_bias stays
at position 0); only per-layer config lists widen (`eos_token_id` stays); a checkpoint of
another shape is refused before anything is written; written files follow the umask.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import transformers
from cli_runner import run
from transformers import Trainer, TrainingArguments
from zoo import hf_t5

from surgeon.growth.insert import Blocks, widen_config
from surgeon.growth.snapshots import SnapshotRecorder
from surgeon.integrations.snapshots import SnapshotCallback

TINY = Path(__file__).parent.parent / "examples" / "tiny-llama"
LAST = "model.layers.1."  # tiny-llama has 2 blocks: the README's "model.layers.11." of 12
IDS = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(3))


def train_steps(model: torch.nn.Module, steps: int, recorders: list[SnapshotRecorder]) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(1, steps + 1):
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        for recorder in recorders:
            recorder(step)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A loop with SnapshotRecorder(include=LAST) every step, the model saved at the end."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("recorded")
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY)
    train_steps(model, 4, [SnapshotRecorder(model, root / "rec", every=1, include=LAST)])
    model.save_pretrained(root / "final")
    return root


def test_recorder_with_include_checks_and_grows_with_checkpoint(recorded: Path,
                                                                tmp_path: Path) -> None:
    rec = recorded / "rec"
    checked = run("grow", str(rec), "--check", "--json")
    assert checked.exit_code == 0, checked.output
    assert [t["index"] for t in json.loads(checked.stdout)] == [1]

    missing = run("grow", str(rec), str(tmp_path / "a"))
    assert missing.exit_code == 1 and "--checkpoint DIR" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and not (tmp_path / "a").exists()

    out = tmp_path / "grown"
    grown = run("grow", str(rec), str(out), "--checkpoint", str(recorded / "final"), "--json")
    assert grown.exit_code == 0, grown.output
    summary = json.loads(grown.stdout)
    assert summary["depth"] == [2, 3] and summary["source"] == 1
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 3

    unrecorded = run("grow", str(rec), str(tmp_path / "b"), "--checkpoint",
                     str(recorded / "final"), "--source", "0")
    assert unrecorded.exit_code == 1 and "blocks recorded under 'model.layers.': [1]" in (
        unrecorded.stderr) and not (tmp_path / "b").exists()


def trainer(out: Path, save_steps: int, save_model: bool) -> Path:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 512, (16, 8))]
    args = TrainingArguments(output_dir=str(out), max_steps=8, save_steps=save_steps,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             learning_rate=1e-3, logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0)
    job = Trainer(model=model, args=args, train_dataset=data,
                  callbacks=[SnapshotCallback(every=2, include=LAST)])
    job.train()
    if save_model:
        job.save_model()
    return out


@pytest.mark.parametrize("save_model, grows", [(False, "checkpoint-8"), (True, ".")])
def test_snapshot_callback_output_dir_grows(save_model: bool, grows: str,
                                            tmp_path: Path) -> None:
    out = trainer(tmp_path / "run", 500, save_model)  # one checkpoint-8, four snapshots
    checked = run("grow", str(out), "--check")
    assert checked.exit_code == 0, checked.output
    result = run("grow", str(out), str(tmp_path / "grown"), "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert Path(summary["checkpoint"]) == (out / grows) and summary["depth"] == [2, 3]
    growth = json.loads((tmp_path / "grown" / "growth.json").read_text())
    assert growth["steps"] == [2, 4, 6, 8]
    assert not (tmp_path / "grown" / "snapshots").exists()


def test_snapshot_callback_with_a_stale_checkpoint_says_what_to_do(tmp_path: Path) -> None:
    out = trainer(tmp_path / "run", 4, False)
    shutil.rmtree(out / "checkpoint-8")  # newest model left: step 4, snapshots run to 8
    result = run("grow", str(out), str(tmp_path / "grown"))
    assert result.exit_code == 1 and "older than the last snapshot (step 8)" in result.stderr
    assert not (tmp_path / "grown").exists()


def t5_logits(model: torch.nn.Module) -> torch.Tensor:
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=ids, decoder_input_ids=ids).logits


@pytest.mark.parametrize("blocks, depth, widened", [
    ([], "decoder", ["num_decoder_layers"]),
    (["--after", "0"], "decoder", ["num_decoder_layers"]),  # from block 0: o, not the bias
    (["--after", "-1"], "decoder", ["num_decoder_layers"]),  # the bias moves to the new block 0
    (["--blocks", "encoder.block"], "encoder", ["num_layers"])])
def test_zero_growth_of_t5_keeps_logits(blocks: list[str], depth: str, widened: list[str],
                                        tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = hf_t5().eval()
    model.save_pretrained(tmp_path / "t5")
    result = run("grow", str(tmp_path / "t5"), str(tmp_path / "grown"), "--init", "zero",
                 "--json", *blocks)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["config_changes"] == widened
    grown, info = transformers.T5ForConditionalGeneration.from_pretrained(
        tmp_path / "grown", output_loading_info=True)
    grown.eval()
    assert not any(info.values()), info  # no missing or unexpected keys
    sides = {"encoder": len(grown.encoder.block), "decoder": len(grown.decoder.block)}
    assert sides == {s: 3 if s == depth else 2 for s in sides}
    assert torch.equal(t5_logits(grown), t5_logits(model))


def test_only_per_layer_lists_widen(tmp_path: Path) -> None:
    config = json.loads((TINY / "config.json").read_text())
    config["eos_token_id"] = [2, 7]
    config["layer_types"] = ["full_attention", "full_attention"]
    shutil.copytree(TINY, tmp_path / "src")
    (tmp_path / "src" / "config.json").write_text(json.dumps(config))
    result = run("grow", str(tmp_path / "src"), str(tmp_path / "grown"), "--init", "copy")
    assert result.exit_code == 0, result.output
    grown = json.loads((tmp_path / "grown" / "config.json").read_text())
    assert grown["eos_token_id"] == [2, 7] and grown["num_hidden_layers"] == 3
    assert grown["layer_types"] == ["full_attention"] * 3
    assert transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "grown").config \
        .eos_token_id == [2, 7]


BLOCKS4 = Blocks("model.layers.", (0, 1, 2, 3), {i: ("w",) for i in range(4)})


@pytest.mark.parametrize("entry, value, after, source, expected", [
    ("layer_types", ["f", "s", "f", "s"], 1, 1, ["f", "s", "s", "f", "s"]),
    ("mlp_only_layers", [0, 3], 1, 1, [0, 4]),  # block indices renumbered
    ("mlp_only_layers", [0, 1], 1, 1, [0, 1, 2]),  # the new block is dense like its source
    ("moe_layers", [2, 3], 0, 0, [3, 4]),
    ("kv_source_layers", [0, 0, 2, 2], 2, 2, [0, 0, 2, 3, 2]),  # new block: its own cache
    ("kv_source_layers", [0, 0, 2, 2], 2, 3, [0, 0, 2, 2, 2]),  # like block 3: block 2's
    ("eos_token_id", [1, 2, 3, 4], 1, 1, [1, 2, 3, 4]),  # four long, not per layer
    ("bad_words_ids", [[1], [2], [3], [4]], 1, 1, [[1], [2], [3], [4]]),
])
def test_widen_config_lists(entry: str, value: list, after: int, source: int,
                            expected: list) -> None:
    widened, changed = widen_config({"num_hidden_layers": 4, entry: value}, BLOCKS4, after, 1,
                                    source)
    assert widened[entry] == expected and widened["num_hidden_layers"] == 5
    assert (entry in changed) == (expected != value)


@pytest.mark.parametrize("config, blocks, expected", [
    ({"encoder_layers": 4, "decoder_layers": 4}, "model.decoder.layers.",
     {"encoder_layers": 4, "decoder_layers": 5}),
    ({"encoder_layers": 4, "decoder_layers": 4}, "model.encoder.layers.",
     {"encoder_layers": 5, "decoder_layers": 4}),
    ({"encoder": {"num_hidden_layers": 4}, "decoder": {"num_hidden_layers": 4}}, "decoder.",
     {"encoder": {"num_hidden_layers": 4}, "decoder": {"num_hidden_layers": 5}}),
    ({"text_config": {"num_hidden_layers": 4}, "vision_config": {"num_hidden_layers": 4}},
     "model.language_model.layers.",
     {"text_config": {"num_hidden_layers": 5}, "vision_config": {"num_hidden_layers": 4}}),
])
def test_widen_config_grows_one_depth(config: dict, blocks: str, expected: dict) -> None:
    found = Blocks(blocks, BLOCKS4.indices, BLOCKS4.members)
    assert widen_config(config, found, 3, 1, 3)[0] == expected


def test_checkpoint_of_another_shape_is_refused(recorded: Path, tmp_path: Path) -> None:
    config = transformers.AutoConfig.from_pretrained(TINY)
    config.intermediate_size = 96
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "other")
    result = run("grow", str(recorded / "rec"), str(tmp_path / "grown"), "--checkpoint",
                 str(tmp_path / "other"))
    assert result.exit_code == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "'model.layers.1.mlp.down_proj.weight' is [64, 96]" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]  # nothing written


@pytest.fixture(params=[0o022, 0o027])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def test_written_files_follow_the_umask(umask: int, tmp_path: Path) -> None:
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY)
    train_steps(model, 3, [SnapshotRecorder(model, tmp_path / "rec", every=1, include=LAST)])
    model.save_pretrained(tmp_path / "final")
    result = run("grow", str(tmp_path / "rec"), str(tmp_path / "grown"), "--checkpoint",
                 str(tmp_path / "final"))
    assert result.exit_code == 0, result.output
    for directory in (tmp_path / "rec", tmp_path / "grown"):
        assert directory.stat().st_mode & 0o777 == 0o777 & ~umask
        modes = {f.name: f.stat().st_mode & 0o777 for f in directory.iterdir()}
        assert modes and set(modes.values()) == {0o666 & ~umask}, modes


def test_grow_help_describes_every_option_and_shows_examples() -> None:
    from surgeon.cli import main

    command = main.get_command(None, "grow")
    bare = [p.name for p in command.params if p.param_type_name == "option" and not p.help]
    assert bare == []
    shown = run("grow", "--help")
    assert shown.exit_code == 0 and "Examples:" in shown.stdout
    assert "surgeon grow runs/llama --check" in shown.stdout and "--checkpoint" in shown.stdout
