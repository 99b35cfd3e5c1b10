/* Internal to kernels/dsv4_*gemm*.c: block formats, conversions, and the AVX-512 VNNI building blocks. */
#ifndef LLAMA_DSV4_GEMM_IMPL_H
#define LLAMA_DSV4_GEMM_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "ggml.h"

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define DSV4_X86 1
#endif

#define QK 256         /* a K-quant super-block; the K of every matrix here is a multiple of it */
#define Q2K_BYTES 84   /* block_q2_K: 16 bytes 4-bit scales and mins, 64 bytes 2-bit quants, d, dmin (fp16) */
#define Q3K_BYTES 110  /* block_q3_K: 32 bytes high bits, 64 bytes 2-bit quants, 12 bytes 6-bit scales, d (fp16) */
#define Q4K_BYTES 144  /* block_q4_K: d, dmin (fp16), 12 bytes scales/mins, 128 bytes nibbles */
#define Q5K_BYTES 176  /* block_q5_K: d, dmin (fp16), 12 bytes scales/mins, 32 bytes high bits, 128 bytes nibbles */
#define Q6K_BYTES 210  /* block_q6_K: 128 bytes low nibbles, 64 bytes high bit pairs, 16 int8 scales, d (fp16) */
#define Q80_BYTES 34   /* block_q8_0: d (fp16), 32 int8 */
#define SLAB_ROWS 16   /* weight rows of one VNNI slab (one per 32-bit lane) */

static inline float dsv4_half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t) (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (exp == 0) {
        const float f = (float) man * 5.9604644775390625e-8f; /* subnormal (or zero): man * 2^-24 */
        return sign ? -f : f;
    }
    const uint32_t bits = exp == 31 ? (sign | 0x7f800000u | (man << 13)) : (sign | ((exp + 112) << 23) | (man << 13));
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* ggml's nearest_int: round half to even through the float mantissa (no float->int conversion, so no UB on
 * NaN), clamped to [-127, 127]. */
/* (v must be a rounded float: the kernels are compiled with -ffp-contract=off, so x * scale is not fused into
 * the addition below) */
static inline int dsv4_nearest_int8(float v) {
    float t = v + 12582912.f;
    int32_t i;
    memcpy(&i, &t, sizeof i);
    i = (i & 0x007fffff) - 0x00400000;
    return i > 127 ? 127 : (i < -127 ? -127 : i);
}

