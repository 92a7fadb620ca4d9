"""Crafted checkpoint directories: every path read from a file stays inside its directory, a
hostile safetensors header or index is refused in one line before anything proportional to it
is read, no destination ever replaces what the command reads, --overwrite replaces only what
surgeon wrote (recoverably, even when killed between its two renames), only checkpoint files
are carried from SRC into DST, and the weights file read is the one transformers loads."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
import torch
from cli_runner import run

from surgeon.files.atomic import MARKER, DestinationError, atomic_directory, check_destination
from surgeon.files.output import CarryWarning, carry_files
from surgeon.files.weights import INDEX, SINGLE, Checkpoint, WeightsError, write_checkpoint
from surgeon.growth.snapshots import MANIFEST, SnapshotError, open_snapshots

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "examples" / "tiny-llama"


def digests(*roots: Path) -> dict[str, str]:
    """sha256 of every file under `roots` (symlinks not followed), by path."""
    out = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def one_error_line(result) -> str:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # handled, not a crash
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def model_dir(path: Path, shard: str | None = None) -> Path:
    """tiny-llama's config and weights at `path` (sharded at `shard` bytes where given)."""
    path.mkdir(parents=True)
    shutil.copy(TINY / "config.json", path / "config.json")
    if shard is None:
        shutil.copy(TINY / SINGLE, path / SINGLE)
    else:
        write_checkpoint(path, Checkpoint.open(TINY), max_shard_size=shard)
    return path


def header_file(path: Path, header: object | bytes, data: bytes = b"", length: int | None = None
                ) -> Path:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


# --- paths from files stay inside their directory ---------------------------------------------


def _index(directory: Path, weight_map: object, data: object = None) -> None:
    body = {"metadata": {}, "weight_map": weight_map} if data is None else data
    (directory / INDEX).write_text(json.dumps(body))


def _sharded(tmp: Path) -> tuple[Path, dict[str, str]]:
    src = model_dir(tmp / "m", shard="200KB")
    return src, json.loads((src / INDEX).read_text())["weight_map"]


def _parent_shard(tmp: Path) -> Path:
    src, wm = _sharded(tmp)
    first = sorted(set(wm.values()))[0]
    shutil.move(src / first, tmp / first)  # a real file, one level up
    _index(src, {k: (f"../{v}" if v == first else v) for k, v in wm.items()})
    return src


def _absolute_shard(tmp: Path) -> Path:
    src, wm = _sharded(tmp)
    first = sorted(set(wm.values()))[0]
    shutil.move(src / first, tmp / first)
    _index(src, {k: (str(tmp / first) if v == first else v) for k, v in wm.items()})
    return src


def _symlinked_shard(tmp: Path) -> Path:
    src, wm = _sharded(tmp)
    first = sorted(set(wm.values()))[0]
    shutil.move(src / first, tmp / first)
    (src / first).symlink_to(tmp / first)  # the name is plain; the file lies outside
    return src


def _symlinked_single(tmp: Path) -> Path:
    src = model_dir(tmp / "m")
    shutil.move(src / SINGLE, tmp / SINGLE)
    (src / SINGLE).symlink_to(tmp / SINGLE)
    return src


def _symlinked_index(tmp: Path) -> Path:
    src, _ = _sharded(tmp)
    outside = tmp / "elsewhere"
    outside.mkdir()
    shutil.move(src / INDEX, outside / INDEX)
    (src / INDEX).symlink_to(outside / INDEX)
    return src


def _escaping_transformers_weights(tmp: Path) -> Path:
    src = model_dir(tmp / "m")
    shutil.copy(TINY / SINGLE, tmp / "other.safetensors")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config,
                                                 "transformers_weights": "../other.safetensors"}))
    return src


TRAVERSAL = {
    "../ in weight_map": (_parent_shard, "'../model-00001-of-"),
    "absolute path in weight_map": (_absolute_shard, "outside"),
    "shard symlinked outside": (_symlinked_shard, "which resolves to"),
    "model.safetensors symlinked outside": (_symlinked_single, "which resolves to"),
    "index symlinked outside": (_symlinked_index, "which resolves to"),
    "transformers_weights outside": (_escaping_transformers_weights, "'../other.safetensors'"),
}


