/* The gated low-rank branch of a routed bundle's projections: y = W x + g * (x A) B, with A [k][rank] and B [rank][n]
   the decoder graph's own float initializers (the branch is never quantized) and g the sequence's LoRA gate (1: the
   LoRA route, 0: the base). A sequence on the base route skips the branch, so both routes share one weight read.

   Every value is a plain sequential sum: t[r] over the k inputs in order, the branch's output over the rank in
   order, then y + g * that, one rounding per operation as onnxruntime's MatMul, Mul and Add nodes form it. The
   vector lanes run across r (first product) and across n (second), never across a sum, so the bits of a value do
   not depend on how rows are shared between threads, on the batch a sequence is stepped in, or on whether a row is
   a step or part of a prompt. */
#ifndef ME_LORA_H
#define ME_LORA_H
#include "common.h"

/* the slot of each projection in me_model.lora's rows (runtime/manifest.NATIVE_PROJECTIONS order) */
enum { LORA_Q, LORA_K, LORA_V, LORA_O, LORA_GATE, LORA_UP, LORA_DOWN, LORA_SLOTS };

/* the branch of projection `slot` of layer `layer`, or NULL where the model has none there */
static inline const me_lora *lora_of(const me_model *m, int layer, int slot) {
    if (!m->lora) return NULL;
    const me_lora *l = m->lora + (size_t)layer * LORA_SLOTS + slot;
    return l->rank > 0 ? l : NULL;
}

/* t[r0..r1) = x . A[:, r0..r1) over the k inputs */
static void lora_down(const me_lora *l, int k, const float *x, float *t, int r0, int r1) {
    const int rank = l->rank;
    for (int r = r0; r < r1; r++) t[r] = 0.f;
    for (int i = 0; i < k; i++) {
        const float xi = x[i];
        const float *row = l->a + (size_t)i * rank;
#pragma omp simd
        for (int r = r0; r < r1; r++) t[r] += xi * row[r];
    }
}

/* y[n0..n1) += g * (t . B)[n0..n1), in chunks whose sums stay in registers */
#define LORA_CHUNK 64
static void lora_up(const me_lora *l, int n, const float *t, float g, float *y, int n0, int n1) {
    const int rank = l->rank;
    for (int j0 = n0; j0 < n1; j0 += LORA_CHUNK) {
        const int w = j0 + LORA_CHUNK < n1 ? LORA_CHUNK : n1 - j0;
        float acc[LORA_CHUNK];
        for (int j = 0; j < w; j++) acc[j] = 0.f;
        for (int r = 0; r < rank; r++) {
            const float tr = t[r];
            const float *row = l->b + (size_t)r * n + j0;
#pragma omp simd
            for (int j = 0; j < w; j++) acc[j] += tr * row[j];
        }
        for (int j = 0; j < w; j++) y[j0 + j] = y[j0 + j] + g * acc[j];
    }
}

/* this thread's share of [0, count) inside a parallel region: the rows gemv_share gives it */
static inline void share_of(int count, int *lo, int *hi) {
    const int t = thread_id(), T = team_size();
    *lo = (int)((long long)count * t / T);
    *hi = (int)((long long)count * (t + 1) / T);
}

static const me_linear *linear_of(const me_layer *l, int slot) {
    const me_linear *all[LORA_SLOTS] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down};
    return all[slot];
}

/* The branches of the projections of one input (slots first .. first + count - 1: q/k/v, o, gate/up or down) for
   one sequence, inside a parallel region after the base products, with no barrier: every thread forms the whole
   first product t = x A itself (rank * k multiply-adds, a few microseconds) in its own scratch t (count * rank
   values; rank: lora_max_rank), then adds the branch to the rows of ys it computed the base product of (share_of
   gives the rows gemv_share and gemv_batch_share give it). The caller's barrier after the products publishes
   ys. x: the products' input (normalized where they normalize); ys[j]: the output of projection first + j. Why no
   barrier: with threads that sleep while they wait, a barrier costs tens of microseconds, and a decoder step
   has four inputs a layer. */
static void lora_group(const me_model *m, int layer, int first, int count, const float *x, float *t, int rank,
                       float g, float *const *ys) {
    for (int j = 0; j < count; j++) {
        const me_lora *l = lora_of(m, layer, first + j);
        if (!l) continue;
        const me_linear *lin = linear_of(&m->layer[layer], first + j);
        float *tj = t + (size_t)j * rank;
        lora_down(l, lin->k, x, tj, 0, l->rank);
        int lo, hi;
        share_of(lin->n, &lo, &hi);
        lora_up(l, lin->n, tj, g, ys[j], lo, hi);
    }
}

/* the widest rank of any branch (0: none): the per-projection scratch a sequence needs */
static int lora_max_rank(const me_model *m) {
    int widest = 0;
    if (!m->lora) return 0;
    for (int i = 0; i < m->layers * LORA_SLOTS; i++) widest = m->lora[i].rank > widest ? m->lora[i].rank : widest;
    return widest;
}
#endif /* ME_LORA_H */
