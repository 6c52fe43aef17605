"""Download one Medical Segmentation Decathlon task into a data root and verify its md5.

    python data_scripts/fetch_msd.py Task04_Hippocampus [--data-root DIR]

The data root defaults to ``$SEGMENT_DATA_ROOT``, or ``./data`` when that is unset. A task
already present is left alone; a failed download leaves nothing behind (segment/data/msd.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from segment.data.msd import TASKS, FetchError, fetch_task
from segment.data.tasks import resolve_data_root


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 on any error, after one line on stderr)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("task", help=f"the MSD task, one of: {', '.join(TASKS)}")
    parser.add_argument(
        "--data-root",
        type=Path,
        default=resolve_data_root(),
        help="folder that holds the task folders (default: %(default)s, from $SEGMENT_DATA_ROOT or ./data)",
    )
    args = parser.parse_args(argv)
    try:
        fetch_task(args.task, args.data_root)
    except FetchError as error:
        print(error, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
