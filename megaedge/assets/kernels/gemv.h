/* The decode step's matrix-vector product y = W x over MatMulNBits 8-bit weights (see decoder.c): bound by reading
   the weights, so every thread walks several distant read streams side by side (STREAMS rows, or on AVX512 four
   packed groups of rows). */
#ifndef ME_GEMV_H
#define ME_GEMV_H
#include "common.h"

/* Sum over one block of (w - 128) * q for a row p: the portable arithmetic's integer, exactly, where no lane form
   applies (and on AVX512 for a matrix in the row layout, so that it gives the packed products' bits). */
static inline int32_t dot_block(const uint8_t *p, const int8_t *qb, int blk, int32_t asum) {
#if ME_ISA == 2
    if (blk % 64 == 0) {  /* a matrix in the row layout (me_gemv_q8, or not packed): integers, any order is exact */
        __m512i d = _mm512_maskz_set1_epi32(1, -ZERO_POINT * asum);
        for (int c = 0; c < blk; c += 64)
            d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(p + c), _mm512_loadu_si512(qb + c));
        return _mm512_reduce_add_epi32(d);
    }
    if (blk % 32 == 0) {
        __m256i d = _mm256_maskz_set1_epi32(1, -ZERO_POINT * asum);
        for (int c = 0; c < blk; c += 32)
            d = _mm256_dpbusd_epi32(d, _mm256_loadu_si256((const __m256i *)(p + c)),
                                    _mm256_loadu_si256((const __m256i *)(qb + c)));
        __m128i h = _mm_add_epi32(_mm256_castsi256_si128(d), _mm256_extracti128_si256(d, 1));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
        return _mm_cvtsi128_si32(h);
    }
#endif
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


/* rows idx[0..cnt) advanced together, block by block: cnt independent read streams. Always inlined so that the
   common cases (cnt = STREAMS, blk = 128) compile with constant trip counts and the accumulators in registers. */
