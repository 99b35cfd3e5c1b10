/* Internal to kernels/dsv4_*gemm*.c: block formats, conversions, and the AVX-512 VNNI building blocks. */
#ifndef LLAMA_DSV4_GEMM_IMPL_H
#define LLAMA_DSV4_GEMM_IMPL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define DSV4_X86 1
#endif

#define QK 256         /* a K-quant super-block; the K of every matrix here is a multiple of it */
#define Q5K_BYTES 176  /* block_q5_K: d, dmin (fp16), 12 bytes scales/mins, 32 bytes high bits, 128 bytes nibbles */
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

/* Q5_K sub-block j's 6-bit scale and min from the block's 12 packed bytes (ggml's get_scale_min_k4). */
static inline void dsv4_q5k_scale_min(int j, const uint8_t * s, int * sc, int * m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* The 256 quants (0..31) of the Q5_K super-block at b, in order: low nibbles of 32 bytes then their high nibbles,
 * four times, each with its bit of the 32 high-bit bytes. */
void dsv4_q5k_quants(const uint8_t * b, uint8_t * q);
#ifdef DSV4_X86
void dsv4_q5k_quants_avx2(const uint8_t * b, uint8_t * q); /* the same with AVX2 */
#endif

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

int dsv4_vnni_supported(void);

/* Fill `slab` from super-block `sb` of 16 Q5_K rows starting at `rows`, `stride` bytes apart. */
void dsv4_vnni_slab_q5k(const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab * slab);

/* acc[c][r] += row r of the slab times prepared activation row a[c] over super-block sb, c < nc (nc <= 8). */
void dsv4_vnni_columns(const struct dsv4_slab * slab, const uint8_t * const * a, int nc, int64_t K, int64_t sb,
                       float (*acc)[SLAB_ROWS]);

#endif
