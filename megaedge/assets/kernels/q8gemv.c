/* The CPU decoder of a weight-only INT8 bundle (megaedge/runtime/native_decode.py): a block-quantized 8-bit
   matrix-vector product and, around it, one whole decoder step (norms, rotary, attention, SwiGLU) in one call;
   and the same decoder over a whole prompt (me_prefill).

   Weights use onnxruntime's MatMulNBits 8-bit layout, so a bundle's decoder weights serve both engines unchanged:
   w[N][nb][blk] uint8 holding value + 128 (symmetric), one float scale per block. The activation vector is
   quantized per block to int8 (symmetric), as MatMulNBits does at accuracy level 4, so each block is one integer
   dot product:  y[n] = sum_b sw[n,b] * sa[b] * sum_k (w[n,b,k] - 128) * q[b,k].

   Why it exists: at one row (decode) the product is bound by reading the weights, and no onnxruntime or OpenVINO
   kernel for int8 weights read faster than ~60 % of a 2-core machine's bandwidth (benchmarks/results). A core
   reads memory fastest with several independent streams in flight, so every thread walks STREAMS distant row
   ranges side by side instead of one. The whole step is one call with one thread team because the work between
   the products (per layer: two norms, attention over the cache, SwiGLU) cost a quarter of a step as numpy calls.

   A prompt is compute-bound instead (400 rows at 1.7B: ~560 G multiply-adds), so me_prefill runs it several rows
   at a time: weights are walked in tiles that stay in the core's L2 cache while every row group passes, and on
   AVX2/AVX512 a tile is first repacked so that lanes are weight rows (prompt_tiles.h); with AMX, row groups of 32
   go through int8 tile instructions. Its products use the
   portable arithmetic on every build (each block's integer dot exactly, then scaled and added in block order);
   the rest of a row (norms, rotary, attention, SwiGLU) is the decode step's own code, so the portable build
   prefills to the same bits as it steps, and vector builds to within float rounding of their steps.

   The encoder's convolution stem runs on the same products (conv_stem.h).

   Compiled on the machine that runs it (-march=native) by megaedge/runtime/kernels.py: AVX512-VNNI (and AMX),
   AVX2 or ARM dot-product instructions where the CPU has them, portable C elsewhere. */
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
#if defined(__AMX_TILE__) && defined(__AMX_INT8__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define ME_AMX 1
#endif
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

int me_abi_version(void) { return 6; }

#ifdef ME_AMX
/* Linux hands out the AMX tile registers (8 KB of state per thread) only to a process that asks; 1: granted,
   -1: refused (kernel before 5.16, or a hypervisor that withholds it), and then the AVX512-VNNI form runs. */
static int amx_state;
static int amx_ready(void) {
    int state = __atomic_load_n(&amx_state, __ATOMIC_ACQUIRE);
    if (state == 0) {
        state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0 ? 1 : -1;
        __atomic_store_n(&amx_state, state, __ATOMIC_RELEASE);
    }
    return state > 0;
}
#endif

/* 4: AVX512-VNNI with AMX tiles for prompts, 2: AVX512-VNNI, 1: AVX2, 3: ARM dot product, 0: portable C */
int me_isa(void) {
#ifdef ME_AMX
    if (amx_ready()) return 4;
#endif
    return ME_ISA;
}

/* exp(x), vectorizable (glibc's expf is a call per value: ~5 % of a 1.7B prompt in softmax and SwiGLU): 2^n * e^r
   with |r| <= ln2 / 2 and a degree-6 Taylor polynomial (relative error < 3e-7 over [-87, 88], where it clamps);
   n rounded by the 1.5 * 2^23 trick, exact because -ffp-contract=off keeps both additions. */
static inline float me_exp(float x) {
    x = x < -87.f ? -87.f : (x > 88.f ? 88.f : x);
    const float n = (x * 1.44269504f + 12582912.f) - 12582912.f;
    const float r = (x - n * 0.693145751953125f) - n * 1.42860682e-6f;
    const float p = 1.f + r * (1.f + r * (0.5f + r * (0.16666667f + r * (0.041666668f + r * (0.0083333338f +
                                                                                             r * 0.0013888889f)))));
    const int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    return p * scale;
}

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

/* ------------------------------------------------------------------------------------------ matrix-vector */

typedef struct {
    const uint8_t *w; /* [n][nb][blk] */
    const float *s;   /* [n][nb] */
    int32_t n, k, nb, blk;
} me_linear;

