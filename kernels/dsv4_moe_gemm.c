/* See dsv4_gemm.h (1).
 *
 * Formats (ggml's): a Q5_K super-block holds 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins
 * for 8 sub-blocks of 32, 32 bytes of high bits, 128 bytes of low nibbles; w = d*sc_j*q - dmin*m_j, q in 0..31.
 * A Q4_K super-block is the same without the high bits (q in 0..15). The k16 types (Q2_K, Q3_K, Q6_K) have a
 * scale (and Q2_K a min) per block of 16 weights: w = d*sc_i*(q - off) - dmin*m_i (dsv4_gemm_impl.h); per
 * super-block their product is d_w*d_a * sum_i sc_i * (sum_16(q*a) - off*bsum_i) - dmin*d_a * sum_i m_i*bsum_i, with
 * bsum_i the int sum of the activation's quants over block i of 16 (made in the prep op), all sums in integers
 * as ggml's.
 * A Q8_K activation block holds 256 int8 quants with one float scale; its quants are made exactly as ggml's
 * quantize_row_q8_K_ref makes them, so the integer products below are ggml's.
 *
 * Per (weight row, activation row) pair and super-block:  d_w*d_a * sum_j sc_j * sum_32(q*a)  -  sum_j mf_j*bf_j
 * with mf_j = dmin*m_j (per weight row) and bf_j = d_a * sum_32(a) (per activation row, made in the prep op).
 */
#include "dsv4_gemm.h"
#include "dsv4_gemm_impl.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

#ifdef DSV4_X86
#include <immintrin.h>
#endif

#define ROWS 4     /* weight rows unpacked together */
#define UNIT 16    /* weight rows per work unit */
#define COLS 256   /* activation rows gathered per pass */
/* With VNNI, the tokens of an expert (or the rows of a dense product's batch) from which its weight rows go through
 * the lanes-are-rows slabs: transposing a slab pays for itself from about 3. A decode step of a few sequences gives
 * most experts 1 or 2 tokens: their Q4_K/Q5_K rows are read in place and unpacked in registers (dsv4_vnni_rows_kq),
 * the k16 types' go through the 4-row AVX-512 kernel (8 sequences on bench/multiseq.py's medium model: 90 ms a step
 * with slabs for every expert, 66 with the 4-row kernel below 3 tokens, 54 with rows in place; choosing by the
 * product's token count instead of each expert's, 86: one-off builds measured side by side on 2026-12-06). The
 * kernels sum in different orders, so a token's result depends, within float rounding, on how many other tokens
 * chose its expert. */
#define SLAB_MIN_COLS 3

/* ---------------------------------------------------------------------------------------------- formats */

/* A prepared Q8_K row's per-32-block entries (dsv4_gemm_impl.h): block i's scale dsb, its correction dsb * (s0 + s1),
 * and the sums s0, s1 of its two halves' quants. */
static inline void block32_sums(float * d, float * bf, int32_t * bs, int64_t i, float dsb, int32_t s0, int32_t s1) {
    d[i] = dsb;
    bf[i] = dsb * (float) (s0 + s1);
    bs[2 * i] = s0;
    bs[2 * i + 1] = s1;
}

static void quantize_row_q8k(const float * x, int64_t K, uint8_t * row) {
    int8_t * qs = (int8_t *) row;
    float * d = (float *) (row + K);
    float * bf = d + K / 32;
    int32_t * bs = (int32_t *) (bf + K / 32);
    for (int64_t sb = 0; sb < K / QK; sb++) {
        const float * xs = x + sb * QK;
        int8_t * q = qs + sb * QK;
        float amax = 0.0f, max = 0.0f;
        for (int j = 0; j < QK; j++) {
            const float ax = fabsf(xs[j]);
            if (ax > amax) {
                amax = ax;
                max = xs[j];
            }
        }
        if (amax == 0.0f) {
            memset(q, 0, QK);
            for (int j = 0; j < QK / 32; j++) {
                block32_sums(d, bf, bs, sb * 8 + j, 0.0f, 0, 0);
            }
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QK; j++) {
            q[j] = (int8_t) dsv4_nearest_int8(iscale * xs[j]);
        }
        const float dsb = 1.0f / iscale;
        for (int j = 0; j < QK / 32; j++) {
            int s0 = 0, s1 = 0;
            for (int l = 0; l < 16; l++) {
                s0 += q[j * 32 + l];
                s1 += q[j * 32 + 16 + l];
            }
            block32_sums(d, bf, bs, sb * 8 + j, dsb, s0, s1);
        }
    }
}

