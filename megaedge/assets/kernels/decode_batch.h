/* Decode steps of several independent sequences (streams) in one call: every weight block is read once for all of
   them, and each sequence attends over its own KV cache.

   Why: a decode step reads every decoder weight once and does ~2 multiply-adds per weight byte, so on its own it is
   bound by memory; B sequences stepping together reuse each weight block from L1 B times, so the same read feeds
   B tokens until the int8 products become the limit. Every sequence's arithmetic is the single step's exactly
   (packed_groups for up to eight activation vectors on AVX512, rows_batch_avx2 and rows_batch rows_together's
   per-row order elsewhere; quantization, attention and SwiGLU are the same functions), so a sequence stepped in a batch of any
   size gets the bits it gets alone. */
#ifndef ME_DECODE_BATCH_H
#define ME_DECODE_BATCH_H
#include "attention.h"
#include "gemv.h"
#include "lora.h"
#include "quantize.h"

#define ME_MAX_BATCH 16
/* sequences a row's weight block is read for while it is in registers (see gemv_batch_share) */
#define ME_BATCH_GROUP 8
/* rows, or packed groups of 16 rows, a group of sequences goes over before the next group (gemv_batch_share) */
#define ME_BATCH_TILE 16
#define ME_PACKED_TILE 4

/* whether a product reads its activations through interleave_input's copy: AVX512's packed products, and AVX2's
   batched rows of blocks of 32 to 128 (rows_batch_avx2); the others read each sequence's own vectors */
static inline int interleaved(const me_linear *m) {
#if ME_ISA == 2
    return m->packed != 0;
#elif ME_ISA == 1
    return m->blk % 32 == 0 && m->blk <= 128;
#else
    (void)m;
    return 0;
#endif
}

/* Row r of m against B activation vectors: y[b * ystride + r] for each b, each summed exactly as rows_together
   sums one row for one activation vector (block order, the same vector operations, the same final reduction).
   A matrix in the row layout; AVX512 and ARM builds pack theirs (packed_span, dot_groups). */
static inline __attribute__((always_inline)) void rows_batch(const me_linear *m, const me_act *acts, int B,
                                                             float *y, size_t ystride, int r, int blk) {
    const int nb = m->nb;
    const uint8_t *row = m->w + (size_t)r * nb * blk;
    const float *sw = m->s + (size_t)r * nb;
#if ME_ISA == 1
    if (blk % 32 == 0) {
        __m256 acc[ME_MAX_BATCH];
        for (int b = 0; b < B; b++) acc[b] = _mm256_setzero_ps();
        for (int k = 0; k < nb; k++) {
            const uint8_t *p = row + (size_t)k * blk;
            for (int b = 0; b < B; b++) {
                const int8_t *qb = acts[b].q + (size_t)k * blk;
                __m256i d = dot32_avx2(p, _mm256_loadu_si256((const __m256i *)qb));
                for (int c = 32; c < blk; c += 32)
                    d = _mm256_add_epi32(d, dot32_avx2(p + c, _mm256_loadu_si256((const __m256i *)(qb + c))));
                acc[b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_set1_ps(sw[k] * acts[b].sa[k]), acc[b]);
            }
        }
        for (int b = 0; b < B; b++) {
            __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[b]), _mm256_extractf128_ps(acc[b], 1));
            h = _mm_add_ps(h, _mm_movehl_ps(h, h));
            h = _mm_add_ss(h, _mm_movehdup_ps(h));
            y[b * ystride + r] = _mm_cvtss_f32(h);
        }
        return;
    }
#endif
    float sum[ME_MAX_BATCH];
    for (int b = 0; b < B; b++) sum[b] = 0.f;
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = row + (size_t)k * blk;
        for (int b = 0; b < B; b++)
            sum[b] += sw[k] * acts[b].sa[k] * (float)dot_block(p, acts[b].q + (size_t)k * blk, blk, acts[b].asum[k]);
    }
    for (int b = 0; b < B; b++) y[b * ystride + r] = sum[b];
}

