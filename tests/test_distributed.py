"""GeSSLStep on torch.distributed: 2 gloo ranks on 127.0.0.1, each running half of the M tasks.

Every rank is a process forked from one multiprocessing forkserver that has imported torch, torch._dynamo
and this module once (each rank importing them itself cost ~3 s of CPU, 6 ranks in all); its rank and
rendezvous come in torchrun's environment variables. The worlds start together when the module's first
test asks for them, so their start-up overlaps; every wait is bounded and kills what is left.

* ``equivalence``: for every case, .grad after each of 2 outer steps, the per-task KL, and the full
  state (parameters after SGD, BatchNorm buffers, momentum networks, MoCo queue) equal a single process
  running all M tasks (computed here, without torch.distributed) to 1e-6 relative, float64, and are
  bit-identical across the ranks. Also: unequal M per rank, and the launch helpers.
* ``crash``: rank 1 raises mid-step; rank 0 must fail with RankFailureError instead of hanging.
* ``stall``: rank 1 sleeps mid-step; rank 0 must fail after the 10 s process-group timeout.
"""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import re
import socket
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from torch import nn

from gessl_ext import GeSSLStep, losses
from gessl_ext import distributed as gdist
from gessl_ext.hypergrad import FD

WORLD = 2
TASKS = 4            # M over all ranks; each rank runs TASKS // WORLD
SAMPLES, FEATURES, EMBED = 6, 5, 6
STEPS = 2            # outer steps per case
GROUP_TIMEOUT_S = 10  # process-group timeout of the worlds
WAIT_S = 150         # bound on any world, start-up included (generous: a loaded 2-core machine)

# name -> how the case is built: hypergradient, how the group reaches GeSSLStep, objective, variants
CASES = {
    "fd-group": dict(hypergrad="fd", wrap="group"),
    "itd-group": dict(hypergrad="itd", wrap="group"),
    "hvp-group": dict(hypergrad="hvp", wrap="group"),
    "fd-ddp": dict(hypergrad="fd", wrap="ddp"),
    "itd-ddp": dict(hypergrad="itd", wrap="ddp"),
    "hvp-ddp": dict(hypergrad="hvp", wrap="ddp"),
    "itd-ddp-surrogate": dict(hypergrad="itd", wrap="ddp", surrogate=True),
    "fd-syncbn": dict(hypergrad="fd", wrap="group", sync_bn=True),
    "itd-eval-mode": dict(hypergrad="itd", wrap="group", eval_mode=True),
    "fd-moco": dict(hypergrad="fd", wrap="group", objective="moco"),
    "itd-byol": dict(hypergrad="itd", wrap="ddp", objective="byol"),
}


# --- the shared experiment (run here for the reference and in every rank) ------------------------

def make_views() -> list[torch.Tensor]:
    """STEPS batches of views [TASKS, 2, SAMPLES, FEATURES], float64, fixed seed."""
    generator = torch.Generator().manual_seed(7)
    return list(torch.randn(STEPS, TASKS, 2, SAMPLES, FEATURES, generator=generator, dtype=torch.float64))


def make_objective(name: str):
    if name == "moco":
        # one step enqueues 2·N·M = 48 keys into a ring of 40, so the write wraps around
        return losses.MoCo(EMBED, queue_size=40, temperature=0.3, momentum=0.9,
                           generator=torch.Generator().manual_seed(3)).double()
    if name == "byol":
        return losses.BYOL(EMBED, hidden_dim=8, momentum=0.9).double()
    return losses.SimCLR(temperature=0.5)


