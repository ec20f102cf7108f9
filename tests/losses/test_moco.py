import math

import pytest
import torch

from gessl_ext.losses import MoCo
from loss_test_utils import tiny_model


def info_nce_loop(q, k, queue, temperature):
    """Plain-Python InfoNCE; q, k [N, d] and queue [Q, d] already normalised."""
    total = 0.0
    for qi, ki in zip(q.tolist(), k.tolist()):
        logits = [sum(a * b for a, b in zip(qi, ki)) / temperature]
        logits += [sum(a * b for a, b in zip(qi, negative)) / temperature for negative in queue.tolist()]
        total += -logits[0] + math.log(sum(math.exp(v) for v in logits))
    return total / len(q)


def make_bound_moco(queue_size=6, seed=0):
    model = tiny_model()
    objective = MoCo(embed_dim=3, queue_size=queue_size, temperature=0.2, momentum=0.9,
                     generator=torch.Generator().manual_seed(seed)).double()
    objective.bind(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, dtype=p.dtype, generator=torch.Generator().manual_seed(7)))
    objective.before_step(model)
    return model, objective


def test_queue_initialisation():
    a = MoCo(embed_dim=5, queue_size=9, generator=torch.Generator().manual_seed(4))
    b = MoCo(embed_dim=5, queue_size=9, generator=torch.Generator().manual_seed(4))
    expected = torch.randn(9, 5, generator=torch.Generator().manual_seed(4))
    expected = expected / expected.norm(dim=1, keepdim=True)
    torch.testing.assert_close(a.queue, expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(a.queue, b.queue) and a.queue_ptr.item() == 0 and a.queue_ptr.dtype == torch.long


def test_value_matches_loop_reference_and_leaves_queue_alone():
    model, objective = make_bound_moco()
    queue_before = objective.queue.clone()
    x1, x2 = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).unbind()
    loss = objective(model, x1, x2)
    x = torch.cat([x1, x2])
    normalise = torch.nn.functional.normalize
    q1, q2 = normalise(model(x), dim=1).detach().chunk(2)
    k1, k2 = normalise(objective.momentum_network(x), dim=1).chunk(2)
    expected = 0.5 * (info_nce_loop(q1, k2, queue_before, 0.2) + info_nce_loop(q2, k1, queue_before, 0.2))
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert torch.equal(objective.queue, queue_before) and objective.queue_ptr.item() == 0


@pytest.mark.parametrize("queue_size, steps", [(6, [(1, 2), (2, 1)]), (5, [(1, 2), (1, 3)]), (3, [(2, 2)])])
def test_after_step_enqueues_like_sequential_ring_buffer(queue_size, steps):
    # steps: (M tasks, N per view) per outer step; keys per step = M * 2N (the last case exceeds the queue)
    model, objective = make_bound_moco(queue_size=queue_size)
    expected_queue = objective.queue.clone()
    pointer = 0
    generator = torch.Generator().manual_seed(3)
    for m, n in steps:
        views = torch.randn(m, 2, n, 4, dtype=torch.float64, generator=generator)
        for task in views:
            keys = objective.momentum_network(task.flatten(0, 1)).detach()
            for key in keys:
                expected_queue[pointer] = key / key.norm()
                pointer = (pointer + 1) % queue_size
        objective.after_step(model, views)
        torch.testing.assert_close(objective.queue, expected_queue, rtol=1e-12, atol=1e-12)
        assert objective.queue_ptr.item() == pointer


def test_state_dict_round_trip_restores_queue_pointer_and_key_encoder():
    model, objective = make_bound_moco(queue_size=7)
    objective.after_step(model, torch.randn(1, 2, 2, 4, dtype=torch.float64))
    state = objective.state_dict()
    restored = MoCo(embed_dim=3, queue_size=7, generator=torch.Generator().manual_seed(99)).double()
    restored.bind(tiny_model(seed=3))
    restored.load_state_dict(state)
    assert restored.queue_ptr.item() == 4
    for name, tensor in restored.state_dict().items():
        assert torch.equal(tensor, state[name]), name


def test_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="queue_size"):
        MoCo(3, queue_size=0)
    with pytest.raises(ValueError, match="temperature"):
        MoCo(3, temperature=0.0)
    with pytest.raises(ValueError, match="embed_dim"):
        MoCo(-3)
    model, objective = make_bound_moco()
    with pytest.raises(ValueError, match=r"\[M, 2, N"):
        objective.after_step(model, torch.zeros(3, 4, 2, 4, dtype=torch.float64))
    wrong_dim = MoCo(embed_dim=5, queue_size=4).double()
    wrong_dim.bind(model)
    x = torch.zeros(3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="embed_dim 5"):
        wrong_dim(model, x, x + 1)
