"""MoCo v2 (Chen et al., 2020) with a symmetric loss: momentum key encoder plus a queue of negatives."""
import torch
import torch.nn.functional as F

from ._checks import check_embedding_pair, check_positive, check_positive_int
from .momentum import MomentumObjective


class MoCo(MomentumObjective):
    """loss = (InfoNCE(q1, k2) + InfoNCE(q2, k1)) / 2 with queries q = normalise(embed(x)), keys
    k = normalise(momentum_network(x)) (no gradient) and the queue as negatives:
    ``InfoNCE(q, k) = mean_i -log softmax([q_i.k_i, q_i.queue_j for all j] / temperature)[0]``.

    State (all in ``state_dict``): ``queue`` [queue_size, embed_dim] of normalised keys, ``queue_ptr``
    (next write position), and the key encoder ``momentum_network`` created by ``bind(model)``.
    The queue starts as random normalised vectors drawn from ``generator`` (or torch's default
    generator when None). ``forward`` only reads the queue; ``before_step`` applies the EMA to the key
    encoder; ``after_step`` embeds every task's two views with the key encoder (one call over the 2N
    images of each task, no gradient) and enqueues those M*2N keys as a ring buffer, oldest first out.
    """

    embeds_views_once = True
    after_step_needs_all_views = True   # the queue takes the keys of every task of the step, on every rank

    def __init__(self, embed_dim: int, queue_size: int = 4096, temperature: float = 0.2, momentum: float = 0.999,
                 generator: torch.Generator | None = None):
        super().__init__(momentum)
        check_positive_int("embed_dim", embed_dim)
        self.queue_size = check_positive_int("queue_size", queue_size)
        self.temperature = check_positive("temperature", temperature)
        initial = torch.randn(queue_size, embed_dim, generator=generator)
        self.register_buffer("queue", F.normalize(initial, dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _info_nce(self, query, key):
        positive = (query * key).sum(dim=1, keepdim=True)
        negative = query @ self.queue.to(query.dtype).T
        logits = torch.cat([positive, negative], dim=1) / self.temperature
        return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()

    def forward(self, embed, x1, x2):
        x = torch.cat([x1, x2])
        query = F.normalize(embed(x), dim=1)
        key = F.normalize(self.momentum_embed(x), dim=1)
        check_embedding_pair(query, key)
        if query.shape[1] != self.queue.shape[1]:
            raise ValueError(f"embedding dim {query.shape[1]} does not match the queue's embed_dim {self.queue.shape[1]}")
        q1, q2 = query.chunk(2)
        k1, k2 = key.chunk(2)
        return 0.5 * (self._info_nce(q1, k2) + self._info_nce(q2, k1))

    def after_step(self, model, views):
        if views.dim() < 3 or views.shape[1] != 2:
            raise ValueError(f"views must have shape [M, 2, N, *input_shape], got {tuple(views.shape)}")
        keys = torch.cat([F.normalize(self.momentum_embed(task_views.flatten(0, 1)), dim=1) for task_views in views])
        self.enqueue_(keys)

    @torch.no_grad()
    def enqueue_(self, keys):
        """Write keys [K, embed_dim] into the ring buffer at ``queue_ptr`` (as if one at a time) and advance it."""
        count = keys.shape[0]
        kept = min(count, self.queue_size)
        positions = (self.queue_ptr + torch.arange(count - kept, count, device=self.queue.device)) % self.queue_size
        self.queue[positions] = keys[count - kept:].to(self.queue.dtype)
        self.queue_ptr.copy_((self.queue_ptr + count) % self.queue_size)

    def extra_repr(self):
        return f"queue_size={self.queue_size}, temperature={self.temperature}, momentum={self.momentum}"