typedef struct {  /* activations quantized for one block size: a vector, or rows of nb * blk values each */
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

/* grouped-query attention of the query heads of kv head g over positions [0, len): the heads of a group in one
   pass over the cache (each key and value loaded once for all of them), inlined per head size so that the common
   one (128) compiles with constant trip counts, the dot products unrolled and the outputs summed in registers
   (1.7B prompt of 1000 rows, 2-core AVX512 EPYC: attention 3.6 -> 1.8 s). scores: 2 * len floats. */
static inline __attribute__((always_inline)) void attend_dim(const me_model *m, const me_layer *l, int g,
                                                             const float *qh, float *out, int len,
                                                             float *restrict scores, const int dim) {
    const int group = m->heads / m->kv_heads;
    const float *restrict keys = l->keys + (size_t)g * m->capacity * dim;
    const float *restrict values = l->values + (size_t)g * m->capacity * dim;
    for (int j0 = 0; j0 < group; j0 += 2) {  /* two heads at a time: their sums stay in registers */
        const int pair = group - j0 < 2 ? 1 : 2;
        const float *restrict q0 = qh + (size_t)(g * group + j0) * dim, *restrict q1 = q0 + (pair - 1) * dim;
        float *restrict s0 = scores, *restrict s1 = scores + len;
        float acc0[dim], acc1[dim], top0 = -INFINITY, top1 = -INFINITY, total0 = 0.f, total1 = 0.f;
        for (int t = 0; t < len; t++) {
            const float *kt = keys + (size_t)t * dim;
            float a = 0.f, b = 0.f;
#pragma omp simd reduction(+ : a, b)
            for (int i = 0; i < dim; i++) {
                a += q0[i] * kt[i];
                b += q1[i] * kt[i];
            }
            s0[t] = a * m->scaling;
            s1[t] = b * m->scaling;
            top0 = s0[t] > top0 ? s0[t] : top0;  /* scores are finite: no fmaxf call for NaN's sake */
            top1 = s1[t] > top1 ? s1[t] : top1;
        }
        for (int t = 0; t < len; t++) {
            s0[t] = me_exp(s0[t] - top0);
            s1[t] = me_exp(s1[t] - top1);
        }
        for (int t = 0; t < len; t++) {
            total0 += s0[t];
            total1 += s1[t];
        }
        for (int i = 0; i < dim; i++) acc0[i] = acc1[i] = 0.f;
        for (int t = 0; t < len; t++) {
            const float *vt = values + (size_t)t * dim, p0 = s0[t] / total0, p1 = s1[t] / total1;
#pragma omp simd
            for (int i = 0; i < dim; i++) {
                acc0[i] += p0 * vt[i];
                acc1[i] += p1 * vt[i];
            }
        }
        memcpy(out + (size_t)(g * group + j0) * dim, acc0, sizeof(float) * dim);
        if (pair == 2) memcpy(out + (size_t)(g * group + j0 + 1) * dim, acc1, sizeof(float) * dim);
    }
}

static void attend(const me_model *m, const me_layer *l, int g, const float *qh, float *out, int len,
                   float *scores) {
    if (m->head_dim == 128)
        attend_dim(m, l, g, qh, out, len, scores, 128);
    else
        attend_dim(m, l, g, qh, out, len, scores, m->head_dim);
}

/* One position of kv head g: its key q/k-normed and rotated, key and value stored in the cache at pos, and the
   group's query heads normed and rotated in place (q, k, v: the position's projections, all heads). */
static void cache_and_rotate(const me_model *m, const me_layer *l, int g, int pos, float *q, float *k, const float *v,
                             const float *cos, const float *sin) {
    const int dim = m->head_dim, group = m->heads / m->kv_heads;
    float *kh = k + (size_t)g * dim;
    norm_rotate(kh, l->k_norm, m->eps, dim, cos, sin);
    memcpy(l->keys + ((size_t)g * m->capacity + pos) * dim, kh, sizeof(float) * dim);
    memcpy(l->values + ((size_t)g * m->capacity + pos) * dim, v + (size_t)g * dim, sizeof(float) * dim);
    for (int j = 0; j < group; j++) norm_rotate(q + (size_t)(g * group + j) * dim, l->q_norm, m->eps, dim, cos, sin);
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
          *scratch = malloc(sizeof(float) * widest), *all_scores = malloc(sizeof(float) * 2 * m->capacity * team),
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
        float *scores = all_scores + (size_t)thread_id() * 2 * m->capacity;
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
                cache_and_rotate(m, l, g, pos, qv, kv, vv, cos, sin);
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
                for (int j = 0; j < m->intermediate; j++) gate[j] = gate[j] / (1.f + me_exp(-gate[j])) * up[j];
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

/* ------------------------------------------------------------------------------------------ prompt (prefill) */

#include "prompt_tiles.h"

/* weight rows [lo, hi) of Y [rows][n] = A W^T for all `rows` activation rows */
static void gemm_rows(const me_linear *m, const me_act *a, float *y, int rows, int lo, int hi, void *scratch) {
#ifdef PACKED
    if (m->blk % 4 == 0 && hi > lo) {
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
            pack_tile(m, t0, count, pw, ps);
            int first = 0;  /* rows that the AMX tiles left to the vector form */
#ifdef ME_AMX
            /* a last row group of fewer than AMX_MIN_ROWS rows costs the tiles as much as a whole one: vectors */
            for (; amx && rows - first >= AMX_MIN_ROWS; first += AMX_ROWS) {
                const int live = rows - first < AMX_ROWS ? rows - first : AMX_ROWS;
                const int8_t *rows_packed = ap + (size_t)(first / AMX_ROWS) * AMX_ROWS * row_bytes;
                for (int g = 0; g < groups; g += 2 * AMX_PAIRS) {
                    const int n0 = t0 + g * LANES, valid = count - g * LANES;
                    const int pairs = (groups - g) / 2 < AMX_PAIRS ? (groups - g) / 2 : AMX_PAIRS;
                    if (pairs > 0) amx_panel(m, a, rows_packed, pw, ps, g, pairs, first, live, y, n0, valid);
                    if (pairs < AMX_PAIRS && (groups - g) % 2)  /* an odd last group */
                        for (int r0 = first; r0 < first + live; r0 += MR)
                            micro(m, a, pw, ps, g + 2 * pairs, 1, r0, first + live - r0 < MR ? first + live - r0 : MR,
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
                        micro(&(me_linear){m->w, m->s, m->n, m->k, m->nb, 128}, a, pw, ps, g, VECS, r0, MR, y, n0, valid);
                    else
                        micro(m, a, pw, ps, g, vecs, r0, cnt, y, n0, valid);
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
    for (int r0 = 0; r0 < rows; r0 += MR)
        for (int n = lo; n < hi; n++) row_block(m, a, y, m->n, r0, rows - r0 < MR ? rows - r0 : MR, n);
}

/* this thread's share of Y [rows][n] = A W^T, inside a parallel region; shares are whole packed groups */
static void gemm_share(const me_linear *m, const me_act *a, float *y, int rows, void *scratch) {
    int t = thread_id(), T = team_size();
#ifdef PACKED
    const int unit = LANES * VECS, units = (m->n + unit - 1) / unit;
    int lo = (int)((long long)units * t / T) * unit, hi = (int)((long long)units * (t + 1) / T) * unit;
    gemm_rows(m, a, y, rows, lo, hi < m->n ? hi : m->n, scratch);
#else
    gemm_rows(m, a, y, rows, (int)((long long)m->n * t / T), (int)((long long)m->n * (t + 1) / T), scratch);
#endif
}

/* Y [rows][n] = A W^T for activation rows quantized like me_quantize's; returns 0, or -1 without memory */
int me_gemm_q8(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum, float *y,
               int rows, int n, int nb, int blk, int threads) {
    me_linear m = {w, sw, n, nb * blk, nb, blk};
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

#include "conv_stem.h"

/* rows of x [rows][k] (RMS-normalized with `norm` first when given) quantized for m's blocks, rows shared out */
static void quantize_rows_for(const float *x, int rows, const float *norm, float eps, const me_linear *m,
                              me_act *a, float *scratch) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (int r = 0; r < rows; r++)
        me_quantize(x + (size_t)r * m->k, norm, eps, m->k, m->blk, m->nb, a->q + (size_t)r * m->nb * m->blk,
                    a->sa + (size_t)r * m->nb, a->asum + (size_t)r * m->nb, scratch);
}

/* x += y over count floats, shared out inside a parallel region (the residual connection of every row) */
static void add_rows(float *x, const float *y, size_t count) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
    for (size_t j = 0; j < count; j++) x[j] += y[j];
}

/* Rows x [rows][hidden] (embeddings, overwritten) at positions start..start+rows-1 through every layer: the
   caches get their keys and values, and logits [logit_rows][vocab] are those of the last logit_rows rows (1: what
   the next token needs; more: a stream checks the tokens it committed against new audio; 0: none). cos/sin
   [rows][head_dim]. The caches must already hold positions [0, start). Returns 0, -1 without memory, or -2 when
   logit_rows > rows. */
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
    void *owned[] = {qv, kv, vv, att, prod, gate, up, scratch, all_scores, sa, asum, q8, pack};
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
        void *packed = pack + per_thread * thread_id();
        for (int i = 0; i < m->layers; i++) {
            const me_layer *l = &m->layer[i];
            quantize_rows_for(x, rows, l->input_norm, m->eps, &l->q, &act, mine);  /* ends in a barrier */
            gemm_share(&l->q, &act, qv, rows, packed);
            gemm_share(&l->k, &act, kv, rows, packed);
            gemm_share(&l->v, &act, vv, rows, packed);
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
            quantize_rows_for(att, rows, NULL, 0.f, &l->o, &act, mine);
            gemm_share(&l->o, &act, prod, rows, packed);
#ifdef _OPENMP
#pragma omp barrier
#endif
            add_rows(x, prod, R * hidden);
            quantize_rows_for(x, rows, l->post_norm, m->eps, &l->gate, &act, mine);
            gemm_share(&l->gate, &act, gate, rows, packed);
            gemm_share(&l->up, &act, up, rows, packed);
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (size_t j = 0; j < R * inter; j++) gate[j] = gate[j] / (1.f + me_exp(-gate[j])) * up[j];
            quantize_rows_for(gate, rows, NULL, 0.f, &l->down, &act, mine);
            gemm_share(&l->down, &act, prod, rows, packed);
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
                              mine);
            gemm_share(&m->lm_head, &act, logits, logit_rows, packed);
        }
    }
    for (int i = 0; i < count; i++) free(owned[i]);
    return 0;
}
