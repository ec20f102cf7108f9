"""Command-line entry points: ``gessl-train`` (one run) and ``gessl-compare`` (with vs without GeSSL, seeds).

Bad input (unknown method / backbone / dataset, impossible sizes, unreadable data, a checkpoint from another
config, settings that differ from the run being resumed, an occupied ``--out``, a missing module of the
``[train]`` extra) ends with one line on stderr and exit status 2, before anything in ``--out`` is touched.
A failure to draw the plots at the end is a one-line warning (exit status 0; the results are written).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from . import report
from .config import ConfigError, add_arguments, resolve
from .data import BUILTIN_DATASETS, DataError
from .trainer import RunError, finished_metrics, run_training

EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130

ALWAYS_IMPORTED = ("yaml", "tqdm", "matplotlib")
"""Modules of the ``[train]`` extra every run imports (config.yaml, progress bar, plots)."""
PIP_NAMES = {"yaml": "PyYAML", "PIL": "Pillow"}


def missing_dependencies(cfg: dict | None) -> dict[str, str]:
    """{module: description} of the optional modules this run would import that cannot be imported.

    cfg None: only :data:`ALWAYS_IMPORTED` (the settings could not be read without ``yaml``). Otherwise
    also ``torchvision`` for ``--backbone resnet50`` and ``PIL`` (Pillow) for a folder of images.
    """
    names = list(ALWAYS_IMPORTED)
    if cfg is not None:
        names += ["torchvision"] * (cfg["backbone"] == "resnet50")
        names += ["PIL"] * (cfg["data"].lower() not in BUILTIN_DATASETS)
    missing = {}
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            absent = isinstance(exc, ModuleNotFoundError) and (exc.name or name).split(".")[0] == name
            shown = f"{name} ({PIP_NAMES[name]})" if name in PIP_NAMES else name
            missing[name] = shown if absent else f"{shown}, which fails to import ({exc})"
    return missing


def resolve_checked(given: dict) -> dict:
    """``config.resolve`` after checking the optional dependencies, before anything is read or written.

    Raises ConfigError naming every missing module and the extra that installs them.
    """
    missing = missing_dependencies(None)
    cfg = None
    if "yaml" not in missing or not ({"config", "resume"} & set(given)):
        cfg = resolve(given)
        missing = missing_dependencies(cfg)
    if missing:
        raise ConfigError(f"missing optional dependencies: {', '.join(missing.values())}; install the main job's "
                          "extra with pip install 'gessl_ext[train]' (nothing was run)")
    return cfg


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage block) and takes flags only in full (an abbreviation
    such as --seed would silently mean gessl-compare's --seeds, and flags generated from the hypergradient
    registry would make abbreviations change meaning as methods are added)."""

    def __init__(self, **kwargs):
        super().__init__(allow_abbrev=False, **kwargs)

    def error(self, message):
        unknown_seed = message.startswith("unrecognized arguments") and "--seed " in message + " "
        raise ConfigError(message + (" (gessl-compare takes --seeds)" if unknown_seed else ""))


def _fail(prog: str, message: str) -> int:
    print(f"{prog}: error: {message}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _guarded(prog: str, body) -> int:
    try:
        return body()
    except (ConfigError, DataError, RunError) as exc:
        return _fail(prog, str(exc))
    except OSError as exc:  # an output folder that cannot be created or written, a full disk
        return _fail(prog, f"{exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; continue with --resume (checkpoints are written after every epoch)",
              file=sys.stderr)
        return EXIT_INTERRUPTED


def train_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gessl-train", description="Self-supervised pre-training with or without GeSSL, "
                     "evaluated by kNN, linear probe, few-shot on unseen classes, σ and one-step accuracy.")
    add_arguments(parser)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    """``gessl-train``: returns the exit status (0 on success, 2 on bad input)."""

    def body():
        given = vars(train_parser().parse_args(argv))
        cfg = resolve_checked(given)
        done = finished_metrics(cfg) if cfg["resume"] else None
        if done is not None:
            if os.environ.get("RANK", "0") == "0":   # under torchrun, rank 0 alone reports
                print(f"gessl-train: the run in {cfg['out']} is already finished ({done['epochs_completed']} epochs, "
                      f"{done['steps']} steps); nothing to do and no file changed (a larger --epochs or "
                      "--time-budget trains further)")
            return 0
        metrics = run_training(cfg)
        if not metrics:                           # a torchrun rank other than 0
            return 0
        print(f"{metrics['steps']} steps in {metrics['train_seconds']:.1f} s of training "
              f"({metrics['steps_per_second']:.3g} steps/s, augmentation {100 * metrics['augmentation_share']:.1f}% "
              f"of it), {metrics['wall_clock_seconds']:.1f} s in all; results in {cfg['out']}/metrics.json")
        return 0

    return _guarded("gessl-train", body)


