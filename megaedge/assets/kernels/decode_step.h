/* One whole decoder step (one token) in one call with one thread team. */
#ifndef ME_DECODE_STEP_H
#define ME_DECODE_STEP_H
#include "attention.h"
#include "gemv.h"
#include "lora.h"
#include "quantize.h"

/* lora_group for the step's one sequence: input x, gate g, outputs ys[j] */
static void lora_step(const me_model *m, int layer, int first, int count, const float *x, float *t, int rank,
                      float g, float *const *ys) {
    static const int only = 0;
    static const size_t no_strides[3] = {0, 0, 0};
    lora_group(m, layer, first, count, x, 0, &only, &g, 1, t, rank, ys, no_strides);
}

/* One decoder step: x [hidden] holds the token's embedding and is overwritten; the layers' caches get this
   position's keys and values; logits [vocab] are written. cos/sin [head_dim] are the rotary factors of pos.
   Returns 0, or -1 when scratch memory could not be had. Parallel work: row shares of every product and the kv
   heads of attention. The small vector work between them (norms, quantization, residuals, SwiGLU: microseconds)
   every thread does itself, on its own copy of the hidden state, instead of one thread while the others wait:
   with threads that sleep while they wait each barrier costs tens of microseconds, and this way a layer needs
   five (after q/k/v, attention, o, gate/up, down) instead of ten. Every copy is formed by the same operations,
   so all threads hold the same bits. A routed model on the LoRA route (m->lora_gate != 0) adds each projection's
   low-rank branch after its product (lora.h), each thread to the rows it computed. */
int me_decode_step(const me_model *m, float *x, int pos, const float *cos, const float *sin, float *logits,
                   int threads) {
    const int hidden = m->hidden, qdim = m->heads * m->head_dim, kvdim = m->kv_heads * m->head_dim;
    const int team = threads > 0 ? threads : 1, inter = m->intermediate;
    int widest = hidden > inter ? hidden : inter;
    if (qdim > widest) widest = qdim;
    const int lora = m->lora_gate != 0.f && m->lora != NULL, rank = lora ? lora_max_rank(m) : 0;
    const float route = m->lora_gate;
    /* per thread: the hidden state, a normalized input, the SwiGLU output, the activations of any product (at most
       `widest` inputs padded to a whole block, a scale and sum per block), attention scores, the branches' first
       products (one projection's at a time) */
    const size_t floats = (size_t)hidden + widest + inter + 2 * (widest + 1) + 2 * (size_t)m->capacity + rank,
                 per_thread = (floats * sizeof(float) + (size_t)widest + 1024 + 63) / 64 * 64;
    float *qv = malloc(sizeof(float) * qdim), *kv = malloc(sizeof(float) * kvdim), *vv = malloc(sizeof(float) * kvdim),
          *att = malloc(sizeof(float) * qdim), *prod = malloc(sizeof(float) * hidden),
          *gate = malloc(sizeof(float) * inter), *up = malloc(sizeof(float) * inter);
    char *mine_all = malloc(per_thread * team);
    void *owned[] = {qv, kv, vv, att, prod, gate, up, mine_all};
    const int count = sizeof(owned) / sizeof(owned[0]);
    for (int i = 0; i < count; i++)
        if (!owned[i]) {
            for (int j = 0; j < count; j++) free(owned[j]);
            return -1;
        }
    const int len = pos + 1;

#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        float *xs = (float *)(mine_all + per_thread * thread_id()), *normed = xs + hidden, *h = normed + widest,
              *sa = h + inter, *asum_f = sa + widest + 1, *scores = asum_f + widest + 1,
              *lt = scores + 2 * (size_t)m->capacity;
        int8_t *q8 = (int8_t *)(lt + rank);
        me_act act = {q8, sa, (int32_t *)asum_f};
        memcpy(xs, x, sizeof(float) * hidden);
        for (int i = 0; i < m->layers; i++) {
            const me_layer *l = &m->layer[i];
            quantize_for(xs, l->input_norm, m->eps, &l->q, &act, normed);
            gemv_share(&l->q, &act, qv);  /* q, k, v read the same input: no barrier between them */
            gemv_share(&l->k, &act, kv);
            gemv_share(&l->v, &act, vv);
            if (lora) lora_step(m, i, LORA_Q, 3, normed, lt, rank, route, (float *const[]){qv, kv, vv});
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (int g = 0; g < m->kv_heads; g++) {
                cache_and_rotate(m, l, g, pos, qv, kv, vv, cos, sin);
                attend(m, l, g, qv, att, len, scores);
            }
            quantize_for(att, NULL, 0.f, &l->o, &act, normed);
            gemv_share(&l->o, &act, prod);
            if (lora) lora_step(m, i, LORA_O, 1, att, lt, rank, route, (float *const[]){prod});
#ifdef _OPENMP
#pragma omp barrier
#endif
            for (int j = 0; j < hidden; j++) xs[j] += prod[j];
            quantize_for(xs, l->post_norm, m->eps, &l->gate, &act, normed);
            gemv_share(&l->gate, &act, gate);
            gemv_share(&l->up, &act, up);
            if (lora) lora_step(m, i, LORA_GATE, 2, normed, lt, rank, route, (float *const[]){gate, up});
#ifdef _OPENMP
#pragma omp barrier
#endif
            me_swiglu(h, gate, up, (size_t)inter);
            quantize_for(h, NULL, 0.f, &l->down, &act, normed);
            gemv_share(&l->down, &act, prod);
            if (lora) lora_step(m, i, LORA_DOWN, 1, h, lt, rank, route, (float *const[]){prod});
#ifdef _OPENMP
#pragma omp barrier
#endif
            /* prod is read here and written again only after the next layer's q/k/v and attention barriers */
            for (int j = 0; j < hidden; j++) xs[j] += prod[j];
        }
        quantize_for(xs, m->final_norm, m->eps, &m->lm_head, &act, normed);
        gemv_share(&m->lm_head, &act, logits);
        if (thread_id() == 0) memcpy(x, xs, sizeof(float) * hidden);
    }
    for (int i = 0; i < count; i++) free(owned[i]);
    return 0;
}
#endif /* ME_DECODE_STEP_H */
