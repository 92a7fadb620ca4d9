"""surgeon.files.weights: safetensors checkpoints read and written tensor by tensor."""

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from surgeon.files.weights import (
    INDEX,
    SINGLE,
    Checkpoint,
    Stored,
    WeightsError,
    parse_size,
    plan_shards,
    read_header,
    read_tensor,
    total_bytes,
    write_checkpoint,
)


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    """A safetensors-shaped file from a header (any JSON value) and the data bytes."""
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def header_of(path: Path) -> tuple[int, dict]:
    """(header length, parsed header) of a safetensors file, read by hand."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return n, json.loads(blob[8:8 + n])


def f32(n: int) -> torch.Tensor:
    """n float32s (4n bytes) with distinct values."""
    return torch.arange(n, dtype=torch.float32) + 0.5


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    if a.dtype == torch.float8_e4m3fn:  # torch.equal has no float8 kernel: compare the bits
        a, b = a.view(torch.uint8), b.view(torch.uint8)
    assert torch.equal(a, b)


ROUND_TRIP = {
    "f32": torch.randn(3, 5),
    "f64": torch.randn(4, dtype=torch.float64),
    "f16": torch.randn(2, 3).half(),
    "bf16": torch.randn(7).bfloat16(),
    "i64": torch.arange(-5, 5, dtype=torch.int64).reshape(2, 5),
    "i32": torch.tensor([-(2**31), 0, 2**31 - 1], dtype=torch.int32),
    "i16": torch.tensor([-3, 3], dtype=torch.int16),
    "i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
    "u8": torch.tensor([0, 1, 255], dtype=torch.uint8),
    "bool": torch.tensor([[True, False, True], [False, False, True]]),
    "scalar": torch.tensor(3.25),
    "scalar_i64": torch.tensor(-7, dtype=torch.int64),
    "empty": torch.zeros(0, 3),
    "empty_1d_bf16": torch.zeros(0, dtype=torch.bfloat16),
    "f8": torch.tensor([0.5, -1.0, 2.0]).to(torch.float8_e4m3fn),
    "c64": torch.tensor([1 + 2j, -3j], dtype=torch.complex64),
    "u16": torch.tensor([0, 65535], dtype=torch.uint16),
    "transposed": torch.arange(12, dtype=torch.float32).reshape(3, 4).t(),  # not contiguous
}


@pytest.mark.parametrize("key", sorted(ROUND_TRIP))
def test_round_trip_each_dtype(tmp_path: Path, key: str) -> None:
    tensor = ROUND_TRIP[key]
    files = write_checkpoint(tmp_path, {key: tensor})
    assert files == [tmp_path / SINGLE]
    ck = Checkpoint.open(tmp_path)
    assert list(ck) == [key]
    assert ck[key].shape == tuple(tensor.shape)
    assert ck[key].dtype == tensor.dtype
    assert ck[key].nbytes == tensor.numel() * tensor.element_size()
    assert_same(ck.read(key), tensor)
    assert_same(load_file(tmp_path / SINGLE)[key], tensor)


def test_round_trip_all_dtypes_in_one_file(tmp_path: Path) -> None:
    tensors = ROUND_TRIP
    write_checkpoint(tmp_path, tensors)
    ck = Checkpoint.open(tmp_path / SINGLE)  # a file path works as well as its directory
    official = load_file(tmp_path / SINGLE)
    assert sorted(ck) == sorted(official) == sorted(tensors)
    assert len(ck) == len(tensors)
    expected_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    assert ck.nbytes == expected_bytes == total_bytes(tensors.values())
    header_bytes = header_of(tmp_path / SINGLE)[0]
    assert (tmp_path / SINGLE).stat().st_size == 8 + header_bytes + expected_bytes
    for key, tensor in tensors.items():
        assert_same(ck.read(key), tensor)
        assert_same(official[key], tensor)


def test_read_returns_fresh_memory(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a": f32(4)})
    ck = Checkpoint.open(tmp_path)
    first = ck.read("a")
    first += 100
    assert_same(ck.read("a"), f32(4))


def test_header_layout_aligned_with_metadata(tmp_path: Path) -> None:
    tensors = {"z": f32(1), "a": f32(2), "m": torch.ones(3, dtype=torch.int64)}
    write_checkpoint(tmp_path, tensors, metadata={"origin": "test"})
    n, header = header_of(tmp_path / SINGLE)
    assert n % 8 == 0  # data 8-byte aligned
    assert list(header) == ["__metadata__", "m", "a", "z"]  # widest dtype first, then by key
    assert header["__metadata__"] == {"format": "pt", "origin": "test"}
    assert header["m"] == {"dtype": "I64", "shape": [3], "data_offsets": [0, 24]}
    assert header["a"] == {"dtype": "F32", "shape": [2], "data_offsets": [24, 32]}
    assert header["z"] == {"dtype": "F32", "shape": [1], "data_offsets": [32, 36]}
    with safe_open(tmp_path / SINGLE, "pt") as f:
        assert f.metadata() == {"format": "pt", "origin": "test"}
    entries, metadata = read_header(tmp_path / SINGLE)
    assert metadata == {"format": "pt", "origin": "test"}
    assert {k: (s.start, s.nbytes) for k, s in entries.items()} == {
        "m": (8 + n, 24), "a": (8 + n + 24, 8), "z": (8 + n + 32, 4)}


def test_progress_reports_each_tensor_in_order(tmp_path: Path) -> None:
    seen: list[int] = []
    write_checkpoint(tmp_path, {"b": f32(3), "a": f32(1), "c": torch.zeros(0)},
                     progress=seen.append)
    assert seen == [4, 12, 0]


def test_unsupported_dtype_is_refused(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="complex128"):
        write_checkpoint(tmp_path, {"a": torch.zeros(2, dtype=torch.complex128)})


# --- Stored tensors: copied byte for byte ----------------------------------------------------


@pytest.fixture
def source(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A file written by the official safetensors library (its own layout and padding)."""
    tensors = {
        "w": torch.randn(3, 4),
        "b": torch.arange(6, dtype=torch.int64),
        "h": torch.randn(5).half(),
        "mask": torch.tensor([True, False, True]),
        "s": torch.tensor(2.5),
    }
    path = tmp_path / "src.safetensors"
    save_file(tensors, path, metadata={"format": "pt"})
    return path, tensors


