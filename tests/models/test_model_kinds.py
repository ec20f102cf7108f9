"""Each kind of model a user may bring (issue 14), with the right value or a clear error: stochastic layers,
recurrent layers, every norm layer under every method and batching, the model's output, torch.compile,
parameters the step never reaches, inference mode. All in float64 against independent references.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vmap

from gessl_ext import GeSSLStep, losses
from gessl_ext.hypergrad import FD
from reference import flat, reference_step, rel

SIMCLR = losses.SimCLR(temperature=0.5)
LR, TAU = 0.05, 0.1


def grads(model):
    return flat([p.grad if p.grad is not None else torch.zeros_like(p) for p in model.parameters() if p.requires_grad])


def stream_seed(caller_seed):
    """The base seed a step draws after torch.manual_seed(caller_seed) (randomness.RandomStreams)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(caller_seed)
        return int(torch.randint(2**62, ()))


def run(model, views, hypergrad, batching, inner_steps=1, target_steps=1, caller_seed=7, **kwargs):
    step = GeSSLStep(model, SIMCLR, inner_lr=LR, inner_steps=inner_steps, target_steps=target_steps,
                     hypergrad=hypergrad, head_temperature=TAU, task_batching=batching, **kwargs)
    torch.manual_seed(caller_seed)
    out = step(views)
    assert not out.skipped
    return grads(model)


def dropout_mlp(layer=None):
    torch.manual_seed(1)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.Tanh(), layer or nn.Dropout(0.5), nn.Linear(16, 8)).double()


def views(m=2, n=4, shape=(1, 8, 8), seed=0):
    torch.manual_seed(seed)
    return torch.randn(m, 2, n, *shape, dtype=torch.float64)


# --- stochastic layers ------------------------------------------------------------------------------

@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_dropout_fd_converges_to_the_exact_hypergradient(batching):
    """The issue's case: fd's norm grew as 1/r (1.24e3 at r = 1e-2, 1.24e4 at 1e-3) because every pass drew new
    masks. Now every pass of a task replays its masks: fd → hvp = itd as r → 0, error O(r²)."""
    x = views()
    hvp = run(dropout_mlp(), x, "hvp", batching)
    assert rel(run(dropout_mlp(), x, "itd", batching), hvp) < 1e-12
    errors = [rel(run(dropout_mlp(), x, FD(radius=r), batching), hvp) for r in (1e-3, 1e-4)]
    assert errors[1] < 1e-5 and errors[1] < errors[0] / 50  # measured 3.1e-4 → 3.1e-6 (loop), 4.1e-5 → 4.1e-7


STOCHASTIC = {
    "Dropout": lambda: nn.Dropout(0.5),
    "AlphaDropout": lambda: nn.AlphaDropout(0.5),
    "RReLU": lambda: nn.RReLU(0.1, 0.4),  # torch's kernel has no vmap rule: runs as a substitute
    "StochasticDepth": lambda: pytest.importorskip("torchvision").ops.StochasticDepth(0.5, "row"),  # likewise
}


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("kind", list(STOCHASTIC))
def test_stochastic_layer_methods_agree(kind, batching):
    """K = 2 inner steps: every pass of a task (both inner steps, target, outer, fd's θ ± εu, HVPs, itd's re-run)
    must see the same draws for fd, hvp and itd to agree."""
    x = views()
    itd = run(dropout_mlp(STOCHASTIC[kind]()), x, "itd", batching, inner_steps=2)
    assert rel(run(dropout_mlp(STOCHASTIC[kind]()), x, "hvp", batching, inner_steps=2), itd) < 1e-10
    assert rel(run(dropout_mlp(STOCHASTIC[kind]()), x, FD(radius=1e-4), batching, inner_steps=2), itd) < 1e-5


class InPlaceDraw(nn.Module):
    """A layer of one's own that draws in place into a fresh tensor: vmap cannot give each task its own draw."""

    def forward(self, x):
        return x * torch.empty(x.shape[0], 1, dtype=x.dtype).bernoulli_(0.5) * 2