# --- gessl-compare -------------------------------------------------------------------------------------

COMPARE_COLUMNS = [
    ("knn_accuracy", "kNN %"), ("linear_accuracy", "linear %"),
    ("sigma_unseen", "σ/sample ↓"), ("one_step_accuracy_train", "one-step acc %"), ("ratio_r", "r"),
    ("epoch", "epochs"), ("train_seconds", "train s"), ("steps_per_second", "steps/s"),
]
COMPARE_OUT = "runs/compare-{method}"
"""gessl-compare's default --out."""
DECIMALS = {"sigma_unseen": 3, "ratio_r": 3, "epoch": 1, "train_seconds": 0, "steps_per_second": 3}


COMPARE_SETS = ("seed", "gessl", "resume", "time_budget")
"""Settings gessl-compare sets for each run itself (--seeds, the variants, reuse of finished runs, equal time)."""


def compare_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gessl-compare", description="Run one SSL method with and without GeSSL (or with several "
                     "hypergradient methods) for several seeds; tables at equal epochs and equal training time.")
    add_arguments(parser, {"out": "output folder: compare.md, compare.json, compare.png, and each run in "
                                  f"<out>/<variant>/seed<seed> (default: {COMPARE_OUT.format(method='<method>')})"},
                  exclude=COMPARE_SETS)
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--hypergrad-methods", default=None,
                        help="compare these GeSSL hypergradient methods, e.g. fd,hvp,itd,first_order "
                             "(default: only --hypergrad)")
    parser.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                        help="include the plain SSL run (default: yes)")
    parser.add_argument("--equal-time", action=argparse.BooleanOptionalAction, default=True,
                        help="continue the faster runs until they have trained as long as the slowest (default: yes)")
    return parser


def _variants(args, cfg) -> list[tuple[str, dict]]:
    methods = [cfg["hypergrad"]] if args.hypergrad_methods is None else \
        [m.strip() for m in args.hypergrad_methods.split(",") if m.strip()]
    variants = [("ssl", {"gessl": False})] if args.baseline else []
    variants += [(f"gessl-{m}", {"gessl": True, "hypergrad": m}) for m in methods]
    if len(variants) < 2:
        raise ConfigError("nothing to compare: give --hypergrad-methods with two or more methods or keep --baseline")
    return variants


def _parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ConfigError(f"--seeds: expected distinct non-negative integers, got {text!r}")
    return seeds


def _run_or_reuse(cfg: dict) -> dict:
    """Run ``cfg``; reuse a finished run in its --out with the same settings, resume an unfinished one."""
    old = finished_metrics(cfg)
    if old is not None:
        return old
    if (Path(cfg["out"]) / "checkpoint.pt").is_file():
        cfg = {**cfg, "resume": True}
    return run_training(cfg)


def _entry_at_epoch(history: list[dict], epoch: int) -> dict:
    return next(h for h in history if h["epoch"] == epoch)