def test_stored_entries_are_copied(tmp_path: Path, source, monkeypatch) -> None:
    path, tensors = source
    calls: list[int] = []
    real = os.copy_file_range

    def counting(src: int, dst: int, count: int, offset_src=None, offset_dst=None) -> int:
        calls.append(count)
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", counting)
    ck = Checkpoint.open(path)
    assert all(isinstance(ck[k], Stored) for k in tensors)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, dict(ck))
    assert sorted(calls) == sorted(ck[k].nbytes for k in tensors)  # one kernel copy per tensor
    official = load_file(out / SINGLE)
    again = Checkpoint.open(out)
    for key, tensor in tensors.items():
        assert_same(official[key], tensor)
        assert_same(again.read(key), tensor)


def test_stored_copy_falls_back_to_user_space(tmp_path: Path, source, monkeypatch) -> None:
    path, tensors = source

    def refuse(*args, **kwargs) -> int:
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    out = tmp_path / "out"
    out.mkdir()
    write_checkpoint(out, dict(Checkpoint.open(path)))
    official = load_file(out / SINGLE)
    for key, tensor in tensors.items():
        assert_same(official[key], tensor)


def test_mixing_stored_and_memory_tensors(tmp_path: Path, source) -> None:
    path, tensors = source
    ck = Checkpoint.open(path)
    new = {"a_first": f32(3), "new_i8": torch.tensor([-1, 2], dtype=torch.int8),
           "zz_last": torch.ones(2, 2).bfloat16()}
    mixed = {"w": ck["w"], "mask": ck["mask"], "s": ck["s"], **new}
    out = tmp_path / "out"
    out.mkdir()
    seen: list[int] = []
    write_checkpoint(out, mixed, progress=seen.append)
    assert sum(seen) == total_bytes(mixed.values()) == 48 + 3 + 4 + 12 + 2 + 8
    official = load_file(out / SINGLE)
    assert sorted(official) == sorted(mixed)
    for key in ("w", "mask", "s"):
        assert_same(official[key], tensors[key])
    for key, tensor in new.items():
        assert_same(official[key], tensor)


