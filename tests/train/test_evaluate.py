"""Evaluation protocols, each against a plain reference."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

from gessl_ext import losses
from gessl_ext.train.data import DataError
from gessl_ext.train.evaluate import (KNN_TEMPERATURE, episode_accuracies, fewshot_accuracy, fit_logistic_regression,
                                      knn_accuracy, linear_probe_accuracy, one_step_pair_accuracy, pair_accuracy,
                                      sample_episodes)
from gessl_ext.train.models import build_model


def clustered(n, centers, spread, generator):
    """n points around the rows of centers [classes, dim] (labels cycle over the classes)."""
    labels = torch.arange(n) % len(centers)
    return centers[labels] + spread * torch.randn(n, centers.shape[1], generator=generator), labels


def test_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 8, generator=g)
    bank, bank_y = clustered(300, centers, 1.2, g)
    query, query_y = clustered(97, centers, 1.2, g)
    correct = 0
    for q, y in zip(query.double(), query_y):
        sims = F.cosine_similarity(q[None], bank.double(), dim=1)
        order = sorted(range(len(bank)), key=lambda i: -float(sims[i]))[:20]
        votes = [0.0] * 5
        for i in order:
            votes[int(bank_y[i])] += math.exp(float(sims[i]) / KNN_TEMPERATURE)
        correct += int(max(range(5), key=lambda c: votes[c]) == int(y))
    expected = 100.0 * correct / len(query)
    assert 30 < expected < 100                      # a non-trivial case
    assert knn_accuracy(bank, bank_y, query, query_y, k=20, chunk=13) == pytest.approx(expected)


def test_linear_probe_matches_scikit_learn():
    from sklearn.linear_model import LogisticRegression

    g = torch.Generator().manual_seed(1)
    x, y = clustered(400, torch.randn(4, 6, generator=g), 1.5, g)
    x = x * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0, 5.0]) + 2.0       # standardisation matters
    l2 = 1e-2
    weights, bias, mean, std = fit_logistic_regression(x, y, l2)
    xs = ((x - mean) / std).double()
    ours = torch.softmax(xs @ weights.double() + bias.double(), 1)
    ref = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-10, max_iter=10000).fit(xs.numpy(), y.numpy())
    torch.testing.assert_close(ours, torch.from_numpy(ref.predict_proba(xs.numpy())), atol=2e-4, rtol=0)
    test_x, test_y = x[:100], y[:100]
    expected = 100.0 * float((torch.from_numpy(ref.predict(((test_x - mean) / std).double().numpy())) == test_y)
                             .float().mean())
    assert linear_probe_accuracy(x, y, test_x, test_y, l2=l2) == pytest.approx(expected)


def test_episodes_are_valid_and_accuracy_matches_a_loop():
    g = torch.Generator().manual_seed(2)
    features, labels = clustered(210, torch.randn(7, 5, generator=g), 1.0, g)
    labels = labels + 3                                               # class ids need not start at 0
    picks = sample_episodes(labels, ways=4, shots=2, queries=3, episodes=25, generator=g)
    assert picks.shape == (25, 4, 5)
    for episode in picks:
        classes = labels[episode]
        assert bool((classes == classes[:, :1]).all())               # one class per row
        assert len(set(classes[:, 0].tolist())) == 4                  # distinct classes
        assert len(set(episode.reshape(-1).tolist())) == 20           # distinct images
    accs = episode_accuracies(features, picks, shots=2)
    for e, episode in enumerate(picks):
        normed = F.normalize(features.double(), dim=1)
        protos = [F.normalize(normed[episode[w, :2]].mean(0), dim=0) for w in range(4)]
        hits = 0
        for w in range(4):
            for i in episode[w, 2:]:
                scores = [float(normed[i] @ p) for p in protos]
                hits += int(max(range(4), key=lambda c: scores[c]) == w)
        assert float(accs[e]) == pytest.approx(hits / 12)
    mean, ci = fewshot_accuracy(features, labels, 4, 2, 3, 25, torch.Generator().manual_seed(9))
    again = episode_accuracies(features, sample_episodes(labels, 4, 2, 3, 25, torch.Generator().manual_seed(9)), 2)
    assert mean == pytest.approx(100 * float(again.mean()))
    assert ci == pytest.approx(100 * 1.96 * float(again.std()) / 5)
    assert 0 < ci < 20


def test_fewshot_bounds_and_errors():
    g = torch.Generator().manual_seed(3)
    features, labels = clustered(100, torch.randn(5, 16, generator=g), 0.01, g)                  # tight clusters: always right
    assert fewshot_accuracy(features, labels, 5, 1, 5, 50, g) == (100.0, 0.0)
    with pytest.raises(DataError, match="6-way few-shot needs 6 unseen classes, only 5"):
        fewshot_accuracy(features, labels, 6, 1, 5, 10, g)
    with pytest.raises(DataError, match="needs 21 images per unseen class, the smallest has 20"):
        fewshot_accuracy(features, labels, 5, 6, 15, 10, g)


def reference_one_step(model, objective, views, lr):
    """deepcopy, one autograd SGD step on model + objective parameters, pair accuracy in train mode."""
    accs = []
    for task in views:
        m, obj = copy.deepcopy(model).train(), copy.deepcopy(objective)
        params = [p for p in list(m.parameters()) + list(obj.parameters()) if p.requires_grad]
        loss = obj(m, task[0], task[1])
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= lr * g
            z1, z2 = m(torch.cat([task[0], task[1]])).chunk(2)
            sim = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
            truth = torch.arange(len(z1))
            accs.append(((sim.argmax(1) == truth).double().mean() + (sim.argmax(0) == truth).double().mean()) / 2)
    return 100.0 * float(sum(accs) / len(accs))


@pytest.mark.parametrize("method", ["simclr", "byol"])
def test_one_step_accuracy_matches_a_manual_sgd_step(method):
    torch.manual_seed(4)
    model = build_model("convnet_bn", 1, 12, proj_dim=16, projector="mlp").double()
    objective = losses.SimCLR(0.5) if method == "simclr" else losses.BYOL(16, hidden_dim=8)
    objective = objective.double()
    objective.bind(model)
    views = torch.randn(3, 2, 16, 1, 12, 12, dtype=torch.float64)
    views[:, 1] = views[:, 0] + 0.8 * torch.randn_like(views[:, 0])
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    lr = 2.0                                    # large, so the step visibly changes the accuracy
    ours = one_step_pair_accuracy(model, objective, views, lr)
    assert ours == pytest.approx(reference_one_step(model, objective, views, lr))
    assert ours != pytest.approx(reference_one_step(model, objective, views, 0.0))
    for k, v in model.state_dict().items():   # running statistics untouched
        assert torch.equal(v, buffers[k])


def test_pair_accuracy_in_eval_mode():
    torch.manual_seed(5)
    model = build_model("convnet", 1, 12, proj_dim=128)
    views = torch.randn(2, 2, 10, 1, 12, 12)
    views[1, 1] = views[1, 0]                   # identical views: every sample finds its partner
    accs = []
    for task in views:
        z1, z2 = model(task[0]), model(task[1])
        sim = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).T
        accs.append(float(((sim.argmax(1) == torch.arange(10)).float().mean()
                           + (sim.argmax(0) == torch.arange(10)).float().mean()) / 2))
    assert accs[1] == 1.0
    assert pair_accuracy(model, views) == pytest.approx(100 * sum(accs) / 2)
