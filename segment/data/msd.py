"""Downloading one Medical Segmentation Decathlon task into a data root, verified.

Used by training when a task is missing and by ``data_scripts/fetch_msd.py``. The
download URLs and md5 checksums are MONAI's own (``monai.apps.DecathlonDataset.resource`` and
``.md5``), so this fetches exactly what ``DecathlonDataset(download=True)`` would.

If ``<data root>/<task>/dataset.json`` already exists, nothing is downloaded. Otherwise the tar
is downloaded into a hidden ``.<task>.partial-*`` folder inside the data root, checked against
the md5 and extracted there. The task folder is then renamed into place, so the data root only
ever holds a complete task. On any failure the partial folder is removed. A killed run can leave
it behind, but never a half-extracted task folder.

The script calls ``monai.apps.download_url`` and ``monai.apps.extractall`` one after the other
instead of ``download_and_extract``, which does the same two steps. There are two reasons.
Separate calls tell a network failure apart from a checksum or extraction failure. And in
MONAI 1.6 ``download_and_extract`` first sends an HTTP HEAD request through ``requests`` and
turns any failure there into a bare ``Exception``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from urllib.error import HTTPError, URLError

from monai.apps import DecathlonDataset, HashCheckError, download_url, extractall

from segment.atomic import read_only_ancestor
from segment.errors import SegmentError

# Copies, so nothing done to these tables (tests point them at local files) can leak into MONAI.
TASKS: dict[str, str] = dict(DecathlonDataset.resource)
MD5: dict[str, str] = dict(DecathlonDataset.md5)


class DataNotFoundError(SegmentError):
    """The task's data is not where it is expected and could not be fetched."""


class FetchError(DataNotFoundError):
    """The task could not be fetched; the message is one sentence saying what failed and what to do."""


@contextlib.contextmanager
def quiet_monai_logger() -> Iterator[None]:
    """Silence MONAI's download logger for the duration.

    It writes INFO and ERROR lines to stdout, naming the hidden temporary paths. The failures it
    reports reach the user anyway, as this script's own one-sentence message.
    """
    logger = logging.getLogger("monai.apps")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _network_reason(error: OSError) -> str:
    """A short reason for a failed download, without urllib's angle-bracket wrapping."""
    if isinstance(error, HTTPError):
        return f"HTTP {error.code} {error.reason}"
    if isinstance(error, URLError):
        return str(error.reason)
    return str(error)


def _manual_hint(task: str, data_root: Path) -> str:
    """The instruction for installing ``task`` by hand; it follows a message that names the URL."""
    dataset_json = data_root / task / "dataset.json"
    return f"download that tar by hand and extract it into {data_root} so that {dataset_json} exists"


def _download(task: str, data_root: Path, partial: Path) -> Path:
    """Download, verify and extract ``task`` inside ``partial``; return the extracted task folder."""
    url = TASKS[task]
    tar = partial / f"{task}.tar"
    with quiet_monai_logger():
        try:
            # The progress bar only on a terminal: in logs it is noise, and on failure it leaves an
            # empty bar line on stderr next to the error.
            download_url(url, tar, hash_val=MD5[task], hash_type="md5", progress=sys.stderr.isatty())
        except HashCheckError as error:
            raise FetchError(
                f"The file downloaded from {url} does not match MONAI's md5 {MD5[task]}, so it was deleted; "
                f"try again, or {_manual_hint(task, data_root)}."
            ) from error
        except OSError as error:
            raise FetchError(
                f"Downloading {task} from {url} failed ({_network_reason(error)}); {_manual_hint(task, data_root)}."
            ) from error
        print(f"Verified md5 {MD5[task]}; extracting.")
        try:
            extractall(tar, partial / "extracted", file_type="tar", has_base=True)
        except (OSError, tarfile.TarError) as error:
            raise FetchError(f"Extracting {tar.name} from {url} failed ({error}).") from error
    extracted = partial / "extracted" / task
    if not (extracted / "dataset.json").is_file():
        raise FetchError(
            f"The tar from {url} has no {task}/dataset.json, so it is not the expected MSD task."
        )
    return extracted


def fetch_task(task: str, data_root: Path) -> Path:
    """Make sure ``data_root/task`` holds the MSD task, downloading it if needed; return that folder.

    Raises FetchError, with a one-sentence message, for an unknown task name, a folder that is
    in the way, or a failed download, checksum or extraction. Nothing is left behind on failure,
    not even ``data_root`` if this call created it.
    """
    if task not in TASKS:
        raise FetchError(f"Unknown task {task!r}; valid names are {', '.join(TASKS)}.")
    data_root = Path(data_root)
    target = data_root / task
    if (target / "dataset.json").is_file():
        print(f"{task} is already in {data_root} ({target / 'dataset.json'} exists); nothing to download.")
        return target
    if target.exists():
        raise FetchError(f"{target} exists but has no dataset.json; move it away and run again.")

    created_root = not data_root.exists()
    try:
        if (locked := read_only_ancestor(data_root)) is not None:
            raise FetchError(
                f"{locked} is marked read-only, so nothing is downloaded there; pass --data-root with a writable folder."
            )
        data_root.mkdir(parents=True, exist_ok=True)
        partial = data_root / f".{task}.partial-{os.getpid()}-{secrets.token_hex(4)}"
        partial.mkdir()
    except OSError as error:
        raise FetchError(
            f"Cannot create a download folder in {data_root} ({error.strerror or error})."
        ) from error
    try:
        print(f"Downloading {TASKS[task]} into {data_root}.")
        extracted = _download(task, data_root, partial)
        try:
            extracted.rename(target)
        except OSError as error:
            if (target / "dataset.json").is_file():
                # Another node's download, on a shared disk, finished first: the same md5-checked task.
                return target
            raise FetchError(
                f"Cannot move the extracted {task} to {target} ({error.strerror or error})."
            ) from error
    finally:
        shutil.rmtree(partial, ignore_errors=True)
        if created_root and not target.exists():
            with contextlib.suppress(OSError):
                data_root.rmdir()  # only succeeds if empty, so nothing but our own folder can go
    print(f"{task} is ready in {target}.")
    return target
