"""File-system helpers shared by the command-line tools and the converter: atomic writes, output-folder checks and
the removal of a result's image that an earlier run drew."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write", "draw_or_remove", "folder_problem", "remove_stale"]


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` to a temporary file beside ``path``, then rename it over ``path``: a reader sees the old file or
    the whole new one, never a part. The file gets an ordinary new file's mode (``0666`` less the umask, not
    ``mkstemp``'s ``0600``); the temporary file is removed if ``write`` fails."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=path.suffix)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def folder_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be used as an output folder (made with its parents if missing), or ``None``: it is an
    existing file, one of its existing ancestors is a file, or the nearest existing folder cannot be written (an empty
    temporary folder is made there and removed at once). Checked before long work, so a run does not fail at
    its end (a conversion, a fine-tuning run) on an output path that never could have worked."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        return f"{str(p)!r} is a file, not a folder"
    existing = p if p.exists() else next((q for q in p.parents if q.exists()), None)
    if existing is None:
        return None
    if not existing.is_dir():
        return f"{str(existing)!r} (in {str(p)!r}) is a file, not a folder"
    try:  # writable? (a read-only or virtual file system failed only when the run wrote its first file)
        os.rmdir(tempfile.mkdtemp(prefix=".visionlin-write-check-", dir=existing))
    except OSError as e:
        return (
            f"cannot write to folder {str(existing)!r}"
            + (f" (for {str(p)!r})" if existing != p else "")
            + (f": {e.strerror or e}")
        )
    return None


def remove_stale(path: Path) -> list[str]:
    """Remove ``path``, an image drawn from an earlier result than the JSON just written beside it (a folder never
    pairs a JSON with another run's image); one note if there was one to remove."""
    try:
        Path(path).unlink()
    except FileNotFoundError:
        return []
    return [f"removed {path}: it showed an earlier run"]


def draw_or_remove(path: Path, draw: Callable[[Path], object]) -> None:
    """:func:`atomic_write` of an image drawn from the JSON just written; if drawing fails, the image an earlier run
    left at ``path`` is removed (:func:`remove_stale`) before the error goes on."""
    try:
        atomic_write(path, draw)
    except BaseException:
        with contextlib.suppress(OSError):
            remove_stale(path)
        raise
