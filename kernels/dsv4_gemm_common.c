/* The pieces both product families use (declared in dsv4_gemm_impl.h and dsv4_gemm.h): activation row sizes,
 * Q4_K / Q5_K unpacking, the body of the activation-quantizing prep ops. dsv4_moe_gemm.c and dsv4_gemm_vnni.c depend on
 * this file, dsv4_moe_gemm.c on dsv4_gemm_vnni.c, and nothing back.
 */
#include "dsv4_gemm.h"
#include "dsv4_gemm_impl.h"

#include <stdint.h>

#ifdef DSV4_X86
#include <immintrin.h>
#endif

size_t dsv4_act_row_bytes(int64_t K) {
    const size_t b = (size_t) K + 8 * (size_t) (K / 32);
    return (b + 63) & ~(size_t) 63;
}

size_t dsv4_q8k_row_bytes(int64_t K) {
    const size_t b = (size_t) K + 8 * (size_t) (K / 32) + 4 * (size_t) (K / 16);
    return (b + 63) & ~(size_t) 63;
}

size_t dsv4_kq_bytes(int type) {
    switch (type) {
    case GGML_TYPE_Q2_K: return Q2K_BYTES;
    case GGML_TYPE_Q3_K: return Q3K_BYTES;
    case GGML_TYPE_Q4_K: return Q4K_BYTES;
    case GGML_TYPE_Q5_K: return Q5K_BYTES;
    case GGML_TYPE_Q6_K: return Q6K_BYTES;
    default: return 0;
    }
}

static void q5k_quants(const uint8_t * b, uint8_t * q) {
    const uint8_t *qh = b + 16, *ql = b + 48;
    for (int g = 0; g < 4; g++) {
        for (int l = 0; l < 32; l++) {
            q[64 * g + l] = (uint8_t) ((ql[32 * g + l] & 0xF) | (((qh[l] >> (2 * g)) & 1) << 4));
            q[64 * g + 32 + l] = (uint8_t) ((ql[32 * g + l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4));
        }
    }
}

static void q4k_quants(const uint8_t * b, uint8_t * q) {
    const uint8_t * ql = b + 16;
    for (int g = 0; g < 4; g++) {
        for (int l = 0; l < 32; l++) {
            q[64 * g + l] = (uint8_t) (ql[32 * g + l] & 0xF);
            q[64 * g + 32 + l] = (uint8_t) (ql[32 * g + l] >> 4);
        }
    }
}

#ifdef DSV4_X86
__attribute__((target("avx2"))) static void q5k_quants_avx2(const uint8_t * b, uint8_t * q) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), one = _mm256_set1_epi8(1);
    const __m256i qh = _mm256_loadu_si256((const __m256i *) (b + 16));
    for (int g = 0; g < 4; g++) {
        const __m256i l = _mm256_loadu_si256((const __m256i *) (b + 48 + 32 * g));
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * g), one), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * g + 1), one), 4);
        _mm256_storeu_si256((__m256i *) (q + 64 * g), _mm256_or_si256(_mm256_and_si256(l, m4), h0));
        _mm256_storeu_si256((__m256i *) (q + 64 * g + 32),
                            _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l, 4), m4), h1));
    }
}

__attribute__((target("avx2"))) static void q4k_quants_avx2(const uint8_t * b, uint8_t * q) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int g = 0; g < 4; g++) {
        const __m256i l = _mm256_loadu_si256((const __m256i *) (b + 16 + 32 * g));
        _mm256_storeu_si256((__m256i *) (q + 64 * g), _mm256_and_si256(l, m4));
        _mm256_storeu_si256((__m256i *) (q + 64 * g + 32), _mm256_and_si256(_mm256_srli_epi16(l, 4), m4));
    }
}
#endif

/* The scale-only k16 types' rest (Q3_K, Q6_K): no mins, fp16 d at `d`, offset `off`. */
static void k16_scales_only(struct dsv4_k16 * k, const uint8_t * d, int off) {
    uint16_t hd;
    memcpy(&hd, d, 2);
    for (int i = 0; i < 16; i++) {
        k->m[i] = 0;
    }
    k->d = dsv4_half_to_float(hd);
    k->dmin = 0.0f;
    k->off = off;
    k->has_min = 0;
}

