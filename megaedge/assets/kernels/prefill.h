/* The decoder over a whole prompt (prefill): every layer for all rows at once, on the prompt's products; the rest
   of a row is the decode step's own code (attention.h, quantize.h). */
#ifndef ME_PREFILL_H
#define ME_PREFILL_H
#include "attention.h"
#include "gemm.h"
#include "gemv.h"
#include "lora.h"
#include "quantize.h"

/* x += y over count floats, shared out inside a parallel region (the residual connection of every row) */
static void add_rows(float *x, const float *y, size_t count) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (size_t j = 0; j < count; j++) x[j] += y[j];
}

/* The low-rank branches of one input's projections (lora.h) for every row of a prompt on the LoRA route: row r's
   input at x + r * xstride, its scratch t + r * 3 * rank, its output of projection first + j at
   ys[j] + r * ystrides[j]. Each row's values are formed as the decode step forms them for that row; the base
   products must be complete (the first loop's barrier). */
static void lora_rows(const me_model *m, int layer, int first, int count, const float *x, size_t xstride, int rows,
                      float *t, int rank, float g, float *const *ys, const size_t *ystrides) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < count; j++) {
            const me_lora *l = lora_of(m, layer, first + j);
            if (l) lora_down(l, linear_of(&m->layer[layer], first + j)->k, x, xstride, &r, 1,
                             t + ((size_t)r * 3 + j) * rank, 0);
        }
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < count; j++) {
            const me_lora *l = lora_of(m, layer, first + j);
            const int n = linear_of(&m->layer[layer], first + j)->n;
            if (l) lora_up(l, n, t + ((size_t)r * 3 + j) * rank, g, ys[j] + r * ystrides[j], 0, n);
        }
}

/* Rows x [rows][hidden] (embeddings, overwritten) at positions start..start+rows-1 through every layer: the
   caches get their keys and values, and logits [logit_rows][vocab] are those of the last logit_rows rows (1: what
   the next token needs; more: a stream checks the tokens it committed against new audio; 0: none). cos/sin
   [rows][head_dim]. The caches must already hold positions [0, start). A routed model on the LoRA route adds the
   low-rank branches (lora_rows). Returns 0, -1 without memory, or -2 when logit_rows > rows. */