def test_mixed_and_sharded_with_stored(tmp_path: Path, source) -> None:
    path, tensors = source
    ck = Checkpoint.open(path)
    out = tmp_path / "out"
    out.mkdir()
    files = write_checkpoint(out, {**dict(ck), "extra": f32(8)}, max_shard_size=40)
    assert len(files) > 2 and files[-1] == out / INDEX
    again = Checkpoint.open(out)
    for key, tensor in tensors.items():
        assert_same(again.read(key), tensor)
    assert_same(again.read("extra"), f32(8))


def test_stored_source_truncated_during_copy(tmp_path: Path, source) -> None:
    path, _ = source
    ck = Checkpoint.open(path)
    os.truncate(path, ck["w"].start + 4)  # after opening: the header said more
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(WeightsError, match="ended while copying 'w'") as e:
        write_checkpoint(out, {"w": ck["w"]})
    assert str(path) in str(e.value)


# --- sharding --------------------------------------------------------------------------------


def test_sharding_writes_shards_and_index(tmp_path: Path) -> None:
    tensors = {k: f32(16) + i for i, k in enumerate("edcba")}  # 64 bytes each
    files = write_checkpoint(tmp_path, tensors, max_shard_size=150)
    names = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert files == [tmp_path / n for n in names] + [tmp_path / INDEX]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names + [INDEX])
    assert not (tmp_path / SINGLE).exists()
    index = json.loads((tmp_path / INDEX).read_text())
    assert index == {
        "metadata": {"total_size": 320},
        "weight_map": {"a": names[0], "b": names[0], "c": names[1], "d": names[1],
                       "e": names[2]},
    }
    for name, keys in zip(names, (["a", "b"], ["c", "d"], ["e"])):
        shard = load_file(tmp_path / name)
        assert sorted(shard) == keys
        assert (tmp_path / name).stat().st_size <= 150 + 8 + header_of(tmp_path / name)[0]
    ck = Checkpoint.open(tmp_path)
    assert sorted(ck) == list("abcde")
    assert ck.files == [tmp_path / n for n in names]
    assert ck.nbytes == 320
    for key, tensor in tensors.items():
        assert_same(ck.read(key), tensor)
        assert ck[key].file == tmp_path / index["weight_map"][key]


def test_sharding_with_string_size(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(300, dtype=torch.uint8), "b": torch.ones(300, dtype=torch.uint8)}
    files = write_checkpoint(tmp_path, tensors, max_shard_size="0.5KB")  # 500 bytes
    assert [p.name for p in files] == ["model-00001-of-00002.safetensors",
                                       "model-00002-of-00002.safetensors", INDEX]


def test_tensor_bigger_than_limit_gets_own_shard(tmp_path: Path) -> None:
    tensors = {"a": f32(4), "big": f32(100), "c": f32(4)}  # 16, 400, 16 bytes
    files = write_checkpoint(tmp_path, tensors, max_shard_size=100)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == 432
    assert index["weight_map"] == {"a": "model-00001-of-00003.safetensors",
                                   "big": "model-00002-of-00003.safetensors",
                                   "c": "model-00003-of-00003.safetensors"}
    assert len(files) == 4
    assert list(load_file(tmp_path / "model-00002-of-00003.safetensors")) == ["big"]
    assert_same(Checkpoint.open(tmp_path).read("big"), f32(100))


def test_one_shard_is_single_file_without_index(tmp_path: Path) -> None:
    tensors = {"a": f32(4), "b": f32(4)}
    files = write_checkpoint(tmp_path, tensors, max_shard_size=32)  # exactly fits
    assert files == [tmp_path / SINGLE]
    assert [p.name for p in tmp_path.iterdir()] == [SINGLE]


