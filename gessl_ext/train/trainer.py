"""One run of the main job: pre-train with or without GeSSL, evaluate, checkpoint, resume, report.

Everything that can be wrong with the input (data, sizes, output folder, checkpoint) is checked before
anything is written to ``--out``. Reproducibility: the initial weights come from ``seed``; the images and
augmentations of epoch e from a generator seeded by (seed, e) alone; evaluation uses its own generator
and restores the global RNG. So a run resumed from the checkpoint of epoch e continues exactly as the
uninterrupted run would have (bit-identical on the CPU).

Output folder: ``config.yaml`` (resolved settings), ``log.jsonl`` (one line per outer step),
``checkpoint.pt`` (after every epoch), ``metrics.json`` (rewritten after every evaluation, ``finished``
true at the end), then ``loss.png`` and ``accuracy.png``. A failure to draw the plots is reported in one
warning line on stderr and does not fail the run (metrics.json and log.jsonl are complete by then).
``--resume`` of a finished run changes nothing (:func:`finished_metrics`).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from gessl_ext import GeSSLStep, NonSmoothModelWarning, losses
from gessl_ext import distributed as gdist
from gessl_ext.allocator import retain_freed_memory

from . import report
from .config import OPTION_BY_KEY, RESUMABLE_FLAGS, ConfigError, build_hypergradient, training_identity
from .data import BatchedAugment, DataError, TaskSampler, channel_stats, load_dataset, parse_classes, select_classes
from .evaluate import Evaluator
from .models import build_model

RUN_FILES = ("checkpoint.pt", "metrics.json", "log.jsonl")
CHECKPOINT_VERSION = 1


NONSMOOTH_NOTE = ("--hypergrad fd is biased on networks with ReLU-like or max-pool layers, as this one has (the "
                  "finite difference counts the jumps of the gradient, so its error does not shrink with "
                  "--fd-radius); --hypergrad hvp is exact at a similar cost; --no-warn-nonsmooth silences this note")
"""The CLI's text for gessl_ext.NonSmoothModelWarning (whose own text names the Python argument)."""


class RunError(ValueError):
    """The run cannot start or continue as asked (output folder, checkpoint, device)."""


def build_objective(cfg: dict):
    """The SSL objective of ``cfg['method']`` (an unbound gessl_ext.losses.SSLObjective)."""
    method, dim, temperature = cfg["method"], cfg["proj_dim"], cfg["temperature"]
    if method == "simclr":
        return losses.SimCLR(temperature=temperature if temperature is not None else 0.5)
    if method == "moco":
        return losses.MoCo(dim, queue_size=cfg["moco_queue"], temperature=temperature if temperature is not None else 0.2)
    if method == "byol":
        return losses.BYOL(dim, hidden_dim=cfg["predictor_hidden"])
    if method == "simsiam":
        return losses.SimSiam(dim, hidden_dim=cfg["predictor_hidden"])
    if method == "barlow":
        return losses.BarlowTwins()
    return losses.VICReg()


class PlainSSLStep(torch.nn.Module):
    """The baseline: one ordinary SSL step on the union of the M tasks (2·M·N images) with the same objective."""

    def __init__(self, model, objective, autocast_dtype=None):
        super().__init__()
        self.model, self.ssl_loss, self.autocast_dtype = model, objective, autocast_dtype
        objective.bind(model)

    def forward(self, views):
        """views [M, 2, N, ...] -> SSL loss (0-dim, detached); gradients accumulated into ``.grad``."""
        self.ssl_loss.before_step(self.model)
        x1, x2 = views[:, 0].flatten(0, 1), views[:, 1].flatten(0, 1)
        with torch.autocast(views.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss = self.ssl_loss(self.model, x1, x2)
        loss.float().backward()
        self.ssl_loss.after_step(self.model, views)
        return loss.detach().float()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RunError("--device cuda asked for, but torch sees no CUDA device")
    return torch.device(name)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The generator of epoch ``epoch`` (task order and augmentations), a function of (seed, epoch) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 7_919 + 17) % (2 ** 63))


