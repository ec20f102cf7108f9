"""GeSSLStep against the plain autograd reference, the BatchNorm rule, surrogate, bad input, skips."""
import copy
import gc
import warnings

import pytest
import torch
from torch import nn

from gessl_ext import GeSSLStep, NonSmoothModelWarning, losses
from gessl_ext.hypergrad import FD
from reference import flat, reference_step, rel

SIMCLR = losses.SimCLR(temperature=0.5)


def bn_convnet():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2),
        nn.BatchNorm2d(4, momentum=None), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 6),
    ).double()


def mlp(act=nn.Tanh):
    return nn.Sequential(nn.Linear(5, 12), act(), nn.Linear(12, 6)).double()


def grads(model):
    return flat([p.grad for p in model.parameters()])


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("hypergrad", ["itd", "hvp"])
def test_exact_hypergradient_matches_autograd_reference_with_batchnorm(batching, hypergrad):
    model = bn_convnet()
    views = torch.randn(3, 2, 5, 1, 8, 8, dtype=torch.float64)
    ref, ref_loss, ref_ssl = reference_step(model, SIMCLR.pair_loss, views, 0.1, 2, 3, 0.2)
    step = GeSSLStep(model, SIMCLR, inner_lr=0.1, inner_steps=2, target_steps=3, hypergrad=hypergrad,
                     head_temperature=0.2, task_batching=batching)
    out = step(views)
    assert rel(grads(model), flat(ref)) < 1e-8
    assert abs(float(out.loss) - float(ref_loss)) < 1e-10
    assert abs(float(out.ssl_loss) - float(ref_ssl.mean())) < 1e-10
    assert torch.allclose(out.kl.mean(), out.loss)
    assert out.kl.shape == (3,) and not out.skipped


@pytest.mark.parametrize("hypergrad", ["fd", "itd", "first_order", "neumann", "cg", "hvp"])
def test_surrogate_backward_leaves_the_same_grad_as_step(hypergrad):
    model = mlp()
    views = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    kwargs = dict(inner_lr=0.1, inner_steps=2, target_steps=2, hypergrad=hypergrad)
    GeSSLStep(model, SIMCLR, **kwargs)(views)
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    surrogate = GeSSLStep(model, SIMCLR, **kwargs).surrogate(views)
    assert surrogate.dim() == 0 and surrogate.requires_grad
    surrogate.backward()
    assert torch.equal(grads(model), expected)


def test_step_accumulates_like_backward():
    model = mlp()
    views = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    step = GeSSLStep(model, SIMCLR, hypergrad="hvp")
    step(views)
    once = grads(model).clone()
    step(views)
    assert torch.allclose(grads(model), 2 * once, rtol=1e-12, atol=0)


def test_batchnorm_running_stats_follow_an_ordinary_training_loop():
    model = bn_convnet()
    views = torch.randn(4, 2, 5, 1, 8, 8, dtype=torch.float64)
    ordinary = copy.deepcopy(model)
    with torch.no_grad():
        for task in views:
            ordinary(torch.cat([task[0], task[1]]))
    for batching in ("loop", "vmap"):
        trained = copy.deepcopy(model)
        GeSSLStep(trained, SIMCLR, hypergrad="fd", target_steps=2, task_batching=batching)(views)
        for (name, got), want in zip(trained.named_buffers(), ordinary.buffers()):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (batching, name)
    # eval mode: running statistics are used and kept
    frozen = copy.deepcopy(model).eval()
    before = [b.clone() for b in frozen.buffers()]
    GeSSLStep(frozen, SIMCLR, hypergrad="fd", target_steps=1)(views)
    assert all(torch.equal(a, b) for a, b in zip(before, frozen.buffers()))


class SeparateViews(losses.SSLObjective):
    """Cosine agreement of the two views, each embedded by its own call (the protocol allows it)."""

    def forward(self, embed, x1, x2):
        return -torch.nn.functional.cosine_similarity(embed(x1), embed(x2)).mean()