static void q6k_quants(const uint8_t * b, uint8_t * q) {
    for (int n = 0; n < 2; n++) {
        const uint8_t *ql = b + 64 * n, *qh = b + 128 + 32 * n;
        uint8_t * y = q + 128 * n;
        for (int l = 0; l < 32; l++) {
            y[l] = (uint8_t) ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4));
            y[l + 32] = (uint8_t) ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4));
            y[l + 64] = (uint8_t) ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
            y[l + 96] = (uint8_t) ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
        }
    }
}

static void q2k_quants(const uint8_t * b, uint8_t * q) {
    const uint8_t * qs = b + 16;
    for (int n = 0; n < 2; n++) {
        for (int j = 0; j < 4; j++) {
            for (int l = 0; l < 32; l++) {
                q[128 * n + 32 * j + l] = (uint8_t) ((qs[32 * n + l] >> (2 * j)) & 3);
            }
        }
    }
}

static void q3k_quants(const uint8_t * b, uint8_t * q) {
    const uint8_t *hm = b, *qs = b + 32;
    for (int n = 0; n < 2; n++) {
        for (int j = 0; j < 4; j++) {
            const uint8_t bit = (uint8_t) (1u << (4 * n + j));
            for (int l = 0; l < 32; l++) {
                const int low = (qs[32 * n + l] >> (2 * j)) & 3;
                q[128 * n + 32 * j + l] = (uint8_t) (low + ((hm[l] & bit) ? 4 : 0));
            }
        }
    }
}

#ifdef DSV4_X86
/* The same three with AVX2: 32 quants per vector op. */
__attribute__((target("avx2"))) static void q6k_quants_avx2(const uint8_t * b, uint8_t * q) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03);
    for (int n = 0; n < 2; n++) {
        const __m256i l0 = _mm256_loadu_si256((const __m256i *) (b + 64 * n));
        const __m256i l1 = _mm256_loadu_si256((const __m256i *) (b + 64 * n + 32));
        const __m256i h = _mm256_loadu_si256((const __m256i *) (b + 128 + 32 * n));
        uint8_t * y = q + 128 * n;
        const __m256i h0 = _mm256_slli_epi16(_mm256_and_si256(h, m2), 4);
        const __m256i h1 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 2), m2), 4);
        const __m256i h2 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 4), m2), 4);
        const __m256i h3 = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(h, 6), m2), 4);
        _mm256_storeu_si256((__m256i *) y, _mm256_or_si256(_mm256_and_si256(l0, m4), h0));
        _mm256_storeu_si256((__m256i *) (y + 32), _mm256_or_si256(_mm256_and_si256(l1, m4), h1));
        _mm256_storeu_si256((__m256i *) (y + 64), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), h2));
        _mm256_storeu_si256((__m256i *) (y + 96), _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4), h3));
    }
}

__attribute__((target("avx2"))) static void q2k_quants_avx2(const uint8_t * b, uint8_t * q) {
    const __m256i m2 = _mm256_set1_epi8(0x03);
    for (int n = 0; n < 2; n++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *) (b + 16 + 32 * n));
        for (int j = 0; j < 4; j++) {
            _mm256_storeu_si256((__m256i *) (q + 128 * n + 32 * j),
                                _mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2));
        }
    }
}

__attribute__((target("avx2"))) static void q3k_quants_avx2(const uint8_t * b, uint8_t * q) {
    const __m256i m2 = _mm256_set1_epi8(0x03), four = _mm256_set1_epi8(4);
    const __m256i hm = _mm256_loadu_si256((const __m256i *) b);
    for (int n = 0; n < 2; n++) {
        const __m256i v = _mm256_loadu_si256((const __m256i *) (b + 32 + 32 * n));
        for (int j = 0; j < 4; j++) {
            const __m256i bit = _mm256_set1_epi8((char) (1u << (4 * n + j)));
            const __m256i high = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), four);
            _mm256_storeu_si256((__m256i *) (q + 128 * n + 32 * j),
                                _mm256_add_epi8(_mm256_and_si256(_mm256_srli_epi16(v, 2 * j), m2), high));
        }
    }
}
#endif