static inline __attribute__((always_inline)) void rows_together(const me_linear *m, const me_act *a, float *y,
                                                                const int *idx, int cnt, int blk) {
    const int nb = m->nb;
    const size_t row_bytes = (size_t)nb * blk;
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
#if ME_ISA == 3
    if (cnt == 4 && blk % 16 == 0) {
        /* The loop below for four rows (STREAMS) with their block sums as the lanes of one vector: the rows' sums
           are integers (exact in any order, paired by vpaddq instead of one horizontal sum each), and lane r does
           what the loop does for row r, in its order: sw * sa, its product with the sum as a float, that added.
           So the bits are the loop's, with one conversion and three float operations per block for four rows. */
        const uint8_t *rows[4];
        const float *scales[4];
        for (int r = 0; r < 4; r++) {
            rows[r] = m->w + (size_t)idx[r] * row_bytes;
            scales[r] = m->s + (size_t)idx[r] * nb;
        }
        const uint8x16_t bias = vdupq_n_u8(0x80);
        float32x4_t acc = vdupq_n_f32(0.f);
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = a->q + (size_t)b * blk;
            int32x4_t d[4];
            for (int r = 0; r < 4; r++) {
                d[r] = vdupq_n_s32(0);
                for (int c = 0; c < blk; c += 16)
                    d[r] = vdotq_s32(d[r], vreinterpretq_s8_u8(veorq_u8(vld1q_u8(rows[r] + (size_t)b * blk + c), bias)),
                                     vld1q_s8(qb + c));
            }
            const int32x4_t sums = vpaddq_s32(vpaddq_s32(d[0], d[1]), vpaddq_s32(d[2], d[3]));
            const float sw[4] = {scales[0][b], scales[1][b], scales[2][b], scales[3][b]};
            const float32x4_t scale = vmulq_f32(vld1q_f32(sw), vdupq_n_f32(a->sa[b]));
            acc = vaddq_f32(acc, vmulq_f32(scale, vcvtq_f32_s32(sums)));
        }
        float out[4];
        vst1q_f32(out, acc);
        for (int r = 0; r < 4; r++) y[idx[r]] = out[r];
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

#if ME_ISA == 2
/* Packed matrices (me_linear.packed, me_pack_q8): sixteen weight rows side by side, so a vector's lanes are sixteen
   rows and a block's integer sums need no horizontal sum. Each output is the portable arithmetic (dot_block, the
   last form of rows_together, and the prompt's micro kernels): the block's integer sum exactly, then y += (sw * sa)
   * sum in block order, a multiply, a multiply and an add for sixteen rows. That costs one instruction per 64 byte
   products at blocks of 128 and one per 8 at blocks of 32, where the per-row form's fused multiply-add per row and
   block cost as much as the products themselves (blocks of 32) and a batch of eight sequences was bound by them. */
#define ME_PACKED_LANES 16
/* a group's weights are read in one sequence, so the prefetch asks for the bytes this far on, into L2 */
#define ME_PACKED_AHEAD 8192

/* Packed groups g0 .. g0 + NG (weights pw, scales ps of nb blocks of blk; `valid` rows from group g0's first are
   real) against G activation vectors: vector s's block b is q + s * q_vec + b * q_blk, its block sum and scale
   asum / sa [s * a_vec + b * a_blk]; vector s's outputs for group g0 + n go to y + s * y_vec + 16 n. The decode
   products (packed_groups) and the prompt's micro kernel (prompt_tiles.h) are this with their own layouts. NG, G
   and blk are constants where it is inlined in the hot cases, so the NG x G sums stay in registers; `ahead`: a
   decode step streams its weights once, so it asks for them ME_PACKED_AHEAD bytes on (a prompt's tile is in L2). */
static inline __attribute__((always_inline)) void packed_core(int nb, const int blk, const uint8_t *pw,
                                                              const float *ps, int g0, const int NG, int valid,
                                                              const int8_t *q, size_t q_vec, size_t q_blk,
                                                              const int32_t *asum, const float *sa, size_t a_vec,
                                                              size_t a_blk, const int G, float *y, size_t y_vec,
                                                              const int ahead) {
    const size_t gbytes = (size_t)nb * blk * ME_PACKED_LANES;
    const uint8_t *w0 = pw + (size_t)g0 * gbytes;
    const float *s0 = ps + (size_t)g0 * nb * ME_PACKED_LANES;
    __m512 acc[4][8];
    for (int n = 0; n < NG; n++)
        for (int s = 0; s < G; s++) acc[n][s] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = w0 + (size_t)b * blk * ME_PACKED_LANES;
        const int8_t *qb = q + (size_t)b * q_blk;
        __m512i d[4][8];
        for (int s = 0; s < G; s++) {  /* the zero point's share, -128 * sum(q), starts every row's sum */
            const __m512i zero_point = _mm512_set1_epi32(-ZERO_POINT * asum[(size_t)s * a_vec + (size_t)b * a_blk]);
            for (int n = 0; n < NG; n++) d[n][s] = zero_point;
        }
#pragma GCC unroll 4
        for (int j = 0; j < blk / 4; j++) {  /* inputs 4j .. 4j + 3 of the block for sixteen rows: 64 bytes */
            __m512i w[4];
            for (int n = 0; n < NG; n++) {
                const uint8_t *p = wb + n * gbytes + 64 * (size_t)j;
                if (ahead) _mm_prefetch((const char *)(p + ME_PACKED_AHEAD), _MM_HINT_T1);
                w[n] = _mm512_loadu_si512(p);
            }
            for (int s = 0; s < G; s++) {
                int32_t four;
                memcpy(&four, qb + (size_t)s * q_vec + 4 * j, 4);
                const __m512i q4 = _mm512_set1_epi32(four);
                for (int n = 0; n < NG; n++) d[n][s] = _mm512_dpbusd_epi32(d[n][s], w[n], q4);
            }
        }
        for (int s = 0; s < G; s++) {
            const __m512 scale_a = _mm512_set1_ps(sa[(size_t)s * a_vec + (size_t)b * a_blk]);
            for (int n = 0; n < NG; n++) {
                const __m512 scale = _mm512_mul_ps(_mm512_loadu_ps(s0 + ((size_t)n * nb + b) * ME_PACKED_LANES),
                                                   scale_a);
                acc[n][s] = _mm512_add_ps(acc[n][s], _mm512_mul_ps(scale, _mm512_cvtepi32_ps(d[n][s])));
            }
        }
    }
    for (int n = 0; n < NG; n++) {
        const int lanes = valid - n * ME_PACKED_LANES;
        if (lanes <= 0) break;
        const __mmask16 keep = lanes >= ME_PACKED_LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << lanes) - 1);
        for (int s = 0; s < G; s++) _mm512_mask_storeu_ps(y + s * y_vec + n * ME_PACKED_LANES, keep, acc[n][s]);
    }
}

