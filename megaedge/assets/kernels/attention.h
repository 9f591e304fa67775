/* Per position and kv head: q/k norm, rotary embedding, the KV cache write, and grouped-query attention over the
   cache. Shared by the decode step and the prompt (prefill), so both give a row the same bits. */
#ifndef ME_ATTENTION_H
#define ME_ATTENTION_H
#include "common.h"

/* ------------------------------------------------------------------ the cache in half floats (me_model.kv_half)

   Why: at eight streams attention reads the caches as many bytes as a fifth of the step (1.7B, 400 positions: 734
   MB of fp32 keys and values a step beside 1.8 GB of weights), and a cache's memory grows with every position a
   stream holds. Half floats halve both. Values are rounded to nearest even and clamped to +-65504 (a value past
   the half range would become infinite and every score after it NaN); keys are RMS-normed, so only the values
   can come near it. A row is widened to floats before use, so attention's arithmetic is the float cache's on the
   widened values; the hardware conversions (F16C, AArch64's FCVT) and the portable ones below give the same bits. */
#define ME_HALF_MAX 65504.f

static inline uint16_t me_half(float f) {  /* IEEE binary16 of f, clamped to +-65504, rounded to nearest even */
    f = f > ME_HALF_MAX ? ME_HALF_MAX : (f < -ME_HALF_MAX ? -ME_HALF_MAX : f);
    uint32_t x;
    memcpy(&x, &f, 4);
    const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((ax >> 13) & 0x3ffu));  /* NaN stays NaN */
    if (ax >= 0x38800000u) {  /* a normal half: rebias the exponent, round the 13 dropped bits to even */
        uint32_t r = ax - 0x38000000u;
        r += 0x0fffu + ((r >> 13) & 1u);
        return (uint16_t)(sign | (r >> 13));
    }
    /* a subnormal half (or zero): |f| * 2^24 is exact, and rintf rounds it to even in the default mode */
    return (uint16_t)(sign | (uint32_t)rintf(fabsf(f) * 16777216.f));
}

static inline float me_unhalf(uint16_t h) {  /* exact */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    uint32_t x;
    if (e == 0) {
        const float f = (float)m * (1.f / 16777216.f);
        memcpy(&x, &f, 4);
        x |= sign;
    } else {
        x = sign | (e == 31 ? 0x7f800000u | (m << 13) : ((e + 112u) << 23) | (m << 13));
    }
    float f;
    memcpy(&f, &x, 4);
    return f;
}

