/* AVX-512 helpers shared by the bf16 kernels (attention.c, elementwise.c, gemm.c). Include only where
 * __AVX512F__ and __AVX512BF16__ are defined. */
#ifndef SLUICE_BF16_SIMD_H
#define SLUICE_BF16_SIMD_H
#include <immintrin.h>
#include <stdint.h>

#include "simd_math.h"

/* x / (1 + exp(-x)) */
static inline __m512 silu512(__m512 x) {
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), x))));
}

static inline __m512 round_bf16(__m512 x) { /* to bf16 (nearest even) and back */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

static inline void store_bf16(uint16_t *dst, __m512 x, __mmask16 live) {
    _mm256_mask_storeu_epi16(dst, live, (__m256i)_mm512_cvtneps_pbh(x));
}

static inline __m512 load_bf16(const uint16_t *src, __mmask16 live) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(live, src)), 16));
}

/* out = bf16(bf16(x * cos) + bf16(roll(x, D/2) * sin)) for one head, cos/sin [D] (sign in sin) */
static inline void rotate_head(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out, int64_t D) {
    const int64_t half = D / 2;
    for (int64_t i = 0; i < D; i += 16) {
        const int64_t n = D - i >= 16 ? 16 : D - i, rolled = (i + half) % D;
        const __mmask16 live = (__mmask16)(n == 16 ? 0xFFFF : ((1u << n) - 1u));
        /* roll by D/2: element i takes x[i - D/2 mod D]; D/2 is a multiple of 16 here */
        const __m512 a = round_bf16(_mm512_mul_ps(load_bf16(x + i, live), load_bf16(cos + i, live)));
        const __m512 b = round_bf16(_mm512_mul_ps(load_bf16(x + rolled, live), load_bf16(sin + i, live)));
        store_bf16(out + i, _mm512_add_ps(a, b), live);
    }
}
#endif