/* Groups g0 .. g0 + NG of a packed m against G activation vectors: qi [nb][G][blk] their int8 blocks (a single
   vector's own layout for G = 1), asi [nb][G] their blocks' sums, sai [nb][G] their scales; outputs y[s * ystride
   + row]. NG groups side by side are NG read streams (a single vector needs four to keep memory busy). */
static inline __attribute__((always_inline)) void packed_groups(const me_linear *m, const int8_t *qi,
                                                                const int32_t *asi, const float *sai, const int G,
                                                                const int NG, const int blk, int g0, float *y,
                                                                size_t ystride) {
    packed_core(m->nb, blk, m->w, m->s, g0, NG, m->n - g0 * ME_PACKED_LANES, qi, blk, (size_t)G * blk, asi, sai, 1,
                G, G, y + (size_t)g0 * ME_PACKED_LANES, ystride, 1);
}

/* groups [g0, g1) of a packed m against G vectors (packed_groups), NG at a time while NG are left: four for one
   vector (four read streams), two for up to four (eight sums), one for more */
static inline __attribute__((always_inline)) void packed_span(const me_linear *m, const int8_t *qi,
                                                              const int32_t *asi, const float *sai, const int G,
                                                              int g0, int g1, float *y, size_t ystride) {
    const int NG = G == 1 ? 4 : (G <= 4 ? 2 : 1);
    int g = g0;
    if (m->blk == 128) {
        for (; g + NG <= g1; g += NG) packed_groups(m, qi, asi, sai, G, NG, 128, g, y, ystride);
        for (; g < g1; g++) packed_groups(m, qi, asi, sai, G, 1, 128, g, y, ystride);
    } else if (m->blk == 32) {
        for (; g + NG <= g1; g += NG) packed_groups(m, qi, asi, sai, G, NG, 32, g, y, ystride);
        for (; g < g1; g++) packed_groups(m, qi, asi, sai, G, 1, 32, g, y, ystride);
    } else {
        for (; g + NG <= g1; g += NG) packed_groups(m, qi, asi, sai, G, NG, m->blk, g, y, ystride);
        for (; g < g1; g++) packed_groups(m, qi, asi, sai, G, 1, m->blk, g, y, ystride);
    }
}
#endif

#if ME_ISA == 3
/* ARM packed matrices (me_pack_q8: groups of 4 rows, each 16 inputs of a block as 4 vectors of 4 inputs of the 4
   rows, signed): groups [g0, g1) against G <= 8 activation vectors, sequence s's outputs at y + s * ystride. A
   dot product by lane takes 4 inputs of one vector against the same inputs of 4 rows, so a group's block sums
   are one vector with no horizontal sum, its weight vectors serve all G sequences, and lane r does the portable
   arithmetic for row r in its order (sw * sa, times the sum as a float, added): the bits of row_block and
   rows_together. */
