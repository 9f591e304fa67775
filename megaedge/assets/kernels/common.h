/* What every part of the kernel library shares (decoder.c includes the parts into one translation unit): the C
   headers, which instruction set this build targets (ME_ISA, ME_AMX: chosen by the compiler flags, see
   megaedge/assets/kernels/variants.py), the weight and model structs that runtime/kernels.py mirrors with ctypes,
   and the small inline helpers (threads, exp) the products, attention and stem all use. */
#ifndef ME_COMMON_H
#define ME_COMMON_H
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

/* ------------------------------------------------------------------------------------------ structs */

typedef struct {
    const uint8_t *w; /* [n][nb][blk], or packed: [n / LANES][nb][blk / 4][LANES][4] (prompt_tiles.h) */
    const float *s;   /* [n][nb], or packed: [n / LANES][nb][LANES] */
    int32_t n, k, nb, blk;
    int32_t packed; /* 0: MatMulNBits' row layout; LANES: groups of LANES rows, padded (me_pack_q8) */
} me_linear;

typedef struct {  /* activations quantized for one block size: a vector, or rows of nb * blk values each */
    int8_t *q;
    float *sa;
    int32_t *asum;
} me_act;

typedef struct {
    me_linear q, k, v, o, gate, up, down;
    const float *input_norm, *post_norm, *q_norm, *k_norm;
    float *keys, *values; /* [kv_heads][capacity][head_dim], written at the step's position */
} me_layer;

typedef struct { /* a routed bundle's low-rank branch of one projection (lora.h): the graph's float initializers */
    const float *a; /* [k][rank] */
    const float *b; /* [rank][n] */
    int32_t rank;   /* 0: no branch */
} me_lora;

typedef struct {
    int32_t layers, hidden, heads, kv_heads, head_dim, intermediate, capacity, vocab;
    float eps, scaling;
    me_layer *layer;
    me_linear lm_head;
    const float *final_norm;
    /* after the fields above, so a library of an earlier revision still reads a merged model's struct */
    const me_lora *lora; /* [layers][7] in q, k, v, o, gate, up, down order; NULL: no branches */
    float lora_gate;     /* this sequence's route: 1 the LoRA, 0 the base (the branches skipped) */
    int32_t kv_half;     /* 1: the caches (me_layer keys, values) hold IEEE half floats, not floats */
} me_model;

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

/* this thread's share [lo, hi) of count rows inside a parallel region: the one split of every product, so a thread
   that adds to rows after a product (a LoRA branch, lora.h) adds to the rows it computed */
static inline void share_of(int count, int *lo, int *hi) {
    const int t = thread_id(), T = team_size();
    *lo = (int)((long long)count * t / T);
    *hi = (int)((long long)count * (t + 1) / T);
}

/* this thread's share [lo, hi) of a product's rows: whole groups of a packed matrix, so that a thread that adds to
   rows after the product adds to rows it computed */
static inline void rows_share(const me_linear *m, int *lo, int *hi) {
    if (!m->packed) {
        share_of(m->n, lo, hi);
        return;
    }
    share_of((m->n + m->packed - 1) / m->packed, lo, hi);
    *lo *= m->packed;
    *hi = *hi * m->packed < m->n ? *hi * m->packed : m->n;
}

/* exp(x) in plain operations (glibc's expf is a call per value: ~5 % of a 1.7B prompt in softmax and SwiGLU),
   which me_exp8 / me_exp4 below repeat on vectors: 2^n * e^r with |r| <= ln2 / 2 and a degree-6 Taylor polynomial
   (relative error < 3e-7 over [-87, 88], where it clamps); n rounded by the 1.5 * 2^23 trick, exact because
   -ffp-contract=off keeps both additions. */
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

/* me_exp over a vector, operation for operation (the same clamps, NaN passing through; the same multiplies and
   adds in the same order; the same truncation), so every value has me_exp's bits: GCC vectorizes neither me_exp's
   clamps (a NaN must pass, so they are no min / max) nor the loops around it, and SwiGLU and the softmax run it
   once per value (a 1.7B batch of eight: ~1.4 million values a step in each). */
