"""Every setting of the main job in one table: defaults, the ``--quick`` preset, YAML config files, validation.

Precedence, lowest first: :data:`OPTIONS` defaults < :data:`QUICK` (with ``--quick``) < ``--config`` file
< flags given on the command line. Keys are the long flag names with ``_`` for ``-`` (a YAML file may use
either). The defaults follow the paper where it fixes a value: tasks of N = 32 images (B = 16/32), M = 8
tasks per outer step (n = 8), K = 1 inner step, λ = 10 target steps, SGD with momentum 0.9 and weight
decay 1e-4, head temperature 0.1, SimCLR temperature 0.5.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..hypergrad import HYPERGRADIENTS, Hypergradient
from .models import BACKBONES, PROJECTORS

METHODS = ("simclr", "byol", "simsiam", "barlow", "vicreg", "moco")
#: Entry-point group of third-party hypergradient methods: each entry names a module (or object) whose import
#: registers methods with ``gessl_ext.hypergrad.register_hypergradient``; loaded before the options are built.
HYPERGRAD_PLUGINS = "gessl_ext.hypergradients"


class ConfigError(ValueError):
    """A setting is unknown, of the wrong type or out of range (the message names it)."""


@dataclass(frozen=True)
class Option:
    """One setting. kind: int | float | str | bool | ints (comma list); optional: None allowed.

    resumable: may differ between a run and its ``--resume`` (does not change the training trajectory).
    """

    key: str
    default: Any
    kind: str
    help: str
    choices: tuple | None = None
    minimum: float | None = None
    optional: bool = False
    resumable: bool = False
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


OPTIONS = [
    # data and tasks
    Option("data", "fashion-mnist", "str", "fashion-mnist, cifar10, cifar100, or a folder of images (one sub-folder "
           "per class; train/ + test/ sub-folders are used when present, else 20%% of each class is held out)"),
    Option("data_dir", None, "str", "where the dataset files are (default for fashion-mnist: "
           "/usr/share/datasets/fashion-mnist; for cifar: ./data)", optional=True),
    Option("image_size", None, "int", "resize images to this side (default: native; 32 for folders)", minimum=8,
           optional=True),
    Option("train_classes", None, "str", "classes used for pre-training, e.g. 0-4 (default: all)", optional=True),
    Option("fewshot_classes", None, "str", "unseen classes for few-shot, σ and unseen tasks, e.g. 5-9 (default: the "
           "classes not in --train-classes, or all classes)", optional=True),
    Option("train_subset", None, "int", "pre-train on this many images (a seeded random subset)", minimum=1,
           optional=True),
    Option("crop_min_scale", 0.2, "float", "smallest crop area fraction of the random resized crop", minimum=0.01),
    # method
    Option("method", "simclr", "str", "SSL objective", choices=METHODS),
    Option("gessl", True, "bool", "train with GeSSL (--no-gessl: the plain SSL step on the union of the M tasks)"),
    Option("hypergrad", "fd", "str", "hypergradient method of GeSSL (settings: the --<method>-<setting> flags)",
           choices=()),   # filled from the registry below
    Option("temperature", None, "float", "temperature of SimCLR (default 0.5) / MoCo (default 0.2)", minimum=1e-6,
           optional=True),
    Option("predictor_hidden", 512, "int", "hidden width of the BYOL / SimSiam predictor", minimum=1),
    Option("moco_queue", 4096, "int", "MoCo queue length", minimum=1),
    Option("tasks", 8, "int", "M, tasks per outer step (the paper's n = 8)", minimum=1, metavar="M"),
    Option("task_size", 32, "int", "N, images per task (the paper's B = 16/32)", minimum=2, metavar="N"),
    Option("inner_steps", 1, "int", "K, inner SGD steps per task", minimum=1, metavar="K"),
    Option("target_steps", 10, "int", "λ, further steps to the self-motivated target", minimum=0, metavar="LAMBDA"),
    Option("inner_lr", 0.05, "float", "α, inner SGD learning rate", minimum=1e-12),
    Option("head_temperature", 0.1, "float", "τ of the pair-classification head π", minimum=1e-6),
    Option("task_batching", "auto", "str", "how GeSSLStep runs the tasks (auto: by device and task size, see README)",
           choices=("auto", "vmap", "loop")),
    Option("task_chunk_size", None, "int", "tasks per vmap call", minimum=1, optional=True),
    # model and optimiser
    Option("backbone", "convnet", "str", "encoder", choices=BACKBONES),
    Option("projector", "auto", "str", "projection head (auto: none for the convnets, mlp otherwise)",
           choices=PROJECTORS),
    Option("proj_dim", 128, "int", "embedding size", minimum=1),
    Option("epochs", 20, "int", "epochs (one epoch = one pass over the pre-training images)", minimum=1,
           resumable=True),
    Option("steps_per_epoch", None, "int", "cap on outer steps per epoch", minimum=1, optional=True),
    Option("lr", 0.05, "float", "β, outer SGD learning rate", minimum=0.0),
    Option("lr_schedule", "constant", "str", "outer learning-rate schedule (cosine: over --epochs, per step)",
           choices=("constant", "cosine")),
    Option("momentum", 0.9, "float", "SGD momentum", minimum=0.0),
    Option("weight_decay", 1e-4, "float", "SGD weight decay", minimum=0.0),
    Option("seed", 0, "int", "seed of the initialisation, the tasks, the augmentations and the evaluation data",
           minimum=0),
    Option("amp", "off", "str", "bf16 autocast of the forward passes", choices=("off", "bf16")),
    Option("device", "auto", "str", "auto: cuda when available", choices=("auto", "cpu", "cuda"), resumable=True),
    Option("retain_freed_memory", True, "bool", "on the CPU, let malloc keep freed memory for reuse "
           "(gessl_ext.allocator: 15-20%% faster passes on a 2-core machine; resident memory stays near its peak)",
           resumable=True),
    # evaluation
    Option("eval_every", 1, "int", "evaluate every this many epochs (0: only at the end)", minimum=0, resumable=True),
    Option("eval_initial", True, "bool", "evaluate the initial weights too (epoch 0)"),
    Option("knn_k", 20, "int", "k of the kNN classifier", minimum=1),
    Option("probe_l2", 1e-4, "float", "L2 penalty of the linear probe", minimum=0.0),
    Option("eval_train_size", None, "int", "labelled training images for kNN / linear probe (default: all)",
           minimum=1, optional=True),
    Option("eval_test_size", None, "int", "held-out test images for kNN / linear probe, and the cap on unseen-class "
           "test images for few-shot (as many per class; default: all)", minimum=1, optional=True),
    Option("fewshot_ways", 5, "int", "N of N-way K-shot", minimum=2),
    Option("fewshot_shots", [1, 5], "ints", "K values of N-way K-shot, e.g. 1,5", minimum=1),
    Option("fewshot_queries", 15, "int", "query images per class and episode", minimum=1),
    Option("fewshot_episodes", 1000, "int", "few-shot episodes", minimum=2),
    Option("eval_tasks", 16, "int", "tasks (of --task-size images) for σ and the one-step accuracies", minimum=1),
    # run control
    Option("out", None, "str", "output folder (default: runs/<method>-<gessl|ssl>-seed<seed>)", optional=True,
           resumable=True),
    Option("time_budget", None, "float", "stop training after this many seconds of training time", minimum=0.0,
           optional=True, resumable=True),
    Option("progress", True, "bool", "show a progress bar", resumable=True),
    Option("warn_nonsmooth", True, "bool", "print the note that --hypergrad fd is biased on networks with ReLU / "
           "max-pool layers", resumable=True),
]


def _hypergrad_options() -> list[Option]:
    """``--hypergrad`` with every registered method as a choice, and one option per method setting, keyed
    ``<method>_<setting>`` (``--fd-radius``, ``--cg-iters``, …), from the registry after loading the plugins."""
    for entry in importlib.metadata.entry_points(group=HYPERGRAD_PLUGINS):
        entry.load()
    settings = []
    for name, cls in HYPERGRADIENTS.items():
        for field in cls.settings():
            kind = {bool: "bool", int: "int", float: "float", str: "str"}[type(field.default)]
            settings.append(Option(f"{name}_{field.name}", field.default, kind,
                                   f"{field.metadata['help']} (--hypergrad {name})", minimum=field.metadata.get("minimum")))
    return settings


def build_hypergradient(cfg: dict) -> Hypergradient:
    """The method instance ``cfg`` selects, with its ``<method>_<setting>`` values."""
    cls = HYPERGRADIENTS[cfg["hypergrad"]]
    try:
        return cls(**{f.name: cfg[f"{cls.name}_{f.name}"] for f in cls.settings()})
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--hypergrad {cls.name}: {exc}") from None


_hypergrad = next(i for i, o in enumerate(OPTIONS) if o.key == "hypergrad")
OPTIONS[_hypergrad + 1:_hypergrad + 1] = _hypergrad_options()
OPTIONS[_hypergrad] = dataclasses.replace(OPTIONS[_hypergrad], choices=tuple(HYPERGRADIENTS))
OPTION_BY_KEY = {o.key: o for o in OPTIONS}
RESUMABLE_FLAGS = ", ".join(o.flag for o in OPTIONS if o.resumable and o.key != "out")
"""The flags that may change on ``--resume`` (``--out`` names the run itself)."""

QUICK = {
    "train_classes": "0-4",
    "fewshot_classes": "5-9",
    "train_subset": 1024,
    "epochs": 2,
    "tasks": 4,
    "task_size": 32,
    "eval_train_size": 2000,
    "eval_test_size": 1000,
    "fewshot_episodes": 300,
    "eval_tasks": 8,
}
"""``--quick``: the README's main job (its runtime is measured there), with real accuracies."""


