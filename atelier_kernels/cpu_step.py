"""One decode step of a Llama-family decoder in a single Numba call, on Q8 activations (issue 13).

    layers_out = step_q8(layers, x, K, V, cos, sin, rows...)   # every layer, no Python in between

`engine.llm.npstep.NumpyStep` runs a step layer by layer from Python: per layer
about 25 NumPy operations and 8 kernel calls, ~8 ms of a 23.5 ms step on
SmolLM2 (30 layers) with Q8 activations, where llama.cpp's whole step is
13.8 ms. This kernel runs the same layers inside one compiled function:
RMSNorm, the Q8 products (`cpu_qmatmul`'s `quantize_span` and `q8a_span`), the
optional biases, RoPE, the K/V writes into the full cache, the attention, the
output projection, SwiGLU and the residuals, with llama.cpp's arithmetic
between the products (`atelier_kernels.cpu_ggml`). Its twin is NumpyStep's own path
(the same kernels called one by one), which the tests compare it with bit for
bit.

One parallel region for the whole step: every thread runs the same sequence of
phases (per layer: norm, qkv, RoPE, attention, ..., the FFN's down product)
and takes a phase's items (a row) from an atomic counter; a thread that
finds none left waits until the phase's finished-counter says all are done.
A product's rows and the attention's tasks are cut into one home range per
thread, run in order by their thread (one unbroken stream of weights; a kv
head's keys and values read once for its query heads), whose leftovers the
others take when they finish first. Launching a parallel loop per
product instead (4 x 30 per step, plus the attention's) costs a thread wake-up
each. No thread waits for a particular other one, so the step finishes with
any number of threads, one included.

What it serves (`NumpyStep._fused_layers`): Llama/Qwen2 layers (RMSNorm, RoPE,
SwiGLU) whose four products are packed matrices (Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/
Q2_K/Q3_K/Q4_K/Q5_K/Q6_K: every block type kept packed) with Q8 activations, one block type or several side by side (a
Q4_K_M file's q and k in Q5_0 or Q4_K beside a Q8_0 or Q6_K v), a full KV cache
on the CPU, Numba and AVX2. A product's input is quantised to the blocks its
parts read: Q8 blocks of 32 for the 32-value types, llama.cpp's Q8_K for the K
types (both where a projection mixes them). In a prompt (`batch`) the K types
take the arithmetic llama.cpp takes for a micro-batch (`cpu_qmatmul.prompt_kind`).
Anything else takes the layer-by-layer path.
"""

from __future__ import annotations

import functools

import numpy as np

from . import cpu_decode, cpu_ggml, cpu_qmatmul
from ._numba import atomic_intrinsics, drop_stale_cache, fma_intrinsic, jit

# set by _kernels(): module globals, as a closure variable (even a jitted function) would keep Numba's on-disk
# cache from ever matching (see cpu_qmatmul._kernels)
_quant = _quantk = _flip = _span = _prompt_kind = None
_attend = _attend_q8 = _norm_row = _swiglu_row = _fma = _add = _load = _pause = None
claim = finish = wait = take = product = part_rows = quant_row = norm_phase = worker = None
PHASES = 10  # phases per layer (see worker)
# the decode step asks for the next layer's keys and values during a layer's last products when it runs 4+ rows
# (see worker). Measured (Zen 4, 2 threads, SmolLM2 Q4_1, 8 rows, same process, on / off alternating, best of 3):
# 16.40 vs 17.68 ms a step at 140 tokens of context, 17.25 vs 19.05 at 260; at 10 (nothing to ask for) 13.80 vs
# 14.61, the machine's noise. The switch is read at each call (benchmarks compare both)
PREFETCH_KV = True
KV_EPS = 1e-8  # atelier_kernels.kv_quant's smallest scale (tested equal)
UX = False  # cpu_qmatmul.UX (set by _kernels): the Q4_0 / Q5_0 / Q8_0 tiles of rows read sign-flipped activations
# a product's items per thread and part (see product). On an AVX2 Zen 1 (2 threads, SmolLM2 Q4_1) the layers of
# one decode step took 9.1 ms with 4 items per thread claimed from one shared counter (each item a stream of
# weights started afresh), 8.0-8.2 ms with home ranges of 1 or 2 items, 8.6 with 4
ITEMS = 2