@pytest.mark.parametrize("case", list(TRAVERSAL))
def test_traversal_is_refused_in_one_line(case: str, tmp_path: Path) -> None:
    make, fragment = TRAVERSAL[case]
    src = make(tmp_path)
    before = digests(tmp_path)
    if case != "transformers_weights outside":  # that one is in config.json, read by convert
        with pytest.raises(WeightsError, match="must lie inside its directory"):
            Checkpoint.open(src)
    line = one_error_line(run("convert", str(src), str(tmp_path / "out"), "-p", "aion"))
    assert fragment in line and "must lie inside its directory" in line
    assert not (tmp_path / "out").exists()
    assert digests(tmp_path) == before
    for command in (("inspect", str(src)),):  # transformers' own loader is guarded too
        assert "must lie inside its directory" in one_error_line(run(*command))


def test_symlink_inside_the_directory_is_followed(tmp_path: Path) -> None:
    src, wm = _sharded(tmp_path)
    first = sorted(set(wm.values()))[0]
    (src / "blobs").mkdir()
    shutil.move(src / first, src / "blobs" / first)
    (src / first).symlink_to(Path("blobs") / first)  # as the hub cache links its files
    assert set(Checkpoint.open(src)) == set(Checkpoint.open(TINY))


def test_hub_cache_snapshot_links_into_its_blobs(tmp_path: Path) -> None:
    """huggingface_hub's cache: snapshots/<rev>/f -> ../../blobs/<sha>; that stays inside."""
    repo = tmp_path / "models--o--tiny"
    snap = repo / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("config.json", SINGLE):
        shutil.copy(TINY / name, repo / "blobs" / name)
        (snap / name).symlink_to(Path("../../blobs") / name)
    assert set(Checkpoint.open(snap)) == set(Checkpoint.open(TINY))


def _recorder_dir(tmp: Path, files: dict[int, str]) -> Path:
    snaps = tmp / "snaps"
    snaps.mkdir()
    for step in files:
        shutil.copy(TINY / SINGLE, snaps / f"step-{step}.safetensors")
    manifest = {"format": "surgeon-snapshots", "version": 1, "tied": {},
                "snapshots": [{"step": s, "file": f} for s, f in files.items()]}
    (snaps / MANIFEST).write_text(json.dumps(manifest))
    return snaps


def _manifest_parent(tmp: Path) -> Path:
    shutil.copy(TINY / SINGLE, tmp / "x.safetensors")
    return _recorder_dir(tmp, {1: "step-1.safetensors", 2: "step-2.safetensors",
                               3: "../x.safetensors"})


def _manifest_absolute(tmp: Path) -> Path:
    shutil.copy(TINY / SINGLE, tmp / "x.safetensors")
    return _recorder_dir(tmp, {1: "step-1.safetensors", 2: "step-2.safetensors",
                               3: str(tmp / "x.safetensors")})


def _manifest_symlink(tmp: Path) -> Path:
    snaps = _recorder_dir(tmp, {1: "step-1.safetensors", 2: "step-2.safetensors",
                                3: "step-3.safetensors"})
    shutil.move(snaps / "step-3.safetensors", tmp / "x.safetensors")
    (snaps / "step-3.safetensors").symlink_to(tmp / "x.safetensors")
    return snaps


MANIFESTS = {
    "../ in the manifest": (_manifest_parent, "'../x.safetensors'"),
    "absolute path in the manifest": (_manifest_absolute, "x.safetensors"),
    "manifest entry symlinked outside": (_manifest_symlink, "which resolves to"),
}


@pytest.mark.parametrize("case", list(MANIFESTS))
def test_snapshot_manifest_paths_stay_inside(case: str, tmp_path: Path) -> None:
    make, fragment = MANIFESTS[case]
    snaps = make(tmp_path)
    with pytest.raises(SnapshotError, match="step 3") as e:
        open_snapshots(snaps)
    assert fragment in str(e.value)
    before = digests(tmp_path)
    line = one_error_line(run("grow", str(snaps), str(tmp_path / "out"), "--checkpoint",
                              str(TINY)))
    assert fragment in line
    assert not (tmp_path / "out").exists() and digests(tmp_path) == before


# --- hostile headers and indexes: one line, nothing proportional read -------------------------

