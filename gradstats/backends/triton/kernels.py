"""Triton kernels of the gradstats Triton backend.

All kernels are driven by a *chunk table* built once per gradient-set **structure** by
``launcher.py`` (sizes and launch parameters are chosen there, never here) and by a
per-tensor **pointer table** uploaded asynchronously whenever the gradients move, so a plan
survives ``zero_grad(set_to_none=True)`` + ``backward()``. A chunk row is five int64:
``(tensor index, element offset in the tensor, length, partial slot, group)``.

* :func:`grad_stats_chunks_kernel`: one program per chunk (at most ``CHUNK`` contiguous
  elements of one tensor; all chunks of one dtype and alignment in one launch). Writes
  fixed-slot partials: sum of ``|x|**p`` over finite elements (or their max for
  ``p = inf``), max ``|x|`` over finite elements, NaN count, Inf count.
* :func:`grad_stats_finalize_kernel`: reduces the partials of each group (program 0) and of
  each tensor (programs ``1..T``) in a fixed order, applies the NaN/Inf rule and writes
  norms, the total norm and optionally torch's clipping coefficient.
* :func:`step_finalize_kernel`: the same reduction, then — in program 0 — the decision
  program of ``StableOptimizer`` (``gradstats.policies.program``): AMP unscaling, the fused
  rules (skip on NaN/Inf, fixed-norm, ZClip, AutoClip, spike skipping), the running
  statistics of every group's norm, the step counters, the clip coefficients and the
  ``grad_scale`` / ``found_inf`` of a fused optimizer. One launch replaces dozens of small
  torch ops.
* :func:`grad_scale_chunks_kernel`: in-place ``x *= coef`` over the same tables, where each
  program exits at once when its coefficient is ``>= 1``.

Only long-standing ``triton.language`` APIs are used (Triton 3.x). No float atomics
anywhere: results are bit-identical from call to call. IEEE division and square root
(``div_rn``, ``sqrt_rn``) wherever a value must match torch's.
"""
import os

import triton
import triton.language as tl

# NORM constexpr codes
NORM_INF = 0
NORM_L1 = 1
NORM_L2 = 2

# op codes of the decision program (gradstats.policies.program.OP_CODES)
OP_NONE = 0
OP_SKIP_NONFINITE = 1
OP_FIXED_NORM = 2
OP_ZSCORE = 3
OP_QUANTILE = 4
OP_SPIKE = 5

#: whether this triton has ``tl.sort`` (needed to fuse QuantileClip)
HAS_SORT = hasattr(tl, "sort")


@triton.jit
def _as_f32(x, DTYPE: tl.constexpr):
    """Loaded DTYPE values -> float32, exactly.

    bfloat16 is widened on the bits (a 16-bit shift, what the GPU's conversion does): the
    Triton interpreter's own bf16 -> fp32 conversion loses subnormals.
    """
    if DTYPE == tl.bfloat16:
        u = x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16
        return u.to(tl.float32, bitcast=True)
    else:
        return x.to(tl.float32)


@triton.jit
def _accumulate(x, acc, mx, n_nan, n_inf, NORM: tl.constexpr):
    """Fold one block ``x`` (float32) into the per-lane accumulators."""
    ax = tl.abs(x)
    finite = ax < float("inf")  # False for NaN and +-Inf
    fx = tl.where(finite, ax, 0.0)
    if NORM == 2:
        acc += fx * fx
    elif NORM == 1:
        acc += fx
    # NORM == inf: the accumulator is the max, taken from mx at the end.
    # tl.maximum drops NaN, which is why NaN/Inf are masked out and counted instead.
    mx = tl.maximum(mx, fx)
    n_nan += (x != x).to(tl.int32)
    n_inf += (ax == float("inf")).to(tl.int32)
    return acc, mx, n_nan, n_inf


