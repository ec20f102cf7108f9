"""GeSSL on ``torch.distributed``: the M tasks of an outer step are sharded over the ranks.

Each rank runs Algorithm 1 on its own tasks; :func:`reduce_across_ranks` then makes every rank hold
the result of one process running all tasks:

* the summed hypergradient Σ_l dL_l/dθ [P] by ONE all-reduce of the flat buffer;
* the per-task outer KL, SSL loss and BatchNorm running-stat copies by ONE all-gather of a byte-packed
  [M_local, B] buffer (rank order along the task axis), so the BatchNorm fold replays all tasks in
  global order and leaves identical buffers on every rank;

and :func:`gather_views` hands every rank all tasks' views, so objectives with queues (MoCo) enqueue
the same keys everywhere. Every rank must run the same number of tasks; a cheap all-gather of
(M, P, B) checks this first and raises the same ValueError on every rank.

BatchNorm rule: a task lives on one rank, so its BatchNorm layers normalise over the task's own 2N
inputs exactly as on one process; ``nn.SyncBatchNorm`` layers are treated as plain BatchNorm inside
the step (:func:`task_local_batchnorm`), and running statistics stay identical through the fold.

A collective that fails (a rank crashed, was killed, or is stuck past the process group's timeout)
raises :class:`RankFailureError` naming what failed, instead of hanging. (With NCCL, whose collectives
are asynchronous, NCCL's watchdog usually tears the process down first; keep the default
``TORCH_NCCL_ASYNC_ERROR_HANDLING``.)

Launch helpers for training scripts: :func:`init_from_env` (torchrun), :func:`is_initialized`,
:func:`rank`, :func:`world_size`, :func:`is_main`, :func:`local_device`, :func:`shard_tasks`, :func:`any_rank`,
:func:`broadcast_state`, :func:`average_gradients`, :func:`shutdown`.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import types
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

# torch._dynamo, imported once a default process group exists, keeps references to that group until the interpreter
# exits (its first import usually comes with the step's first torch.func transform). A gloo group destroyed by
# destroy_process_group() but kept alive to exit can make the rank abort there ("terminate called without an active
# exception"; 10 of 20 two-rank runs here). Imported before the group exists, it holds none. So it is imported here
# in a process that torchrun (or a launcher like it) started, and by init_from_env; elsewhere not, since it costs
# about 1 s and 150 MB. The step itself holds its group weakly.
if "WORLD_SIZE" in os.environ:
    importlib.import_module("torch._dynamo")

Tensor = torch.Tensor

DEFAULT_TIMEOUT = timedelta(minutes=30)
"""Process-group timeout used by :func:`init_from_env`: longer than any rank-0-only phase (evaluation,
checkpointing) during which the other ranks wait at their next collective."""

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailureError(RuntimeError):
    """A collective of a distributed GeSSL step failed: another rank crashed, was killed or timed out."""


# --- the step's collectives -------------------------------------------------------------------------

def reduce_across_ranks(total: Tensor, kl: Tensor, ssl_loss: Tensor, stats: dict[str, Tensor], group):
    """Combine every rank's tasks, in rank order.

    total: this rank's Σ over its tasks of dL_l/dθ [P]. kl, ssl_loss: per task [M_local].
    stats: per-task BatchNorm running-stat copies, name -> [M_local, ...] (may be empty).
    Returns (Σ over all ranks' tasks [P], kl [M_total], ssl_loss [M_total], stats name -> [M_total, ...]),
    identical on every rank. Three collectives: a tiny all-gather of (M, P, B) that checks every rank
    runs the same number of tasks (ValueError on every rank otherwise), one all-reduce of ``total`` and
    one all-gather of kl / ssl_loss / stats packed as bytes (exact for every dtype).
    """
    world = dist.get_world_size(group)
    per_task = [kl, ssl_loss, *stats.values()]
    num_tasks = kl.shape[0]
    for name, tensor in zip(["kl", "ssl_loss", *stats], per_task):
        if tensor.dim() == 0 or tensor.shape[0] != num_tasks:
            raise ValueError(f"{name} must have the task axis first with {num_tasks} tasks, "
                             f"got shape {tuple(tensor.shape)}")
    packed = _pack_rows(per_task, num_tasks)
    _check_same_sizes(group, world, num_tasks, total.numel(), packed.shape[1], total.device)
    total = total.detach().contiguous()  # a collective is not differentiable; never write into a graph
    with _collective("all-reduce of the hypergradient", group):
        dist.all_reduce(total, group=group)
    gathered = torch.empty((world * num_tasks, packed.shape[1]), dtype=torch.uint8, device=packed.device)
    with _collective("all-gather of the per-task losses and BatchNorm statistics", group):
        dist.all_gather_single(gathered, packed, group=group)
    kl, ssl_loss, *stat_values = _unpack_rows(gathered, per_task)
    return total, kl, ssl_loss, dict(zip(stats, stat_values))


def gather_views(views: Tensor, group) -> Tensor:
    """All ranks' views [M_local, 2, N, ...] -> [world * M_local, 2, N, ...] in rank order (one all-gather).

    Every rank must pass views of the same shape (same M, N and input shape); M is checked by
    :func:`reduce_across_ranks`, which GeSSLStep calls first.
    """
    views = views.contiguous()
    world = dist.get_world_size(group)
    gathered = torch.empty((world * views.shape[0], *views.shape[1:]), dtype=views.dtype, device=views.device)
    with _collective("all-gather of the views", group):
        dist.all_gather_single(gathered, views, group=group)
    return gathered


def _check_same_sizes(group, world: int, num_tasks: int, num_params: int, row_bytes: int, device) -> None:
    """One all-gather of (M, P, B) per rank; the same ValueError on every rank if any differs."""
    mine = torch.tensor([num_tasks, num_params, row_bytes], dtype=torch.int64, device=device)
    everyone = torch.empty((world, 3), dtype=torch.int64, device=device)
    with _collective("all-gather of the task counts", group):
        dist.all_gather_single(everyone, mine.unsqueeze(0), group=group)
    tasks, params, rows = everyone.T.tolist()
    if len(set(tasks)) > 1:
        raise ValueError(f"every rank must run the same number of tasks M per step; tasks per rank: {tasks}. "
                         "Shard the M tasks evenly (gessl_ext.distributed.shard_tasks)")
    if len(set(params)) > 1 or len(set(rows)) > 1:
        raise ValueError(f"the ranks hold different models: trainable parameters per rank {params}, "
                         f"bytes of per-task statistics per rank {rows}")


@contextlib.contextmanager
def _collective(what: str, group):
    """Re-raise a failed collective (backend error, timeout) as a RankFailureError that says what happened."""
    try:
        yield
    except RuntimeError as exc:
        me, world = dist.get_rank(group), dist.get_world_size(group)
        raise RankFailureError(
            f"gessl_ext: the {what} failed on rank {me} of {world}: another rank crashed, was killed or is stuck "
            f"past the process group's timeout (set by init_process_group(timeout=...)). Backend error: {exc}"
        ) from exc


def _pack_rows(tensors: list[Tensor], rows: int) -> Tensor:
    """Tensors [rows, ...] of any dtypes -> one uint8 tensor [rows, B] holding their bytes side by side."""
    return torch.cat([t.detach().reshape(rows, -1).contiguous().view(torch.uint8) for t in tensors], dim=1)


def _unpack_rows(packed: Tensor, like: list[Tensor]) -> list[Tensor]:
    """Inverse of :func:`_pack_rows` for any number of rows: tensors shaped [rows, *t.shape[1:]] with t's dtype."""
    rows = packed.shape[0]
    widths = [t[:1].numel() * t.element_size() for t in like]
    return [chunk.contiguous().view(t.dtype).reshape(rows, *t.shape[1:])
            for chunk, t in zip(torch.split(packed, widths, dim=1), like)]


# --- BatchNorm ----------------------------------------------------------------------------------------

@contextlib.contextmanager
def task_local_batchnorm(module: nn.Module):
    """Inside the block, every ``nn.SyncBatchNorm`` under ``module`` computes like ``nn.BatchNorm``.

    GeSSL's tasks each live on one rank and normalise over their own inputs; synchronising batch
    statistics across ranks would mix different tasks (and SyncBatchNorm refuses CPU tensors and
    torch.func transforms). Re-entrant; restores the layers on exit.
    """
    patched = [m for m in module.modules() if isinstance(m, nn.SyncBatchNorm) and "forward" not in vars(m)]
    for m in patched:
        m.forward = types.MethodType(nn.modules.batchnorm._BatchNorm.forward, m)
    try:
        yield
    finally:
        for m in patched:
            del m.forward


# --- helpers for training scripts ---------------------------------------------------------------------

def is_initialized() -> bool:
    """True when a default process group exists."""
    return dist.is_available() and dist.is_initialized()


def rank(group=None) -> int:
    """This process's rank in ``group`` (the default group when None); 0 when not distributed."""
    return dist.get_rank(group) if is_initialized() else 0


def world_size(group=None) -> int:
    """Number of ranks in ``group``; 1 when not distributed."""
    return dist.get_world_size(group) if is_initialized() else 1


def is_main(group=None) -> bool:
    """True on rank 0 (and when not distributed): the rank that logs, checkpoints and evaluates."""
    return rank(group) == 0


def init_from_env(backend: str | None = None, timeout: timedelta = DEFAULT_TIMEOUT) -> bool:
    """Initialise the default process group from torchrun's environment variables.

    Returns False (and does nothing) when the script was not launched by torchrun (no WORLD_SIZE),
    True when the default group is initialised (now or before). backend: "nccl" when CUDA is available,
    else "gloo". With NCCL the current CUDA device is set to LOCAL_RANK. ``timeout`` bounds how long a
    rank waits for the others at a collective before failing with an error.
    """
    if is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ:
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE is set but {', '.join(missing)} not: launch with torchrun, which sets "
                         f"{', '.join(TORCHRUN_VARIABLES)}")
    values = {}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        try:
            values[name] = int(os.environ[name])
        except ValueError:
            raise ValueError(f"environment variable {name} must be an integer, got {os.environ[name]!r}") from None
    if not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise ValueError(f"RANK={values['RANK']} must lie in [0, WORLD_SIZE={values['WORLD_SIZE']})")
    if not isinstance(timeout, timedelta) or timeout.total_seconds() <= 0:
        raise ValueError(f"timeout must be a positive datetime.timedelta, got {timeout!r}")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        count = torch.cuda.device_count()
        if values["LOCAL_RANK"] >= count:
            raise ValueError(f"LOCAL_RANK={values['LOCAL_RANK']} but this node has {count} CUDA devices: "
                             "use --nproc-per-node <= the number of GPUs")
        torch.cuda.set_device(values["LOCAL_RANK"])
    importlib.import_module("torch._dynamo")   # before the group exists (see the note at the top of this module)
    dist.init_process_group(backend, timeout=timeout)
    return True


