/* Block-quantized 8-bit matrix-vector product for the CPU decode step (megaedge/runtime/native_decode.py).

   Weights use onnxruntime's MatMulNBits 8-bit layout, so a bundle's decoder weights serve both engines unchanged:
   w[N][nb][blk] uint8 holding value + 128 (symmetric), one float scale per block. The activation vector is
   quantized per block to int8 (symmetric), as MatMulNBits does at accuracy level 4, so each block is one integer
   dot product:  y[n] = sum_b sw[n,b] * sa[b] * (sum_k w[n,b,k] * q[b,k] - 128 * sum_k q[b,k]).

   Why it exists: at one row (decode) the product is bound by reading the weights, and no onnxruntime or OpenVINO
   kernel for int8 weights read faster than ~60 % of this kind of machine's bandwidth (benchmarks/results). A core
   reads memory fastest with several independent streams in flight, so every thread walks STREAMS distant row
   ranges side by side instead of one.

   Compiled on the machine that runs it (-march=native) by megaedge/runtime/kernels.py; AVX512-VNNI where the CPU
   has it, portable C elsewhere. */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512F__)
#include <immintrin.h>
#define ME_VNNI512 1
#else
#define ME_VNNI512 0
#endif

#define STREAMS 4
#define ZERO_POINT 128

int me_abi_version(void) { return 2; }

/* 2: AVX512-VNNI, 0: portable C */
int me_isa(void) { return ME_VNNI512 ? 2 : 0; }

/* With a norm weight, x is RMS-normalized first (x * norm / sqrt(mean(x^2) + eps)): one call instead of several
   numpy ones per projection input. */
void me_quantize(const float *x, const float *norm, float eps, int k, int blk, int nb, int8_t *q, float *sa,
                 int32_t *asum, float *scratch) {
    if (norm) {
        double ss = 0.0;
        for (int i = 0; i < k; i++) ss += (double)x[i] * x[i];
        float r = 1.f / sqrtf((float)(ss / k) + eps);
        for (int i = 0; i < k; i++) scratch[i] = x[i] * r * norm[i];
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

static inline int32_t dot_block_c(const uint8_t *w, const int8_t *q, int blk) {
    int32_t d = 0;
    for (int i = 0; i < blk; i++) d += (int32_t)w[i] * (int32_t)q[i];
    return d;
}

/* rows idx[0..cnt) advanced together, block by block: cnt independent read streams. Always inlined so that the
   common cases (cnt = STREAMS, blk = 128) compile with constant trip counts and the accumulators in registers. */
static inline __attribute__((always_inline)) void rows_together(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum,
                          float *y, int nb, int blk, const int *idx, int cnt) {
    const size_t row_bytes = (size_t)nb * blk;
#if ME_VNNI512
    if (blk % 64 == 0) {
        __m512 acc[STREAMS];
        float corr[STREAMS];
        for (int r = 0; r < cnt; r++) { acc[r] = _mm512_setzero_ps(); corr[r] = 0.f; }
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = q + (size_t)b * blk;
            for (int r = 0; r < cnt; r++) {
                const uint8_t *p = w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
                _mm_prefetch((const char *)(p + 1024), _MM_HINT_T0);  /* measured: +0-15 % at 1-6 MB matrices */
                _mm_prefetch((const char *)(p + 1088), _MM_HINT_T0);
                __m512i d = _mm512_setzero_si512();
                for (int c = 0; c < blk; c += 64)
                    d = _mm512_dpbusd_epi32(d, _mm512_loadu_si512(p + c), _mm512_loadu_si512(qb + c));
                float s = sw[(size_t)idx[r] * nb + b] * sa[b];
                acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), _mm512_set1_ps(s), acc[r]);
                corr[r] += s * (float)asum[b];
            }
        }
        for (int r = 0; r < cnt; r++) y[idx[r]] = _mm512_reduce_add_ps(acc[r]) - ZERO_POINT * corr[r];
        return;
    }
    if (blk % 16 == 0) {
        float sum[STREAMS];
        for (int r = 0; r < cnt; r++) sum[r] = 0.f;
        for (int b = 0; b < nb; b++) {
            const int8_t *qb = q + (size_t)b * blk;
            for (int r = 0; r < cnt; r++) {
                const uint8_t *p = w + (size_t)idx[r] * row_bytes + (size_t)b * blk;
                __m128i d = _mm_setzero_si128();
                for (int c = 0; c < blk; c += 16)
                    d = _mm_dpbusd_epi32(d, _mm_loadu_si128((const __m128i *)(p + c)),
                                         _mm_loadu_si128((const __m128i *)(qb + c)));
                d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0x4e));
                d = _mm_add_epi32(d, _mm_shuffle_epi32(d, 0xb1));
                int32_t dot = _mm_cvtsi128_si32(d) - ZERO_POINT * asum[b];
                sum[r] += sw[(size_t)idx[r] * nb + b] * sa[b] * (float)dot;
            }
        }
        for (int r = 0; r < cnt; r++) y[idx[r]] = sum[r];
        return;
    }
#endif
    for (int r = 0; r < cnt; r++) {
        const uint8_t *row = w + (size_t)idx[r] * row_bytes;
        float sum = 0.f;
        for (int b = 0; b < nb; b++) {
            int32_t dot = dot_block_c(row + (size_t)b * blk, q + (size_t)b * blk, blk) - ZERO_POINT * asum[b];
            sum += sw[(size_t)idx[r] * nb + b] * sa[b] * (float)dot;
        }
        y[idx[r]] = sum;
    }
}

void me_gemv_q8(const uint8_t *w, const float *sw, const int8_t *q, const float *sa, const int32_t *asum, float *y,
                int n, int nb, int blk, int threads) {
#ifdef _OPENMP
#pragma omp parallel num_threads(threads > 0 ? threads : 1)
#endif
    {
#ifdef _OPENMP
        int t = omp_get_thread_num(), T = omp_get_num_threads();
#else
        int t = 0, T = 1;
#endif
        int lo = (int)((long long)n * t / T), hi = (int)((long long)n * (t + 1) / T);
        int len = (hi - lo) / STREAMS, idx[STREAMS];
        for (int j = 0; j < len; j++) {
            for (int s = 0; s < STREAMS; s++) idx[s] = lo + s * len + j;
            if (blk == 128)
                rows_together(w, sw, q, sa, asum, y, nb, 128, idx, STREAMS);
            else
                rows_together(w, sw, q, sa, asum, y, nb, blk, idx, STREAMS);
        }
        for (int r = lo + STREAMS * len; r < hi; r++) {
            idx[0] = r;
            rows_together(w, sw, q, sa, asum, y, nb, blk, idx, 1);
        }
    }
}
