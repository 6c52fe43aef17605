"""Every benchmark, one table: training-step throughput against MONAI's U-Nets with the FLOP rate
reached, inference per hippocampus volume and per CT-sized volume, the viewer's latencies, and
each section's peak memory, on a described machine. Writes the figures as JSON.

Each section runs in its own process, so its memory high-water mark is its own and no section
inherits another's caches or allocator state.

    make bench                                    # real figures, on an idle machine
    python benchmarks/run.py --quick              # smoke run: small sizes, figures meaningless
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import inference
import model_step
import sliding_window
import viewer
from common import ROOT, describe_machine, machine_rows, print_table, write_json

HERE = Path(__file__).resolve().parent
# JSON key -> (module, name in the table), in the order they run.
SECTIONS = {
    "model_step": (model_step, "training step"),
    "inference": (inference, "hippocampus inference"),
    "sliding_window": (sliding_window, "CT sliding window"),
    "viewer": (viewer, "viewer"),
}
RESULTS = HERE / "results.json"
# Quick runs go to a git-ignored folder: they must never replace the committed real figures.
QUICK_RESULTS = HERE / "results" / "quick.json"


def run_section(name: str, quick: bool) -> dict:
    """Run one section's script in a fresh interpreter and return its figures."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / f"{name}.json"
        command = [sys.executable, str(HERE / f"{name}.py"), "--json-out", str(output)]
        if quick:
            command.append("--quick")
        start = time.perf_counter()
        # Library chatter (Streamlit's, MONAI's) would break up the table: shown only on failure.
        finished = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if finished.returncode:
            sys.stderr.write(finished.stdout + finished.stderr)
            raise SystemExit(f"The {name} benchmark failed (exit {finished.returncode}); no results written.")
        result = json.loads(output.read_text())
    result["wall_seconds"] = round(time.perf_counter() - start, 1)
    return result


def git_state() -> dict:
    """The commit measured, and whether tracked files differed from it."""

    def git(*arguments: str) -> str | None:
        try:
            return subprocess.run(
                ["git", *arguments], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    status = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": None if status is None else bool(status),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    parser.add_argument("--data-root", help="folder holding Task04_Hippocampus (default $SEGMENT_DATA_ROOT)")
    parser.add_argument(
        "--output",
        type=Path,
        help=f"default {RESULTS.relative_to(ROOT)}; quick: {QUICK_RESULTS.relative_to(ROOT)}",
    )
    args = parser.parse_args()
    if args.data_root:
        os.environ["SEGMENT_DATA_ROOT"] = args.data_root  # the sections inherit it

    machine = describe_machine()
    sections = {}
    for name in SECTIONS:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        sections[name] = run_section(name, args.quick)

    rows = machine_rows(machine)
    for name, (module, _) in SECTIONS.items():
        rows += module.rows(sections[name])
    rows += [
        (f"peak RSS, {label} process", f"{sections[name]['peak_rss_mb']:,.0f} MB")
        for name, (_, label) in SECTIONS.items()
    ]
    if args.quick:
        rows.insert(0, ("run", "QUICK smoke run: small sizes, few repeats; not comparable figures"))
    print_table(rows)

    output = args.output or (QUICK_RESULTS if args.quick else RESULTS)
    write_json(
        output,
        {
            "quick": args.quick,
            "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "git": git_state(),
            "machine": machine,
            "sections": sections,
        },
    )
    print(f"\nwrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
