"""Triton kernels of the ``triton`` backends (local attention and SAN aggregation). Imported lazily, on first use.

Triton decides at decoration time whether ``@triton.jit`` compiles for the GPU or runs in its CPU interpreter
(``TRITON_INTERPRET=1``), so this module is imported only when a kernel is first launched; see
:func:`acmix.ops._backends.triton_attention.triton_status`.

Conventions shared by every kernel:

* every tensor comes with its five (or four) element strides, so strided views (q, k, v sliced from one
  (B, 3C, H, W) projection, NCHW or channels_last) are read in place;
* batch/head offsets are formed in int64 (large maps overflow int32);
* products and sums are accumulated in float32, whatever the storage type;
* the reflection border (generalised: reflect repeatedly, a 1-wide axis maps everything to 0; see
  :mod:`acmix.ops._indexing`) is computed from indices: ``_axis_mult`` counts how often real position ``r``
  appears in the k-window of centre ``c``, ``_reflect`` maps a padded position into the map. ``P`` is the
  reflection period ``2 (n - 1)`` (1 when n == 1) and ``OFF`` a multiple of ``P`` that makes every dividend
  non-negative (Triton's integer division truncates).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _axis_mult(c, r, n, P, OFF, PAD: tl.constexpr, ONCE: tl.constexpr):
    """Multiplicity of key position ``r`` in the reflected window ``[c - PAD, c + PAD]`` along an axis of ``n``.

    ONCE (PAD <= n - 1): the window is reflected at most once, so the images of r are r, -r (r >= 1) and
    2 (n - 1) - r (r <= n - 2). Otherwise count every image r + jP and -r + jP in the window.
    """
    if ONCE:
        m = (tl.abs(r - c) <= PAD).to(tl.int32)
        m += ((r >= 1) & (r + c <= PAD)).to(tl.int32)
        m += ((r <= n - 2) & (tl.abs(2 * (n - 1) - r - c) <= PAD)).to(tl.int32)
    else:
        m = (c + PAD - r + OFF) // P - (c - PAD - 1 - r + OFF) // P
        mirror = (c + PAD + r + OFF) // P - (c - PAD - 1 + r + OFF) // P
        m += tl.where((r > 0) & (r < n - 1), mirror, 0)
    return m


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """``tl.dot`` accumulating in float32; UPCAST multiplies in float32 (Triton's CPU interpreter gets bfloat16
    dots wrong, so the interpreter runs them on upcast operands: the same products, rounded once less)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _reflect(i, n, P, OFF):
    """Generalised reflection of (possibly out-of-range) positions ``i`` into ``[0, n)``."""
    j = (i + OFF) % P
    return tl.where(j >= n, P - j, j)


