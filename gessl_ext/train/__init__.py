"""The main job (``pip install gessl_ext[train]``): ``gessl-train`` and ``gessl-compare``.

Modules: ``config`` (every setting, defaults, ``--quick``), ``data`` (IDX reader, datasets, batched
augmentation, task sampler), ``models`` (backbones + projector), ``evaluate`` (kNN, linear probe, few-shot,
σ, one-step accuracy), ``trainer`` (one run: train, evaluate, checkpoint, resume), ``report`` (metrics.json,
plots, comparison tables), ``cli`` (the two commands).
"""
from .cli import compare_main, train_main
from .data import BatchedAugment, DataError, TaskSampler, load_dataset, read_idx
from .evaluate import fewshot_accuracy, knn_accuracy, linear_probe_accuracy, one_step_pair_accuracy
from .models import build_model

__all__ = ["train_main", "compare_main", "build_model", "load_dataset", "read_idx", "BatchedAugment", "TaskSampler",
           "DataError", "knn_accuracy", "linear_probe_accuracy", "fewshot_accuracy", "one_step_pair_accuracy"]