#ifdef DSV4_X86
/* quantize_row_q8k with AVX2, bit for bit: the same first-largest |x| (its sign sets the scale's), the same product
 * x * iscale (not fused) rounded to nearest-even by cvtps (as the magic-number addition rounds), clamped to 127. */
__attribute__((target("avx2,fma"))) static void quantize_row_q8k_avx2(const float * x, int64_t K, uint8_t * row) {
    int8_t * qs = (int8_t *) row;
    float * d = (float *) (row + K);
    float * bf = d + K / 32;
    int32_t * bs = (int32_t *) (bf + K / 32);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t sb = 0; sb < K / QK; sb++) {
        const float * xs = x + sb * QK;
        __m256 vmax = _mm256_setzero_ps();
        for (int j = 0; j < QK; j += 8) {
            vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(xs + j)));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        const float amax = _mm_cvtss_f32(m4);
        if (amax == 0.0f) {
            memset(qs + sb * QK, 0, QK);
            for (int j = 0; j < QK / 32; j++) {
                block32_sums(d, bf, bs, sb * 8 + j, 0.0f, 0, 0);
            }
            continue;
        }
        float max = 0.0f;
        for (int j = 0; j < QK; j++) { /* the first entry whose |x| is amax, as the scalar scan picks */
            if (fabsf(xs[j]) == amax) {
                max = xs[j];
                break;
            }
        }
        const float iscale = -127.f / max, dsb = 1.0f / iscale;
        const __m256 vs = _mm256_set1_ps(iscale);
        const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
        for (int j = 0; j < QK / 32; j++) {
            __m256i q[4];
            for (int i = 0; i < 4; i++) {
                const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xs + j * 32 + i * 8), vs));
                q[i] = _mm256_max_epi32(_mm256_min_epi32(v, hi), lo);
            }
            const __m256i s0 = _mm256_add_epi32(q[0], q[1]), s1 = _mm256_add_epi32(q[2], q[3]);
            __m256i h = _mm256_hadd_epi32(s0, s1); /* s0: 0+1 2+3 | s1: 0+1 2+3 | s0: 4+5 6+7 | s1: 4+5 6+7 */
            h = _mm256_hadd_epi32(h, h);
            const int32_t sum0 = _mm256_extract_epi32(h, 0) + _mm256_extract_epi32(h, 4);
            const int32_t sum1 = _mm256_extract_epi32(h, 1) + _mm256_extract_epi32(h, 5);
            const __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *) (qs + sb * QK + j * 32), _mm256_permutevar8x32_epi32(p, perm));
            block32_sums(d, bf, bs, sb * 8 + j, dsb, sum0, sum1);
        }
    }
}
#endif

/* Weight rows unpacked: quants as bytes, each sub-block's scale as 16 int16 lanes (the multiplier vector of
 * one 32-byte chunk after a byte-pair multiply-add), super-block scales and dmin*m per sub-block. */
struct unpacked {
    uint8_t q[ROWS][DSV4_GEMM_MAX_K];
    int16_t sc[ROWS][DSV4_GEMM_MAX_K / 32][16];
    float dw[ROWS][DSV4_GEMM_MAX_K / QK];
    float mf[ROWS][DSV4_GEMM_MAX_K / 32];
    /* the k16 types (Q2_K, Q3_K, Q6_K): each block of 16's scale and min, dmin per super-block, the offset */
    int32_t sci[ROWS][DSV4_GEMM_MAX_K / 16], mi[ROWS][DSV4_GEMM_MAX_K / 16];
    float dmn[ROWS][DSV4_GEMM_MAX_K / QK];
    int off, has_min;
};