# ----------------------------------------------------------------------------------------------------------------
# local attention: pieces shared by the forward and the two backward kernels
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _tile_of(pid, N, n_tiles, n_tiles_x, TY: tl.constexpr, TX: tl.constexpr):
    """Program ``pid`` -> (row bn = batch * N + head, batch b, head h, first row y0, first column x0) of its tile."""
    bn = pid // n_tiles
    tile = pid % n_tiles
    return bn, (bn // N).to(tl.int64), (bn % N).to(tl.int64), (tile // n_tiles_x) * TY, (tile % n_tiles_x) * TX


@triton.jit
def _tile_ptrs(base, offs_d, y, x, sd, sh, sw):
    """Pointers of a (positions, BLOCK_D) tile of one (batch, head): position i at (y[i], x[i]), channels offs_d."""
    return base + offs_d[None, :] * sd + y[:, None] * sh + x[:, None] * sw


@triton.jit
def _load_kv(k_base, v_base, p_base, offs_d, ky, kx, mask,
             skd, skh, skw, svd, svh, svw, spd, sph, spw, HAS_POS: tl.constexpr):  # fmt: skip
    """k' = k - p (the position term as a key offset, in float32 then back to k's type) and v at (ky, kx)."""
    k = tl.load(_tile_ptrs(k_base, offs_d, ky, kx, skd, skh, skw), mask=mask, other=0.0)
    if HAS_POS:
        p = tl.load(_tile_ptrs(p_base, offs_d, ky, kx, spd, sph, spw), mask=mask, other=0.0)
        k = (k.to(tl.float32) - p.to(tl.float32)).to(k.dtype)
    v = tl.load(_tile_ptrs(v_base, offs_d, ky, kx, svd, svh, svw), mask=mask, other=0.0)
    return k, v


@triton.jit
def _query_halo(ty0, tx0, HO, WO, H, W, STRIDE: tl.constexpr, PAD: tl.constexpr, TQY: tl.constexpr,
                TQX: tl.constexpr):  # fmt: skip
    """The queries of a TQY x TQX tile (output grid oy, ox; centres cy, cx; in range q_ok) and its key halo:
    every real key within PAD of a centre (a reflected window never leaves it), rows from ry0, columns rx0 .. rx0 +
    lx - 1, n_keys in all."""
    offs_m = tl.arange(0, TQY * TQX)
    oy = ty0 + offs_m // TQX
    ox = tx0 + offs_m % TQX
    q_ok = (oy < HO) & (ox < WO)
    ry0 = tl.maximum(ty0 * STRIDE - PAD, 0)
    ry1 = tl.minimum((tl.minimum(ty0 + TQY, HO) - 1) * STRIDE + PAD, H - 1)
    rx0 = tl.maximum(tx0 * STRIDE - PAD, 0)
    rx1 = tl.minimum((tl.minimum(tx0 + TQX, WO) - 1) * STRIDE + PAD, W - 1)
    lx = rx1 - rx0 + 1
    return oy, ox, oy * STRIDE, ox * STRIDE, q_ok, ry0, rx0, lx, (ry1 - ry0 + 1) * lx


@triton.jit
def _log2_mult(cy, cx, ky, kx, ok, H, W, Py, OFFy, Px, OFFx,
               PAD: tl.constexpr, ONCE_Y: tl.constexpr, ONCE_X: tl.constexpr):  # fmt: skip
    """log2 of the multiplicity of key (ky, kx) in the reflected window of centre (cy, cx), per (query, key) pair;
    -inf where the key is not in the window or the pair is masked out (``ok`` False)."""
    mult = _axis_mult(cy[:, None], ky[None, :], H, Py, OFFy, PAD, ONCE_Y) * _axis_mult(
        cx[:, None], kx[None, :], W, Px, OFFx, PAD, ONCE_X
    )
    return tl.log2(tl.where(ok, mult, 0).to(tl.float32))


# ----------------------------------------------------------------------------------------------------------------
# local attention: forward
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_fwd(
    Q, K, V, POS, O, LSE,
    sqb, sqn, sqd, sqh, sqw,
    skb, skn, skd, skh, skw,
    svb, svn, svd, svh, svw,
    spb, spn, spd, sph, spw,
    sob, son, sod, soh, sow,
    N, H, W, HO, WO, D,
    qk_scale,
    Py, OFFy, Px, OFFx,
    n_tiles, n_tiles_x,
    PAD: tl.constexpr, STRIDE: tl.constexpr,
    TQY: tl.constexpr, TQX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr, ONCE_Y: tl.constexpr, ONCE_X: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One TQY x TQX tile of queries of one (batch, head): stream its key halo in BLOCK_N chunks, online softmax.

    A key's multiplicity in each query's window enters the logit as log2(multiplicity) (-inf: absent). Stores the
    output and the base-2 log-sum-exp (B*N, HO*WO).
    """
    bn, b, h, ty0, tx0 = _tile_of(tl.program_id(0), N, n_tiles, n_tiles_x, TQY, TQX)
    oy, ox, cy, cx, q_ok, ry0, rx0, lx, n_keys = _query_halo(ty0, tx0, HO, WO, H, W, STRIDE, PAD, TQY, TQX)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    q = tl.load(_tile_ptrs(Q + b * sqb + h * sqn, offs_d, cy, cx, sqd, sqh, sqw), mask=q_ok[:, None] & d_ok[None, :],
                other=0.0)  # fmt: skip

    m_i = tl.full([TQY * TQX], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([TQY * TQX], dtype=tl.float32)
    acc = tl.zeros([TQY * TQX, BLOCK_D], dtype=tl.float32)
    k_base, v_base, p_base = K + b * skb + h * skn, V + b * svb + h * svn, POS + b * spb + h * spn
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ok = offs_n < n_keys
        ky = ry0 + offs_n // lx
        kx = rx0 + offs_n % lx
        k, v = _load_kv(k_base, v_base, p_base, offs_d, ky, kx, k_ok[:, None] & d_ok[None, :],
                        skd, skh, skw, svd, svh, svw, spd, sph, spw, HAS_POS)  # fmt: skip
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        s += _log2_mult(cy, cx, ky, kx, k_ok[None, :], H, W, Py, OFFy, Px, OFFx, PAD, ONCE_Y, ONCE_X)

        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p_ij = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p_ij, 1)
        acc = acc * alpha[:, None] + _dot(p_ij.to(V.dtype.element_ty), v, PRECISION, UPCAST)
        m_i = m_new

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    o_ptrs = _tile_ptrs(O + b * sob + h * son, offs_d, oy, ox, sod, soh, sow)
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=q_ok[:, None] & d_ok[None, :])
    lse_ptrs = LSE + bn.to(tl.int64) * HO * WO + oy * WO + ox
    tl.store(lse_ptrs, m_i + tl.log2(l_safe), mask=q_ok)


# ----------------------------------------------------------------------------------------------------------------
# local attention: backward, query-centric (dq and delta = rowsum(dO * O))
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dq(
    Q, K, V, POS, O, DO, LSE, DELTA, DQ,
    sqb, sqn, sqd, sqh, sqw,
    skb, skn, skd, skh, skw,
    svb, svn, svd, svh, svw,
    spb, spn, spd, sph, spw,
    sob, son, sod, soh, sow,
    sgb, sgn, sgd, sgh, sgw,
    sdb, sdn, sdd, sdh, sdw,
    N, H, W, HO, WO, D,
    qk_scale, scale,
    Py, OFFy, Px, OFFx,
    n_tiles, n_tiles_x,
    PAD: tl.constexpr, STRIDE: tl.constexpr,
    TQY: tl.constexpr, TQX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr, ONCE_Y: tl.constexpr, ONCE_X: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """Recompute each query tile's weights from the saved log-sum-exp; dq = scale * sum_j dS_ij k'_j.

    Also stores delta_i = dO_i . O_i for the key-centric pass. (sg*: strides of dO, sd*: strides of dq.)
    """
    bn, b, h, ty0, tx0 = _tile_of(tl.program_id(0), N, n_tiles, n_tiles_x, TQY, TQX)
    oy, ox, cy, cx, q_ok, ry0, rx0, lx, n_keys = _query_halo(ty0, tx0, HO, WO, H, W, STRIDE, PAD, TQY, TQX)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    qd_mask = q_ok[:, None] & d_ok[None, :]
    q = tl.load(_tile_ptrs(Q + b * sqb + h * sqn, offs_d, cy, cx, sqd, sqh, sqw), mask=qd_mask, other=0.0)
    o = tl.load(_tile_ptrs(O + b * sob + h * son, offs_d, oy, ox, sod, soh, sow), mask=qd_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO + b * sgb + h * sgn, offs_d, oy, ox, sgd, sgh, sgw), mask=qd_mask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = bn.to(tl.int64) * HO * WO + oy * WO + ox
    tl.store(DELTA + row, delta, mask=q_ok)
    lse = tl.load(LSE + row, mask=q_ok, other=0.0)

    dq = tl.zeros([TQY * TQX, BLOCK_D], dtype=tl.float32)
    k_base, v_base, p_base = K + b * skb + h * skn, V + b * svb + h * svn, POS + b * spb + h * spn
    for start in range(0, n_keys, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k_ok = offs_n < n_keys
        ky = ry0 + offs_n // lx
        kx = rx0 + offs_n % lx
        k, v = _load_kv(k_base, v_base, p_base, offs_d, ky, kx, k_ok[:, None] & d_ok[None, :],
                        skd, skh, skw, svd, svh, svw, spd, sph, spw, HAS_POS)  # fmt: skip
        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        ok = k_ok[None, :] & q_ok[:, None]
        p_ij = tl.exp2(s + _log2_mult(cy, cx, ky, kx, ok, H, W, Py, OFFy, Px, OFFx, PAD, ONCE_Y, ONCE_X) - lse[:, None])
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p_ij * (dp - delta[:, None])
        dq += _dot(ds.to(K.dtype.element_ty), k, PRECISION, UPCAST)

    dq_ptrs = _tile_ptrs(DQ + b * sdb + h * sdn, offs_d, cy, cx, sdd, sdh, sdw)
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------------------------------------------
# local attention: backward, key-centric (dk', dv): no atomics
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, POS, DO, LSE, DELTA, DK, DV,
    sqb, sqn, sqd, sqh, sqw,
    skb, skn, skd, skh, skw,
    svb, svn, svd, svh, svw,
    spb, spn, spd, sph, spw,
    sgb, sgn, sgd, sgh, sgw,
    skb2, skn2, skd2, skh2, skw2,
    svb2, svn2, svd2, svh2, svw2,
    N, H, W, HO, WO, D,
    qk_scale, scale,
    Py, OFFy, Px, OFFx,
    n_tiles, n_tiles_x,
    PAD: tl.constexpr, STRIDE: tl.constexpr,
    TKY: tl.constexpr, TKX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_POS: tl.constexpr, ONCE_Y: tl.constexpr, ONCE_X: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
):  # fmt: skip
    """One TKY x TKX tile of real keys: visit every query whose window can hold them (centres within PAD, the same
    bound as the forward halo), recompute the weights, accumulate dv = sum_i A_ij dO_i and dk' = scale * sum_i
    dS_ij q_i. (sg*: strides of dO; sk*2 / sv*2: strides of dk / dv.)"""
    bn, b, h, ky0, kx0 = _tile_of(tl.program_id(0), N, n_tiles, n_tiles_x, TKY, TKX)
    offs_n = tl.arange(0, TKY * TKX)
    ky = ky0 + offs_n // TKX
    kx = kx0 + offs_n % TKX
    k_ok = (ky < H) & (kx < W)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    kv_mask = k_ok[:, None] & d_ok[None, :]
    k, v = _load_kv(K + b * skb + h * skn, V + b * svb + h * svn, POS + b * spb + h * spn, offs_d, ky, kx, kv_mask,
                    skd, skh, skw, svd, svh, svw, spd, sph, spw, HAS_POS)  # fmt: skip

    # queries (output grid) whose centres lie within PAD of the tile's keys
    oy0 = (tl.maximum(ky0 - PAD, 0) + STRIDE - 1) // STRIDE
    oy1 = tl.minimum((tl.minimum(ky0 + TKY, H) - 1 + PAD) // STRIDE, HO - 1)
    ox0 = (tl.maximum(kx0 - PAD, 0) + STRIDE - 1) // STRIDE
    ox1 = tl.minimum((tl.minimum(kx0 + TKX, W) - 1 + PAD) // STRIDE, WO - 1)
    nqx = tl.maximum(ox1 - ox0 + 1, 0)
    n_q = tl.maximum(oy1 - oy0 + 1, 0) * nqx

    dk = tl.zeros([TKY * TKX, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([TKY * TKX, BLOCK_D], dtype=tl.float32)
    row_base = bn.to(tl.int64) * HO * WO
    for start in range(0, n_q, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q_ok = offs_m < n_q
        oy = oy0 + offs_m // tl.maximum(nqx, 1)
        ox = ox0 + offs_m % tl.maximum(nqx, 1)
        cy = oy * STRIDE
        cx = ox * STRIDE
        qd_mask = q_ok[:, None] & d_ok[None, :]
        q = tl.load(_tile_ptrs(Q + b * sqb + h * sqn, offs_d, cy, cx, sqd, sqh, sqw), mask=qd_mask, other=0.0)
        do = tl.load(_tile_ptrs(DO + b * sgb + h * sgn, offs_d, oy, ox, sgd, sgh, sgw), mask=qd_mask, other=0.0)
        row = row_base + oy * WO + ox
        lse = tl.load(LSE + row, mask=q_ok, other=0.0)
        delta = tl.load(DELTA + row, mask=q_ok, other=0.0)

        s = _dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale  # (BLOCK_M, TKY*TKX)
        ok = q_ok[:, None] & k_ok[None, :]
        p_ij = tl.exp2(s + _log2_mult(cy, cx, ky, kx, ok, H, W, Py, OFFy, Px, OFFx, PAD, ONCE_Y, ONCE_X) - lse[:, None])
        dv += _dot(tl.trans(p_ij.to(DO.dtype.element_ty)), do, PRECISION, UPCAST)
        dp = _dot(do, tl.trans(v), PRECISION, UPCAST)
        ds = p_ij * (dp - delta[:, None])
        dk += _dot(tl.trans(ds.to(Q.dtype.element_ty)), q, PRECISION, UPCAST)

    dk_ptrs = _tile_ptrs(DK + b * skb2 + h * skn2, offs_d, ky, kx, skd2, skh2, skw2)
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=kv_mask)
    dv_ptrs = _tile_ptrs(DV + b * svb2 + h * svn2, offs_d, ky, kx, svd2, svh2, svw2)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


# ----------------------------------------------------------------------------------------------------------------
# SAN aggregation
# ----------------------------------------------------------------------------------------------------------------


@triton.jit
def _agg_fwd(
    X, WT, OUT,
    sxb, sxc, sxh, sxw,
    swb, swc, swt, swh, sww,
    sob, soc, soh, sow,
    C, WC, H, W, HO, WO,
    Py, OFFy, Px, OFFx,
    n_cblocks, n_pblocks,
    KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """out[b, c, y, x] = sum_t w[b, c mod Wc, t, y, x] * x[b, c, reflect(y s - k//2 + t // k), reflect(...)]."""
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    cb = (pid // n_pblocks) % n_cblocks
    b = (pid // (n_pblocks * n_cblocks)).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = offs_c < C
    p_ok = offs_p < HO * WO
    oy = offs_p // WO
    ox = offs_p % WO
    mask = c_ok[:, None] & p_ok[None, :]
    wc = offs_c % WC
    x_base = X + b * sxb + offs_c[:, None].to(tl.int64) * sxc
    w_base = WT + b * swb + wc[:, None].to(tl.int64) * swc + oy[None, :] * swh + ox[None, :] * sww
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for t in range(0, KS * KS):
        iy = _reflect(oy * STRIDE - KS // 2 + t // KS, H, Py, OFFy)
        ix = _reflect(ox * STRIDE - KS // 2 + t % KS, W, Px, OFFx)
        xv = tl.load(x_base + iy[None, :] * sxh + ix[None, :] * sxw, mask=mask, other=0.0)
        wv = tl.load(w_base + t * swt, mask=mask, other=0.0)
        acc += xv.to(tl.float32) * wv.to(tl.float32)
    o_ptrs = OUT + b * sob + offs_c[:, None].to(tl.int64) * soc + oy[None, :] * soh + ox[None, :] * sow
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _agg_bwd_weight(
    X, DO, DW,
    sxb, sxc, sxh, sxw,
    sgb, sgc, sgh, sgw,
    sdb, sdc, sdt, sdh, sdw,
    C, WC, H, W, HO, WO,
    Py, OFFy, Px, OFFx,
    n_pblocks,
    KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """dw[b, w, t, y, x] = sum over channels c = g Wc + w of dout[b, c, y, x] * x[b, c, window_t(y, x)]."""
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    w = (pid // n_pblocks) % WC
    b = (pid // (n_pblocks * WC)).to(tl.int64)
    offs_t = tl.arange(0, BLOCK_T)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    t_ok = offs_t < KS * KS
    p_ok = offs_p < HO * WO
    oy = offs_p // WO
    ox = offs_p % WO
    mask = t_ok[:, None] & p_ok[None, :]
    iy = _reflect(oy[None, :] * STRIDE - KS // 2 + offs_t[:, None] // KS, H, Py, OFFy)
    ix = _reflect(ox[None, :] * STRIDE - KS // 2 + offs_t[:, None] % KS, W, Px, OFFx)
    acc = tl.zeros([BLOCK_T, BLOCK_P], dtype=tl.float32)
    for c in range(w, C, WC):
        do = tl.load(DO + b * sgb + c * sgc + oy * sgh + ox * sgw, mask=p_ok, other=0.0)
        xv = tl.load(X + b * sxb + c * sxc + iy * sxh + ix * sxw, mask=mask, other=0.0)
        acc += do.to(tl.float32)[None, :] * xv.to(tl.float32)
    d_ptrs = DW + b * sdb + w * sdc + offs_t[:, None] * sdt + oy[None, :] * sdh + ox[None, :] * sdw
    tl.store(d_ptrs, acc.to(DW.dtype.element_ty), mask=mask)


@triton.jit
def _agg_bwd_input(
    WT, DO, DXP,
    swb, swc, swt, swh, sww,
    sgb, sgc, sgh, sgw,
    C, WC, HP, WP, HO, WO,
    n_cblocks, n_pblocks,
    KS: tl.constexpr, STRIDE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Gradient of the features on the padded grid (no reflection yet; folded back by the caller).

    Padded position (py, px) (input position py - k//2) is tap t of output y when y s + t // k = py: a gather
    over the k^2 taps, no atomics. DXP is a contiguous float32 (B, C, HP, WP) map.
    """
    pid = tl.program_id(0)
    pb = pid % n_pblocks
    cb = (pid // n_pblocks) % n_cblocks
    b = (pid // (n_pblocks * n_cblocks)).to(tl.int64)
    offs_c = cb * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_p = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    c_ok = offs_c < C
    p_ok = offs_p < HP * WP
    py = offs_p // WP
    px = offs_p % WP
    wc = offs_c % WC
    w_base = WT + b * swb + wc[:, None].to(tl.int64) * swc
    g_base = DO + b * sgb + offs_c[:, None].to(tl.int64) * sgc
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.float32)
    for t in range(0, KS * KS):
        ny = py - t // KS
        nx = px - t % KS
        oy = ny // STRIDE
        ox = nx // STRIDE
        ok = (ny >= 0) & (nx >= 0) & (ny % STRIDE == 0) & (nx % STRIDE == 0) & (oy < HO) & (ox < WO) & p_ok
        mask = c_ok[:, None] & ok[None, :]
        wv = tl.load(w_base + t * swt + oy[None, :] * swh + ox[None, :] * sww, mask=mask, other=0.0)
        gv = tl.load(g_base + oy[None, :] * sgh + ox[None, :] * sgw, mask=mask, other=0.0)
        acc += wv.to(tl.float32) * gv.to(tl.float32)
    d_ptrs = DXP + (b * C + offs_c[:, None].to(tl.int64)) * HP * WP + offs_p[None, :]
    tl.store(d_ptrs, acc, mask=c_ok[:, None] & p_ok[None, :])
