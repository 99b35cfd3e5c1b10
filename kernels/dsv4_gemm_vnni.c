/* AVX-512 VNNI products: weight rows in the lanes (prompt processing), and for Q8_0 also weight rows read in place
 * against fewer than 8 activation rows (decode; q80_rows_n below).
 *
 * 16 weight rows are unpacked to unsigned bytes and transposed so that one 64-byte vector holds 4 consecutive
 * columns of each of the 16 rows; vpdpbusd with 4 activation bytes broadcast then adds 64 products into 16
 * per-row sums, and every block of 32 columns is scaled once, in float, per row (a vector) and activation
 * (a scalar). No horizontal sums: a column of 16 outputs is one vector. The integer sums are ggml's.
 *
 * Q4_K / Q5_K rows (quants 0..15 / 0..31) go in as they are, and so do the k16 types' (Q2_K, Q3_K, Q6_K: their
 * offsets, scales and mins per 16 columns applied in integers per super-block, as ggml does); Q8_0 rows (int8) go in offset by 128, and the
 * offset's products (128 * the activation block's sum) come off through the correction term.
 */
#include "dsv4_gemm.h"
#include "dsv4_gemm_impl.h"

#include <math.h>

#define COLS 256 /* activation rows per pass (their 16 running sums live on the stack) */

/* Bytes ahead of the weight rows being read that the in-place kernels ask for: the rows are one stream, which the
 * hardware prefetcher alone did not keep up with (the kernels waited on each block's first load; on the medium
 * model, 4 KiB ahead: a decode step of 1 sequence 21.5 -> 16.5 ms, of 4 sequences 42 -> 35 ms; builds with 0.5 to
 * 8 KiB measured side by side with bench/multiseq.py on 2026-12-06, 2 to 8 KiB alike). */
#define AHEAD 4096

#ifdef DSV4_X86
#include <cpuid.h>
#include <immintrin.h>

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c")))

/* F16C from CPUID leaf 1 (ECX bit 29): clang 14's __builtin_cpu_supports does not know "f16c". */
static int has_f16c(void) {
    unsigned a, b, c, d;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C) != 0;
}

/* Asked at every graph build: CPUID is slow under a hypervisor (a VM exit), so the answer is kept (relaxed atomics:
 * every thread computes the same value). */
int dsv4_vnni_supported(void) {
    static int known = -1;
    int v = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (v < 0) {
        v = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
            __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma") && has_f16c();
        __atomic_store_n(&known, v, __ATOMIC_RELAXED);
    }
    return v;
}

/* 16 rows of 16 dwords (x) -> 16 vectors, vector c holding dword c of every row (row r in lane r). */
VNNI static inline void transpose16(__m512i x[16]) {
    __m512i t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_epi32(x[2 * i], x[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(x[2 * i], x[2 * i + 1]);
    }
    /* u[4i + m], 128-bit lane L: dword 4L + m of rows 4i .. 4i+3 */
    for (int i = 0; i < 4; i++) {
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int m = 0; m < 4; m++) {
        const __m512i p = _mm512_shuffle_i32x4(u[m], u[4 + m], 0x44), q = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0x44);
        const __m512i p2 = _mm512_shuffle_i32x4(u[m], u[4 + m], 0xEE), q2 = _mm512_shuffle_i32x4(u[8 + m], u[12 + m], 0xEE);
        x[m] = _mm512_shuffle_i32x4(p, q, 0x88);
        x[4 + m] = _mm512_shuffle_i32x4(p, q, 0xDD);
        x[8 + m] = _mm512_shuffle_i32x4(p2, q2, 0x88);
        x[12 + m] = _mm512_shuffle_i32x4(p2, q2, 0xDD);
    }
}

/* tmp: 16 rows of 256 unsigned bytes -> w (a slab's) */
VNNI static void interleave(const uint8_t tmp[SLAB_ROWS][QK], uint8_t (*w)[64]) {
    for (int q = 0; q < 4; q++) {
        __m512i x[16];
        for (int r = 0; r < 16; r++) {
            x[r] = _mm512_loadu_si512((const void *) (tmp[r] + 64 * q));
        }
        transpose16(x);
        for (int c = 0; c < 16; c++) {
            _mm512_storeu_si512((void *) w[16 * q + c], x[c]);
        }
    }
}

