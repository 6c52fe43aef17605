"""Viewer latency on this machine, server side (Streamlit's AppTest runs the page script as a
browser session would): upload to first overlay, and skip switch to new overlay.

    make bench            # all sections; or alone: python benchmarks/viewer.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import ROOT, Row, finish, section_parser
from streamlit.testing.v1 import AppTest

from segment.data.tasks import resolve_data_root

VIEWER = ROOT / "app" / "viewer.py"


def measure(repeats: int, data_root: str | None) -> dict:
    images = sorted((resolve_data_root(data_root) / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))
    if len(images) < repeats + 1:
        raise SystemExit("Task04_Hippocampus is not under the data root; set SEGMENT_DATA_ROOT.")
    with tempfile.TemporaryDirectory() as store:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(store) / 'mlflow.db'}"
        app = AppTest.from_file(str(VIEWER), default_timeout=300).run()
        uploads, switches = [], []
        # The first upload also loads the model and warms the kernels: not counted.
        for index, image in enumerate(images[: repeats + 1]):
            start = time.perf_counter()
            app = (
                app.file_uploader(key="scan")
                .set_value((image.name, image.read_bytes(), "application/gzip"))
                .run()
            )
            uploaded = time.perf_counter()
            app = app.toggle(key="skip_level_1").set_value(False).run()
            switched = time.perf_counter()
            if app.exception or app.error:
                raise SystemExit(f"The viewer failed on {image.name}.")
            # Every upload starts with all skips on.
            app = app.toggle(key="skip_level_1").set_value(True).run()
            if index:
                uploads.append(uploaded - start)
                switches.append(switched - uploaded)
    return {
        "volumes": repeats,
        "torch_threads": torch.get_num_threads(),
        "upload_to_overlay_seconds": round(statistics.median(uploads), 3),
        "skip_switch_to_overlay_seconds": round(statistics.median(switches), 3),
    }


def rows(result: dict) -> list[Row]:
    where = f"server side, median of {result['volumes']} hippocampus volumes"
    return [
        (f"viewer: upload to first overlay ({where})", f"{result['upload_to_overlay_seconds']:.3f} s"),
        (
            "viewer: skip switch to new overlay (server side)",
            f"{result['skip_switch_to_overlay_seconds']:.3f} s",
        ),
    ]


def main() -> None:
    parser = section_parser(__doc__)
    parser.add_argument("--repeats", type=int, help="timed uploads after one warm-up (default 5; quick 1)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    finish(args, measure(args.repeats or (1 if args.quick else 5), args.data_root), rows)


if __name__ == "__main__":
    main()
