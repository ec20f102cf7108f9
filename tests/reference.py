"""A plain, per-task torch.autograd reference of one GeSSL step (the tests' oracle).

Written independently of gessl_ext's flat-parameter machinery: module parameters are swapped with
torch.func.functional_call on a deepcopy, inner steps use torch.autograd.grad(create_graph=True), and
dL/dθ comes from one reverse pass through the unrolled steps (exact, like ``itd``).
"""
import copy

import torch
import torch.nn.functional as F
from torch.func import functional_call


def pair_log_probs(z1, z2, tau):
    sim = F.normalize(z1, dim=-1) @ F.normalize(z2, dim=-1).T / tau
    return torch.log_softmax(torch.cat([sim, sim.T]), dim=-1)


def reference_step(model, pair_loss, views, inner_lr, inner_steps, target_steps, tau):
    """Returns (dL/dθ as a list like model.parameters(), L, per-task SSL loss at θ)."""
    model = copy.deepcopy(model)
    for m in model.modules():  # batch statistics in every pass, no running-stat updates
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    def embed(ps, x1, x2):
        return functional_call(model, dict(zip(names, ps)), (torch.cat([x1, x2]),)).chunk(2)

    total = [torch.zeros_like(p) for p in params]
    losses, ssl = [], []
    for x1, x2 in views:
        adapted = params
        for k in range(inner_steps):
            loss = pair_loss(*embed(adapted, x1, x2))
            if k == 0:
                ssl.append(loss.detach())
            grads = torch.autograd.grad(loss, adapted, create_graph=True)
            adapted = [p - inner_lr * g for p, g in zip(adapted, grads)]
        target = [p.detach().requires_grad_() for p in adapted]
        for _ in range(target_steps):
            grads = torch.autograd.grad(pair_loss(*embed(target, x1, x2)), target)
            target = [(p - inner_lr * g).detach().requires_grad_() for p, g in zip(target, grads)]
        with torch.no_grad():
            target_lp = pair_log_probs(*embed(target, x1, x2), tau)
        current_lp = pair_log_probs(*embed(adapted, x1, x2), tau)
        kl = (target_lp.exp() * (target_lp - current_lp)).sum(-1).mean()
        losses.append(kl.detach())
        total = [t + g for t, g in zip(total, torch.autograd.grad(kl, params))]
    m = len(views)
    return [t / m for t in total], torch.stack(losses).mean(), torch.stack(ssl)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(a, b):
    return float((a - b).norm() / b.norm())
