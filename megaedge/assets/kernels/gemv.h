/* The decode step's matrix-vector product y = W x over MatMulNBits 8-bit weights (see decoder.c): bound by reading
   the weights, so every thread walks STREAMS distant row ranges side by side. */
#ifndef ME_GEMV_H
#define ME_GEMV_H
#include "common.h"

/* Sum over one block of (w - 128) * q for a row p, where no vector form applies. */
static inline int32_t dot_block(const uint8_t *p, const int8_t *qb, int blk, int32_t asum) {
#if ME_ISA == 3
    if (blk % 16 == 0) {
        int32x4_t d = vdupq_n_s32(0);
        for (int c = 0; c < blk; c += 16)
            d = vdotq_s32(d, vreinterpretq_s8_u8(veorq_u8(vld1q_u8(p + c), vdupq_n_u8(0x80))), vld1q_s8(qb + c));
        return vaddvq_s32(d);
    }
#endif
    int32_t d = 0;
    for (int i = 0; i < blk; i++) d += (int32_t)p[i] * (int32_t)qb[i];
    return d - ZERO_POINT * asum;
}

#if ME_ISA == 1
/* 32 bytes of (w - 128) * q summed in pairs into int32 lanes. AVX2 has no unsigned-times-signed byte product that
   cannot saturate (maddubs adds two u8*s8 into int16), so the weights are made signed and the sign moved onto q:
   |w - 128| <= 128 and |q| <= 127 keep a pair below 2^15. */
static inline __m256i dot32_avx2(const uint8_t *p, __m256i qv) {
    const __m256i ws = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi8((char)0x80));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(qv, ws));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#endif

#if ME_ISA == 2
/* How far ahead each of the STREAMS rows asks for its weights, into L2: with four rows in flight, a nearer
   prefetch into L1 left memory idle between requests (a quarter less bandwidth than this on a 2-core Zen 4). */
#define ME_SOLO_AHEAD 8192
#endif

/* rows idx[0..cnt) advanced together, block by block: cnt independent read streams. Always inlined so that the
   common cases (cnt = STREAMS, blk = 128) compile with constant trip counts and the accumulators in registers. */
static inline __attribute__((always_inline)) void rows_together(const me_linear *m, const me_act *a, float *y,
                                                                const int *idx, int cnt, int blk) {
    const int nb = m->nb;
    const size_t row_bytes = (size_t)nb * blk;
#if ME_ISA == 2
    if (blk % 64 == 0) {
        /* Each block's sum of (w - 128) * q exactly in int32 lanes: the zero point's share, -128 * sum(q), starts
           lane 0 and the byte products add to it (vpdpbusd multiplies the stored unsigned bytes), so no float
           correction is carried beside the sum; then one fused multiply-add by the block's scales per block. */
        __m512 acc[STREAMS];
        for (int r = 0; r < cnt; r++) acc[r] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = a->q + (size_t)b * blk;
            const __m512i zero_point = _mm512_maskz_set1_epi32(1, -ZERO_POINT * a->asum[b]);
            for (int r = 0; r < cnt; r++) {
                const uint8_t *p = m->w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
                _mm_prefetch((const char *)(p + ME_SOLO_AHEAD), _MM_HINT_T1);
                _mm_prefetch((const char *)(p + ME_SOLO_AHEAD + 64), _MM_HINT_T1);
                __m512i d = zero_point;
                for (int c = 0; c < blk; c += 64)
                    d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(p + c), _mm512_loadu_si512(qb + c));
                const float s = m->s[(size_t)idx[r] * nb + b] * a->sa[b];
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s), acc[r]);
            }
        }
        for (int r = 0; r < cnt; r++) y[idx[r]] = me_sum16(acc[r]);
        return;
    }
    if (blk % 32 == 0) {  /* blocks of 32: the same sums in 256-bit lanes (AVX512-VL forms of the same instructions) */
        __m256 acc[STREAMS];
        for (int r = 0; r < cnt; r++) acc[r] = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = a->q + (size_t)b * blk;
            const __m256i zero_point = _mm256_maskz_set1_epi32(1, -ZERO_POINT * a->asum[b]);
            for (int r = 0; r < cnt; r++) {
                const uint8_t *p = m->w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
                _mm_prefetch((const char *)(p + ME_SOLO_AHEAD), _MM_HINT_T1);
                __m256i d = zero_point;
                for (int c = 0; c < blk; c += 32)
                    d = _mm256_dpbusd_epi32(d, _mm256_loadu_si256((const __m256i *)(p + c)),
                                            _mm256_loadu_si256((const __m256i *)(qb + c)));
                const float s = m->s[(size_t)idx[r] * nb + b] * a->sa[b];
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s), acc[r]);
            }
        }
        for (int r = 0; r < cnt; r++) y[idx[r]] = me_sum8(acc[r]);
        return;
    }
