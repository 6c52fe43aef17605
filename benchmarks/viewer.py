"""Viewer latency on this machine, server side (Streamlit's AppTest runs the page script as a
browser session would): upload to first overlay, and skip switch to new overlay.

    make bench            # or: python benchmarks/viewer.py --repeats 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from streamlit.testing.v1 import AppTest

from segment.data.tasks import resolve_data_root

VIEWER = Path(__file__).resolve().parents[1] / "app" / "viewer.py"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args()
    images = sorted((resolve_data_root(args.data_root) / "Task04_Hippocampus" / "imagesTr").glob("*.nii.gz"))
    if len(images) < args.repeats + 1:
        raise SystemExit("Task04_Hippocampus is not under the data root; set SEGMENT_DATA_ROOT.")
    with tempfile.TemporaryDirectory() as store:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{Path(store) / 'mlflow.db'}"
        app = AppTest.from_file(str(VIEWER), default_timeout=300).run()
        uploads, switches = [], []
        # The first upload also loads the model and warms the kernels: not counted.
        for index, image in enumerate(images[: args.repeats + 1]):
            start = time.perf_counter()
            app = (
                app.file_uploader(key="scan")
                .set_value((image.name, image.read_bytes(), "application/gzip"))
                .run()
            )
            uploaded = time.perf_counter()
            app = app.toggle(key="skip_0").set_value(False).run()
            switched = time.perf_counter()
            if app.exception or app.error:
                raise SystemExit(f"The viewer failed on {image.name}.")
            app = app.toggle(key="skip_0").set_value(True).run()  # every upload starts with all skips on
            if index:
                uploads.append(uploaded - start)
                switches.append(switched - uploaded)
    print(f"viewer on {args.repeats} hippocampus volumes (median, server side)")
    print(f"upload_to_overlay_seconds: {statistics.median(uploads):.3f}")
    print(f"skip_switch_to_overlay_seconds: {statistics.median(switches):.3f}")


if __name__ == "__main__":
    main()