def test_empty_checkpoint_is_a_valid_file(tmp_path: Path) -> None:
    assert write_checkpoint(tmp_path, {}) == [tmp_path / SINGLE]
    assert load_file(tmp_path / SINGLE) == {}
    assert len(Checkpoint.open(tmp_path)) == 0


@pytest.mark.parametrize(
    ("sizes", "limit", "expected"),
    [
        ({}, 10, [[]]),
        ({"a": 5}, 10, [["a"]]),
        ({"b": 5, "a": 5}, 10, [["a", "b"]]),  # exact fit stays together
        ({"a": 6, "b": 5}, 10, [["a"], ["b"]]),
        ({"a": 20}, 10, [["a"]]),
        ({"c": 3, "b": 20, "a": 3}, 10, [["a"], ["b"], ["c"]]),
        ({"a": 3, "b": 3, "c": 20, "d": 3}, 10, [["a", "b"], ["c"], ["d"]]),
        ({"z": 1, "a": 1, "m": 1}, 100, [["a", "m", "z"]]),
        ({"a": 0, "b": 10, "c": 0}, 10, [["a", "b", "c"]]),
        ({"k1": 4, "k2": 4, "k3": 4, "k4": 4, "k5": 4}, 8, [["k1", "k2"], ["k3", "k4"], ["k5"]]),
    ],
)
def test_plan_shards(sizes: dict[str, int], limit: int, expected: list[list[str]]) -> None:
    assert plan_shards(sizes, limit) == expected


# --- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_size", ["50GB", 100])
def test_writes_are_deterministic(tmp_path: Path, max_shard_size) -> None:
    tensors = {"w": torch.randn(4, 4), "b": torch.randn(4).bfloat16(), "i": torch.arange(9),
               "m": torch.tensor([True, False])}
    first, second = tmp_path / "one", tmp_path / "two"
    first.mkdir()
    second.mkdir()
    files1 = write_checkpoint(first, tensors, max_shard_size=max_shard_size)
    files2 = write_checkpoint(second, dict(reversed(tensors.items())),
                              max_shard_size=max_shard_size)
    assert [p.name for p in files1] == [p.name for p in files2]
    assert len(files1) == (1 if max_shard_size == "50GB" else 3)
    for a, b in zip(files1, files2):
        assert a.read_bytes() == b.read_bytes()


# --- parse_size ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("500MB", 500 * 10**6),
        ("2GiB", 2 * 2**30),
        ("10KiB", 10 * 1024),
        ("1TB", 10**12),
        ("1.5GB", 1_500_000_000),
        ("5gb", 5 * 10**9),
        (" 7 MB ", 7 * 10**6),
        ("300", 300),
        ("64B", 64),
        ("4G", 4 * 10**9),
        (123, 123),
        (1, 1),
    ],
)
def test_parse_size(text, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["lots", "-1GB", "0", "0MB", "", "5XB", "GB", "1.2.3GB", -5, 0])
def test_parse_size_rejects(bad) -> None:
    with pytest.raises(WeightsError) as e:
        parse_size(bad)
    assert repr(bad) in str(e.value)


def test_write_checkpoint_rejects_bad_size_before_writing(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="'lots'"):
        write_checkpoint(tmp_path, {"a": f32(1)}, max_shard_size="lots")
    assert list(tmp_path.iterdir()) == []


# --- corrupt inputs --------------------------------------------------------------------------

F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _valid(path: Path) -> Path:
    path.mkdir()
    write_checkpoint(path, {"a": f32(4), "b": torch.arange(3)})
    return path / SINGLE


def _truncated(path: Path) -> Path:
    file = _valid(path)
    os.truncate(file, file.stat().st_size - 3)
    return file


def _trailing(path: Path) -> Path:
    file = _valid(path)
    with open(file, "ab") as f:
        f.write(b"\0" * 5)
    return file


