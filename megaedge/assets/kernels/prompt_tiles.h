/* The packed tiles of the prompt's products (part of decoder.c's one translation unit, so that the micro kernels
   inline): weights repacked per tile so that lanes are weight rows (AVX2/AVX512), the vector micro kernels, and
   on CPUs with AMX the int8 tile kernels. Every form gives the bits of the portable arithmetic (row_block). */
#ifndef ME_PROMPT_TILES_H
#define ME_PROMPT_TILES_H
#include "gemv.h" /* dot_block */
#include "isa.h"  /* amx_ready */

#define MR 4                    /* activation rows per pass over a packed weight tile */
#ifndef TILE_BYTES /* weights packed per tile: they stay in L2 while every row group passes */
#ifdef ME_AMX
#define TILE_BYTES (1024 * 1024) /* 2 MB L2 (Sapphire Rapids); AMX row groups are 32 rows, vectors' 4 */
#else
#define TILE_BYTES (256 * 1024)
#endif
#endif

/* The prompt's products use one arithmetic on every CPU, the portable one of rows_together: each block's integer
   dot product exactly, then y += (sw * sa) * dot in block order (a multiply, then an add). So a vector build and
   the portable C build give the same bits, and tests can hold both to a float32 emulation in numpy. */

/* y[r][n] for rows r0..r0+cnt and one weight row n, straight from the MatMulNBits layout */
static void row_block(const me_linear *m, const me_act *a, float *y, int ystride, int r0, int cnt, int n) {
    const int nb = m->nb, blk = m->blk;
    const size_t stride = (size_t)nb * blk;
    const uint8_t *w = m->w + (size_t)n * stride;
    const float *sw = m->s + (size_t)n * nb;
    float sum[MR];
    for (int r = 0; r < cnt; r++) sum[r] = 0.f;
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < cnt; r++) {
            const size_t at = (size_t)(r0 + r) * nb + b;
            sum[r] += sw[b] * a->sa[at] *
                      (float)dot_block(w + (size_t)b * blk, a->q + (size_t)(r0 + r) * stride + b * blk, blk, a->asum[at]);
        }
    for (int r = 0; r < cnt; r++) y[(size_t)(r0 + r) * ystride + n] = sum[r];
}

#if ME_ISA == 1 || ME_ISA == 2 || ME_ISA == 3
#define PACKED 1
/* Vector builds repack a tile of weights so that one vector load holds consecutive weights of LANES weight rows
   (lanes = weight rows): a block's dot products then need no horizontal sums, and its scaling is one vector
   multiply per LANES outputs instead of several instructions per output. Packed tile: AVX512 w[g][b][k/4][LANES][4]
   bytes (as stored, value + 128), AVX2 w[g][b][k/2][LANES][2] int16 (value); groups g of LANES rows, scales
   s[g][b][LANES]; rows past the matrix are zero weights with zero scales. AVX512 builds keep whole matrices in
   this layout from the start (me_pack_q8, gemm.h; me_linear.packed), and gemm_rows then reads tiles in place.
   ARM dot-product builds: w[g][b][k/4][4][4] signed bytes (value, stored ^ 0x80), groups of 4 rows, so that one
   vector is 4 inputs of 4 weight rows and a dot product by lane multiplies it by 4 inputs of one activation row. */
#if ME_ISA == 2
#define LANES 16
#define VECS 2   /* weight groups per micro tile */
#define WBYTES 1 /* bytes of a packed weight */
#elif ME_ISA == 3
#define LANES 4
#define VECS 2
#define WBYTES 1
#else
#define LANES 8
#define VECS 2
#define WBYTES 2
#endif