def run_case(case: dict, views_per_step: list[torch.Tensor], distributed: bool) -> dict[str, torch.Tensor]:
    """Build the model (BatchNorm, smooth) and GeSSLStep, run STEPS outer steps with SGD; record
    grads, per-task KL and the final state. ``distributed``: shard the tasks over the default group."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(FEATURES, 12), nn.BatchNorm1d(12, momentum=0.3), nn.Tanh(),
                          nn.Linear(12, EMBED)).double()
    if case.get("eval_mode"):
        model.eval()
    if distributed and case.get("sync_bn"):
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    wrapped, group = model, None
    if distributed:
        if case["wrap"] == "ddp":
            wrapped = nn.parallel.DistributedDataParallel(model)
        else:
            group = torch.distributed.group.WORLD
    step = GeSSLStep(wrapped, make_objective(case.get("objective", "simclr")), inner_lr=0.1, inner_steps=2,
                     target_steps=2, hypergrad=FD(radius=1e-3) if case["hypergrad"] == "fd" else case["hypergrad"],
                     process_group=group)
    optimizer = torch.optim.SGD(step.parameters(), lr=0.2, momentum=0.9)
    record = {}
    for index, views in enumerate(views_per_step):
        if distributed:
            views = gdist.shard_tasks(views)
        optimizer.zero_grad(set_to_none=True)
        batchnorm = gdist.task_local_batchnorm(step) if case.get("sync_bn") else contextlib.nullcontext()
        with batchnorm:
            if case.get("surrogate"):
                step.surrogate(views).backward()
            else:
                out = step(views)
                assert not out.skipped
                record[f"kl{index}"] = out.kl
        record[f"grad{index}"] = torch.cat([p.grad.reshape(-1) for p in step.parameters() if p.requires_grad])
        optimizer.step()
    record.update({f"state.{name}": value for name, value in step.state_dict().items()})
    return record


# --- the worlds (rank side) ----------------------------------------------------------------------

class InjectedFailure(Exception):
    pass


class FailingLoss(nn.Module):
    """SimCLR whose ``fail_on_call``-th call on rank 1 raises (crash) or sleeps (stall)."""

    def __init__(self, mode: str, fail_on_call: int = 2):
        super().__init__()
        self.loss, self.mode, self.calls, self.fail_on_call = losses.SimCLR(temperature=0.5), mode, 0, fail_on_call

    def forward(self, z1, z2):
        self.calls += 1
        if gdist.rank() == 1 and self.calls == self.fail_on_call:
            if self.mode == "crash":
                raise InjectedFailure("injected failure on rank 1")
            time.sleep(10 * WAIT_S)
        return self.loss.pair_loss(z1, z2)


def world_equivalence() -> dict:
    results = {name: run_case(case, make_views(), distributed=True) for name, case in CASES.items()}
    torch.manual_seed(5)
    model = nn.Linear(3, 2)
    if gdist.rank() == 1:
        nn.init.constant_(model.weight, 9.0)
        model.weight.grad = torch.full_like(model.weight, 3.0)
    else:
        model.weight.grad = torch.full_like(model.weight, 1.0)
    gdist.broadcast_state(model)
    gdist.average_gradients([model.weight])
    results["helpers"] = {"rank": gdist.rank(), "world_size": gdist.world_size(), "is_main": gdist.is_main(),
                          "any_rank": gdist.any_rank(gdist.rank() == 1), "none_rank": gdist.any_rank(False),
                          "broadcast_weight": model.weight.detach().clone(), "mean_grad": model.weight.grad.clone()}
    views = make_views()[0][: 2 if gdist.rank() == 0 else 1]
    step = GeSSLStep(nn.Linear(FEATURES, EMBED).double(), losses.SimCLR(), process_group=torch.distributed.group.WORLD)
    try:
        step(views)
        results["unequal_tasks"] = "no error"
    except ValueError as exc:
        results["unequal_tasks"] = str(exc)
    return results


def world_failure(mode: str) -> dict:
    torch.manual_seed(11)
    model = nn.Sequential(nn.Linear(FEATURES, 12), nn.Tanh(), nn.Linear(12, EMBED)).double()
    step = GeSSLStep(model, FailingLoss(mode), inner_lr=0.1, inner_steps=1, target_steps=1, hypergrad="itd",
                     process_group=torch.distributed.group.WORLD)
    try:
        step(gdist.shard_tasks(make_views()[0]))
    except Exception as exc:  # the outcome is what the test checks
        return {"error": type(exc).__name__, "message": str(exc)}
    return {"error": None}


def worker(world: str, out_dir: str, env: dict[str, str], log_path: str) -> None:
    """One rank: ``env`` (torchrun's variables) joins the environment, stdout and stderr go to ``log_path``."""
    os.environ.update(env)
    log = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    torch.set_num_threads(1)
    assert gdist.init_from_env(backend="gloo", timeout=timedelta(seconds=GROUP_TIMEOUT_S))
    if world == "equivalence":
        torch.save(world_equivalence(), Path(out_dir) / f"{world}-rank{gdist.rank()}.pt")
        gdist.shutdown()
        return
    result = world_failure(world)
    (Path(out_dir) / f"{world}-rank{gdist.rank()}.json").write_text(json.dumps(result))
    if result["error"] == InjectedFailure.__name__:
        raise SystemExit(3)  # the crashing rank dies without a goodbye, as a real failure would
    if result["error"] == "RankFailureError":
        # gloo cannot tear down a group whose collective timed out while the peer is still connected: its
        # destructor may call std::terminate at interpreter exit. A survivor reports and leaves without it.
        os._exit(0)


# --- the tests (pytest side) ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Worlds:
    """Launches each world's ranks (forked from a forkserver that preloads torch and this module);
    ``wait(world)`` bounds and collects them."""

    def __init__(self, out_dir: Path):
        self.out_dir, self.procs, self.started = out_dir, {}, time.monotonic()
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["torch", "torch._dynamo", __name__])  # torch.optim's first use: _dynamo
        for world in ("stall", "crash", "equivalence"):
            port = free_port()
            self.procs[world] = []
            for rank in range(WORLD):
                env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "LOCAL_RANK": str(rank), "WORLD_SIZE": str(WORLD), "GLOO_SOCKET_IFNAME": "lo",
                       "CUDA_VISIBLE_DEVICES": ""}  # one intra-op thread: worker() sets it
                proc = context.Process(target=worker, args=(world, str(out_dir), env,
                                                            str(out_dir / f"{world}-rank{rank}.log")), daemon=True)
                proc.start()
                self.procs[world].append(proc)

    def wait(self, world: str, ranks=range(WORLD)) -> list[int]:
        """Exit codes of ``ranks`` of ``world``; kills the world and fails if they outlive WAIT_S."""
        codes = []
        for rank in ranks:
            proc = self.procs[world][rank]
            proc.join(timeout=max(1.0, WAIT_S - (time.monotonic() - self.started)))
            if proc.exitcode is None:
                self.kill(world)
                pytest.fail(f"world {world!r} rank {rank} still running after {WAIT_S} s (hang):\n"
                            f"{self.log(world, rank)}")
            codes.append(proc.exitcode)
        return codes

    def kill(self, world: str) -> None:
        for proc in self.procs[world]:
            if proc.exitcode is None:
                proc.kill()
                proc.join()

    def log(self, world: str, rank: int) -> str:
        return (self.out_dir / f"{world}-rank{rank}.log").read_text()[-3000:]


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    launched = Worlds(tmp_path_factory.mktemp("distributed"))
    yield launched
    for world in launched.procs:
        launched.kill(world)