HEADERS = {  # name: (header, data, claimed header length, message)
    "length 2^60": (b"{}", b"", 2**60, "header of 1152921504606846976 bytes"),
    "length 2^64-1": (b"{}", b"", 2**64 - 1, "is not a safetensors file"),
    "offsets past EOF": ({"a": {"dtype": "F32", "shape": [2**60], "data_offsets": [0, 2**62]}},
                         bytes(8), None, "is truncated"),
    "shape product overflows int64": (
        {"a": {"dtype": "F32", "shape": [2**40, 2**40, 2**40], "data_offsets": [0, 8]}},
        bytes(8), None, "inconsistent data offsets"),
    "a million dims": ({"a": {"dtype": "F32", "shape": [2**62] * 10**6, "data_offsets": [0, 8]}},
                       bytes(8), None, "inconsistent data offsets"),
    "5000-digit offset": (b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, '
                          + b"9" * 5000 + b"]}}", bytes(8), None, "corrupt safetensors header"),
    "deep nesting": (b"[" * 200_000 + b"]" * 200_000, b"", None, "corrupt safetensors header"),
    "float offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8.5]}},
                      bytes(8), None, "no valid data_offsets"),
    "entry a list": ({"a": [1, 2]}, b"", None, "no valid data_offsets"),
    "dtype null": ({"a": {"dtype": None, "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None,
                   "unknown dtype None"),
    "metadata a list": ({"__metadata__": [1], "a": {"dtype": "F32", "shape": [2],
                                                     "data_offsets": [0, 8]}},
                        bytes(8), None, "__metadata__ must map names to strings"),
}


@pytest.mark.parametrize("case", list(HEADERS))
def test_hostile_header_fails_fast(case: str, tmp_path: Path) -> None:
    header, data, length, message = HEADERS[case]
    file = header_file(tmp_path / "x.safetensors", header, data, length)
    size = file.stat().st_size
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(WeightsError, match=message) as e:
            Checkpoint.open(file)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 5
    # nothing proportional to a claimed size: at most a few times the file itself
    assert peak < 64 * size + (1 << 20), peak
    assert str(file) in str(e.value) and "\n" not in str(e.value)


def test_header_length_is_checked_before_reading(tmp_path: Path) -> None:
    """A sparse 3 GB file claiming a 2 GB header: refused by its length, nothing read."""
    file = tmp_path / "sparse.safetensors"
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", 2 * 2**30))
        f.truncate(3 * 2**30)
    tracemalloc.start()
    try:
        with pytest.raises(WeightsError, match="header of 2147483648 bytes"):
            Checkpoint.open(file)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


INDEXES = {  # name: (index text, message)
    "a list": ("[1, 2]", "the file holds a list, not an object"),
    "no weight_map": ('{"metadata": {}}', "it has no weight_map"),
    "weight_map a list": ('{"weight_map": ["a.safetensors"]}', "weight_map is a list"),
    "weight_map a string": ('{"weight_map": "a.safetensors"}', "weight_map is a string"),
    "an int in weight_map": ('{"weight_map": {"w": 3}}', "weight_map['w'] is 3"),
    "null in weight_map": ('{"weight_map": {"w": null}}', "weight_map['w'] is None"),
    "a list in weight_map": ('{"weight_map": {"w": ["a"]}}', "weight_map['w'] is ['a']"),
    "empty name in weight_map": ('{"weight_map": {"w": ""}}', "weight_map['w'] is ''"),
    "deep nesting": ("[" * 100_000 + "]" * 100_000, "is not a safetensors index"),
    "5000-digit number": ('{"weight_map": {}, "total": ' + "9" * 5000 + "}",
                          "is not a safetensors index"),
    "not JSON": ("{", "is not a safetensors index"),
}


@pytest.mark.parametrize("case", list(INDEXES))
def test_index_of_wrong_types_is_one_line(case: str, tmp_path: Path) -> None:
    text, message = INDEXES[case]
    src = model_dir(tmp_path / "m", shard="200KB")
    (src / INDEX).write_text(text)
    with pytest.raises(WeightsError, match=message.replace("[", r"\[").replace("]", r"\]")):
        Checkpoint.open(src)
    before = digests(tmp_path)
    line = one_error_line(run("convert", str(src), str(tmp_path / "out"), "-p", "aion"))
    assert str(src / INDEX) in line and message in line
    assert not (tmp_path / "out").exists() and digests(tmp_path) == before


# --- a destination never touches a source -----------------------------------------------------


def _earlier_output(path: Path) -> Path:
    """A directory surgeon wrote before (its marker and a weights file)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("{}")
    shutil.copy(TINY / SINGLE, path / SINGLE)
    return path


def _dst_parent_of_src(tmp: Path) -> tuple[Path, Path]:
    work = _earlier_output(tmp / "work")
    return model_dir(work / "src"), work


def _dst_is_src(tmp: Path) -> tuple[Path, Path]:
    src = model_dir(tmp / "src")
    (src / MARKER).write_text("{}")  # a converted checkpoint converted again, onto itself
    return src, src


def _dst_links_to_src(tmp: Path) -> tuple[Path, Path]:
    src = model_dir(tmp / "src")
    (src / MARKER).write_text("{}")
    (tmp / "link").symlink_to(src)
    return src, tmp / "link"


def _dst_links_to_parent(tmp: Path) -> tuple[Path, Path]:
    work = _earlier_output(tmp / "work")
    (tmp / "link").symlink_to(work)
    return model_dir(work / "src"), tmp / "link"


def _src_links_into_dst(tmp: Path) -> tuple[Path, Path]:
    work = _earlier_output(tmp / "work")
    real = model_dir(work / "real")
    (tmp / "src").symlink_to(real)  # SRC given by a link; its real path lies in DST
    return tmp / "src", work


def _dst_dotdot(tmp: Path) -> tuple[Path, Path]:
    work = _earlier_output(tmp / "work")
    src = model_dir(work / "src")
    return src, src / ".."


CONVERT_LAYOUTS = {
    "DST a parent of SRC": (_dst_parent_of_src, "contains the source"),
    "DST is SRC": (_dst_is_src, "is the source"),
    "DST a symlink to SRC": (_dst_links_to_src, "is the source"),
    "DST a symlink to SRC's parent": (_dst_links_to_parent, "contains the source"),
    "SRC a symlink into DST": (_src_links_into_dst, "contains the source"),
    "DST is SRC/..": (_dst_dotdot, "contains the source"),
}


@pytest.mark.parametrize("case", list(CONVERT_LAYOUTS))
def test_convert_never_replaces_its_source(case: str, tmp_path: Path) -> None:
    make, fragment = CONVERT_LAYOUTS[case]
    src, dst = make(tmp_path)
    before = digests(tmp_path)
    line = one_error_line(run("convert", str(src), str(dst), "-p", "aion", "--overwrite"))
    assert fragment in line and str(dst) in line and str(src.resolve()) in line
    assert digests(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*surgeon-*")]  # no temporary left


def _trainer_run(root: Path) -> Path:
    """Three checkpoint-<step> folders of tiny-llama drifting a little."""
    base = Checkpoint.open(TINY)
    for step in (10, 20, 30):
        d = root / f"checkpoint-{step}"
        d.mkdir(parents=True)
        shutil.copy(TINY / "config.json", d / "config.json")
        write_checkpoint(d, {k: base.read(k) + 0.01 * step for k in base})
    return root


def _snapdir_inside_dst(tmp: Path) -> tuple[list[str], Path]:
    work = _earlier_output(tmp / "work")
    (work / "growth.json").write_text("{}")
    snaps = _trainer_run(work / "snaps")
    return [str(snaps), str(work), "--overwrite"], work


def _checkpoint_is_dst(tmp: Path) -> tuple[list[str], Path]:
    snaps = _trainer_run(tmp / "snaps")
    ck = model_dir(tmp / "ck")
    (ck / "growth.json").write_text("{}")
    return [str(snaps), str(ck), "--checkpoint", str(ck), "--overwrite"], ck


def _grow_onto_itself(tmp: Path) -> tuple[list[str], Path]:
    ck = model_dir(tmp / "ck")
    (ck / "growth.json").write_text("{}")
    return [str(ck), str(ck), "--init", "copy", "--overwrite"], ck


def _grow_into_newest_snapshot(tmp: Path) -> tuple[list[str], Path]:
    snaps = _trainer_run(tmp / "snaps")
    newest = snaps / "checkpoint-30"
    (newest / "growth.json").write_text("{}")
    return [str(snaps), str(newest), "--overwrite"], newest


GROW_LAYOUTS = {
    "snapshot directory inside DST": (_snapdir_inside_dst, "contains the source"),
    "--checkpoint equal to DST": (_checkpoint_is_dst, "is the source"),
    "a directory grown onto itself": (_grow_onto_itself, "is the source"),
    "DST the newest snapshot": (_grow_into_newest_snapshot, "is inside the source"),
}


@pytest.mark.parametrize("case", list(GROW_LAYOUTS))
def test_grow_never_replaces_its_source(case: str, tmp_path: Path) -> None:
    make, fragment = GROW_LAYOUTS[case]
    args, dst = make(tmp_path)
    before = digests(tmp_path)
    line = one_error_line(run("grow", *args))
    assert fragment in line and str(dst) in line
    assert digests(tmp_path) == before
    assert not [p for p in tmp_path.rglob(".*surgeon-*")]


# --- --overwrite replaces only what surgeon wrote, recoverably --------------------------------


def test_overwrite_refuses_a_directory_with_foreign_files(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src")
    dst = tmp_path / "dst"
    assert run("convert", str(src), str(dst), "-p", "aion", "--quiet").exit_code == 0
    (dst / "finetune-results").mkdir()
    (dst / "finetune-results" / "metrics.json").write_text("{}")
    (dst / "notes.txt").write_text("mine")
    before = digests(tmp_path)
    line = one_error_line(run("convert", str(src), str(dst), "-p", "aion", "--overwrite"))
    assert line == (f"error: {dst} holds files surgeon did not write (finetune-results/, "
                    "notes.txt); refusing to replace it: move them out, or choose another "
                    "destination")
    assert digests(tmp_path) == before
    # without them, the same directory is replaced
    shutil.rmtree(dst / "finetune-results")
    (dst / "notes.txt").unlink()
    assert run("convert", str(src), str(dst), "-p", "aion", "--overwrite",
               "--quiet").exit_code == 0


def test_overwrite_accepts_tokenizer_files_its_config_named(tmp_path: Path) -> None:
    dst = _earlier_output(tmp_path / "dst")
    (dst / "tokenizer_config.json").write_text(json.dumps({"vocab_file": "odd.spm"}))
    (dst / "odd.spm").write_text("x")
    check_destination(dst, overwrite=True)
    (dst / "odder.spm").write_text("x")
    with pytest.raises(DestinationError, match=r"did not write \(odder.spm\)"):
        check_destination(dst, overwrite=True)


PAUSE_BETWEEN_RENAMES = """
import os, sys, time
from pathlib import Path
import surgeon.files.atomic as atomic
dest = Path(sys.argv[1])
real = os.replace
def replace(a, b):
    real(a, b)
    if Path(a) == dest:  # the old copy has just been moved aside
        print("between", flush=True)
        time.sleep(60)
atomic.os.replace = replace
with atomic.atomic_directory(dest, overwrite=True) as tmp:
    (tmp / "surgeon.json").write_text("new")
"""


def test_sigkill_between_the_two_renames_loses_nothing(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MARKER).write_text("old")
    (dest / SINGLE).write_bytes(b"weights")
    before = {p.name: p.read_bytes() for p in dest.iterdir()}
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", PAUSE_BETWEEN_RENAMES, str(dest)], cwd=ROOT,
                             env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "between"
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert not dest.exists()  # the instant the old copy is aside
    aside = [p for p in tmp_path.iterdir() if p.name.startswith(f".out.surgeon-old-{child.pid}")]
    assert len(aside) == 1 and {p.name: p.read_bytes() for p in aside[0].iterdir()} == before

    # the next writer puts it back before anything else; without --overwrite it stays as it was
    with pytest.warns(Warning, match="put back"):
        with pytest.raises(DestinationError, match="already exists"):
            with atomic_directory(dest):
                pytest.fail("the block must not run")
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == before
    # with --overwrite it is replaced, and the dead writer's leftovers are gone
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / MARKER).write_text("newer")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (dest / MARKER).read_text() == "newer"


# --- only checkpoint files are carried, never through a symlink out of SRC --------------------


def test_secrets_are_not_carried(tmp_path: Path) -> None:
    src = model_dir(tmp_path / "src")
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (src / ".env").write_text("TOKEN=hf_secret")
    (src / "notes.md").write_text("private notes")
    (src / "trainer_state.json").write_text("{}")
    (src / "tokenizer.model").symlink_to(secret)  # a link out of SRC
    (src / "sub").mkdir()
    (src / "sub" / "tok.json").write_text('{"version": "1.0"}')
    (src / "tokenizer.json").symlink_to(Path("sub") / "tok.json")  # a link inside SRC
    (src / "tokenizer_config.json").write_text(json.dumps({
        "vocab_file": "spm.vocab", "tokenizer_file": "/home/someone/tokenizer.json",
        "merges_file": "../id_rsa"}))
    (src / "spm.vocab").write_text("a b c")
    dst = tmp_path / "dst"
    result = run("convert", str(src), str(dst), "-p", "aion")
    assert result.exit_code == 0, result.output
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warned) == 1 and "tokenizer.model is a symlink to" in warned[0]
    carried = ["config.json", "spm.vocab", "tokenizer.json", "tokenizer_config.json"]
    assert f"carried: {', '.join(carried)}" in result.stdout
    assert sorted(os.listdir(dst)) == sorted(carried + ["README.md", MARKER, SINGLE,
                                                        "surgeon_model.py"])
    assert not any((dst / n).is_symlink() for n in os.listdir(dst))
    assert (dst / "tokenizer.json").read_text() == '{"version": "1.0"}'
    assert all(b"PRIVATE KEY" not in p.read_bytes() and b"hf_secret" not in p.read_bytes()
               for p in dst.iterdir())


def test_carry_files_table(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    for name in ("config.json", "generation_config.json", "special_tokens_map.json",
                 "chat_template.jinja", "preprocessor_config.json", "merges.txt", "vocab.json",
                 ".env", "README.md", "optimizer.pt", "run.log"):
        (src / name).write_text(name)
    (src / "added_tokens.json").mkdir()  # a directory by a carried name
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = carry_files(src, out, lambda n: n == "generation_config.json")
    assert got == ["chat_template.jinja", "config.json", "merges.txt",
                   "preprocessor_config.json", "special_tokens_map.json", "vocab.json"]
    assert sorted(os.listdir(out)) == got
    assert [type(w.message) for w in caught] == [CarryWarning]


def test_transformers_weights_is_followed_and_dropped_from_the_copy(
        tmp_path: Path, remote_code_cache: Path) -> None:
    """config.json's `transformers_weights` names the file from_pretrained loads: surgeon reads
    that one too, and DST's config (whose weights are surgeon's own) no longer names it."""
    import transformers

    import surgeon

    src = model_dir(tmp_path / "src")
    os.rename(src / SINGLE, src / "weights.safetensors")
    base = Checkpoint.open(TINY)
    write_checkpoint(src, {k: torch.zeros_like(base.read(k)) for k in base})  # a decoy
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config,
                                                 "transformers_weights": "weights.safetensors"}))
    key = "model.layers.0.mlp.up_proj.weight"
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
    assert torch.equal(loaded[key], base.read(key))
    dst = tmp_path / "dst"
    result = run("convert", str(src), str(dst), "-p", "aion", "--quiet")
    assert result.exit_code == 0, result.output
    assert "transformers_weights" not in json.loads((dst / "config.json").read_text())
    assert torch.equal(surgeon.load(dst).state_dict()[key], base.read(key))
    converted = transformers.AutoModelForCausalLM.from_pretrained(dst, trust_remote_code=True)
    assert torch.equal(converted.state_dict()[key], base.read(key))


# --- both model.safetensors and an index: the one transformers loads --------------------------


def test_single_file_wins_over_an_index_as_in_transformers(tmp_path: Path) -> None:
    import transformers

    src = model_dir(tmp_path / "src")
    base = Checkpoint.open(TINY)
    (tmp_path / "zeros").mkdir()
    write_checkpoint(tmp_path / "zeros", {k: torch.zeros_like(base.read(k)) for k in base},
                     max_shard_size="200KB")  # a stale sharded copy of other values
    for p in (tmp_path / "zeros").iterdir():
        shutil.move(p, src / p.name)
    assert (src / INDEX).is_file() and (src / SINGLE).is_file()
    assert Checkpoint.open(src).files == [src / SINGLE]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
    key = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(loaded[key], base.read(key))  # transformers read the single file too
    assert loaded[key].abs().sum() > 0

    import surgeon
    from surgeon.converting import convert

    dst = tmp_path / "dst"
    convert(str(src), dst, ["aion"])
    assert torch.equal(surgeon.load(dst).state_dict()[key], base.read(key))
    assert INDEX not in os.listdir(dst)
