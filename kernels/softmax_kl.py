"""Fused pair-classification head + KL(p_target || p_current), forward and backward, in Triton.

Math (per task b; x = z1[b], y = z2[b] are [N, D] rows, r = 1 / max(||row||, norm_eps)):

    S[i, k]   = (x_i . y_k) * rx_i * ry_k / tau            current logits, never stored
    KL1_i     = sum_k p1t[i, k] * (log p1t[i, k] - (S[i, k] - lse_row(S)_i))      view-1 rows
    KL2_k     = sum_i p2t[k, i] * (log p2t[k, i] - (S[i, k] - lse_col(S)_k))      view-2 rows
    loss_b    = (sum_i KL1_i + sum_k KL2_k) / (2N)

Direction 2 is direction 1 with (z1, t1) and (z2, t2) swapped, so one forward kernel runs twice.
The target is given by embeddings t1, t2: its logits T are recomputed tile by tile like S. The
forward keeps, per row, the current and the target log-sum-exp, so the backward needs no N x N
buffer either:

    dloss/dS[i, k] = c_b * (softmax_row(S)[i, k] - p1t[i, k] + softmax_col(S)[i, k] - p2t[k, i])

with c_b = grad_b / (2N). The backward kernel produces dx for one side from tiles of S; it runs a
second time with the sides swapped for dy. Dots take the raw inputs (bf16/fp16 stay on tensor cores,
fp32 uses 3xTF32) and the inverse norms scale the fp32 result. Through the normalisation,
dx_i = rx_i/tau * sum_k G_ik ry_k y_k - q_i (sum_k G_ik S_ik) x_i with q_i = rx_i^2 (0 where the norm
was clamped to norm_eps): a difference of two terms of size ~ rx_i * |dloss/da_i|. Its rounding error
is relative to that size, not to dx; at D = 1 the two terms are equal (the cosines are +-1 whatever x
is), the exact dx is 0 and the kernel returns rounding noise of order eps_fp32 * rx_i * |dloss/da_i|
(tests/ops/ops_testing.py: gradient_scale).

Launchers take [B, N, D] tensors; every output is preallocated NaN so an unwritten element shows.
"""
import contextlib

import torch
import triton
import triton.language as tl

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_TASKS = 65535  # tasks are the second grid dimension


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ b (acc None: a @ b) with fp32 accumulation; PRECISION applies to fp32 operands only.

    UPCAST feeds fp32 copies of half-width operands (the same products) for the interpreter."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        product = tl.dot(a, b, acc, input_precision=PRECISION)
    else:
        product = tl.dot(a, b, acc)
    return product