@pytest.mark.parametrize("momentum", [0.1, None, 0.0])
@pytest.mark.parametrize("objective", ["separate views", "layer used twice"])
def test_running_stats_of_a_layer_run_twice_per_pass_follow_an_ordinary_training_loop(objective, momentum):
    """A BatchNorm layer that runs twice in a task's first pass (the objective embeds the views one by one, or the
    model reuses the layer) takes two updates per task, in order, as ordinary training does; momentum 0 still
    counts the batches."""
    torch.manual_seed(0)
    norm = nn.BatchNorm1d(8, momentum=momentum)
    if objective == "separate views":
        model, ssl_loss = nn.Sequential(nn.Linear(6, 8), norm, nn.Tanh(), nn.Linear(8, 4)).double(), SeparateViews()
        ordinary_pass = lambda m, task: (m(task[0]), m(task[1]))                      # noqa: E731
    else:
        model, ssl_loss = nn.Sequential(nn.Linear(6, 8), norm, nn.Tanh(), nn.Linear(8, 8), norm).double(), SIMCLR
        ordinary_pass = lambda m, task: m(torch.cat([task[0], task[1]]))            # noqa: E731
    model[1].running_mean.normal_()
    model[1].num_batches_tracked.fill_(3)
    views = torch.randn(3, 2, 4, 6, dtype=torch.float64)
    ordinary = copy.deepcopy(model)
    with torch.no_grad():
        for task in views:
            ordinary_pass(ordinary, task)
    for batching in ("loop", "vmap"):
        trained = copy.deepcopy(model)
        own = dict(trained.named_parameters(remove_duplicate=False))
        GeSSLStep(trained, ssl_loss, hypergrad="fd", target_steps=1, task_batching=batching,
                  warn_nonsmooth=False)(views)
        for (name, got), want in zip(trained.named_buffers(), ordinary.buffers()):
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), (batching, name, got, want)
        # the model keeps its own parameters (torch.func.functional_call alone leaves a reused layer's swapped in)
        assert all(p is own[n] and p.is_leaf for n, p in trained.named_parameters(remove_duplicate=False)), batching


@pytest.mark.parametrize("hypergrad", ["fd", "hvp", "itd", "first_order", "neumann", "cg"])
def test_loop_vmap_and_chunked_vmap_agree(hypergrad):
    """Every built-in method: the same hypergradient and per-task KL whether the tasks run one at a time, all
    under one vmap, or in vmap chunks of 2 (3 tasks: a ragged last chunk). Measured ≤ 1.6e-14."""
    model = bn_convnet()
    views = torch.randn(3, 2, 4, 1, 8, 8, dtype=torch.float64)
    results = []
    for batching, chunk in (("loop", None), ("vmap", None), ("vmap", 2)):
        m = copy.deepcopy(model)
        out = GeSSLStep(m, SIMCLR, hypergrad=hypergrad, target_steps=2, task_batching=batching,
                        task_chunk_size=chunk)(views)
        results.append((grads(m), out.kl))
    (looped, looped_kl), *batched = results
    for hypergradient, kl in batched:
        assert rel(hypergradient, looped) < 1e-12
        assert rel(kl, looped_kl) < 1e-12


@pytest.mark.parametrize("hypergrad, extra_loop, extra_vmap", [("fd", 2, 2), ("hvp", 1, 1), ("itd", 0, 1)])
def test_one_task_at_a_time_shares_the_forward_at_the_adapted_weights(hypergrad, extra_loop, extra_vmap):
    """Model forwards per step, K = 1, λ = 3: inner 1, target λ + its embedding 1, outer 1, hypergradient's own.
    The loop takes the outer loss's embeddings from the target's first pass (one forward less per task) and,
    for itd, differentiates the inner loop's recorded graph; vmap runs each forward once per chunk (all M
    tasks), separately, and runs the inner loop again for itd."""
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 6)).double()
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(1))
    views = torch.randn(3, 2, 4, 5, dtype=torch.float64)
    for batching, expected in (("loop", 3 * (1 + 3 + 1 + extra_loop)), ("vmap", 1 + 3 + 1 + 1 + extra_vmap)):
        step = GeSSLStep(model, SIMCLR, hypergrad=hypergrad, target_steps=3, task_batching=batching)
        step(views)  # the first step with these inputs also checks the model once (one plain forward more)
        calls.clear()
        step(views)
        assert len(calls) == expected, (batching, len(calls))


@pytest.mark.parametrize("hypergrad", ["fd", "hvp", "itd", "first_order", "neumann", "cg"])
def test_step_inside_no_grad_gives_the_same_hypergradient(hypergrad):
    """Validation loops and trainers may call the step under torch.no_grad(); it builds its own graphs."""
    base, views = mlp(), torch.randn(3, 2, 4, 5, dtype=torch.float64)
    results = []
    for context in (torch.enable_grad, torch.no_grad):
        model = copy.deepcopy(base)
        with context():
            GeSSLStep(model, SIMCLR, hypergrad=hypergrad, target_steps=2)(views)
        results.append(grads(model))
    model = copy.deepcopy(base)
    with torch.no_grad():   # the surrogate made under no_grad still carries dL/dθ to its backward
        surrogate = GeSSLStep(model, SIMCLR, hypergrad=hypergrad, target_steps=2).surrogate(views)
    surrogate.backward()
    results.append(grads(model))
    assert rel(results[1], results[0]) < 1e-12 and rel(results[2], results[0]) < 1e-12


class EmbedsTwice(losses.SimCLR):
    """Declares embeds_views_once (inherited) but embeds each view separately."""

    def forward(self, embed, x1, x2):
        return self.pair_loss(embed(x1), embed(x2))


