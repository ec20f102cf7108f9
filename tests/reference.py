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


def reference_step(model, pair_loss, views, inner_lr, inner_steps, target_steps, tau, first_order=False, seed=None):
    """Returns (dL/dθ as a list like the model's trainable parameters, L, per-task SSL loss at θ).

    Frozen parameters stay fixed in every step. first_order: ∂L/∂θᴷ instead (θᴷ's dependence on θ dropped).
    seed: every forward of task l runs with torch's default generator seeded with seed + l (GeSSL's rule for
    stochastic layers: the same masks in every pass of a task), the caller's generator state restored after.
    """
    model = copy.deepcopy(model)
    for m in model.modules():  # batch statistics in every pass, no running-stat updates
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.track_running_stats = False
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    task = [0]

    def embed(ps, x1, x2):
        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed + task[0])
            return functional_call(model, dict(zip(names, ps)), (torch.cat([x1, x2]),)).chunk(2)

    total = [torch.zeros_like(p) for p in params]
    losses, ssl = [], []
    for task[0], (x1, x2) in enumerate(views):
        adapted = params
        for k in range(inner_steps):
            loss = pair_loss(*embed(adapted, x1, x2))
            if k == 0:
                ssl.append(loss.detach())
            grads = _grad(loss, adapted, create_graph=True)
            adapted = [p - inner_lr * g for p, g in zip(adapted, grads)]
        target = [p.detach().requires_grad_() for p in adapted]
        for _ in range(target_steps):
            grads = _grad(pair_loss(*embed(target, x1, x2)), target)
            target = [(p - inner_lr * g).detach().requires_grad_() for p, g in zip(target, grads)]
        with torch.no_grad():
            target_lp = pair_log_probs(*embed(target, x1, x2), tau)
        current_lp = pair_log_probs(*embed(adapted, x1, x2), tau)
        kl = (target_lp.exp() * (target_lp - current_lp)).sum(-1).mean()
        losses.append(kl.detach())
        total = [t + g for t, g in zip(total, _grad(kl, adapted if first_order else params))]
    m = len(views)
    return [t / m for t in total], torch.stack(losses).mean(), torch.stack(ssl)


def _grad(output, inputs, create_graph=False):
    """torch.autograd.grad with zeros for inputs the output does not use (a parameter the model never runs)."""
    grads = torch.autograd.grad(output, inputs, create_graph=create_graph, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def rel(a, b):
    return float((a - b).norm() / b.norm())
