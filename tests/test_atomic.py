"""surgeon.files.atomic: a directory written all at once, or not at all."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from surgeon.files.atomic import MARKER, DestinationError, atomic_directory, check_destination

ROOT = Path(__file__).resolve().parent.parent


def listing(path: Path) -> dict[str, str]:
    """Every file under `path`, relative name -> text."""
    return {str(p.relative_to(path)): p.read_text() for p in sorted(path.rglob("*")) if p.is_file()}


def siblings(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.iterdir())


def dead_pid() -> int:
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_success_moves_temp_into_place(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with atomic_directory(dest) as tmp:
        assert tmp.parent == tmp_path
        assert tmp.name.startswith(f".out.surgeon-tmp-{os.getpid()}-")
        assert tmp.is_dir() and list(tmp.iterdir()) == []
        assert not dest.exists()  # nothing visible until the end
        (tmp / "a.txt").write_text("alpha")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("beta")
        (tmp / MARKER).write_text("{}")
    assert not tmp.exists()
    assert siblings(dest) == ["out"]
    assert listing(dest) == {"a.txt": "alpha", "sub/b.txt": "beta", MARKER: "{}"}


def test_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750  # not mkdtemp's 0o700


def test_creates_missing_parents(tmp_path: Path) -> None:
    dest = tmp_path / "a" / "b" / "out"
    with atomic_directory(dest) as tmp:
        assert tmp.parent == dest.parent
        (tmp / "f").write_text("1")
    assert listing(dest) == {"f": "1"}


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(3)])
def test_error_inside_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    dest = tmp_path / "out"
    with pytest.raises(type(error)):
        with atomic_directory(dest) as tmp:
            (tmp / "half.bin").write_bytes(b"\0" * 100)
            raise error
    assert not dest.exists()
    assert not tmp.exists()
    assert siblings(dest) == []


def test_error_inside_keeps_previous_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MARKER).write_text("old")
    with pytest.raises(ValueError):
        with atomic_directory(dest, overwrite=True) as tmp:
            (tmp / MARKER).write_text("new")
            raise ValueError
    assert listing(dest) == {MARKER: "old"}
    assert siblings(dest) == ["out"]


# --- existing destinations -------------------------------------------------------------------


def test_existing_dest_refused_without_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / MARKER).write_text("old")
    with pytest.raises(DestinationError, match="already exists") as e:
        with atomic_directory(dest):
            pytest.fail("the block must not run")
    assert str(dest) in str(e.value)
    assert listing(dest) == {MARKER: "old"}
    assert siblings(dest) == ["out"]


def test_overwrite_replaces_surgeon_directory(tmp_path: Path) -> None:
    dest = tmp_path / "out"  # an earlier sharded write: every file one surgeon writes
    dest.mkdir()
    (dest / MARKER).write_text("old")
    (dest / "model-00001-of-00002.safetensors").write_text("stale")
    (dest / "model.safetensors.index.json").write_text("stale")
    with atomic_directory(dest, overwrite=True) as tmp:
        assert listing(dest)[MARKER] == "old"  # still there while writing
        (tmp / MARKER).write_text("new")
        (tmp / "fresh.bin").write_text("fresh")
    assert listing(dest) == {MARKER: "new", "fresh.bin": "fresh"}
    assert siblings(dest) == ["out"]  # neither the temp nor the old copy is left


def test_overwrite_of_empty_directory(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    with atomic_directory(dest, overwrite=True) as tmp:
        (tmp / "f").write_text("1")
    assert listing(dest) == {"f": "1"}


def test_foreign_directory_refused_even_with_overwrite(tmp_path: Path) -> None:
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "thesis.tex").write_text("precious")
    with pytest.raises(DestinationError, match=f"no {MARKER}") as e:
        with atomic_directory(dest, overwrite=True):
            pytest.fail("the block must not run")
    assert str(dest) in str(e.value)
    assert listing(dest) == {"thesis.tex": "precious"}
    assert siblings(dest) == ["mine"]


@pytest.mark.parametrize("overwrite", [False, True])
def test_dest_that_is_a_file_is_refused(tmp_path: Path, overwrite: bool) -> None:
    dest = tmp_path / "out"
    dest.write_text("a file")
    with pytest.raises(DestinationError, match="is a file") as e:
        with atomic_directory(dest, overwrite=overwrite):
            pytest.fail("the block must not run")
    assert str(dest) in str(e.value)
    assert dest.read_text() == "a file"
    assert siblings(dest) == ["out"]


def test_parent_that_is_a_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DestinationError, match="is a file, not a directory"):
        check_destination(tmp_path / "file" / "out", overwrite=False)


def test_dest_appearing_meanwhile_is_refused(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    with pytest.raises(DestinationError, match="already exists"):
        with atomic_directory(dest) as tmp:
            (tmp / "ours").write_text("ours")
            dest.mkdir()
            (dest / "theirs").write_text("theirs")
    assert listing(dest) == {"theirs": "theirs"}
    assert siblings(dest) == ["out"]


@pytest.mark.parametrize(
    ("setup", "overwrite", "refused"),
    [
        ("absent", False, None),
        ("absent", True, None),
        ("empty", False, "already exists"),
        ("empty", True, None),
        ("surgeon", False, "already exists"),
        ("surgeon", True, None),
        ("foreign", True, "not written by surgeon"),
        ("file", True, "is a file"),
    ],
)
def test_check_destination_table(tmp_path: Path, setup: str, overwrite: bool,
                                 refused: str | None) -> None:
    dest = tmp_path / "out"
    if setup in ("empty", "surgeon", "foreign"):
        dest.mkdir()
    if setup == "surgeon":
        (dest / MARKER).write_text("{}")
    if setup == "foreign":
        (dest / "x").write_text("x")
    if setup == "file":
        dest.write_text("x")
    if refused is None:
        assert check_destination(dest, overwrite=overwrite) is None
    else:
        with pytest.raises(DestinationError, match=refused):
            check_destination(dest, overwrite=overwrite)


# --- leftovers of killed writers -------------------------------------------------------------


def test_stale_temp_of_dead_writer_is_swept(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    pid = dead_pid()
    stale_tmp = tmp_path / f".out.surgeon-tmp-{pid}-abc_12x"
    stale_old = tmp_path / f".out.surgeon-old-{pid}-zz9"
    for stale in (stale_tmp, stale_old):
        stale.mkdir()
        (stale / "junk.bin").write_bytes(b"\0" * 10)
    with atomic_directory(dest) as tmp:
        assert not stale_tmp.exists() and not stale_old.exists()
        (tmp / "f").write_text("1")
    assert siblings(dest) == ["out"]


def test_temps_of_live_writers_and_others_are_kept(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    pid = dead_pid()
    kept = [
        f".out.surgeon-tmp-{os.getpid()}-abcd",  # a live writer (this process)
        f".other.surgeon-tmp-{pid}-abcd",  # another destination's
        f".out.x.surgeon-tmp-{pid}-abcd",  # the destination "out.x", not "out"
        f"out.surgeon-tmp-{pid}-abcd",  # not hidden: not ours
    ]
    for name in kept:
        (tmp_path / name).mkdir()
    (tmp_path / f".out.surgeon-tmp-{pid}-file").write_text("a file, not a temp dir")
    with atomic_directory(dest) as tmp:
        (tmp / "f").write_text("1")
    assert siblings(dest) == sorted(kept + [f".out.surgeon-tmp-{pid}-file", "out"])


def test_sigkill_leaves_no_dest(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    code = (
        "import sys, time\n"
        "from surgeon.files.atomic import atomic_directory\n"
        "with atomic_directory(sys.argv[1]) as tmp:\n"
        "    (tmp / 'model.safetensors').write_bytes(b'x' * 1000)\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(60)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    child = subprocess.Popen([sys.executable, "-c", code, str(dest)], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        leftovers = [p.name for p in tmp_path.iterdir()]
        assert len(leftovers) == 1 and leftovers[0].startswith(f".out.surgeon-tmp-{child.pid}-")
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=10) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()
    assert not dest.exists()
    # the dead writer's temp is left behind, and the next writer sweeps it
    assert [p.name for p in tmp_path.iterdir()] == leftovers
    with atomic_directory(dest) as tmp:
        (tmp / "f").write_text("1")
    assert siblings(dest) == ["out"]
    assert listing(dest) == {"f": "1"}