def defaults() -> dict:
    return {o.key: (list(o.default) if isinstance(o.default, list) else o.default) for o in OPTIONS}


def coerce(key: str, value, source: str):
    """Check and convert one value (from YAML or argparse) for ``key``; raise ConfigError naming ``source``."""
    opt = OPTION_BY_KEY.get(key)
    if opt is None:
        raise ConfigError(f"unknown setting {key!r} in {source}")
    where = f"{opt.flag} ({source})"
    if value is None:
        if opt.optional:
            return None
        raise ConfigError(f"{where} needs a value")
    try:
        if opt.kind == "bool":
            if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
                value = value.lower() in ("true", "yes", "on", "1")
            if not isinstance(value, bool):
                raise ValueError
        elif opt.kind == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            value = int(value)
        elif opt.kind == "float":
            if isinstance(value, bool):
                raise ValueError
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError
        elif opt.kind == "ints":
            items = value.split(",") if isinstance(value, str) else (value if isinstance(value, list) else [value])
            value = [coerce_int(v) for v in items]
            if not value:
                raise ValueError
        else:
            if isinstance(value, (int, float)) and not isinstance(value, bool) and opt.key in ("train_classes",
                                                                                                 "fewshot_classes"):
                value = str(value)
            if not isinstance(value, str):
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: invalid {opt.kind} value {value!r}") from None
    if opt.choices is not None and value not in opt.choices:
        raise ConfigError(f"{where}: unknown value {value!r}; choose one of {', '.join(opt.choices)}")
    if opt.minimum is not None:
        for v in (value if isinstance(value, list) else [value]):
            if v < opt.minimum:
                raise ConfigError(f"{where}: must be >= {opt.minimum:g}, got {v}")
    return value


