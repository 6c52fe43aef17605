"""Writing files so that a reader, or a crash, never sees half of one, and a full disk is one
sentence that says the previous file is kept; and refusing a destination that cannot be
written before the work that fills it is done."""

from __future__ import annotations

import errno
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from segment.errors import DiskFullError, InputError

# A write refused for lack of room: no space left, a disk quota reached, a file-size limit
# (``ulimit -f``, with which the tests fill a "disk" without filling one).
NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


def write_atomically(path: Path, write) -> None:
    """Call ``write(temporary_path)``, then rename over ``path``: readers never see half a file.

    Running out of room raises :class:`DiskFullError`, with ``path`` as it was and the
    temporary file removed; ``write`` must let the ``OSError`` of a failed write through (a
    C++ writer that reports it as a ``RuntimeError`` hides that the disk is full)."""
    with reported_when_full(path, str(path), "file"):
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


@contextmanager
def reported_when_full(target: Path, what: str, kind: str) -> Iterator[None]:
    """Running out of room while the block writes ``target`` (``what``, a ``kind`` such as
    "file") becomes a :class:`DiskFullError` that says so in one sentence, and whether the
    ``target`` there before is kept; other errors pass unchanged."""
    try:
        yield
    except OSError as error:
        if isinstance(error, DiskFullError):
            reason = error.reason  # a write inside this one: said again, of the whole
        elif error.errno in NO_ROOM:
            reason = error.strerror
        else:
            raise
        kept = f"the previous {kind} is intact" if target.exists() else "nothing partial is left"
        raise DiskFullError(
            f"Out of disk space: could not write {what} ({reason}); {kept}.", reason
        ) from None


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


def raise_if_no_room(folder: Path, size: int) -> None:
    """Raise the ``OSError`` of running out of room if ``size`` bytes cannot be written in
    ``folder`` now; return if they can, or if the write fails for another reason. For C++
    writers (SimpleITK) whose failed write says "file stream is fail" or "error closing gzFile"
    rather than why: the same amount written from Python says why."""
    probe = None
    try:
        handle, probe = tempfile.mkstemp(prefix=".space-probe.", dir=folder)
        with os.fdopen(handle, "wb") as written:
            chunk = bytes(min(size, 1 << 20))
            for start in range(0, size, max(len(chunk), 1)):
                written.write(chunk[: size - start])
            written.flush()
            os.fsync(written.fileno())
    except OSError as error:
        if error.errno in NO_ROOM:
            raise
    finally:
        if probe is not None:
            Path(probe).unlink(missing_ok=True)


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

    :class:`InputError` if the parent is marked read-only, :class:`DiskFullError` (naming
    ``what``) when the disk fills up; what else ``write`` and the renames raise reaches the
    caller. Either way the sibling is removed and ``folder`` is as it was."""
    if (locked := read_only_ancestor(folder.parent.absolute())) is not None:
        raise InputError(f"{locked} is marked read-only, so {what} is not written there; give a writable folder.")
    with reported_when_full(folder, f"{what} to {folder}", "folder"):
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