#if ME_ISA == 2
/* 16 rows of 16 dwords in r become 16 columns: r[j] holds dword j of every row (unpacks within 128-bit lanes,
   then a 4 x 4 transpose of the lanes) */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16], u[16];
    for (int j = 0; j < 8; j++) {
        t[2 * j] = _mm512_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm512_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
    }
    for (int j = 0; j < 4; j++) {  /* u[4j + c], lane L: dword 4L + c of rows 4j..4j+3 */
        u[4 * j] = _mm512_unpacklo_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 1] = _mm512_unpackhi_epi64(t[4 * j], t[4 * j + 2]);
        u[4 * j + 2] = _mm512_unpacklo_epi64(t[4 * j + 1], t[4 * j + 3]);
        u[4 * j + 3] = _mm512_unpackhi_epi64(t[4 * j + 1], t[4 * j + 3]);
    }
    for (int c = 0; c < 4; c++) {
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44), v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xEE);
        const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xEE);
        r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xDD);
        r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xDD);
    }
}
#endif

#if ME_ISA == 1
/* 8 rows of 8 dwords in r become 8 columns: r[j] holds dword j of every row */
static inline void transpose8(__m256i r[8]) {
    __m256i t[8], u[8];
    for (int j = 0; j < 4; j++) {
        t[2 * j] = _mm256_unpacklo_epi32(r[2 * j], r[2 * j + 1]);
        t[2 * j + 1] = _mm256_unpackhi_epi32(r[2 * j], r[2 * j + 1]);
    }
    for (int h = 0; h < 2; h++) {  /* u[4h + c], lane L: dword 4L + c of rows 4h..4h+3 */
        u[4 * h] = _mm256_unpacklo_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 1] = _mm256_unpackhi_epi64(t[4 * h], t[4 * h + 2]);
        u[4 * h + 2] = _mm256_unpacklo_epi64(t[4 * h + 1], t[4 * h + 3]);
        u[4 * h + 3] = _mm256_unpackhi_epi64(t[4 * h + 1], t[4 * h + 3]);
    }
    for (int c = 0; c < 4; c++) {
        r[c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x20);
        r[4 + c] = _mm256_permute2x128_si256(u[c], u[4 + c], 0x31);
    }
}
#endif