/* Q4_K quants straight from the packed nibbles: byte l of group g (32 bytes) holds column 64g + l (low nibble) and
 * 64g + 32 + l (high), so the transposed dwords of the packed bytes are two slab vectors each (half the transposing
 * of unpacked bytes, and no unpacking pass). */
VNNI static void slab_q4k_quants(const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab * slab) {
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int h = 0; h < 2; h++) { /* groups 2h and 2h+1: 64 packed bytes of each row */
        __m512i x[16];
        for (int r = 0; r < SLAB_ROWS; r++) {
            x[r] = _mm512_loadu_si512((const void *) (rows + r * stride + (size_t) sb * Q4K_BYTES + 16 + 64 * h));
        }
        transpose16(x);
        for (int c = 0; c < 16; c++) { /* dword c: bytes 4(c % 8).. of group 2h + c / 8 */
            const int g = 2 * h + c / 8, i = c % 8;
            _mm512_storeu_si512((void *) slab->w[(2 * g) * 8 + i], _mm512_and_si512(x[c], m4));
            _mm512_storeu_si512((void *) slab->w[(2 * g + 1) * 8 + i],
                                _mm512_and_si512(_mm512_srli_epi16(x[c], 4), m4));
        }
    }
}

VNNI void dsv4_vnni_slab_kq(int type, const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab * slab) {
    uint8_t tmp[SLAB_ROWS][QK];
    const size_t bytes = dsv4_kq_bytes(type);
    for (int r = 0; r < SLAB_ROWS; r++) {
        const uint8_t * b = rows + r * stride + (size_t) sb * bytes;
        uint16_t hd, hm;
        memcpy(&hd, b, 2);
        memcpy(&hm, b + 2, 2);
        const float d = dsv4_half_to_float(hd), dmin = dsv4_half_to_float(hm);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            dsv4_scale_min_k4(j, b + 4, &sc, &m);
            slab->s[j][r] = d * (float) sc;
            slab->mn[j][r] = dmin * (float) m;
        }
        if (type != GGML_TYPE_Q4_K) {
            dsv4_kq_quants(type, b, tmp[r], 1);
        }
    }
    if (type == GGML_TYPE_Q4_K) {
        slab_q4k_quants(rows, stride, sb, slab);
        return;
    }
    interleave((const uint8_t(*)[QK]) tmp, slab->w);
}

VNNI static void slab_q80(const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab * slab) {
    uint8_t tmp[SLAB_ROWS][QK];
    const __m256i bias = _mm256_set1_epi8((char) 0x80);
    for (int r = 0; r < SLAB_ROWS; r++) {
        for (int j = 0; j < 8; j++) {
            const uint8_t * b = rows + r * stride + (sb * 8 + j) * Q80_BYTES;
            uint16_t hd;
            memcpy(&hd, b, 2);
            slab->s[j][r] = slab->mn[j][r] = dsv4_half_to_float(hd);
            _mm256_storeu_si256((__m256i *) (tmp[r] + 32 * j),
                                _mm256_xor_si256(_mm256_loadu_si256((const __m256i *) (b + 2)), bias));
        }
    }
    interleave((const uint8_t(*)[QK]) tmp, slab->w);
}

/* Q2_K and Q3_K quants from the packed 2-bit fields: byte l of group n (32 bytes of qs) holds columns 128n + 32j + l,
 * j = 0..3, two bits each (Q3_K: plus bit 4n + j of hmask byte l, worth 4); one transpose of the packed bytes
 * gives all 16 slab vectors of a group (instead of unpacking to bytes and transposing four times as much). */
VNNI static void slab_k16_packed_quants(int type, const uint8_t * rows, size_t stride, int64_t sb,
                                        struct dsv4_slab16 * slab) {
    const int q3 = type == GGML_TYPE_Q3_K;
    const size_t bytes = q3 ? Q3K_BYTES : Q2K_BYTES, qs_at = q3 ? 32 : 16;
    const __m512i m2 = _mm512_set1_epi8(0x03), four = _mm512_set1_epi8(4);
    __m512i x[16], h[16];
    for (int r = 0; r < SLAB_ROWS; r++) {
        const uint8_t * b = rows + r * stride + (size_t) sb * bytes;
        x[r] = _mm512_loadu_si512((const void *) (b + qs_at));
        h[r] = q3 ? _mm512_loadu_si512((const void *) b) : _mm512_setzero_si512(); /* hmask, then qs (unused) */
    }
    transpose16(x);
    if (q3) {
        transpose16(h);
    }
    for (int c = 0; c < 16; c++) { /* dword c: bytes 4(c % 8).. of group c / 8 */
        const int n = c / 8, i = c % 8;
        for (int j = 0; j < 4; j++) {
            __m512i q = _mm512_and_si512(_mm512_srli_epi16(x[c], 2 * j), m2);
            if (q3) {
                const __mmask64 hi = _mm512_test_epi8_mask(h[i], _mm512_set1_epi8((char) (1u << (4 * n + j))));
                q = _mm512_mask_add_epi8(q, hi, q, four);
            }
            _mm512_storeu_si512((void *) slab->w[32 * n + 8 * j + i], q);
        }
    }
}