def test_a_random_layer_vmap_cannot_batch_names_the_loop_and_the_loop_replays_it():
    x = views()
    with pytest.raises(RuntimeError, match="task_batching='loop'"):
        run(dropout_mlp(InPlaceDraw()), x, "hvp", "vmap")
    itd = run(dropout_mlp(InPlaceDraw()), x, "itd", "loop", inner_steps=2)
    assert rel(run(dropout_mlp(InPlaceDraw()), x, FD(radius=1e-4), "loop", inner_steps=2), itd) < 1e-5


class FixedMask(nn.Module):
    """The reference's dropout: multiply by a given mask (already scaled by 1/(1-p))."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


@pytest.mark.parametrize("method", ["hvp", "itd", "first_order", "fd"])
@pytest.mark.parametrize("batching", ["loop", "vmap"])
def test_dropout_step_equals_a_reference_with_each_tasks_fixed_masks(batching, method):
    """The documented rule, checked from outside: task l's masks are the draws of its stream (loop: seed + l;
    vmap: one chunk, seed + 0, torch.func.vmap(randomness="different")); a plain per-task autograd step that
    multiplies by those fixed masks gives the same hypergradient (fd within O(r²)). Tasks get different masks."""
    m, n, p = 3, 4, 0.5
    x, seed = views(m=m, n=n), stream_seed(7)
    ones = torch.ones(2 * n, 16, dtype=torch.float64)
    with torch.random.fork_rng(devices=[]):
        if batching == "loop":
            masks = []
            for task in range(m):
                torch.manual_seed(seed + task)
                masks.append(F.dropout(ones, p))
        else:
            torch.manual_seed(seed)
            masks = vmap(lambda o: F.dropout(o, p), randomness="different")(ones.expand(m, -1, -1))
    assert not torch.equal(masks[0], masks[1]) and not torch.equal(masks[1], masks[2])
    expected = 0
    for task in range(m):
        fixed = dropout_mlp()
        fixed[3] = FixedMask(masks[task])
        ref, _, _ = reference_step(fixed, SIMCLR.pair_loss, x[task:task + 1], LR, 2, 1, TAU, first_order=method == "first_order")
        expected = expected + flat(ref) / m
    got = run(dropout_mlp(), x, FD(radius=1e-4) if method == "fd" else method, batching, inner_steps=2)
    assert rel(got, expected) < (1e-6 if method == "fd" else 1e-10)


def test_a_step_draws_once_from_the_callers_generator_and_is_reproducible():
    x = views()
    first = run(dropout_mlp(), x, "hvp", "loop", caller_seed=3)
    after_step = torch.rand(3)
    again = run(dropout_mlp(), x, "hvp", "loop", caller_seed=3)
    torch.manual_seed(3)
    torch.randint(2**62, ())
    assert torch.equal(first, again) and torch.equal(after_step, torch.rand(3))
    assert not torch.equal(first, run(dropout_mlp(), x, "hvp", "loop", caller_seed=4))  # another step, other masks


# --- recurrent layers -------------------------------------------------------------------------------

class Recurrent(nn.Module):
    """Reads the 8 rows of an 8×8 image: a 2-layer bidirectional LSTM with projections, or a GRUCell loop
    started from an explicit torch.zeros state (unbatched under vmap)."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind
        if kind == "lstm":
            self.rnn = nn.LSTM(8, 6, num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
            self.out = nn.Linear(6, 8)
        else:
            self.rnn = nn.GRUCell(8, 6)
            self.out = nn.Linear(6, 8)

    def forward(self, x):
        rows = x.reshape(x.shape[0], 8, 8)
        if self.kind == "lstm":
            return self.out(self.rnn(rows)[0][:, -1])
        h = torch.zeros(x.shape[0], 6, dtype=x.dtype)
        for t in range(rows.shape[1]):
            h = self.rnn(rows[:, t], h)
        return self.out(h)


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("method", ["hvp", "itd"])
@pytest.mark.parametrize("kind", ["lstm", "gru_cell"])
def test_recurrent_layers_under_every_batching(kind, method, batching):
    """vmap failed with "output with shape [4, 12] doesn't match the broadcast shape [1, 4, 12]"; now both
    batchings equal the per-task autograd reference."""
    torch.manual_seed(2)
    model = Recurrent(kind).double()
    x = views(n=2)
    ref, _, _ = reference_step(model, SIMCLR.pair_loss, x, LR, 1, 1, TAU)
    assert rel(run(model, x, method, batching), flat(ref)) < 1e-8


# --- norm layers ------------------------------------------------------------------------------------

NORMS = {
    "BatchNorm2d": lambda: nn.BatchNorm2d(4),
    "BatchNorm2d-untracked": lambda: nn.BatchNorm2d(4, track_running_stats=False),
    "BatchNorm2d-eval": lambda: nn.BatchNorm2d(4),
    "InstanceNorm2d": lambda: nn.InstanceNorm2d(4),
    "InstanceNorm2d-affine-tracked": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "InstanceNorm2d-tracked-eval": lambda: nn.InstanceNorm2d(4, affine=True, track_running_stats=True),
    "GroupNorm": lambda: nn.GroupNorm(2, 4),
    "LayerNorm": lambda: nn.LayerNorm([4, 8, 8]),
    "LocalResponseNorm": lambda: nn.LocalResponseNorm(2),
}


def norm_model(kind):
    torch.manual_seed(3)
    norm = NORMS[kind]()
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), norm, nn.Tanh(), nn.Flatten(), nn.Linear(256, 8)).double()
    if getattr(norm, "running_mean", None) is not None:
        with torch.no_grad():
            norm.running_mean.uniform_(-1, 1)
            norm.running_var.uniform_(0.5, 2)
    if kind.endswith("eval"):
        model.eval()
    return model


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("method", ["hvp", "itd"])
@pytest.mark.parametrize("kind", list(NORMS))
def test_every_norm_layer_under_every_method_and_batching(kind, method, batching):
    """itd under vmap failed for untracked BatchNorm and InstanceNorm ("accessing 'data' under vmap transform
    is not allowed"), tracked InstanceNorm failed under vmap for every method; loop and vmap now both equal the
    per-task autograd reference to 1e-8."""
    x = views(n=3)
    ref, _, _ = reference_step(norm_model(kind), SIMCLR.pair_loss, x, LR, 2, 1, TAU)
    assert rel(run(norm_model(kind), x, method, batching, inner_steps=2), flat(ref)) < 1e-8