/* Row r of `u` from the K/256 super-blocks of `type` (Q4_K or Q5_K) at `blocks`. */
static void unpack_row(int type, const uint8_t * blocks, int64_t K, struct unpacked * u, int r, int avx2) {
    const size_t bytes = dsv4_kq_bytes(type);
    for (int64_t sb = 0; sb < K / QK; sb++) {
        const uint8_t * b = blocks + (size_t) sb * bytes;
        if (dsv4_is_k16(type)) { /* the 16 scales: lanes 0-7 of a 32-block's vector are its first 16 weights' */
            struct dsv4_k16 k;
            dsv4_k16_block(type, b, &k, avx2);
            u->dw[r][sb] = k.d;
            u->dmn[r][sb] = k.dmin;
            u->off = k.off;
            u->has_min = k.has_min;
            for (int i = 0; i < 16; i++) {
                u->sci[r][sb * 16 + i] = k.sc[i];
                u->mi[r][sb * 16 + i] = k.m[i];
                for (int l = 0; l < 8; l++) {
                    u->sc[r][sb * 8 + i / 2][(i % 2) * 8 + l] = (int16_t) k.sc[i];
                }
            }
            memcpy(u->q[r] + sb * QK, k.q, QK);
            continue;
        }
        uint16_t hd, hm;
        memcpy(&hd, b, 2);
        memcpy(&hm, b + 2, 2);
        const float dmin = dsv4_half_to_float(hm);
        u->dw[r][sb] = dsv4_half_to_float(hd);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            dsv4_scale_min_k4(j, b + 4, &sc, &m);
            for (int l = 0; l < 16; l++) {
                u->sc[r][sb * 8 + j][l] = (int16_t) sc;
            }
            u->mf[r][sb * 8 + j] = dmin * (float) m;
        }
        dsv4_kq_quants(type, b, u->q[r] + sb * QK, avx2);
    }
}

/* ---------------------------------------------------------------------------------------------- kernels */

/* A k16 row's super-block sb against prepared activation row a, from its integer sum isum = sum_e sc*q*a:
 * d*da*(isum - off * sum_i sc_i*bsum_i) - dmin*da*sum_i m_i*bsum_i (the sums exact integers, as ggml's). */
static inline float k16_finish(const struct unpacked * u, int r, const uint8_t * a, int64_t K, int64_t sb,
                               int32_t isum) {
    const int32_t * bs = dsv4_q8k_bsums16(a, K) + sb * 16;
    const float da = ((const float *) (a + K))[sb * 8];
    int32_t c = 0, m = 0;
    for (int i = 0; i < 16; i++) {
        c += u->sci[r][sb * 16 + i] * bs[i];
        m += u->mi[r][sb * 16 + i] * bs[i];
    }
    const float v = u->dw[r][sb] * da * (float) (isum - u->off * c);
    return u->has_min ? v - u->dmn[r][sb] * da * (float) m : v;
}

/* out[r][c] for the ROWS unpacked rows and nc (1 or 2) prepared activation rows a[c]. */
typedef void (*kernel_fn)(const struct unpacked * u, int64_t K, const uint8_t * const * a, int nc,
                          float out[ROWS][2]);

static void kernel16_scalar(const struct unpacked * u, int64_t K, const uint8_t * const * a, int nc,
                            float out[ROWS][2]) {
    for (int c = 0; c < nc; c++) {
        const int8_t * qa = (const int8_t *) a[c];
        for (int r = 0; r < ROWS; r++) {
            float sum = 0.0f;
            for (int64_t sb = 0; sb < K / QK; sb++) {
                int32_t isum = 0;
                for (int e = 0; e < QK; e++) {
                    isum += u->sci[r][sb * 16 + e / 16] * (int32_t) u->q[r][sb * QK + e] * qa[sb * QK + e];
                }
                sum += k16_finish(u, r, a[c], K, sb, isum);
            }
            out[r][c] = sum;
        }
    }
}

static void kernel_scalar(const struct unpacked * u, int64_t K, const uint8_t * const * a, int nc,
                          float out[ROWS][2]) {
    for (int c = 0; c < nc; c++) {
        const int8_t * qa = (const int8_t *) a[c];
        const float * da = (const float *) (a[c] + K);
        const float * bf = da + K / 32;
        for (int r = 0; r < ROWS; r++) {
            float sum = 0.0f, mins = 0.0f;
            for (int64_t sb = 0; sb < K / QK; sb++) {
                int32_t isum = 0;
                for (int j = 0; j < 8; j++) {
                    int32_t s = 0;
                    for (int l = 0; l < 32; l++) {
                        s += (int32_t) u->q[r][sb * QK + j * 32 + l] * qa[sb * QK + j * 32 + l];
                    }
                    isum += u->sc[r][sb * 8 + j][0] * s;
                }
                sum += u->dw[r][sb] * da[sb * 8] * (float) isum;
            }
            for (int64_t j = 0; j < K / 32; j++) {
                mins += u->mf[r][j] * bf[j];
            }
            out[r][c] = sum - mins;
        }
    }
}

