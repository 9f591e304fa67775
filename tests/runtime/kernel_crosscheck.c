/* Drives megaedge/assets/kernels/decoder.c on deterministic inputs and prints every result as a hex float, so two
   builds of the kernels (this machine's portable C and, say, an aarch64 dot-product build run under qemu) can be
   compared bit for bit by tests/runtime/test_kernel_crosscheck.py. Inputs come from a fixed LCG, not rand(): the
   same on every C library. */
#include <stdio.h>

#include "decoder.c"  /* one translation unit: the structs and functions as the runtime builds them */

static uint64_t state = 0x9E3779B97F4A7C15ull;

static uint32_t next(void) {
    state = state * 6364136223846793005ull + 1442695040888963407ull;
    return (uint32_t)(state >> 33);
}

static float uniform(float lo, float hi) { return lo + (hi - lo) * (float)(next() & 0xFFFFFF) / 16777216.f; }

static uint8_t *bytes(size_t count) {
    uint8_t *p = malloc(count);
    for (size_t i = 0; i < count; i++) p[i] = (uint8_t)(next() >> 7);
    return p;
}

static float *floats(size_t count, float lo, float hi) {
    float *p = malloc(sizeof(float) * count);
    for (size_t i = 0; i < count; i++) p[i] = uniform(lo, hi);
    return p;
}

static me_linear linear(int n, int k, int blk) {
    int nb = (k + blk - 1) / blk;
    me_linear m = {bytes((size_t)n * nb * blk), floats((size_t)n * nb, 0.001f, 0.02f), n, k, nb, blk, 0};
    return m;
}

/* m in the build's packed layout where it keeps one for this block size (me_pack_lanes), else m itself */
static me_linear packed_copy(me_linear m) {
    const int lanes = me_pack_lanes(m.blk);
    if (!lanes) return m;
    const size_t rows = (size_t)(m.n + lanes - 1) / lanes * lanes, bytes = rows * m.nb * m.blk;
    uint8_t *pw = aligned_alloc(64, (bytes + 63) / 64 * 64);
    float *ps = malloc(sizeof(float) * rows * m.nb);
    if (me_pack_q8(m.w, m.s, m.n, m.nb, m.blk, pw, ps) != 0) {
        fprintf(stderr, "me_pack_q8 failed\n");
        exit(1);
    }
    m.w = pw;
    m.s = ps;
    m.packed = lanes;
    return m;
}

/* y = W x for one shape, block size and thread count; prints "gemv n k blk threads" then the values */
static void gemv_case(int n, int k, int blk, int threads, int packed) {
    me_linear m = linear(n, k, blk);
    if (packed) m = packed_copy(m);
    float *x = floats((size_t)k, -3.f, 3.f), *y = calloc((size_t)n, sizeof(float));
    float *scratch = malloc(sizeof(float) * k), *sa = malloc(sizeof(float) * m.nb);
    int8_t *q = calloc((size_t)m.nb * blk, 1);
    int32_t *asum = malloc(sizeof(int32_t) * m.nb);
    me_quantize(x, NULL, 0.f, k, blk, m.nb, q, sa, asum, scratch);
    me_gemv_q8(m.w, m.s, q, sa, asum, y, n, m.nb, blk, threads, m.packed);
    printf("gemv %d %d %d %d%s\n", n, k, blk, threads, packed ? " packed" : "");
    for (int i = 0; i < n; i++) printf("%a\n", y[i]);
}

/* Y = A W^T for `rows` activation rows (the prompt's product); prints "gemm n k blk rows threads" then the values */
static void gemm_case(int n, int k, int blk, int rows, int threads, int packed) {
    me_linear m = linear(n, k, blk);
    if (packed) m = packed_copy(m);
    const size_t stride = (size_t)m.nb * blk;
    float *x = floats((size_t)k * rows, -3.f, 3.f), *y = calloc((size_t)n * rows, sizeof(float));
    float *scratch = malloc(sizeof(float) * k), *sa = malloc(sizeof(float) * m.nb * rows);
    int8_t *q = calloc(stride * rows, 1);
    int32_t *asum = malloc(sizeof(int32_t) * m.nb * rows);
    for (int r = 0; r < rows; r++)
        me_quantize(x + (size_t)r * k, NULL, 0.f, k, blk, m.nb, q + r * stride, sa + r * m.nb, asum + r * m.nb, scratch);
    if (me_gemm_q8(m.w, m.s, q, sa, asum, y, rows, n, m.nb, blk, threads, m.packed) != 0) {
        fprintf(stderr, "me_gemm_q8 failed\n");
        exit(1);
    }
    printf("gemm %d %d %d %d %d%s\n", n, k, blk, rows, threads, packed ? " packed" : "");
    for (int i = 0; i < n * rows; i++) printf("%a\n", y[i]);
}

