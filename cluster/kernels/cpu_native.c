/* CPU kernels for the engine's small per-layer ops (see cpu_native.py): each is one call where the torch
 * reference is 8 to 30 ops of a few microseconds each, and decode attention reads the paged cache in place instead
 * of gathering a padded copy. Plain C on raw pointers (no torch headers: it builds in about a second); the Python
 * side passes shapes, strides and data pointers. dt: 0 = float32, 1 = bfloat16. Arithmetic is fp32, rounded to
 * the tensor dtype where the reference's torch ops round (built with -ffp-contract=off, so no fused multiply-adds
 * the reference does not do). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float rnd(int dt, float f) { return dt ? bf2f(f2bf(f)) : f; }

static void load_row(int dt, const void *p, int64_t n, float *dst) {
    if (dt) {
        const uint16_t *s = (const uint16_t *)p;
#pragma omp simd
        for (int64_t i = 0; i < n; i++) dst[i] = bf2f(s[i]);
    } else {
        memcpy(dst, p, (size_t)n * 4);
    }
}

static void store_row(int dt, void *p, int64_t n, const float *src) {
    if (dt) {
        uint16_t *d = (uint16_t *)p;
        for (int64_t i = 0; i < n; i++) d[i] = f2bf(src[i]);
    } else {
        memcpy(p, src, (size_t)n * 4);
    }
}

static inline const void *at(int dt, const void *base, int64_t elems) {
    return (const char *)base + elems * (dt ? 2 : 4);
}

static float sum_squares(const float *x, int64_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; i++) s += x[i] * x[i];
    return s;
}

/* (x * rsqrt(mean(x^2) + eps)) rounded, times w, rounded: reference.rms_norm's order of roundings. */
static void norm_row(int dt, float *x, int64_t n, const float *w, float eps, float *out) {
    float rstd = 1.0f / sqrtf(sum_squares(x, n) / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = rnd(dt, rnd(dt, x[i] * rstd) * w[i]);
}

static void rms_norm_rows(int dt, int64_t lo, int64_t hi, int64_t n, const void *x, int64_t sx, const void *r,
                          int64_t sr, const void *pw, const void *w, float eps, void *out, void *rout) {
    float *buf = malloc((size_t)n * 4 * 4);
    float *xb = buf, *wb = buf + n, *pwb = buf + 2 * n, *ob = buf + 3 * n;
    load_row(dt, w, n, wb);
    if (pw) load_row(dt, pw, n, pwb);
    for (int64_t t = lo; t < hi; t++) {
        load_row(dt, at(dt, x, t * sx), n, xb);
        if (pw) {
            norm_row(dt, xb, n, pwb, eps, ob);
            memcpy(xb, ob, (size_t)n * 4);
        }
        if (r) {
            load_row(dt, at(dt, r, t * sr), n, ob);
            for (int64_t i = 0; i < n; i++) xb[i] = rnd(dt, xb[i] + ob[i]);
            store_row(dt, (void *)at(dt, rout, t * n), n, xb);
        }
        norm_row(dt, xb, n, wb, eps, ob);
        store_row(dt, (void *)at(dt, out, t * n), n, ob);
    }
    free(buf);
}

/* reference.rms_norm: x [rows, n] (row stride sx); r (or NULL) the residual (stride sr), added first, the sum
 * written to rout [rows, n]; pw (or NULL) a sandwich pre-norm's weight, applied to x before the add. A prefill's
 * rows are shared out over the OpenMP threads in contiguous blocks. */
void rms_norm(int dt, int64_t rows, int64_t n, const void *x, int64_t sx, const void *r, int64_t sr,
              const void *pw, const void *w, float eps, void *out, void *rout) {
    if (rows * n < 16384) {
        rms_norm_rows(dt, 0, rows, n, x, sx, r, sr, pw, w, eps, out, rout);
        return;
    }
#pragma omp parallel
    {
        int64_t k = omp_get_num_threads(), i = omp_get_thread_num(), per = (rows + k - 1) / k;
        int64_t lo = i * per, hi = lo + per < rows ? lo + per : rows;
        if (lo < hi) rms_norm_rows(dt, lo, hi, n, x, sx, r, sr, pw, w, eps, out, rout);
    }
}

/* Neox rotary of one head (halves [x1 | x2] -> [x1 c - x2 s | x2 c + x1 s]) into dst (may be src). */
static void rotate(int dt, const void *src, void *dst, int64_t d, const float *c, const float *s, float *tmp) {
    int64_t h = d / 2;
    load_row(dt, src, d, tmp);
    for (int64_t i = 0; i < h; i++) {
        float x1 = tmp[i], x2 = tmp[h + i];
        float a = x1 * c[i], b = x2 * s[i], e = x2 * c[i], f = x1 * s[i];
        tmp[d + i] = a - b;
        tmp[d + h + i] = e + f;
    }
    store_row(dt, dst, d, tmp + d);
}

/* reference.rotary_and_store for an unquantized cache [nb, page, hkv, d] (contiguous): q rotated in place; k
 * rotated and, with v, written to each token's slot (slot -1: not stored). cos_sin [max_pos, d] fp32. */
void rotary_store(int dt, int64_t T, int64_t hq, int64_t hkv, int64_t d, void *q, int64_t sqt, int64_t sqh,
                  const void *k, int64_t skt, int64_t skh, const void *v, int64_t svt, int64_t svh,
                  const int64_t *pos, const float *cos_sin, int64_t scs, void *kc, void *vc, const int64_t *slots) {
    float *tmp = malloc((size_t)d * 2 * 4);
    for (int64_t t = 0; t < T; t++) {
        const float *c = cos_sin + pos[t] * scs, *s = c + d / 2;
        for (int64_t h = 0; h < hq; h++) {
            void *p = (void *)at(dt, q, t * sqt + h * sqh);
            rotate(dt, p, p, d, c, s, tmp);
        }
        if (slots[t] < 0) continue;
        for (int64_t h = 0; h < hkv; h++) {
            int64_t row = (slots[t] * hkv + h) * d;
            rotate(dt, at(dt, k, t * skt + h * skh), (void *)at(dt, kc, row), d, c, s, tmp);
            memcpy((void *)at(dt, vc, row), at(dt, v, t * svt + h * svh), (size_t)d * (dt ? 2 : 4));
        }
    }
    free(tmp);
}

/* e^x for x <= 0 (softmax arguments) in plain arithmetic, so the loop vectorizes: 2^(x log2 e) as 2^n times a
 * degree-6 polynomial of the fraction (relative error about 2e-7; torch's own vectorized exp differs from libm's
 * in the last bit too). */
static inline float exp_neg(float x) {
    x = x < -87.0f ? -87.0f : x;
    float t = x * 1.44269504088896341f;
    float n = floorf(t), f = t - n;
    float p = 1.5353362e-4f;
    p = p * f + 1.3398874e-3f;
    p = p * f + 9.6184911e-3f;
    p = p * f + 5.5503372e-2f;
    p = p * f + 2.4022652e-1f;
    p = p * f + 6.9314718e-1f;
    p = p * f + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

/* One sequence of decode attention: its hq query heads against its L keys, each token's kv heads read together
 * (they are contiguous in the cache), page by page. Always inlined, so `attend` can make constant-head_dim
 * copies. */
static inline __attribute__((always_inline)) void attend_body(int dt, int64_t hq, int64_t hkv, int64_t d,
                                                             const void *q, int64_t sqh, const void *kc,
                                                             const void *vc, int64_t page, const int32_t *bt,
                                                             int64_t L, float scale, void *out, int64_t soh) {
    int64_t g = hq / hkv, w = hkv * d;
    float *qf = malloc((size_t)(hq * d + w + hq * L + hq * d) * 4 + 64);
    float *row = qf + hq * d, *sc = row + w, *acc = sc + hq * L;
    for (int64_t h = 0; h < hq; h++) load_row(dt, at(dt, q, h * sqh), d, qf + h * d);
    for (int64_t t0 = 0; t0 < L; t0 += page) {
        int64_t base = (int64_t)bt[t0 / page] * page, n = L - t0 < page ? L - t0 : page;
        for (int64_t o = 0; o < n; o++) {
            load_row(dt, at(dt, kc, (base + o) * w), w, row);
            for (int64_t h = 0; h < hq; h++) {
                const float *qh = qf + h * d, *kr = row + (h / g) * d;
                float s = 0.0f;
#pragma omp simd reduction(+ : s)
                for (int64_t i = 0; i < d; i++) s += qh[i] * kr[i];
                sc[h * L + t0 + o] = s * scale;
            }
        }
    }
    for (int64_t h = 0; h < hq; h++) {
        float *sh = sc + h * L, m = -INFINITY, z = 0.0f;
        for (int64_t t = 0; t < L; t++) m = sh[t] > m ? sh[t] : m;
#pragma omp simd reduction(+ : z)
        for (int64_t t = 0; t < L; t++) {
            sh[t] = exp_neg(sh[t] - m);
            z += sh[t];
        }
        float inv = 1.0f / z;
        for (int64_t t = 0; t < L; t++) sh[t] *= inv;
    }
    memset(acc, 0, (size_t)hq * d * 4);
    for (int64_t t0 = 0; t0 < L; t0 += page) {
        int64_t base = (int64_t)bt[t0 / page] * page, n = L - t0 < page ? L - t0 : page;
        for (int64_t o = 0; o < n; o++) {
            load_row(dt, at(dt, vc, (base + o) * w), w, row);
            for (int64_t h = 0; h < hq; h++) {
                float p = sc[h * L + t0 + o], *ah = acc + h * d;
                const float *vr = row + (h / g) * d;
#pragma omp simd
                for (int64_t i = 0; i < d; i++) ah[i] += p * vr[i];
            }
        }
    }
    for (int64_t h = 0; h < hq; h++) store_row(dt, (void *)at(dt, out, h * soh), d, acc + h * d);
    free(qf);
}

/* attend_body with head_dim 64 and 128 as constants (the compiler unrolls those loops), any other as it is. */
static void attend(int dt, int64_t hq, int64_t hkv, int64_t d, const void *q, int64_t sqh, const void *kc,
                   const void *vc, int64_t page, const int32_t *bt, int64_t L, float scale, void *out, int64_t soh) {
    if (d == 64)
        attend_body(dt, hq, hkv, 64, q, sqh, kc, vc, page, bt, L, scale, out, soh);
    else if (d == 128)
        attend_body(dt, hq, hkv, 128, q, sqh, kc, vc, page, bt, L, scale, out, soh);
    else
        attend_body(dt, hq, hkv, d, q, sqh, kc, vc, page, bt, L, scale, out, soh);
}

/* reference.paged_decode_attention without soft-cap, window or ALiBi, over an unquantized cache: q [B, hq, d] (one
 * query a sequence), caches [nb, page, hkv, d], block_tables [B, >= ctx/page] int32, ctx [B] int32 -> out
 * [B, hq, d]: scores, an fp32 softmax, then the weighted sum of the values. The sequences are shared out over
 * torch's OpenMP threads (this library links the libgomp torch has loaded: one pool) once there are enough keys to
 * pay for the fork. */
void decode_attention(int dt, int64_t B, int64_t hq, int64_t hkv, int64_t d, const void *q, int64_t sqb,
                      int64_t sqh, const void *kc, const void *vc, int64_t page, const int32_t *bt, int64_t sbt,
                      const int32_t *ctx, float scale, void *out, int64_t sob, int64_t soh) {
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += ctx[b];
#pragma omp parallel for schedule(dynamic, 1) if (B > 1 && work * hkv >= 4096)
    for (int64_t b = 0; b < B; b++)
        attend(dt, hq, hkv, d, at(dt, q, b * sqb), sqh, kc, vc, page, bt + b * sbt, ctx[b], scale,
                     (void *)at(dt, out, b * sob), soh);
}

/* reference.paged_attention (causal, each sequence's new queries over its whole cached context) without soft-cap,
 * window or ALiBi, over an unquantized cache, one query token at a time: token i of a sequence with ql new tokens
 * and ctx cached sits at ctx - ql + i and attends keys 0..there, read from the cache as decode does. Every key is
 * read again for every query, so this is for short prompts and chunks (the caller bounds ql x ctx); there it saves
 * the reference's per-sequence gathers, masks and SDPA calls. q [T, hq, d] (strides sqt, sqh), cu [B + 1] int32;
 * only the sequences with take[b] set are computed. */
void prefill_attention(int dt, int64_t B, int64_t hq, int64_t hkv, int64_t d, const void *q, int64_t sqt,
                       int64_t sqh, const void *kc, const void *vc, int64_t page, const int32_t *bt, int64_t sbt,
                       const int32_t *ctx, const int32_t *cu, const int32_t *take, float scale, void *out,
                       int64_t sot, int64_t soh) {
    int64_t T = 0;
    int32_t *seq = malloc((size_t)(cu[B] > 0 ? cu[B] : 1) * 8), *tok = seq + cu[B];
    for (int64_t b = 0; b < B; b++)  /* the tokens of the sequences taken (take[b]); the caller does the rest */
        for (int64_t t = cu[b]; take[b] && t < cu[b + 1]; t++, T++) seq[T] = (int32_t)b, tok[T] = (int32_t)t;
#pragma omp parallel for schedule(dynamic, 4) if (T >= 8)
    for (int64_t n = 0; n < T; n++) {
        int64_t b = seq[n], t = tok[n], ql = cu[b + 1] - cu[b], i = t - cu[b];
        attend(dt, hq, hkv, d, at(dt, q, t * sqt), sqh, kc, vc, page, bt + b * sbt, ctx[b] - ql + i + 1, scale,
                     (void *)at(dt, out, t * sot), soh);
    }
    free(seq);
}