class Run:
    """Everything a run needs, prepared and checked without writing anything."""

    def __init__(self, cfg: dict, distributed: bool = False):
        self.wall_offset, self.wall_start = 0.0, time.perf_counter()
        self.cpu_offset, self.cpu_start = 0.0, time.process_time()
        self.cfg = cfg
        self.out = Path(cfg["out"])
        self.distributed, self.main = distributed, gdist.is_main()
        self.notes: list[str] = []
        self.device = resolve_device(cfg["device"]) if not distributed or cfg["device"] == "cpu" else gdist.local_device()
        if self.device.type == "cpu" and cfg["retain_freed_memory"]:
            retain_freed_memory()
        if cfg["tasks"] % gdist.world_size():
            raise ConfigError(f"--tasks {cfg['tasks']} must be a multiple of the {gdist.world_size()} ranks")
        self._check_out_folder()
        data = load_dataset(cfg["data"], cfg["data_dir"], cfg["image_size"], cfg["seed"])
        self.data = data
        classes = list(range(data.num_classes))
        train_classes = parse_classes(cfg["train_classes"], data.num_classes, "--train-classes") \
            if cfg["train_classes"] is not None else classes
        if cfg["fewshot_classes"] is not None:
            fewshot_classes = parse_classes(cfg["fewshot_classes"], data.num_classes, "--fewshot-classes")
        else:
            fewshot_classes = [c for c in classes if c not in train_classes] or classes
        self.train_classes, self.fewshot_classes = train_classes, fewshot_classes
        images, _ = select_classes(data.train_images, data.train_labels, train_classes)
        if cfg["train_subset"] is not None:
            if cfg["train_subset"] > len(images):
                raise DataError(f"--train-subset {cfg['train_subset']} exceeds the {len(images)} pre-training images")
            pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(cfg["seed"]))
            images = images[pick[:cfg["train_subset"]]]
        self.pretrain_images = images
        self.mean, self.std = channel_stats(images)
        self.augment = BatchedAugment(data.channels, self.mean, self.std, crop_scale=(cfg["crop_min_scale"], 1.0))
        self.sampler = TaskSampler(images, cfg["tasks"], cfg["task_size"], self.augment, cfg["steps_per_epoch"])
        self.evaluator = Evaluator(data, images, fewshot_classes, cfg, self.augment, self.mean, self.std, self.device)

        torch.manual_seed(cfg["seed"])
        try:
            self.model = build_model(cfg["backbone"], data.channels, data.image_size, cfg["proj_dim"],
                                     cfg["projector"]).to(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        objective = build_objective(cfg).to(self.device)
        amp = torch.bfloat16 if cfg["amp"] == "bf16" else None
        if cfg["gessl"]:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.step = GeSSLStep(self.model, objective, inner_lr=cfg["inner_lr"], inner_steps=cfg["inner_steps"],
                                      target_steps=cfg["target_steps"], hypergrad=build_hypergradient(cfg),
                                      head_temperature=cfg["head_temperature"], task_batching=cfg["task_batching"],
                                      task_chunk_size=cfg["task_chunk_size"], autocast_dtype=amp,
                                      warn_nonsmooth=cfg["warn_nonsmooth"],
                                      process_group=torch.distributed.group.WORLD if distributed else None)
            for w in caught:   # fd on a ReLU network: a one-line note in the CLI's terms; others pass through
                if issubclass(w.category, NonSmoothModelWarning):
                    self.notes.append(NONSMOOTH_NOTE)
                else:
                    warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        else:
            self.step = PlainSSLStep(self.model, objective, amp)
        self.step.to(self.device)
        gdist.broadcast_state(self.step)
        self.objective = self.step.ssl_loss
        self.params = [p for p in self.step.parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(self.params, lr=cfg["lr"], momentum=cfg["momentum"],
                                         weight_decay=cfg["weight_decay"])
        self.steps_per_epoch = self.sampler.steps_per_epoch
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        self.state = {"epoch": 0, "global_step": 0, "train_seconds": 0.0, "train_cpu_seconds": 0.0,
                      "aug_seconds": 0.0, "step_seconds": 0.0, "history": [], "skipped_steps": 0}
        self.checkpoint = self._load_checkpoint() if cfg["resume"] else None

    def wall_seconds(self) -> float:
        """Wall-clock seconds of the run so far, earlier invocations (before --resume) included."""
        return self.wall_offset + time.perf_counter() - self.wall_start

    def cpu_seconds(self) -> float:
        """CPU seconds (all threads of this process) of the run so far, earlier invocations included."""
        return self.cpu_offset + time.process_time() - self.cpu_start

    # -- checks before writing ---------------------------------------------------------------------

    def _check_out_folder(self) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise RunError(f"--out {self.out} exists and is not a folder")
        existing = [f for f in RUN_FILES if (self.out / f).exists()]
        if existing and not self.cfg["resume"]:
            raise RunError(f"--out {self.out} already holds a run ({', '.join(existing)}); pass --resume to continue "
                           "it or choose another --out (nothing was changed)")
        if self.cfg["resume"] and not (self.out / "checkpoint.pt").is_file():
            raise RunError(f"--resume: no checkpoint.pt in {self.out}")

    def _load_checkpoint(self) -> dict:
        path = self.out / "checkpoint.pt"
        try:
            ckpt = torch.load(path, map_location=self.device, weights_only=True)
        except Exception as exc:  # any unpickling / zip error: the file is not a usable checkpoint
            raise RunError(f"cannot read checkpoint {path}: {type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if not isinstance(ckpt, dict) or ckpt.get("version") != CHECKPOINT_VERSION or "identity" not in ckpt:
            raise RunError(f"{path} is not a gessl-train checkpoint (version {CHECKPOINT_VERSION})")
        mine = training_identity(self.cfg)
        theirs = ckpt["identity"]
        diffs = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)]
        if diffs:
            shown = "; ".join(f"{k}: {theirs.get(k)!r} in the checkpoint, {mine.get(k)!r} now" for k in diffs[:4])
            raise RunError(f"checkpoint {path} is from a different config ({shown}); only {RESUMABLE_FLAGS} may "
                           "change on --resume")
        if ckpt["epoch"] > self.cfg["epochs"]:
            raise RunError(f"checkpoint {path} is at epoch {ckpt['epoch']}, beyond --epochs {self.cfg['epochs']}")
        return ckpt

    # -- training ----------------------------------------------------------------------------------

    def restore(self) -> None:
        ckpt = self.checkpoint
        self.step.load_state_dict(ckpt["step"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng"].cpu())
        for key in self.state:
            self.state[key] = ckpt["state"][key]
        self.wall_offset, self.cpu_offset = ckpt["wall_seconds"], ckpt["cpu_seconds"]
        gdist.broadcast_state(self.step)

    def lr_at(self, global_step: int) -> float:
        if self.cfg["lr_schedule"] == "cosine":
            return self.cfg["lr"] * 0.5 * (1 + math.cos(math.pi * global_step / max(1, self.total_steps)))
        return self.cfg["lr"]

    def save_checkpoint(self) -> None:
        ckpt = {"version": CHECKPOINT_VERSION, "identity": training_identity(self.cfg), "epoch": self.state["epoch"],
                "step": self.step.state_dict(), "optimizer": self.optimizer.state_dict(),
                "rng": torch.get_rng_state(), "state": self.state, "wall_seconds": self.wall_seconds(),
                "cpu_seconds": self.cpu_seconds()}
        tmp = self.out / "checkpoint.pt.tmp"
        torch.save(ckpt, tmp)
        os.replace(tmp, self.out / "checkpoint.pt")

    def evaluate(self, epoch: float) -> dict:
        entry = {"epoch": epoch, "step": self.state["global_step"], "train_seconds": self.state["train_seconds"]}
        entry.update(self.evaluator(self.model, self.objective))
        self.state["history"].append(entry)
        return entry

    def train_step(self, groups, generator) -> dict:
        cfg = self.cfg
        t0, cpu0 = time.perf_counter(), time.process_time()
        views = self.sampler.views(groups, generator, self.device)   # all M tasks, identical on every rank
        if self.distributed:
            views = gdist.shard_tasks(views)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t1 = time.perf_counter()
        lr = self.lr_at(self.state["global_step"])
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        record = {}
        if cfg["gessl"]:
            out = self.step(views)
            record.update(loss=float(out.loss), ssl_loss=float(out.ssl_loss), kl=float(out.kl.mean()),
                          hypergrad_norm=float(out.hypergrad_norm), skipped=bool(out.skipped))
            if not out.skipped:
                self.optimizer.step()
            else:
                self.state["skipped_steps"] += 1
        else:
            loss = self.step(views)
            record.update(loss=float(loss), ssl_loss=float(loss))
            gdist.average_gradients(self.params)
            self.optimizer.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        t2 = time.perf_counter()
        self.state["aug_seconds"] += t1 - t0
        self.state["step_seconds"] += t2 - t1
        self.state["train_seconds"] += t2 - t0
        self.state["train_cpu_seconds"] += time.process_time() - cpu0
        self.state["global_step"] += 1
        record.update(step=self.state["global_step"], epoch=self.state["epoch"], lr=lr, aug_seconds=t1 - t0,
                      step_seconds=t2 - t1, train_seconds=self.state["train_seconds"])
        return record


def finished_metrics(cfg: dict) -> dict | None:
    """The metrics.json of a finished run in ``cfg['out']`` that already covers ``cfg``, else None.

    Covers: same training settings, and at least ``cfg['epochs']`` epochs trained or the training-time
    budget ``cfg['time_budget']`` used up. Reads only; such a run has nothing left to do.
    """
    path = Path(cfg["out"]) / "metrics.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not (isinstance(old, dict) and old.get("finished") and isinstance(old.get("config"), dict)):
        return None
    try:
        same = training_identity(old["config"]) == training_identity(cfg)
    except KeyError:   # a metrics.json from an older version without some setting
        return None
    budget = cfg["time_budget"]
    done = old["epochs_completed"] >= cfg["epochs"] or (budget is not None and old["train_seconds"] >= budget)
    return old if same and done else None


def run_training(cfg: dict) -> dict:
    """Run (or resume) one training run as configured; returns the metrics written to metrics.json.

    Under ``torchrun`` the M tasks of every step are sharded over the ranks (gessl_ext.distributed);
    rank 0 alone evaluates and writes files; the metrics it returns are empty dicts on the other ranks.
    """
    owns_group = not gdist.is_initialized()
    try:
        distributed = gdist.init_from_env()
    except ValueError as exc:
        raise RunError(f"torchrun environment: {exc}") from None
    try:
        run = Run(cfg, distributed)
        if distributed:
            torch.distributed.barrier()           # every rank has checked --out before rank 0 writes
        return _train(run)
    finally:
        if distributed and owns_group:
            gdist.shutdown()


def _train(run: Run) -> dict:
    cfg, out, main = run.cfg, run.out, run.main
    if main:
        for note in run.notes:
            print(f"gessl-train: note: {note}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        report.write_yaml(out / "config.yaml", {k: cfg[k] for k in OPTION_BY_KEY})   # reusable with --config
    log_path = out / "log.jsonl"
    if run.checkpoint is not None:
        run.restore()
        if main:
            report.truncate_jsonl(log_path, run.state["global_step"])
    elif main and log_path.exists():
        log_path.unlink()

    def metrics(finished: bool) -> dict:
        return report.build_metrics(cfg, run, finished)

    if main and cfg["eval_initial"] and not run.state["history"] and run.state["epoch"] == 0:
        print(report.eval_line(run.evaluate(0)))
        report.write_json(out / "metrics.json", metrics(False))

    from tqdm import tqdm

    bar = tqdm(total=run.total_steps, initial=min(run.state["global_step"], run.total_steps), unit="step",
               desc=f"{cfg['method']}{'+gessl' if cfg['gessl'] else ''}", disable=not (cfg["progress"] and main),
               dynamic_ncols=True, file=sys.stderr)
    budget_hit = stopped_early = False
    log = open(log_path, "a") if main else None
    while run.state["epoch"] < cfg["epochs"]:
        epoch = run.state["epoch"]
        generator = epoch_generator(cfg["seed"], epoch)
        done_in_epoch = 0
        for groups in run.sampler.epoch(generator):
            record = run.train_step(groups, generator)
            done_in_epoch += 1
            if main:
                log.write(json.dumps(record) + "\n")
            bar.update(1)
            bar.set_postfix({k: f"{record[k]:.4g}" for k in ("loss", "kl") if k in record}, refresh=False)
            if cfg["time_budget"] is not None:   # the same decision on every rank
                budget_hit = gdist.any_rank(run.state["train_seconds"] >= cfg["time_budget"], device=run.device)
                if budget_hit:
                    break
        if main:
            log.flush()
        stopped_early = done_in_epoch < run.steps_per_epoch
        if stopped_early:
            break
        run.state["epoch"] = epoch + 1
        last = run.state["epoch"] == cfg["epochs"] or budget_hit
        if main and (last or (cfg["eval_every"] and run.state["epoch"] % cfg["eval_every"] == 0)):
            bar.write(report.eval_line(run.evaluate(run.state["epoch"])), file=sys.stdout)
            report.write_json(out / "metrics.json", metrics(False))
        if main:
            run.save_checkpoint()
        if last:
            break
    bar.close()
    if not main:
        return {}
    log.close()
    if stopped_early:
        print(report.eval_line(run.evaluate(run.state["epoch"] + done_in_epoch / run.steps_per_epoch)))
    elif not run.state["history"] or run.state["history"][-1]["step"] != run.state["global_step"]:
        print(report.eval_line(run.evaluate(run.state["epoch"])))
    final = metrics(True)
    report.write_json(out / "metrics.json", final)
    try:
        report.plot_run(out, final, report.read_jsonl(log_path))
    except Exception as exc:  # any plotting failure: the run's results are already complete on disk
        print(f"gessl-train: warning: the plots in {out} were not drawn ({type(exc).__name__}: {exc}); "
              "metrics.json, log.jsonl and checkpoint.pt are complete", file=sys.stderr)
    return final