/* three steps of a tiny two-layer decoder; prints "step pos" then the logits. With `prompt`, positions 0-4 are
   first prefilled (rows 0-2, then 3-4, as chunks) and the steps follow at 5-7; prints "prefill" then the logits of
   rows 3 and 4. With `half` the caches hold half floats (me_model.kv_half) and the headers end in "half"; heads of
   `dim` values (16, or 128 as Qwen3's, which AVX512 builds attend over half caches in a form of their own) */
static void decode_case(int threads, int prompt, int half, int dim, const char *tag) {
    const int packed = strstr(tag, "packed") != NULL;  /* "packed": every matrix in the build's packed layout */
    const int layers = 2, hidden = 64, heads = 4, kv_heads = 2, inter = 96, cap = 8, vocab = 50, blk = 32;
    me_layer layer[2];
    for (int i = 0; i < layers; i++) {
        me_layer l = {linear(heads * dim, hidden, blk), linear(kv_heads * dim, hidden, blk),
                      linear(kv_heads * dim, hidden, blk), linear(hidden, heads * dim, blk),
                      linear(inter, hidden, blk), linear(inter, hidden, blk), linear(hidden, inter, blk),
                      floats(hidden, 0.5f, 1.5f), floats(hidden, 0.5f, 1.5f), floats(dim, 0.5f, 1.5f),
                      floats(dim, 0.5f, 1.5f), calloc((size_t)kv_heads * cap * dim, sizeof(float)),
                      calloc((size_t)kv_heads * cap * dim, sizeof(float))};
        if (packed) {
            me_linear *all[] = {&l.q, &l.k, &l.v, &l.o, &l.gate, &l.up, &l.down};
            for (int j = 0; j < 7; j++) *all[j] = packed_copy(*all[j]);
        }
        layer[i] = l;
    }
    me_model m = {layers, hidden, heads, kv_heads, dim, inter, cap, vocab, 1e-6f, 0.25f, layer,
                  linear(vocab, hidden, blk), floats(hidden, 0.5f, 1.5f)};
    m.kv_half = half;  /* the float-sized caches above hold the halves too */
    if (packed) m.lm_head = packed_copy(m.lm_head);
    float *logits = malloc(sizeof(float) * 2 * vocab);
    const int first = prompt ? 5 : 0;
    if (prompt) {
        float *x = floats((size_t)hidden * 5, -1.f, 1.f), *cos = floats((size_t)dim * 5, -1.f, 1.f),
              *sin = floats((size_t)dim * 5, -1.f, 1.f);
        if (me_prefill(&m, x, 3, 0, cos, sin, logits, 1, threads) != 0 ||
            me_prefill(&m, x + 3 * hidden, 2, 3, cos + 3 * dim, sin + 3 * dim, logits, 2, threads) != 0) {
            fprintf(stderr, "me_prefill failed\n");
            exit(1);
        }
        /* the logits of both rows of the second call */
        printf("prefill %d%s%s%s\n", threads, half ? " half" : "", dim == 16 ? "" : " dim128", tag);
        for (int i = 0; i < 2 * vocab; i++) printf("%a\n", logits[i]);
    }
    for (int pos = first; pos < first + 3; pos++) {
        float *x = floats(hidden, -1.f, 1.f), *cos = floats(dim, -1.f, 1.f), *sin = floats(dim, -1.f, 1.f);
        if (me_decode_step(&m, x, pos, cos, sin, logits, threads) != 0) {
            fprintf(stderr, "me_decode_step failed\n");
            exit(1);
        }
        printf("step %d %d %d%s%s%s\n", pos, threads, prompt, half ? " half" : "", dim == 16 ? "" : " dim128", tag);
        for (int i = 0; i < vocab; i++) printf("%a\n", logits[i]);
    }
}

/* `batch` sequences of one tiny decoder (heads of 128, Qwen3's) stepped together by me_decode_batch, each at its
   own position over its own cache, and stepped alone by me_decode_step on a twin with the same weights and cache:
   prints "batch B threads [half] [lora] [tag] step S" then the batch's logits, the same header with " solo" then
   the solo steps' logits, for two steps. With `lora` every projection has a rank-4 branch and the sequences' gates
   alternate (both routes in one batch). The test asserts the two equal bit for bit on every build. */
