"""Regenerate the tables of bench/RESULTS.md from pytest-benchmark JSON files.

    python bench/make_results.py cpu.json [gpu.json ...]                          # print the tables
    python bench/make_results.py cpu.json gpu.json --write bench/RESULTS.md       # replace them in place

With ``--write`` the text between ``<!-- BEGIN cpu-table -->`` and ``<!-- END cpu-table -->`` (and the
``gpu-table`` pair) is replaced; everything else in the file is kept. CPU ratios are medians of per-round
ratios within one benchmark (each round ran every implementation once); ideal = ``passes`` × the plain
pass of the same round. GPU ratios: ideal = ``passes`` × the median of the plain-pass benchmark of the same
workload and precision; speedup = baseline median / step median, within one JSON file's run.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path


def load(paths) -> list[dict]:
    """One record per benchmark: its extra_info plus median/wall statistics and its run's context."""
    records = []
    for path in paths:
        run = json.loads(Path(path).read_text())
        context = {
            "date": run["datetime"][:10],
            "cpu": run["machine_info"].get("cpu", {}).get("brand_raw", "?"),
            "cores": run["machine_info"].get("cpu", {}).get("count", "?"),
            "commit": (run.get("commit_info") or {}).get("id", "?")[:10],
            "file": Path(path).name,
        }
        for bench in run["benchmarks"]:
            info = dict(bench["extra_info"])
            if "suite" not in info:
                continue
            info.update(median=bench["stats"]["median"], rounds=bench["stats"]["rounds"], name=bench["name"],
                        context=context)
            records.append(info)
    return records


def _fmt(value, digits=2, suffix=""):
    if value is None:
        return "–"
    return f"{value:.{digits}f}{suffix}"


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _contexts(records) -> str:
    seen = {}
    for r in records:
        c = r["context"]
        malloc = {True: ", malloc: freed memory retained (`retain_freed_memory()`)",
                  False: ", malloc: glibc defaults"}.get(r.get("retained_freed_memory"), "")
        seen[c["file"]] = (f"`{c['file']}`: {c['date']}, {r.get('device') or c['cpu']} ({c['cores']} cores), "
                           f"torch {r['torch']}, commit {c['commit']}{malloc}")
    return "\n".join(f"- {line}" for line in seen.values())


def _round_ratio(times: dict, numerator: str, denominator: str, scale: float = 1.0):
    """Median over rounds of times[numerator][i] / (scale * times[denominator][i]) (None if either is missing)."""
    if numerator not in times or denominator not in times:
        return None
    return statistics.median([a / (scale * b) for a, b in zip(times[numerator], times[denominator])])


def cpu_table(records) -> str:
    """Markdown tables of the CPU suite: each implementation against the baseline and the ideal, with the
    ratios taken round by round (every round of a benchmark ran each implementation once)."""
    records = [r for r in records if r["suite"] == "cpu"]
    if not records:
        return "_no CPU results_"
    lines = [
        _contexts(records), "",
        "| workload | hypergrad | malloc | implementation | rounds | median s | speedup vs baseline "
        "| × ideal (tasks one at a time) | × ideal (union batch) | step peak RSS MiB | × plain union step |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    plain_lines = ["", "| workload | hypergrad | malloc | plain pass | median s | passes | ideal s | step peak RSS MiB |",
                   "|---|---|---|---|---|---|---|---|"]
    for r in records:
        times, peaks, passes = r["seconds"], r.get("step_peak_mib", {}), r["passes"]
        rounds = len(next(iter(times.values())))
        malloc = {True: "retained", False: "default"}.get(r.get("retained_freed_memory"), "?")
        for variant, values in times.items():
            if variant.startswith("plain_"):
                median = statistics.median(values)
                plain_lines.append(f"| {r['workload']} | {r['method']} | {malloc} | {variant} | {_fmt(median, 3)} | "
                                   f"{passes} | {_fmt(passes * median)} | {_fmt(peaks.get(variant), 0)} |")
                continue
            speedup = _round_ratio(times, "baseline", variant)
            ideal_tasks = _round_ratio(times, variant, "plain_tasks", passes)
            ideal_union = _round_ratio(times, variant, "plain_union", passes)
            memory = _ratio(peaks.get(variant), peaks.get("plain_union"))
            lines.append(f"| {r['workload']} | {r['method']} | {malloc} | {variant} | {rounds} | "
                         f"{_fmt(statistics.median(values))} | {_fmt(speedup)} | {_fmt(ideal_tasks)} | {_fmt(ideal_union)} | "
                         f"{_fmt(peaks.get(variant), 0)} | {_fmt(memory)} |")
    return "\n".join(lines + plain_lines)