def test_objective_that_breaks_embeds_views_once_is_named_and_nothing_changes():
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="EmbedsTwice sets embeds_views_once = True but its forward called embed 2 time"):
        GeSSLStep(model, EmbedsTwice())(torch.randn(2, 2, 4, 5, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_objective_without_embeds_views_once_runs_the_outer_forward_itself():
    """Same hypergradient whether or not the loop may reuse the loss pass's embeddings."""

    class Separate(losses.SimCLR):
        embeds_views_once = False

    base, views = bn_convnet(), torch.randn(2, 2, 4, 1, 8, 8, dtype=torch.float64)
    results = []
    for objective in (losses.SimCLR(temperature=0.5), Separate(temperature=0.5)):
        model = copy.deepcopy(base)
        GeSSLStep(model, objective, hypergrad="hvp", target_steps=2)(views)
        results.append(grads(model))
    assert rel(results[1], results[0]) < 1e-12


def test_custom_head_with_the_same_contract():
    from gessl_ext import PairHead

    model = mlp()
    views = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    out_a = GeSSLStep(a, SIMCLR, head_temperature=0.3, hypergrad="hvp")(views)
    out_b = GeSSLStep(b, SIMCLR, head=lambda z1, z2: PairHead(0.3)(z1, z2), hypergrad="hvp")(views)
    assert torch.equal(grads(a), grads(b)) and torch.equal(out_a.loss, out_b.loss)


def test_plain_callable_loss_is_accepted():
    model = mlp()
    views = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    ref, _, _ = reference_step(model, SIMCLR.pair_loss, views, 0.05, 1, 2, 0.1)
    GeSSLStep(model, lambda z1, z2: SIMCLR.pair_loss(z1, z2), target_steps=2, hypergrad="itd")(views)
    assert rel(grads(model), flat(ref)) < 1e-8


def _one_step_changes_the_weights(model, views, **kwargs):
    before = [p.detach().clone() for p in model.parameters()]
    stats_before = [b.clone() for b in model.buffers()]
    step = GeSSLStep(model, SIMCLR, inner_steps=1, target_steps=1, **kwargs)
    opt = torch.optim.SGD(step.parameters(), lr=0.1)
    out = step(views)
    opt.step()
    assert not out.skipped and torch.isfinite(out.loss) and out.hypergrad_norm > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, model.parameters())]
    assert sum(changed) >= 0.9 * len(changed)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    if stats_before:
        assert not all(torch.equal(a, b) for a, b in zip(stats_before, model.buffers()))


def test_torchvision_resnet18_step_changes_the_weights():
    pytest.importorskip("torchvision")
    from test_model_zoo import resnet18  # torchvision's ResNet class, BasicBlock x [2, 2, 2, 2], at width 4

    resnet = resnet18()  # BatchNorm, ReLU, max-pool; float32. At the stock width 64 (11.7 M parameters) the step
    # took 1.7 s of parameter-sized arithmetic and checked nothing more
    _one_step_changes_the_weights(resnet, torch.randn(2, 2, 3, 3, 16, 16), hypergrad="fd", warn_nonsmooth=False)


def test_small_vit_step_changes_the_weights():
    torchvision = pytest.importorskip("torchvision")
    vit = torchvision.models.VisionTransformer(image_size=16, patch_size=8, num_layers=1, num_heads=2,
                                               hidden_dim=16, mlp_dim=32, num_classes=8)
    nn.init.normal_(vit.heads.head.weight)  # torchvision starts the head at zero: every embedding equal
    _one_step_changes_the_weights(vit, torch.randn(2, 2, 3, 3, 16, 16), hypergrad="hvp")