static void batch_case(int batch, int threads, int half, int lora, const char *tag, int blk) {
    const int packed = strstr(tag, "packed") != NULL;
    /* blocks of 32: inputs of 64, 96 and 512 (whole blocks); larger blocks: inputs of 1, 3 and 4 blocks */
    const int layers = 2, hidden = blk == 32 ? 64 : blk, heads = 4, kv_heads = 2, dim = 128,
              inter = blk == 32 ? 96 : 3 * blk, cap = 8, vocab = 50, rank = 4;
    me_linear w[2][7];
    const float *norms[2][4];
    for (int i = 0; i < layers; i++) {
        const int n[7] = {heads * dim, kv_heads * dim, kv_heads * dim, hidden, inter, inter, hidden},
                  k[7] = {hidden, hidden, hidden, heads * dim, hidden, hidden, inter};
        for (int j = 0; j < 7; j++) {
            w[i][j] = linear(n[j], k[j], blk);
            if (packed) w[i][j] = packed_copy(w[i][j]);
        }
        for (int j = 0; j < 4; j++) norms[i][j] = floats(j < 2 ? hidden : dim, 0.5f, 1.5f);
    }
    me_lora *branches = NULL;
    if (lora) {
        branches = malloc(sizeof(me_lora) * layers * 7);
        for (int i = 0; i < layers * 7; i++) {
            const me_linear *m = &w[i / 7][i % 7];
            me_lora l = {floats((size_t)m->k * rank, -0.1f, 0.1f), floats((size_t)rank * m->n, -0.1f, 0.1f), rank};
            branches[i] = l;
        }
    }
    const me_linear head = packed ? packed_copy(linear(vocab, hidden, blk)) : linear(vocab, hidden, blk);
    const float *final_norm = floats(hidden, 0.5f, 1.5f);
    me_model *together = malloc(sizeof(me_model) * batch), *alone = malloc(sizeof(me_model) * batch);
    const me_model **models = malloc(sizeof(me_model *) * batch);
    int32_t *pos = malloc(sizeof(int32_t) * batch);
    float *logits = malloc(sizeof(float) * batch * vocab);
    for (int b = 0; b < batch; b++) {
        for (int twin = 0; twin < 2; twin++) {
            me_layer *ls = malloc(sizeof(me_layer) * layers);
            for (int i = 0; i < layers; i++) {
                me_layer l = {w[i][0], w[i][1], w[i][2], w[i][3], w[i][4], w[i][5], w[i][6],
                              norms[i][0], norms[i][1], norms[i][2], norms[i][3],
                              calloc((size_t)kv_heads * cap * dim, sizeof(float)),
                              calloc((size_t)kv_heads * cap * dim, sizeof(float))};
                ls[i] = l;
            }
            me_model m = {layers, hidden, heads, kv_heads, dim, inter, cap, vocab, 1e-6f, 0.25f, ls, head,
                          final_norm};
            m.lora = branches;
            m.lora_gate = lora ? (float)(b % 2) : 0.f;
            m.kv_half = half;
            (twin ? alone : together)[b] = m;
        }
        models[b] = together + b;
        /* a prompt of its own length (1-4 rows) in both twins' caches */
        pos[b] = 1 + b % 4;
        float *x = floats((size_t)hidden * pos[b], -1.f, 1.f), *cos = floats((size_t)dim * pos[b], -1.f, 1.f),
              *sin = floats((size_t)dim * pos[b], -1.f, 1.f), *copy = malloc(sizeof(float) * hidden * pos[b]);
        memcpy(copy, x, sizeof(float) * hidden * pos[b]);
        if (me_prefill(together + b, x, pos[b], 0, cos, sin, logits, 1, threads) != 0 ||
            me_prefill(alone + b, copy, pos[b], 0, cos, sin, logits, 1, threads) != 0) {
            fprintf(stderr, "me_prefill failed\n");
            exit(1);
        }
    }
    char header[96];
    snprintf(header, sizeof header, "batch %d %d%s%s%s", batch, threads, half ? " half" : "", lora ? " lora" : "",
             tag);
    for (int step = 0; step < 2; step++) {
        float *x = floats((size_t)hidden * batch, -1.f, 1.f), *cos = floats((size_t)dim * batch, -1.f, 1.f),
              *sin = floats((size_t)dim * batch, -1.f, 1.f), *copy = malloc(sizeof(float) * hidden * batch);
        memcpy(copy, x, sizeof(float) * hidden * batch);
        if (me_decode_batch(models, batch, x, pos, cos, sin, logits, threads) != 0) {
            fprintf(stderr, "me_decode_batch failed\n");
            exit(1);
        }
        printf("%s step %d\n", header, step);
        for (int i = 0; i < batch * vocab; i++) printf("%a\n", logits[i]);
        printf("%s step %d solo\n", header, step);
        for (int b = 0; b < batch; b++) {
            if (me_decode_step(alone + b, copy + (size_t)b * hidden, pos[b], cos + (size_t)b * dim,
                               sin + (size_t)b * dim, logits, threads) != 0) {
                fprintf(stderr, "me_decode_step failed\n");
                exit(1);
            }
            for (int i = 0; i < vocab; i++) printf("%a\n", logits[i]);
        }
        for (int b = 0; b < batch; b++) pos[b]++;
    }
}

