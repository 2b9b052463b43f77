"""dfqvit.fileio: results and artifacts are complete on disk or absent."""
from __future__ import annotations

import pytest

from dfqvit.errors import UserError
from dfqvit.fileio import atomic_dir, atomic_path, write_text_atomic


class Boom(Exception):
    pass


def test_atomic_path_success(tmp_path):
    target = tmp_path / "sub" / "results.json"  # the parent is created
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp != target
        tmp.write_text("done")
        assert not target.exists()  # nothing visible before the block ends
    assert target.read_text() == "done"
    assert sorted(p.name for p in target.parent.iterdir()) == ["results.json"]


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "results.json"
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")
    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("new but broken")
            raise Boom
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]


def test_atomic_path_failure_without_writing(tmp_path):
    with pytest.raises(Boom):
        with atomic_path(tmp_path / "x.bin"):
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_replaces(tmp_path):
    target = tmp_path / "a.txt"
    write_text_atomic(target, "one")
    write_text_atomic(target, "two")
    assert target.read_text() == "two" and list(tmp_path.iterdir()) == [target]


def test_atomic_dir_creates(tmp_path):
    out = tmp_path / "artifact"
    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("w")
        assert not out.exists()
    assert (out / "model.safetensors").read_text() == "w"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_dir_refuses_existing_without_force(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(UserError, match="--force"):
        with atomic_dir(out):
            pytest.fail("the block must not run")
    assert (out / "old.txt").read_text() == "keep"
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_dir_replaces_with_force(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_dir(out, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # replaced only at the end
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]  # no temp or .old dirs left


def test_atomic_dir_no_temp_dir_on_exception(tmp_path):
    out = tmp_path / "artifact"
    with pytest.raises(Boom):
        with atomic_dir(out) as tmp:
            (tmp / "partial.txt").write_text("x")
            raise Boom
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_force_keeps_old_on_exception(tmp_path):
    out = tmp_path / "artifact"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(Boom):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise Boom
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]


def test_atomic_dir_existing_file(tmp_path):
    out = tmp_path / "artifact"
    out.write_text("a file")
    with pytest.raises(UserError, match="not a directory"):
        with atomic_dir(out, force=True):
            pass
    assert out.read_text() == "a file"
