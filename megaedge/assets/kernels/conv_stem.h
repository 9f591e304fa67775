/* The audio encoder's convolution stem (megaedge/runtime/native_stem.py), on the prompt products (gemm.h); part of
   decoder.c's one translation unit.

   Qwen3-ASR cuts the mel spectrogram into chunks of 100 frames and passes each through three 3x3 convolutions of
   stride 2 (1 -> C -> C -> C channels, C = 480), each followed by an exact GELU. In float on a 2-core CPU that stem
   is half of the INT8 encoder's time (1.7B, 30 s: ~0.7 of ~1.5 s in onnxruntime), nearly all of it in the two
   C -> C convolutions. Here those two are int8 products on the prompt kernels (AMX tiles where present): the
   input of each is quantized once per position and block of channels, symmetric, with its own scale (as the
   decoder's activations are per block), and im2col only copies those int8 blocks. The weights are int8 per output
   channel and block of 128 inputs (export/native_stem.py). That is finer than any static per-tensor scheme, which
   is what cost onnxruntime's int8 stem (recipe cpu-fast) its accuracy. The first convolution (one input channel,
   9 products per output) stays float.

   Layout: each position's channels are padded to Cp (a multiple of the block), so a block never straddles two
   taps and im2col's rows are whole blocks: row = (ky, kx, channel) with Cp channels per tap. Maps keep a zero
   border (q = 0, scale 0), which is the convolution's zero padding. Chunks are independent: each thread takes
   whole chunks, so a chunk's maps and products stay in its core's cache. */

#ifndef ME_CONV_STEM_H
#define ME_CONV_STEM_H
#include "gemm.h"
#include "quantize.h"

/* exact GELU, x * (1 + erf(x / sqrt 2)) / 2, with erf from Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7) */
static inline float stem_gelu(float x) {
    const float z = fabsf(x) * 0.70710678f;
    const float t = 1.f / (1.f + 0.3275911f * z);
    const float poly = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f +
                                                                                         t * 1.061405429f))));
    const float e = 1.f - poly * me_exp(-z * z);
    return 0.5f * x * (1.f + (x < 0.f ? -e : e));
}

typedef struct {  /* a quantized feature map with a one-position zero border: [H + 2][W + 2][Cp] */
    int8_t *q;
    float *sa;
    int32_t *asum;
    int h, w;
} stem_map;

static void stem_map_clear(const stem_map *map, int cp, int nbc) {
    const size_t positions = (size_t)(map->h + 2) * (map->w + 2);
    memset(map->q, 0, positions * cp);
    memset(map->sa, 0, positions * nbc * sizeof(float));
    memset(map->asum, 0, positions * nbc * sizeof(int32_t));
}

/* GELU(v + bias) of one position's channels, quantized into the map at (y, x) (unpadded coordinates) */
static void stem_store(const stem_map *map, int y, int x, float *v, const float *bias, int channels, int blk,
                       int nbc) {
    for (int c = 0; c < channels; c++) v[c] = stem_gelu(v[c] + bias[c]);
    const size_t at = (size_t)(y + 1) * (map->w + 2) + (x + 1);
    me_quantize(v, NULL, 0.f, channels, blk, nbc, map->q + at * nbc * blk, map->sa + at * nbc, map->asum + at * nbc,
                NULL);
}

/* im2col of a 3x3 stride-2 convolution over `map`: rows (y, x) of the output, each 9 taps of Cp channels */
static void stem_im2col(const stem_map *map, int ho, int wo, int cp, int nbc, me_act *rows) {
    for (int y = 0; y < ho; y++)
        for (int x = 0; x < wo; x++) {
            const size_t row = (size_t)y * wo + x;
            for (int ky = 0; ky < 3; ky++)
                for (int kx = 0; kx < 3; kx++) {
                    const size_t at = (size_t)(2 * y + ky) * (map->w + 2) + (2 * x + kx);
                    const size_t tap = row * 9 + ky * 3 + kx;
                    memcpy(rows->q + tap * cp, map->q + at * cp, cp);
                    memcpy(rows->sa + tap * nbc, map->sa + at * nbc, nbc * sizeof(float));
                    memcpy(rows->asum + tap * nbc, map->asum + at * nbc, nbc * sizeof(int32_t));
                }
        }
}

static inline int stem_out(int n) { return (n - 1) / 2 + 1; }  /* kernel 3, stride 2, padding 1 */

/* the next part of a thread's share of scratch: `bytes` at *base, which moves on by them rounded up to 64 */
static inline void *stem_take(char **base, size_t bytes) {
    void *part = *base;
    *base += (bytes + 63) / 64 * 64;
    return part;
}

/* mel [windows][bins][chunks * frames] (chunk c of window w = frames c*frames..), the three convolutions' weights:
   w1 [9][C] float (tap-major), w2/w3 [C][9 * Cp / blk][blk] uint8 (value + 128) with scales [C][9 * Cp / blk],
   biases [C]; out [windows * chunks][T3][C * F3] (T3, F3: time and frequency after three halvings), the order
   conv_out reads (channel-major, then frequency). Returns 0, or -1 without memory. */