/* the encoder's convolution stem (conv_stem.h); prints "stem channels bins frames windows chunks blk threads" */
static void stem_case(int channels, int bins, int frames, int windows, int chunks, int blk, int threads) {
    const int nb = 9 * ((channels + blk - 1) / blk);
    int f = bins, t = frames;
    for (int i = 0; i < 3; i++) {
        f = (f - 1) / 2 + 1;
        t = (t - 1) / 2 + 1;
    }
    const size_t outs = (size_t)windows * chunks * t * channels * f;
    float *mel = floats((size_t)windows * bins * chunks * frames, -2.f, 2.f), *out = calloc(outs, sizeof(float));
    float *w1 = floats((size_t)9 * channels, -0.5f, 0.5f), *b1 = floats(channels, -0.2f, 0.2f);
    uint8_t *w2 = bytes((size_t)channels * nb * blk), *w3 = bytes((size_t)channels * nb * blk);
    float *s2 = floats((size_t)channels * nb, 0.0005f, 0.002f), *s3 = floats((size_t)channels * nb, 0.0005f, 0.002f);
    float *b2 = floats(channels, -0.2f, 0.2f), *b3 = floats(channels, -0.2f, 0.2f);
    if (me_conv_stem(mel, windows, chunks, bins, frames, w1, b1, channels, w2, s2, b2, w3, s3, b3, blk, out,
                     threads) != 0) {
        fprintf(stderr, "me_conv_stem failed\n");
        exit(1);
    }
    printf("stem %d %d %d %d %d %d %d\n", channels, bins, frames, windows, chunks, blk, threads);
    for (size_t i = 0; i < outs; i++) printf("%a\n", out[i]);
}

/* me_exp_shifted and me_swiglu (the vector forms of me_exp, value for value) over the clamps' edges, zeros of
   both signs, infinities, a NaN and random values on both sides of the clamps, 203 values (vectors and a tail):
   prints "exp" then the values, "swiglu" then SwiGLU's. Every build must give the portable C's bits exactly. */
static void exp_case(void) {
    const int n = 203;
    float *x = floats(n, -95.f, 95.f), *g = malloc(sizeof(float) * n), *u = floats(n, -2.f, 2.f);
    const float edges[] = {-87.f, -86.99999f, -87.00001f, 88.f, 87.99999f, 88.00001f, 0.f, -0.f, INFINITY,
                           -INFINITY, NAN, 1e-30f, -1e-30f, 0.34657359f, -0.34657359f};
    const int edge_count = (int)(sizeof edges / sizeof edges[0]);
    for (int i = 0; i < edge_count; i++) x[3 * i] = edges[i];
    /* SwiGLU's gates span the exp's range less widely, but its exp sees the edges too (exp(-g)) */
    for (int i = 0; i < n; i++) g[i] = i < 3 * edge_count ? -x[i] : x[i] / 4.f;
    me_exp_shifted(x, (size_t)n, 0.f);  /* x - 0 is x, zeros' signs included: the edges reach the exp unmoved */
    printf("exp\n");
    for (int i = 0; i < n; i++) printf("%+a\n", x[i]);  /* a sign first: "inf" would read as a header */
    me_swiglu(g, g, u, (size_t)n);  /* in place, as prefill runs it */
    printf("swiglu\n");
    for (int i = 0; i < n; i++) printf("%+a\n", g[i]);
    free(x);
    free(g);
    free(u);
}