#if ME_ISA == 1
/* Row r of m (row layout, blocks of 32..128) against a group of G <= 8 sequences on AVX2, their activations as
   interleave_input lays them out (qi [nb][G][blk], sai [nb][G]): dot32_avx2 per sequence, with the weights' half
   of it (signed, magnitude) done once per chunk for all G instead of once per sequence: AVX2's byte products are
   the limit of a batch, and this is a third of them. One pointer with constant offsets reaches every sequence's
   block (eight pointers and a table of scales spilled the sums out of AVX2's sixteen registers). Each sum is
   formed exactly as dot32_avx2 and rows_together form it: int32 lanes summed over the chunks, then one fused
   multiply-add per block in block order, by the same float product sw * sa. */
static inline __attribute__((always_inline)) void rows_batch_avx2(const me_linear *m, const int8_t *qi,
                                                                  const float *sai, const int G, float *y,
                                                                  size_t ystride, int r, const int blk) {
    const int nb = m->nb, chunks = blk / 32;
    if (chunks < 1 || chunks > 4) __builtin_unreachable();  /* interleaved */
    const uint8_t *row = m->w + (size_t)r * nb * blk;
    const float *sw = m->s + (size_t)r * nb;
    const __m256i bias = _mm256_set1_epi8((char)0x80), ones = _mm256_set1_epi16(1);
    __m256 acc[ME_BATCH_GROUP];
    for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
    for (int k = 0; k < nb; k++) {
        const uint8_t *p = row + (size_t)k * blk;
        /* a group spends long enough on each weight byte that the hardware prefetcher falls behind (the solo
           step, gemv.h, reads too fast for that and does better without): ask for the rows after this one */
        _mm_prefetch((const char *)(p + 8192), _MM_HINT_T0);
        if (blk > 64) _mm_prefetch((const char *)(p + 8192 + 64), _MM_HINT_T0);
        __m256i ws[4], aw[4];
        for (int c = 0; c < chunks; c++) {
            ws[c] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(p + 32 * c)), bias);
            aw[c] = _mm256_abs_epi8(ws[c]);
        }
        const int8_t *qk = qi + (size_t)k * G * blk;
        /* the G products sw * sa in one vector multiply (or four in one), each broadcast from memory (a load, not
           a shuffle) */
        float scale[ME_BATCH_GROUP];
        int first = 0;
        if (G == ME_BATCH_GROUP) {
            _mm256_storeu_ps(scale, _mm256_mul_ps(_mm256_set1_ps(sw[k]), _mm256_loadu_ps(sai + (size_t)k * G)));
            first = G;
        } else if (G >= 4) {
            _mm_storeu_ps(scale, _mm_mul_ps(_mm_set1_ps(sw[k]), _mm_loadu_ps(sai + (size_t)k * G)));
            first = 4;
        }
        for (int g = first; g < G; g++) scale[g] = sw[k] * sai[(size_t)k * G + g];
        for (int g = 0; g < G; g++) {
            const int8_t *qb = qk + (size_t)g * blk;
            __m256i d = _mm256_madd_epi16(
                _mm256_maddubs_epi16(aw[0], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)qb), ws[0])), ones);
            for (int c = 1; c < chunks; c++)
                d = _mm256_add_epi32(d, _mm256_madd_epi16(_mm256_maddubs_epi16(
                    aw[c], _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)(qb + 32 * c)), ws[c])), ones));
            acc[g] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), _mm256_broadcast_ss(scale + g), acc[g]);
        }
    }
    for (int g = 0; g < G; g++) {
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[g]), _mm256_extractf128_ps(acc[g], 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        y[g * ystride + r] = _mm_cvtss_f32(h);
    }
}
#endif

/* row r of m against a group of G sequences (row layout): AVX2 reads their activations through interleave_input's
   copy where it made one (qi), else rows_batch each sequence's own */