def test_nonfinite_loss_skips_the_step_and_touches_nothing():
    model = mlp()
    views = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    views[1, 0, 2, 3] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    step = GeSSLStep(model, SIMCLR)
    out = step(views)
    assert out.skipped and int(step.skipped_steps) == 1
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    step.surrogate(views).backward()
    assert int(step.skipped_steps) == 2 and all(torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert "skipped_steps" in step.state_dict()


def test_nonfinite_hypergradient_with_finite_loss_is_skipped():
    from gessl_ext import PairHead

    def head_with_nan_gradient(z1, z2):  # value unchanged, gradient 0 * inf = nan
        return PairHead(0.1)(z1, z2) + 0 * (z1 - z1.detach()).abs().sqrt().sum()

    model = mlp()
    views = torch.randn(2, 2, 4, 5, dtype=torch.float64)
    out = GeSSLStep(model, SIMCLR, head=head_with_nan_gradient, hypergrad="first_order")(views)
    assert torch.isfinite(out.loss) and out.skipped
    assert all(p.grad is None for p in model.parameters())


BAD_ARGS = [
    (dict(inner_steps=0), ValueError, "inner_steps"),
    (dict(inner_steps=1.5), ValueError, "inner_steps"),
    (dict(target_steps=-1), ValueError, "target_steps"),
    (dict(inner_lr=0.0), ValueError, "inner_lr"),
    (dict(inner_lr=-1), ValueError, "inner_lr"),
    (dict(head_temperature=0), ValueError, "head_temperature"),
    (dict(hypergrad=FD), TypeError, "instantiate it"),
    (dict(hypergrad="magic"), ValueError, "unknown hypergrad"),
    (dict(task_batching="threads"), ValueError, "task_batching"),
    (dict(task_chunk_size=0), ValueError, "task_chunk_size"),
    (dict(fd_radius=0.01), TypeError, "fd_radius"),   # settings belong to the method: hypergrad=FD(radius=...)
    (dict(process_group=42), TypeError, "process_group must be a torch.distributed.ProcessGroup"),
    (dict(head=3), TypeError, "head"),
    (dict(autocast_dtype=torch.int32), TypeError, "autocast_dtype"),
]


@pytest.mark.parametrize("kwargs, error, words", BAD_ARGS)
def test_bad_constructor_arguments(kwargs, error, words):
    with pytest.raises(error, match=words):
        GeSSLStep(mlp(), SIMCLR, **kwargs)


def test_model_without_trainable_parameters_and_bad_loss():
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        GeSSLStep(frozen, SIMCLR)
    with pytest.raises(TypeError):
        GeSSLStep(mlp(), ssl_loss=3)
    with pytest.raises(TypeError, match="nn.Module"):
        GeSSLStep(lambda x: x, SIMCLR)


BAD_VIEWS = [
    (lambda: torch.randn(2, 4, 5, dtype=torch.float64), ValueError, "rank"),
    (lambda: torch.randn(2, 3, 4, 5, dtype=torch.float64), ValueError, "two views"),
    (lambda: torch.randn(2, 2, 1, 5, dtype=torch.float64), ValueError, "N >= 2"),
    (lambda: torch.randn(0, 2, 4, 5, dtype=torch.float64), ValueError, "at least one task"),
    (lambda: torch.randn(2, 2, 4, 5, dtype=torch.float32), TypeError, "dtype"),
    (lambda: torch.randn(2, 2, 4, 5, dtype=torch.float64, device="meta"), ValueError, "views are on meta"),
    (lambda: [[1.0]], TypeError, "Tensor"),
]


@pytest.mark.parametrize("make, error, words", BAD_VIEWS)
def test_bad_views_fail_before_anything_changes(make, error, words):
    model = mlp()
    before = copy.deepcopy(model.state_dict())
    step = GeSSLStep(model, SIMCLR)
    with pytest.raises(error, match=words):
        step(make())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_fd_warns_once_on_nonsmooth_models_and_can_be_silenced():
    with pytest.warns(NonSmoothModelWarning, match="hvp"):
        GeSSLStep(mlp(nn.ReLU), SIMCLR, hypergrad="fd")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        GeSSLStep(mlp(nn.ReLU), SIMCLR, hypergrad="fd", warn_nonsmooth=False)
        GeSSLStep(mlp(nn.ReLU), SIMCLR, hypergrad="hvp")
        GeSSLStep(mlp(nn.Tanh), SIMCLR, hypergrad="fd")


def test_repeated_steps_keep_no_tensors_alive():
    model = nn.Sequential(nn.Linear(5, 12), nn.BatchNorm1d(12), nn.Tanh(), nn.Linear(12, 6))
    step = GeSSLStep(model, SIMCLR, hypergrad="itd", target_steps=2)
    opt = torch.optim.SGD(step.parameters(), lr=0.01, momentum=0.9)

    def live_tensors():
        gc.collect()
        return sum(1 for o in gc.get_objects() if torch.is_tensor(o))

    counts = []
    for index in range(5):
        step(torch.randn(3, 2, 6, 5))
        opt.step()
        opt.zero_grad()
        if index in (1, 4):  # a full collection and heap scan costs ~0.3 s: after the 2nd and the last step only
            counts.append(live_tensors())
    assert counts[1] <= counts[0], counts


def test_bf16_autocast_hypergradient_close_to_fp32():
    model = nn.Sequential(nn.Linear(8, 32), nn.SiLU(), nn.Linear(32, 16))
    views = torch.randn(2, 2, 8, 8)
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    GeSSLStep(a, SIMCLR, hypergrad="hvp", target_steps=3)(views)
    GeSSLStep(b, SIMCLR, hypergrad="hvp", target_steps=3, autocast_dtype=torch.bfloat16)(views)
    assert all(p.grad.dtype == torch.float32 for p in b.parameters())
    assert rel(grads(b), grads(a)) < 0.1