@pytest.mark.parametrize("batching", ["loop", "vmap"])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_instance_norm_running_stats_follow_an_ordinary_training_loop(batching, momentum):
    """Like BatchNorm's: updated once per task from its first forward at θ, in task order (torch's rule:
    batch average of the per-instance mean and unbiased variance; momentum=None means no update); before, the
    loop updated them in every pass of the step."""
    x = views(m=3, n=3)
    model = norm_model("InstanceNorm2d-affine-tracked")
    model[1].momentum = momentum
    ordinary = copy.deepcopy(model)
    with torch.no_grad():
        for task in x:
            ordinary(torch.cat([task[0], task[1]]))
    run(model, x, "hvp", batching)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.allclose(getattr(model[1], name), getattr(ordinary[1], name), rtol=0, atol=1e-12), name


# --- the model's output -----------------------------------------------------------------------------

class Output(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how = how
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 8))

    def forward(self, x):
        z = self.body(x)
        return {"extra-axis": lambda: z.unsqueeze(-1), "tuple": lambda: (z, z.sum()), "dict": lambda: {"z": z},
                "vector": lambda: z.sum(1), "tensor": lambda: z}[self.how]()


@pytest.mark.parametrize("how, words", [
    ("extra-axis", ["[8, 8, 1]", "[B, d]", "nn.Flatten()"]),
    ("tuple", ["tuple", "wrapper", "self.model(x)[0]"]),
    ("dict", ["dict", "wrapper"]),
    ("vector", ["[8]", "unsqueeze(1)"]),
])
def test_model_output_that_is_not_an_embedding_is_named_before_anything_changes(how, words):
    """[B, d, 1] with an MSE loss was silently accepted (the head's log-probabilities came out [2, 16, 8]),
    tuples and dicts failed with AttributeError, [B] with IndexError."""
    model = Output(how).double()
    before = copy.deepcopy(model.state_dict())
    step = GeSSLStep(model, lambda z1, z2: F.mse_loss(z1, z2), task_batching="loop")
    with pytest.raises(ValueError) as error:
        step(views(n=4))
    assert all(w in str(error.value) for w in words), str(error.value)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())