static void pack_tile(const me_linear *m, int t0, int count, uint8_t *pw, float *ps) {
    const int nb = m->nb, blk = m->blk, groups = (count + LANES - 1) / LANES;
    const size_t row_bytes = (size_t)nb * blk;
    for (int g = 0; g < groups; g++)
        for (int b = 0; b < nb; b++)
            for (int lane = 0; lane < LANES; lane++) {
                const int i = g * LANES + lane;
                ps[((size_t)g * nb + b) * LANES + lane] = i < count ? m->s[(size_t)(t0 + i) * nb + b] : 0.f;
            }
    /* the rows a group later (this tile's or the next one's) are fetched while this group is packed: the hardware
       prefetcher does not follow 16 rows read side by side, and packing waited on memory for half its time */
#define PREFETCH_NEXT_GROUP(g)                                                                     \
    for (int ahead = ((g) + 1) * LANES; ahead < ((g) + 2) * LANES && t0 + ahead < m->n; ahead++) \
        for (size_t c = 0; c < row_bytes; c += 64) __builtin_prefetch(m->w + (size_t)(t0 + ahead) * row_bytes + c);
#if ME_ISA == 2
    if (blk % 64 == 0) {  /* 64 bytes of 16 rows at a time, transposed in registers (scalar: 3.5 GB/s) */
        for (int g = 0; g < groups; g++) {
            PREFETCH_NEXT_GROUP(g)
            for (int b = 0; b < nb; b++) {
                for (int c = 0; c < blk; c += 64) {
                    __m512i r[16];
                    for (int lane = 0; lane < LANES; lane++) {
                        const int i = g * LANES + lane;
                        r[lane] = i < count ? _mm512_loadu_si512(m->w + (size_t)(t0 + i) * row_bytes + (size_t)b * blk + c)
                                            : _mm512_set1_epi8((char)0x80);  /* stored value + 128: a zero weight */
                    }
                    transpose16(r);
                    uint8_t *dst = pw + (((size_t)g * nb + b) * blk + c) * LANES;
                    for (int j = 0; j < 16; j++) _mm512_store_si512(dst + 64 * j, r[j]);
                }
            }
        }
        return;
    }
    if (blk == 32) {  /* two adjacent blocks of 32 are 64 contiguous bytes of a row: the same transpose, and each
                         half of its output lands where its block's packed bytes go (an odd last block alone) */
        for (int g = 0; g < groups; g++) {
            PREFETCH_NEXT_GROUP(g)
            for (int b = 0; b < nb; b += 2) {
                const int both = b + 1 < nb;
                __m512i r[16];
                for (int lane = 0; lane < LANES; lane++) {
                    const int i = g * LANES + lane;
                    const uint8_t *src = m->w + (size_t)(t0 + i) * row_bytes + (size_t)b * blk;
                    r[lane] = i >= count ? _mm512_set1_epi8((char)0x80)  /* stored value + 128: a zero weight */
                              : both ? _mm512_loadu_si512(src)
                                     : _mm512_mask_loadu_epi8(_mm512_set1_epi8((char)0x80), 0xffffffffULL, src);
                }
                transpose16(r);
                uint8_t *dst = pw + ((size_t)g * nb + b) * blk * LANES;
                for (int j = 0; j < (both ? 16 : 8); j++) _mm512_store_si512(dst + 64 * j, r[j]);
            }
        }
        return;
    }
#endif
#if ME_ISA == 1
    if (blk % 16 == 0) {  /* 16 inputs of 8 rows at a time: widened to int16 pairs, transposed in registers */
        for (int g = 0; g < groups; g++) {
            PREFETCH_NEXT_GROUP(g)
            for (int b = 0; b < nb; b++) {
                for (int c = 0; c < blk; c += 16) {
                    __m256i r[8];
                    for (int lane = 0; lane < LANES; lane++) {
                        const int i = g * LANES + lane;
                        r[lane] = i < count ? _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128(
                                                  (const __m128i *)(m->w + (size_t)(t0 + i) * row_bytes + (size_t)b * blk + c))),
                                                  _mm256_set1_epi16(ZERO_POINT))
                                            : _mm256_setzero_si256();  /* a zero weight */
                    }
                    transpose8(r);
                    uint8_t *dst = pw + (((size_t)g * nb + b) * blk + c) * LANES * WBYTES;
                    for (int j = 0; j < 8; j++) _mm256_store_si256((__m256i *)(dst + 32 * j), r[j]);
                }
            }
        }
        return;
    }
#endif
#if ME_ISA == 3
    if (blk % 16 == 0) {  /* 16 inputs of 4 rows at a time: a 4 x 4 transpose of 4-byte words, made signed */
        const uint8x16_t bias = vdupq_n_u8(0x80);
        for (int g = 0; g < groups; g++) {
            PREFETCH_NEXT_GROUP(g)
            for (int b = 0; b < nb; b++)
                for (int c = 0; c < blk; c += 16) {
                    uint32x4_t r[4];
                    for (int lane = 0; lane < LANES; lane++) {
                        const int i = g * LANES + lane;
                        uint8x16_t v = vdupq_n_u8(0);  /* a zero weight */
                        if (i < count)
                            v = veorq_u8(vld1q_u8(m->w + (size_t)(t0 + i) * row_bytes + (size_t)b * blk + c), bias);
                        r[lane] = vreinterpretq_u32_u8(v);
                    }
                    /* pairs of rows interleaved by word, then by double word: out[j] = word j of rows 0-3 */
                    const uint64x2_t p0 = vreinterpretq_u64_u32(vtrn1q_u32(r[0], r[1])),
                                     p1 = vreinterpretq_u64_u32(vtrn2q_u32(r[0], r[1])),
                                     p2 = vreinterpretq_u64_u32(vtrn1q_u32(r[2], r[3])),
                                     p3 = vreinterpretq_u64_u32(vtrn2q_u32(r[2], r[3]));
                    uint8_t *dst = pw + (((size_t)g * nb + b) * blk + c) * LANES;
                    vst1q_u8(dst, vreinterpretq_u8_u64(vtrn1q_u64(p0, p2)));
                    vst1q_u8(dst + 16, vreinterpretq_u8_u64(vtrn1q_u64(p1, p3)));
                    vst1q_u8(dst + 32, vreinterpretq_u8_u64(vtrn2q_u64(p0, p2)));
                    vst1q_u8(dst + 48, vreinterpretq_u8_u64(vtrn2q_u64(p1, p3)));
                }
        }
        return;
    }