@functools.cache
def _kernels() -> dict | None:
    if jit() is None or not cpu_qmatmul.q8_available():
        return None
    drop_stale_cache(__file__, ("cpu_qmatmul.py", "cpu_ggml.py", "cpu_decode.py", "_numba.py"))
    # the step is a parallel kernel: Numba's scheduler symbols (allocate_sched, ...) must be known to LLVM
    # before its cached code is linked, or loading it aborts the process ("Symbol not found"); they are
    # registered when Numba's threading layer starts, which a fresh process has not done yet
    from numba.np.ufunc.parallel import _launch_threads

    _launch_threads()
    njit, prange = jit()  # type: ignore[misc]
    global UX
    global _quant, _quantk, _flip, _span, _prompt_kind, _attend, _norm_row, _swiglu_row, _fma, _add, _load
    global _pause, _attend_q8
    global claim, finish, wait, take, product, part_rows, quant_row, norm_phase, worker, kv_store
    cpu_qmatmul._kernels()
    cpu_ggml._kernels()
    cpu_decode._kernels()
    _attend_q8 = cpu_decode.attend_q8_task
    _quant, _flip, _span = cpu_qmatmul.quantize_span, cpu_qmatmul.flip_rows, cpu_qmatmul.q8a_span
    _quantk = cpu_qmatmul.quantize_span_k
    _prompt_kind = njit(cache=True, nogil=True, inline="always")(cpu_qmatmul.prompt_kind)  # the one rule
    UX = cpu_qmatmul.UX
    _attend, _norm_row, _swiglu_row = cpu_ggml.attend_task, cpu_ggml.rmsnorm_row, cpu_ggml.swiglu_row
    _fma = fma_intrinsic()
    _add, _load, _pause = atomic_intrinsics()

    # phase k's counters: sync[k * 16] hands out its items, sync[k * 16 + 8] counts those finished (apart:
    # one cache line each)
    @njit(cache=True, nogil=True, inline="always")
    def claim(sync, k):  # pragma: no cover - compiled
        return _add(sync, k * 16, 1)

    @njit(cache=True, nogil=True, inline="always")
    def finish(sync, k, n):  # pragma: no cover - compiled
        _add(sync, k * 16 + 8, n)

    @njit(cache=True, nogil=True, inline="always")
    def wait(sync, k, n):  # pragma: no cover - compiled
        while _load(sync, k * 16 + 8) < n:
            _pause()

    @njit(cache=True, nogil=True, inline="always")
    def take(home, ph, threads, tid, per, v):  # pragma: no cover - compiled
        # phase ph's next item for thread tid from its home range (tid + v) % threads onwards (v = 0: its own;
        # each range holds per items, claimed in order from home[(ph, range)]): (range * per + item, v), or
        # (-1, threads) once every range is taken
        while v < threads:
            u = (np.int64(tid) + v) % threads  # (a prange index may come unsigned)
            i = _add(home, (ph * threads + u) * 8, 1)
            if i < per:
                return u * per + i, v
            v += 1
        return -1, v

    @njit(cache=True, nogil=True, inline="always")
    def kv_store(src, Q, S, s, h, j):  # pragma: no cover - compiled
        # one key or value row src into an int8 cache's position j (Q / S), as `kv_quant.quantize_np` quantises
        # it (the layer-by-layer step's `npstep._int8_write`): the same fp32 operations, so the same bytes
        m = np.float32(0.0)
        for d in range(src.shape[0]):
            a = abs(src[d])
            if a > m:
                m = a
        sc = max(m, np.float32(KV_EPS)) / np.float32(127.0)
        dst = Q[s, h, j]
        for d in range(src.shape[0]):
            v = np.floor(src[d] / sc + np.float32(0.5))
            dst[d] = np.int8(min(max(v, np.float32(-127.0)), np.float32(127.0)))
        S[s, h, j] = sc

    @njit(cache=True, nogil=True)
    def product(sync, home, ph, threads, tid, xa, xqk, dxk, xsk, pqs, pd, pm, psc, pb, pkind, prows, pcol, first,
                count, R, nb, batch, out, kv):  # pragma: no cover - compiled
        # one phase: a projection's parts first .. first + count - 1 (each one block type: the columns pcol[j] ..
        # pcol[j] + prows[j] - 1 of out). Each part's output rows are cut into one home range per thread (whole
        # groups of 8 rows), each range into ITEMS items. A thread runs its own items first, in order (one
        # unbroken stream of weights per part), then claims what is left of the others' (from home[(ph, u)]):
        # the threads share the work evenly when one falls behind. Every block type runs on the Q8 blocks
        # (`q8a_span`): xa = (xq, xu, dxf, xsf), blocks of 32, for the 32-value types, xqk .. xsk (Q8_K) for the
        # K types; batch: the rows are a prompt's micro-batch (`cpu_qmatmul.prompt_kind`)
        xq, xu, dxf, xsf = xa
        per = count * ITEMS  # the items of one home range (all parts)
        done = 0
        v = 0
        while True:
            g, v = take(home, ph, threads, tid, per, v)
            if g < 0:
                break
            u, i = g // per, g % per  # home range u's item i: part j's i % ITEMS-th run of rows in range u
            j = first + i // ITEMS
            N = prows[j]
            # a home range's rows, and an item's: whole groups of 8 (Q4_1x8's unit; 4-row tiles for the others)
            span = (N + 8 * threads - 1) // (8 * threads) * 8
            chunk = (span + 8 * ITEMS - 1) // (8 * ITEMS) * 8
            n0 = min(u * span + (i % ITEMS) * chunk, N)
            n1 = min(n0 + chunk, (u + 1) * span, N)
            done += 1
            if n1 <= n0:  # (a part of fewer rows than the threads' tiles)
                continue
            kind = _prompt_kind(pkind[j], R) if batch else pkind[j]
            # the activations its type reads: the K types Q8_K ones (no sign-flipped copy), the others blocks of 32
            aq, au, ad, axs = (xqk, xqk, dxk, xsk) if 7 <= kind <= 20 else (xq, xu, dxf, xsf)
            if N == out.shape[1]:  # the projection's only part: out itself (C-contiguous, as the kernels prefer)
                part_rows(aq, au, ad, axs, pqs[j], pd[j], pm[j], psc[j], pb[j], kind, R, nb, n0, n1, out, kv)
            else:  # its columns of out
                part_rows(aq, au, ad, axs, pqs[j], pd[j], pm[j], psc[j], pb[j], kind, R, nb, n0, n1,
                          out[:, pcol[j]:pcol[j] + N], kv)
        finish(sync, ph, done)  # once per thread: an atomic add per item costs a little each
        wait(sync, ph, per * threads)

    @njit(cache=True, nogil=True)
    def part_rows(xq, xu, dxf, xsf, qs, d, m, sc, bias, kind, R, nb, n0, n1, o, kv):  # pragma: no cover - compiled
        # rows n0 .. n1 - 1 of one part into o [R, its rows]
        _span(xq, xu, dxf, xsf, qs, d.reshape(-1), m.reshape(-1), sc, kind, R, nb, n0, n1, o, kv)
        if bias.shape[0]:
            for r in range(R):
                for n in range(n0, n1):
                    o[r, n] += bias[n]

    @njit(cache=True, nogil=True, inline="always")
    def quant_row(a, r, need, xa, xqk, dxk, xsk):  # pragma: no cover - compiled
        # row r of a [R, n] to the Q8 blocks the next product's parts read (need: 1 blocks of 32, with their sign
        # bits flipped (xu) for the signed types' tiles of rows where VNNI runs them, `cpu_qmatmul.UX`; 2 Q8_K,
        # for the K types; 3 both)
        xq, xu, dxf, xsf = xa
        n = a.shape[1]
        if need & 1:
            _quant(a, xq, dxf, xsf, r, r + 1)
            if xu.size:
                _flip(xq, xu, n, r, r + 1)
        if need & 2:
            _quantk(a, xqk, dxk, xsk, r, r + 1)

    @njit(cache=True, nogil=True)
    def norm_phase(sync, ph, add, x, o, w, eps, h, need, xa, xqk, dxk, xsk):  # pragma: no cover - compiled
        # one phase over the rows: x += o (when add), RMSNorm into h, h's Q8 blocks (`quant_row`)
        R, D = x.shape
        while True:
            r = claim(sync, ph)
            if r >= R:
                break
            if add:
                for i in range(D):
                    x[r, i] += o[r, i]
            _norm_row(x[r], w, eps, h[r])
            quant_row(h, r, need, xa, xqk, dxk, xsk)
            finish(sync, ph, 1)
        wait(sync, ph, R)

    @njit(cache=True, nogil=True)
    def worker(sync, home, threads, tid, x, ln1, ln2, pqs, pd, pm, psc, pb, pkind, prows, pcol, pfirst, pcount,
               pneed, K, V, QK, SK, QV, SV, int8, cos, sin, row_slot, row_pos, row_end, H, KVH, hd, inter, eps, scale,
               batch, kvpf, h, xa, xqk, dxk, xsk, qkv, q, att, o, gu, act):  # pragma: no cover - compiled
        R, D = x.shape
        L = pfirst.shape[0]
        nq, nk = H * hd, KVH * hd
        half = hd // 2
        T = 0
        for r in range(R):
            T = max(T, row_pos[r] + 1)
        G = H // KVH
        gs = G if R * KVH >= 4 * threads else 1  # query heads per attention task
        per_row = H // gs
        n_att = R * per_row
        p = np.zeros(T + 8, np.float32)  # this thread's attention scratch
        acc = np.empty((32, hd), np.float32)
        kt = np.empty((2, hd), np.float32)  # a prompt row's key and value on their way into an int8 cache
        per = (n_att + threads - 1) // threads
        plan = np.empty(2 * per, np.int64)  # the next layer's keys and values this thread's attention reads
        cur = np.zeros(4, np.int64)
        kv0 = (K[0].reshape(-1), V[0].reshape(-1), plan, cur)
        Lmax = K.shape[3]
        ph = 0
        Lw = K.shape[3]  # positions held: the full cache's length, or an int8 cache's ring
        for layer in range(L):
            Kl = K[layer]
            Vl = V[layer]
            QKl, SKl, QVl, SVl = QK[min(layer, QK.shape[0] - 1)], SK[min(layer, SK.shape[0] - 1)], \
                QV[min(layer, QV.shape[0] - 1)], SV[min(layer, SV.shape[0] - 1)]
            cur[2] = 0  # (none asked for before the attention)
            # the last FFN output added
            norm_phase(sync, ph, layer > 0, x, o, ln1[layer], eps, h, pneed[layer, 0], xa, xqk, dxk, xsk)
            ph += 1
            product(sync, home, ph, threads, tid, xa, xqk, dxk, xsk, pqs, pd, pm, psc, pb, pkind, prows, pcol,
                    pfirst[layer, 0], pcount[layer, 0], R, D // 32, batch, qkv, kv0)
            ph += 1
            while True:  # rows: RoPE (ggml's fused multiply-adds), K and V into the cache
                r = claim(sync, ph)
                if r >= R:
                    break
                pos = row_pos[r]
                s = row_slot[r]
                if int8 == 1:  # one token per slot: the position leaving the ring first (clamped like the cache)
                    old = max(pos - Lw, 0)
                    for hh in range(KVH):
                        kv_store(Kl[s, hh, old % Lw], QKl, SKl, s, hh, old)
                        kv_store(Vl[s, hh, old % Lw], QVl, SVl, s, hh, old)
                # a prompt's row (int8 == 2) the ring will not hold after the step goes straight to int8
                direct = int8 == 2 and pos < row_end[r] - Lw
                at = pos % Lw  # the full cache: pos itself
                for hh in range(H):
                    base = hh * hd
                    for j in range(half):
                        x0 = qkv[r, base + 2 * j]
                        x1 = qkv[r, base + 2 * j + 1]
                        q[r, hh, 2 * j] = _fma(x0, cos[pos, j], -(x1 * sin[pos, j]))
                        q[r, hh, 2 * j + 1] = _fma(x0, sin[pos, j], x1 * cos[pos, j])
                for hh in range(KVH):
                    base = nq + hh * hd
                    kd = kt[0] if direct else Kl[s, hh, at]
                    vd = kt[1] if direct else Vl[s, hh, at]
                    for j in range(half):
                        x0 = qkv[r, base + 2 * j]
                        x1 = qkv[r, base + 2 * j + 1]
                        kd[2 * j] = _fma(x0, cos[pos, j], -(x1 * sin[pos, j]))
                        kd[2 * j + 1] = _fma(x0, sin[pos, j], x1 * cos[pos, j])
                    for i in range(hd):
                        vd[i] = qkv[r, nq + nk + hh * hd + i]
                    if direct:
                        kv_store(kd, QKl, SKl, s, hh, pos)
                        kv_store(vd, QVl, SVl, s, hh, pos)
                finish(sync, ph, 1)
            wait(sync, ph, R)
            ph += 1
            # the attention: (row, kv head) tasks, or (row, query head) ones when those are few (a row's 3 kv
            # heads on 2 threads would leave one idle a third of the time), in one home range of consecutive
            # tasks per thread as the products' rows (see product): the query heads of one kv head mostly on one
            # thread, which reads that head's keys and values from memory once for them
            done = 0
            v = 0
            while True:
                t, v = take(home, ph, threads, tid, per, v)
                if t < 0:
                    break
                done += 1
                if t >= n_att:
                    continue
                r = t // per_row
                g = (t - r * per_row) * gs  # the task's first query head
                if int8 and row_end[r] > Lw:  # int8 history plus the ring (in the ring alone: the full cache's sums)
                    _attend_q8(q, QKl, SKl, QVl, SVl, Kl, Vl, row_slot, row_pos, row_end, scale, att, r, g // G,
                               g % G, g % G + gs, p)
                else:
                    _attend(q, Kl, Vl, row_slot, row_pos, scale, batch, att, r, g // G, g % G, g % G + gs, p, acc)
            finish(sync, ph, done)
            wait(sync, ph, per * threads)
            ph += 1
            a2 = att.reshape(R, nq)
            while True:  # rows: the attention's output to Q8 blocks
                r = claim(sync, ph)
                if r >= R:
                    break
                quant_row(a2, r, pneed[layer, 1], xa, xqk, dxk, xsk)
                finish(sync, ph, 1)
            wait(sync, ph, R)
            ph += 1
            # while the layer's last products run (compute-bound on rows in tiles), the keys and values the next
            # layer's attention will read on this thread (its home tasks) are asked for, spread over their weight
            # rows: they then come from the caches instead of the memory stream of the attention phase
            nxt = min(layer + 1, L - 1)
            kv = (K[nxt].reshape(-1), V[nxt].reshape(-1), plan, cur)
            if kvpf and layer + 1 < L and R >= 4:
                nrun = 0
                lines = 0
                last = -1
                for t in range(tid * per, min((tid + 1) * per, n_att)):
                    r = t // per_row
                    kvh = (t - r * per_row) * gs // G
                    key = r * KVH + kvh
                    if key == last:
                        continue
                    last = key
                    plan[2 * nrun] = ((row_slot[r] * KVH + kvh) * Lmax) * hd
                    plan[2 * nrun + 1] = (row_pos[r] * hd + 15) // 16  # the positions before the new one
                    lines += plan[2 * nrun + 1]
                    nrun += 1
                rows = (D + 2 * inter + D + threads - 1) // threads
                cur[0] = 0
                cur[1] = 0
                cur[2] = (lines + rows - 1) // rows
                cur[3] = nrun
            product(sync, home, ph, threads, tid, xa, xqk, dxk, xsk, pqs, pd, pm, psc, pb, pkind, prows, pcol,
                    pfirst[layer, 1], pcount[layer, 1], R, nq // 32, batch, o, kv)
            ph += 1
            # the attention's output added
            norm_phase(sync, ph, True, x, o, ln2[layer], eps, h, pneed[layer, 2], xa, xqk, dxk, xsk)
            ph += 1
            product(sync, home, ph, threads, tid, xa, xqk, dxk, xsk, pqs, pd, pm, psc, pb, pkind, prows, pcol,
                    pfirst[layer, 2], pcount[layer, 2], R, D // 32, batch, gu, kv)
            ph += 1
            while True:  # rows: SwiGLU (ggml's exp on 8-lane groups, libm's on the rest), Q8 blocks
                r = claim(sync, ph)
                if r >= R:
                    break
                _swiglu_row(gu[r], act[r])
                quant_row(act, r, pneed[layer, 3], xa, xqk, dxk, xsk)
                finish(sync, ph, 1)
            wait(sync, ph, R)
            ph += 1
            product(sync, home, ph, threads, tid, xa, xqk, dxk, xsk, pqs, pd, pm, psc, pb, pkind, prows, pcol,
                    pfirst[layer, 3], pcount[layer, 3], R, inter // 32, batch, o, kv)
            ph += 1
        while True:  # rows: the last layer's FFN output added
            r = claim(sync, ph)
            if r >= R:
                break
            for i in range(D):
                x[r, i] += o[r, i]
            finish(sync, ph, 1)
        wait(sync, ph, R)

    @njit(parallel=True, cache=True, nogil=True)
    def layers_nb(threads, x, ln1, ln2, pqs, pd, pm, psc, pb, pkind, prows, pcol, pfirst, pcount, pneed, K, V, QK,
                  SK, QV, SV, int8, cos, sin, row_slot, row_pos, row_end, H, KVH, hd, inter, eps, scale, batch,
                  kvpf):  # pragma: no cover - compiled
        R, D = x.shape
        L = pfirst.shape[0]
        nq, nk = H * hd, KVH * hd
        kmax = max(D, nq, inter)
        sync = np.zeros((PHASES * L + 1) * 16, np.int64)
        home = np.zeros((PHASES * L + 1) * threads * 8, np.int64)  # per phase and thread: its claimed items
        h = np.empty((R, D), np.float32)
        # the activations' Q8 blocks of 32 (xq, dxf, xsf) for the 32-value types, Q8_K ones (xqk, dxk, xsk) for
        # the K types; each only where a part reads it. A signed 32-value type's tiles of rows read them
        # sign-flipped (xu: UX): only then is it filled
        flip = b32 = bk = False
        for j in range(pkind.shape[0]):
            k = pkind[j]
            if 7 <= k <= 20:
                bk = True
            else:
                b32 = True
            if k == 0 or k == 2 or k == 3 or k == 4 or k == 5 or k == 21:
                flip = True
        n32, nk8 = R * kmax if b32 else 0, R * kmax if bk else 0
        xq = np.empty(n32, np.int8)
        xu = np.empty(n32 if UX and flip and R >= 4 else 0, np.int8)
        dxf = np.empty(n32 // 32, np.float32)
        xsf = np.empty(n32 // 32, np.float32)
        xqk = np.empty(nk8, np.int8)
        dxk = np.empty(nk8 // 32, np.float32)
        xsk = np.empty(nk8 // 32, np.float32)
        xa = (xq, xu, dxf, xsf)
        qkv = np.empty((R, nq + 2 * nk), np.float32)
        q = np.empty((R, H, hd), np.float32)
        att = np.empty((R, H, hd), np.float32)
        o = np.empty((R, D), np.float32)
        gu = np.empty((R, 2 * inter), np.float32)
        act = np.empty((R, inter), np.float32)
        # one parallel region for every layer: each thread runs the same phases and takes items as it comes
        # to them; a thread that finds a phase's items gone waits for the others to finish them. No thread
        # waits for a given other one, so any number of them (one included) finish the step
        for _t in prange(threads):
            worker(sync, home, threads, _t, x, ln1, ln2, pqs, pd, pm, psc, pb, pkind, prows, pcol, pfirst, pcount,
                   pneed, K, V, QK, SK, QV, SV, int8, cos, sin, row_slot, row_pos, row_end, H, KVH, hd, inter, eps,
                   scale, batch, kvpf, h, xa, xqk, dxk, xsk, qkv, q, att, o, gu, act)

    return {"step_q8": layers_nb}


def available() -> bool:
    """Whether the fused step runs here (Numba and the AVX2 Q8 kernels)."""
    return _kernels() is not None


# the block types the step runs (a part's q8a_span kind: `cpu_qmatmul.part_kind`), Q4_1x8 included
KIND = {**cpu_qmatmul.Q8A_KIND, cpu_qmatmul.X8_FORMAT: cpu_qmatmul.X8}


class Q8Layers:
    """The per-layer arrays `step_q8` reads, gathered once (views of the model's packed arrays: no copy). A
    projection may have several parts of different block types (a Q4_K_M file's q and k in Q5_0 or Q4_K, its v
    in Q8_0 or Q6_K): parts are listed flat, pfirst / pcount [layer, projection] index them, pcol is each part's
    first output column."""

    def __init__(self, layers: list[tuple], eps: float) -> None:
        from numba.typed import List

        def lst(items: list[np.ndarray]) -> List:
            out = List()
            for a in items:
                out.append(a)
            return out

        empty = np.zeros(0, np.float32)
        none = np.zeros(0, np.uint8)
        cols: dict[str, list[np.ndarray]] = {k: [] for k in ("ln1", "ln2", "pqs", "pd", "pm", "psc", "pb")}
        kinds, rows, pcol, first, count, need = [], [], [], [], [], []
        for ln1, ln2, lins in layers:
            cols["ln1"].append(np.ascontiguousarray(ln1, np.float32))
            cols["ln2"].append(np.ascontiguousarray(ln2, np.float32))
            f_row, c_row, n_row = [], [], []
            for lin in lins:
                b = None if lin.bias is None else lin.bias.detach().numpy()
                f_row.append(len(kinds))
                c_row.append(len(lin.parts))
                # the activations' blocks its parts read: 1 blocks of 32, 2 Q8_K (the K types), 3 both
                n_row.append(int(any(p.fmt not in cpu_qmatmul.K_FORMATS for p in lin.parts))
                             | 2 * int(any(p.fmt in cpu_qmatmul.K_FORMATS for p in lin.parts)))
                col = 0
                for p in lin.parts:
                    n = p.qs.shape[0]
                    cols["pqs"].append(p.qs.reshape(-1).view(np.uint8))
                    cols["pd"].append(np.ascontiguousarray(p.d))
                    # m: the mins (Q4_1, Q5_1), dmin (Q4_K), Q6_K's high bits as uint16 (`q8a_span`), else unread
                    m = p.qh.reshape(n, -1).view(np.uint16) if p.fmt == "Q6_K" else p.m if p.m is not None else p.d
                    cols["pm"].append(np.ascontiguousarray(m))
                    # the K formats' packed scales (Q6_K's int8 as bytes), flat
                    cols["psc"].append(none if p.sc is None else p.sc.reshape(-1).view(np.uint8))
                    cols["pb"].append(empty if b is None else np.ascontiguousarray(b[col:col + n], np.float32))
                    kinds.append(cpu_qmatmul.part_kind(p.fmt, n))
                    rows.append(n)
                    pcol.append(col)
                    col += n
            first.append(f_row)
            count.append(c_row)
            need.append(n_row)
        self.lists = {k: lst(v) for k, v in cols.items()}
        self.pkind, self.prows, self.pcol = (np.asarray(v, np.int64) for v in (kinds, rows, pcol))
        self.pfirst, self.pcount, self.pneed = (np.asarray(v, np.int64) for v in (first, count, need))
        self.eps = np.float32(eps)


_NO_Q = np.zeros((1, 1, 1, 1, 1), np.int8)  # the int8 arrays' stand-ins for the full cache
_NO_S = np.zeros((1, 1, 1, 1), np.float32)


def step_q8(layers: Q8Layers, x: np.ndarray, K: np.ndarray, V: np.ndarray, cos: np.ndarray, sin: np.ndarray,
            row_slot: np.ndarray, row_pos: np.ndarray, H: int, KVH: int, hd: int, inter: int, scale: float,
            batch: bool = False, int8: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Run every layer on x [R, D] (changed in place and returned): rows are (slot, position) pairs whose K/V
    are written into K, V [layers, slots, KVH, L, hd] (the full cache) before each layer's attention. cos, sin:
    `cpu_ggml.rope_tables`; batch: the rows are several tokens of one slot (llama.cpp's prompt sums, see
    `cpu_ggml.attend`). int8: an `Int8Cache`'s (QK, SK, QV, SV), with K, V its rings; the rows one token per
    slot (a decode step: each row's position leaving the ring quantised in the step) or consecutive tokens of
    one slot (a prompt: the ring positions it pushes out quantised first, `evict_int8`, its rows the ring will
    not hold written straight to int8), as `npstep._int8_write` writes them; a row whose slot fits in the ring
    after the step attended as on the full cache, the others over int8 history plus the ring
    (`cpu_decode.attend_q8_task`): the layer-by-layer step's bits."""
    from ._numba import LOCK

    import numba

    rs, rp = np.asarray(row_slot, np.int64), np.asarray(row_pos, np.int64)
    mode, row_end = 0, rp + 1
    if int8 is not None:
        if len(set(rs.tolist())) == len(rs):
            mode = 1
        elif (rs == rs[0]).all() and (np.diff(rp) == 1).all():
            mode, row_end = 2, np.full(len(rp), rp[-1] + 1, np.int64)
            evict_int8(K, V, *int8, int(rs[0]), int(rp[0]), int(rp[-1]) + 1)
        else:
            raise ValueError("the int8 cache's fused step takes one token per slot (a decode step) or "
                             "consecutive tokens of one slot (a prompt)")
    fn = _kernels()["step_q8"]  # type: ignore[index]
    t = layers.lists
    x = np.ascontiguousarray(x, dtype=np.float32)
    QK, SK, QV, SV = int8 if int8 is not None else (_NO_Q, _NO_S, _NO_Q, _NO_S)
    with LOCK:
        fn(numba.get_num_threads(), x, t["ln1"], t["ln2"], t["pqs"], t["pd"], t["pm"], t["psc"], t["pb"],
           layers.pkind, layers.prows, layers.pcol, layers.pfirst, layers.pcount, layers.pneed, K, V, QK, SK, QV,
           SV, mode, cos, sin, rs, rp, row_end, H, KVH, hd, inter, layers.eps, np.float32(scale), bool(batch),
           bool(PREFETCH_KV) and int8 is None)
    return x


def evict_int8(RK: np.ndarray, RV: np.ndarray, QK: np.ndarray, SK: np.ndarray, QV: np.ndarray, SV: np.ndarray,
               slot: int, st: int, n: int) -> None:
    """Before a prompt's tokens st .. n - 1 of `slot` enter an int8 cache: every layer's ring positions they
    push out quantised (`kv_quant.evict_ring_np`, which `npstep._int8_write` runs layer by layer)."""
    from .kv_quant import evict_ring_np

    for layer in range(RK.shape[0]):
        for ring, Q, S in ((RK, QK, SK), (RV, QV, SV)):
            evict_ring_np(ring[layer], Q[layer], S[layer], slot, st, n)


def warm() -> list[str]:
    """Compile the fused step once with the argument types the engine passes (one tiny Q4_1 layer and one
    Q8_0 layer; the K formats' arrays have the same types); Numba's on-disk cache keeps it. Returns its name, or
    nothing where it does not run."""
    if not available():
        return []
    from types import SimpleNamespace

    D, hd, inter = 32, 32, 32

    def lin(fmt: str, n: int, k: int) -> SimpleNamespace:
        width = 32 if fmt == "Q8_0" else 16
        dt = np.int8 if fmt == "Q8_0" else np.uint8
        d = np.full((n, k // 32), 0x2000, np.uint16)
        part = SimpleNamespace(fmt=fmt, qs=np.zeros((n, k // 32, width), dt), d=d, m=None if fmt == "Q8_0" else d,
                               sc=None, qh=None)
        return SimpleNamespace(parts=[part], bias=None)

    layers = [(np.ones(D, np.float32), np.ones(D, np.float32),
               (lin(f, 3 * hd, D), lin(f, D, hd), lin(f, 2 * inter, D), lin(f, D, inter))) for f in ("Q4_1", "Q8_0")]
    K = np.zeros((2, 1, 1, 4, hd), np.float32)
    step_q8(Q8Layers(layers, 1e-5), np.ones((1, D), np.float32), K, K.copy(), np.ones((4, hd // 2), np.float32),
            np.zeros((4, hd // 2), np.float32), np.array([0]), np.array([0]), 1, 1, hd, inter, 0.5)
    return ["step_q8"]
