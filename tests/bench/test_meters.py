"""The device-independent meters of bench/ (issue 16): memory_meter.MemoryMeter, dispatch_counters.OpCounter and
SyncCounter, and the bench_memory.py script that uses them."""
import contextlib
import io
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

from gessl_ext import GeSSLStep, losses

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import bench_memory  # noqa: E402
from dispatch_counters import OpCounter, SyncCounter  # noqa: E402
from memory_meter import MemoryMeter  # noqa: E402

HERE = str(Path(__file__).resolve().parent)


@pytest.fixture
def one_thread():
    """Reductions and matmuls allocate no per-thread scratch with one thread (for the allocator comparison)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def random_sizes(count, seed):
    return [int(n) for n in torch.randint(1, 5000, (count,), generator=torch.Generator().manual_seed(seed))]


def test_peak_of_a_known_program_is_exact():
    n = random_sizes(6, seed=1)
    existing = torch.empty(n[5] + 2)
    with MemoryMeter() as meter:
        a = torch.empty(n[0])                            # live: 4 n0
        b = torch.empty(n[1], dtype=torch.float64)       # 4 n0 + 8 n1
        del a                                            # 8 n1
        c = torch.empty(n[2])                            # 8 n1 + 4 n2
        view = c[1:]                                     # a view: nothing new
        del c                                            # the view keeps c's storage
        view.mul_(2)                                     # in place: nothing new
        b.resize_(n[1] + n[0] + n[3])                    # grows by 8 (n0 + n3): the peak
        existing.add_(1)                                 # an entry-time tensor, seen by an op, ...
        del existing                                     # ... and freed: live drops below the baseline
        constant = torch.tensor([1.0, 2.0])              # made outside the dispatcher, then lifted: 8 bytes
    peak = 8 * (n[1] + n[0] + n[3]) + 4 * n[2]
    assert meter.peak_bytes == peak
    assert meter.end_bytes == peak - 4 * (n[5] + 2) + 8
    assert meter.allocated_bytes == 4 * n[0] + 8 * n[1] + 4 * n[2] + 8 * (n[0] + n[3]) + 8
    assert (view.numel(), b.numel(), constant.numel()) == (n[2] - 1, n[1] + n[0] + n[3], 2)
    assert [(a.op, a.nbytes) for a in meter.live_at_peak()] == sorted(
        [("aten.empty.memory_format", 8 * (n[1] + n[0] + n[3])), ("aten.empty.memory_format", 4 * n[2])],
        key=lambda row: -row[1])


def allocator_peak(fn):
    """(peak, end) bytes from the CPU allocator's own allocation events (torch.profiler, profile_memory)."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = []

    def walk(event):
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
        for child in event.children:
            walk(child)

    for root in prof.profiler.kineto_results.experimental_event_tree():
        walk(root)
    live = peak = 0
    for _, size in sorted(events):
        live += size
        peak = max(peak, live)
    return peak, live