static inline __attribute__((always_inline)) void batch_row(const me_linear *m, const me_act *acts,
                                                            const int8_t *qi, const float *sai, const int G,
                                                            float *y, size_t ystride, int r, const int blk) {
#if ME_ISA == 1
    if (qi) {
        rows_batch_avx2(m, qi, sai, G, y, ystride, r, blk);
        return;
    }
#else
    (void)qi;
    (void)sai;
#endif
    rows_batch(m, acts, G, y, ystride, r, blk);
}

/* rows [r0, r1) of y_b = m x_b for a group of G sequences (row layout), or the packed groups [r0, r1) (AVX512
   with qi: packed_span; ARM: dot_groups); G and the block size constants where it matters, so that the
   accumulators stay in registers */
static inline __attribute__((always_inline)) void rows_group(const me_linear *m, const me_act *acts, const int G,
                                                             float *y, size_t ystride, int r0, int r1,
                                                             const int8_t *qi, const int32_t *asi,
                                                             const float *sai) {
#if ME_ISA == 2
    if (qi) {
        packed_span(m, qi, asi, sai, G, r0, r1, y, ystride);
        return;
    }
#else
    (void)asi;
#endif
#if ME_ISA == 3
    if (m->packed) {  /* groups of 4 rows [r0, r1) */
        dot_groups_of(m, acts, G, y, ystride, r0, r1);
        return;
    }
#endif
    for (int r = r0; r < r1; r++) {
        if (m->blk == 128)
            batch_row(m, acts, qi, sai, G, y, ystride, r, 128);
        else if (m->blk == 32)
            batch_row(m, acts, qi, sai, G, y, ystride, r, 32);
        else
            batch_row(m, acts, qi, sai, G, y, ystride, r, m->blk);
    }
}

/* rows (or packed groups) [r0, r1) of y_b = m x_b for every b (y: [B][ystride]): sequences in groups of up to
   eight over them, then the next group over the same rows (from L2 by then) */
static inline void rows_groups(const me_linear *m, const me_act *acts, int B, float *y, size_t ystride, int r0,
                               int r1, const int8_t *qi, const int32_t *asi, const float *sai) {
    for (int b0 = 0; b0 < B; b0 += ME_BATCH_GROUP) {
        const me_act *a = acts + b0;
        const int8_t *qg = qi ? qi + (size_t)b0 * m->nb * m->blk : NULL;
        const int32_t *ag = asi + (size_t)b0 * m->nb;
        const float *sg = sai + (size_t)b0 * m->nb;
        float *yb = y + (size_t)b0 * ystride;
        switch (B - b0 < ME_BATCH_GROUP ? B - b0 : ME_BATCH_GROUP) {
        case 1: rows_group(m, a, 1, yb, ystride, r0, r1, qg, ag, sg); break;
        case 2: rows_group(m, a, 2, yb, ystride, r0, r1, qg, ag, sg); break;
        case 3: rows_group(m, a, 3, yb, ystride, r0, r1, qg, ag, sg); break;
        case 4: rows_group(m, a, 4, yb, ystride, r0, r1, qg, ag, sg); break;
        case 5: rows_group(m, a, 5, yb, ystride, r0, r1, qg, ag, sg); break;
        case 6: rows_group(m, a, 6, yb, ystride, r0, r1, qg, ag, sg); break;
        case 7: rows_group(m, a, 7, yb, ystride, r0, r1, qg, ag, sg); break;
        default: rows_group(m, a, 8, yb, ystride, r0, r1, qg, ag, sg); break;
        }
    }
}

/* One input's activations for the packed products (AVX512) and AVX2's rows_batch_avx2, made once for all the
   products that read it (q, k and v; gate and up): the sequences' int8 blocks, block sums and scales interleaved by
   block, [group][block][sequence], so that a block's eight sequences are one pointer and constant offsets (eight
   separate vectors took eight pointers the loop could not keep in registers beside its sums). qi, asi, sai: this
   thread's room (B * nb * blk bytes, B * nb values each; heap, not stack: a worker thread's stack can be small). */