static inline __attribute__((always_inline)) void dot_groups(const me_linear *m, const me_act *acts, const int G,
                                                             float *y, size_t ystride, int g0, int g1,
                                                             const int blk) {
    const int nb = m->nb;
    const size_t gbytes = (size_t)nb * blk * 4;
    for (int g = g0; g < g1; g++) {
        const int8_t *wg = (const int8_t *)m->w + (size_t)g * gbytes;
        const float *sg = m->s + (size_t)g * nb * 4;
        float32x4_t acc[8];
        for (int s = 0; s < G; s++) acc[s] = vdupq_n_f32(0.f);
        for (int b = 0; b < nb; b++) {
            int32x4_t d[8];
            for (int s = 0; s < G; s++) d[s] = vdupq_n_s32(0);
            const int8_t *wb = wg + (size_t)b * blk * 4;
            for (int c = 0; c < blk; c += 16) {
                const int8x16_t w0 = vld1q_s8(wb + 4 * c), w1 = vld1q_s8(wb + 4 * c + 16),
                                w2 = vld1q_s8(wb + 4 * c + 32), w3 = vld1q_s8(wb + 4 * c + 48);
                for (int s = 0; s < G; s++) {
                    const int8x16_t q = vld1q_s8(acts[s].q + (size_t)b * blk + c);
                    d[s] = vdotq_laneq_s32(d[s], w0, q, 0);
                    d[s] = vdotq_laneq_s32(d[s], w1, q, 1);
                    d[s] = vdotq_laneq_s32(d[s], w2, q, 2);
                    d[s] = vdotq_laneq_s32(d[s], w3, q, 3);
                }
            }
            const float32x4_t sw = vld1q_f32(sg + (size_t)b * 4);
            for (int s = 0; s < G; s++)
                acc[s] = vaddq_f32(acc[s], vmulq_f32(vmulq_f32(sw, vdupq_n_f32(acts[s].sa[b])), vcvtq_f32_s32(d[s])));
        }
        const int rows = m->n - 4 * g < 4 ? m->n - 4 * g : 4;
        for (int s = 0; s < G; s++) {
            float out[4];
            vst1q_f32(out, acc[s]);
            for (int r = 0; r < rows; r++) y[s * ystride + 4 * g + r] = out[r];
        }
    }
}

/* dot_groups with the common block sizes as constants (the loops then unroll and the sums stay in registers) */
static inline __attribute__((always_inline)) void dot_groups_of(const me_linear *m, const me_act *acts, const int G,
                                                                float *y, size_t ystride, int g0, int g1) {
    if (m->blk == 32)
        dot_groups(m, acts, G, y, ystride, g0, g1, 32);
    else if (m->blk == 128)
        dot_groups(m, acts, G, y, ystride, g0, g1, 128);
    else
        dot_groups(m, acts, G, y, ystride, g0, g1, m->blk);
}
#endif

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

/* rows [lo, hi) of y = m x (lo a whole group where m is packed) */
static void gemv_span(const me_linear *m, const me_act *a, float *y, int lo, int hi) {
#if ME_ISA == 2
    if (m->packed) {
        const int groups_end = (hi + ME_PACKED_LANES - 1) / ME_PACKED_LANES;
        packed_span(m, a->q, a->asum, a->sa, 1, lo / ME_PACKED_LANES, groups_end, y, 0);
        return;
    }
#elif ME_ISA == 3
    if (m->packed) {
        dot_groups_of(m, a, 1, y, 0, lo / 4, (hi + 3) / 4);
        return;
    }
#endif
    gemv_rows(m, a, y, lo, hi);
}

/* this thread's share of y = m x, inside a parallel region */
static void gemv_share(const me_linear *m, const me_act *a, float *y) {
    int lo, hi;
    rows_share(m, &lo, &hi);
    gemv_span(m, a, y, lo, hi);
}

/* y = m x; w, sw in the row layout, or packed by me_pack_q8 where `packed` is me_pack_lanes(blk) (else 0) */
void me_gemv_q8(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum, float *y,
                int n, int nb, int blk, int threads, int packed) {
    me_linear m = {w, sw, n, nb * blk, nb, blk, packed};
    me_act a = {(int8_t *)q, (float *)sa, (int32_t *)asum};
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
#endif
    gemv_share(&m, &a, y);
}
#endif /* ME_GEMV_H */