VNNI void dsv4_vnni_slab_k16(int type, const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab16 * slab) {
    uint8_t tmp[SLAB_ROWS][QK];
    const size_t bytes = dsv4_kq_bytes(type);
    const int packed = type == GGML_TYPE_Q2_K || type == GGML_TYPE_Q3_K;
    struct dsv4_k16 k;
    for (int r = 0; r < SLAB_ROWS; r++) {
        const uint8_t * b = rows + r * stride + (size_t) sb * bytes;
        if (packed) {
            dsv4_k16_scales(type, b, &k);
        } else {
            dsv4_k16_block(type, b, &k, 1);
            memcpy(tmp[r], k.q, QK);
        }
        slab->d[r] = k.d;
        slab->dmin[r] = k.dmin;
        for (int i = 0; i < 16; i++) {
            slab->sc[i][r] = k.sc[i];
        }
        const int32_t * v = k.has_min ? k.m : k.sc;
        for (int p = 0; p < 8; p++) {
            slab->v2[p][r] = (int32_t) ((uint32_t) (uint16_t) v[2 * p] | ((uint32_t) (uint16_t) v[2 * p + 1] << 16));
        }
        slab->off = k.off;
        slab->has_min = k.has_min;
    }
    if (packed) {
        slab_k16_packed_quants(type, rows, stride, sb, slab);
        return;
    }
    interleave((const uint8_t(*)[QK]) tmp, slab->w);
}

/* k16: per block i of 16 columns, 4 vpdpbusd give each row's dot, times its scale (vpmulld), summed in integers
 * over the super-block; the bsum terms (sum_i v_i * bsum_i, the mins' or the offset's) by 8 vpdpwssd on int16 pairs
 * (|v| <= 128, |bsum| <= 16 * 128), then scaled in float. */
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"), always_inline)) static inline void columns16_n(
    const struct dsv4_slab16 * slab, const uint8_t * const * a, int64_t K, int64_t sb, float (*acc)[SLAB_ROWS],
    const int NC) {
    __m512i tot[8], cor[8];
    for (int c = 0; c < NC; c++) {
        tot[c] = cor[c] = _mm512_setzero_si512();
    }
    for (int i = 0; i < 16; i++) {
        __m512i ia[8];
        for (int c = 0; c < NC; c++) {
            ia[c] = _mm512_setzero_si512();
        }
        for (int t = 0; t < 4; t++) {
            const __m512i w = _mm512_loadu_si512((const void *) slab->w[i * 4 + t]);
            for (int c = 0; c < NC; c++) {
                int32_t a4;
                memcpy(&a4, a[c] + sb * QK + i * 16 + t * 4, 4);
                ia[c] = _mm512_dpbusd_epi32(ia[c], w, _mm512_set1_epi32(a4));
            }
        }
        const __m512i sc = _mm512_loadu_si512((const void *) slab->sc[i]);
        for (int c = 0; c < NC; c++) {
            tot[c] = _mm512_add_epi32(tot[c], _mm512_mullo_epi32(ia[c], sc));
        }
    }
    for (int p = 0; p < 8; p++) {
        const __m512i v = _mm512_loadu_si512((const void *) slab->v2[p]);
        for (int c = 0; c < NC; c++) {
            const int32_t * bs = dsv4_q8k_bsums16(a[c], K) + sb * 16 + 2 * p;
            const uint32_t pair = (uint32_t) (uint16_t) bs[0] | ((uint32_t) (uint16_t) bs[1] << 16);
            cor[c] = _mm512_dpwssd_epi32(cor[c], v, _mm512_set1_epi32((int32_t) pair));
        }
    }
    const __m512 d = _mm512_loadu_ps(slab->d), dmin = _mm512_loadu_ps(slab->dmin);
    for (int c = 0; c < NC; c++) {
        const __m512 ds = _mm512_set1_ps(((const float *) (a[c] + K))[sb * 8]);
        if (slab->has_min) {
            __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot[c]), _mm512_mul_ps(d, ds), _mm512_loadu_ps(acc[c]));
            f = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(cor[c]), _mm512_mul_ps(dmin, ds), f);
            _mm512_storeu_ps(acc[c], f);
        } else {
            const __m512i t = _mm512_sub_epi32(tot[c], _mm512_mullo_epi32(cor[c], _mm512_set1_epi32(slab->off)));
            _mm512_storeu_ps(acc[c], _mm512_fmadd_ps(_mm512_cvtepi32_ps(t), _mm512_mul_ps(d, ds), _mm512_loadu_ps(acc[c])));
        }
    }
}