int me_conv_stem(const float *mel, int windows, int chunks, int bins, int frames, const float *w1, const float *b1,
                 int channels, const uint8_t *w2, const float *s2, const float *b2, const uint8_t *w3,
                 const float *s3, const float *b3, int blk, float *out, int threads) {
    const int nbc = (channels + blk - 1) / blk, cp = nbc * blk, nb = 9 * nbc;
    const int f1 = stem_out(bins), t1 = stem_out(frames), f2 = stem_out(f1), t2 = stem_out(t1);
    const int f3 = stem_out(f2), t3 = stem_out(t2), rows2 = f2 * t2, rows3 = f3 * t3;
    const me_linear m2 = {w2, s2, channels, nb * blk, nb, blk, 0},
                    m3 = {w3, s3, channels, nb * blk, nb, blk, 0};
    const size_t map1 = (size_t)(f1 + 2) * (t1 + 2), map2 = (size_t)(f2 + 2) * (t2 + 2);
    const size_t pack = pack_bytes((size_t)nb * blk, rows2);
    /* per thread, in the order they are taken: two maps (bytes, scales, sums), the im2col rows (the same), the
       products, one position's channels, the packing scratch; each part starts on 64 bytes, so the thread's whole
       share is the sum of the parts rounded up (a margin for alignment once fell short: the portable build wrote
       past its share) */
    const size_t parts[12] = {map1 * cp, map1 * nbc * 4, map1 * nbc * 4, map2 * cp, map2 * nbc * 4, map2 * nbc * 4,
                              (size_t)rows2 * nb * blk, (size_t)rows2 * nb * 4, (size_t)rows2 * nb * 4,
                              (size_t)rows2 * channels * 4, (size_t)cp * 4, pack};
    size_t per_thread = 0;
    for (int i = 0; i < 12; i++) per_thread += (parts[i] + 63) / 64 * 64;
    const int team = threads > 0 ? threads : 1, total = windows * chunks, total_frames = chunks * frames;
    char *all = aligned_alloc(64, per_thread * team);  /* a whole number of 64s, never 0 (the maps are not empty) */
    if (!all) return -1;
#ifdef _OPENMP
#pragma omp parallel num_threads(team)
#endif
    {
        char *base = all + per_thread * thread_id();
        stem_map first = {stem_take(&base, parts[0]), NULL, NULL, f1, t1};
        first.sa = stem_take(&base, parts[1]);
        first.asum = stem_take(&base, parts[2]);
        stem_map second = {stem_take(&base, parts[3]), NULL, NULL, f2, t2};
        second.sa = stem_take(&base, parts[4]);
        second.asum = stem_take(&base, parts[5]);
        me_act rows = {stem_take(&base, parts[6]), NULL, NULL};
        rows.sa = stem_take(&base, parts[7]);
        rows.asum = stem_take(&base, parts[8]);
        float *y = stem_take(&base, parts[9]);
        float *v = stem_take(&base, parts[10]);
        void *scratch = stem_take(&base, parts[11]);
        /* the borders (the zero padding) are never written; every chunk rewrites every interior position */
        stem_map_clear(&first, cp, nbc);
        stem_map_clear(&second, cp, nbc);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, 1)
#endif
        for (int i = 0; i < total; i++) {
            const float *in = mel + (size_t)(i / chunks) * bins * total_frames + (size_t)(i % chunks) * frames;
            for (int fy = 0; fy < f1; fy++)
                for (int tx = 0; tx < t1; tx++) {
                    for (int c = 0; c < channels; c++) v[c] = 0.f;
                    for (int ky = 0; ky < 3; ky++) {
                        const int f = 2 * fy - 1 + ky;
                        if (f < 0 || f >= bins) continue;
                        for (int kx = 0; kx < 3; kx++) {
                            const int t = 2 * tx - 1 + kx;
                            if (t < 0 || t >= frames) continue;
                            const float value = in[(size_t)f * total_frames + t], *w = w1 + (ky * 3 + kx) * channels;
                            for (int c = 0; c < channels; c++) v[c] += value * w[c];
                        }
                    }
                    stem_store(&first, fy, tx, v, b1, channels, blk, nbc);
                }
            stem_im2col(&first, f2, t2, cp, nbc, &rows);
            gemm_rows(&m2, &rows, y, rows2, 0, channels, scratch);
            for (int r = 0; r < rows2; r++) {
                memcpy(v, y + (size_t)r * channels, channels * sizeof(float));
                stem_store(&second, r / t2, r % t2, v, b2, channels, blk, nbc);
            }
            stem_im2col(&second, f3, t3, cp, nbc, &rows);
            gemm_rows(&m3, &rows, y, rows3, 0, channels, scratch);
            float *dst = out + (size_t)i * t3 * channels * f3;
            for (int r = 0; r < rows3; r++) {
                const int fy = r / t3, tx = r % t3;
                for (int c = 0; c < channels; c++)
                    dst[((size_t)tx * channels + c) * f3 + fy] = stem_gelu(y[(size_t)r * channels + c] + b3[c]);
            }
        }
    }
    free(all);
    return 0;
}

#endif /* ME_CONV_STEM_H */