def gpu_table(records) -> str:
    """Markdown table of the GPU suite: per workload/hypergradient/precision, step vs baseline and ideal."""
    records = [r for r in records if r["suite"] == "gpu"]
    if not records:
        return "_no GPU results yet_"
    plain = {(r["workload"], r["precision"]): r for r in records if r["method"] == "plain"}
    steps = [r for r in records if r["method"] != "plain"]
    lines = [
        _contexts(records), "",
        "| workload | hypergrad | precision | implementation | median ms | speedup vs baseline | × ideal "
        "| peak GPU MiB | × plain union step | bf16 speedup vs tf32 | hypergrad rel. diff vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in steps:
        def find(**match):
            return next((s for s in steps if all(s.get(k) == v for k, v in match.items())), None)

        base = find(workload=r["workload"], method=r["method"], precision=r["precision"], implementation="baseline")
        tf32 = find(workload=r["workload"], method=r["method"], precision="tf32", variant=r["variant"])
        union = plain.get((r["workload"], r["precision"]))
        ideal = union["median"] * r["passes"] if union else None
        bf16_gain = _ratio(tf32["median"], r["median"]) if tf32 and r["precision"] == "bf16" else None
        lines.append(
            f"| {r['workload']} | {r['method']} | {r['precision']} | {r['variant']} | {_fmt(r['median'] * 1e3, 1)} | "
            f"{_fmt(_ratio(base['median'], r['median']) if base else None)} | {_fmt(_ratio(r['median'], ideal))} | "
            f"{_fmt(r.get('peak_gpu_mib'), 0)} | {_fmt(_ratio(r.get('peak_gpu_mib'), (union or {}).get('peak_gpu_mib')))} | "
            f"{_fmt(bf16_gain)} | {_fmt(r.get('hypergrad_rel_diff_vs_fp32'), 4)} |")
    lines += ["", "| workload | precision | plain union pass ms | passes | ideal ms | peak GPU MiB |",
              "|---|---|---|---|---|---|"]
    for (workload, precision), r in plain.items():
        lines.append(f"| {workload} | {precision} | {_fmt(r['median'] * 1e3, 2)} | {r['passes']} | "
                     f"{_fmt(r['median'] * r['passes'] * 1e3, 1)} | {_fmt(r.get('peak_gpu_mib'), 0)} |")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    """Replace the text between the BEGIN/END markers of ``name`` (the markers must exist)."""
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(\n<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no <!-- BEGIN {name} --> ... <!-- END {name} --> markers found")
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files")
    parser.add_argument("--write", metavar="RESULTS_MD", help="replace the tables in this file")
    args = parser.parse_args(argv)
    records = load(args.json)
    suites = {r["suite"] for r in records}
    tables = {suite: table(records) for suite, table in (("cpu", cpu_table), ("gpu", gpu_table)) if suite in suites}
    if not args.write:
        print("\n\n".join(tables.values()))
        return
    path = Path(args.write)
    text = path.read_text()
    for suite, body in tables.items():
        text = replace_section(text, f"{suite}-table", body)
    path.write_text(text)


if __name__ == "__main__":
    main(sys.argv[1:])