#endif
    for (int g = 0; g < groups; g++) {
        PREFETCH_NEXT_GROUP(g)
        for (int lane = 0; lane < LANES; lane++) {
            const int i = g * LANES + lane;
            const uint8_t *src = i < count ? m->w + (size_t)(t0 + i) * row_bytes : NULL;
            for (int b = 0; b < nb; b++) {
                const uint8_t *sb = src ? src + (size_t)b * blk : NULL;
#if ME_ISA == 2 || ME_ISA == 3
                uint32_t *dst = (uint32_t *)(pw + ((size_t)g * nb + b) * blk * LANES) + lane;
                for (int k4 = 0; k4 < blk / 4; k4++) {
                    uint32_t v = 0x80808080u;  /* stored value + 128: 128 is a zero weight */
                    if (sb) memcpy(&v, sb + 4 * k4, 4);
                    dst[(size_t)k4 * LANES] = ME_ISA == 3 ? v ^ 0x80808080u : v;  /* ARM: the signed value */
                }
#else
                int16_t *dst = (int16_t *)(pw + ((size_t)g * nb + b) * blk * LANES * WBYTES) + 2 * lane;
                for (int k2 = 0; k2 < blk / 2; k2++) {
                    dst[(size_t)k2 * 2 * LANES] = sb ? (int16_t)(sb[2 * k2] - ZERO_POINT) : 0;
                    dst[(size_t)k2 * 2 * LANES + 1] = sb ? (int16_t)(sb[2 * k2 + 1] - ZERO_POINT) : 0;
                }
#endif
            }
        }
    }
#undef PREFETCH_NEXT_GROUP
}