@pytest.fixture(scope="module")
def rank_results(worlds):
    codes = worlds.wait("equivalence")
    assert codes == [0] * WORLD, "\n".join(worlds.log("equivalence", r) for r in range(WORLD))
    return [torch.load(worlds.out_dir / f"equivalence-rank{r}.pt", weights_only=False) for r in range(WORLD)]


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-6) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, what
    if not expected.is_floating_point():
        assert torch.equal(actual, expected), f"{what}: {actual} != {expected}"
        return
    error = torch.linalg.vector_norm(actual - expected).item()
    scale = torch.linalg.vector_norm(expected).item()
    assert error <= rtol * scale + 1e-12, f"{what}: relative error {error / max(scale, 1e-300):.3g} > {rtol}"


@pytest.mark.parametrize("name", list(CASES))
def test_ranks_match_one_process_running_all_tasks(rank_results, name):
    reference = run_case(CASES[name], make_views(), distributed=False)
    # keys match the reference: the sync-bn model's state names equal the BatchNorm model's
    for rank, results in enumerate(rank_results):
        assert results[name].keys() == reference.keys()
        for key, expected in reference.items():
            assert_relative(results[name][key], expected, f"{name} rank {rank} {key}")
    grads = [reference[f"grad{i}"] for i in range(STEPS)]
    assert all(torch.linalg.vector_norm(g) > 1e-6 for g in grads)  # the comparison is not of zeros
    for key, value in rank_results[0][name].items():
        assert torch.equal(value, rank_results[1][name][key]), f"{name}: {key} differs between the ranks"