int me_prefill(const me_model *m, float *x, int rows, int start, const float *cos, const float *sin, float *logits,
               int logit_rows, int threads) {
    if (logit_rows > rows) return -2;
    const int hidden = m->hidden, qdim = m->heads * m->head_dim, kvdim = m->kv_heads * m->head_dim;
    const int team = threads > 0 ? threads : 1, inter = m->intermediate;
    int widest = hidden > inter ? hidden : inter;
    if (qdim > widest) widest = qdim;
    const size_t R = (size_t)rows, wide_padded = (size_t)widest + 1024;
    float *qv = malloc(sizeof(float) * R * qdim), *kv = malloc(sizeof(float) * R * kvdim),
          *vv = malloc(sizeof(float) * R * kvdim), *att = malloc(sizeof(float) * R * qdim),
          *prod = malloc(sizeof(float) * R * hidden), *gate = malloc(sizeof(float) * R * inter),
          *up = malloc(sizeof(float) * R * inter), *scratch = malloc(sizeof(float) * widest * team),
          *all_scores = malloc(sizeof(float) * 2 * m->capacity * team), *sa = malloc(sizeof(float) * R * (widest + 1));
    int32_t *asum = malloc(sizeof(int32_t) * R * (widest + 1));
    int8_t *q8 = malloc(R * wide_padded);
    const size_t per_thread = pack_bytes(wide_padded, rows);
    char *pack = malloc(per_thread * team + 1);
    const int lora = m->lora_gate != 0.f && m->lora != NULL, rank = lora ? lora_max_rank(m) : 0;
    const float route = m->lora_gate;
    /* on the LoRA route: every row's normalized input (the branches read it) and the branches' first products */
    float *xn = malloc(sizeof(float) * (lora ? R * widest : 1)), *lt = malloc(sizeof(float) * (R * 3 * rank + 1));
    void *owned[] = {qv, kv, vv, att, prod, gate, up, scratch, all_scores, sa, asum, q8, pack, xn, lt};
    const int count = sizeof(owned) / sizeof(owned[0]);
    for (int i = 0; i < count; i++)
        if (!owned[i]) {
            for (int j = 0; j < count; j++) free(owned[j]);
            return -1;
        }
    me_act act = {q8, sa, asum};  /* rows: row r at q + r * nb * blk, sa/asum + r * nb of the product's blocks */

#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        float *scores = all_scores + (size_t)thread_id() * 2 * m->capacity;
        float *mine = scratch + (size_t)thread_id() * widest;
        float *normed = lora ? xn : mine;  /* where the normalized rows go: kept for the branches, or dropped */
        const size_t normed_stride = lora ? (size_t)widest : 0;
        void *packed = pack + per_thread * thread_id();
        for (int i = 0; i < m->layers; i++) {
            const me_layer *l = &m->layer[i];
            quantize_rows_for(x, rows, l->input_norm, m->eps, &l->q, &act, normed, normed_stride);  /* + barrier */
            gemm_share(&l->q, &act, qv, rows, packed);
            gemm_share(&l->k, &act, kv, rows, packed);
            gemm_share(&l->v, &act, vv, rows, packed);
            if (lora)
                lora_rows(m, i, LORA_Q, 3, xn, widest, rows, lt, rank, route, (float *const[]){qv, kv, vv},
                          (const size_t[]){qdim, kvdim, kvdim});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (int j = 0; j < rows * m->kv_heads; j++) {  /* every row's keys and values into the cache first */
                const int r = j / m->kv_heads, g = j % m->kv_heads;
                cache_and_rotate(m, l, g, start + r, qv + (size_t)r * qdim, kv + (size_t)r * kvdim,
                                 vv + (size_t)r * kvdim, cos + (size_t)r * m->head_dim, sin + (size_t)r * m->head_dim);
            }
#ifdef _OPENMP
#pragma omp for schedule(static, 1)
#endif
            for (int j = 0; j < rows * m->kv_heads; j++) {  /* causal: row r sees positions [0, start + r] */
                const int r = j / m->kv_heads, g = j % m->kv_heads;
                attend(m, l, g, qv + (size_t)r * qdim, att + (size_t)r * qdim, start + r + 1, scores);
            }
            quantize_rows_for(att, rows, NULL, 0.f, &l->o, &act, mine, 0);
            gemm_share(&l->o, &act, prod, rows, packed);
            if (lora)
                lora_rows(m, i, LORA_O, 1, att, qdim, rows, lt, rank, route, (float *const[]){prod},
                          (const size_t[]){hidden});
#ifdef _OPENMP
#pragma omp barrier
#endif
            add_rows(x, prod, R * hidden);
            quantize_rows_for(x, rows, l->post_norm, m->eps, &l->gate, &act, normed, normed_stride);
            gemm_share(&l->gate, &act, gate, rows, packed);
            gemm_share(&l->up, &act, up, rows, packed);
            if (lora)
                lora_rows(m, i, LORA_GATE, 2, xn, widest, rows, lt, rank, route, (float *const[]){gate, up},
                          (const size_t[]){inter, inter});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (size_t r = 0; r < R; r++)  /* value by value, so any split gives the same bits */
                me_swiglu(gate + r * inter, gate + r * inter, up + r * inter, (size_t)inter);
            quantize_rows_for(gate, rows, NULL, 0.f, &l->down, &act, mine, 0);
            gemm_share(&l->down, &act, prod, rows, packed);
            if (lora)
                lora_rows(m, i, LORA_DOWN, 1, gate, inter, rows, lt, rank, route, (float *const[]){prod},
                          (const size_t[]){hidden});
#ifdef _OPENMP
#pragma omp barrier
#endif
            add_rows(x, prod, R * hidden);
        }
        if (logit_rows == 1) {  /* one row: the decode step's product, so a prompt's last logits are a step's */
#ifdef _OPENMP
#pragma omp single
#endif
            quantize_for(x + (R - 1) * hidden, m->final_norm, m->eps, &m->lm_head, &act, scratch);
            gemv_share(&m->lm_head, &act, logits);
        } else if (logit_rows > 1) {
            quantize_rows_for(x + (R - logit_rows) * hidden, logit_rows, m->final_norm, m->eps, &m->lm_head, &act,
                              mine, 0);
            gemm_share(&m->lm_head, &act, logits, logit_rows, packed);
        }
    }
    for (int i = 0; i < count; i++) free(owned[i]);
    return 0;
}
#endif /* ME_PREFILL_H */
