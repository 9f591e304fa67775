/* The CPU decode step of a weight-only INT8 decoder (megaedge/runtime/native_decode.py): a block-quantized 8-bit
   matrix-vector product and, around it, one whole decoder step (norms, rotary, attention, SwiGLU) in one call.

   Weights use onnxruntime's MatMulNBits 8-bit layout, so a bundle's decoder weights serve both engines unchanged:
   w[N][nb][blk] uint8 holding value + 128 (symmetric), one float scale per block. The activation vector is
   quantized per block to int8 (symmetric), as MatMulNBits does at accuracy level 4, so each block is one integer
   dot product:  y[n] = sum_b sw[n,b] * sa[b] * sum_k (w[n,b,k] - 128) * q[b,k].

   Why it exists: at one row (decode) the product is bound by reading the weights, and no onnxruntime or OpenVINO
   kernel for int8 weights read faster than ~60 % of a 2-core machine's bandwidth (benchmarks/results). A core
   reads memory fastest with several independent streams in flight, so every thread walks STREAMS distant row
   ranges side by side instead of one. The whole step is one call with one thread team because the work between
   the products (per layer: two norms, attention over the cache, SwiGLU) cost a quarter of a step as numpy calls.

   Compiled on the machine that runs it (-march=native) by megaedge/runtime/kernels.py: AVX512-VNNI, AVX2 or ARM
   dot-product instructions where the CPU has them, portable C elsewhere. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(ME_PORTABLE)
#define ME_ISA 0
#elif defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512F__)
#include <immintrin.h>
#define ME_ISA 2
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define ME_ISA 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#include <arm_neon.h>
#define ME_ISA 3
#else
#define ME_ISA 0
#endif

#define STREAMS 4
#define ZERO_POINT 128

int me_abi_version(void) { return 3; }

/* 2: AVX512-VNNI, 1: AVX2, 3: ARM dot product, 0: portable C */
int me_isa(void) { return ME_ISA; }

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
    for (int b = 0; b < nb; b++) {
        int lo = b * blk, hi = lo + blk < k ? lo + blk : k;
        float amax = 0.f;
        for (int i = lo; i < hi; i++) amax = fmaxf(amax, fabsf(x[i]));
        float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
        int32_t sum = 0;
        for (int i = lo; i < lo + blk; i++) {
            int v = i < hi ? (int)lrintf(x[i] * inv) : 0;
            v = v > 127 ? 127 : (v < -127 ? -127 : v);
            q[i] = (int8_t)v;
            sum += v;
        }
        sa[b] = s;
        asum[b] = sum;
    }
}

/* ------------------------------------------------------------------------------------------ matrix-vector */

typedef struct {
    const uint8_t *w; /* [n][nb][blk] */
    const float *s;   /* [n][nb] */
    int32_t n, k, nb, blk;
} me_linear;

typedef struct {  /* an activation vector quantized for one block size */
    int8_t *q;
    float *sa;
    int32_t *asum;
} me_act;

/* Sum over one block of (w - 128) * q for a row p, where no vector form applies. */
static inline int32_t dot_block(const uint8_t *p, const int8_t *qb, int blk, int32_t asum) {
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
#if ME_ISA == 2
    if (blk % 64 == 0) {
        __m512 acc[STREAMS];
        float corr[STREAMS];
        for (int r = 0; r < cnt; r++) { acc[r] = _mm512_setzero_ps(); corr[r] = 0.f; }
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = a->q + (size_t)b * blk;
            for (int r = 0; r < cnt; r++) {
                const uint8_t *p = m->w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
                _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);  /* measured: +0-15 % at 1-6 MB matrices */
                _mm_prefetch((const char *)(p + 1088), _MM_HINT_T0);
                __m512i d = _mm512_setzero_si512();
                for (int c = 0; c < blk; c += 64)
                    d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(p + c), _mm512_loadu_si512(qb + c));
                float s = m->s[(size_t)idx[r] * nb + b] * a->sa[b];
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s), acc[r]);
                corr[r] += s * (float)a->asum[b];
            }
        }
        for (int r = 0; r < cnt; r++) y[idx[r]] = _mm512_reduce_add_ps(acc[r]) - ZERO_POINT * corr[r];
        return;
    }
#endif
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

/* rows [lo, hi) of y = m x: STREAMS distant row ranges side by side, then the remainder one by one */
static void gemv_rows(const me_linear *m, const me_act *a, float *y, int lo, int hi) {
    int len = (hi - lo) / STREAMS, idx[STREAMS];
    for (int j = 0; j < len; j++) {
        for (int s = 0; s < STREAMS; s++) idx[s] = lo + s * len + j;
        if (m->blk == 128)
            rows_together(m, a, y, idx, STREAMS, 128);
        else
            rows_together(m, a, y, idx, STREAMS, m->blk);
    }
    for (int r = lo + STREAMS * len; r < hi; r++) {
        idx[0] = r;
        rows_together(m, a, y, idx, 1, m->blk);
    }
}