static void q6k_block(const uint8_t * b, struct dsv4_k16 * k) {
    for (int i = 0; i < 16; i++) {
        k->sc[i] = ((const int8_t *) (b + 192))[i];
    }
    k16_scales_only(k, b + 208, 32);
}

static void q2k_block(const uint8_t * b, struct dsv4_k16 * k) {
    const uint8_t * sc = b;
    for (int i = 0; i < 16; i++) {
        k->sc[i] = sc[i] & 0xF;
        k->m[i] = sc[i] >> 4;
    }
    uint16_t hd, hm;
    memcpy(&hd, b + 80, 2);
    memcpy(&hm, b + 82, 2);
    k->d = dsv4_half_to_float(hd);
    k->dmin = dsv4_half_to_float(hm);
    k->off = 0;
    k->has_min = 1;
}

static void q3k_block(const uint8_t * b, struct dsv4_k16 * k) {
    uint32_t aux[4];
    memcpy(aux, b + 96, 12);
    const uint32_t tmp = aux[2], m1 = 0x03030303u, m2 = 0x0f0f0f0fu;
    aux[2] = ((aux[0] >> 4) & m2) | (((tmp >> 4) & m1) << 4);
    aux[3] = ((aux[1] >> 4) & m2) | (((tmp >> 6) & m1) << 4);
    aux[0] = (aux[0] & m2) | (((tmp >> 0) & m1) << 4);
    aux[1] = (aux[1] & m2) | (((tmp >> 2) & m1) << 4);
    int8_t scales[16];
    memcpy(scales, aux, 16);
    for (int i = 0; i < 16; i++) {
        k->sc[i] = scales[i] - 32;
    }
    k16_scales_only(k, b + 108, 4);
}

void dsv4_k16_scales(int type, const uint8_t * b, struct dsv4_k16 * k) {
    if (type == GGML_TYPE_Q2_K) {
        q2k_block(b, k);
    } else if (type == GGML_TYPE_Q3_K) {
        q3k_block(b, k);
    } else {
        q6k_block(b, k);
    }
}

void dsv4_k16_block(int type, const uint8_t * b, struct dsv4_k16 * k, int avx2) {
    dsv4_k16_scales(type, b, k);
    void (*quants)(const uint8_t *, uint8_t *) =
        type == GGML_TYPE_Q2_K ? q2k_quants : type == GGML_TYPE_Q3_K ? q3k_quants : q6k_quants;
#ifdef DSV4_X86
    if (avx2) {
        quants = type == GGML_TYPE_Q2_K ? q2k_quants_avx2 : type == GGML_TYPE_Q3_K ? q3k_quants_avx2 : q6k_quants_avx2;
    }
#endif
    (void) avx2;
    quants(b, k->q);
}

void dsv4_kq_quants(int type, const uint8_t * b, uint8_t * q, int avx2) {
#ifdef DSV4_X86
    if (avx2) {
        (type == GGML_TYPE_Q5_K ? q5k_quants_avx2 : q4k_quants_avx2)(b, q);
        return;
    }
#endif
    (void) avx2;
    (type == GGML_TYPE_Q5_K ? q5k_quants : q4k_quants)(b, q);
}

void dsv4_prep_rows(struct ggml_tensor * dst, int ith, int nth, void (*quantize_row)(const float *, int64_t, uint8_t *)) {
    const struct ggml_tensor * b = dst->src[0];
    const int64_t K = b->ne[0], n1 = b->ne[1], rows = b->ne[1] * b->ne[2];
    for (int64_t i = ith; i < rows; i += nth) {
        const int64_t i1 = i % n1, i2 = i / n1;
        quantize_row((const float *) ((const char *) b->data + i1 * b->nb[1] + i2 * b->nb[2]), K,
                     (uint8_t *) dst->data + i1 * dst->nb[1] + i2 * dst->nb[2]);
    }
}
