/* me_exp's vector forms (me_exp8 on x86 AVX2 / AVX512 builds, me_exp4 on ARM) against me_exp itself, bit for bit,
   on every float32 (STRIDE 1) or on 8 consecutive bit patterns of every 8 * STRIDE (STRIDE > 1: every exponent
   and sign, for an emulated run). Built with the kernel sources' directory on the include path; prints the first
   differences and the counts, and exits 1 if any value differs (a NaN must stay a NaN with the same bits). */
#include "common.h"
#include <stdio.h>

#ifndef STRIDE
#define STRIDE 1
#endif

static void vector_exp(const float *in, float *out) {  /* eight values */
#if ME_ISA == 1 || ME_ISA == 2
    _mm256_storeu_ps(out, me_exp8(_mm256_loadu_ps(in)));
#elif ME_ISA == 3
    vst1q_f32(out, me_exp4(vld1q_f32(in)));
    vst1q_f32(out + 4, me_exp4(vld1q_f32(in + 4)));
#else
#error "no vector form of me_exp in this build"
#endif
}

int main(void) {
    unsigned long long checked = 0, differing = 0;
    float in[8], out[8];
    for (uint64_t base = 0; base < (1ull << 32); base += 8ull * STRIDE) {
        for (int i = 0; i < 8; i++) {
            const uint32_t bits = (uint32_t)(base + i);
            memcpy(&in[i], &bits, 4);
        }
        vector_exp(in, out);
        for (int i = 0; i < 8; i++) {
            const float want = me_exp(in[i]);
            if (memcmp(&want, &out[i], 4) != 0 && differing++ < 5)
                printf("x=%a me_exp %a vector %a\n", in[i], want, out[i]);
        }
        checked += 8;
    }
    printf("checked %llu, differing %llu\n", checked, differing);
    return differing != 0;
}
