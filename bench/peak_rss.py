"""Peak resident memory (RSS) of one unit of benchmark work, measured in a fresh process.

Method (Linux): build the model and the views, write "5" to /proc/self/clear_refs (resets the
kernel's high-water mark VmHWM to the current RSS), read VmRSS, run one unit of work, read VmHWM.
``step_peak_mib`` = VmHWM − VmRSS before = the extra resident memory the work needed at its peak
(activations, graphs, gradients, parameter copies, allocator slack), sampled by the kernel on every
page fault, so short-lived peaks count. A fresh process per measurement keeps freed-but-cached heap
of earlier benchmarks out of the number; one unit of work on the workload's quick (tiny) version runs
first, so lazy imports (torch.func's first call imports torch._dynamo, ~100 MiB) are not counted.

Usage: ``python bench/peak_rss.py '{"workload": {...}, "implementation": "gessl", "method": "fd"}'``
prints a JSON object; :func:`measure_in_subprocess` does that from Python.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

MIB = 1024.0


def status_kib(field: str) -> int:
    """A memory field of /proc/self/status (e.g. "VmRSS", "VmHWM") in KiB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no field {field!r}")


def reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def peak_of(work) -> dict:
    """Run ``work()`` once; returns rss_before_mib, peak_mib (process VmHWM) and step_peak_mib."""
    reset_peak()
    before = status_kib("VmRSS")
    work()
    peak = status_kib("VmHWM")
    return {"rss_before_mib": before / MIB, "peak_mib": peak / MIB, "step_peak_mib": (peak - before) / MIB}


def measure_in_subprocess(workload, implementation: str, method: str = "fd", threads: int = 2,
                          timeout: float | None = None, retain_freed_memory: bool = False, **gessl_options) -> dict:
    """:func:`peak_of` one unit of work of ``implementation`` on ``workload`` in a fresh Python process
    (which calls ``gessl_ext.retain_freed_memory()`` first when ``retain_freed_memory``)."""
    request = {"workload": dataclasses.asdict(workload), "implementation": implementation, "method": method,
               "threads": threads, "retain_freed_memory": retain_freed_memory, "gessl_options": gessl_options}
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(request)], env=env,
                          capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"peak-RSS measurement of {implementation} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv) -> None:
    import torch

    from workloads import Workload, build, warm_up

    from gessl_ext import retain_freed_memory

    request = json.loads(argv[0])
    if request["retain_freed_memory"]:
        retain_freed_memory()
    torch.set_num_threads(request["threads"])
    workload = Workload(**request["workload"])
    warm_up(workload, request["implementation"], request["method"], **request["gessl_options"])
    _, run = build(workload, request["implementation"], request["method"], **request["gessl_options"])
    views = workload.views()
    print(json.dumps(peak_of(lambda: run(views))))


if __name__ == "__main__":
    main(sys.argv[1:])