#ifdef DSV4_X86

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum_j mf[r][j] * bf[j] over K/32 (a multiple of 8) */
__attribute__((target("avx2,fma"))) static inline float mins_avx2(const float * mf, const float * bf, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t j = 0; j < n; j += 8) {
        acc = _mm256_fmadd_ps(_mm256_loadu_ps(mf + j), _mm256_loadu_ps(bf + j), acc);
    }
    return hsum256(acc);
}

__attribute__((target("avx2"))) static inline int32_t hsum256_i32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}

/* AVX2: two weight rows x NC activation rows; one 32-byte chunk is one sub-block. K16: rows of a k16 type (each
 * super-block's sum in integers, its corrections taken there, as ggml's), else Q4_K / Q5_K. */
__attribute__((target("avx2,fma"), always_inline)) static inline void avx2_2xN(
    const struct unpacked * u, int r0, int64_t K, const uint8_t * const * a, const int NC, float out[ROWS][2],
    const int K16) {
    const int64_t nsb = K / QK;
    __m256 facc[2][2];
    float fsum[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
    for (int r = 0; r < 2; r++) {
        for (int c = 0; c < NC; c++) {
            facc[r][c] = _mm256_setzero_ps();
        }
    }
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m256i iacc[2][2];
        for (int r = 0; r < 2; r++) {
            for (int c = 0; c < NC; c++) {
                iacc[r][c] = _mm256_setzero_si256();
            }
        }
        for (int j = 0; j < 8; j++) {
            __m256i av[2];
            for (int c = 0; c < NC; c++) {
                av[c] = _mm256_loadu_si256((const __m256i *) (a[c] + sb * QK + j * 32));
            }
            for (int r = 0; r < 2; r++) {
                const __m256i w = _mm256_loadu_si256((const __m256i *) (u->q[r0 + r] + sb * QK + j * 32));
                const __m256i s = _mm256_loadu_si256((const __m256i *) u->sc[r0 + r][sb * 8 + j]);
                for (int c = 0; c < NC; c++) {
                    iacc[r][c] = _mm256_add_epi32(iacc[r][c], _mm256_madd_epi16(_mm256_maddubs_epi16(w, av[c]), s));
                }
            }
        }
        for (int r = 0; r < 2; r++) {
            for (int c = 0; c < NC; c++) {
                const float da = ((const float *) (a[c] + K))[sb * 8];
                if (K16) {
                    fsum[r][c] += k16_finish(u, r0 + r, a[c], K, sb, hsum256_i32(iacc[r][c]));
                    continue;
                }
                facc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(iacc[r][c]),
                                             _mm256_set1_ps(u->dw[r0 + r][sb] * da), facc[r][c]);
            }
        }
    }
    for (int r = 0; r < 2; r++) {
        for (int c = 0; c < NC; c++) {
            const float * bf = (const float *) (a[c] + K) + K / 32;
            out[r0 + r][c] = K16 ? fsum[r][c] : hsum256(facc[r][c]) - mins_avx2(u->mf[r0 + r], bf, K / 32);
        }
    }
}

__attribute__((target("avx2,fma"))) static void kernel_avx2(const struct unpacked * u, int64_t K,
                                                             const uint8_t * const * a, int nc, float out[ROWS][2]) {
    for (int r0 = 0; r0 < ROWS; r0 += 2) {
        if (nc == 2) {
            avx2_2xN(u, r0, K, a, 2, out, 0);
        } else {
            avx2_2xN(u, r0, K, a, 1, out, 0);
        }
    }
}

__attribute__((target("avx2,fma"))) static void kernel16_avx2(const struct unpacked * u, int64_t K,
                                                              const uint8_t * const * a, int nc, float out[ROWS][2]) {
    for (int r0 = 0; r0 < ROWS; r0 += 2) {
        if (nc == 2) {
            avx2_2xN(u, r0, K, a, 2, out, 1);
        } else {
            avx2_2xN(u, r0, K, a, 1, out, 1);
        }
    }
}

/* AVX-512: four weight rows x NC activation rows; one 64-byte chunk is two sub-blocks, and the two sub-blocks'
 * 16-lane scale vectors lie next to each other. */