/* n floats of src into the cache row dst (half or float) */
static inline void kv_store(const me_model *m, float *dst_row, size_t at, const float *src, int n) {
    if (!m->kv_half) {
        memcpy(dst_row + at, src, sizeof(float) * n);
        return;
    }
    uint16_t *dst = (uint16_t *)dst_row + at;
    int i = 0;
#if ME_ISA == 1 || ME_ISA == 2
    const __m256 hi = _mm256_set1_ps(ME_HALF_MAX), lo = _mm256_set1_ps(-ME_HALF_MAX);
    for (; i + 8 <= n; i += 8) {  /* max/min return their second operand where one is NaN, so a NaN stays NaN */
        const __m256 v = _mm256_min_ps(hi, _mm256_max_ps(lo, _mm256_loadu_ps(src + i)));
        _mm_storeu_si128((__m128i *)(dst + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
#elif ME_ISA == 3
    const float32x4_t hi = vdupq_n_f32(ME_HALF_MAX), lo = vdupq_n_f32(-ME_HALF_MAX);
    for (; i + 4 <= n; i += 4) {  /* fmax / fmin return a NaN operand, so a NaN stays NaN */
        const float32x4_t v = vminq_f32(hi, vmaxq_f32(lo, vld1q_f32(src + i)));
        vst1_u16(dst + i, vreinterpret_u16_f16(vcvt_f16_f32(v)));
    }
#endif
    for (; i < n; i++) dst[i] = me_half(src[i]);
}

/* row `at` (n values) of a cache as floats: the row itself, or widened into tmp */
static inline const float *kv_row(const me_model *m, const float *base, size_t at, int n, float *tmp) {
    if (!m->kv_half) return base + at;
    const uint16_t *src = (const uint16_t *)base + at;
    int i = 0;
#if ME_ISA == 1 || ME_ISA == 2
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(tmp + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#elif ME_ISA == 3
    for (; i + 4 <= n; i += 4) vst1q_f32(tmp + i, vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(src + i))));
#endif
    for (; i < n; i++) tmp[i] = me_unhalf(src[i]);
    return tmp;
}

/* q/k norm and rotary embedding (rotate-half form) of one head vector in place */
static void norm_rotate(float *h, const float *weight, float eps, int dim, const float *cos, const float *sin) {
    float tmp[dim];
    rms_norm(h, weight, eps, dim, tmp);
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        h[i] = tmp[i] * cos[i] - tmp[i + half] * sin[i];
        h[i + half] = tmp[i + half] * cos[i + half] + tmp[i] * sin[i + half];
    }
}

/* The two score rows of a query pair (len each) to unnormalized softmax weights, exp(s - top) in place, and
   their sums (a value's weight is s / total); shared by the float and half forms of attention */
static inline void softmax_pair(float *restrict s0, float *restrict s1, int len, float top0, float top1,
                                float *total0, float *total1) {
    float sum0 = 0.f, sum1 = 0.f;
    me_exp_shifted(s0, (size_t)len, top0);
    me_exp_shifted(s1, (size_t)len, top1);
    for (int t = 0; t < len; t++) {
        sum0 += s0[t];
        sum1 += s1[t];
    }
    *total0 = sum0;
    *total1 = sum1;
}

/* grouped-query attention of the query heads of kv head g over positions [0, len): the heads of a group in one
   pass over the cache (each key and value loaded once for all of them), inlined per head size so that the common
   one (128) compiles with constant trip counts, the dot products unrolled and the outputs summed in registers
   (1.7B prompt of 1000 rows, 2-core AVX512 EPYC: attention 3.6 -> 1.8 s). scores: 2 * len floats. */
static inline __attribute__((always_inline)) void attend_dim(const me_model *m, const me_layer *l, int g,
                                                             const float *qh, float *out, int len,
                                                             float *restrict scores, const int dim) {
    const int group = m->heads / m->kv_heads;
    const size_t first = (size_t)g * m->capacity * dim;  /* kv head g's rows, in values (half or float) */
    float widened[dim];
    for (int j0 = 0; j0 < group; j0 += 2) {  /* two heads at a time: their sums stay in registers */
        const int pair = group - j0 < 2 ? 1 : 2;
        const float *restrict q0 = qh + (size_t)(g * group + j0) * dim, *restrict q1 = q0 + (pair - 1) * dim;
        float *restrict s0 = scores, *restrict s1 = scores + len;
        float acc0[dim], acc1[dim], top0 = -INFINITY, top1 = -INFINITY, total0, total1;
        for (int t = 0; t < len; t++) {
            const float *restrict kt = kv_row(m, l->keys, first + (size_t)t * dim, dim, widened);
#if ME_ISA == 0 || ME_ISA == 3
            /* four partial sums, lane j over inputs j, j + 4, ..., added lane by lane: the order the portable build
               had as the compiler vectorized the reduction below, now written down, so that the ARM build shares
               it by construction (left to the compiler, it followed unrelated edits to this function) */
            float x[4] = {0.f, 0.f, 0.f, 0.f}, z[4] = {0.f, 0.f, 0.f, 0.f};
            int i = 0;
#if ME_ISA == 3
            {  /* the same lanes in vectors (the compiler left the loop below scalar on ARM) */
                float32x4_t xv = vdupq_n_f32(0.f), zv = vdupq_n_f32(0.f);
                for (; i + 4 <= dim; i += 4) {
                    const float32x4_t k4 = vld1q_f32(kt + i);
                    xv = vaddq_f32(xv, vmulq_f32(vld1q_f32(q0 + i), k4));
                    zv = vaddq_f32(zv, vmulq_f32(vld1q_f32(q1 + i), k4));
                }
                vst1q_f32(x, xv);
                vst1q_f32(z, zv);
            }
#endif
            for (; i + 4 <= dim; i += 4)
                for (int j = 0; j < 4; j++) {
                    x[j] += q0[i + j] * kt[i + j];
                    z[j] += q1[i + j] * kt[i + j];
                }
            float a = ((x[0] + x[1]) + x[2]) + x[3], b = ((z[0] + z[1]) + z[2]) + z[3];
            for (; i < dim; i++) {
                a += q0[i] * kt[i];
                b += q1[i] * kt[i];
            }
#else
            float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
            for (int i = 0; i < dim; i++) {
                a += q0[i] * kt[i];
                b += q1[i] * kt[i];
            }
#endif
            s0[t] = a * m->scaling;
            s1[t] = b * m->scaling;
            top0 = s0[t] > top0 ? s0[t] : top0;  /* scores are finite: no fmaxf call for NaN's sake */
            top1 = s1[t] > top1 ? s1[t] : top1;
        }
        softmax_pair(s0, s1, len, top0, top1, &total0, &total1);
        for (int i = 0; i < dim; i++) acc0[i] = acc1[i] = 0.f;
        for (int t = 0; t < len; t++) {
            const float *restrict vt = kv_row(m, l->values, first + (size_t)t * dim, dim, widened);
            const float p0 = s0[t] / total0, p1 = s1[t] / total1;
#pragma omp simd
            for (int i = 0; i < dim; i++) {
                acc0[i] += p0 * vt[i];
                acc1[i] += p1 * vt[i];
            }
        }
        memcpy(out + (size_t)(g * group + j0) * dim, acc0, sizeof(float) * dim);
        if (pair == 2) memcpy(out + (size_t)(g * group + j0 + 1) * dim, acc1, sizeof(float) * dim);
    }
}

#if ME_ISA == 2
/* attend_dim over half caches with heads of 128, the rows widened in registers as they are read: kv_row's widening
   through a buffer cost about what the halved reads saved. Each query pair's vectors stay in registers for the
   keys; each score is the sum of its lanes in me_sum16's order; the values' weighted sums are held in registers,
   one fused multiply-add per 16 values (the float path's loops leave their order to the compiler, so only the
   two paths' arithmetic, not their bits, is the same). The same form over float caches measured no faster:
   those reads, not the arithmetic, bound it. */
static inline __m512 half16(const uint16_t *row, int c) {  /* values 16c..16c+15 of a half cache row */
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(row + 16 * c)));
}