def compare_main(argv: list[str] | None = None) -> int:
    """``gessl-compare``: returns the exit status."""

    def body():
        args = compare_parser().parse_args(argv)
        given = {k: v for k, v in vars(args).items()
                 if k not in ("seeds", "hypergrad_methods", "baseline", "equal_time")}
        base = resolve_checked(given)
        root = Path(given.get("out") or COMPARE_OUT.format(method=base["method"]))
        seeds = _parse_seeds(args.seeds)
        variants = _variants(args, base)
        for _, overrides in variants:
            if overrides.get("hypergrad") is not None:
                from .config import coerce

                coerce("hypergrad", overrides["hypergrad"], "--hypergrad-methods")
        equal_time = args.equal_time and base["lr_schedule"] == "constant"
        if args.equal_time and not equal_time:
            print("gessl-compare: note: equal-time continuation needs --lr-schedule constant; skipped",
                  file=sys.stderr)
        epochs = base["epochs"]
        results: dict[str, dict[int, dict]] = {name: {} for name, _ in variants}
        for seed in seeds:
            for name, overrides in variants:
                cfg = {**base, **overrides, "seed": seed, "out": str(root / name / f"seed{seed}")}
                results[name][seed] = _run_or_reuse(cfg)
            if equal_time:
                budget = max(_entry_at_epoch(results[n][seed]["history"], epochs)["train_seconds"] for n, _ in variants)
                for name, overrides in variants:
                    final = results[name][seed]["history"][-1]
                    if final["train_seconds"] < 0.97 * budget:
                        cfg = {**base, **overrides, "seed": seed, "out": str(root / name / f"seed{seed}"),
                               "resume": True, "epochs": epochs * 1000, "time_budget": budget, "eval_every": 0}
                        results[name][seed] = run_training(cfg)
        text, table = compare_tables(results, variants, seeds, epochs, equal_time)
        root.mkdir(parents=True, exist_ok=True)
        (root / "compare.md").write_text(text)
        report.write_json(root / "compare.json", table)
        print(text)
        try:
            report.plot_compare(root / "compare.png",
                                {name: [results[name][s]["history"] for s in seeds] for name, _ in variants})
            print(f"written: {root}/compare.md, compare.json, compare.png")
        except Exception as exc:  # any plotting failure: the tables are already written
            print(f"gessl-compare: warning: compare.png was not drawn ({type(exc).__name__}: {exc}); "
                  f"{root}/compare.md and compare.json are complete", file=sys.stderr)
        return 0

    return _guarded("gessl-compare", body)


def compare_tables(results, variants, seeds, epochs, equal_time) -> tuple[str, dict]:
    """Markdown tables (mean ± std over seeds) at equal epochs and equal training time, and the raw values."""
    first = results[variants[0][0]][seeds[0]]["history"][-1]
    fewshot = [(k, report.fewshot_label(k) + " %") for k in report.fewshot_keys(first)]
    columns = COMPARE_COLUMNS[:2] + fewshot + COMPARE_COLUMNS[2:]
    points = {"equal epochs": lambda h: _entry_at_epoch(h, epochs)}
    if equal_time:
        points["equal training time"] = lambda h: h[-1]
    baseline = "ssl" if any(name == "ssl" for name, _ in variants) else None
    text = [f"# gessl-compare: {len(seeds)} seeds ({', '.join(map(str, seeds))}), mean ± std", ""]
    raw = {}
    for title, pick in points.items():
        rows, raw[title] = {}, {}
        for name, _ in variants:
            per_seed = []
            for seed in seeds:
                metrics = results[name][seed]
                entry = dict(pick(metrics["history"]))
                steps = entry["step"]
                entry["steps_per_second"] = steps / entry["train_seconds"] if entry["train_seconds"] > 0 else None
                if baseline is not None:
                    ref = pick(results[baseline][seed]["history"])["one_step_accuracy_train"]
                    entry["ratio_r"] = ref / entry["one_step_accuracy_train"] if entry["one_step_accuracy_train"] else None
                per_seed.append(entry)
            raw[title][name] = per_seed
            rows[name] = {key: report.mean_std([e.get(key) for e in per_seed]) for key, _ in columns}
        label = f"{title} ({epochs} epochs)" if title == "equal epochs" else \
            f"{title} (each run trained as long as the slowest, per seed)"
        text.append(report.format_table(label, columns, rows, DECIMALS))
    text.append("r = one-step accuracy of the plain SSL run / that of the row (Table 15; r < 1: the row adapts "
                "better). σ/sample: lower is better. kNN / linear: held-out test split; few-shot: unseen classes, "
                "± is the spread over seeds (per-run 95% CIs are in each metrics.json).\n")
    return "\n".join(text), raw