VNNI void dsv4_vnni_columns_k16(const struct dsv4_slab16 * slab, const uint8_t * const * a, int nc, int64_t K,
                                int64_t sb, float (*acc)[SLAB_ROWS]) {
    switch (nc) {
    case 1: columns16_n(slab, a, K, sb, acc, 1); break;
    case 2: columns16_n(slab, a, K, sb, acc, 2); break;
    case 3: columns16_n(slab, a, K, sb, acc, 3); break;
    case 4: columns16_n(slab, a, K, sb, acc, 4); break;
    case 5: columns16_n(slab, a, K, sb, acc, 5); break;
    case 6: columns16_n(slab, a, K, sb, acc, 6); break;
    case 7: columns16_n(slab, a, K, sb, acc, 7); break;
    default: columns16_n(slab, a, K, sb, acc, 8); break;
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"), always_inline)) static inline void columns_n(
    const struct dsv4_slab * slab, const uint8_t * const * a, int64_t K, int64_t sb, float (*acc)[SLAB_ROWS],
    const int NC) {
    __m512 f[8];
    for (int c = 0; c < NC; c++) {
        f[c] = _mm512_loadu_ps(acc[c]);
    }
    for (int j = 0; j < 8; j++) {
        __m512i ia[8];
        for (int c = 0; c < NC; c++) {
            ia[c] = _mm512_setzero_si512();
        }
        for (int i = 0; i < 8; i++) {
            const __m512i w = _mm512_loadu_si512((const void *) slab->w[j * 8 + i]);
            for (int c = 0; c < NC; c++) {
                int32_t a4;
                memcpy(&a4, a[c] + sb * QK + j * 32 + i * 4, 4);
                ia[c] = _mm512_dpbusd_epi32(ia[c], w, _mm512_set1_epi32(a4));
            }
        }
        const __m512 s = _mm512_loadu_ps(slab->s[j]), mn = _mm512_loadu_ps(slab->mn[j]);
        for (int c = 0; c < NC; c++) {
            const float * ds = (const float *) (a[c] + K) + sb * 8 + j;
            const float * bf = ds + K / 32;
            f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia[c]), _mm512_mul_ps(s, _mm512_set1_ps(*ds)), f[c]);
            f[c] = _mm512_fnmadd_ps(mn, _mm512_set1_ps(*bf), f[c]);
        }
    }
    for (int c = 0; c < NC; c++) {
        _mm512_storeu_ps(acc[c], f[c]);
    }
}

VNNI void dsv4_vnni_columns(const struct dsv4_slab * slab, const uint8_t * const * a, int nc, int64_t K, int64_t sb,
                            float (*acc)[SLAB_ROWS]) {
    switch (nc) {
    case 1: columns_n(slab, a, K, sb, acc, 1); break;
    case 2: columns_n(slab, a, K, sb, acc, 2); break;
    case 3: columns_n(slab, a, K, sb, acc, 3); break;
    case 4: columns_n(slab, a, K, sb, acc, 4); break;
    case 5: columns_n(slab, a, K, sb, acc, 5); break;
    case 6: columns_n(slab, a, K, sb, acc, 6); break;
    case 7: columns_n(slab, a, K, sb, acc, 7); break;
    default: columns_n(slab, a, K, sb, acc, 8); break;
    }
}

