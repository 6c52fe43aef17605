"""The table of docs/plans.md: `segment plan` run on the stand-in of each Decathlon task at its
published size (data_scripts/msd_fixtures.py), for the CPU and for a GPU.

    python docs/plan_table.py [--cases 3] [--keep DIR]

It writes about 2 GB of synthetic volumes to a temporary folder (removed afterwards unless
--keep names a folder to use) and takes a minute or two; the fingerprints are cached beside them.
"""

from __future__ import annotations

import argparse
import importlib.util
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "docs" / "plans.md"
BEGIN, END = "<!-- plans: begin -->", "<!-- plans: end -->"


def _fixtures():
    spec = importlib.util.spec_from_file_location("msd_fixtures", ROOT / "data_scripts" / "msd_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    return module


def _plan(task: str, data_root: Path, device: str) -> dict:
    output = data_root / f"{task}.{device}.yaml"
    command = [sys.executable, "-m", "segment.cli", "plan", task, "--data-root", str(data_root)]
    subprocess.run([*command, "--device", device, "--output", str(output), "--quiet"], check=True)
    return yaml.safe_load(output.read_text())


def _text(values) -> str:
    return "whole volume" if values is None else " x ".join(f"{v:g}" for v in values)


def _row(task: str, plan: dict) -> str:
    data, model, trainer = plan["data"], plan["model"], plan["trainer"]
    pooling = " ".join("".join(str(f) for f in level) for level in model["pooling"])
    norm = "CT foreground z-score" if data["modality"] == "ct" else f"{data['modality']} z-score per scan"
    spacing = _text(data.get("spacing")) if data.get("spacing") else "as stored"
    return (
        f"| {task} | {model['spatial_dims']}D | {spacing} | {_text(data.get('patch_size'))} | "
        f"{trainer['batch_size']} | {model['levels']} | {pooling} | {model['in_channels']} | {norm} |"
    )


def table(data_root: Path, device: str) -> str:
    header = [
        "| task | dims | spacing (mm) | patch | batch | levels | pooling per level (x y z) | channels | normalisation |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    fixtures = _fixtures()
    return "\n".join(header + [_row(task, _plan(task, data_root, device)) for task in fixtures.TASKS])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Write the stand-ins here and keep them.")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        data_root = args.keep or Path(scratch)
        fixtures = _fixtures()
        for task in fixtures.TASKS:
            if not (data_root / task / "dataset.json").is_file():
                fixtures.write_task(task, data_root, 1.0, args.cases)
        tables = "\n\n".join(f"**{device}**\n\n{table(data_root, device)}" for device in ("cpu", "cuda"))
    text = PLANS.read_text()
    PLANS.write_text(
        re.sub(f"{re.escape(BEGIN)}.*{re.escape(END)}", f"{BEGIN}\n{tables}\n{END}", text, flags=re.S)
    )
    print(f"Wrote the tables of {PLANS}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
