/* Activations quantized per block to int8 (symmetric), as MatMulNBits does at accuracy level 4: one vector, or
   every row of a prompt; optionally RMS-normalized first (the layers' input and post-attention norms). */
#ifndef ME_QUANTIZE_H
#define ME_QUANTIZE_H
#include "common.h"

static void rms_norm(const float *x, const float *weight, float eps, int k, float *out) {
    double ss = 0.0;
    for (int i = 0; i < k; i++) ss += (double)x[i] * x[i];
    float r = 1.f / sqrtf((float)(ss / k) + eps);
    for (int i = 0; i < k; i++) out[i] = x[i] * r * weight[i];
}

/* With a norm weight, x is RMS-normalized first (x * norm / sqrt(mean(x^2) + eps)). */
void me_quantize(const float *x, const float *norm, float eps, int k, int blk, int nb, int8_t *q, float *sa,
                 int32_t *asum, float *scratch) {
    if (norm) {
        rms_norm(x, norm, eps, k, scratch);
        x = scratch;
    }
    /* Written so that the compiler vectorizes both loops (fmaxf and lrintf were library calls per value: an eighth
       of a 1.7B prompt's time): the largest magnitude as the largest of the floats' bit patterns with the sign
       cleared, which order as the magnitudes do (NaN aside), and rintf, which rounds half to even as lrintf did. */
    for (int b = 0; b < nb; b++) {
        int lo = b * blk, hi = lo + blk < k ? lo + blk : k;
        uint32_t top = 0;
        for (int i = lo; i < hi; i++) {
            uint32_t bits;
            memcpy(&bits, x + i, 4);
            bits &= 0x7fffffffu;
            top = bits > top ? bits : top;
        }
        float amax;
        memcpy(&amax, &top, 4);
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int i = lo; i < hi; i++) {
            float r = rintf(x[i] * inv);
            r = r > 127.f ? 127.f : (r < -127.f ? -127.f : r);
            q[i] = (int8_t)(int)r;
            sum += (int)r;
        }
        for (int i = hi; i < lo + blk; i++) q[i] = 0;
        sa[b] = s;
        asum[b] = sum;
    }
}

static void quantize_for(const float *x, const float *norm, float eps, const me_linear *m, me_act *a,
                         float *scratch) {
    me_quantize(x, norm, eps, m->k, m->blk, m->nb, a->q, a->sa, a->asum, scratch);
}

/* rows of x [rows][k] (RMS-normalized with `norm` first when given) quantized for m's blocks, rows shared out;
   row r normalizes into scratch + r * scratch_stride (stride 0: one scratch for every row, e.g. the thread's own;
   a routed prompt keeps each row's normalized values for the low-rank branches) */
static void quantize_rows_for(const float *x, int rows, const float *norm, float eps, const me_linear *m,
                              me_act *a, float *scratch, size_t scratch_stride) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int r = 0; r < rows; r++)
        me_quantize(x + (size_t)r * m->k, norm, eps, m->k, m->blk, m->nb, a->q + (size_t)r * m->nb * m->blk,
                    a->sa + (size_t)r * m->nb, a->asum + (size_t)r * m->nb, scratch + (size_t)r * scratch_stride);
}
#endif /* ME_QUANTIZE_H */