/* rows r0..r0+cnt times VECS packed groups starting at group g0 (weight rows n0..): cnt <= MR */
static inline __attribute__((always_inline)) void micro(const me_linear *m, const me_act *a, const uint8_t *pw,
                                                        const float *ps, int g0, int vecs, int r0, int cnt,
                                                        float *y, int n0, int valid) {
    const int nb = m->nb, blk = m->blk;
    const size_t stride = (size_t)nb * blk, gbytes = stride * LANES;
#if ME_ISA == 2
    (void)gbytes;
    packed_core(nb, blk, pw, ps, g0, vecs, valid, a->q + (size_t)r0 * stride, stride, blk, a->asum + (size_t)r0 * nb,
                a->sa + (size_t)r0 * nb, nb, 1, cnt, y + (size_t)r0 * m->n + n0, m->n, 0);
#else
    float tile[MR][VECS][LANES];  /* the sums as floats, for the stores below */
#if ME_ISA == 3
    /* Per block, the int32 sums of cnt activation rows by 4 * vecs weight rows: each dot product by lane takes 4
       inputs of one activation row (lane j of a 16-input load) against the same 4 inputs of 4 weight rows, so a
       weight vector serves every activation row and no sum is horizontal. Then row_block's scaling per lane, in
       its order: sw * sa, times the sum as a float, added (ps holds sw; the product of two floats is the same
       either way round). */
    float32x4_t acc[MR][VECS];
    for (int r = 0; r < cnt; r++)
        for (int v = 0; v < vecs; v++) acc[r][v] = vdupq_n_f32(0.f);
    for (int b = 0; b < nb; b++) {
        int32x4_t d[MR][VECS];
        for (int r = 0; r < cnt; r++)
            for (int v = 0; v < vecs; v++) d[r][v] = vdupq_n_s32(0);
        const int8_t *wb = (const int8_t *)(pw + (size_t)g0 * gbytes + (size_t)b * blk * LANES);
        for (int c = 0; c < blk; c += 16) {
            int8x16_t q[MR];
            for (int r = 0; r < cnt; r++) q[r] = vld1q_s8(a->q + (size_t)(r0 + r) * stride + (size_t)b * blk + c);
            const int8_t *wc = wb + (size_t)c * LANES;
#define ME_DOT_LANE(j)                                                                     \
    {                                                                                      \
        int8x16_t w[VECS];                                                                 \
        for (int v = 0; v < vecs; v++) w[v] = vld1q_s8(wc + v * gbytes + 16 * (j));       \
        for (int r = 0; r < cnt; r++)                                                      \
            for (int v = 0; v < vecs; v++) d[r][v] = vdotq_laneq_s32(d[r][v], w[v], q[r], j); \
    }
            ME_DOT_LANE(0)
            ME_DOT_LANE(1)
            ME_DOT_LANE(2)
            ME_DOT_LANE(3)
#undef ME_DOT_LANE
        }
        for (int r = 0; r < cnt; r++) {
            const float32x4_t sa = vdupq_n_f32(a->sa[(size_t)(r0 + r) * nb + b]);
            for (int v = 0; v < vecs; v++) {
                const float32x4_t s = vmulq_f32(vld1q_f32(ps + ((size_t)(g0 + v) * nb + b) * LANES), sa);
                acc[r][v] = vaddq_f32(acc[r][v], vmulq_f32(s, vcvtq_f32_s32(d[r][v])));
            }
        }
    }
    for (int r = 0; r < cnt; r++)
        for (int v = 0; v < vecs; v++) vst1q_f32(tile[r][v], acc[r][v]);
#else /* AVX2 */
    /* AVX2 has no int8 product that is exact without a sign fix-up per pair (maddubs saturates), which made the
       int8 form 3 multiply-port instructions per 32 products; with 16-bit weights (packed) and 16-bit activations
       (widened per block) one madd makes 16 exact products, and per 32 that is 2 (2-core AMD Zen 3 VM, 400 rows at
       the 1.7B shapes, best of interleaved runs: 72-79 -> 78-101 GMAC/s; at 140 rows within that VM's noise;
       unrolled by 4, without which the compiler's accumulator copies made it slower than the int8 form). */
    int16_t qw[MR][blk] __attribute__((aligned(32)));
    __m256 acc[MR][VECS];
    for (int r = 0; r < cnt; r++)
        for (int v = 0; v < vecs; v++) acc[r][v] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        for (int r = 0; r < cnt; r++) {
            const int8_t *qb = a->q + (size_t)(r0 + r) * stride + (size_t)b * blk;
            for (int i = 0; i < blk; i++) qw[r][i] = qb[i];
        }
        __m256i d[MR][VECS];
        for (int r = 0; r < cnt; r++)
            for (int v = 0; v < vecs; v++) d[r][v] = _mm256_setzero_si256();
        const int16_t *wb = (const int16_t *)(pw + (size_t)g0 * gbytes * WBYTES + (size_t)b * blk * LANES * WBYTES);
#pragma GCC unroll 4
        for (int k2 = 0; k2 < blk / 2; k2++) {
            __m256i w[VECS];
            for (int v = 0; v < vecs; v++)
                w[v] = _mm256_loadu_si256((const __m256i *)(wb + v * gbytes + (size_t)k2 * 2 * LANES));
            for (int r = 0; r < cnt; r++) {
                int32_t two;
                memcpy(&two, &qw[r][2 * k2], 4);
                const __m256i q2 = _mm256_set1_epi32(two);
                for (int v = 0; v < vecs; v++) d[r][v] = _mm256_add_epi32(_mm256_madd_epi16(w[v], q2), d[r][v]);
            }
        }
        for (int r = 0; r < cnt; r++) {
            const __m256 sa = _mm256_set1_ps(a->sa[(size_t)(r0 + r) * nb + b]);
            for (int v = 0; v < vecs; v++) {
                const __m256 s = _mm256_mul_ps(_mm256_loadu_ps(ps + ((size_t)(g0 + v) * nb + b) * LANES), sa);
                acc[r][v] = _mm256_add_ps(acc[r][v], _mm256_mul_ps(s, _mm256_cvtepi32_ps(d[r][v])));
            }
        }
    }
    for (int r = 0; r < cnt; r++)
        for (int v = 0; v < vecs; v++) _mm256_storeu_ps(tile[r][v], acc[r][v]);