def test_a_wrapper_that_picks_the_embedding_gives_the_plain_models_step():
    class PickFirst(nn.Module):  # the documented way to use a model with several outputs
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x):
            return self.model(x)[0]

    torch.manual_seed(4)
    plain = Output("tensor").double()
    several = copy.deepcopy(plain)
    several.how = "tuple"
    x = views(n=4)
    assert torch.equal(run(PickFirst(several), x, "hvp", "vmap"), run(plain, x, "hvp", "vmap"))


# --- torch.compile ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_compiled_models_are_refused_with_the_fix(backend):
    """Measured (docs/models.md): under vmap compiled code does not run, and with aot_eager / inductor the loop
    fails for hvp / itd (no double backward) and for fd on models whose compiled backward donates buffers."""
    model = dropout_mlp()
    with pytest.raises(ValueError, match=r"torch.compile.*_orig_mod"):
        GeSSLStep(torch.compile(model, backend=backend), SIMCLR)
    step = GeSSLStep(model, SIMCLR, task_batching="loop")
    model[1].compile(backend=backend)  # compiled in place after the step was built: refused at the call
    with pytest.raises(ValueError, match=r"torch.compile \('1'\)"):
        step(views())
    assert all(p.grad is None for p in model.parameters())


# --- parameters the step never reaches, step.parameters() --------------------------------------------

class WithUnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(64, 16).requires_grad_(False)
        self.body = nn.Linear(16, 8)
        self.unused = nn.Linear(8, 3)

    def forward(self, x):
        return self.body(torch.tanh(self.frozen(x.flatten(1))))


@pytest.mark.parametrize("entry", ["step", "surrogate"])
def test_parameters_the_step_never_reaches_keep_grad_none_and_adamw_leaves_them_alone(entry):
    """The unused head got .grad of zeros, so AdamW's weight decay shrank it (3.5e-4 per step); loss.backward()
    leaves such a parameter's .grad None and the optimizer skips it. Now so does the step."""
    torch.manual_seed(5)
    model = WithUnusedHead().double()
    step = GeSSLStep(model, SIMCLR, task_batching="loop")
    assert [id(p) for p in step.parameters()] == [id(p) for p in (*model.body.parameters(), *model.unused.parameters())]
    opt = torch.optim.AdamW(step.parameters(), lr=0.1, weight_decay=0.5)
    unused_before, body_before = copy.deepcopy(model.unused.state_dict()), model.body.weight.detach().clone()
    for _ in range(2):
        if entry == "step":
            step(views())
        else:
            step.surrogate(views()).backward()
        assert model.unused.weight.grad is None and model.unused.bias.grad is None
        opt.step()
        opt.zero_grad()
    assert all(torch.equal(v, model.unused.state_dict()[k]) for k, v in unused_before.items())
    assert not torch.equal(body_before, model.body.weight)


def test_a_model_whose_output_no_trainable_parameter_reaches_is_refused():
    model = WithUnusedHead().double()
    model.body.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter reaches"):
        GeSSLStep(model, SIMCLR)(views())


# --- inference mode ---------------------------------------------------------------------------------

def test_inference_mode_is_refused_up_front_and_no_grad_works():
    model = norm_model("BatchNorm2d")
    before = copy.deepcopy(model.state_dict())
    step = GeSSLStep(model, SIMCLR, task_batching="vmap")
    x = views()
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"inference_mode.*torch.no_grad\(\)"):
        step(x)
    with torch.inference_mode():
        inference_views = x.clone()
    with pytest.raises(ValueError, match="inference_mode"):
        step(inference_views)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and int(step.skipped_steps) == 0
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        assert not step(x).skipped
