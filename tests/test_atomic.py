"""Atomic writes: whole files with ordinary permissions, nothing left by a failed write, leftovers cleaned."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from arrcoc.datasets.atomic import remove_partial, write_atomic


def test_written_file_has_the_permissions_of_an_ordinary_new_file(tmp_path: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    target = tmp_path / "out.json"
    write_atomic(target, lambda temporary: Path(temporary).write_text("{}"))
    assert target.read_text() == "{}"
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_a_failed_write_leaves_neither_file_nor_temporary(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")

    def fail(temporary: str) -> None:
        Path(temporary).write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_remove_partial_deletes_only_the_named_files_temporaries(tmp_path: Path) -> None:
    ours = [tmp_path / ".a.png.x1.tmp", tmp_path / ".a.json.x2.tmp", tmp_path / ".b.png.x3.tmp"]
    others = [tmp_path / ".c.png.x4.tmp", tmp_path / "a.png", tmp_path / ".a.png.x5.part"]
    for path in ours + others:
        path.write_text("")
    assert remove_partial(tmp_path, ["a.png", "a.json", "b.png"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in others)
    assert remove_partial(tmp_path, []) == 0