static void interleave_input(const me_linear *m, const me_act *acts, int B, int8_t *qi, int32_t *asi, float *sai) {
    if (!interleaved(m)) return;
    const int nb = m->nb, blk = m->blk;
    for (int b0 = 0; b0 < B; b0 += ME_BATCH_GROUP) {
        const int G = B - b0 < ME_BATCH_GROUP ? B - b0 : ME_BATCH_GROUP;
        int8_t *qg = qi + (size_t)b0 * nb * blk;
        int32_t *ag = asi + (size_t)b0 * nb;
        float *sg = sai + (size_t)b0 * nb;
        for (int k = 0; k < nb; k++)
            for (int g = 0; g < G; g++) {
                memcpy(qg + ((size_t)k * G + g) * blk, acts[b0 + g].q + (size_t)k * blk, blk);
                ag[(size_t)k * G + g] = acts[b0 + g].asum[k];
                sg[(size_t)k * G + g] = acts[b0 + g].sa[k];
            }
    }
}

/* this thread's share of the rows of y_b = m x_b for every b (y: [B][ystride]), inside a parallel region; qi, asi,
   sai: the input as interleave_input made it, read by the packed products.
   Sequences go in groups of up to eight over a tile of rows (ME_BATCH_TILE rows, or ME_PACKED_TILE packed
   groups), then the next group over the same tile: each weight block is read once from memory for a group (on
   AVX2 its signed and magnitude forms made once for all eight), a group's activation vectors stay in L1 across
   the tile, and the tile's weights come from L2 for the next group. */
static void gemv_batch_share(const me_linear *m, const me_act *acts, int B, float *y, size_t ystride,
                             const int8_t *qi, const int32_t *asi, const float *sai) {
    int lo, hi;
    rows_share(m, &lo, &hi);
    if (m->packed) {
        lo /= m->packed;
        hi = (hi + m->packed - 1) / m->packed;
    }
    if (!interleaved(m)) qi = NULL;
    const int tile = m->packed ? ME_PACKED_TILE : ME_BATCH_TILE;
    for (int r0 = lo; r0 < hi; r0 += tile)
        rows_groups(m, acts, B, y, ystride, r0, r0 + tile < hi ? r0 + tile : hi, qi, asi, sai);
}

/* The low-rank branches of one input's projections (lora.h) for every sequence of the batch on the LoRA route
   (models[b]->lora_gate != 0; the others skip them): x + b * xstride is sequence b's input, t this thread's
   scratch (B * rank values), ys[j] + b * ystrides[j] sequence b's output of projection first + j. The branch
   weights are models[0]'s, shared like the products' (lora_group reads each A once for all of them). */
static void lora_batch(const me_model *const *models, int B, int layer, int first, int count, const float *x,
                       size_t xstride, float *t, int rank, float *const *ys, const size_t *ystrides) {
    int on[ME_MAX_BATCH], n_on = 0;
    float gates[ME_MAX_BATCH];
    for (int b = 0; b < B; b++)
        if (models[b]->lora_gate != 0.f) {
            gates[n_on] = models[b]->lora_gate;
            on[n_on++] = b;
        }
    lora_group(models[0], layer, first, count, x, xstride, on, gates, n_on, t, rank, ys, ystrides);
}

/* One decoder step of each of `batch` sequences. models[b] describes sequence b: the same weights for every b (only
   models[0]'s are read for the products), its own caches and capacity; x [batch][hidden] holds the tokens'
   embeddings and is overwritten; pos[b] is sequence b's position, cos/sin [batch][head_dim] its rotary factors;
   logits [batch][vocab] are written; models[b]->lora_gate is sequence b's route in a routed model (lora.h), so
   sequences on both routes share every weight read. As in me_decode_step, the small per-sequence work between
   the products every thread does itself on its own copies (five barriers a layer instead of ten); each
   sequence's is the same function as its solo step's, so its bits do not change. Returns 0, -1 when scratch
   memory could not be had, -2 for a batch outside 1..ME_MAX_BATCH. */