#endif
#if ME_ISA == 1
    if (blk % 32 == 0) {  /* int32 per block, scaled into float lanes; one horizontal sum per row, not per block */
        __m256 acc[STREAMS];
        for (int r = 0; r < cnt; r++) acc[r] = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = a->q + (size_t)b * blk;
            for (int r = 0; r < cnt; r++) {
                /* no software prefetch: on AMD Zen 3 (2-core VM) any distance measured slower than the hardware's */
                const uint8_t *p = m->w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
                __m256i d = dot32_avx2(p, _mm256_loadu_si256((const __m256i *)qb));
                for (int c = 32; c < blk; c += 32)
                    d = _mm256_add_epi32(d, dot32_avx2(p + c, _mm256_loadu_si256((const __m256i *)(qb + c))));
                float s = m->s[(size_t)idx[r] * nb + b] * a->sa[b];
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(s), acc[r]);
            }
        }
        for (int r = 0; r < cnt; r++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r]), _mm256_extractf128_ps(acc[r], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[idx[r]] = _mm_cvtss_f32(h);
        }
        return;
    }
#endif
    float sum[STREAMS];
    for (int r = 0; r < cnt; r++) sum[r] = 0.f;
    for (int b = 0; b < nb; b++) {
        const int8_t *qb = a->q + (size_t)b * blk;
        for (int r = 0; r < cnt; r++) {
            const uint8_t *p = m->w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
            sum[r] += m->s[(size_t)idx[r] * nb + b] * a->sa[b] * (float)dot_block(p, qb, blk, a->asum[b]);
        }
    }
    for (int r = 0; r < cnt; r++) y[idx[r]] = sum[r];
}

/* rows [lo, hi) of y = m x: STREAMS distant row ranges side by side, then the remainder one by one */
static void gemv_rows(const me_linear *m, const me_act *a, float *y, int lo, int hi) {
    int len = (hi - lo) / STREAMS, idx[STREAMS];
    for (int j = 0; j < len; j++) {
        for (int s = 0; s < STREAMS; s++) idx[s] = lo + s * len + j;
        if (m->blk == 128)
            rows_together(m, a, y, idx, STREAMS, 128);
        else if (m->blk == 32)  /* constant too: a block is one vector, its loop must not stay a loop */
            rows_together(m, a, y, idx, STREAMS, 32);
        else
            rows_together(m, a, y, idx, STREAMS, m->blk);
    }
    for (int r = lo + STREAMS * len; r < hi; r++) {
        idx[0] = r;
        rows_together(m, a, y, idx, 1, m->blk);
    }
}

/* this thread's share of y = m x, inside a parallel region */
static void gemv_share(const me_linear *m, const me_act *a, float *y) {
    int lo, hi;
    share_of(m->n, &lo, &hi);
    gemv_rows(m, a, y, lo, hi);
}

void me_gemv_q8(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum, float *y,
                int n, int nb, int blk, int threads) {
    me_linear m = {w, sw, n, nb * blk, nb, blk};
    me_act a = {(int8_t *)q, (float *)sa, (int32_t *)asum};
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
#endif
    gemv_share(&m, &a, y);
}
#endif /* ME_GEMV_H */