__attribute__((target("avx512f,avx512bw,avx2,fma"), always_inline)) static inline void avx512_4xN(
    const struct unpacked * u, int64_t K, const uint8_t * const * a, const int NC, float out[ROWS][2], const int K16) {
    const int64_t nsb = K / QK;
    float fsum[ROWS][2] = {{0.0f}};
    __m512 facc[ROWS][2];
    for (int r = 0; r < ROWS; r++) {
        for (int c = 0; c < NC; c++) {
            facc[r][c] = _mm512_setzero_ps();
        }
    }
    for (int64_t sb = 0; sb < nsb; sb++) {
        __m512i iacc[ROWS][2];
        for (int r = 0; r < ROWS; r++) {
            for (int c = 0; c < NC; c++) {
                iacc[r][c] = _mm512_setzero_si512();
            }
        }
        for (int ch = 0; ch < 4; ch++) {
            __m512i av[2];
            for (int c = 0; c < NC; c++) {
                av[c] = _mm512_loadu_si512((const void *) (a[c] + sb * QK + ch * 64));
            }
            for (int r = 0; r < ROWS; r++) {
                const __m512i w = _mm512_loadu_si512((const void *) (u->q[r] + sb * QK + ch * 64));
                const __m512i s = _mm512_loadu_si512((const void *) u->sc[r][sb * 8 + 2 * ch]);
                for (int c = 0; c < NC; c++) {
                    iacc[r][c] = _mm512_add_epi32(iacc[r][c], _mm512_madd_epi16(_mm512_maddubs_epi16(w, av[c]), s));
                }
            }
        }
        for (int r = 0; r < ROWS; r++) {
            for (int c = 0; c < NC; c++) {
                const float da = ((const float *) (a[c] + K))[sb * 8];
                if (K16) {
                    fsum[r][c] += k16_finish(u, r, a[c], K, sb, _mm512_reduce_add_epi32(iacc[r][c]));
                    continue;
                }
                facc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(iacc[r][c]), _mm512_set1_ps(u->dw[r][sb] * da),
                                             facc[r][c]);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) {
        for (int c = 0; c < NC; c++) {
            const float * bf = (const float *) (a[c] + K) + K / 32;
            out[r][c] = K16 ? fsum[r][c] : _mm512_reduce_add_ps(facc[r][c]) - mins_avx2(u->mf[r], bf, K / 32);
        }
    }
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) static void kernel_avx512(
    const struct unpacked * u, int64_t K, const uint8_t * const * a, int nc, float out[ROWS][2]) {
    if (nc == 2) {
        avx512_4xN(u, K, a, 2, out, 0);
    } else {
        avx512_4xN(u, K, a, 1, out, 0);
    }
}

__attribute__((target("avx512f,avx512bw,avx2,fma"))) static void kernel16_avx512(
    const struct unpacked * u, int64_t K, const uint8_t * const * a, int nc, float out[ROWS][2]) {
    if (nc == 2) {
        avx512_4xN(u, K, a, 2, out, 1);
    } else {
        avx512_4xN(u, K, a, 1, out, 1);
    }
}

#endif /* DSV4_X86 */

int dsv4_gemm_isa_supported(int isa) {
    switch (isa) {
    case DSV4_GEMM_SCALAR:
        return 1;
#ifdef DSV4_X86
    case DSV4_GEMM_AVX2:
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case DSV4_GEMM_AVX512:
        return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
               dsv4_gemm_isa_supported(DSV4_GEMM_AVX2);
    case DSV4_GEMM_VNNI:
        return dsv4_vnni_supported() && dsv4_gemm_isa_supported(DSV4_GEMM_AVX512);
#endif
    default:
        return 0;
    }
}

int dsv4_gemm_isa_best(void) {
    if (dsv4_gemm_isa_supported(DSV4_GEMM_VNNI)) {
        return DSV4_GEMM_VNNI;
    }
    if (dsv4_gemm_isa_supported(DSV4_GEMM_AVX512)) {
        return DSV4_GEMM_AVX512;
    }
    if (dsv4_gemm_isa_supported(DSV4_GEMM_AVX2)) {
        return DSV4_GEMM_AVX2;
    }
    return DSV4_GEMM_OFF;
}

static kernel_fn kernel_for(int isa, int type) {
    const int k16 = dsv4_is_k16(type);
#ifdef DSV4_X86
    /* VNNI: rows not a multiple of 16, the k16 types' experts of fewer than SLAB_MIN_COLS tokens */
    if (isa == DSV4_GEMM_AVX512 || isa == DSV4_GEMM_VNNI) {
        return k16 ? kernel16_avx512 : kernel_avx512;
    }
    if (isa == DSV4_GEMM_AVX2) {
        return k16 ? kernel16_avx2 : kernel_avx2;
    }
#endif
    return isa == DSV4_GEMM_SCALAR ? (k16 ? kernel16_scalar : kernel_scalar) : NULL;
}

/* ---------------------------------------------------------------------------------------------- ops */

static void prep_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
#ifdef DSV4_X86
    if ((int) (intptr_t) userdata >= DSV4_GEMM_AVX2) {
        dsv4_prep_rows(dst, ith, nth, quantize_row_q8k_avx2);
        return;
    }
#else
    (void) userdata;
#endif
    dsv4_prep_rows(dst, ith, nth, quantize_row_q8k);
}