/* Q4_K / Q5_K sub-block j's 6-bit scale and min from the block's 12 packed bytes (ggml's get_scale_min_k4). */
static inline void dsv4_scale_min_k4(int j, const uint8_t * s, int * sc, int * m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* The K-quant types of the expert products. Scales per block of 32: Q4_K and Q5_K, 6-bit scales and mins
 * (w = d*sc_j*q - dmin*m_j, q in 0..15 / 0..31). Scales per block of 16 ("k16"): Q2_K (4-bit scales and mins,
 * w = d*sc_i*q - dmin*m_i, q in 0..3), Q3_K (6-bit scales, w = d*(sc_i - 32)*(q - 4), q in 0..7) and Q6_K (int8
 * scales, w = d*sc_i*(q - 32), q in 0..63). Bytes of one super-block of `type` (a ggml_type), 0 for any other. */
size_t dsv4_kq_bytes(int type);

static inline int dsv4_is_k16(int type) {
    return type == GGML_TYPE_Q2_K || type == GGML_TYPE_Q3_K || type == GGML_TYPE_Q6_K;
}

/* The 256 unsigned quants of a Q4_K / Q5_K super-block at b, in the order of the weights: low nibbles of 32 bytes
 * then their high nibbles, four times, Q5_K's each with its bit of the 32 high-bit bytes; `avx2`: this CPU runs
 * AVX2. */
void dsv4_kq_quants(int type, const uint8_t * b, uint8_t * q, int avx2);

/* A k16 super-block in integers: w_e = d * sc_i * (q_e - off) - dmin * m_i for weight e of block i = e / 16. */
struct dsv4_k16 {
    uint8_t q[QK];
    int32_t sc[16], m[16];
    float d, dmin;
    int off, has_min;
};

/* Unpack the k16 super-block of `type` at b as ggml's dequantize_row_q{2,3,6}_K orders its weights (avx2: the
 * quants with AVX2; the same bytes). */
void dsv4_k16_block(int type, const uint8_t * b, struct dsv4_k16 * k, int avx2);
/* The same without the quants (k->q untouched). */
void dsv4_k16_scales(int type, const uint8_t * b, struct dsv4_k16 * k);

/* A prepared Q8_K activation row (dsv4_q8k_prep): K int8 quants, then per block of 32 the float scale and a float
 * correction (scale * sum of the block's quants), then per block of 16 the int32 sum of its quants (k16 types). */
static inline const int32_t * dsv4_q8k_bsums16(const uint8_t * row, int64_t K) {
    return (const int32_t *) (row + K + 8 * (size_t) (K / 32));
}

struct ggml_tensor;
/* A prep op's body: quantize the rows of dst->src[0] (F32 [K, n1, n2]) into dst's rows, rows across threads. */
void dsv4_prep_rows(struct ggml_tensor * dst, int ith, int nth, void (*quantize_row)(const float *, int64_t, uint8_t *));

/* 16 weight rows x 256 columns of K, laid out for vpdpbusd: w[g] holds columns 4g..4g+3 of the 16 rows (row r
 * in bytes 4r..4r+3) as unsigned bytes; per block j of 32 columns, the rows' scale s[j] and correction mn[j]:
 * row r's product with an activation row is sum_j s[j][r]*ds_j*dot_j(w, a) - mn[j][r]*bf_j. */
struct dsv4_slab {
    uint8_t w[QK / 4][64];
    float s[8][SLAB_ROWS];
    float mn[8][SLAB_ROWS];
};

/* The same for the k16 types: per block of 16 columns, the rows' scales (as int32), the rows' d and dmin;
 * row r's product is d * ds * sum_i sc[i][r] * (dot_i(w, a) - off * bsum_i) - dmin * ds * sum_i m[i][r] * bsum_i,
 * the sums in integers as ggml's. The bsum terms are one sum_i v_i * bsum_i with v the mins (types with mins, where
 * off is 0) or the scales (the others): v2[p] holds v_2p and v_2p+1 as the int16 pair vpdpwssd multiplies. */
struct dsv4_slab16 {
    uint8_t w[QK / 4][64];
    int32_t sc[16][SLAB_ROWS];
    int32_t v2[8][SLAB_ROWS];
    float d[SLAB_ROWS], dmin[SLAB_ROWS];
    int off, has_min;
};

int dsv4_vnni_supported(void);

/* Fill `slab` from super-block `sb` of 16 rows of `type` (Q4_K or Q5_K) starting at `rows`, `stride` bytes apart. */
void dsv4_vnni_slab_kq(int type, const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab * slab);

/* acc[c][r] += row r of the slab times prepared activation row a[c] over super-block sb, c < nc (nc <= 8). */
void dsv4_vnni_columns(const struct dsv4_slab * slab, const uint8_t * const * a, int nc, int64_t K, int64_t sb,
                       float (*acc)[SLAB_ROWS]);

/* Q4_K / Q5_K rows m0 .. m0 + n - 1 (`stride` bytes apart from w) times nc (1 or 2) prepared Q8_K activation rows,
 * read in place (no slab): orow[c][m0 + r]. */
void dsv4_vnni_rows_kq(int type, const uint8_t * w, size_t stride, int64_t m0, int64_t n, const uint8_t * const * a,
                       int nc, int64_t K, float * const * orow);

/* k16: fill `slab` from super-block `sb` of 16 rows of `type`; the columns as dsv4_vnni_columns (Q8_K rows). */
void dsv4_vnni_slab_k16(int type, const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab16 * slab);
void dsv4_vnni_columns_k16(const struct dsv4_slab16 * slab, const uint8_t * const * a, int nc, int64_t K, int64_t sb,
                           float (*acc)[SLAB_ROWS]);

#endif
