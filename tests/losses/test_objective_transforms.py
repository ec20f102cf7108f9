"""Every objective under the core's calling pattern: functional_call over a wrapper holding the model and
the objective, torch.func.grad / jvp / vjp nested, torch.func.vmap over tasks; compared (float64) with a
per-task loop using plain autograd."""
import pytest
import torch
from torch.func import grad, jvp, vjp, vmap

from gessl_ext.losses import BYOL, BarlowTwins, MaskedReconstruction, MoCo, SimCLR, SimSiam, VICReg, as_objective
from loss_test_utils import ObjectiveWrapper, functional_loss, running_stats_frozen, tiny_model, trainable_params

NUM_TASKS, N, IN_DIM, EMBED_DIM = 3, 5, 4, 3

OBJECTIVES = {
    "simclr": lambda: SimCLR(temperature=0.5),
    "barlow_twins": lambda: BarlowTwins(),
    "vicreg": lambda: VICReg(),
    "simsiam": lambda: SimSiam(EMBED_DIM, hidden_dim=5),
    "byol": lambda: BYOL(EMBED_DIM, hidden_dim=5, momentum=0.8),
    "moco": lambda: MoCo(EMBED_DIM, queue_size=7, generator=torch.Generator().manual_seed(0)),
    "masked_reconstruction": lambda: MaskedReconstruction((IN_DIM,), EMBED_DIM, mask_ratio=0.5,
                                                          generator=torch.Generator().manual_seed(0)),
    "plain_callable": lambda: as_objective(lambda z1, z2: ((z1 - z2) ** 2).sum(dim=1).mean()),
}


def make_case(name, batch_norm=True):
    """Bound objective (momentum networks differ from the model), wrapper, per-task params, views, directions."""
    model = tiny_model(IN_DIM, 6, EMBED_DIM, batch_norm=batch_norm)
    torch.manual_seed(1)
    objective = OBJECTIVES[name]().double()
    objective.bind(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    objective.before_step(model)
    wrapper = ObjectiveWrapper(model, objective)
    base = trainable_params(wrapper)
    per_task = {k: v + 0.05 * torch.randn(NUM_TASKS, *v.shape, dtype=v.dtype) for k, v in base.items()}
    directions = {k: torch.randn_like(v) for k, v in per_task.items()}
    x1, x2 = torch.randn(2, NUM_TASKS, N, IN_DIM, dtype=torch.float64).unbind()
    return wrapper, per_task, directions, x1, x2


def task(tree, t):
    return {k: v[t] for k, v in tree.items()}


def loop_grad_and_hvp(wrapper, params, direction, x1, x2):
    """Plain autograd: loss, gradient and Hessian-vector product (double backward) of one task."""
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss = torch.func.functional_call(wrapper, leaves, (x1, x2))
    grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
    dot = sum((g * direction[k]).sum() for g, k in zip(grads, leaves))
    hvp = torch.autograd.grad(dot, list(leaves.values()), allow_unused=True)
    hvp = {k: torch.zeros_like(v) if h is None else h for (k, v), h in zip(leaves.items(), hvp)}
    return loss.detach(), {k: g.detach() for k, g in zip(leaves, grads)}, hvp


def check_against_loop(per_task, losses, grads, second_order, references):
    for t, (loss, grad_ref, hvp_ref) in enumerate(references):
        torch.testing.assert_close(losses[t], loss, rtol=1e-10, atol=1e-12)
        for k in per_task:
            torch.testing.assert_close(grads[k][t], grad_ref[k], rtol=1e-8, atol=1e-10, msg=lambda m: f"grad {k}: {m}")
            torch.testing.assert_close(second_order[k][t], hvp_ref[k], rtol=1e-7, atol=1e-9, msg=lambda m: f"hvp {k}: {m}")
    # the gradient is informative: the model's weights and the objective's own trainable parameters get signal
    for k in per_task:
        if k.endswith("weight") and not k.startswith("model.1"):
            assert grads[k].abs().sum() > 0, k
    assert sum(second_order[k].abs().sum() for k in per_task) > 0
    assert not any(k.startswith("objective.momentum_network") for k in per_task)


def run_transforms(name, batch_norm, second_order):
    """vmap over tasks of loss, grad and ``second_order(grad_fn)`` vs the autograd loop; no state may change."""
    wrapper, per_task, directions, x1, x2 = make_case(name, batch_norm)
    loss_fn = functional_loss(wrapper)
    grad_fn = grad(loss_fn)
    state_before = {k: v.clone() for k, v in wrapper.state_dict().items()}
    with running_stats_frozen(wrapper):
        losses = vmap(loss_fn)(per_task, x1, x2)
        grads = vmap(grad_fn)(per_task, x1, x2)
        hvps = vmap(second_order(grad_fn))(per_task, directions, x1, x2)
        references = [loop_grad_and_hvp(wrapper, task(per_task, t), task(directions, t), x1[t], x2[t])
                      for t in range(NUM_TASKS)]
    for key, value in wrapper.state_dict().items():
        assert torch.equal(value, state_before[key]), f"{key} changed by a forward pass"
    check_against_loop(per_task, losses, grads, hvps, references)


def forward_over_reverse(grad_fn):
    return lambda params, v, a, b: jvp(lambda p: grad_fn(p, a, b), (params,), (v,))[1]


def reverse_over_reverse(grad_fn):
    return lambda params, v, a, b: vjp(lambda p: grad_fn(p, a, b), params)[1](v)[0]


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_vmapped_grad_and_forward_over_reverse_match_loop(name):
    """Model with nn.BatchNorm1d (running-stat tracking disabled as the core does)."""
    run_transforms(name, batch_norm=True, second_order=forward_over_reverse)


@pytest.mark.parametrize("name", list(OBJECTIVES))
def test_vmapped_reverse_over_reverse_matches_loop(name):
    """Model without BatchNorm: torch (2.14) cannot vmap nn.BatchNorm's double backward ("accessing `data`
    under vmap transform is not allowed"), a limitation of the model, not of the objectives, whose own
    normalisation (the predictor's BatchStandardisation) supports it."""
    run_transforms(name, batch_norm=False, second_order=reverse_over_reverse)
