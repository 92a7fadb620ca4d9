"""surgeon.growth.grow and `surgeon grow`: growing real Trainer runs and saved checkpoints.

`zero` growth leaves GPT-2 and Llama outputs identical; `copy` duplicates the source block bit
for bit; keys, config and `layer_types` are right for sharded and unsharded checkpoints; a grown
Trainer checkpoint loads with `from_pretrained` at the new depth and trains; `extrapolate`
records its geometry; `--check` reports stagnation; bad inputs leave nothing behind.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from cli_runner import run
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainingArguments

from surgeon.files.weights import Checkpoint
from surgeon.growth.geometry import GrowthConfig
from surgeon.growth.grow import check, grow

LAYERS = 2
MODELS = {  # name: (builder, block prefix, depth key)
    "gpt2": (lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=32, n_layer=LAYERS, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0,
        eos_token_id=0)), "transformer.h.", "n_layer"),
    "llama": (lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, vocab_size=64)), "model.layers.", "num_hidden_layers"),
    "qwen3": (lambda: transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, vocab_size=64, sliding_window=8,
        layer_types=["full_attention", "sliding_attention"])), "model.layers.",
        "num_hidden_layers"),
}
IDS = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))


def snapshots(name: str, root: Path, shard: str | None = None) -> tuple[Path, torch.nn.Module]:
    """Four `checkpoint-<step>` directories of a model drifting a little at each step."""
    torch.manual_seed(0)
    model = MODELS[name][0]().eval()
    for step in (10, 20, 30, 40):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(root / f"checkpoint-{step}", **kwargs)
    return root, model


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def stored(directory: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint.open(directory)
    return {k: ck.read(k) for k in ck}


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_zero_growth_keeps_the_function(name: str, tmp_path: Path) -> None:
    run_dir, model = snapshots(name, tmp_path / "run")
    for after in (-1, 0, LAYERS - 1):
        out = tmp_path / f"grown{after}"
        result = grow(run_dir, out, init="zero", after=after)
        grown = type(model).from_pretrained(out).eval()
        assert result.depth == (LAYERS, LAYERS + 1)
        assert len(grown.get_submodule(MODELS[name][1][:-1])) == LAYERS + 1
        assert torch.equal(logits(grown), logits(model)), after
        zeroed = [r["key"] for r in result.tensors if r["init"] == "zero"]
        assert len(zeroed) >= 2  # at least the attention and MLP output projections


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shard", [None, "20KB"])
def test_copy_growth_keys_config_and_bytes(name: str, shard: str | None, tmp_path: Path) -> None:
    run_dir, model = snapshots(name, tmp_path / "run", shard)
    _, prefix, depth = MODELS[name]
    out = tmp_path / "grown"
    result = grow(run_dir, out, init="copy", after=0, count=2, source=1,
                  max_shard_size=shard or "50GB")
    assert result.depth == (LAYERS, LAYERS + 2) and depth in result.config_changes
    config = json.loads((out / "config.json").read_text())
    assert config[depth] == LAYERS + 2
    if name == "qwen3":
        assert config["layer_types"] == ["full_attention", "sliding_attention",
                                         "sliding_attention", "sliding_attention"]
    assert ((out / "model.safetensors.index.json").is_file()) == (shard is not None)
    before, after = stored(run_dir / "checkpoint-40"), stored(out)
    # old block 0 stays, new blocks 1 and 2 copy old block 1, old block 1 becomes block 3
    for key, value in before.items():
        if not key.startswith(prefix):
            assert torch.equal(after[key], value), key
            continue
        index, rest = key[len(prefix):].split(".", 1)
        target = {"0": ["0"], "1": ["1", "2", "3"]}[index]
        for t in target:
            assert torch.equal(after[f"{prefix}{t}.{rest}"], value), (key, t)
    assert len(after) == len(before) + 2 * sum(k.startswith(prefix + "1.") for k in before)
    grown = type(model).from_pretrained(out)
    assert len(grown.get_submodule(prefix[:-1])) == LAYERS + 2


def test_extrapolate_writes_geometry_and_is_deterministic(tmp_path: Path) -> None:
    run_dir, _ = snapshots("llama", tmp_path / "run")
    first = grow(run_dir, tmp_path / "a")
    grow(run_dir, tmp_path / "b")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["config.json", "generation_config.json", "growth.json",
                     "model.safetensors"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    record = json.loads((tmp_path / "a" / "growth.json").read_text())
    assert record["init"] == "extrapolate" and record["steps"] == [10, 20, 30, 40]
    assert record["after"] == LAYERS - 1 and record["source"] == LAYERS - 1
    block = [k for k in stored(run_dir / "checkpoint-40") if k.startswith("model.layers.1.")]
    assert sorted(r["key"] for r in record["tensors"]) == sorted(
        k[len("model.layers.1."):] for k in block)
    for row in record["tensors"]:
        assert {"tau", "kappa", "beta", "gamma", "eta", "relative_update"} <= set(row)
        assert row["tau"] >= 1.0 - 1e-9 and 0.0 < row["relative_update"] < 1.0
    new = stored(tmp_path / "a")
    last = stored(run_dir / "checkpoint-40")
    moved = [k for k in block if not torch.equal(new[k.replace(".1.", ".2.", 1)], last[k])]
    assert moved == block  # every tensor of the new block moved off the newest snapshot
    assert first.new_parameters == sum(last[k].numel() for k in block)


def test_check_reports_stagnation(tmp_path: Path) -> None:
    run_dir, _ = snapshots("gpt2", tmp_path / "run")
    trends = check(run_dir)
    assert [t.index for t in trends] == list(range(LAYERS))
    for t in trends:  # a random walk of 3 steps: τ ≈ √3, κ ≈ √2
        assert 1.5 < t.tau < 2.0 and 1.0 < t.kappa < 1.8 and not t.stagnating
    loose = check(run_dir, settings=GrowthConfig(tau_crit=1.0, kappa_crit=0.5))
    assert all(t.stagnating for t in loose)
    result = run("grow", str(run_dir), "--check", "--tau-crit", "1.0")
    assert result.exit_code == 0, result.output
    assert "stagnating blocks: 0, 1" in result.stdout
    result = run("grow", str(run_dir), "--check", "--json")
    assert [row["index"] for row in json.loads(result.stdout)] == [0, 1]
    assert not any(tmp_path.joinpath(p).exists() for p in ("grown",))


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A real Trainer run of a tiny Llama: max_steps=6, save_steps=2."""
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("trainer")
    model = MODELS["llama"][0]()
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (12, 8))]
    extra = {}
    if "save_safetensors" in inspect.signature(TrainingArguments).parameters:
        extra["save_safetensors"] = True
    args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=2,
                             per_device_train_batch_size=2, report_to=[], use_cpu=True,
                             learning_rate=1e-2, logging_strategy="no", disable_tqdm=True,
                             dataloader_num_workers=0, **extra)
    Trainer(model=model, args=args, train_dataset=data).train()
    return out, model