int me_decode_batch(const me_model *const *models, int batch, float *x, const int32_t *pos, const float *cos,
                    const float *sin, float *logits, int threads) {
    if (batch < 1 || batch > ME_MAX_BATCH) return -2;
    const me_model *m = models[0];
    const int hidden = m->hidden, qdim = m->heads * m->head_dim, kvdim = m->kv_heads * m->head_dim;
    const int team = threads > 0 ? threads : 1, B = batch, dim = m->head_dim, inter = m->intermediate;
    int widest = hidden > inter ? hidden : inter, capacity = 0;
    if (qdim > widest) widest = qdim;
    for (int b = 0; b < B; b++) capacity = models[b]->capacity > capacity ? models[b]->capacity : capacity;
    const int rank = lora_max_rank(m);
    int lora = 0;  /* any sequence on the LoRA route */
    for (int b = 0; b < B; b++) lora |= rank > 0 && models[b]->lora_gate != 0.f;
    /* per thread and sequence: the hidden state, a normalized input (the branches read it too), the SwiGLU output,
       the activations of a product (`widest` inputs padded to a whole block, a scale and sum per block) and their
       interleaved copy; per thread: attention scores and the branches' first products */
    const size_t act_bytes = (size_t)widest + 1024, blocks = (size_t)widest + 1,
                 seq_floats = (size_t)hidden + widest + inter + 2 * blocks,
                 per_thread = ((seq_floats * B + 2 * (size_t)capacity + (size_t)B * rank + 2 * blocks * B)
                                   * sizeof(float)
                               + 2 * act_bytes * B + 63) / 64 * 64;
    float *qv = malloc(sizeof(float) * qdim * B), *kv = malloc(sizeof(float) * kvdim * B),
          *vv = malloc(sizeof(float) * kvdim * B), *att = malloc(sizeof(float) * qdim * B),
          *prod = malloc(sizeof(float) * hidden * B), *gate = malloc(sizeof(float) * inter * B),
          *up = malloc(sizeof(float) * inter * B);
    char *mine_all = malloc(per_thread * team);
    void *owned[] = {qv, kv, vv, att, prod, gate, up, mine_all};
    const int count = sizeof(owned) / sizeof(owned[0]);
    for (int i = 0; i < count; i++)
        if (!owned[i]) {
            for (int j = 0; j < count; j++) free(owned[j]);
            return -1;
        }

#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        float *xs = (float *)(mine_all + per_thread * thread_id()), *xn = xs + (size_t)hidden * B,
              *h = xn + (size_t)widest * B, *sa = h + (size_t)inter * B, *asum_f = sa + blocks * B,
              *scores = asum_f + blocks * B, *lt = scores + 2 * (size_t)capacity;
        int32_t *asi = (int32_t *)(lt + (size_t)B * rank);  /* interleave_input's copies */
        float *sai = (float *)(asi + blocks * B);
        int8_t *q8 = (int8_t *)(sai + blocks * B), *qi = q8 + act_bytes * B;
        me_act acts[ME_MAX_BATCH];
        for (int b = 0; b < B; b++)
            acts[b] = (me_act){q8 + act_bytes * b, sa + blocks * b, (int32_t *)asum_f + blocks * b};
        memcpy(xs, x, sizeof(float) * hidden * B);
        for (int i = 0; i < m->layers; i++) {
            const me_layer *l = &m->layer[i];
            for (int b = 0; b < B; b++)
                quantize_for(xs + (size_t)b * hidden, l->input_norm, m->eps, &l->q, &acts[b], xn + (size_t)b * widest);
            interleave_input(&l->q, acts, B, qi, asi, sai);
            gemv_batch_share(&l->q, acts, B, qv, qdim, qi, asi, sai);
            gemv_batch_share(&l->k, acts, B, kv, kvdim, qi, asi, sai);
            gemv_batch_share(&l->v, acts, B, vv, kvdim, qi, asi, sai);
            if (lora)
                lora_batch(models, B, i, LORA_Q, 3, xn, widest, lt, rank, (float *const[]){qv, kv, vv},
                           (const size_t[]){qdim, kvdim, kvdim});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (int bg = 0; bg < B * m->kv_heads; bg++) {
                const int b = bg / m->kv_heads, g = bg % m->kv_heads;
                const me_model *mb = models[b];
                const me_layer *lb = &mb->layer[i];
                cache_and_rotate(mb, lb, g, pos[b], qv + (size_t)b * qdim, kv + (size_t)b * kvdim,
                                 vv + (size_t)b * kvdim, cos + (size_t)b * dim, sin + (size_t)b * dim);
                attend(mb, lb, g, qv + (size_t)b * qdim, att + (size_t)b * qdim, pos[b] + 1, scores);
            }
            for (int b = 0; b < B; b++)
                quantize_for(att + (size_t)b * qdim, NULL, 0.f, &l->o, &acts[b], xn + (size_t)b * widest);
            interleave_input(&l->o, acts, B, qi, asi, sai);
            gemv_batch_share(&l->o, acts, B, prod, hidden, qi, asi, sai);
            if (lora)
                lora_batch(models, B, i, LORA_O, 1, att, qdim, lt, rank, (float *const[]){prod},
                           (const size_t[]){hidden});
#ifdef _OPENMP
#pragma omp barrier
#endif
            for (int b = 0; b < B; b++) {
                float *xb = xs + (size_t)b * hidden, *pb = prod + (size_t)b * hidden;
                for (int j = 0; j < hidden; j++) xb[j] += pb[j];
                quantize_for(xb, l->post_norm, m->eps, &l->gate, &acts[b], xn + (size_t)b * widest);
            }
            interleave_input(&l->gate, acts, B, qi, asi, sai);
            gemv_batch_share(&l->gate, acts, B, gate, inter, qi, asi, sai);
            gemv_batch_share(&l->up, acts, B, up, inter, qi, asi, sai);
            if (lora)
                lora_batch(models, B, i, LORA_GATE, 2, xn, widest, lt, rank, (float *const[]){gate, up},
                           (const size_t[]){inter, inter});
#ifdef _OPENMP
#pragma omp barrier
#endif
            for (int b = 0; b < B; b++) {
                const float *gb = gate + (size_t)b * inter, *ub = up + (size_t)b * inter;
                float *hb = h + (size_t)b * inter;
                me_swiglu(hb, gb, ub, (size_t)inter);
                quantize_for(hb, NULL, 0.f, &l->down, &acts[b], xn + (size_t)b * widest);
            }
            interleave_input(&l->down, acts, B, qi, asi, sai);
            gemv_batch_share(&l->down, acts, B, prod, hidden, qi, asi, sai);
            if (lora)
                lora_batch(models, B, i, LORA_DOWN, 1, h, inter, lt, rank, (float *const[]){prod},
                           (const size_t[]){hidden});
#ifdef _OPENMP
#pragma omp barrier
#endif
            for (int b = 0; b < B; b++) {
                float *xb = xs + (size_t)b * hidden, *pb = prod + (size_t)b * hidden;
                for (int j = 0; j < hidden; j++) xb[j] += pb[j];
            }
        }
        for (int b = 0; b < B; b++)
            quantize_for(xs + (size_t)b * hidden, m->final_norm, m->eps, &m->lm_head, &acts[b],
                         xn + (size_t)b * widest);
        interleave_input(&m->lm_head, acts, B, qi, asi, sai);
        gemv_batch_share(&m->lm_head, acts, B, logits, m->vocab, qi, asi, sai);
        if (thread_id() == 0) memcpy(x, xs, sizeof(float) * hidden * B);
    }
    for (int i = 0; i < count; i++) free(owned[i]);
    return 0;
}
#endif /* ME_DECODE_BATCH_H */