int main(void) {
    fprintf(stderr, "abi %d isa %d\n", me_abi_version(), me_isa());
    const uint64_t start = state;  /* the other cases keep the inputs they had before this one */
    exp_case();
    state = start;
    const int blocks[] = {16, 32, 64, 128};
    for (int b = 0; b < 4; b++)
        for (int threads = 1; threads <= 3; threads += 2) {
            gemv_case(37, 4 * blocks[b], blocks[b], threads, 0);
            gemv_case(9, 3 * blocks[b] - 5, blocks[b], threads, 0);  /* padded last block */
        }
    for (int threads = 1; threads <= 3; threads += 2) decode_case(threads, 0, 0, 16, "");
    /* added later, after the cases above so that those keep their inputs */
    for (int threads = 1; threads <= 3; threads += 2) {
        gemm_case(37, 4 * 32, 32, 6, threads, 0);  /* a partial row group and partial weight groups */
        gemm_case(40, 3 * 128 - 5, 128, 9, threads, 0);
        gemm_case(19, 64, 16, 1, threads, 0);
    }
    for (int threads = 1; threads <= 3; threads += 2) decode_case(threads, 1, 0, 16, "");
    for (int threads = 1; threads <= 3; threads += 2) {
        stem_case(40, 20, 30, 2, 2, 64, threads);
        stem_case(130, 16, 20, 1, 1, 128, threads);
    }
    for (int threads = 1; threads <= 3; threads += 2) decode_case(threads, 1, 1, 16, "");  /* half-float caches */
    for (int threads = 1; threads <= 3; threads += 2) {  /* heads of 128 over both caches */
        decode_case(threads, 1, 0, 128, "");
        decode_case(threads, 1, 1, 128, "");
    }
    /* the packed layout (me_pack_q8) where the build keeps one: its products, and decoder steps over packed
       weights, each run on the inputs of a row-layout twin ("rows") that must give the same bits */
    for (int b = 0; b < 4; b++)
        for (int threads = 1; threads <= 3; threads += 2) {
            gemv_case(37, 4 * blocks[b], blocks[b], threads, 1);
            gemv_case(9, 3 * blocks[b] - 5, blocks[b], threads, 1);
        }
    for (int threads = 1; threads <= 3; threads += 2) {
        gemm_case(37, 4 * 32, 32, 6, threads, 1);
        gemm_case(40, 3 * 128 - 5, 128, 9, threads, 1);
        gemm_case(19, 64, 16, 1, threads, 1);
    }
    for (int threads = 1; threads <= 3; threads += 2)
        for (int dim = 16; dim <= 128; dim *= 8) {
            const uint64_t inputs = state;
            decode_case(threads, 1, 0, dim, " rows");
            state = inputs;
            decode_case(threads, 1, 0, dim, " packed");
        }
    /* batched steps (decode_batch.h) against solo ones: a part group (3), a full group and one more (9) */
    for (int threads = 1; threads <= 3; threads += 2)
        for (int batch = 3; batch <= 9; batch += 6) {
            batch_case(batch, threads, 0, 0, "", 32);
            batch_case(batch, threads, 1, 1, "", 32);
            batch_case(batch, threads, 0, 1, " packed", 32);
            /* AVX2's rows_batch_avx2 at its other block sizes, on inputs drawn apart (the cases above keep theirs):
               a draw on which no build rounds an int8 activation otherwise than the portable build (a rounding
               that flips moves one sequence's logits by ~1 %, beyond the test's tolerance against portable) */
            const uint64_t inputs = state;
            state = inputs + 1u;
            batch_case(batch, threads, 0, 1, " blk64 packed", 64);
            batch_case(batch, threads, 1, 0, " blk128", 128);
            state = inputs;
        }
    /* a group of 6: AVX2 forms four sequences' block scales in one multiply and the others one by one */
    for (int threads = 1; threads <= 3; threads += 2) {
        const uint64_t inputs = state;
        state = inputs + 1u;
        batch_case(6, threads, 0, 0, "", 32);
        batch_case(6, threads, 1, 0, " blk128", 128);
        state = inputs;
    }
    /* prompt products of several rows at the block sizes above left to one-row cases (16) or untried (64) */
    for (int threads = 1; threads <= 3; threads += 2) {
        gemm_case(19, 64, 16, 5, threads, 0);
        gemm_case(23, 4 * 64 - 7, 64, 7, threads, 0);
    }
    /* a stem whose buffers are small beside their 64-byte alignment (the portable build once wrote past its part) */
    for (int threads = 1; threads <= 3; threads += 2) stem_case(67, 2, 2, 1, 1, 48, threads);
    return 0;
}