def _header_too_long(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 10**6) + b'{"a": 1}')
    return path


def _header_beyond_limit(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 2**63) + b"{}" + b" " * 6)
    return path


def _not_json(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 8) + b"not json")
    return path


def _not_utf8(path: Path) -> Path:
    path.write_bytes(struct.pack("<Q", 8) + b'{"\xff\xfe":1}')
    return path


def _json_list(path: Path) -> Path:
    return raw_file(path, [1, 2, 3])


def _unknown_dtype(path: Path) -> Path:
    return raw_file(path, {"a": {"dtype": "F7", "shape": [2], "data_offsets": [0, 8]}}, bytes(8))


def _overlap(path: Path) -> Path:
    return raw_file(path, {"a": F32_2, "b": {**F32_2, "data_offsets": [4, 12]}}, bytes(12))


def _gap(path: Path) -> Path:
    return raw_file(path, {"a": F32_2, "b": {**F32_2, "data_offsets": [12, 20]}}, bytes(20))


def _wrong_nbytes(path: Path) -> Path:
    return raw_file(path, {"a": {**F32_2, "shape": [3]}}, bytes(8))


def _no_offsets(path: Path) -> Path:
    return raw_file(path, {"a": {"dtype": "F32", "shape": [2]}}, bytes(8))


def _reversed_offsets(path: Path) -> Path:
    return raw_file(path, {"a": {**F32_2, "data_offsets": [8, 0]}}, bytes(8))


def _dtype_not_a_string(path: Path) -> Path:
    return raw_file(path, {"a": {**F32_2, "dtype": ["F32"]}}, bytes(8))


def _shape_not_ints(path: Path) -> Path:
    return raw_file(path, {"a": {**F32_2, "shape": ["x", 2]}}, bytes(8))


def _shape_null(path: Path) -> Path:
    return raw_file(path, {"a": {**F32_2, "shape": None}}, bytes(8))


def _shape_negative(path: Path) -> Path:  # -1 * -2 * 4 bytes would match the offsets
    return raw_file(path, {"a": {**F32_2, "shape": [-1, -2]}}, bytes(8))


def _short(path: Path) -> Path:
    path.write_bytes(b"\x01\x02\x03")
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


