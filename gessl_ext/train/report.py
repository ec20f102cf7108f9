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


METHOD_NAMES = {"simclr": "SimCLR", "byol": "BYOL", "simsiam": "SimSiam", "barlow": "Barlow Twins",
                "vicreg": "VICReg", "moco": "MoCo v2"}
ACCURACY_NAMES = {"knn_accuracy": "kNN", "linear_accuracy": "linear probe"}


def fewshot_keys(entry: dict) -> list[str]:
    return sorted(k for k in entry if k.startswith("fewshot_") and not k.endswith("_ci95"))


def fewshot_label(key: str) -> str:
    """'fewshot_5way_1shot' -> '5-way 1-shot'."""
    return key.removeprefix("fewshot_").replace("way_", "-way ").replace("shot", "-shot")


def run_title(cfg: dict) -> str:
    """What a run trained, for plot titles: 'SimCLR + GeSSL (fd)' or 'SimCLR'."""
    name = METHOD_NAMES.get(cfg["method"], cfg["method"])
    return f"{name} + GeSSL ({cfg['hypergrad']})" if cfg["gessl"] else name


def eval_line(entry: dict) -> str:
    """One line summarising an evaluation."""
    parts = [f"epoch {entry['epoch']:g}", f"kNN {entry['knn_accuracy']:.1f}%", f"linear {entry['linear_accuracy']:.1f}%"]
    for key in fewshot_keys(entry):
        parts.append(f"{fewshot_label(key)} {entry[key]:.1f}±{entry[key + '_ci95']:.1f}%")
    parts.append(f"σ/sample {entry['sigma_unseen']:.3f}")
    parts.append(f"one-step acc train {entry['one_step_accuracy_train']:.1f}% unseen {entry['one_step_accuracy_unseen']:.1f}%")
    return " | ".join(parts)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    """Write the figure as PNG through a temporary file, so a failure never leaves half a picture."""
    tmp = Path(path).with_name(Path(path).name + ".tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, path)


def _limits_with(values: list[float], extra: float, margin: float = 0.08) -> tuple[float, float]:
    """y-limits covering ``values`` and the level ``extra`` with a margin of ``margin`` of the span."""
    finite = [v for v in values if math.isfinite(v)] + [extra]
    low, high = min(finite), max(finite)
    pad = margin * (high - low) if high > low else 0.1 * max(abs(high), 1.0)
    return low - pad, high + pad


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def plot_run(out: Path, metrics: dict, log: list[dict]) -> None:
    """loss.png (per-step SSL loss, SimCLR's collapse level, and with GeSSL the outer KL) and accuracy.png
    (kNN, linear probe, few-shot vs epoch and vs training time), every panel titled with :func:`run_title`."""
    plt = _pyplot()
    cfg = metrics["config"]
    title = run_title(cfg)
    gessl = cfg["gessl"]
    fig, axes = plt.subplots(1, 2 if gessl else 1, figsize=(10 if gessl else 5.5, 3.8), squeeze=False)
    steps = [r["step"] for r in log]
    ssl = [r["ssl_loss"] for r in log]
    left = axes[0, 0]
    left.plot(steps, ssl, marker=".", label="SSL loss at θ")
    if cfg["method"] == "simclr":   # NT-Xent when all embeddings coincide (per task for GeSSL, union batch otherwise)
        n = cfg["task_size"] * (1 if gessl else cfg["tasks"])
        level = math.log(2 * n - 1)
        left.axhline(level, color="gray", linestyle="--", label=f"collapsed: ln(2·{n}−1) = {level:.2f}")
        left.set_ylim(*_limits_with(ssl, level))
    left.legend(fontsize=8, loc="best")
    left.set(xlabel="outer step" if gessl else "step", ylabel="SSL loss at θ", title=f"{title}: SSL loss")
    _integer_ticks(left)
    if gessl:
        kl = [r["kl"] for r in log]
        right = axes[0, 1]
        right.plot(steps, kl, color="tab:red", marker=".")
        right.set(xlabel="outer step", ylabel="outer KL (GeSSL loss L)", title=f"{title}: outer KL, mean over tasks",
                  yscale="log" if kl and min(kl) > 0 else "linear")
        _integer_ticks(right)
    fig.tight_layout()
    _save(fig, Path(out) / "loss.png")
    plt.close(fig)

    history = metrics["history"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    keys = list(ACCURACY_KEYS) + (fewshot_keys(history[0]) if history else [])
    for key in keys:
        ys = [h[key] for h in history]
        label = ACCURACY_NAMES.get(key) or fewshot_label(key)
        axes[0].plot([h["epoch"] for h in history], ys, marker="o", label=label)
        axes[1].plot([h["train_seconds"] for h in history], ys, marker="o", label=label)
    axes[0].set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy vs epoch")
    axes[1].set(xlabel="training time (s)", ylabel="accuracy (%)", title=f"{title}: accuracy vs training time")
    _integer_ticks(axes[0])
    for ax in axes:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, Path(out) / "accuracy.png")
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
    name = ACCURACY_NAMES.get(key) or fewshot_label(key)
    axes[0].set(xlabel="epoch", ylabel=f"{name} accuracy (%)", title=f"{name} vs epoch")
    axes[1].set(xlabel="training time (s)", ylabel=f"{name} accuracy (%)", title=f"{name} vs training time")
    _integer_ticks(axes[0])
    for ax in axes:
        ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
