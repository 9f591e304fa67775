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
   the rest of a row (norms, rotary, attention, SwiGLU) is the decode step's own code. AVX512 builds keep the
   weights in that packed layout from the start (me_pack_q8, when the runtime loads them) and their decode products
   read it in place with the same arithmetic, so the portable, ARM and AVX512 builds prefill to the same bits as
   they step; AVX2 steps add a block's terms in lanes (within float rounding of its prompt).

   The encoder's convolution stem runs on the same products (conv_stem.h).

   One translation unit of parts, each named for what it holds, so that the hot helpers (dot_block, me_exp, the
   micro kernels) inline across them; a part's header includes the parts it uses, and a new part is one #include
   line below, after those. The shared object is built per instruction-set variant (variants.py) when the package
   is built (build_kernels.py) and chosen at load by the CPU's flags, or compiled here with -march=native on first
   use in a source checkout (megaedge/runtime/kernels.py): AVX512-VNNI (and AMX), AVX2 or ARM dot-product
   instructions where the CPU has them, portable C elsewhere. */
#include "common.h"      /* headers, ISA selection, structs, inline helpers */
#include "isa.h"         /* me_abi_version, me_isa, the AMX permission */
#include "quantize.h"    /* activations to int8 per block (me_quantize) */
#include "gemv.h"        /* the decode product (me_gemv_q8) */
#include "attention.h"   /* q/k norm, rotary, KV cache, attention */
#include "lora.h"        /* the low-rank branches of a routed model (LoRA route) */
#include "decode_step.h" /* one token through every layer (me_decode_step) */
#include "decode_batch.h" /* one token of each of several sequences, weights read once (me_decode_batch) */
#include "gemm.h"        /* the prompt products (me_gemm_q8; tiles: prompt_tiles.h) */
#include "conv_stem.h"   /* the encoder's convolution stem (me_conv_stem) */
#include "prefill.h"     /* a whole prompt through every layer (me_prefill) */
