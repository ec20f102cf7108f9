"""Evaluations of a pre-trained model (all accuracies in percent).

* :func:`knn_accuracy` — k-nearest-neighbour classification of held-out features by cosine similarity,
  votes weighted by exp(cos / 0.07) (the weighted kNN of Wu et al. 2018 used by most SSL papers).
* :func:`linear_probe_accuracy` — multinomial logistic regression on frozen, standardised features
  (full-batch L-BFGS, L2 penalty ``l2``: the same objective as scikit-learn's LogisticRegression with
  C = 1 / (l2 · n)).
* :func:`fewshot_accuracy` — N-way K-shot episodes (Q queries per class) on classes unseen in pre-training,
  nearest-centroid on L2-normalised features (prototypes = mean of the normalised support features,
  queries assigned by cosine similarity); mean and 95% confidence interval 1.96 · std / √episodes.
* :func:`pair_accuracy` / :func:`one_step_pair_accuracy` — accuracy of the pair-classification head π on
  SSL tasks, at θ or after ONE inner SGD step on the task's own SSL loss (the task-specific model f_θ^l of
  Eq. 2, with the inner learning rate α and GeSSL's BatchNorm rule). Table 15's ratio r is
  accuracy(without GeSSL) / accuracy(with GeSSL) of this one-step quantity on training tasks; a single run
  reports its own accuracy and ``gessl-compare`` forms the ratio.
* the σ-measurement (Definition 3.2) on unseen tasks via :func:`gessl_ext.sigma_measure`, per sample, with
  the model in eval mode (the deployed model: BatchNorm running statistics), like :func:`pair_accuracy`.

:class:`Evaluator` fixes the evaluation data once (subsets and augmented task views from its own seeded
generator), so every evaluation of a run, and the runs of a comparison with the same seed, see the same
images; evaluating never touches the global RNG, the training RNG or the model's BatchNorm statistics.
"""
from __future__ import annotations

import math
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, TaskSampler

Tensor = torch.Tensor

KNN_TEMPERATURE = 0.07


@contextmanager
def _mode(model: nn.Module, training: bool):
    was = model.training
    model.train(training)
    try:
        yield model
    finally:
        model.train(was)