def coerce_int(v) -> int:
    if isinstance(v, bool) or (isinstance(v, float) and not v.is_integer()):
        raise ValueError
    return int(str(v).strip()) if isinstance(v, str) else int(v)


def load_yaml(path: str) -> dict:
    """Settings from a YAML mapping (keys with ``-`` or ``_``)."""
    import yaml

    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    try:
        content = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, got {type(content).__name__}")
    return {str(k).replace("-", "_"): v for k, v in content.items()}


# measured with `bash scripts/measure_readme.sh OUT quick` on the idle 2-core machine, 2026-12-01 (README, "The main job")
QUICK_RUNTIME = "about 50 s wall-clock and 90 s of CPU time on an idle 2-core CPU"


def add_arguments(parser: argparse.ArgumentParser, help_overrides: dict[str, str] | None = None,
                  exclude: tuple[str, ...] = ()) -> None:
    """One flag per :data:`OPTIONS` entry (default SUPPRESS, so only given flags reach the namespace).

    help_overrides: {key: help text} replacing an option's own (e.g. gessl-compare's ``--out``); exclude: keys
    (and "resume") that the caller sets itself, so they get no flag.
    """
    parser.add_argument("--config", metavar="FILE.yaml", default=argparse.SUPPRESS,
                        help="settings from a YAML file (command-line flags win)")
    parser.add_argument("--quick", action="store_true", default=argparse.SUPPRESS,
                        help=f"small preset, {QUICK_RUNTIME} (" +
                             ", ".join(f"{k}={v}" for k, v in QUICK.items()) + ")")
    if "resume" not in exclude:
        parser.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                            help="continue the run in --out from its last checkpoint, with the settings in its "
                                 f"config.yaml; only {RESUMABLE_FLAGS} may be given differently (a finished run "
                                 "is left untouched)")
    for opt in (o for o in OPTIONS if o.key not in exclude):
        default = opt.default if not isinstance(opt.default, list) else ",".join(map(str, opt.default))
        text = (help_overrides or {}).get(opt.key, opt.help)
        text = text if "default" in text else f"{text} (default: {default})"
        if opt.kind == "bool":
            parser.add_argument(opt.flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(opt.flag, default=argparse.SUPPRESS, metavar=opt.metavar or opt.key.upper(),
                                help=text + (f"; one of {', '.join(opt.choices)}" if opt.choices else ""))


def resolve(given: dict) -> dict:
    """Merge defaults, --quick, --config and the given flags into a validated config dict.

    given: the argparse namespace as a dict (only flags that were given). Returns every OPTIONS key plus
    ``quick``, ``config`` and ``resume``. With ``resume``, the settings are those of the run in ``--out``
    (its ``config.yaml``); settings given again must agree with them unless they are resumable.

    Raises ConfigError naming the setting (unknown, wrong type, out of range, differing on --resume).
    """
    given = dict(given)
    config_path = given.pop("config", None)
    resume = bool(given.pop("resume", False))
    from_file = load_yaml(config_path) if config_path else {}
    quick = bool(given.pop("quick", False)) or bool(coerce_quick(from_file.pop("quick", False), config_path))
    chosen = dict(QUICK) if quick else {}     # the settings asked for, by --quick, --config and flags (later wins)
    for key, value in from_file.items():
        chosen[key] = coerce(key, value, f"config file {config_path}")
    for key, value in given.items():
        chosen[key] = coerce(key, value, "command line")
    cfg = {**defaults(), **chosen}
    if cfg["out"] is None:
        cfg["out"] = f"runs/{cfg['method']}-{'gessl' if cfg['gessl'] else 'ssl'}-seed{cfg['seed']}"
    if resume:
        cfg = resumed_settings(cfg["out"], chosen)
    cfg.update(quick=quick, config=config_path, resume=resume)
    build_hypergradient(cfg)   # the method's own validation, before anything runs
    return cfg


def resumed_settings(out: str, chosen: dict) -> dict:
    """The settings of the run in ``out`` (its config.yaml), with the resumable ones of ``chosen`` applied.

    Raises ConfigError when ``out`` holds no config.yaml, or when ``chosen`` gives a setting that is not
    resumable a value other than the run's (each such setting is named).
    """
    path = Path(out) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"--resume: no run to continue in {out} (no config.yaml there)")
    saved = defaults()
    for key, value in load_yaml(str(path)).items():
        saved[key] = coerce(key, value, str(path))
    fixed = training_identity(saved)
    differing = [k for k in chosen if k in fixed and chosen[k] != saved[k]]
    if differing:
        shown = "; ".join(f"{OPTION_BY_KEY[k].flag} {chosen[k]!r} given, {saved[k]!r} in the run" for k in differing)
        cosine = " (--epochs not under --lr-schedule cosine)" if "epochs" in differing else ""
        raise ConfigError(f"--resume: settings differ from the run in {out} ({shown}); on --resume only "
                          f"{RESUMABLE_FLAGS}{cosine} may change (leave the others out: the run's config.yaml "
                          "supplies them)")
    saved.update({k: v for k, v in chosen.items() if k not in fixed})
    saved["out"] = out
    return saved


def coerce_quick(value, path) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"quick in config file {path} must be true or false, got {value!r}")
    return value


def training_identity(cfg: dict) -> dict:
    """The settings a resumed run must share with its checkpoint (everything but the resumable ones).

    ``epochs`` joins them under the cosine schedule, whose shape depends on it.
    """
    keep = {o.key for o in OPTIONS if not o.resumable or (o.key == "epochs" and cfg["lr_schedule"] == "cosine")}
    return {k: cfg[k] for k in sorted(keep)}
