"""visionlin._io: atomic writes and output-folder checks."""

from __future__ import annotations

import os
import stat

import pytest

from visionlin._io import atomic_write, folder_problem


def test_atomic_write_replaces_whole_or_keeps_the_old(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk"):
        atomic_write(path, lambda p: (p.write_text("half"), (_ for _ in ()).throw(RuntimeError("disk"))))
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left
    atomic_write(path, lambda p: p.write_text("new"))
    umask = os.umask(0)
    os.umask(umask)
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


def test_folder_problem(tmp_path):
    afile = tmp_path / "f"
    afile.write_text("x")
    assert folder_problem(tmp_path) is None and folder_problem(tmp_path / "new" / "deeper") is None
    assert folder_problem(afile) == f"{str(afile)!r} is a file, not a folder"
    deep = afile / "a" / "b"
    assert folder_problem(deep) == f"{str(afile)!r} (in {str(deep)!r}) is a file, not a folder"