@triton.jit
def _chunk_base(ptrs_ptr, meta_ptr, pid, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """(first element pointer, length) of chunk ``pid`` from the chunk and pointer tables."""
    row = meta_ptr + pid * 5
    t = tl.load(row)
    off = tl.load(row + 1)
    n = tl.load(row + 2).to(tl.int32)
    base = tl.load(ptrs_ptr + t).to(tl.pointer_type(DTYPE)) + off
    if ALIGNED:
        # Lets the compiler emit 16-byte vector loads (measured: 3.4-3.6 TB/s vs 2.4-2.8).
        base = tl.multiple_of(base, 16)
    return base, n


@triton.jit
def grad_stats_chunks_kernel(
    ptrs_ptr,  # int64 [T]: data pointer of each tensor (this call's addresses)
    meta_ptr,  # int64 [n, 5]: (tensor, element offset, length, slot, group) per chunk
    acc_ptr,  # float64 [C] out: sum |x|^p over finite x (max |x| for p = inf)
    max_ptr,  # float32 [C] out: max |x| over finite x (0 if none)
    nan_ptr,  # int32 [C] out: NaN count
    inf_ptr,  # int32 [C] out: +-Inf count
    DTYPE: tl.constexpr,  # element type of every chunk of this launch
    NORM: tl.constexpr,  # 0 (inf), 1 or 2
    BLOCK: tl.constexpr,  # elements loaded per loop iteration
    ALIGNED: tl.constexpr,  # every chunk address of this launch is 16-byte aligned
):
    # Bytes moved per program: reads length * sizeof(DTYPE) of gradient + 48 bytes of
    # tables; writes 20 bytes of partials. The gradients are read exactly once per call
    # (twice for a chunk of values beyond float32's safe range for |x|^p, see below).
    pid = tl.program_id(0)
    base, n = _chunk_base(ptrs_ptr, meta_ptr, pid, DTYPE, ALIGNED)
    slot = tl.load(meta_ptr + pid * 5 + 3)

    offs = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    mx = tl.zeros([BLOCK], dtype=tl.float32)
    n_nan = tl.zeros([BLOCK], dtype=tl.int32)
    n_inf = tl.zeros([BLOCK], dtype=tl.int32)

    # Full blocks: unmasked loads. Offsets stay int32 (n <= CHUNK < 2**31); the 64-bit
    # part of the address lives in `base`.
    n_full = n - n % BLOCK
    for start in range(0, n_full, BLOCK):
        s0 = tl.multiple_of(start, BLOCK)
        x = _as_f32(tl.load(base + s0 + offs), DTYPE)
        acc, mx, n_nan, n_inf = _accumulate(x, acc, mx, n_nan, n_inf, NORM)
    # One masked tail (masked-out lanes read 0: finite, add nothing).
    idx = n_full + offs
    x = _as_f32(tl.load(base + idx, mask=idx < n, other=0.0), DTYPE)
    acc, mx, n_nan, n_inf = _accumulate(x, acc, mx, n_nan, n_inf, NORM)

    mx_s = tl.max(mx, axis=0)
    if NORM == 0:
        tl.store(acc_ptr + slot, mx_s.to(tl.float64))
    else:
        a64 = tl.sum(acc, axis=0).to(tl.float64)
        # A chunk whose values are so small (or large) that |x|^p under- (over-)flows
        # float32 is summed again, scaled by a power of two: rare, and exact scaling.
        if NORM == 2:
            rescale = (mx_s > 7.2e16) | ((mx_s < 8.7e-19) & (mx_s > 0.0))  # 2^56, 2^-60
        else:
            rescale = mx_s > 1.2e33  # 2^110: a sum of 2^16 values stays below 2^126
        if rescale:
            e = ((mx_s.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127
            e = tl.minimum(e, 126)
            s = ((127 - e) << 23).to(tl.float32, bitcast=True)  # 2^-e, exactly
            acc2 = tl.zeros([BLOCK], dtype=tl.float32)
            for start in range(0, n, BLOCK):
                idx2 = start + offs
                x2 = _as_f32(tl.load(base + idx2, mask=idx2 < n, other=0.0), DTYPE)
                ax2 = tl.abs(x2)
                f2 = tl.where(ax2 < float("inf"), ax2, 0.0) * s
                if NORM == 2:
                    acc2 += f2 * f2
                else:
                    acc2 += f2
            up = ((1023 + e.to(tl.int64)) << 52).to(tl.float64, bitcast=True)  # 2^e
            if NORM == 2:
                up = up * up
            a64 = tl.sum(acc2, axis=0).to(tl.float64) * up
        tl.store(acc_ptr + slot, a64)
    tl.store(max_ptr + slot, mx_s)
    tl.store(nan_ptr + slot, tl.sum(n_nan, axis=0))
    tl.store(inf_ptr + slot, tl.sum(n_inf, axis=0))


@triton.jit
def _reduce_slots(acc_ptr, max_ptr, nan_ptr, inf_ptr, lo, hi,
                  NORM: tl.constexpr, RBLOCK: tl.constexpr):
    """Reduce partial slots ``lo:hi`` in a fixed order; counts in int64."""
    offs = tl.arange(0, RBLOCK)
    a = tl.zeros([RBLOCK], dtype=tl.float64)
    m = tl.zeros([RBLOCK], dtype=tl.float32)
    cn = tl.zeros([RBLOCK], dtype=tl.int64)
    ci = tl.zeros([RBLOCK], dtype=tl.int64)
    for start in range(lo, hi, RBLOCK):
        idx = start + offs
        mask = idx < hi
        va = tl.load(acc_ptr + idx, mask=mask, other=0.0)
        if NORM == 0:
            a = tl.maximum(a, va)  # partials are finite: no NaN to lose
        else:
            a += va
        m = tl.maximum(m, tl.load(max_ptr + idx, mask=mask, other=0.0))
        cn += tl.load(nan_ptr + idx, mask=mask, other=0).to(tl.int64)
        ci += tl.load(inf_ptr + idx, mask=mask, other=0).to(tl.int64)
    if NORM == 0:
        ra = tl.max(a, axis=0)
    else:
        ra = tl.sum(a, axis=0)
    return ra, tl.max(m, axis=0), tl.sum(cn, axis=0), tl.sum(ci, axis=0)


@triton.jit
def _finish_norm(acc, n_nan, n_inf, NORM: tl.constexpr):
    """NaN if any NaN, else Inf if any Inf, else acc ** (1/p): float64 in, float32 out."""
    if NORM == 2:
        v = tl.sqrt(acc).to(tl.float32)
    else:
        v = acc.to(tl.float32)
    v = tl.where(n_inf > 0, float("inf"), v)
    v = tl.where(n_nan > 0, float("nan"), v)
    return v


@triton.jit
def _clip_coef(max_norm, norm):
    """torch's ``clamp(max_norm / (norm + 1e-6), max=1)``, bit for bit.

    torch evaluates ``max_norm / t`` as ``t.reciprocal() * max_norm`` in float32 with IEEE
    division; NaN must survive the clamp (``tl.minimum`` would drop it).
    """
    recip = tl.div_rn(tl.full(norm.shape, 1.0, tl.float32), norm + 1e-6)
    c = recip * max_norm
    return tl.where(c > 1.0, 1.0, c)


@triton.jit
def grad_stats_finalize_kernel(
    acc_ptr, max_ptr, nan_ptr, inf_ptr,  # partials [C] (acc float64) of the stats kernel
    gb_ptr,  # int32 [G+1]: slots gb[g]:gb[g+1] belong to group g
    tb_ptr,  # int32 [T+1]: slots tb[t]:tb[t+1] belong to tensor t
    outf_ptr,  # float32 out: norm[G] max_abs[G] acc[G] total[1] clip[1] t_acc[T] t_norm[T]
    outi_ptr,  # int64 out: n_nan[G] n_inf[G] nonfinite[G] t_nan[T] t_inf[T]
    G, T,  # number of groups; number of tensors (0 unless per-tensor norms are wanted)
    max_norm,  # float32, used when HAS_CLIP
    NORM: tl.constexpr,
    HAS_CLIP: tl.constexpr,
    RBLOCK: tl.constexpr,
):
    # Bytes moved: program 0 reads all 20*C bytes of partials and writes ~36*G bytes;
    # program 1+t reads tensor t's 20 bytes per chunk and writes 24 bytes.
    pid = tl.program_id(0)
    if pid == 0:
        tot = tl.zeros((), dtype=tl.float64)
        tot_nan = tl.zeros((), dtype=tl.int64)
        tot_inf = tl.zeros((), dtype=tl.int64)
        for g in range(0, G):  # groups in order: deterministic total
            lo = tl.load(gb_ptr + g)
            hi = tl.load(gb_ptr + g + 1)
            ra, rm, cn, ci = _reduce_slots(acc_ptr, max_ptr, nan_ptr, inf_ptr, lo, hi,
                                           NORM, RBLOCK)
            tl.store(outf_ptr + g, _finish_norm(ra, cn, ci, NORM))
            tl.store(outf_ptr + G + g, rm)
            tl.store(outf_ptr + 2 * G + g, ra.to(tl.float32))
            tl.store(outi_ptr + g, cn)
            tl.store(outi_ptr + G + g, ci)
            tl.store(outi_ptr + 2 * G + g, cn + ci)
            if NORM == 0:
                tot = tl.maximum(tot, ra)
            else:
                tot = tot + ra
            tot_nan = tot_nan + cn
            tot_inf = tot_inf + ci
        total = _finish_norm(tot, tot_nan, tot_inf, NORM)
        tl.store(outf_ptr + 3 * G, total)
        if HAS_CLIP:
            tl.store(outf_ptr + 3 * G + 1, _clip_coef(max_norm, total))
    else:
        t = pid - 1
        lo = tl.load(tb_ptr + t)
        hi = tl.load(tb_ptr + t + 1)
        ra, rm, cn, ci = _reduce_slots(acc_ptr, max_ptr, nan_ptr, inf_ptr, lo, hi,
                                       NORM, RBLOCK)
        base = 3 * G + 2
        tl.store(outf_ptr + base + t, ra.to(tl.float32))
        tl.store(outf_ptr + base + T + t, _finish_norm(ra, cn, ci, NORM))
        tl.store(outi_ptr + 3 * G + t, cn)
        tl.store(outi_ptr + 3 * G + T + t, ci)


# ---------------------------------------------------------------------------------------
# the decision program (program 0 of step_finalize_kernel)
# ---------------------------------------------------------------------------------------

@triton.jit
def _running_update(mean, var, cnt, x, valid, one_minus_alpha):
    """gradstats.core.running.update_ on float32 values (scalars or vectors)."""
    valid = valid & (tl.abs(x) < float("inf"))
    vf = valid.to(tl.float32)
    cnt = cnt + vf
    w = tl.div_rn(tl.full(cnt.shape, 1.0, tl.float32), tl.maximum(cnt, 1.0))
    w = tl.maximum(w, one_minus_alpha) * vf
    d = tl.where(valid, x, mean) - mean
    wd = w * d
    var = (var + wd * d) * (1.0 - w)
    mean = mean + wd
    return mean, var, cnt


@triton.jit
def _op(OP: tl.constexpr, k, table_ptr, params_ptr, fstate_ptr, istate_ptr, outf_ptr,
        norm, total, loss, finite, amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
        HAS_AMP_SCALE: tl.constexpr, HAS_AMP_FOUND: tl.constexpr, QH: tl.constexpr,
        SW: tl.constexpr):
    """Run fused op slot ``k`` (compile-time kind ``OP``) of the decision program."""
    row = table_ptr + k * 5
    p_off = tl.load(row + 1)
    f_off = tl.load(row + 2)
    i_off = tl.load(row + 3)
    info = tl.load(row + 4)
    if OP == 1:  # skip_nonfinite(any)
        any_nf = tl.load(params_ptr + p_off)
        if HAS_AMP_SCALE:
            bad = finite == 0
        else:
            bad = (any_nf > 0) & (finite == 0)
            if HAS_AMP_FOUND:
                bad = bad | amp_bad
        skip_nf = bad
        skip = skip | bad
    elif OP == 2:  # fixed_norm(max_norm, per_group)
        m = tl.load(params_ptr + p_off)
        pg = tl.load(params_ptr + p_off + 1)
        n = tl.where(pg > 0, norm, total)
        coef = coef * _clip_coef(m, n)
    elif OP == 3:  # zscore(alpha, z_thresh, warmup, max_norm, z_thresh^2, 1 - alpha)
        zt = tl.load(params_ptr + p_off + 1)
        warm = tl.load(params_ptr + p_off + 2)
        mx_norm = tl.load(params_ptr + p_off + 3)
        zt2 = tl.load(params_ptr + p_off + 4)
        oma = tl.load(params_ptr + p_off + 5)
        mean = tl.load(fstate_ptr + f_off)
        var = tl.load(fstate_ptr + f_off + 1)
        cnt = tl.load(fstate_ptr + f_off + 2)
        std = tl.sqrt_rn(tl.maximum(var, 0.0))
        active = cnt >= warm
        z = tl.where(active, tl.div_rn(total - mean, tl.maximum(std, 1e-12)), 0.0)
        over = active & (z > zt)
        safe_z = tl.where(over, z, zt)
        target = mean + tl.div_rn(zt2 * std, safe_z)
        cnorm = tl.where(over, target, total)
        c = tl.where(over, _clip_coef(target, total), 1.0)
        c2 = _clip_coef(mx_norm, total)
        c = tl.where((mx_norm >= 0) & ((c2 < c) | (c2 != c2)), c2, c)
        coef = coef * c
        tl.store(outf_ptr + info, z)
        tl.store(outf_ptr + info + 1, mean)
        tl.store(outf_ptr + info + 2, std)
        tl.store(outf_ptr + info + 3, cnorm)
        mean, var, cnt = _running_update(mean, var, cnt, cnorm, skip == 0, oma)
        tl.store(fstate_ptr + f_off, mean)
        tl.store(fstate_ptr + f_off + 1, var)
        tl.store(fstate_ptr + f_off + 2, cnt)
    elif OP == 4:  # quantile(q, H)
        q = tl.load(params_ptr + p_off)
        H = tl.load(params_ptr + p_off + 1).to(tl.int64)
        cnt = tl.load(istate_ptr + i_off)
        hq = tl.arange(0, QH)
        buf = tl.load(fstate_ptr + f_off + hq, mask=hq < H, other=float("inf"))
        valid = (skip == 0) & (total < float("inf"))
        slot = cnt % H
        buf = tl.where((hq == slot) & valid, total, buf)
        tl.store(fstate_ptr + f_off + slot, total, mask=valid)
        cnt = cnt + valid.to(tl.int64)
        tl.store(istate_ptr + i_off, cnt)
        n = tl.minimum(cnt, H)
        srt = tl.sort(buf)
        last = tl.maximum(n - 1, 0)
        pos = q * last.to(tl.float32)
        lo = tl.minimum(tl.floor(pos).to(tl.int64), H - 1)
        hi = tl.minimum(lo + 1, last)
        frac = pos - lo.to(tl.float32)
        v_lo = tl.max(tl.where(hq == lo, srt, float("-inf")), axis=0)
        v_hi = tl.max(tl.where(hq == hi, srt, float("-inf")), axis=0)
        thr = tl.where(frac > 0, v_lo + frac * (v_hi - v_lo), v_lo)
        coef = coef * tl.where(n > 0, _clip_coef(thr, total), 1.0)
        tl.store(outf_ptr + info, thr)
    elif OP == 5:  # spike(W, k, warmup, on_norm, on_loss, loss_first)
        W = tl.load(params_ptr + p_off).to(tl.int64)
        kk = tl.load(params_ptr + p_off + 1)
        warm = tl.load(params_ptr + p_off + 2).to(tl.int64)
        on_norm = tl.load(params_ptr + p_off + 3)
        on_loss = tl.load(params_ptr + p_off + 4)
        loss_first = tl.load(params_ptr + p_off + 5)
        S = (on_norm > 0).to(tl.int32) + (on_loss > 0).to(tl.int32)
        hw = tl.arange(0, SW)
        hit = tl.zeros((), dtype=tl.int1)
        for s in range(0, S):
            is_loss = ((s == 0) & (loss_first > 0)) | ((s == 1) & (loss_first == 0))
            x = tl.where(is_loss, loss, total)
            cnt = tl.load(istate_ptr + i_off + s)
            n = tl.minimum(cnt, W)
            bmask = hw < n
            buf = tl.load(fstate_ptr + f_off + s * W + hw, mask=hw < W, other=0.0)
            nf = n.to(tl.float32)
            mean = tl.div_rn(tl.sum(tl.where(bmask, buf, 0.0), axis=0), tl.maximum(nf, 1.0))
            dv = tl.where(bmask, buf - mean, 0.0)
            std = tl.sqrt_rn(tl.div_rn(tl.sum(dv * dv, axis=0), tl.maximum(nf - 1.0, 1.0)))
            flag = (cnt >= warm) & (x > mean + kk * std)
            hit = hit | flag
            valid = (skip == 0) & (tl.abs(x) < float("inf"))
            tl.store(fstate_ptr + f_off + s * W + cnt % W, x, mask=valid)
            tl.store(istate_ptr + i_off + s, cnt + valid.to(tl.int64))
            tl.store(outf_ptr + info + s, mean)
            tl.store(outf_ptr + info + S + s, std)
            tl.store(outf_ptr + info + 2 * S + s, flag.to(tl.float32))
        pskip = pskip | hit
        skip = skip | hit
    return skip, skip_nf, pskip, coef


@triton.jit
def step_finalize_kernel(
    acc_ptr, max_ptr, nan_ptr, inf_ptr,  # partials [C] from grad_stats_chunks_kernel
    gb_ptr, tb_ptr,  # int32 [G+1], [T+1]: slot ranges of groups and tensors
    outf_ptr,  # float32 out: the program's named output layout (program.py)
    outi_ptr,  # int64 out: step
    stf_ptr,  # float32 out [T]: per-tensor norms (true scale)
    sti_ptr,  # int64 out [G]: NaN/Inf count per group
    fstate_ptr, istate_ptr,  # float32 / int64 program state (updated in place)
    table_ptr, params_ptr,  # int32 [OPS, 5] op table; float32 parameters
    loss_ptr, amp_scale_ptr, amp_found_ptr, has_grads_ptr,  # optional inputs
    G, T,  # groups; tensors (0 unless per-tensor norms are wanted)
    one_minus_alpha,  # float32: 1 - alpha of the per-group running statistics
    o_norm, o_total, o_max, o_coef, o_gs, o_fi, o_skip, o_snf, o_ssp, o_nonf, o_clip, o_run,
    NORM: tl.constexpr, RBLOCK: tl.constexpr, BLOCK_G: tl.constexpr,
    HAS_LOSS: tl.constexpr, HAS_AMP_SCALE: tl.constexpr, HAS_AMP_FOUND: tl.constexpr,
    HAS_MASK: tl.constexpr, EPILOGUE: tl.constexpr,
    OP0: tl.constexpr, OP1: tl.constexpr, OP2: tl.constexpr, OP3: tl.constexpr,
    OP4: tl.constexpr, OP5: tl.constexpr, QH: tl.constexpr, SW: tl.constexpr,
):
    # Bytes moved: program 0 reads all 16*C bytes of partials, the program state (a few KB
    # at most) and writes the outputs (~100 bytes + 40*G); program 1+t reads tensor t's 16
    # bytes per chunk and writes 4 bytes.
    pid = tl.program_id(0)
    if HAS_AMP_SCALE:
        inv = (1.0 / tl.load(amp_scale_ptr).to(tl.float64)).to(tl.float32)
    else:
        inv = 1.0
    if pid == 0:
        offs_g = tl.arange(0, BLOCK_G)
        gmask = offs_g < G
        norm = tl.zeros([BLOCK_G], dtype=tl.float32)
        mabs = tl.zeros([BLOCK_G], dtype=tl.float32)
        tot = tl.zeros((), dtype=tl.float64)
        tot_nan = tl.zeros((), dtype=tl.int64)
        tot_inf = tl.zeros((), dtype=tl.int64)
        for g in range(0, G):  # groups in order: deterministic total
            lo = tl.load(gb_ptr + g)
            hi = tl.load(gb_ptr + g + 1)
            ra, rm, cn, ci = _reduce_slots(acc_ptr, max_ptr, nan_ptr, inf_ptr, lo, hi,
                                           NORM, RBLOCK)
            norm = tl.where(offs_g == g, _finish_norm(ra, cn, ci, NORM), norm)
            mabs = tl.where(offs_g == g, rm, mabs)
            tl.store(sti_ptr + g, cn + ci)
            if NORM == 0:
                tot = tl.maximum(tot, ra)
            else:
                tot = tot + ra
            tot_nan = tot_nan + cn
            tot_inf = tot_inf + ci
        total = _finish_norm(tot, tot_nan, tot_inf, NORM)
        # ---- prelude: true scale, finiteness
        if HAS_AMP_SCALE:
            norm = norm * inv
            mabs = mabs * inv
            total = total * inv
        finite = total < float("inf")  # a norm is >= 0 or NaN
        if HAS_LOSS:
            loss = tl.load(loss_ptr)
            finite = finite & (tl.abs(loss) < float("inf"))
        else:
            loss = tl.zeros((), dtype=tl.float32)
        if HAS_AMP_FOUND:
            amp_bad = tl.load(amp_found_ptr) > 0
            finite = finite & (amp_bad == 0)
        else:
            amp_bad = tl.zeros((), dtype=tl.int1)
        skip = tl.zeros((), dtype=tl.int1)
        skip_nf = tl.zeros((), dtype=tl.int1)
        pskip = tl.zeros((), dtype=tl.int1)
        coef = tl.full([BLOCK_G], 1.0, tl.float32)
        # ---- the fused rules, in order
        if OP0 != 0:
            skip, skip_nf, pskip, coef = _op(OP0, 0, table_ptr, params_ptr, fstate_ptr,
                                             istate_ptr, outf_ptr, norm, total, loss, finite,
                                             amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
                                             HAS_AMP_SCALE, HAS_AMP_FOUND, QH, SW)
        if OP1 != 0:
            skip, skip_nf, pskip, coef = _op(OP1, 1, table_ptr, params_ptr, fstate_ptr,
                                             istate_ptr, outf_ptr, norm, total, loss, finite,
                                             amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
                                             HAS_AMP_SCALE, HAS_AMP_FOUND, QH, SW)
        if OP2 != 0:
            skip, skip_nf, pskip, coef = _op(OP2, 2, table_ptr, params_ptr, fstate_ptr,
                                             istate_ptr, outf_ptr, norm, total, loss, finite,
                                             amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
                                             HAS_AMP_SCALE, HAS_AMP_FOUND, QH, SW)
        if OP3 != 0:
            skip, skip_nf, pskip, coef = _op(OP3, 3, table_ptr, params_ptr, fstate_ptr,
                                             istate_ptr, outf_ptr, norm, total, loss, finite,
                                             amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
                                             HAS_AMP_SCALE, HAS_AMP_FOUND, QH, SW)
        if OP4 != 0:
            skip, skip_nf, pskip, coef = _op(OP4, 4, table_ptr, params_ptr, fstate_ptr,
                                             istate_ptr, outf_ptr, norm, total, loss, finite,
                                             amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
                                             HAS_AMP_SCALE, HAS_AMP_FOUND, QH, SW)
        if OP5 != 0:
            skip, skip_nf, pskip, coef = _op(OP5, 5, table_ptr, params_ptr, fstate_ptr,
                                             istate_ptr, outf_ptr, norm, total, loss, finite,
                                             amp_bad, skip, skip_nf, pskip, coef, offs_g, G,
                                             HAS_AMP_SCALE, HAS_AMP_FOUND, QH, SW)
        # ---- outputs shared by both modes
        tl.store(outf_ptr + o_norm + offs_g, norm, mask=gmask)
        tl.store(outf_ptr + o_total, total)
        tl.store(outf_ptr + o_max + offs_g, mabs, mask=gmask)
        tl.store(outf_ptr + o_coef + offs_g, coef, mask=gmask)
        tl.store(outf_ptr + o_skip, skip.to(tl.float32))
        tl.store(outf_ptr + o_snf, skip_nf.to(tl.float32))
        tl.store(outf_ptr + o_nonf, (finite == 0).to(tl.float32))
        if EPILOGUE:
            taken = skip == 0
            # running statistics of each group's norm (state before the step is output)
            r_mean = tl.load(fstate_ptr + offs_g, mask=gmask, other=0.0)
            r_var = tl.load(fstate_ptr + G + offs_g, mask=gmask, other=0.0)
            r_cnt = tl.load(fstate_ptr + 2 * G + offs_g, mask=gmask, other=0.0)
            tl.store(outf_ptr + o_run + offs_g, r_mean, mask=gmask)
            tl.store(outf_ptr + o_run + G + offs_g, r_var, mask=gmask)
            tl.store(outf_ptr + o_run + 2 * G + offs_g, r_cnt, mask=gmask)
            valid = taken & (norm < float("inf")) & gmask
            if HAS_MASK:
                valid = valid & (tl.load(has_grads_ptr + offs_g, mask=gmask, other=0) != 0)
            r_mean, r_var, r_cnt = _running_update(r_mean, r_var, r_cnt, norm, valid,
                                                   one_minus_alpha)
            tl.store(fstate_ptr + offs_g, r_mean, mask=gmask)
            tl.store(fstate_ptr + G + offs_g, r_var, mask=gmask)
            tl.store(fstate_ptr + 2 * G + offs_g, r_cnt, mask=gmask)
            clipped = (coef < 1.0) & taken & gmask
            any_clip = tl.max(clipped.to(tl.int32), axis=0)
            sspike = pskip & (skip_nf == 0)
            tl.store(outf_ptr + o_clip + offs_g, clipped.to(tl.float32), mask=gmask)
            tl.store(outf_ptr + o_ssp, sspike.to(tl.float32))
            steps = tl.load(istate_ptr) + 1
            tl.store(istate_ptr, steps)
            tl.store(istate_ptr + 1, tl.load(istate_ptr + 1) + skip.to(tl.int64))
            tl.store(istate_ptr + 2, tl.load(istate_ptr + 2) + skip_nf.to(tl.int64))
            tl.store(istate_ptr + 3, tl.load(istate_ptr + 3) + sspike.to(tl.int64))
            tl.store(istate_ptr + 4, tl.load(istate_ptr + 4) + any_clip.to(tl.int64))
            tl.store(istate_ptr + 5, tl.load(istate_ptr + 5) + (finite == 0).to(tl.int64))
            tl.store(outi_ptr, steps)
            c0 = tl.sum(tl.where(offs_g == 0, coef, 0.0), axis=0)
            if HAS_AMP_SCALE:
                gs = tl.div_rn(tl.load(amp_scale_ptr), c0)
            else:
                gs = tl.div_rn(tl.full((), 1.0, tl.float32), c0)
            tl.store(outf_ptr + o_gs, gs)
            tl.store(outf_ptr + o_fi, skip.to(tl.float32))
        else:
            tl.store(outf_ptr + o_ssp, pskip.to(tl.float32))
    else:
        t = pid - 1
        lo = tl.load(tb_ptr + t)
        hi = tl.load(tb_ptr + t + 1)
        ra, rm, cn, ci = _reduce_slots(acc_ptr, max_ptr, nan_ptr, inf_ptr, lo, hi,
                                       NORM, RBLOCK)
        tl.store(stf_ptr + t, _finish_norm(ra, cn, ci, NORM) * inv)


@triton.jit
def _store_as(y, DTYPE: tl.constexpr):
    """float32 -> DTYPE rounded to nearest even, bit-identical to torch's conversion.

    For bfloat16 the rounding is spelled out on the bits: the GPU's conversion is already
    round-to-nearest-even, but the Triton interpreter truncates, and the tests compare
    scaled gradients bit for bit with torch. NaN becomes torch's canonical 0x7FC0.
    """
    if DTYPE == tl.bfloat16:
        b = y.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(y != y, 0x7FC0, r)
        return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(DTYPE)


@triton.jit
def grad_scale_chunks_kernel(
    ptrs_ptr,  # int64 [T]: data pointer of each tensor (this call's addresses)
    meta_ptr,  # int64 [n, 5]: (tensor, element offset, length, slot, group) per chunk
    coef_ptr,  # float32 [G] (PER_GROUP) or [1]: the coefficient
    DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
    PER_GROUP: tl.constexpr,
):
    # Bytes moved per program: 4 (+8) bytes of coefficient; when coef < 1 or NaN, reads and
    # writes length * sizeof(DTYPE) bytes in place; when coef >= 1, nothing more.
    pid = tl.program_id(0)
    if PER_GROUP:
        c = tl.load(coef_ptr + tl.load(meta_ptr + pid * 5 + 4))
    else:
        c = tl.load(coef_ptr)
    if (c < 1.0) | (c != c):  # NaN scales (gives NaN), as torch's clip does
        base, n = _chunk_base(ptrs_ptr, meta_ptr, pid, DTYPE, ALIGNED)
        offs = tl.arange(0, BLOCK)
        n_full = n - n % BLOCK
        for start in range(0, n_full, BLOCK):
            s0 = tl.multiple_of(start, BLOCK)
            p = base + s0 + offs
            x = _as_f32(tl.load(p), DTYPE)
            tl.store(p, _store_as(x * c, DTYPE))
        idx = n_full + offs
        mask = idx < n
        x = _as_f32(tl.load(base + idx, mask=mask, other=0.0), DTYPE)
        tl.store(base + idx, _store_as(x * c, DTYPE), mask=mask)


def _interpreted() -> bool:
    """True when ``triton.jit`` gave interpreter functions (TRITON_INTERPRET=1 at import)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - very old/new triton layouts
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    return isinstance(grad_stats_chunks_kernel, InterpretedFunction)


#: The kernels run under the Triton interpreter (CPU tensors only).
INTERPRET = _interpreted()