def test_meter_matches_the_allocator_under_autograd_and_vmap(one_thread):
    """Without kernel scratch (matmul, pointwise, reductions on one thread) the meter's peak is the allocator's."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(48, 24, dtype=torch.float64, generator=generator, requires_grad=True)
    inputs = torch.randn(4, 6, 48, dtype=torch.float64, generator=generator)

    def loss(w, x):
        return (x @ w).tanh().pow(2).sum()

    def autograd_step():
        loss(weight, inputs.flatten(0, 1)).backward()

    def shared_weight_per_task_grads():
        return vmap(grad(loss), in_dims=(None, 0))(weight.detach(), inputs)

    def per_task_weights():
        per_task = weight.detach().expand(4, 48, 24).clone()
        return vmap(grad(loss))(per_task, inputs).sum(0)

    for program in (autograd_step, shared_weight_per_task_grads, per_task_weights):
        weight.grad = None
        with MemoryMeter() as meter:
            program()
        weight.grad = None
        assert (meter.peak_bytes, meter.end_bytes) == allocator_peak(program), program.__name__


def test_meter_under_vmap_counts_the_batched_tensors():
    m, n = 5, random_sizes(1, seed=3)[0]
    x = torch.randn(m, n, dtype=torch.float64)
    with MemoryMeter() as meter:
        y = vmap(lambda row: row.exp() * 2)(x)  # exp [m, n] lives until the product [m, n] exists
    assert meter.peak_bytes == 2 * m * n * 8 and meter.end_bytes == m * n * 8
    assert torch.equal(y, x.exp() * 2)


@pytest.mark.cuda
def test_meter_gives_the_same_peak_on_cpu_and_cuda():
    """The same program (conv, ReLU, pool, linear; forward + backward) on both devices: equal peaks, and CUDA's
    allocator peak (which adds cuDNN workspaces and 512-byte rounding) is not below the meter's. (BatchNorm is
    left out: cuDNN's training kernel may return a reserve-space tensor that the CPU kernel does not.)"""
    peaks = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(5)
        model = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                              nn.Linear(16 * 7 * 7, 10)).to(device)
        x = torch.randn(32, 3, 16, 16, device=device)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        with MemoryMeter() as meter:
            F.cross_entropy(model(x), torch.arange(32, device=device) % 10).backward()
        peaks[device] = meter.peak_bytes
        if device == "cuda":
            torch.cuda.synchronize()
            assert torch.cuda.max_memory_allocated() - before >= meter.peak_bytes
    assert peaks["cpu"] == peaks["cuda"] > 0


def tiny_model():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 4 * 4, 5)).double()


def step_grads(method, meters):
    torch.manual_seed(4)
    model = tiny_model()
    views = torch.randn(3, 2, 4, 1, 6, 6, dtype=torch.float64)
    step = GeSSLStep(model, losses.SimCLR(), inner_steps=2, target_steps=2, hypergrad=method, task_batching="vmap",
                     warn_nonsmooth=False)
    with contextlib.ExitStack() as stack:
        for meter in meters:
            stack.enter_context(meter)
        out = step(views)
    return out, [p.grad for p in model.parameters()]


@pytest.mark.parametrize("method", ["fd", "itd"])
def test_meters_do_not_change_the_step(method):
    (plain_out, plain_grads) = step_grads(method, [])
    meters = [MemoryMeter(breakdown=True), OpCounter(), SyncCounter()]
    (out, grads) = step_grads(method, meters)
    assert all(torch.equal(a, b) for a, b in zip(grads, plain_grads))
    assert torch.equal(out.loss, plain_out.loss) and torch.equal(out.kl, plain_out.kl)
    # the same step measured again: same peak (deterministic; nothing accumulates between steps)
    again = MemoryMeter()
    step_grads(method, [again])
    assert again.peak_bytes == meters[0].peak_bytes > 0
    # every metered .grad is live after the step: at least P float64 values
    assert meters[0].end_bytes >= sum(g.numel() for g in grads) * 8


def test_op_counter_counts_kernels_and_aliasing_ops():
    x = torch.randn(6, 4)
    out = torch.empty(6, 4)
    with OpCounter() as ops:
        y = x + 1                    # kernel (fresh storage)
        flat = y.view(-1)            # aliasing
        flat.mul_(2)                 # kernel (in place)
        torch.add(x, 1, out=out)     # kernel (out=)
        y.detach()                   # aliasing
        y.t()                        # aliasing
    assert ops.counts == {"aten.add.Tensor": 1, "aten.view.default": 1, "aten.mul_.Tensor": 1,
                          "aten.add.out": 1, "aten.detach.default": 1, "aten.t.default": 1}
    assert (ops.total, ops.kernels, ops.aliasing) == (6, 3, 3)


def test_op_counter_sees_one_batched_op_per_vmapped_op_and_conv_formats():
    x = torch.randn(7, 5)
    with OpCounter() as batched:
        vmap(torch.sin)(x)
    with OpCounter() as looped:
        for row in x:
            torch.sin(row)
    assert batched.counts["aten.sin.default"] == 1 and looped.counts["aten.sin.default"] == 7
    conv = nn.Conv2d(4, 6, 3)
    image = torch.randn(2, 4, 8, 8)
    with OpCounter() as ops:
        conv(image.contiguous(memory_format=torch.channels_last))
        conv(image)
    assert ops.conv_input_formats == {("convolution", "channels_last"): 1, ("convolution", "contiguous"): 1}