#endif
    /* the outputs of the real weight rows (`valid` from n0 on; a last group's padding rows are dropped) */
    for (int r = 0; r < cnt; r++)
        for (int v = 0; v < vecs && valid - v * LANES > 0; v++) {
            float *out = y + (size_t)(r0 + r) * m->n + n0 + v * LANES;
            if (valid - v * LANES >= LANES)
                memcpy(out, tile[r][v], sizeof(float) * LANES);  /* a constant size: one vector store */
            else
                memcpy(out, tile[r][v], sizeof(float) * (valid - v * LANES));
        }
#endif
}
#endif

#ifdef ME_AMX
/* AMX: one tile instruction multiplies 16 rows by 16 weight rows over 64 inputs (16K products), against 64 for an
   AVX512 dpbusd. The tiles (palette 1): 0-3 the int32 sums of 2 x 16 activation rows by 2 x 16 weight rows, 4-5 the
   activation rows (16 x 64 bytes, from amx_pack_rows' per-block copy), 6-7 the weights (64 inputs of 16 weight
   rows, 16 x 64 bytes: exactly pack_tile's AVX512 layout). Block by block the sums leave the tiles and are scaled
   and added as micro() does, so the bits are those of every other build. */
#define AMX_ROWS 32
#define AMX_MIN_ROWS 8

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