struct ggml_tensor * dsv4_q8k_prep(struct ggml_context * ctx, struct ggml_tensor * b, int isa) {
    if (b->type != GGML_TYPE_F32 || b->nb[0] != sizeof(float) || b->ne[0] % QK != 0 || b->ne[3] != 1 ||
        !dsv4_gemm_isa_supported(isa)) {
        return NULL;
    }
    struct ggml_tensor * args[1] = {b};
    return ggml_custom_4d(ctx, GGML_TYPE_I8, (int64_t) dsv4_q8k_row_bytes(b->ne[0]), b->ne[1], b->ne[2], 1, args, 1,
                          prep_op, GGML_N_TASKS_MAX, (void *) (intptr_t) isa);
}

int dsv4_moe_gemm_ok(const struct ggml_tensor * as, const struct ggml_tensor * b, const struct ggml_tensor * ids) {
    const int64_t K = as->ne[0], M = as->ne[1], E = as->ne[2];
    const size_t bytes = dsv4_kq_bytes(as->type);
    return bytes > 0 && K % QK == 0 && K > 0 && K <= DSV4_GEMM_MAX_K && M % ROWS == 0 && M > 0 && E > 0 &&
           E <= DSV4_GEMM_MAX_EXPERTS && as->ne[3] == 1 && as->nb[1] == (size_t) (K / QK) * bytes &&
           b->type == GGML_TYPE_F32 && b->ne[0] == K && b->nb[0] == sizeof(float) && b->ne[3] == 1 &&
           ids->type == GGML_TYPE_I32 && ids->ne[2] == 1 && ids->ne[3] == 1 && b->ne[2] == ids->ne[1] &&
           (b->ne[1] == 1 || b->ne[1] == ids->ne[0]);
}

static inline int32_t id_at(const struct ggml_tensor * ids, int64_t s, int64_t t) {
    int32_t e;
    memcpy(&e, (const char *) ids->data + s * ids->nb[0] + t * ids->nb[1], sizeof e);
    return e;
}

/* Rows [m0, m1) (multiples of 16) of one expert times its nc gathered activation rows, lanes-are-rows. */
static void vnni_units(int type, const uint8_t * w, size_t stride, int64_t K, int64_t m0, int64_t m1,
                       const uint8_t * const * arow, float * const * orow, int nc) {
    struct dsv4_slab slab;
    struct dsv4_slab16 slab16;
    float acc[COLS][SLAB_ROWS];
    for (int64_t m = m0; m < m1; m += SLAB_ROWS) {
        if (m + SLAB_ROWS < m1) { /* the next slab's rows (contiguous) come from memory while this one computes: the
                                   * strided reads of a slab's blocks were the kernel's largest stall */
            const uint8_t * next = w + (m + SLAB_ROWS) * stride;
            for (size_t o = 0; o < SLAB_ROWS * stride; o += 64) {
                __builtin_prefetch(next + o, 0, 3);
            }
        }
        memset(acc, 0, sizeof(float) * SLAB_ROWS * (size_t) nc);
        for (int64_t sb = 0; sb < K / QK; sb++) {
            if (dsv4_is_k16(type)) {
                dsv4_vnni_slab_k16(type, w + m * stride, stride, sb, &slab16);
                for (int c = 0; c < nc; c += 8) {
                    dsv4_vnni_columns_k16(&slab16, arow + c, nc - c < 8 ? nc - c : 8, K, sb, acc + c);
                }
                continue;
            }
            dsv4_vnni_slab_kq(type, w + m * stride, stride, sb, &slab);
            for (int c = 0; c < nc; c += 8) {
                dsv4_vnni_columns(&slab, arow + c, nc - c < 8 ? nc - c : 8, K, sb, acc + c);
            }
        }
        for (int c = 0; c < nc; c++) {
            memcpy(orow[c] + m, acc[c], sizeof(float) * SLAB_ROWS);
        }
    }
}