def test_moco_queue_and_byol_target_network_were_updated(rank_results):
    # guards the state comparison above against comparing untouched initial values
    initial_moco = make_objective("moco")
    moco_state = rank_results[0]["fd-moco"]
    assert int(moco_state["state.ssl_loss.queue_ptr"]) == (STEPS * TASKS * 2 * SAMPLES) % 40
    assert not torch.allclose(moco_state["state.ssl_loss.queue"], initial_moco.queue.double())
    byol = rank_results[0]["itd-byol"]
    torch.manual_seed(11)
    initial_weight = nn.Linear(FEATURES, 12).double().weight.detach()
    target_weight = byol["state.ssl_loss.momentum_network.0.weight"]
    assert not torch.allclose(target_weight, initial_weight)
    assert not torch.allclose(target_weight, byol["state.model.0.weight"])


def test_unequal_task_counts_raise_the_same_error_on_every_rank(rank_results):
    for results in rank_results:
        assert "same number of tasks" in results["unequal_tasks"] and "[2, 1]" in results["unequal_tasks"]


def test_launch_helpers_inside_a_world(rank_results):
    for rank, results in enumerate(rank_results):
        helpers = results["helpers"]
        assert (helpers["rank"], helpers["world_size"], helpers["is_main"]) == (rank, WORLD, rank == 0)
        assert helpers["any_rank"] is True and helpers["none_rank"] is False
        torch.manual_seed(5)
        assert torch.equal(helpers["broadcast_weight"], nn.Linear(3, 2).weight.detach())  # rank 0's, not rank 1's 9s
        assert torch.equal(helpers["mean_grad"], torch.full((2, 3), 2.0))  # mean of 1 and 3


def test_crashed_rank_makes_the_others_fail_instead_of_hanging(worlds):
    codes = worlds.wait("crash")
    survivor, crashed = (json.loads((worlds.out_dir / f"crash-rank{r}.json").read_text()) for r in range(WORLD))
    assert codes[1] == 3 and crashed["error"] == "InjectedFailure", worlds.log("crash", 1)
    assert survivor["error"] == "RankFailureError", worlds.log("crash", 0)
    assert "another rank crashed" in survivor["message"] and "rank 0 of 2" in survivor["message"]
    # gloo noticed the dead peer (closed or reset, as the exit left its socket), no timeout needed
    assert re.search("Connection (closed|reset) by peer", survivor["message"]), survivor["message"]
    assert "Timed out" not in survivor["message"]


def test_stuck_rank_makes_the_others_fail_after_the_group_timeout(worlds):
    codes = worlds.wait("stall", ranks=[0])
    worlds.kill("stall")
    survivor = json.loads((worlds.out_dir / "stall-rank0.json").read_text())
    assert codes == [0] and survivor["error"] == "RankFailureError", worlds.log("stall", 0)
    assert "past the process group's timeout" in survivor["message"]
    assert f"Timed out waiting {GROUP_TIMEOUT_S * 1000}ms" in survivor["message"]  # gloo's wording of the timeout