def local_device() -> torch.device:
    """The device this rank should use: cuda:LOCAL_RANK when CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def shard_tasks(tasks: Tensor, group=None) -> Tensor:
    """This rank's contiguous share of the tasks: [M, ...] -> [M / world, ...] (rank r gets block r).

    Like a DistributedSampler: the ranks get disjoint tasks that together are all M, in rank order,
    which is the order :func:`reduce_across_ranks` gathers them in. M must divide evenly.
    """
    world = world_size(group)
    if tasks.dim() == 0 or tasks.shape[0] % world:
        raise ValueError(f"cannot shard {tuple(tasks.shape)[:1] or 'a 0-dim tensor'} tasks evenly over {world} ranks: "
                         "the number of tasks M must be a multiple of the world size")
    per_rank = tasks.shape[0] // world
    start = rank(group) * per_rank
    return tasks[start:start + per_rank]


def any_rank(flag: bool, group=None, device=None) -> bool:
    """True on every rank if ``flag`` is True on any rank (one tiny all-reduce), e.g. a time budget hit.

    device: where the flag tensor lives (must be a CUDA device for NCCL); CPU by default.
    """
    if not is_initialized():
        return bool(flag)
    value = torch.tensor([int(bool(flag))], device=device)
    with _collective("all-reduce of a stop flag", group):
        dist.all_reduce(value, op=dist.ReduceOp.MAX, group=group)
    return bool(value.item())


def broadcast_state(module: nn.Module, src: int = 0, group=None) -> None:
    """Copy every parameter and buffer of ``module`` from rank ``src`` of ``group`` to all ranks
    (one broadcast per device the module's tensors live on).

    Call after building (and restoring) the model and the GeSSLStep, so every rank starts identical.
    """
    if not is_initialized():
        return
    by_device = {}
    for t in (*module.parameters(), *module.buffers()):
        by_device.setdefault(t.device, []).append(t)
    for members in by_device.values():
        flat = [t.detach().reshape(1, -1) for t in members]
        packed = _pack_rows(flat, 1)
        with _collective("broadcast of the module state", group):
            dist.broadcast(packed, group=group, group_src=src)
        with torch.no_grad():
            for t, value in zip(members, _unpack_rows(packed, flat)):
                t.copy_(value.view(t.shape))


def average_gradients(parameters, group=None) -> None:
    """Replace each ``.grad`` by its mean over the ranks, with one all-reduce of the flattened grads.

    For plain (non-GeSSL) steps whose loss is a mean over each rank's equally sized batch; GeSSLStep
    with a process group already averages its hypergradient.
    """
    if not is_initialized():
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    with _collective("all-reduce of the gradients", group):
        dist.all_reduce(flat, group=group)
    flat /= world_size(group)
    for g, value in zip(grads, torch.split(flat, [g.numel() for g in grads])):
        g.copy_(value.view(g.shape))


def shutdown() -> None:
    """Destroy the default process group if one is initialised (call at the end of a script)."""
    if is_initialized():
        dist.destroy_process_group()
