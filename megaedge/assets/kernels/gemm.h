/* The prompt's products Y = A W^T, several activation rows per pass over the weights (tiles from prompt_tiles.h). */
#ifndef ME_GEMM_H
#define ME_GEMM_H
#include "prompt_tiles.h"

/* weight rows [lo, hi) of Y [rows][n] = A W^T for all `rows` activation rows */
static void gemm_rows(const me_linear *m, const me_act *a, float *y, int rows, int lo, int hi, void *scratch) {
#ifdef PACKED
    /* ARM packs 16 inputs at a time (pack_tile), and for one row (a prompt's logits) packing costs more than the
       vectors save: ARM's one-row products are the decode step's (below) */
    if (m->blk % (ME_ISA == 3 ? 16 : 4) == 0 && hi > lo && (ME_ISA != 3 || rows > 1)) {
        const size_t row_bytes = (size_t)m->nb * m->blk;
        int tile = (int)(TILE_BYTES / (row_bytes * WBYTES)) / (LANES * VECS) * (LANES * VECS);
        if (tile < LANES * VECS) tile = LANES * VECS;  /* wide rows: one micro tile, the scratch was sized for it */
        uint8_t *pw = (uint8_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
        float *ps = (float *)(pw + (size_t)tile * row_bytes * WBYTES);
#ifdef ME_AMX
        const int amx = m->blk % 64 == 0 && rows >= AMX_ROWS && amx_ready();
        int8_t *ap = (int8_t *)(((uintptr_t)(ps + (size_t)tile * m->nb) + 63) & ~(uintptr_t)63);  /* after the scales */
        if (amx) {
            amx_configure();
            amx_pack_rows(m, a, rows, ap);
        }
#endif
        for (int t0 = lo; t0 < hi; t0 += tile) {
            const int count = hi - t0 < tile ? hi - t0 : tile, groups = (count + LANES - 1) / LANES;
            const uint8_t *tw = pw;
            const float *ts = ps;
            if (m->packed) {  /* the tile is already in the packed layout (t0 is a whole number of groups) */
                tw = m->w + (size_t)(t0 / LANES) * row_bytes * LANES;
                ts = m->s + (size_t)(t0 / LANES) * m->nb * LANES;
            } else {
                pack_tile(m, t0, count, pw, ps);
            }
            int first = 0;  /* rows that the AMX tiles left to the vector form */
#ifdef ME_AMX
            /* a last row group of fewer than AMX_MIN_ROWS rows costs the tiles as much as a whole one: vectors */
            for (; amx && rows - first >= AMX_MIN_ROWS; first += AMX_ROWS) {
                const int live = rows - first < AMX_ROWS ? rows - first : AMX_ROWS;
                const int8_t *rows_packed = ap + (size_t)(first / AMX_ROWS) * AMX_ROWS * row_bytes;
                for (int g = 0; g < groups; g += 2 * AMX_PAIRS) {
                    const int n0 = t0 + g * LANES, valid = count - g * LANES;
                    const int pairs = (groups - g) / 2 < AMX_PAIRS ? (groups - g) / 2 : AMX_PAIRS;
                    if (pairs > 0) amx_panel(m, a, rows_packed, tw, ts, g, pairs, first, live, y, n0, valid);
                    if (pairs < AMX_PAIRS && (groups - g) % 2)  /* an odd last group */
                        for (int r0 = first; r0 < first + live; r0 += MR)
                            micro(m, a, tw, ts, g + 2 * pairs, 1, r0, first + live - r0 < MR ? first + live - r0 : MR,
                                  y, n0 + 2 * pairs * LANES, valid - 2 * pairs * LANES);
                }
            }
#endif
            for (int r0 = first; r0 < rows; r0 += MR) {
                const int cnt = rows - r0 < MR ? rows - r0 : MR;
                for (int g = 0; g < groups; g += VECS) {
                    const int vecs = groups - g < VECS ? groups - g : VECS, n0 = t0 + g * LANES;
                    const int valid = count - g * LANES;
                    if (cnt == MR && vecs == VECS && m->blk == 128)  /* the common case with constant trip counts */
                        micro(&(me_linear){m->w, m->s, m->n, m->k, m->nb, 128, m->packed}, a, tw, ts, g, VECS, r0, MR,
                              y, n0, valid);
#if ME_ISA == 3
                    else if (cnt == MR && vecs == VECS && m->blk == 32)  /* ARM's sums stay in registers only so */
                        micro(&(me_linear){m->w, m->s, m->n, m->k, m->nb, 32, m->packed}, a, tw, ts, g, VECS, r0, MR,
                              y, n0, valid);
#endif
                    else
                        micro(m, a, tw, ts, g, vecs, r0, cnt, y, n0, valid);
                }
            }
        }
#ifdef ME_AMX
        if (amx) _tile_release();
#endif
        return;
    }
#endif
    (void)scratch;
#if ME_ISA == 3
    if (rows == 1) {  /* one row (a prompt's logits): the decode step's product, the same arithmetic as row_block */
        gemv_span(m, a, y, lo, hi);
        return;
    }
#endif
    for (int r0 = 0; r0 < rows; r0 += MR)
        for (int n = lo; n < hi; n++) row_block(m, a, y, m->n, r0, rows - r0 < MR ? rows - r0 : MR, n);
}

/* this thread's share of Y [rows][n] = A W^T, inside a parallel region; shares are whole packed groups */
static void gemm_share(const me_linear *m, const me_act *a, float *y, int rows, void *scratch) {
    int lo, hi;
#ifdef PACKED
    const int unit = LANES * VECS;
    share_of((m->n + unit - 1) / unit, &lo, &hi);
    lo *= unit;
    hi *= unit;
    gemm_rows(m, a, y, rows, lo, hi < m->n ? hi : m->n, scratch);
#else
    share_of(m->n, &lo, &hi);
    gemm_rows(m, a, y, rows, lo, hi, scratch);
#endif
}

/* LANES where this build keeps a matrix of blocks of blk in the packed layout (me_pack_q8) and its decode and prompt
   products read it in place, else 0. AVX512 and ARM; not AVX2: its tiles widen the weights to int16 (twice the
   bytes). */
int me_pack_lanes(int blk) {
#if ME_ISA == 2
    return blk % 32 == 0 ? LANES : 0;
#elif ME_ISA == 3
    return blk % 16 == 0 ? LANES : 0;
#else
    (void)blk;
    return 0;
#endif
}

/* rows [0, n) of a MatMulNBits matrix (w [n][nb][blk], sw [n][nb]) in the packed layout pack_tile makes of a tile:
   pw [ceil(n / LANES)][nb][blk / 4][LANES][4] (64-byte aligned), ps [ceil(n / LANES)][nb][LANES], rows past n zero
   weights with zero scales. A matrix is packed in parts of whole groups: w, sw and pw, ps at the part's first
   row. Returns 0, or -1 where this build keeps that block size in the row layout (me_pack_lanes). */
int me_pack_q8(const uint8_t *w, const float *sw, int n, int nb, int blk, uint8_t *pw, float *ps) {
    if (!me_pack_lanes(blk)) return -1;
#if ME_ISA == 2 || ME_ISA == 3
    me_linear m = {w, sw, n, nb * blk, nb, blk, 0};
    pack_tile(&m, 0, n, pw, ps);
#else
    (void)w, (void)sw, (void)n, (void)nb, (void)pw, (void)ps;
#endif
    return 0;
}

/* Y [rows][n] = A W^T for activation rows quantized like me_quantize's, the weights in the row layout or packed
   (`packed`, me_gemv_q8); returns 0, or -1 without memory */
int me_gemm_q8(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum, float *y,
               int rows, int n, int nb, int blk, int threads, int packed) {
    me_linear m = {w, sw, n, nb * blk, nb, blk, packed};
    me_act a = {(int8_t *)q, (float *)sa, (int32_t *)asum};
    const int team = threads > 0 ? threads : 1;
    const size_t per_thread = pack_bytes((size_t)nb * blk, rows);
    char *pack = malloc(per_thread * team + 1);
    if (!pack) return -1;
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    gemm_share(&m, &a, y, rows, pack + per_thread * thread_id());
    free(pack);
    return 0;
}
#endif /* ME_GEMM_H */