@torch.no_grad()
def extract_features(net: nn.Module, images: Tensor, mean, std, batch_size: int = 1024, device=None) -> Tensor:
    """net(normalised images) in eval mode: uint8 [P, C, H, W] -> float32 [P, d] on the CPU."""
    device = device or next(net.parameters()).device
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
    out = []
    with _mode(net, False):
        for chunk in images.split(batch_size):
            x = (chunk.to(device).float() / 255 - mean_t) / std_t
            out.append(net(x).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def knn_accuracy(bank: Tensor, bank_labels: Tensor, queries: Tensor, query_labels: Tensor, k: int = 20,
                 temperature: float = KNN_TEMPERATURE, chunk: int = 512) -> float:
    """Weighted cosine kNN. bank [P, d], bank_labels [P], queries [Q, d], query_labels [Q] -> accuracy %."""
    k = min(k, bank.shape[0])
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    bank_n = F.normalize(bank.float(), dim=1)
    correct = 0
    for start in range(0, queries.shape[0], chunk):
        q = F.normalize(queries[start:start + chunk].float(), dim=1)
        sims, idx = (q @ bank_n.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes).scatter_add_(1, bank_labels[idx], (sims / temperature).exp())
        correct += int((votes.argmax(1) == query_labels[start:start + chunk]).sum())
    return 100.0 * correct / queries.shape[0]


def linear_probe_accuracy(train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor, l2: float = 1e-4,
                          max_iter: int = 100) -> float:
    """Logistic regression on standardised frozen features [P, d] / [Q, d] -> test accuracy %."""
    weights, bias, mean, std = fit_logistic_regression(train_x, train_y, l2, max_iter)
    with torch.no_grad():
        pred = (((test_x - mean) / std) @ weights + bias).argmax(1)
    return 100.0 * float((pred == test_y).float().mean())


def fit_logistic_regression(x: Tensor, y: Tensor, l2: float, max_iter: int = 100):
    """Minimise mean CE + l2/2 ‖W‖² (bias unpenalised) on standardised x. Returns (W [d, C], b [C], mean, std)."""
    x = x.detach().to(torch.float64)
    mean, std = x.mean(0), x.std(0).clamp(min=1e-8)
    xs = (x - mean) / std
    num_classes = int(y.max()) + 1
    weights = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([weights, bias], lr=1, max_iter=max_iter, history_size=20,
                            tolerance_grad=1e-7, tolerance_change=1e-10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ weights + bias, y) + 0.5 * l2 * weights.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return weights.detach().float(), bias.detach().float(), mean.float(), std.float()


def sample_episodes(labels: Tensor, ways: int, shots: int, queries: int, episodes: int,
                    generator: torch.Generator) -> Tensor:
    """Indices [episodes, ways, shots + queries] into ``labels``: per episode ``ways`` distinct classes, and per
    class shots + queries distinct images of it (the first ``shots`` are the support set)."""
    classes = labels.unique()
    if ways > len(classes):
        raise DataError(f"{ways}-way few-shot needs {ways} unseen classes, only {len(classes)} available")
    members = [torch.nonzero(labels == c).squeeze(1) for c in classes]
    smallest = min(len(m) for m in members)
    if shots + queries > smallest:
        raise DataError(f"{shots}-shot with {queries} queries needs {shots + queries} images per unseen class, "
                        f"the smallest has {smallest}")
    picks = torch.empty(episodes, ways, shots + queries, dtype=torch.long)
    for e in range(episodes):
        chosen = torch.randperm(len(classes), generator=generator)[:ways].tolist()
        for w, c in enumerate(chosen):
            picks[e, w] = members[c][torch.randperm(len(members[c]), generator=generator)[:shots + queries]]
    return picks


def episode_accuracies(features: Tensor, picks: Tensor, shots: int) -> Tensor:
    """Nearest-centroid accuracy of each episode [E] (fractions). features [P, d]; picks from sample_episodes."""
    normed = F.normalize(features.float(), dim=1)
    episodes, ways, per_class = picks.shape
    support = normed[picks[:, :, :shots]]                                        # [E, ways, shots, d]
    prototypes = F.normalize(support.mean(2), dim=2)                              # [E, ways, d]
    query = normed[picks[:, :, shots:].reshape(episodes, -1)]                     # [E, ways * queries, d]
    predicted = torch.einsum("eqd,ewd->eqw", query, prototypes).argmax(2)
    truth = torch.arange(ways).repeat_interleave(per_class - shots)
    return (predicted == truth).double().mean(1)


def fewshot_accuracy(features: Tensor, labels: Tensor, ways: int, shots: int, queries: int, episodes: int,
                     generator: torch.Generator) -> tuple[float, float]:
    """Nearest-centroid N-way K-shot episodes. features [P, d], labels [P] -> (mean accuracy %, 95% CI %)."""
    accs = episode_accuracies(features, sample_episodes(labels, ways, shots, queries, episodes, generator), shots)
    ci = 1.96 * float(accs.std()) / math.sqrt(episodes) if episodes > 1 else float("nan")
    return 100.0 * float(accs.mean()), 100.0 * ci


def _pair_correct(z1: Tensor, z2: Tensor) -> float:
    """Fraction of the 2N samples whose most similar partner (cosine) in the other view is their own pair."""
    sim = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T
    truth = torch.arange(z1.shape[0], device=z1.device)
    return float(((sim.argmax(1) == truth).float().mean() + (sim.argmax(0) == truth).float().mean()) / 2)


def pair_accuracy(model: nn.Module, views: Tensor) -> float:
    """π's accuracy (%) at the current weights (eval mode). views [T, 2, N, ...]."""
    with torch.no_grad(), _mode(model, False):
        return 100.0 * sum(_pair_correct(*model(torch.cat([t[0], t[1]])).chunk(2)) for t in views) / len(views)


def one_step_pair_accuracy(model: nn.Module, objective, views: Tensor, inner_lr: float) -> float:
    """π's accuracy (%) of the task models after one inner SGD step θ − α∇ℓ_task(θ). views [T, 2, N, ...].

    The step runs exactly like GeSSL's inner step (gessl_ext.tasks: model and objective parameters
    adapted, batch statistics, running statistics untouched), in train mode, whatever the run's mode.
    """
    from gessl_ext.tasks import TaskModel, TaskProblem

    with _mode(model, True):
        task_model = TaskModel(model, objective)
        theta, consts = task_model.flat_parameters(), task_model.constants()
        correct = 0.0
        for task in views:
            problem = TaskProblem(task_model, task[0], task[1], inner_lr, consts)
            adapted = problem.update(theta)
            with torch.no_grad():
                correct += _pair_correct(*problem.embed(adapted))
    return 100.0 * correct / len(views)


class Evaluator:
    """All evaluations of one run on fixed evaluation data.

    data: :class:`~gessl_ext.train.data.ImageData`; pretrain_images: uint8 [P, C, H, W] (for training
    tasks); fewshot_classes: unseen classes (few-shot episodes, σ and unseen tasks come from their test
    images); cfg: the run's config dict; augment: the run's :class:`BatchedAugment`.
    """

    def __init__(self, data, pretrain_images: Tensor, fewshot_classes: list[int], cfg: dict, augment,
                 mean, std, device):
        self.cfg, self.mean, self.std, self.device = cfg, mean, std, device
        generator = torch.Generator().manual_seed(int(cfg["seed"]) + 7919)
        self.bank, self.bank_labels = _subset(data.train_images, data.train_labels, cfg["eval_train_size"], generator)
        self.query, self.query_labels = _subset(data.test_images, data.test_labels, cfg["eval_test_size"], generator)
        unseen = torch.nonzero(torch.isin(data.test_labels, torch.tensor(fewshot_classes))).squeeze(1)
        if cfg["eval_test_size"] is not None:   # at most eval_test_size unseen images, as many of each class
            per_class = max(1, cfg["eval_test_size"] // len(fewshot_classes))
            unseen = torch.cat([idx[torch.randperm(len(idx), generator=generator)[:per_class]]
                                for c in fewshot_classes for idx in [unseen[data.test_labels[unseen] == c]]])
        self.unseen_images, self.unseen_labels = data.test_images[unseen], data.test_labels[unseen]
        self.fewshot_seed = int(cfg["seed"]) + 104729
        # validate the few-shot settings now (before any training) on the labels alone
        for shots in cfg["fewshot_shots"]:
            sample_episodes(self.unseen_labels, cfg["fewshot_ways"], shots, cfg["fewshot_queries"], 1,
                            torch.Generator().manual_seed(0))
        n, t = cfg["task_size"], cfg["eval_tasks"]
        if n > len(self.unseen_images):
            raise DataError(f"--task-size {n} exceeds the {len(self.unseen_images)} unseen-class test images")
        unseen_sampler = TaskSampler(self.unseen_images, 1, n, augment)
        train_sampler = TaskSampler(pretrain_images, 1, n, augment)
        self.unseen_views = _draw_tasks(unseen_sampler, t, generator, device)
        self.train_views = _draw_tasks(train_sampler, t, generator, device)

    def __call__(self, model, objective) -> dict:
        """Run every evaluation; returns a dict of floats (accuracies %, σ per sample, seconds)."""
        cfg = self.cfg
        start = time.perf_counter()
        with torch.random.fork_rng(devices=[self.device] if torch.device(self.device).type == "cuda" else []):
            bank = extract_features(model.backbone, self.bank, self.mean, self.std, device=self.device)
            query = extract_features(model.backbone, self.query, self.mean, self.std, device=self.device)
            unseen = extract_features(model.backbone, self.unseen_images, self.mean, self.std, device=self.device)
            result = {
                "knn_accuracy": knn_accuracy(bank, self.bank_labels, query, self.query_labels, k=cfg["knn_k"]),
                "linear_accuracy": linear_probe_accuracy(bank, self.bank_labels, query, self.query_labels,
                                                         l2=cfg["probe_l2"]),
            }
            generator = torch.Generator().manual_seed(self.fewshot_seed)
            for shots in cfg["fewshot_shots"]:
                acc, ci = fewshot_accuracy(unseen, self.unseen_labels, cfg["fewshot_ways"], shots,
                                           cfg["fewshot_queries"], cfg["fewshot_episodes"], generator)
                key = f"fewshot_{cfg['fewshot_ways']}way_{shots}shot"
                result[key] = acc
                result[key + "_ci95"] = ci
            from gessl_ext import sigma_measure

            _, sigma = sigma_measure(model, self.unseen_views, head_temperature=cfg["head_temperature"])  # eval mode
            result["sigma_unseen"] = float(sigma)
            result["pair_accuracy_unseen"] = pair_accuracy(model, self.unseen_views)
            result["one_step_accuracy_unseen"] = one_step_pair_accuracy(model, objective, self.unseen_views,
                                                                        cfg["inner_lr"])
            result["one_step_accuracy_train"] = one_step_pair_accuracy(model, objective, self.train_views,
                                                                       cfg["inner_lr"])
        result["eval_seconds"] = time.perf_counter() - start
        return result


def _subset(images: Tensor, labels: Tensor, size: int | None, generator: torch.Generator):
    if size is None or size >= len(images):
        return images, labels
    idx = torch.randperm(len(images), generator=generator)[:size]
    return images[idx], labels[idx]


def _draw_tasks(sampler: TaskSampler, count: int, generator: torch.Generator, device) -> Tensor:
    """``count`` tasks of ``sampler.task_size`` images with their two views: [count, 2, N, C, H, W]."""
    tasks = []
    while len(tasks) < count:
        for group in sampler.epoch(generator):
            tasks.append(sampler.views(group, generator, device)[0])
            if len(tasks) == count:
                break
    return torch.stack(tasks)