/* The activation rows each expert takes: those ids names (mul_mat_id), or in a dense product (ids NULL) every row
 * of batch e for "expert" e. counts[e] gets their number; returns the total. Thread 0 zeroes the output of slots
 * whose id is out of range (ggml would abort). */
static int64_t count_columns(const struct ggml_tensor * dst, const struct ggml_tensor * ids, int64_t E,
                             int64_t * counts, int ith) {
    const int64_t M = dst->ne[0];
    if (ids == NULL) {
        for (int64_t e = 0; e < E; e++) {
            counts[e] = dst->ne[1];
        }
        return dst->ne[1] * E;
    }
    int64_t total = 0;
    for (int64_t t = 0; t < ids->ne[1]; t++) {
        for (int64_t s = 0; s < ids->ne[0]; s++) {
            const int32_t e = id_at(ids, s, t);
            if (e >= 0 && e < E) {
                counts[e]++;
                total++;
            } else if (ith == 0) {
                memset((char *) dst->data + s * dst->nb[1] + t * dst->nb[2], 0, (size_t) M * sizeof(float));
            }
        }
    }
    return total;
}

/* The next (at most COLS) activation rows of expert e from the scan position (t, s), with their output rows;
 * their number (0 at the end). */
static int gather_columns(const struct ggml_tensor * dst, const struct ggml_tensor * prep,
                          const struct ggml_tensor * ids, int64_t e, int64_t * t, int64_t * s, const uint8_t ** arow,
                          float ** orow) {
    int nc = 0;
    if (ids == NULL) {
        for (; *t < dst->ne[1] && nc < COLS; (*t)++, nc++) {
            arow[nc] = (const uint8_t *) prep->data + *t * prep->nb[1] + e * prep->nb[2];
            orow[nc] = (float *) ((char *) dst->data + *t * dst->nb[1] + e * dst->nb[2]);
        }
        return nc;
    }
    const int64_t k = ids->ne[0], n = ids->ne[1], n1 = prep->ne[1];
    for (; *t < n && nc < COLS; *s = (*s + 1 == k) ? 0 : *s + 1, *t += (*s == 0)) {
        if (id_at(ids, *s, *t) == e) {
            arow[nc] = (const uint8_t *) prep->data + (n1 == 1 ? 0 : *s) * prep->nb[1] + *t * prep->nb[2];
            orow[nc] = (float *) ((char *) dst->data + *s * dst->nb[1] + *t * dst->nb[2]);
            nc++;
        }
    }
    return nc;
}

/* dst = as x prep, by expert: src[2] the ids (mul_mat_id), or none (a dense, possibly batched, product). */
static void gemm_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    const int isa = (int) (intptr_t) userdata;
    const kernel_fn kernel = kernel_for(isa, dst->src[0]->type);
    const struct ggml_tensor *as = dst->src[0], *prep = dst->src[1], *ids = dst->src[2];
    const int vnni = isa == DSV4_GEMM_VNNI && as->ne[1] % SLAB_ROWS == 0;
    const int64_t K = as->ne[0], M = as->ne[1], E = as->ne[2];
    const int64_t n_units = (M + UNIT - 1) / UNIT;
    int64_t counts[DSV4_GEMM_MAX_EXPERTS] = {0};
    const int64_t total = count_columns(dst, ids, E, counts, ith);
    /* Work = (expert, 16-row unit) pairs costed by the expert's token count; thread ith takes the units that
     * start in its share [ith, ith+1) * total_cost / nth of the running cost. */
    const int64_t cost = total * n_units;
    struct unpacked u;
    const uint8_t * arow[COLS];
    float * orow[COLS];
    int64_t run = 0;
    for (int64_t e = 0; e < E; e++) {
        const int64_t c_e = counts[e];
        if (c_e == 0) {
            continue;
        }
        int64_t u0 = -1, u1 = -1; /* my units of this expert: [u0, u1) */
        for (int64_t un = 0; un < n_units; un++) {
            if ((run + un * c_e) * nth / cost == ith) {
                if (u0 < 0) {
                    u0 = un;
                }
                u1 = un + 1;
            }
        }
        run += n_units * c_e;
        if (u0 < 0) {
            continue;
        }
        const uint8_t * w = (const uint8_t *) as->data + e * as->nb[2];
        int64_t t = 0, s = 0; /* scan position */
        int nc;
        const int64_t r0 = u0 * UNIT, r1 = u1 * UNIT < M ? u1 * UNIT : M; /* my rows of this expert */
        while ((nc = gather_columns(dst, prep, ids, e, &t, &s, arow, orow)) > 0) {
            if (vnni && nc >= SLAB_MIN_COLS) {
                vnni_units(as->type, w, as->nb[1], K, r0, r1, arow, orow, nc);
                continue;
            }
            if (vnni && !dsv4_is_k16(as->type)) { /* 1 or 2 tokens */
                dsv4_vnni_rows_kq(as->type, w, as->nb[1], r0, r1 - r0, arow, nc, K, orow);
                continue;
            }
            for (int64_t m0 = r0; m0 < r1; m0 += ROWS) {
                for (int r = 0; r < ROWS; r++) {
                    unpack_row(as->type, w + (m0 + r) * as->nb[1], K, &u, r, isa >= DSV4_GEMM_AVX2);
                }
                for (int c = 0; c < nc; c += 2) {
                    float out[ROWS][2];
                    const int cc = nc - c >= 2 ? 2 : 1;
                    kernel(&u, K, arow + c, cc, out);
                    for (int j = 0; j < cc; j++) {
                        for (int r = 0; r < ROWS; r++) {
                            orow[c + j][m0 + r] = out[r][j];
                        }
                    }
                }
            }
        }
    }
}