/* Q4_K / Q5_K weight rows read in place against 1 or 2 prepared Q8_K activation rows (an expert's one or two tokens
 * in a decode step of several sequences, where a slab's transposing does not pay): each super-block's quants
 * unpacked in registers, 64 at a time (lanes 0-7 sum one sub-block of 32, lanes 8-15 the next), the 6-bit scales
 * applied in integers and the mins through the activation's block sums, as ggml's vec_dot does; nothing written
 * back but the results. orow[c][m0 + r] = row m0 + r times a[c], r < n. */
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"), always_inline)) static inline void rows_kq_n(
    int type, const uint8_t * w, size_t stride, int64_t m0, int64_t n, const uint8_t * const * a, int64_t K,
    float * const * orow, const int NC) {
    const size_t bytes = dsv4_kq_bytes(type);
    const int q5 = type == GGML_TYPE_Q5_K;
    const __m512i m4 = _mm512_set1_epi8(0x0F), sixteen = _mm512_set1_epi8(16), zero = _mm512_setzero_si512();
    const __mmask64 high = 0xFFFFFFFF00000000ull; /* bytes 32..63: the high nibbles */
    const size_t row_bytes = (size_t) (K / QK) * bytes;
    const int64_t ahead = stride >= AHEAD ? 1 : (int64_t) (AHEAD / stride); /* rows */
    for (int64_t r = 0; r < n; r++) {
        const uint8_t * row = w + (size_t) (m0 + r) * stride;
        if (r + ahead < n) {
            for (size_t o = 0; o < row_bytes; o += 64) {
                __builtin_prefetch(row + (size_t) ahead * stride + o, 0, 3);
            }
        }
        __m512 f[2];
        __m256 mn[2];
        for (int c = 0; c < NC; c++) {
            f[c] = _mm512_setzero_ps();
            mn[c] = _mm256_setzero_ps();
        }
        for (int64_t sb = 0; sb < K / QK; sb++) {
            const uint8_t * b = row + (size_t) sb * bytes;
            uint16_t hd, hm;
            memcpy(&hd, b, 2);
            memcpy(&hm, b + 2, 2);
            int32_t sc[8], m[8];
            for (int j = 0; j < 8; j++) {
                int s, mj;
                dsv4_scale_min_k4(j, b + 4, &s, &mj);
                sc[j] = s;
                m[j] = mj;
            }
            const uint8_t * ql = b + (q5 ? 48 : 16);
            const __m256i qh = q5 ? _mm256_loadu_si256((const __m256i *) (b + 16)) : _mm256_setzero_si256();
            const __m512i qh2 = _mm512_inserti64x4(_mm512_castsi256_si512(qh), qh, 1);
            __m512i tot[2] = {zero, zero};
            for (int g = 0; g < 4; g++) {
                const __m256i l = _mm256_loadu_si256((const __m256i *) (ql + 32 * g));
                const __m512i x = _mm512_inserti64x4(_mm512_castsi256_si512(l), l, 1);
                __m512i q = _mm512_mask_blend_epi8(high, _mm512_and_si512(x, m4),
                                                   _mm512_and_si512(_mm512_srli_epi16(x, 4), m4));
                if (q5) { /* bit 2g of qh[l] for the low nibbles, bit 2g + 1 for the high ones: worth 16 */
                    const __m256i lo = _mm256_set1_epi8((char) (1 << (2 * g)));
                    const __m512i bit = _mm512_inserti64x4(_mm512_castsi256_si512(lo),
                                                           _mm256_set1_epi8((char) (1 << (2 * g + 1))), 1);
                    q = _mm512_mask_add_epi8(q, _mm512_test_epi8_mask(qh2, bit), q, sixteen);
                }
                const __m512i scv =
                    _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(sc[2 * g]), _mm512_set1_epi32(sc[2 * g + 1]));
                for (int c = 0; c < NC; c++) {
                    const __m512i av = _mm512_loadu_si512((const void *) (a[c] + sb * QK + 64 * g));
                    tot[c] = _mm512_add_epi32(tot[c], _mm512_mullo_epi32(_mm512_dpbusd_epi32(zero, q, av), scv));
                }
            }
            const float d = dsv4_half_to_float(hd);
            const __m256 mv = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256((const __m256i *) m)),
                                            _mm256_set1_ps(dsv4_half_to_float(hm)));
            for (int c = 0; c < NC; c++) {
                const float * ds = (const float *) (a[c] + K);
                f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(tot[c]), _mm512_set1_ps(d * ds[sb * 8]), f[c]);
                mn[c] = _mm256_fmadd_ps(mv, _mm256_loadu_ps(ds + K / 32 + sb * 8), mn[c]);
            }
        }
        for (int c = 0; c < NC; c++) {
            const __m128 h = _mm_add_ps(_mm256_castps256_ps128(mn[c]), _mm256_extractf128_ps(mn[c], 1));
            const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
            orow[c][m0 + r] = _mm512_reduce_add_ps(f[c]) - _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
        }
    }
}

