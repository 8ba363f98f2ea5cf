"""The machine a benchmark ran on and the ready-to-paste Markdown summary every bench prints.

The summary opens with the exact command, the machine (CPU model and cores, or the GPU),
torch's thread count and the load average before and after the run: numbers taken on a
loaded machine are marked as such, since a busy neighbour slows both sides of a ratio
unevenly.
"""
from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys

import torch

BUSY_LOAD = 1.5  # a 1-minute load average above this many runnable tasks per core marks the run contended


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """What the numbers were measured on, with the load average right now."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    return {"device": device, "cores": os.cpu_count(), "load_average": list(os.getloadavg()),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def contended(before: dict, after: dict) -> bool:
    return max(before["load_average"][0], after["load_average"][0]) > BUSY_LOAD * before["cores"]


def print_summary(argv: list[str], before: dict, after: dict, lines: list[str]) -> None:
    """Print the Markdown block: command, machine, load, then the bench's own lines."""
    load = lambda m: "/".join(f"{x:.1f}" for x in m["load_average"])  # noqa: E731
    command = "setdiff-bench " + " ".join(shlex.quote(a) for a in argv)
    print("\n---- summary (Markdown, ready to paste into BENCHMARKS.md) ----")
    print(f"Command: `{command}`  ")
    print(f"Machine: {before['device']}; {before['date']}; load average (1/5/15 min) {load(before)} before, "
          f"{load(after)} after"
          + (" -- **measured under contention** (other processes were running)" if contended(before, after) else ""))
    print()
    for line in lines:
        print(line)
    print("---- end of summary ----")


def argv_of(argv: list[str] | None) -> list[str]:
    return list(sys.argv[1:] if argv is None else argv)