CORRUPT = {
    "truncated": (_truncated, "is truncated"),
    "trailing bytes": (_trailing, "longer than its header says"),
    "header longer than file": (_header_too_long, "header of 1000000 bytes"),
    "header beyond limit": (_header_beyond_limit, "is not a safetensors file"),
    "not json": (_not_json, "corrupt safetensors header"),
    "not utf-8": (_not_utf8, "corrupt safetensors header"),
    "json list": (_json_list, "not a JSON object"),
    "unknown dtype": (_unknown_dtype, "unknown dtype 'F7'"),
    "overlap": (_overlap, "tensor 'b' has inconsistent data offsets"),
    "gap": (_gap, "tensor 'b' has inconsistent data offsets"),
    "wrong size": (_wrong_nbytes, "tensor 'a' has inconsistent data offsets"),
    "no offsets": (_no_offsets, "no valid data_offsets"),
    "reversed offsets": (_reversed_offsets, r"data offsets \[8, 0\]"),
    "dtype not a string": (_dtype_not_a_string, r"unknown dtype \['F32'\]"),
    "shape not ints": (_shape_not_ints, r"invalid shape \['x', 2\]"),
    "shape null": (_shape_null, "invalid shape None"),
    "shape negative": (_shape_negative, r"invalid shape \[-1, -2\]"),
    "short": (_short, "only 3 bytes"),
    "empty": (_empty, "only 0 bytes"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_file_is_named(tmp_path: Path, case: str) -> None:
    make, message = CORRUPT[case]
    file = make(tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=message) as e:
        Checkpoint.open(file)
    assert str(file) in str(e.value)
    with pytest.raises(WeightsError, match=message) as e:
        read_header(file)
    assert str(file) in str(e.value)
    if file.name == SINGLE:  # found through its directory as well
        with pytest.raises(WeightsError, match=message) as e:
            Checkpoint.open(file.parent)
        assert str(file) in str(e.value)


def test_empty_tensor_sharing_an_offset_is_valid(tmp_path: Path) -> None:
    """safetensors orders tensors by (begin, end); an empty tensor may precede a full one at the
    same offset whatever order the header lists them in."""
    file = raw_file(tmp_path / "x.safetensors",
                    {"a": {"dtype": "U8", "shape": [4], "data_offsets": [0, 4]},
                     "b": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}},
                    bytes([1, 2, 3, 4]))
    assert sorted(load_file(file)) == ["a", "b"]  # the official reader accepts it
    ck = Checkpoint.open(file)
    assert_same(ck.read("a"), torch.tensor([1, 2, 3, 4], dtype=torch.uint8))
    assert_same(ck.read("b"), torch.zeros(0))


def _sharded(path: Path) -> dict:
    write_checkpoint(path, {"a": f32(4), "b": f32(4), "c": f32(4)}, max_shard_size=20)
    return json.loads((path / INDEX).read_text())


def test_index_with_missing_shard(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    gone = tmp_path / index["weight_map"]["b"]
    gone.unlink()
    with pytest.raises(WeightsError, match="listed in .* but missing") as e:
        Checkpoint.open(tmp_path)
    assert str(gone) in str(e.value)


def test_index_placing_key_in_wrong_shard(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index["weight_map"]["a"] = index["weight_map"]["c"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="has no tensor 'a'") as e:
        Checkpoint.open(tmp_path)
    assert str(tmp_path / index["weight_map"]["c"]) in str(e.value)


def test_index_listing_unknown_key(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    index["weight_map"]["ghost"] = index["weight_map"]["a"]
    (tmp_path / INDEX).write_text(json.dumps(index))
    with pytest.raises(WeightsError, match="has no tensor 'ghost'") as e:
        Checkpoint.open(tmp_path)
    assert str(tmp_path / index["weight_map"]["a"]) in str(e.value)


@pytest.mark.parametrize("text", ["not json", "{}", '{"weight_map": [1, 2]}'])
def test_index_that_is_not_an_index(tmp_path: Path, text: str) -> None:
    _sharded(tmp_path)
    (tmp_path / INDEX).write_text(text)
    with pytest.raises(WeightsError, match="is not a safetensors index") as e:
        Checkpoint.open(tmp_path)
    assert str(tmp_path / INDEX) in str(e.value)


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    shard = tmp_path / index["weight_map"]["c"]
    os.truncate(shard, shard.stat().st_size - 1)
    with pytest.raises(WeightsError, match="truncated") as e:
        Checkpoint.open(tmp_path)
    assert str(shard) in str(e.value)


def test_index_preferred_and_shard_keys_filtered(tmp_path: Path) -> None:
    index = _sharded(tmp_path)
    del index["weight_map"]["b"]  # a shard may hold tensors the index does not list
    (tmp_path / INDEX).write_text(json.dumps(index))
    assert sorted(Checkpoint.open(tmp_path)) == ["a", "c"]


@pytest.mark.parametrize("contents", [[], ["other.safetensors", "config.json"]])
def test_directory_without_checkpoint(tmp_path: Path, contents: list[str]) -> None:
    for name in contents:
        (tmp_path / name).write_text("x")
    with pytest.raises(WeightsError, match=f"has no {SINGLE} or {INDEX}") as e:
        Checkpoint.open(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(WeightsError) as e:
        Checkpoint.open(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(e.value)


def test_read_after_truncation(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, {"a": f32(4), "b": f32(8)})
    ck = Checkpoint.open(tmp_path)
    os.truncate(tmp_path / SINGLE, ck["b"].start + 5)
    assert_same(ck.read("a"), f32(4))  # still whole
    with pytest.raises(WeightsError, match="ended while reading 'b'") as e:
        read_tensor(ck["b"])
    assert str(tmp_path / SINGLE) in str(e.value)