# --- helpers without a process group ---------------------------------------------------------------

def test_helpers_without_a_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert (gdist.rank(), gdist.world_size(), gdist.is_main()) == (0, 1, True)
    assert gdist.init_from_env() is False and not gdist.is_initialized()
    tasks = torch.randn(3, 2)
    assert torch.equal(gdist.shard_tasks(tasks), tasks)
    assert gdist.any_rank(True) is True and gdist.any_rank(False) is False
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError, match="RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT not"):
        gdist.init_from_env()
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "1")
    with pytest.raises(ValueError, match=r"RANK=2 must lie in \[0, WORLD_SIZE=2\)"):
        gdist.init_from_env()
    assert not gdist.is_initialized()


def test_step_does_not_keep_a_destroyed_group_alive(tmp_path):
    """In a fresh interpreter started as torchrun starts a rank (WORLD_SIZE set), as a training script runs: import
    gessl_ext, create the group, step, destroy it. Afterwards nothing holds the group (a gloo group kept alive to
    interpreter exit made ranks abort there, "terminate called without an active exception"), and a step called
    after destroy_process_group() says so."""
    import subprocess
    import sys

    script = f"""
import gc, weakref, torch
from torch import nn
from gessl_ext import GeSSLStep, losses
torch.distributed.init_process_group("gloo", init_method="file://{tmp_path / 'store'}", rank=0, world_size=1)
group = torch.distributed.group.WORLD
step = GeSSLStep(nn.Linear(5, 6).double(), losses.SimCLR(), process_group=group, target_steps=1)
views = torch.randn(1, 2, 4, 5, dtype=torch.float64)
step(views)
alive = weakref.ref(group)
del group
torch.distributed.destroy_process_group()
gc.collect()
assert alive() is None, "the destroyed group is still referenced"
try:
    step(views)
except RuntimeError as exc:
    assert "process group has been destroyed" in str(exc), exc
else:
    raise AssertionError("a step after destroy_process_group() ran")
"""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1]),
           "WORLD_SIZE": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_shard_tasks_rejects_uneven_splits(monkeypatch):
    monkeypatch.setattr(gdist, "world_size", lambda group=None: 3)
    monkeypatch.setattr(gdist, "rank", lambda group=None: 2)
    tasks = torch.arange(6)
    assert torch.equal(gdist.shard_tasks(tasks), torch.tensor([4, 5]))
    with pytest.raises(ValueError, match="multiple of the world size"):
        gdist.shard_tasks(torch.arange(4))


def test_byte_packing_round_trips_mixed_dtypes():
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(3, generator=generator, dtype=torch.float64),
               torch.randn(3, 2, 2, generator=generator).to(torch.bfloat16),
               torch.tensor([2**60 + 1, -5, 7], dtype=torch.int64)]
    packed = gdist._pack_rows(tensors, 3)
    assert packed.shape == (3, 8 + 2 * 4 + 8) and packed.dtype == torch.uint8
    doubled = gdist._unpack_rows(torch.cat([packed, packed]), tensors)
    for original, restored in zip(tensors, doubled):
        assert torch.equal(restored, torch.cat([original, original]))


def test_task_local_batchnorm_makes_syncbatchnorm_compute_like_batchnorm():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double()
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3)).double())
    synced.load_state_dict(plain.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    with gdist.task_local_batchnorm(synced), gdist.task_local_batchnorm(synced):  # re-entrant
        assert "forward" in vars(synced[1])
        out = synced(x)
    assert "forward" not in vars(synced[1])
    torch.testing.assert_close(out, plain(x), rtol=0, atol=0)
    torch.testing.assert_close(synced[1].running_mean, plain[1].running_mean, rtol=0, atol=0)