static void attend_half128(const me_model *m, const me_layer *l, int g, const float *qh, float *out, int len,
                           float *restrict scores) {
    const int group = m->heads / m->kv_heads;
    const uint16_t *keys = (const uint16_t *)l->keys + (size_t)g * m->capacity * 128;
    const uint16_t *values = (const uint16_t *)l->values + (size_t)g * m->capacity * 128;
    for (int j0 = 0; j0 < group; j0 += 2) {
        const int pair = group - j0 < 2 ? 1 : 2;
        const float *q0 = qh + (size_t)(g * group + j0) * 128, *q1 = q0 + (pair - 1) * 128;
        float *restrict s0 = scores, *restrict s1 = scores + len;
        __m512 a[8], b[8];
        for (int c = 0; c < 8; c++) {
            a[c] = _mm512_loadu_ps(q0 + 16 * c);
            b[c] = _mm512_loadu_ps(q1 + 16 * c);
        }
        float top0 = -INFINITY, top1 = -INFINITY, total0, total1;
        for (int t = 0; t < len; t++) {
            const uint16_t *kt = keys + (size_t)t * 128;
            __m512 x = _mm512_setzero_ps(), y = _mm512_setzero_ps();
            for (int c = 0; c < 8; c++) {
                const __m512 k = half16(kt, c);
                x = _mm512_fmadd_ps(a[c], k, x);
                y = _mm512_fmadd_ps(b[c], k, y);
            }
            s0[t] = me_sum16(x) * m->scaling;
            s1[t] = me_sum16(y) * m->scaling;
            top0 = s0[t] > top0 ? s0[t] : top0;
            top1 = s1[t] > top1 ? s1[t] : top1;
        }
        softmax_pair(s0, s1, len, top0, top1, &total0, &total1);
        for (int c = 0; c < 8; c++) a[c] = b[c] = _mm512_setzero_ps();
        for (int t = 0; t < len; t++) {
            const uint16_t *vt = values + (size_t)t * 128;
            const __m512 p0 = _mm512_set1_ps(s0[t] / total0), p1 = _mm512_set1_ps(s1[t] / total1);
            for (int c = 0; c < 8; c++) {
                const __m512 v = half16(vt, c);
                a[c] = _mm512_fmadd_ps(p0, v, a[c]);
                b[c] = _mm512_fmadd_ps(p1, v, b[c]);
            }
        }
        for (int c = 0; c < 8; c++) {
            _mm512_storeu_ps(out + (size_t)(g * group + j0) * 128 + 16 * c, a[c]);
            if (pair == 2) _mm512_storeu_ps(out + (size_t)(g * group + j0 + 1) * 128 + 16 * c, b[c]);
        }
    }
}
#endif

static void attend(const me_model *m, const me_layer *l, int g, const float *qh, float *out, int len,
                   float *scores) {
#if ME_ISA == 2
    if (m->kv_half && m->head_dim == 128) {
        attend_half128(m, l, g, qh, out, len, scores);
        return;
    }
#endif
    if (m->head_dim == 128)
        attend_dim(m, l, g, qh, out, len, scores, 128);
    else
        attend_dim(m, l, g, qh, out, len, scores, m->head_dim);
}

/* One position of kv head g: its key q/k-normed and rotated, key and value stored in the cache at pos, and the
   group's query heads normed and rotated in place (q, k, v: the position's projections, all heads). */
static void cache_and_rotate(const me_model *m, const me_layer *l, int g, int pos, float *q, float *k, const float *v,
                             const float *cos, const float *sin) {
    const int dim = m->head_dim, group = m->heads / m->kv_heads;
    float *kh = k + (size_t)g * dim;
    norm_rotate(kh, l->k_norm, m->eps, dim, cos, sin);
    kv_store(m, l->keys, ((size_t)g * m->capacity + pos) * dim, kh, dim);
    kv_store(m, l->values, ((size_t)g * m->capacity + pos) * dim, v + (size_t)g * dim, dim);
    for (int j = 0; j < group; j++) norm_rotate(q + (size_t)(g * group + j) * dim, l->q_norm, m->eps, dim, cos, sin);
}
#endif /* ME_ATTENTION_H */