#if ME_ISA == 1 || ME_ISA == 2
static inline __m256 me_exp8(__m256 x) {
    x = _mm256_blendv_ps(x, _mm256_set1_ps(-87.f), _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ));
    x = _mm256_blendv_ps(x, _mm256_set1_ps(88.f), _mm256_cmp_ps(x, _mm256_set1_ps(88.f), _CMP_GT_OQ));
    const __m256 shift = _mm256_set1_ps(12582912.f);
    const __m256 n = _mm256_sub_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), shift), shift);
    const __m256 r = _mm256_sub_ps(_mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693145751953125f))),
                                   _mm256_mul_ps(n, _mm256_set1_ps(1.42860682e-6f)));
    __m256 p = _mm256_mul_ps(r, _mm256_set1_ps(0.0013888889f));
    p = _mm256_mul_ps(r, _mm256_add_ps(_mm256_set1_ps(0.0083333338f), p));
    p = _mm256_mul_ps(r, _mm256_add_ps(_mm256_set1_ps(0.041666668f), p));
    p = _mm256_mul_ps(r, _mm256_add_ps(_mm256_set1_ps(0.16666667f), p));
    p = _mm256_mul_ps(r, _mm256_add_ps(_mm256_set1_ps(0.5f), p));
    p = _mm256_mul_ps(r, _mm256_add_ps(_mm256_set1_ps(1.f), p));
    p = _mm256_add_ps(_mm256_set1_ps(1.f), p);
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}
#elif ME_ISA == 3
static inline float32x4_t me_exp4(float32x4_t x) {
    x = vbslq_f32(vcltq_f32(x, vdupq_n_f32(-87.f)), vdupq_n_f32(-87.f), x);
    x = vbslq_f32(vcgtq_f32(x, vdupq_n_f32(88.f)), vdupq_n_f32(88.f), x);
    const float32x4_t shift = vdupq_n_f32(12582912.f);
    const float32x4_t n = vsubq_f32(vaddq_f32(vmulq_f32(x, vdupq_n_f32(1.44269504f)), shift), shift);
    const float32x4_t r = vsubq_f32(vsubq_f32(x, vmulq_f32(n, vdupq_n_f32(0.693145751953125f))),
                                    vmulq_f32(n, vdupq_n_f32(1.42860682e-6f)));
    float32x4_t p = vmulq_f32(r, vdupq_n_f32(0.0013888889f));
    p = vmulq_f32(r, vaddq_f32(vdupq_n_f32(0.0083333338f), p));
    p = vmulq_f32(r, vaddq_f32(vdupq_n_f32(0.041666668f), p));
    p = vmulq_f32(r, vaddq_f32(vdupq_n_f32(0.16666667f), p));
    p = vmulq_f32(r, vaddq_f32(vdupq_n_f32(0.5f), p));
    p = vmulq_f32(r, vaddq_f32(vdupq_n_f32(1.f), p));
    p = vaddq_f32(vdupq_n_f32(1.f), p);
    const int32x4_t bits = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(bits));
}
#endif

/* SwiGLU, h = g / (1 + exp(-g)) * u for n values (h may be g itself: each value is read before it is written) */
static inline void me_swiglu(float *h, const float *g, const float *u, size_t n) {
    size_t j = 0;
#if ME_ISA == 1 || ME_ISA == 2
    const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
    for (; j + 8 <= n; j += 8) {
        const __m256 gv = _mm256_loadu_ps(g + j);
        const __m256 e = me_exp8(_mm256_xor_ps(gv, sign));  /* -g: the sign flipped, as C's unary minus */
        _mm256_storeu_ps(h + j, _mm256_mul_ps(_mm256_div_ps(gv, _mm256_add_ps(one, e)), _mm256_loadu_ps(u + j)));
    }
#elif ME_ISA == 3
    for (; j + 4 <= n; j += 4) {
        const float32x4_t gv = vld1q_f32(g + j);
        const float32x4_t e = me_exp4(vnegq_f32(gv));
        vst1q_f32(h + j, vmulq_f32(vdivq_f32(gv, vaddq_f32(vdupq_n_f32(1.f), e)), vld1q_f32(u + j)));
    }
#endif
    for (; j < n; j++) h[j] = g[j] / (1.f + me_exp(-g[j])) * u[j];
}

/* s[t] = exp(s[t] - top) for n values (a softmax's numerators) */
static inline void me_exp_shifted(float *s, size_t n, float top) {
    size_t t = 0;
#if ME_ISA == 1 || ME_ISA == 2
    const __m256 tv = _mm256_set1_ps(top);
    for (; t + 8 <= n; t += 8) _mm256_storeu_ps(s + t, me_exp8(_mm256_sub_ps(_mm256_loadu_ps(s + t), tv)));
#elif ME_ISA == 3
    const float32x4_t tv = vdupq_n_f32(top);
    for (; t + 4 <= n; t += 4) vst1q_f32(s + t, me_exp4(vsubq_f32(vld1q_f32(s + t), tv)));
#endif
    for (; t < n; t++) s[t] = me_exp(s[t] - top);
}

#if ME_ISA == 2
/* the sum of a 512-bit vector's sixteen floats, in one fixed order (attention's scores): s_i = v_i + v_(i+8),
   t_j = s_j + s_(j+4), (t_0 + t_2) + (t_1 + t_3), which is also the order GCC's _mm512_reduce_add_ps takes */
static inline float me_sum16(__m512 v) {
    const __m256 s = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
    const __m128 t = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    const __m128 u = _mm_add_ps(t, _mm_movehl_ps(t, t));
    return _mm_cvtss_f32(_mm_add_ss(u, _mm_movehdup_ps(u)));
}

#endif
#endif /* ME_COMMON_H */