VNNI void dsv4_vnni_rows_kq(int type, const uint8_t * w, size_t stride, int64_t m0, int64_t n,
                            const uint8_t * const * a, int nc, int64_t K, float * const * orow) {
    if (nc >= 2) {
        rows_kq_n(type, w, stride, m0, n, a, K, orow, 2);
    } else {
        rows_kq_n(type, w, stride, m0, n, a, K, orow, 1);
    }
}

/* ---------------------------------------------------------------------------------------------- Q8_0 dense */

/* One activation row as ggml's x86 quantize_row_q8_0 makes it (scale max|x|/127 stored in fp16, quants
 * round-half-even(x * 127/max|x|)), in the prepared-row layout, with correction 128 * scale * sum(quants). */
VNNI static void quantize_row_q80(const float * x, int64_t K, uint8_t * row) {
    int8_t * qs = (int8_t *) row;
    float * ds = (float *) (row + K);
    float * bf = ds + K / 32;
    for (int64_t j = 0; j < K / 32; j++) {
        const float * xb = x + j * 32;
        float amax = 0.0f;
        for (int l = 0; l < 32; l++) {
            const float ax = fabsf(xb[l]);
            amax = ax > amax ? ax : amax;
        }
        const float d = _cvtsh_ss(_cvtss_sh(amax / 127.f, _MM_FROUND_TO_NEAREST_INT));
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        int s = 0;
        for (int l = 0; l < 32; l++) {
            const int q = dsv4_nearest_int8(xb[l] * id);
            qs[j * 32 + l] = (int8_t) q;
            s += q;
        }
        ds[j] = d;
        bf[j] = 128.0f * d * (float) s;
    }
}

/* The wide row (dsv4_q80_row_bytes, fewer than Q80_ROWS_MAX rows): the above, then for q80_rows_n, per pair p of
 * blocks, 16 floats (lanes 0-7 the scale of block 2p, lanes 8-15 that of block 2p+1) and 16 int32 (lane 0 and lane 8
 * -128 times the sum of the block's quants, the others 0: the start of vpdpbusd's sums, taking the offset's products
 * off in integers). */
VNNI static void quantize_row_q80_wide(const float * x, int64_t K, uint8_t * row) {
    quantize_row_q80(x, K, row);
    const int8_t * qs = (const int8_t *) row;
    const float * ds = (const float *) (row + K);
    float * da = (float *) (row + dsv4_act_row_bytes(K));
    int32_t * start = (int32_t *) (da + K / 4);
    for (int64_t j = 0; j < K / 32; j++) {
        int s = 0;
        for (int l = 0; l < 32; l++) {
            s += qs[j * 32 + l];
        }
        for (int l = 0; l < 8; l++) {
            da[8 * j + l] = ds[j];
            start[8 * j + l] = l == 0 ? -128 * s : 0;
        }
    }
}

static void q80_prep_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    dsv4_prep_rows(dst, ith, nth, dst->ne[1] < Q80_ROWS_MAX ? quantize_row_q80_wide : quantize_row_q80);
}

/* Fewer than Q80_ROWS_MAX activation rows: each weight row straight from the file, 64 bytes (two blocks) at a time,
 * multiplied with every activation row while it is in a register (no slab, whose transposing only pays for 8 rows
 * or more). Lanes 0-7 hold block 2p's sums, 8-15 block 2p+1's; each block scaled once in float per activation row;
 * one horizontal sum per weight row and activation row. acc[c][r] = row r times activation row c (wide rows). */
__attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma,f16c"), always_inline)) static inline void q80_rows_n(
    const uint8_t * rows, size_t stride, const uint8_t * const * a, int64_t K, float (*acc)[SLAB_ROWS], const int NC) {
    const size_t base = dsv4_act_row_bytes(K);
    const __m512i bias = _mm512_set1_epi8((char) 0x80);
    for (int r = 0; r < SLAB_ROWS; r++) {
        const uint8_t * row = rows + r * stride;
        __m512 f[Q80_ROWS_MAX - 1];
        for (int c = 0; c < NC; c++) {
            f[c] = _mm512_setzero_ps();
        }
        for (int64_t p = 0; p < K / 64; p++) {
            const uint8_t * b = row + (size_t) p * 2 * Q80_BYTES;
            __builtin_prefetch(b + AHEAD, 0, 3);
            const __m256i lo = _mm256_loadu_si256((const __m256i *) (b + 2));
            const __m256i hi = _mm256_loadu_si256((const __m256i *) (b + Q80_BYTES + 2));
            const __m512i w = _mm512_xor_si512(_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1), bias);
            uint16_t h0, h1;
            memcpy(&h0, b, 2);
            memcpy(&h1, b + Q80_BYTES, 2);
            const __m512 dw = _mm512_cvtph_ps(_mm256_set_m128i(_mm_set1_epi16((short) h1), _mm_set1_epi16((short) h0)));
            for (int c = 0; c < NC; c++) {
                const float * da = (const float *) (a[c] + base) + 16 * p;
                const int32_t * start = (const int32_t *) (a[c] + base + K) + 16 * p;
                const __m512i s = _mm512_dpbusd_epi32(_mm512_loadu_si512((const void *) start), w,
                                                      _mm512_loadu_si512((const void *) (a[c] + 64 * p)));
                f[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, _mm512_loadu_ps(da)), f[c]);
            }
        }
        for (int c = 0; c < NC; c++) {
            acc[c][r] = _mm512_reduce_add_ps(f[c]);
        }
    }
}

VNNI static void q80_rows(const uint8_t * rows, size_t stride, const uint8_t * const * a, int nc, int64_t K,
                          float (*acc)[SLAB_ROWS]) {
    switch (nc) {
    case 1: q80_rows_n(rows, stride, a, K, acc, 1); break;
    case 2: q80_rows_n(rows, stride, a, K, acc, 2); break;
    case 3: q80_rows_n(rows, stride, a, K, acc, 3); break;
    case 4: q80_rows_n(rows, stride, a, K, acc, 4); break;
    case 5: q80_rows_n(rows, stride, a, K, acc, 5); break;
    case 6: q80_rows_n(rows, stride, a, K, acc, 6); break;
    default: q80_rows_n(rows, stride, a, K, acc, 7); break;
    }
}

static void q80_gemm_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) userdata;
    const struct ggml_tensor *w = dst->src[0], *prep = dst->src[1];
    const int64_t K = w->ne[0], M = w->ne[1], N = prep->ne[1], B = prep->ne[2];
    const int64_t groups = M / SLAB_ROWS, units = groups * B;
    const int64_t u0 = units * ith / nth, u1 = units * (ith + 1) / nth;
    struct dsv4_slab slab;
    float acc[COLS][SLAB_ROWS];
    const uint8_t * arow[COLS];
    for (int64_t un = u0; un < u1; un++) {
        const int64_t b = un / groups, m0 = (un % groups) * SLAB_ROWS;
        const uint8_t * rows = (const uint8_t *) w->data + b * w->nb[2] + m0 * w->nb[1];
        if (N >= Q80_ROWS_MAX && un + 1 < u1 && m0 + SLAB_ROWS < M) { /* the next slab's rows while this one computes */
            for (size_t o = 0; o < SLAB_ROWS * w->nb[1]; o += 64) {
                __builtin_prefetch(rows + SLAB_ROWS * w->nb[1] + o, 0, 3);
            }
        }
        for (int64_t c0 = 0; c0 < N; c0 += COLS) {
            const int nc = (int) (N - c0 < COLS ? N - c0 : COLS);
            for (int c = 0; c < nc; c++) {
                arow[c] = (const uint8_t *) prep->data + (c0 + c) * prep->nb[1] + b * prep->nb[2];
            }
            if (N < Q80_ROWS_MAX) {
                q80_rows(rows, w->nb[1], arow, nc, K, acc);
            } else {
                memset(acc, 0, sizeof(float) * SLAB_ROWS * (size_t) nc);
                for (int64_t sb = 0; sb < K / QK; sb++) {
                    slab_q80(rows, w->nb[1], sb, &slab);
                    for (int c = 0; c < nc; c += 8) {
                        dsv4_vnni_columns(&slab, arow + c, nc - c < 8 ? nc - c : 8, K, sb, acc + c);
                    }
                }
            }
            for (int c = 0; c < nc; c++) {
                memcpy((char *) dst->data + (c0 + c) * dst->nb[1] + b * dst->nb[2] + m0 * sizeof(float), acc[c],
                       sizeof(float) * SLAB_ROWS);
            }
        }
    }
}

