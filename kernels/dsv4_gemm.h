/* Matrix products on the CPU, where ggml 0.20.2 has no tiled kernel for our types (prompt processing) or, as PyPI
 * builds it, no VNNI dot product (decode: the dense Q8_0 product, 3. below).
 *
 * 1. Routed experts: K-quant (Q2_K to Q6_K) experts x Q8_K activations (mul_mat_id), kernels/dsv4_moe_gemm.c.
 *
 * ggml 0.20.2's mul_mat_id computes each (weight row, token) pair with one vec_dot, unpacking the 2- to 6-bit
 * weights again for every token. Here each 4-row group of an expert is unpacked once into bytes and scale
 * vectors, then multiplied with all the tokens routed to that expert, 1-2 tokens at a time in registers.
 * Integer sums are exact and the same as ggml's; only the float accumulation order differs.
 *
 *   prep = dsv4_q8k_prep(ctx, b, isa)              b [K, n1, n] F32 -> one Q8_K row per activation row
 *   out  = dsv4_mul_mat_id_kq(ctx, as, prep, ids, isa)    = ggml_mul_mat_id(ctx, as, b, ids): [M, k, n] F32
 *
 * as [K, M, E] Q2_K, Q3_K, Q4_K, Q5_K or Q6_K; ids [k, n] I32 (strided views allowed); n1 is 1 (one row for all k slots) or k.
 * 2. The same kernels for dense K-quant weights (attention, shared expert, compressors, indexer, mixers in files
 *    whose dense weights are K-quants: Q4_K_M and the like), mul_mat; batch b of x times batch b of w, each batch
 *    taken as an expert that every row of its batch is routed to:
 *
 *   prep = dsv4_q8k_prep(ctx, x, isa)              x [K, N, B] F32
 *   out  = dsv4_mul_mat_kq(ctx, w, prep, isa)      = ggml_mul_mat(ctx, w, x): [M, N, B] F32, w [K, M, B] K-quant
 *
 * 3. Dense Q8_0 weights (attention, shared expert, router, output head) x Q8_0 activations (mul_mat), AVX-512 VNNI
 *    only, kernels/dsv4_gemm_vnni.c; for any number of activation rows (below Q80_ROWS_MAX, decode, the weight rows
 *    are read in place instead of in slabs):
 *
 *   prep = dsv4_q80_prep(ctx, x)                   x [K, N, B] F32 -> one Q8_0 row per activation row
 *   out  = dsv4_mul_mat_q80(ctx, w, prep)          = ggml_mul_mat(ctx, w, x): [M, N, B] F32, w [K, M, B] Q8_0
 *
 * With VNNI, the expert product uses the same lanes-are-rows kernel (dsv4_gemm_vnni.c); without it, 4 rows x
 * 2 tokens with a horizontal sum (AVX-512 BW, AVX2) or portable C.
 * All are CPU custom ops: use them only when the tensors live in host memory (a CPU-only backend set).
 */
#ifndef LLAMA_DSV4_GEMM_H
#define LLAMA_DSV4_GEMM_H

#include "ggml.h"

#ifdef __cplusplus
extern "C" {
#endif

enum dsv4_gemm_isa {
    DSV4_GEMM_OFF = 0,    /* not available: use ggml_mul_mat_id */
    DSV4_GEMM_SCALAR = 1, /* portable C (tests; slower than ggml's SIMD vec_dot) */
    DSV4_GEMM_AVX2 = 2,   /* AVX2 + FMA */
    DSV4_GEMM_AVX512 = 3, /* AVX-512 F + BW */
    DSV4_GEMM_VNNI = 4,   /* AVX-512 F + BW + VNNI (+ F16C, FMA): also the dense Q8_0 product */
};

/* The fastest path this CPU runs (DSV4_GEMM_OFF where there is no SIMD path). */
int dsv4_gemm_isa_best(void);

/* Whether this CPU can run `isa` (DSV4_GEMM_SCALAR always can). */
int dsv4_gemm_isa_supported(int isa);

/* Whether dsv4_mul_mat_id_kq accepts these operands (types, shapes, limits below). */
int dsv4_moe_gemm_ok(const struct ggml_tensor * as, const struct ggml_tensor * b, const struct ggml_tensor * ids);

#define DSV4_GEMM_MAX_K 8192      /* unpacked rows live on the worker's stack */
#define DSV4_GEMM_MAX_EXPERTS 1024

/* Bytes of one prepared activation row: K int8 quants, then per block of 32 the float scale of its quants and
 * a float correction (Q8_K: scale * sum of the block's quants); a 64-byte multiple. */
size_t dsv4_act_row_bytes(int64_t K);

/* Bytes of one prepared Q8_K activation row (dsv4_q8k_prep): the above, then per block of 16 an int32 sum of its
 * quants (Q6_K's correction); a 64-byte multiple. */
size_t dsv4_q8k_row_bytes(int64_t K);

/* isa: the quantizer's instruction set (AVX2 and above: SIMD; the same bytes either way). NULL where b is not
 * F32 rows of whole super-blocks or isa is not supported. */
struct ggml_tensor * dsv4_q8k_prep(struct ggml_context * ctx, struct ggml_tensor * b, int isa);

/* NULL when the operands are not accepted or isa is not supported. */
struct ggml_tensor * dsv4_mul_mat_id_kq(struct ggml_context * ctx, struct ggml_tensor * as, struct ggml_tensor * prep,
                                         struct ggml_tensor * ids, int isa);

/* Whether dsv4_mul_mat_kq accepts these operands (w's type, shapes and limits as dsv4_moe_gemm_ok's). */
int dsv4_dense_kq_ok(const struct ggml_tensor * w, const struct ggml_tensor * x);

/* NULL when the operands are not accepted or isa is not supported. */
struct ggml_tensor * dsv4_mul_mat_kq(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * prep,
                                      int isa);

/* Whether dsv4_mul_mat_q80 accepts these operands (this CPU has AVX-512 VNNI, K % 256 == 0, M % 16 == 0). */
int dsv4_dense_gemm_ok(const struct ggml_tensor * w, const struct ggml_tensor * x);

/* Activation rows up to which (exclusive) dsv4_mul_mat_q80 multiplies weight rows in place instead of in slabs. */
#define Q80_ROWS_MAX 8

/* Bytes of one row of dsv4_q80_prep's result for N activation rows of length K: dsv4_act_row_bytes(K), plus 2K of
 * per-block tables where N < Q80_ROWS_MAX. */
size_t dsv4_q80_row_bytes(int64_t K, int64_t N);

struct ggml_tensor * dsv4_q80_prep(struct ggml_context * ctx, struct ggml_tensor * x);

/* NULL when the operands are not accepted. */
struct ggml_tensor * dsv4_mul_mat_q80(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * prep);

#ifdef __cplusplus
}
#endif

#endif