@triton.jit
def _scaled_logits(a_tile, bT_ptrs, bT_mask, ra, rb, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """(a_tile @ b^T) * ra[:, None] * rb[None, :] in fp32; b^T loaded as a [BLOCK_D, BLOCK_N] tile."""
    bT = tl.load(bT_ptrs, mask=bT_mask, other=0.0)
    return _dot(a_tile, bT, None, PRECISION, UPCAST) * ra[:, None] * rb[None, :], bT


@triton.jit
def _softmax_kl_fwd_kernel(
    x_ptr, y_ptr, rx_ptr, ry_ptr,                # current sides [B, N, D] and their inverse norms [B, N]
    ta_ptr, tb_ptr, rta_ptr, rtb_ptr,            # target embeddings (like x, y) and their inverse norms
    kl_ptr, lse_ptr, tlse_ptr, stat_stride_b,    # per-row outputs, [B, N] views
    N, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    side_offset = b * N * D
    row_tile_offs = rows[:, None] * D + d_offs[None, :]
    row_tile_mask = row_mask[:, None] & d_mask[None, :]

    x = tl.load(x_ptr + side_offset + row_tile_offs, mask=row_tile_mask, other=0.0)
    rx = tl.load(rx_ptr + b * N + rows, mask=row_mask, other=0.0) * inv_tau
    tx = tl.load(ta_ptr + side_offset + row_tile_offs, mask=row_tile_mask, other=0.0)
    rtx = tl.load(rta_ptr + b * N + rows, mask=row_mask, other=0.0) * inv_tau

    m_cur = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of S
    l_cur = tl.zeros([BLOCK_M], tl.float32)                # running sum exp(S - m_cur)
    m_tgt = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running max of T
    l_tgt = tl.zeros([BLOCK_M], tl.float32)                # running sum exp(T - m_tgt)
    cross = tl.zeros([BLOCK_M], tl.float32)                # running sum exp(T - m_tgt) * (T - S)

    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        valid = row_mask[:, None] & col_mask[None, :]
        colT_offs = cols[None, :] * D + d_offs[:, None]
        colT_mask = col_mask[None, :] & d_mask[:, None]
        ry = tl.load(ry_ptr + b * N + cols, mask=col_mask, other=0.0)
        s, _ = _scaled_logits(x, y_ptr + side_offset + colT_offs, colT_mask, rx, ry, PRECISION, UPCAST)
        s = tl.where(col_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_cur, tl.max(s, 1))
        l_cur = l_cur * tl.exp(m_cur - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_cur = m_new

        rty = tl.load(rtb_ptr + b * N + cols, mask=col_mask, other=0.0)
        t, _ = _scaled_logits(tx, tb_ptr + side_offset + colT_offs, colT_mask, rtx, rty, PRECISION, UPCAST)
        t = tl.where(col_mask[None, :], t, float("-inf"))
        mt_new = tl.maximum(m_tgt, tl.max(t, 1))
        rescale = tl.exp(m_tgt - mt_new)
        w = tl.exp(t - mt_new[:, None])
        l_tgt = l_tgt * rescale + tl.sum(w, 1)
        cross = cross * rescale + tl.sum(w * tl.where(valid, t - s, 0.0), 1)
        m_tgt = mt_new

    lse_cur = m_cur + tl.log(l_cur)
    lse_tgt = m_tgt + tl.log(l_tgt)
    kl = cross / l_tgt - lse_tgt + lse_cur    # sum_k p_t (T - lse_tgt - S + lse_cur)
    stat_offs = b * stat_stride_b + rows
    tl.store(kl_ptr + stat_offs, kl, mask=row_mask)
    tl.store(lse_ptr + stat_offs, lse_cur, mask=row_mask)
    tl.store(tlse_ptr + stat_offs, lse_tgt, mask=row_mask)


@triton.jit
def _softmax_kl_bwd_kernel(
    x_ptr, y_ptr, rx_ptr, ry_ptr, qx_ptr,        # qx: rx^2, or 0 where the norm was clamped
    ta_ptr, tb_ptr, rta_ptr, rtb_ptr,            # target embeddings and their inverse norms
    lse_x_ptr, lse_y_ptr, tlse_x_ptr, tlse_y_ptr, stat_stride_b,
    coef_ptr, dx_ptr,                            # coef [B] = grad_loss / (2N); dx [B, N, D]
    N, D, inv_tau,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, SPLIT_H: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < N
    d_offs = tl.arange(0, BLOCK_D)
    d_mask = d_offs < D
    side_offset = b * N * D
    row_tile_offs = rows[:, None] * D + d_offs[None, :]
    row_tile_mask = row_mask[:, None] & d_mask[None, :]

    x = tl.load(x_ptr + side_offset + row_tile_offs, mask=row_tile_mask, other=0.0)
    rx = tl.load(rx_ptr + b * N + rows, mask=row_mask, other=0.0) * inv_tau
    qx = tl.load(qx_ptr + b * N + rows, mask=row_mask, other=0.0)
    lse_x = tl.load(lse_x_ptr + b * stat_stride_b + rows, mask=row_mask, other=0.0)
    tlse_x = tl.load(tlse_x_ptr + b * stat_stride_b + rows, mask=row_mask, other=0.0)
    coef = tl.load(coef_ptr + b)
    tx = tl.load(ta_ptr + side_offset + row_tile_offs, mask=row_tile_mask, other=0.0)
    rtx = tl.load(rta_ptr + b * N + rows, mask=row_mask, other=0.0) * inv_tau

    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)   # sum_k G_ik ry_k y_k
    gs = tl.zeros([BLOCK_M], tl.float32)             # sum_k G_ik S_ik
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        valid = row_mask[:, None] & col_mask[None, :]
        colT_offs = cols[None, :] * D + d_offs[:, None]
        colT_mask = col_mask[None, :] & d_mask[:, None]
        ry = tl.load(ry_ptr + b * N + cols, mask=col_mask, other=0.0)
        lse_y = tl.load(lse_y_ptr + b * stat_stride_b + cols, mask=col_mask, other=0.0)
        tlse_y = tl.load(tlse_y_ptr + b * stat_stride_b + cols, mask=col_mask, other=0.0)
        s, yT = _scaled_logits(x, y_ptr + side_offset + colT_offs, colT_mask, rx, ry, PRECISION, UPCAST)
        p_x = tl.exp(s - lse_x[:, None])
        p_y = tl.exp(s - lse_y[None, :])
        rty = tl.load(rtb_ptr + b * N + cols, mask=col_mask, other=0.0)
        t, _ = _scaled_logits(tx, tb_ptr + side_offset + colT_offs, colT_mask, rtx, rty, PRECISION, UPCAST)
        g = p_x + p_y - tl.exp(t - tlse_x[:, None]) - tl.exp(t - tlse_y[None, :])
        g = tl.where(valid, g * coef, 0.0)
        gs += tl.sum(g * s, 1)
        h = g * ry[None, :]
        if SPLIT_H:
            # bf16/fp16 operands: h = h_hi + h_lo in two half-width dots, so the rounding of h does not
            # survive the cancellation in sum_k h_ik y_k (sum_k G_ik = 0 up to the target mass).
            h_hi = h.to(yT.dtype)
            h_lo = (h - h_hi.to(tl.float32)).to(yT.dtype)
            acc = _dot(h_hi, tl.trans(yT), acc, PRECISION, UPCAST)
            acc = _dot(h_lo, tl.trans(yT), acc, PRECISION, UPCAST)
        else:
            acc = _dot(h, tl.trans(yT), acc, PRECISION, UPCAST)

    dx = acc * rx[:, None] - (qx * gs)[:, None] * x.to(tl.float32)
    tl.store(dx_ptr + side_offset + row_tile_offs, dx.to(dx_ptr.dtype.element_ty), mask=row_tile_mask)


# BLOCK_D (padded feature width) -> (BLOCK_M, BLOCK_N, num_warps, num_stages) for
# (forward, half-width inputs), (forward, fp32), (backward, half-width), (backward, fp32).
# Chosen by compiling every kernel variant for sm_90 with Triton's AOT compiler (no GPU here): at most
# 163 KB of shared memory (sm_80's limit; tests/ops/test_softmax_kl_compile.py checks it) and the fewest
# register spills (fp32 with d > 256 still spills heavily). Not yet timed on a GPU.
_TILES = {
    64: ((64, 32, 4, 2), (64, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2)),
    128: ((64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 2), (32, 64, 8, 2)),
    256: ((32, 32, 8, 2), (16, 16, 4, 2), (16, 16, 4, 2), (16, 16, 4, 2)),
    512: ((16, 16, 8, 2), (16, 16, 4, 1), (16, 16, 8, 2), (16, 16, 4, 1)),
}
MAX_FEATURES = max(_TILES)  # wider rows do not fit the tiles above; the op layer uses PyTorch for them


def _tile_config(block_d, half_width, backward):
    return _TILES[max(block_d, min(_TILES))][2 * backward + (0 if half_width else 1)]


def _dot_precision(device):
    """3xTF32 keeps fp32 dots near fp32 accuracy on tensor cores (sm80+); plain fp32 FMA elsewhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
        return "tf32x3"
    return "ieee"


def _inverse_norms(z, norm_eps):
    """z [B, N, D] -> (1 / max(||z_i||, norm_eps), its square where the norm was not clamped else 0), fp32 [B, N]."""
    norm = torch.linalg.vector_norm(z.float(), dim=-1)
    inv = 1.0 / norm.clamp_min(norm_eps)
    return inv, torch.where(norm > norm_eps, inv * inv, torch.zeros_like(inv))


def _checked_contiguous(z1, z2, t1, t2):
    """Validates the launcher inputs; returns (z1, z2, t1, t2) contiguous."""
    if z1.dim() != 3 or z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must both be [B, N, D], got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.dtype not in SUPPORTED_DTYPES or z2.dtype != z1.dtype:
        raise TypeError(f"z1, z2 must share a dtype in {SUPPORTED_DTYPES}, got {z1.dtype} and {z2.dtype}")
    if t1.shape != z1.shape or t2.shape != z1.shape or t2.dtype != t1.dtype or t1.dtype not in SUPPORTED_DTYPES:
        raise ValueError("t1, t2 must be [B, N, D] like z1 and share a supported dtype")
    if not 0 < z1.shape[0] <= MAX_TASKS:
        raise ValueError(f"B must be in [1, {MAX_TASKS}] (the second grid dimension), got {z1.shape[0]}")
    return z1.contiguous(), z2.contiguous(), t1.contiguous(), t2.contiguous()


def _on_device_of(t):
    """Triton launches on the current CUDA device: make it t's."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_geometry(z1, t1, backward):
    """Grid and meta-parameters for current embeddings z1 and target embeddings t1."""
    batch, n, d = z1.shape
    block_d = max(16, triton.next_power_of_2(d))
    if block_d > MAX_FEATURES:
        raise ValueError(f"feature width d = {d} exceeds the kernels' limit of {MAX_FEATURES}")
    half_width = z1.element_size() < 4 and t1.element_size() < 4
    block_m, block_n, num_warps, num_stages = _tile_config(block_d, half_width, backward)
    grid = (triton.cdiv(n, block_m), batch)
    # Off CUDA the kernels run in Triton's interpreter, whose tl.dot multiplies bf16/fp16 bit patterns
    # as integers (triton 3.8): there the operands are upcast to fp32 first, which gives the same products.
    meta = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, PRECISION=_dot_precision(z1.device),
                UPCAST=z1.device.type != "cuda", num_warps=num_warps, num_stages=num_stages)
    return grid, meta


def _sides(z1, z2, t1, t2, norm_eps):
    """Per-direction kernel operands: [(x, y, rx, ry, qx, ta, tb, rta, rtb)] for direction 1 (x = z1), 2 (x = z2)."""
    (r1, q1), (r2, q2) = _inverse_norms(z1, norm_eps), _inverse_norms(z2, norm_eps)
    (rt1, _), (rt2, _) = _inverse_norms(t1, norm_eps), _inverse_norms(t2, norm_eps)
    return [(z1, z2, r1, r2, q1, t1, t2, rt1, rt2), (z2, z1, r2, r1, q2, t2, t1, rt2, rt1)]


def softmax_kl_forward(z1, z2, t1, t2, temperature, norm_eps):
    """z1, z2 (current), t1, t2 (target) [B, N, D] -> (loss [B], lse [B, 2, N], target_lse [B, 2, N]), all
    fp32; the row log-sum-exps are ordered (view-1 rows, view-2 rows)."""
    z1, z2, t1, t2 = _checked_contiguous(z1, z2, t1, t2)
    batch, n, d = z1.shape
    kl_rows, lse, target_lse = (torch.full((batch, 2, n), float("nan"), device=z1.device) for _ in range(3))
    grid, meta = _launch_geometry(z1, t1, backward=False)
    with _on_device_of(z1):
        for direction, (x, y, rx, ry, _, ta, tb, rta, rtb) in enumerate(_sides(z1, z2, t1, t2, norm_eps)):
            _softmax_kl_fwd_kernel[grid](
                x, y, rx, ry, ta, tb, rta, rtb,
                kl_rows[:, direction], lse[:, direction], target_lse[:, direction], kl_rows.stride(0),
                n, d, 1.0 / temperature, **meta)
    return kl_rows.sum(dim=(1, 2)) / (2 * n), lse, target_lse


def softmax_kl_backward(grad_loss, z1, z2, t1, t2, temperature, norm_eps, lse, target_lse):
    """grad_loss [B] and the forward's row log-sum-exps -> (dz1, dz2) [B, N, D] in z1's dtype."""
    z1, z2, t1, t2 = _checked_contiguous(z1, z2, t1, t2)
    batch, n, d = z1.shape
    lse, target_lse = lse.float().contiguous(), target_lse.float().contiguous()
    coef = (grad_loss.float() / (2 * n)).contiguous()
    grid, meta = _launch_geometry(z1, t1, backward=True)
    grads = []
    with _on_device_of(z1):
        for direction, (x, y, rx, ry, qx, ta, tb, rta, rtb) in enumerate(_sides(z1, z2, t1, t2, norm_eps)):
            dx = torch.full_like(x, float("nan"))
            _softmax_kl_bwd_kernel[grid](
                x, y, rx, ry, qx, ta, tb, rta, rtb,
                lse[:, direction], lse[:, 1 - direction], target_lse[:, direction], target_lse[:, 1 - direction],
                lse.stride(0), coef, dx, n, d, 1.0 / temperature, SPLIT_H=z1.dtype != torch.float32, **meta)
            grads.append(dx)
    return grads[0], grads[1]
