/* One whole decoder step (one token) in one call with one thread team. */
#ifndef ME_DECODE_STEP_H
#define ME_DECODE_STEP_H
#include "attention.h"
#include "gemv.h"
#include "lora.h"
#include "quantize.h"

/* One decoder step: x [hidden] holds the token's embedding and is overwritten; the layers' caches get this
   position's keys and values; logits [vocab] are written. cos/sin [head_dim] are the rotary factors of pos.
   Returns 0, or -1 when scratch memory could not be had. Parallel work: row shares of every product and the kv
   heads of attention; the small vector work between them runs on one thread while the others wait. A routed
   model on the LoRA route (m->lora_gate != 0) adds each projection's low-rank branch after its product (lora.h),
   each thread to the rows it computed. */
int me_decode_step(const me_model *m, float *x, int pos, const float *cos, const float *sin, float *logits,
                   int threads) {
    const int hidden = m->hidden, qdim = m->heads * m->head_dim, kvdim = m->kv_heads * m->head_dim;
    const int team = threads > 0 ? threads : 1;
    int widest = hidden > m->intermediate ? hidden : m->intermediate;
    if (qdim > widest) widest = qdim;
    /* activations of any product: at most `widest` inputs, padded to a whole block, and a scale per block */
    float *qv = malloc(sizeof(float) * qdim), *kv = malloc(sizeof(float) * kvdim), *vv = malloc(sizeof(float) * kvdim),
          *att = malloc(sizeof(float) * qdim), *prod = malloc(sizeof(float) * hidden),
          *gate = malloc(sizeof(float) * m->intermediate), *up = malloc(sizeof(float) * m->intermediate),
          *scratch = malloc(sizeof(float) * widest), *all_scores = malloc(sizeof(float) * 2 * m->capacity * team),
          *sa = malloc(sizeof(float) * (widest + 1));
    int32_t *asum = malloc(sizeof(int32_t) * (widest + 1));
    int8_t *q8 = malloc((size_t)widest + 1024);
    const int lora = m->lora_gate != 0.f && m->lora != NULL, rank = lora ? lora_max_rank(m) : 0;
    const float route = m->lora_gate;
    /* each thread's first products of the branches, 3 at most at once */
    float *lts = malloc(sizeof(float) * (3 * (size_t)rank * team + 1));
    void *owned[] = {qv, kv, vv, att, prod, gate, up, scratch, all_scores, sa, asum, q8, lts};
    const int count = sizeof(owned) / sizeof(owned[0]);
    for (int i = 0; i < count; i++)
        if (!owned[i]) {
            for (int j = 0; j < count; j++) free(owned[j]);
            return -1;
        }
    me_act act = {q8, sa, asum};
    const int len = pos + 1;

#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        float *scores = all_scores + (size_t)thread_id() * 2 * m->capacity;
        float *lt = lts + (size_t)thread_id() * 3 * rank;
        for (int i = 0; i < m->layers; i++) {
            const me_layer *l = &m->layer[i];
#ifdef _OPENMP
#pragma omp single
#endif
            quantize_for(x, l->input_norm, m->eps, &l->q, &act, scratch);
            gemv_share(&l->q, &act, qv);  /* q, k, v read the same input: no barrier between them */
            gemv_share(&l->k, &act, kv);
            gemv_share(&l->v, &act, vv);
            if (lora) lora_group(m, i, LORA_Q, 3, scratch, lt, rank, route, (float *const[]){qv, kv, vv});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (int g = 0; g < m->kv_heads; g++) {
                cache_and_rotate(m, l, g, pos, qv, kv, vv, cos, sin);
                attend(m, l, g, qv, att, len, scores);
            }
#ifdef _OPENMP
#pragma omp single
#endif
            quantize_for(att, NULL, 0.f, &l->o, &act, scratch);
            gemv_share(&l->o, &act, prod);
            if (lora) lora_group(m, i, LORA_O, 1, att, lt, rank, route, (float *const[]){prod});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                for (int j = 0; j < hidden; j++) x[j] += prod[j];
                quantize_for(x, l->post_norm, m->eps, &l->gate, &act, scratch);
            }
            gemv_share(&l->gate, &act, gate);
            gemv_share(&l->up, &act, up);
            if (lora) lora_group(m, i, LORA_GATE, 2, scratch, lt, rank, route, (float *const[]){gate, up});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                for (int j = 0; j < m->intermediate; j++) gate[j] = gate[j] / (1.f + me_exp(-gate[j])) * up[j];
                quantize_for(gate, NULL, 0.f, &l->down, &act, scratch);
            }
            gemv_share(&l->down, &act, prod);
            if (lora) lora_group(m, i, LORA_DOWN, 1, gate, lt, rank, route, (float *const[]){prod});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            for (int j = 0; j < hidden; j++) x[j] += prod[j];
        }
#ifdef _OPENMP
#pragma omp single
#endif
        quantize_for(x, m->final_norm, m->eps, &m->lm_head, &act, scratch);
        gemv_share(&m->lm_head, &act, logits);
    }
    for (int i = 0; i < count; i++) free(owned[i]);
    return 0;
}
#endif /* ME_DECODE_STEP_H */