#else /* no x86: the callers never build these ops */

int dsv4_vnni_supported(void) {
    return 0;
}

void dsv4_vnni_slab_kq(int type, const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab * slab) {
    (void) type, (void) rows, (void) stride, (void) sb, (void) slab;
}

void dsv4_vnni_columns(const struct dsv4_slab * slab, const uint8_t * const * a, int nc, int64_t K, int64_t sb,
                       float (*acc)[SLAB_ROWS]) {
    (void) slab, (void) a, (void) nc, (void) K, (void) sb, (void) acc;
}

void dsv4_vnni_rows_kq(int type, const uint8_t * w, size_t stride, int64_t m0, int64_t n,
                       const uint8_t * const * a, int nc, int64_t K, float * const * orow) {
    (void) type, (void) w, (void) stride, (void) m0, (void) n, (void) a, (void) nc, (void) K, (void) orow;
}

void dsv4_vnni_slab_k16(int type, const uint8_t * rows, size_t stride, int64_t sb, struct dsv4_slab16 * slab) {
    (void) type, (void) rows, (void) stride, (void) sb, (void) slab;
}

void dsv4_vnni_columns_k16(const struct dsv4_slab16 * slab, const uint8_t * const * a, int nc, int64_t K, int64_t sb,
                           float (*acc)[SLAB_ROWS]) {
    (void) slab, (void) a, (void) nc, (void) K, (void) sb, (void) acc;
}

static void q80_prep_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) dst, (void) ith, (void) nth, (void) userdata;
}

static void q80_gemm_op(struct ggml_tensor * dst, int ith, int nth, void * userdata) {
    (void) dst, (void) ith, (void) nth, (void) userdata;
}

#endif

size_t dsv4_q80_row_bytes(int64_t K, int64_t N) {
    return dsv4_act_row_bytes(K) + (N < Q80_ROWS_MAX ? 2 * (size_t) K : 0);
}

int dsv4_dense_gemm_ok(const struct ggml_tensor * w, const struct ggml_tensor * x) {
    const int64_t K = w->ne[0], M = w->ne[1];
    return dsv4_vnni_supported() && w->type == GGML_TYPE_Q8_0 && K > 0 && K % QK == 0 && M > 0 &&
           M % SLAB_ROWS == 0 && w->ne[3] == 1 && w->nb[1] == (size_t) (K / 32) * Q80_BYTES &&
           x->type == GGML_TYPE_F32 && x->ne[0] == K && x->nb[0] == sizeof(float) && x->ne[2] == w->ne[2] &&
           x->ne[3] == 1;
}

struct ggml_tensor * dsv4_q80_prep(struct ggml_context * ctx, struct ggml_tensor * x) {
    if (!dsv4_vnni_supported() || x->type != GGML_TYPE_F32 || x->nb[0] != sizeof(float) || x->ne[0] % QK != 0 ||
        x->ne[3] != 1) {
        return NULL;
    }
    struct ggml_tensor * args[1] = {x};
    const int64_t row = (int64_t) dsv4_q80_row_bytes(x->ne[0], x->ne[1]);
    return ggml_custom_4d(ctx, GGML_TYPE_I8, row, x->ne[1], x->ne[2], 1, args, 1, q80_prep_op, GGML_N_TASKS_MAX, NULL);
}

struct ggml_tensor * dsv4_mul_mat_q80(struct ggml_context * ctx, struct ggml_tensor * w, struct ggml_tensor * prep) {
    if (prep->type != GGML_TYPE_I8 || prep->ne[0] != (int64_t) dsv4_q80_row_bytes(w->ne[0], prep->ne[1])) {
        return NULL;
    }
    struct ggml_tensor x = *prep; /* the shape checks, on a stand-in for the F32 activations */
    x.type = GGML_TYPE_F32;
    x.ne[0] = w->ne[0];
    x.nb[0] = sizeof(float);
    if (!dsv4_dense_gemm_ok(w, &x)) {
        return NULL;
    }
    struct ggml_tensor * args[2] = {w, prep};
    return ggml_custom_4d(ctx, GGML_TYPE_F32, w->ne[1], prep->ne[1], prep->ne[2], 1, args, 2, q80_gemm_op,
                          GGML_N_TASKS_MAX, NULL);
}