def test_grow_a_trainer_run_then_train_it(trainer_run: tuple[Path, torch.nn.Module],
                                          tmp_path: Path) -> None:
    run_dir, _ = trainer_run
    out = tmp_path / "grown"
    result = run("grow", str(run_dir), str(out), "--json")
    assert result.exit_code == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["depth"] == [LAYERS, LAYERS + 1] and summary["init"] == "extrapolate"
    files = {p.name for p in out.iterdir()}
    assert not files & {"trainer_state.json", "optimizer.pt", "scheduler.pt", "training_args.bin"}
    grown = transformers.LlamaForCausalLM.from_pretrained(out)
    assert grown.config.num_hidden_layers == LAYERS + 1
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        loss = grown(input_ids=IDS, labels=IDS).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "model.layers.2.mlp.down_proj.weight" in f.keys()


@pytest.mark.parametrize("args, message", [
    (["--count", "0"], "--count must be at least 1"),
    (["--after", "5"], "--after 5 is not a block: the checkpoint has blocks 0..1"),
    (["--source", "7"], "--source 7 is not a block"),
    (["--blocks", "encoder.layer"], "no integer-indexed blocks under 'encoder.layer'"),
    (["--beta0", "-1"], "beta0"),
])
def test_bad_options_leave_nothing(args: list[str], message: str, tmp_path: Path) -> None:
    run_dir, _ = snapshots("gpt2", tmp_path / "run")
    result = run("grow", str(run_dir), str(tmp_path / "grown"), *args)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def _drop_to_two(run_dir: Path) -> None:
    for step in (10, 20):
        shutil.rmtree(run_dir / f"checkpoint-{step}")


def _nan_in_source_block(run_dir: Path) -> None:
    file = run_dir / "checkpoint-20" / "model.safetensors"
    tensors = load_file(str(file))
    tensors["transformer.h.1.mlp.c_fc.weight"][0, 0] = float("nan")
    save_file(tensors, str(file), metadata={"format": "pt"})


def _missing_key(run_dir: Path) -> None:
    file = run_dir / "checkpoint-30" / "model.safetensors"
    tensors = load_file(str(file))
    del tensors["transformer.h.0.ln_1.bias"]
    save_file(tensors, str(file), metadata={"format": "pt"})


def _pickle_only(run_dir: Path) -> None:
    ckpt = run_dir / "checkpoint-30"
    torch.save(load_file(str(ckpt / "model.safetensors")), ckpt / "pytorch_model.bin")
    (ckpt / "model.safetensors").unlink()


@pytest.mark.parametrize("spoil, message", [
    (_drop_to_two, "growth needs at least 3"),
    (_nan_in_source_block, "holds NaN"),
    (_missing_key, "transformer.h.0.ln_1.bias"),
    (_pickle_only, "pytorch_model.bin"),
])
def test_bad_snapshot_directories_leave_nothing(spoil, message: str, tmp_path: Path) -> None:
    run_dir, _ = snapshots("gpt2", tmp_path / "run")
    spoil(run_dir)
    result = run("grow", str(run_dir), str(tmp_path / "grown"))
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in result.stderr, lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_missing_snapshot_directory(tmp_path: Path) -> None:
    missing = run("grow", str(tmp_path / "nowhere"), str(tmp_path / "grown"))
    assert missing.exit_code == 1 and "nowhere" in missing.stderr
    assert list(tmp_path.iterdir()) == []