static inline int thread_id(void) {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

static inline int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

/* this thread's share of y = m x, inside a parallel region */
static void gemv_share(const me_linear *m, const me_act *a, float *y) {
    int t = thread_id(), T = team_size();
    gemv_rows(m, a, y, (int)((long long)m->n * t / T), (int)((long long)m->n * (t + 1) / T));
}

void me_gemv_q8(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum, float *y,
                int n, int nb, int blk, int threads) {
    me_linear m = {w, sw, n, nb * blk, nb, blk};
    me_act a = {(int8_t *)q, (float *)sa, (int32_t *)asum};
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
#endif
    gemv_share(&m, &a, y);
}

/* ------------------------------------------------------------------------------------------ decoder step */

typedef struct {
    me_linear q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm, *q_norm, *k_norm;
    float *keys, *values; /* [kv_heads][capacity][head_dim], written at the step's position */
} me_layer;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, intermediate, capacity, vocab;
    float eps, scaling;
    me_layer *layer;
    me_linear lm_head;
    const float *final_norm;
} me_model;

static void quantize_for(const float *x, const float *norm, float eps, const me_linear *m, me_act *a,
                         float *scratch) {
    me_quantize(x, norm, eps, m->k, m->blk, m->nb, a->q, a->sa, a->asum, scratch);
}

/* q/k norm and rotary embedding (rotate-half form) of one head vector in place */
static void norm_rotate(float *h, const float *weight, float eps, int dim, const float *cos, const float *sin) {
    float tmp[dim];
    rms_norm(h, weight, eps, dim, tmp);
    int half = dim / 2;
    for (int i = 0; i < half; i++) {
        h[i] = tmp[i] * cos[i] - tmp[i + half] * sin[i];
        h[i + half] = tmp[i + half] * cos[i + half] + tmp[i] * sin[i + half];
    }
}

/* grouped-query attention of the query heads of kv head g over positions [0, len) */
static void attend(const me_model *m, const me_layer *l, int g, float *qh, float *out, int len, float *scores) {
    const int dim = m->head_dim, group = m->heads / m->kv_heads;
    const float *keys = l->keys + (size_t)g * m->capacity * dim, *values = l->values + (size_t)g * m->capacity * dim;
    for (int j = 0; j < group; j++) {
        const float *q = qh + (size_t)(g * group + j) * dim;
        float *o = out + (size_t)(g * group + j) * dim, top = -INFINITY, total = 0.f;
        for (int t = 0; t < len; t++) {
            const float *kt = keys + (size_t)t * dim;
            float s = 0.f;
#pragma omp simd reduction(+ : s)
            for (int i = 0; i < dim; i++) s += q[i] * kt[i];
            scores[t] = s * m->scaling;
            top = fmaxf(top, scores[t]);
        }
        for (int t = 0; t < len; t++) total += scores[t] = expf(scores[t] - top);
        memset(o, 0, sizeof(float) * dim);
        for (int t = 0; t < len; t++) {
            const float *vt = values + (size_t)t * dim, p = scores[t] / total;
#pragma omp simd
            for (int i = 0; i < dim; i++) o[i] += p * vt[i];
        }
    }
}

/* One decoder step: x [hidden] holds the token's embedding and is overwritten; the layers' caches get this
   position's keys and values; logits [vocab] are written. cos/sin [head_dim] are the rotary factors of pos.
   Returns 0, or -1 when scratch memory could not be had. Parallel work: row shares of every product and the kv
   heads of attention; the small vector work between them runs on one thread while the others wait. */
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
          *scratch = malloc(sizeof(float) * widest), *all_scores = malloc(sizeof(float) * m->capacity * team),
          *sa = malloc(sizeof(float) * (widest + 1));
    int32_t *asum = malloc(sizeof(int32_t) * (widest + 1));
    int8_t *q8 = malloc((size_t)widest + 1024);
    void *owned[] = {qv, kv, vv, att, prod, gate, up, scratch, all_scores, sa, asum, q8};
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
        float *scores = all_scores + (size_t)thread_id() * m->capacity;
        for (int i = 0; i < m->layers; i++) {
            const me_layer *l = &m->layer[i];
#ifdef _OPENMP
#pragma omp single
#endif
            quantize_for(x, l->input_norm, m->eps, &l->q, &act, scratch);
            gemv_share(&l->q, &act, qv);  /* q, k, v read the same input: no barrier between them */
            gemv_share(&l->k, &act, kv);
            gemv_share(&l->v, &act, vv);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (int g = 0; g < m->kv_heads; g++) {
                float *kh = kv + (size_t)g * m->head_dim;
                norm_rotate(kh, l->k_norm, m->eps, m->head_dim, cos, sin);
                memcpy(l->keys + ((size_t)g * m->capacity + pos) * m->head_dim, kh, sizeof(float) * m->head_dim);
                memcpy(l->values + ((size_t)g * m->capacity + pos) * m->head_dim, vv + (size_t)g * m->head_dim,
                       sizeof(float) * m->head_dim);
                int group = m->heads / m->kv_heads;
                for (int j = 0; j < group; j++)
                    norm_rotate(qv + (size_t)(g * group + j) * m->head_dim, l->q_norm, m->eps, m->head_dim, cos, sin);
                attend(m, l, g, qv, att, len, scores);
            }
#ifdef _OPENMP
#pragma omp single
#endif
            quantize_for(att, NULL, 0.f, &l->o, &act, scratch);
            gemv_share(&l->o, &act, prod);
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
#ifdef _OPENMP
#pragma omp barrier
#pragma omp single
#endif
            {
                for (int j = 0; j < m->intermediate; j++) gate[j] = gate[j] / (1.f + expf(-gate[j])) * up[j];
                quantize_for(gate, NULL, 0.f, &l->down, &act, scratch);
            }
            gemv_share(&l->down, &act, prod);
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
