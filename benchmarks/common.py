"""What the benchmark sections share: the machine they ran on and its theoretical peak, the
process's memory high-water mark, and one command line (alone: print a table; under run.py:
write the figures as JSON)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
from collections.abc import Callable
from pathlib import Path

import monai
import torch

from segment.atomic import write_atomically
from segment.engine.device import Runtime, cpu_supports_bf16

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, str]

# fp32 lanes of the widest vector unit the CPU flags show, widest first.
VECTOR_LANES = (("avx512f", 16), ("avx", 8), ("sse2", 4))
# Intel's figure for one AMX tile unit per core: 512 bf16 multiply-adds per cycle.
AMX_BF16_FLOPS_PER_CYCLE = 1024


def section_parser(doc: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes and few repeats: a smoke run")
    parser.add_argument("--json-out", type=Path, help="write the figures here as JSON (run.py does)")
    return parser


def finish(args: argparse.Namespace, result: dict, rows: Callable[[dict], list[Row]]) -> None:
    """Add this process's peak memory, then write JSON for run.py or print the rows."""
    result["peak_rss_mb"] = peak_rss_mb()
    if args.json_out:
        write_json(args.json_out, result)
    else:
        print_table([*rows(result), ("peak RSS of this process", f"{result['peak_rss_mb']:,.0f} MB")])


def peak_rss_mb() -> float:
    """High-water mark of this process's resident memory (Linux reports kilobytes)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def write_json(path: Path, data: dict) -> None:
    write_atomically(path, lambda temporary: temporary.write_text(json.dumps(data, indent=2) + "\n"))


def print_table(rows: list[Row]) -> None:
    """A Markdown table, padded so it also reads well in a terminal."""
    rows = [("figure", "value"), *rows]
    width = max(len(figure) for figure, _ in rows)
    for index, (figure, value) in enumerate(rows):
        print(f"| {figure:<{width}} | {value} |")
        if index == 0:
            print(f"| {'-' * width} | --- |")


def precision(runtime: Runtime) -> str:
    """What a CPU runtime computes in: bf16 autocast where the CPU has bf16, else fp32."""
    return "bf16" if runtime.amp_dtype == torch.bfloat16 else "fp32"


def shape_label(shape: tuple[int, ...] | list[int]) -> str:
    return "x".join(str(size) for size in shape)


def describe_machine() -> dict:
    """CPU, threads, library versions and the theoretical peak for the threads torch uses."""
    available = os.sched_getaffinity(0)
    processors = [p for p in _cpuinfo() if int(p.get("processor", -1)) in available]
    first = processors[0] if processors else {}
    flags = set(first.get("flags", "").split())
    # Hyper-threads share their core's FMA units, so the peak counts physical cores.
    if processors and all("core id" in p for p in processors):
        cores = len({(p.get("physical id"), p["core id"]) for p in processors})
    else:
        cores = len(available)
    threads = torch.get_num_threads()
    peak_cores = min(threads, cores)
    clock_ghz, clock_source = _clock_ghz(first)
    fp32_per_cycle, fp32_how = _fp32_flops_per_cycle(flags)
    bf16_per_cycle, bf16_how = _bf16_flops_per_cycle(flags, fp32_per_cycle)

    def peak(per_cycle: int | None) -> float | None:
        return (
            None if per_cycle is None or clock_ghz is None else round(peak_cores * clock_ghz * per_cycle, 1)
        )

    return {
        "cpu": first.get("model name") or platform.processor() or platform.machine(),
        "logical_cpus": len(available),
        "physical_cores": cores,
        "torch_threads": threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "bf16_native": cpu_supports_bf16(),
        "clock_ghz": clock_ghz,
        "clock_source": clock_source,
        "peak_cores": peak_cores,
        "fp32_flops_per_cycle": fp32_per_cycle,
        "bf16_flops_per_cycle": bf16_per_cycle,
        "peak_fp32_gflops": peak(fp32_per_cycle),
        "peak_bf16_gflops": peak(bf16_per_cycle),
        "peak_assumption": (
            f"cores: torch threads, at most the physical cores; clock: {clock_source}; fp32 "
            f"{fp32_per_cycle} FLOPs per core-cycle ({fp32_how}); bf16 {bf16_per_cycle} ({bf16_how}). "
            f"An upper bound: all-core AVX-512 clocks can sit below this clock, and parts with one "
            f"512-bit FMA unit (or Zen 4's 256-bit datapath) reach half of it."
        ),
    }


def machine_rows(machine: dict) -> list[Row]:
    def gflops(value: float | None) -> str:
        return "unknown" if value is None else f"{value:,.0f} GFLOP/s"

    return [
        (
            "machine",
            f"{machine['cpu']}, {machine['physical_cores']} physical cores, "
            f"{machine['torch_threads']} torch threads, "
            f"torch {machine['torch']}, MONAI {machine['monai']}, "
            f"native bf16: {'yes' if machine['bf16_native'] else 'no'}",
        ),
        (
            "theoretical peak",
            f"fp32 {gflops(machine['peak_fp32_gflops'])}, bf16 {gflops(machine['peak_bf16_gflops'])} "
            f"({machine['peak_cores']} x {machine['clock_ghz']} GHz x {machine['fp32_flops_per_cycle']} "
            f"or {machine['bf16_flops_per_cycle']} FLOPs per core-cycle)",
        ),
        ("peak assumption", machine["peak_assumption"]),
    ]


def percent_of(gflops: float, peak: float | None) -> float | None:
    return None if not peak else round(100 * gflops / peak, 1)


def _cpuinfo() -> list[dict[str, str]]:
    """One dict per logical CPU of /proc/cpuinfo; empty where there is none."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    return [
        {key.strip(): value.strip() for key, _, value in (line.partition(":") for line in block.splitlines())}
        for block in text.strip().split("\n\n")
    ]


def _clock_ghz(cpu: dict[str, str]) -> tuple[float | None, str]:
    """The maximum clock where cpufreq tells it; else the clock /proc/cpuinfo shows (on a virtual
    machine, which has no cpufreq, that is the host's nominal clock)."""
    maximum = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq")
    if maximum.is_file():
        return round(int(maximum.read_text()) / 1e6, 3), "cpufreq maximum"
    if "cpu MHz" in cpu:
        return round(float(cpu["cpu MHz"]) / 1e3, 3), "/proc/cpuinfo cpu MHz"
    return None, "clock unknown"


def _fp32_flops_per_cycle(flags: set[str]) -> tuple[int | None, str]:
    """Assumes two vector pipes per core: two FMA units where the CPU has FMA (counted as two
    FLOPs each), else one adder and one multiplier."""
    for flag, lanes in VECTOR_LANES:
        if flag in flags:
            if "fma" in flags:
                return lanes * 2 * 2, f"{flag}: {lanes} fp32 lanes x 2 FMA units x 2 FLOPs per FMA"
            return lanes * 2, f"{flag}: {lanes} fp32 lanes x 2 units (one add, one multiply)"
    return None, "no known vector flags in /proc/cpuinfo"


def _bf16_flops_per_cycle(flags: set[str], fp32_per_cycle: int | None) -> tuple[int | None, str]:
    if "amx_bf16" in flags:
        return AMX_BF16_FLOPS_PER_CYCLE, "amx_bf16: one tile unit, 512 bf16 multiply-adds per cycle"
    if "avx512_bf16" in flags and fp32_per_cycle is not None:
        return 2 * fp32_per_cycle, "avx512_bf16: each fp32 lane does two bf16 multiply-adds per instruction"
    return fp32_per_cycle, "no native bf16: at the fp32 rate"
