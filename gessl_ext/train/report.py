"""Files a run writes: metrics.json, the per-step log, plots, and the tables of gessl-compare."""
from __future__ import annotations

import json
import math
import os
import platform
from pathlib import Path

import torch

ACCURACY_KEYS = ("knn_accuracy", "linear_accuracy")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    _atomic_write(Path(path), json.dumps(obj, indent=2, allow_nan=True) + "\n")


def write_yaml(path: Path, obj: dict) -> None:
    import yaml

    _atomic_write(Path(path), yaml.safe_dump(obj, sort_keys=False))


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_jsonl(path: Path, keep: int) -> None:
    """Keep the first ``keep`` records of a JSON-lines log (the steps a checkpoint covers)."""
    path = Path(path)
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line.strip()][:keep]
        _atomic_write(path, "".join(line + "\n" for line in lines))


def environment(device: torch.device) -> dict:
    """Package versions and the device, for metrics.json."""
    import importlib.metadata as md

    import gessl_ext

    versions = {"python": platform.python_version(), "torch": torch.__version__,
                "gessl_ext": getattr(gessl_ext, "__version__", None)}
    for pkg in ("torchvision", "numpy", "scikit-learn", "matplotlib", "tqdm"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    info = {"type": device.type, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "platform": platform.platform()}
    info["name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or
                                                                                     platform.machine())
    return {"versions": versions, "device": info}


def build_metrics(cfg: dict, run, finished: bool) -> dict:
    """The content of metrics.json for a :class:`~gessl_ext.train.trainer.Run`."""
    state = run.state
    steps = state["global_step"]
    history = state["history"]
    busy = state["aug_seconds"] + state["step_seconds"]
    metrics = {
        "finished": finished,
        "config": {k: v for k, v in cfg.items() if k != "resume"},
        "data": {"name": run.data.name, "image_size": run.data.image_size, "channels": run.data.channels,
                 "pretrain_classes": run.train_classes, "fewshot_classes": run.fewshot_classes,
                 "pretrain_images": len(run.pretrain_images), "train_split": len(run.data.train_images),
                 "test_split": len(run.data.test_images)},
        "model": {"backbone": cfg["backbone"], "feature_dim": run.model.feature_dim,
                  "parameters": sum(p.numel() for p in run.model.parameters())},
        **environment(run.device),
        "wall_clock_seconds": run.wall_seconds(),
        "cpu_seconds": run.cpu_seconds(),
        "train_seconds": state["train_seconds"],
        "train_cpu_seconds": state["train_cpu_seconds"],
        "eval_seconds": sum(h["eval_seconds"] for h in history),
        "epochs_completed": state["epoch"],
        "steps": steps,
        "steps_per_epoch": run.steps_per_epoch,
        "steps_per_second": steps / state["train_seconds"] if state["train_seconds"] > 0 else None,
        "augmentation_seconds_per_step": state["aug_seconds"] / steps if steps else None,
        "step_seconds_per_step": state["step_seconds"] / steps if steps else None,
        "augmentation_share": state["aug_seconds"] / busy if busy > 0 else None,
        "skipped_steps": state["skipped_steps"],
        "history": history,
        "final": history[-1] if history else None,
    }
    return metrics


def fewshot_keys(entry: dict) -> list[str]:
    return sorted(k for k in entry if k.startswith("fewshot_") and not k.endswith("_ci95"))


def eval_line(entry: dict) -> str:
    """One line summarising an evaluation."""
    parts = [f"epoch {entry['epoch']:g}", f"kNN {entry['knn_accuracy']:.1f}%", f"linear {entry['linear_accuracy']:.1f}%"]
    for key in fewshot_keys(entry):
        label = key.removeprefix("fewshot_").replace("way_", "-way ").replace("shot", "-shot")
        parts.append(f"{label} {entry[key]:.1f}±{entry[key + '_ci95']:.1f}%")
    parts.append(f"σ/sample {entry['sigma_unseen']:.3f}")
    parts.append(f"one-step acc train {entry['one_step_accuracy_train']:.1f}% unseen {entry['one_step_accuracy_unseen']:.1f}%")
    return " | ".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_run(out: Path, metrics: dict, log: list[dict]) -> None:
    """loss.png (per-step SSL loss and, with GeSSL, the outer KL) and accuracy.png (vs epoch and vs time)."""
    plt = _pyplot()
    gessl = metrics["config"]["gessl"]
    fig, axes = plt.subplots(1, 2 if gessl else 1, figsize=(10 if gessl else 5, 3.5), squeeze=False)
    steps = [r["step"] for r in log]
    axes[0, 0].plot(steps, [r["ssl_loss"] for r in log])
    cfg = metrics["config"]
    if cfg["method"] == "simclr":   # NT-Xent when all embeddings coincide (per task for GeSSL, union batch otherwise)
        n = cfg["task_size"] * (1 if cfg["gessl"] else cfg["tasks"])
        axes[0, 0].axhline(math.log(2 * n - 1), color="gray", linestyle="--", label="ln(2N-1): collapsed")
        axes[0, 0].legend(fontsize=8)
    axes[0, 0].set(xlabel="outer step", ylabel="SSL loss at θ", title=cfg["method"])
    if gessl:
        axes[0, 1].plot(steps, [r["kl"] for r in log], color="tab:red")
        axes[0, 1].set(xlabel="outer step", ylabel="outer KL (GeSSL loss)", yscale="log")
    fig.tight_layout()
    fig.savefig(Path(out) / "loss.png", dpi=100)
    plt.close(fig)

    history = metrics["history"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    keys = list(ACCURACY_KEYS) + (fewshot_keys(history[0]) if history else [])
    for key in keys:
        ys = [h[key] for h in history]
        axes[0].plot([h["epoch"] for h in history], ys, marker="o", label=key.replace("_accuracy", ""))
        axes[1].plot([h["train_seconds"] for h in history], ys, marker="o", label=key.replace("_accuracy", ""))
    axes[0].set(xlabel="epoch", ylabel="accuracy (%)")
    axes[1].set(xlabel="training time (s)", ylabel="accuracy (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(Path(out) / "accuracy.png", dpi=100)
    plt.close(fig)


# --- gessl-compare ---------------------------------------------------------------------------------

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value; NaNs dropped)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def format_table(title: str, columns: list[tuple[str, str]], rows: dict[str, dict[str, tuple[float, float]]],
                 decimals: dict[str, int]) -> str:
    """A markdown table: one row per variant, cells 'mean ± std'. columns: (key, header)."""
    lines = [f"### {title}", "", "| variant | " + " | ".join(h for _, h in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for variant, cells in rows.items():
        shown = []
        for key, _ in columns:
            mean, std = cells.get(key, (float("nan"), float("nan")))
            d = decimals.get(key, 1)
            shown.append("—" if math.isnan(mean) else f"{mean:.{d}f} ± {std:.{d}f}")
        lines.append(f"| {variant} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def plot_compare(path: Path, curves: dict[str, list[list[dict]]], key: str = "knn_accuracy") -> None:
    """``key`` vs epoch and vs training time, one colour per variant, one line per seed."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, (variant, runs) in enumerate(curves.items()):
        color = f"C{i}"
        for j, history in enumerate(runs):
            label = variant if j == 0 else None
            axes[0].plot([h["epoch"] for h in history], [h[key] for h in history], color=color, marker=".",
                         alpha=0.8, label=label)
            axes[1].plot([h["train_seconds"] for h in history], [h[key] for h in history], color=color, marker=".",
                         alpha=0.8, label=label)
    name = key.replace("_", " ")
    axes[0].set(xlabel="epoch", ylabel=f"{name} (%)")
    axes[1].set(xlabel="training time (s)", ylabel=f"{name} (%)")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
