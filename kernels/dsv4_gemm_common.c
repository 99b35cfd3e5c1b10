/* The pieces both product families use (declared in dsv4_gemm_impl.h and dsv4_gemm.h): activation row sizes,
 * Q5_K unpacking, the body of the activation-quantizing prep ops. dsv4_moe_gemm.c and dsv4_gemm_vnni.c depend on
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

void dsv4_q5k_quants(const uint8_t * b, uint8_t * q) {
    const uint8_t *qh = b + 16, *ql = b + 48;
    for (int g = 0; g < 4; g++) {
        for (int l = 0; l < 32; l++) {
            q[64 * g + l] = (uint8_t) ((ql[32 * g + l] & 0xF) | (((qh[l] >> (2 * g)) & 1) << 4));
            q[64 * g + 32 + l] = (uint8_t) ((ql[32 * g + l] >> 4) | (((qh[l] >> (2 * g + 1)) & 1) << 4));
        }
    }
}

#ifdef DSV4_X86
__attribute__((target("avx2"))) void dsv4_q5k_quants_avx2(const uint8_t * b, uint8_t * q) {
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
#endif

void dsv4_prep_rows(struct ggml_tensor * dst, int ith, int nth, void (*quantize_row)(const float *, int64_t, uint8_t *)) {
    const struct ggml_tensor * b = dst->src[0];
    const int64_t K = b->ne[0], n1 = b->ne[1], rows = b->ne[1] * b->ne[2];
    for (int64_t i = ith; i < rows; i += nth) {
        const int64_t i1 = i % n1, i2 = i / n1;
        quantize_row((const float *) ((const char *) b->data + i1 * b->nb[1] + i2 * b->nb[2]), K,
                     (uint8_t *) dst->data + i1 * dst->nb[1] + i2 * dst->nb[2]);
    }
}