static void amx_configure(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* AMX_ROWS activation rows from r0 times `pairs` pairs of packed groups from g0 (weight rows n0.., `valid` of them
   real). Blocks outermost: a block's activation rows (AMX_ROWS x blk bytes) are read from L2 once and then from L1
   for every pair, where pairs outermost read all of a row group's activations again per pair (measured: 1.5x). */
#define AMX_PAIRS 8
static void amx_panel(const me_linear *m, const me_act *a, const int8_t *ap, const uint8_t *pw, const float *ps,
                      int g0, int pairs, int r0, int live, float *y, int n0, int valid) {
    const int nb = m->nb, blk = m->blk, cols = 2 * LANES;
    const size_t gbytes = (size_t)nb * blk * LANES;
    float acc[AMX_PAIRS][AMX_ROWS][2 * LANES] __attribute__((aligned(64)));
    int32_t sums[4][16][LANES] __attribute__((aligned(64)));
    memset(acc, 0, sizeof(acc[0]) * pairs);
    for (int b = 0; b < nb; b++)
        for (int p = 0; p < pairs; p++) {
            const int8_t *q0 = ap + (size_t)b * AMX_ROWS * blk, *q1 = q0 + 16 * blk;
            const uint8_t *w0 = pw + (size_t)(g0 + 2 * p) * gbytes, *w1 = w0 + gbytes;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int c = 0; c < blk; c += 64) {
                const size_t wat = ((size_t)b * blk + c) * LANES;  /* input c of block b: packed row wat / 64 */
                _tile_loadd(4, q0 + c, blk);
                _tile_loadd(5, q1 + c, blk);
                _tile_loadd(6, w0 + wat, 4 * LANES);
                _tile_loadd(7, w1 + wat, 4 * LANES);
                _tile_dpbsud(0, 4, 6);  /* signed activations times unsigned stored weights (value + 128) */
                _tile_dpbsud(1, 4, 7);
                _tile_dpbsud(2, 5, 6);
                _tile_dpbsud(3, 5, 7);
            }
            _tile_stored(0, sums[0], 4 * LANES);
            _tile_stored(1, sums[1], 4 * LANES);
            _tile_stored(2, sums[2], 4 * LANES);
            _tile_stored(3, sums[3], 4 * LANES);
            const __m512 sw0 = _mm512_loadu_ps(ps + ((size_t)(g0 + 2 * p) * nb + b) * LANES);
            const __m512 sw1 = _mm512_loadu_ps(ps + ((size_t)(g0 + 2 * p + 1) * nb + b) * LANES);
            for (int r = 0; r < live; r++) {
                const size_t at = (size_t)(r0 + r) * nb + b;
                const __m512i corr = _mm512_set1_epi32(ZERO_POINT * a->asum[at]);
                const __m512 sa = _mm512_set1_ps(a->sa[at]);
                const int32_t *d0 = sums[(r / 16) * 2][r % 16], *d1 = sums[(r / 16) * 2 + 1][r % 16];
                const __m512 s0 = _mm512_mul_ps(sw0, sa), s1 = _mm512_mul_ps(sw1, sa);
                float *out = acc[p][r];
                __m512 x0 = _mm512_load_ps(out), x1 = _mm512_load_ps(out + LANES);
                x0 = _mm512_add_ps(x0, _mm512_mul_ps(s0, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(d0), corr))));
                x1 = _mm512_add_ps(x1, _mm512_mul_ps(s1, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(d1), corr))));
                _mm512_store_ps(out, x0);
                _mm512_store_ps(out + LANES, x1);
            }
        }
    for (int p = 0; p < pairs; p++)
        for (int r = 0; r < live; r++)
            for (int v = 0; v < 2; v++) {
                const int lanes = valid - p * cols - v * LANES;
                if (lanes <= 0) break;
                _mm512_mask_storeu_ps(y + (size_t)(r0 + r) * m->n + n0 + p * cols + v * LANES,
                                      lanes >= LANES ? (__mmask16)0xFFFF : (__mmask16)((1u << lanes) - 1),
                                      _mm512_load_ps(acc[p][r] + v * LANES));
            }
}

/* The activation rows of AMX work, [row group][block][AMX_ROWS][blk], rows past `rows` zero: a tile then reads 16
   rows blk bytes apart. Read in place, rows k bytes apart fall into two of L1's 64 sets at the 1.7B widths (2048,
   6144), evict one another, and every pass over a weight pair reloads them from L2 (measured: ~25 % of the time). */
static void amx_pack_rows(const me_linear *m, const me_act *a, int rows, int8_t *ap) {
    const int nb = m->nb, blk = m->blk;
    const size_t stride = (size_t)nb * blk;
    for (int g = 0; g * AMX_ROWS < rows; g++)
        for (int b = 0; b < nb; b++)
            for (int r = 0; r < AMX_ROWS; r++) {
                int8_t *dst = ap + (((size_t)g * nb + b) * AMX_ROWS + r) * blk;
                const int row = g * AMX_ROWS + r;
                if (row < rows)
                    memcpy(dst, a->q + (size_t)row * stride + (size_t)b * blk, blk);
                else
                    memset(dst, 0, blk);
            }
}
#endif

/* bytes of the per-thread scratch gemm_rows packs a tile into, for products of at most k_padded inputs: a tile's
   weights and scales (each at most TILE_BYTES, or one micro tile of the widest rows) and alignment, and with AMX
   the copy of `rows` activation rows */
static size_t pack_bytes(size_t k_padded, int rows) {
#ifdef PACKED
    size_t bytes = 2 * (TILE_BYTES + (size_t)LANES * VECS * k_padded * WBYTES) + 64;
#ifdef ME_AMX
    bytes += ((size_t)rows + AMX_ROWS) * k_padded;  /* amx_pack_rows' copy */
#endif
    (void)rows;
    return bytes;
#else
    (void)k_padded;
    (void)rows;
    return 0;
#endif
}

#endif /* ME_PROMPT_TILES_H */