def test_sync_counter_finds_each_sync_and_its_site():
    x = torch.randn(10, dtype=torch.float64)
    scalar = x.sum()
    with SyncCounter(roots=(HERE,)) as syncs:
        scalar.item()
        float(scalar)
        bool(scalar > 0)
        x.nonzero()
        x[x > 0]                                           # boolean mask: data-dependent shape
        x[torch.tensor([1, 2])]                            # integer indices: no sync
        repeats = (x > 0).long() + 1
        torch.repeat_interleave(x, repeats)                # repeats from the data: data-dependent shape
        torch.repeat_interleave(x, repeats, output_size=int(repeats.sum()))  # size given: only the sum's read
        x * 2                                              # no sync
        seed = torch.randint(10, ())                       # a constant made inside: no device data ...
        int(seed + 1)                                      # ... so reading it is a host read
    reasons = [e.reason for e in syncs.events]
    assert syncs.count == 7 and reasons.count("reads a tensor value into Python") == 4
    assert [e.op for e in syncs.events][3:] == ["aten.nonzero.default", "aten.index.Tensor",
                                                 "aten.repeat_interleave.Tensor", "aten._local_scalar_dense.default"]
    lines = [int(re.search(r"test_meters.py:(\d+)", e.site).group(1)) for e in syncs.events]
    assert lines == sorted(lines) and len(set(lines)) == 7
    assert [e.op for e in syncs.host_reads] == ["aten._local_scalar_dense.default"]
    assert int(re.search(r"test_meters.py:(\d+)", syncs.host_reads[0].site).group(1)) > lines[-1]


def test_the_step_syncs_once_at_most():
    """Issue 16: no host-device sync inside a step; the final non-finite check may sync once."""
    for method in ("fd", "hvp", "itd", "first_order"):
        syncs = SyncCounter()
        step_grads(method, [syncs])
        assert syncs.count <= 1, (method, syncs.by_site())


def markdown_table(text, header_start):
    """Rows (lists of cell strings) of the markdown table whose header line starts with ``header_start``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def test_bench_memory_quick_mode():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        bench_memory.main(["--quick", "--breakdown", "3", "--channels-last", "--threads", "1"])
    text = buffer.getvalue()
    memory = markdown_table(text, "| workload | hypergrad | plain union peak MiB")
    assert [row[1] for row in memory] == list(bench_memory.METHODS)
    for row in memory:
        plain, step, ratio = float(row[2]), float(row[3]), float(row[4])
        assert abs(step / plain - ratio) <= 0.006 + 0.01 * ratio
    passes = bench_memory.QUICK.ideal_passes
    for row in markdown_table(text, "| workload | hypergrad | plain step kernels"):
        plain, scaled, step, ratio = int(row[2]), int(row[3]), int(row[4]), float(row[5])
        assert scaled == passes * plain and abs(step / scaled - ratio) < 0.006
    for row in markdown_table(text, "| workload | hypergrad | syncs per step"):
        assert int(row[2]) == sum(int(n) for n in re.findall(r"(\d+)× `", row[3]))
    assert text.count("largest storage groups live at the peak") == len(bench_memory.METHODS)
    assert "channels-last model and views" in text


def test_layer_sized_tensors_are_told_from_activations():
    conv, linear = torch.Size([64, 32, 3, 3]), torch.Size([128, 9216])
    shapes, m = [conv, linear], 8
    assert bench_memory.is_layer_sized((m * 64, 32, 3, 3), m * conv.numel(), shapes, m)    # grouped-conv gradient
    assert bench_memory.is_layer_sized((m, 128, 9216), m * linear.numel(), shapes, m)      # per-task weights
    assert bench_memory.is_layer_sized((m, 9216, 128), m * linear.numel(), shapes, m)      # transposed
    assert not bench_memory.is_layer_sized((m, 32, 64, 24, 24), m * linear.numel(), shapes, m)  # same numel
    assert not bench_memory.is_layer_sized((3 * 64, 32, 3, 3), 3 * conv.numel(), shapes, m)  # not 1 or M tasks
