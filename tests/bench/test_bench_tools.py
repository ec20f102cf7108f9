"""The measurement tools of bench/: peak-RSS method and the results tables."""
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from make_results import cpu_table, gpu_table, load, main, replace_section  # noqa: E402
from peak_rss import measure_in_subprocess, peak_of  # noqa: E402
from workloads import Workload  # noqa: E402


def test_peak_of_sees_a_short_lived_allocation():
    mib = 96

    def work():
        block = torch.ones(mib * 2**20 // 4)  # touched pages, freed on return
        return float(block[-1])

    measured = peak_of(work)
    assert mib - 2 <= measured["step_peak_mib"] <= mib + 48
    assert measured["peak_mib"] >= measured["rss_before_mib"] + measured["step_peak_mib"] - 1e-6


def test_measure_in_subprocess_scales_with_the_batch():
    small = Workload("convnet", 1, 28, num_tasks=1, task_size=8)
    large = Workload("convnet", 1, 28, num_tasks=1, task_size=256)
    peaks = [measure_in_subprocess(w, "plain_union", threads=1, timeout=120)["step_peak_mib"] for w in (small, large)]
    # activations of the 2N-image batch: conv outputs 32x26x26 + 64x24x24 floats (+ ReLU, pool) per image
    per_image_mib = (32 * 26 * 26 + 64 * 24 * 24) * 4 / 2**20
    assert peaks[1] - peaks[0] >= 2 * (256 - 8) * per_image_mib


def _bench(name, median, **info):
    return {"group": None, "name": name, "extra_info": info, "stats": {"median": median, "rounds": 3}}


def _write_run(path, benchmarks):
    run = {"machine_info": {"cpu": {"brand_raw": "Test CPU", "count": 2}}, "commit_info": {"id": "abc123"},
           "datetime": "2026-01-02T03:04:05", "benchmarks": benchmarks, "version": "5"}
    path.write_text(json.dumps(run))
    return path


def test_cpu_table_ratios_are_medians_of_per_round_ratios(tmp_path):
    seconds = {"default": [5.0, 6.0, 4.0], "baseline": [10.0, 9.0, 12.0],
               "plain_tasks": [0.5, 0.4, 0.25], "plain_union": [0.25, 0.3, 0.5]}
    peaks = {"default": 300.0, "baseline": 450.0, "plain_tasks": 100.0, "plain_union": 200.0}
    path = _write_run(tmp_path / "cpu.json", [
        _bench("case", 20.0, suite="cpu", workload="w", method="fd", passes=10, threads=2, torch="x",
               retained_freed_memory=True, seconds=seconds, step_peak_mib=peaks),
    ])
    table = cpu_table(load([path]))
    # default: speedups 2, 1.5, 3 -> 2.00; ×ideal (tasks) 5/5, 6/4, 4/2.5 -> 1.50; ×union 5/2.5, 6/3, 4/5 -> 2.00
    assert "| w | fd | retained | default | 3 | 5.00 | 2.00 | 1.50 | 2.00 | 300 | 1.50 |" in table
    # baseline: 1 by definition; ×ideal 10/5, 9/4, 12/2.5 -> 2.25; ×union 10/2.5, 9/3, 12/5 -> 3.00
    assert "| w | fd | retained | baseline | 3 | 10.00 | 1.00 | 2.25 | 3.00 | 450 | 2.25 |" in table
    assert "| w | fd | retained | plain_union | 0.300 | 10 | 3.00 | 200 |" in table
    assert "Test CPU (2 cores)" in table and "commit abc123" in table and "freed memory retained" in table


def test_gpu_table_ratios(tmp_path):
    common = dict(suite="gpu", workload="r", method="fd", torch="x", passes=14, device="H")
    path = _write_run(tmp_path / "gpu.json", [
        _bench("a", 0.020, precision="tf32", implementation="gessl", variant="default", peak_gpu_mib=900.0, **common),
        _bench("b", 0.010, precision="bf16", implementation="gessl", variant="default", peak_gpu_mib=600.0,
               hypergrad_rel_diff_vs_fp32=0.0123, **common),
        _bench("c", 0.150, precision="bf16", implementation="baseline", variant="baseline", peak_gpu_mib=300.0,
               **common),
        _bench("d", 0.0005, precision="bf16", implementation="plain_union", variant="plain_union",
               peak_gpu_mib=500.0, **{**common, "method": "plain"}),
    ])
    table = gpu_table(load([path]))
    # bf16 step: 150/10 = 15x the baseline, 10 / (14*0.5) = 1.43x the ideal, 600/500 memory, 20/10 over tf32
    assert "| r | fd | bf16 | default | 10.0 | 15.00 | 1.43 | 600 | 1.20 | 2.00 | 0.0123 |" in table


def test_write_replaces_only_the_marked_section(tmp_path):
    text = "intro\n<!-- BEGIN cpu-table -->\nold\n<!-- END cpu-table -->\noutro\n"
    assert replace_section(text, "cpu-table", "new") == "intro\n<!-- BEGIN cpu-table -->\nnew\n<!-- END cpu-table -->\noutro\n"
    with pytest.raises(ValueError, match="gpu-table"):
        replace_section(text, "gpu-table", "x")
    results = tmp_path / "RESULTS.md"
    results.write_text(text + "<!-- BEGIN gpu-table -->\nkeep\n<!-- END gpu-table -->\n")
    run = _write_run(tmp_path / "cpu.json", [_bench("u", 0.25, suite="cpu", workload="w", torch="x", passes=14,
                                                     method="fd", seconds={"plain_union": [0.25]})])
    main([str(run), "--write", str(results)])
    written = results.read_text()
    assert written.startswith("intro\n<!-- BEGIN cpu-table -->\n- `cpu.json`") and "\nkeep\n" in written
    assert "| w | fd | ? | plain_union | 0.250 | 14 | 3.50 | – |" in written