struct ggml_tensor * dsv4_mul_mat_id_kq(struct ggml_context * ctx, struct ggml_tensor * as, struct ggml_tensor * prep,
                                         struct ggml_tensor * ids, int isa) {
    const kernel_fn kernel = dsv4_gemm_isa_supported(isa) ? kernel_for(isa, as->type) : NULL;
    const int64_t K = as->ne[0];
    if (kernel == NULL || prep->type != GGML_TYPE_I8 || prep->ne[0] != (int64_t) dsv4_q8k_row_bytes(K)) {
        return NULL;
    }
    /* the shape checks of dsv4_moe_gemm_ok, on a stand-in for the F32 activations */
    struct ggml_tensor b = *prep;
    b.type = GGML_TYPE_F32;
    b.ne[0] = K;
    b.nb[0] = sizeof(float);
    if (!dsv4_moe_gemm_ok(as, &b, ids)) {
        return NULL;
    }
    struct ggml_tensor * args[3] = {as, prep, ids};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, as->ne[1], ids->ne[0], ids->ne[1], 1, args, 3, gemm_op,
                          GGML_N_TASKS_MAX, (void *) (intptr_t) isa);
}

int dsv4_dense_kq_ok(const struct ggml_tensor * w, const struct ggml_tensor * x) {
    const int64_t K = w->ne[0], M = w->ne[1], B = w->ne[2];
    const size_t bytes = dsv4_kq_bytes(w->type);
    return bytes > 0 && K % QK == 0 && K > 0 && K <= DSV4_GEMM_MAX_K && M % ROWS == 0 && M > 0 && B > 0 &&
           B <= DSV4_GEMM_MAX_EXPERTS && w->ne[3] == 1 && w->nb[1] == (size_t) (K / QK) * bytes &&
           x->type == GGML_TYPE_F32 && x->ne[0] == K && x->nb[0] == sizeof(float) && x->ne[1] > 0 &&
           x->ne[2] == B && x->ne[3] == 1;
}

struct ggml_tensor * dsv4_mul_mat_kq(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * prep,
                                      int isa) {
    const kernel_fn kernel = dsv4_gemm_isa_supported(isa) ? kernel_for(isa, w->type) : NULL;
    const int64_t K = w->ne[0];
    if (kernel == NULL || prep == NULL || prep->type != GGML_TYPE_I8 ||
        prep->ne[0] != (int64_t) dsv4_q8k_row_bytes(K)) {
        return NULL;
    }
    struct ggml_tensor x = *prep; /* the shape checks of dsv4_dense_kq_ok, on a stand-in for the F32 activations */
    x.type = GGML_TYPE_F32;
    x.ne[0] = K;
    x.nb[0] = sizeof(float);
    if (!dsv4_dense_kq_ok(w, &x)) {
        return NULL;
    }
    struct ggml_tensor * args[2] = {w, prep};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], prep->ne[1], prep->ne[2], 1, args, 2, gemm_op,
                          GGML_N_TASKS_MAX, (void *) (intptr_t) isa);
}
