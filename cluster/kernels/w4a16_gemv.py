"""The M = 1 W4A16 GEMV on the CUDA cores and the dequantize kernel of the large-M path (w4a16.py: layout, dispatch).

Decode at batch 1 reads each weight once and does one multiply-add with it, so the GEMV keeps the tensor cores out:
a program owns BLOCK_N weight rows (and their up rows when GATED), each thread 4 consecutive int32 words of every
row (16-byte loads), so one conversion of x serves all BLOCK_N rows. A nibble costs one LOP3 (masked in place, ORed
into an fp32 whose exponent puts the mantissa's unit on that nibble: 2**(23 - 4j) + q), one FADD (minus that and
the zero) and one FFMA; the scale multiplies once per word.
"""
import triton
import triton.language as tl

from cluster.kernels.pdl import wait_for_previous


@triton.jit
def _bcast8(w):
    """[R, C] -> [R, C, 8]: eight in-thread copies (join keeps the new axis within each thread)."""
    w2 = tl.join(w, w)
    w4 = tl.join(w2, w2)
    return tl.reshape(tl.join(w4, w4), (w.shape[0], w.shape[1], 8))


@triton.jit
def _split8(x):
    """[A, B, 8] -> its 8 slices along the last axis (in-thread), in order."""
    a, b = tl.split(tl.reshape(x, (x.shape[0], x.shape[1], 4, 2)))
    a0, a1 = tl.split(tl.reshape(a, (x.shape[0], x.shape[1], 2, 2)))
    b0, b1 = tl.split(tl.reshape(b, (x.shape[0], x.shape[1], 2, 2)))
    x0, x4 = tl.split(a0)
    x2, x6 = tl.split(a1)
    x1, x5 = tl.split(b0)
    x3, x7 = tl.split(b1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def _gemv_load(w_ptrs, z_ptrs, s_ptrs, ok):
    w = tl.load(w_ptrs, mask=ok[:, :, None], other=0)
    z = tl.load(z_ptrs, mask=ok, other=0).to(tl.float32)
    s = tl.load(s_ptrs, mask=ok, other=0).to(tl.float32)
    return w, z, s


@triton.jit
def _gemv_fma(acc, w, z, s, m, x):
    """acc [BN, BG, GW] += per word sum_i (q_i - z) * x_i, times the group's scale. Nibble j of each half word is
    masked in place and read as an fp32 of exponent 23 - 4j (_nib): one LOP3, one FADD, one FFMA a weight."""
    x0, x1, x2, x3, x4, x5, x6, x7 = _split8(x)
    z = z[:, :, None]
    c0, c1, c2, c3 = 8388608.0 + z, 524288.0 + z, 32768.0 + z, 2048.0 + z
    m1, m2, m3 = m << 4, m << 8, m << 12
    h = w >> 16
    t = (((w & m) | 0x4B000000).to(tl.float32, bitcast=True) - c0) * x0[None]
    t += (((w & m1) | 0x49000000).to(tl.float32, bitcast=True) - c1) * x1[None]
    t += (((w & m2) | 0x47000000).to(tl.float32, bitcast=True) - c2) * x2[None]
    t += (((w & m3) | 0x45000000).to(tl.float32, bitcast=True) - c3) * x3[None]
    t += (((h & m) | 0x4B000000).to(tl.float32, bitcast=True) - c0) * x4[None]
    t += (((h & m1) | 0x49000000).to(tl.float32, bitcast=True) - c1) * x5[None]
    t += (((h & m2) | 0x47000000).to(tl.float32, bitcast=True) - c2) * x6[None]
    t += (((h & m3) | 0x45000000).to(tl.float32, bitcast=True) - c3) * x7[None]
    return acc + t * s[:, :, None]


@triton.jit(do_not_specialize=["N", "K"])
def _gemv_kernel(x_ptr, qw_ptr, z_ptr, s_ptr, b_ptr, y_ptr, N, K, mbits, GROUP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, GATED: tl.constexpr, USE_PDL: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_G: tl.constexpr, PREFETCH: tl.constexpr):
    """M = 1 on the CUDA cores: BLOCK_N rows (and their up rows if GATED) against BLOCK_G groups of K a step. Each
    thread holds 4 consecutive words of every row, so x is converted once per step for all BLOCK_N rows."""
    GW: tl.constexpr = GROUP // 8
    KW = tl.multiple_of(K // 8, 4)
    G = K // GROUP
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rg = tl.arange(0, BLOCK_G)
    rows = rn.to(tl.int64)
    w_ptrs = qw_ptr + rows[:, None, None] * KW + (rg * GW)[None, :, None] + tl.arange(0, GW)[None, None, :]
    z_ptrs = z_ptr + rows[:, None] * G + rg[None, :]
    s_ptrs = s_ptr + rows[:, None] * G + rg[None, :]
    x_ptrs = x_ptr + ((rg * GROUP)[:, None] + tl.arange(0, GW)[None, :] * 8)[:, :, None] + tl.arange(0, 8)[None, None, :]
    up_w, up_g = N.to(tl.int64) * KW, N.to(tl.int64) * G
    m = tl.full((BLOCK_N, BLOCK_G, GW), 0, tl.int32) + mbits  # 0xF in a register (see _deq_fast)
    acc = tl.zeros((BLOCK_N, BLOCK_G, GW), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_G, GW), dtype=tl.float32)
    # the first step's weights are loaded before waiting on the kernel that writes x (see pdl.py)
    ok = n_ok[:, None] & (rg < G)[None, :]
    w, z, s = _gemv_load(w_ptrs, z_ptrs, s_ptrs, ok)
    wu, zu, su = w, z, s
    if GATED:
        wu, zu, su = _gemv_load(w_ptrs + up_w, z_ptrs + up_g, s_ptrs + up_g, ok)
    wait_for_previous(USE_PDL)
    if PREFETCH:  # several steps: the next step's loads are issued before this step's arithmetic
        for g0 in range(0, G, BLOCK_G):
            x = tl.load(x_ptrs + g0 * GROUP, mask=((g0 + rg) < G)[:, None, None], other=0.0).to(tl.float32)
            g1 = g0 + BLOCK_G
            ok = n_ok[:, None] & ((g1 + rg) < G)[None, :]
            w1, z1, s1 = _gemv_load(w_ptrs + g1 * GW, z_ptrs + g1, s_ptrs + g1, ok)
            wu1, zu1, su1 = w1, z1, s1
            if GATED:
                wu1, zu1, su1 = _gemv_load(w_ptrs + up_w + g1 * GW, z_ptrs + up_g + g1, s_ptrs + up_g + g1, ok)
            acc = _gemv_fma(acc, w, z, s, m, x)
            w, z, s = w1, z1, s1
            if GATED:
                acc_up = _gemv_fma(acc_up, wu, zu, su, m, x)
                wu, zu, su = wu1, zu1, su1
    else:  # one step covers K (or few registers matter more than overlap)
        x = tl.load(x_ptrs, mask=(rg < G)[:, None, None], other=0.0).to(tl.float32)
        acc = _gemv_fma(acc, w, z, s, m, x)
        if GATED:
            acc_up = _gemv_fma(acc_up, wu, zu, su, m, x)
        for g0 in range(BLOCK_G, G, BLOCK_G):
            ok = n_ok[:, None] & ((g0 + rg) < G)[None, :]
            w, z, s = _gemv_load(w_ptrs + g0 * GW, z_ptrs + g0, s_ptrs + g0, ok)
            x = tl.load(x_ptrs + g0 * GROUP, mask=((g0 + rg) < G)[:, None, None], other=0.0).to(tl.float32)
            acc = _gemv_fma(acc, w, z, s, m, x)
            if GATED:
                wu, zu, su = _gemv_load(w_ptrs + up_w + g0 * GW, z_ptrs + up_g + g0, s_ptrs + up_g + g0, ok)
                acc_up = _gemv_fma(acc_up, wu, zu, su, m, x)
    y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    if GATED:
        up = tl.sum(tl.sum(acc_up, 2), 1)
        if HAS_BIAS:
            up += tl.load(b_ptr + N + rn, mask=n_ok, other=0.0).to(tl.float32)
        y = _gate(y, up, y_ptr.dtype.element_ty)
    tl.store(y_ptr + rn, y.to(y_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _gate(g, u, dt: tl.constexpr):
    """silu(g) * u with the roundings of the unfused kernels (gemv.py, activation.py)."""
    g = g.to(dt).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32)
    return act * u.to(dt).to(tl.float32)


@triton.jit
def _dequant_kernel(qw_ptr, z_ptr, s_ptr, out_ptr, N, K, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """out [N, K] = (q - zero) * scale in out's dtype: the dequantize-then-cuBLAS path for large M."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k0 = tl.program_id(1) * BLOCK_K
    ok = rn < N
    rows = rn.to(tl.int64)
    w = tl.load(qw_ptr + rows[:, None] * (K // 8) + (k0 // 8 + tl.arange(0, BLOCK_K // 8))[None, :], mask=ok[:, None])
    q = (_bcast8(w) >> (tl.arange(0, 8) * 4)[None, None, :]) & 0xF
    q = tl.reshape(q, (BLOCK_N, BLOCK_K)).to(tl.float32)
    g = rows * (K // GROUP) + k0 // GROUP
    z = tl.load(z_ptr + g, mask=ok, other=0).to(tl.float32)[:, None]
    s = tl.load(s_ptr + g, mask=ok, other=0).to(tl.float32)[:, None]
    out = out_ptr + rows[:, None] * K + (k0 + tl.arange(0, BLOCK_K))[None, :]
    tl.store(out, ((q - z) * s).to(out_ptr.dtype.element_ty), mask=ok[:, None])
