"""The randomness rule of a GeSSL step: one random stream per task, replayed in every pass of that task."""
from __future__ import annotations

import contextlib

import torch


def fork_rng(device: torch.device):
    """Context that restores the default generators of the CPU and of ``device`` on exit."""
    if device.type == "cpu":
        return torch.random.fork_rng(devices=[])
    return torch.random.fork_rng(devices=[device], device_type=device.type)


class RandomStreams:
    """The randomness rule of a step: one random stream per task, replayed in every pass of that task.

    With stochastic layers (Dropout, stochastic depth, RReLU, attention dropout) task l's inner problem is
    ℓ_l(θ) = ℓ(θ; x1, x2, masks_l), and GeSSL differentiates through K steps of it: every pass of the task (inner
    steps, target steps, outer loss, both finite-difference evaluations, Hessian-vector products, ``itd``'s re-run)
    must see the same masks, or the hypergradient is that of no function (a finite difference of two different
    random functions grows as 1/radius). So each step draws one base seed s = ``torch.randint(2**62, ())`` from
    torch's default (CPU) generator (the only draw a step makes from the caller's stream); the task with global
    index g (rank · 2³² + local index) runs every pass with its device's default generator seeded with s + g,
    and the caller's generator state is restored after each pass. Under vmap the chunk starting at task g runs
    with s + g and ``torch.func.vmap(randomness="different")`` gives each task of the chunk its own masks.
    Masks thus differ across tasks and steps; the loop and vmap paths draw different (equally distributed) masks.
    """

    def __init__(self):
        self.seed: int | None = None

    @contextlib.contextmanager
    def seeded(self, seed: int | None):
        """Replay the stream ``seed`` in every pass inside the block (None: plain, unreplayed randomness)."""
        self.seed = seed
        try:
            yield
        finally:
            self.seed = None

    @contextlib.contextmanager
    def replay(self, device: torch.device):
        """One pass: the default generators of the CPU and of ``device`` start from the stream's seed."""
        if self.seed is None:
            yield
            return
        with fork_rng(device):
            torch.default_generator.manual_seed(self.seed)
            if device.type != "cpu":
                module = getattr(torch, device.type)
                generators = getattr(module, "default_generators", None)
                if generators:
                    index = device.index if device.index is not None else module.current_device()
                    generators[index].manual_seed(self.seed)
                else:
                    module.manual_seed(self.seed)
            yield
