"""Writing files so that a reader, or a crash, never sees half of one; and refusing a
destination that cannot be written before the work that fills it is done."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from segment.errors import InputError


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename over ``path``: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(handle)
    try:
        write(Path(temporary))
        # On disk before the rename, so that even a power cut leaves the old file or the new one.
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        # mkstemp creates owner-only files; give the result the permissions a plain open() would.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def discard_unfinished(path: Path) -> None:
    """Delete the temporary files a killed :func:`write_atomically` of ``path`` left behind."""
    for leftover in path.parent.glob(f".{path.name}.*"):
        leftover.unlink(missing_ok=True)


def current_umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_atomically_as(path: Path, suffix: str, write: Callable[[Path], None]) -> None:
    """Like :func:`write_atomically` for writers that choose the format from the file name
    (nibabel, SimpleITK): the temporary file carries ``suffix`` too."""

    def write_named(temporary: Path) -> None:
        named = temporary.with_name(temporary.name + suffix)
        try:
            write(named)
            named.replace(temporary)
        finally:
            named.unlink(missing_ok=True)

    write_atomically(path, write_named)


def read_only_ancestor(folder: Path) -> Path | None:
    """``folder``, or the nearest existing folder above it, if it has no write permission bits.

    Checked on the mode bits rather than with ``os.access``: shared data folders are marked
    read-only to say "do not write here", and ``os.access`` says yes to root regardless."""
    # The nearest folder that exists is the one a mkdir(parents=True) would write into.
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    return None if existing.stat().st_mode & 0o222 else existing


def require_writable(folder: Path, what: str) -> None:
    """Refuse a read-only destination before any work is done, not after the work is lost."""
    if (locked := read_only_ancestor(folder.resolve())) is not None:
        raise InputError(f"Cannot write {what} under {folder}: {locked} is read-only.")


def require_output_file(path: Path, what: str) -> None:
    """Refuse an output file that cannot be written (a folder, a missing or read-only folder)
    before the work that fills it is done."""
    if path.is_dir():
        raise InputError(f"Cannot write {what} to {path}: it is a folder; give a file name.")
    if not path.parent.is_dir():
        raise InputError(f"Cannot write {what} to {path}: the folder {path.parent} does not exist.")
    require_writable(path.parent, what)


def require_new_folder(path: Path, what: str) -> None:
    """Refuse a destination folder that exists already or cannot be created."""
    if path.exists():
        raise InputError(f"{path} already exists; give a new folder for {what}.")
    require_writable(path.parent, what)


def write_folder_atomically(folder: Path, write: Callable[[Path], None], what: str) -> Path:
    """Run ``write`` on a new hidden sibling of ``folder`` (``.<name>.partial-*``, on the same
    file system, so the final rename is atomic) and rename it into place. An existing ``folder``
    is moved aside first, since a folder cannot be renamed over a non-empty one, put back if the
    rename fails, and removed once replaced. A killed run leaves at most the hidden sibling,
    never a half-written ``folder``.

    :class:`InputError` if the parent is marked read-only; what ``write`` and the renames raise
    (an ``OSError`` for a full disk, say) reaches the caller, with the sibling removed."""
    if (locked := read_only_ancestor(folder.parent.absolute())) is not None:
        raise InputError(f"{locked} is marked read-only, so {what} is not written there; give a writable folder.")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # mkdir, not mkdtemp: the finished folder gets the usual umask permissions instead of 0700.
    staging = folder.parent / f".{folder.name}.partial-{os.getpid()}-{secrets.token_hex(4)}"
    staging.mkdir()
    try:
        write(staging)
        if not folder.exists():
            staging.rename(folder)
            return folder
        retired = staging.with_name(staging.name.replace(".partial-", ".old-"))
        folder.rename(retired)
        try:
            staging.rename(folder)
        except OSError:
            retired.rename(folder)
            raise
        shutil.rmtree(retired)
        return folder
    finally:
        shutil.rmtree(staging, ignore_errors=True)
