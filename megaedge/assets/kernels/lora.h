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

/* t_s = x_s . A over the k inputs for n sequences, x_s = x + seqs[s] * xstride into t + s * tstride: one pass over A
   for all of them, each t_s[r] summed over i in order as for a sequence alone */
static void lora_down(const me_lora *l, int k, const float *x, size_t xstride, const int *seqs, int n, float *t,
                      size_t tstride) {
    const int rank = l->rank;
    for (int s = 0; s < n; s++)
        for (int r = 0; r < rank; r++) t[s * tstride + r] = 0.f;
    for (int i = 0; i < k; i++) {
        const float *row = l->a + (size_t)i * rank;
        for (int s = 0; s < n; s++) {
            const float xi = x[seqs[s] * xstride + i];
            float *ts = t + s * tstride;
#pragma omp simd
            for (int r = 0; r < rank; r++) ts[r] += xi * row[r];
        }
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

static const me_linear *linear_of(const me_layer *l, int slot) {
    const me_linear *all[LORA_SLOTS] = {&l->q, &l->k, &l->v, &l->o, &l->gate, &l->up, &l->down};
    return all[slot];
}

/* The branches of the projections of one input (slots first .. first + count - 1: q/k/v, o, gate/up or down) for
   n sequences (a step's one, or a batch's on the LoRA route), inside a parallel region after the base products,
   with no barrier: every thread forms the whole first product t = x A itself (rank * k multiply-adds per sequence,
   a few microseconds; one pass over A for all n) in its own scratch t (n * rank values; rank: lora_max_rank), then
   adds each sequence's branch to the rows of its output it computed the base product of (rows_share, the split of
   every product). The caller's barrier after the products publishes the outputs. Sequence s is seqs[s]: its input
   x + seqs[s] * xstride (normalized where the products normalize), its gate gates[s], its output of projection
   first + j ys[j] + seqs[s] * ystrides[j]. Why no barrier: with threads that sleep while they wait, a barrier
   costs tens of microseconds, and a decoder step has four inputs a layer. */
static void lora_group(const me_model *m, int layer, int first, int count, const float *x, size_t xstride,
                       const int *seqs, const float *gates, int n, float *t, int rank, float *const *ys,
                       const size_t *ystrides) {
    for (int j = 0; j < count; j++) {
        const me_lora *l = lora_of(m, layer, first + j);
        if (!l) continue;
        const me_linear *lin = linear_of(&m->layer[layer], first + j);
        lora_down(l, lin->k, x, xstride, seqs, n, t, rank);
        int lo, hi;
        rows_share(lin, &lo, &hi);
        for (int s = 0; s < n; s++)
            lora_up(l, lin->n, t + (size_t)s * rank, gates[s], ys[j] + seqs[s] * ystrides[j], lo, hi);
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
