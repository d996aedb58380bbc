/*
 * The multi-LoRA delta of one linear layer on bf16 rows, every adapter of the step in one call
 * (punica's gathered bgmv, on the CPU):
 *   out[m] += (x[m] @ A[s]^T) @ B^T[s]        s = slots[m]; s < 0: the base model, row untouched
 * A [S][W][K] and B^T [S][W][N] in bf16, W columns per slot of which ranks[s] are in use.
 *
 * Shrink: xa[m][j] = x[m] . A[s][j] with the bf16 pair dot product, fp32 sums.
 * Expand: each 64-column block adds sum_j xa[m][j] * B^T[s][j][block] (fp32) to the row and rounds
 *   once: out = bf16(out + delta). A row reads only its own adapter's weights, so a step costs
 *   the same whatever its mix of adapters, with no grouping of rows and no per-adapter calls.
 * LORA_SILU_MUL: out holds the packed gate/up panels (32 gate then 32 up columns per 64, B^T's
 *   columns permuted alike, see gemm.c) and the result goes to act [M][N / 2]:
 *   act = bf16(bf16(silu(g)) * u), g and u rounded as gemm.c's fused epilogue rounds them.
 */
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "bf16_simd.h"

#define BLOCK 64

enum { LORA_ADD = 0, LORA_SILU_MUL = 1 };

static float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t K) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        const int64_t n = K - k >= 32 ? 32 : K - k;
        const __mmask32 live = (__mmask32)(n == 32 ? 0xFFFFFFFFu : ((1u << n) - 1u));
        const __m512bh va = (__m512bh)_mm512_maskz_loadu_epi16(live, a + k);
        const __m512bh vb = (__m512bh)_mm512_maskz_loadu_epi16(live, b + k);
        acc = _mm512_dpbf16_ps(acc, va, vb);
    }
    return _mm512_reduce_add_ps(acc);
}

static inline __mmask16 live_cols(int64_t col, int64_t limit) {
    const int64_t n = limit - col;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

/* delta[v] for columns [col0 + 16 v, col0 + 16 v + 16) of row m */
static inline void expand(const float *xa, const uint16_t *bt, int rank, int64_t N, int64_t col0, __m512 *delta) {
    for (int v = 0; v < 4; v++) delta[v] = _mm512_setzero_ps();
    for (int j = 0; j < rank; j++) {
        const __m512 w = _mm512_set1_ps(xa[j]);
        const uint16_t *row = bt + (int64_t)j * N + col0;
        for (int v = 0; v < 4; v++)
            delta[v] = _mm512_fmadd_ps(w, load_bf16(row + 16 * v, live_cols(col0 + 16 * v, N)), delta[v]);
    }
}
#endif

int lora_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const int32_t *slots, const int32_t *ranks,
              const uint16_t *a, const uint16_t *bt, int64_t W, int64_t N, uint16_t *out, int64_t ldo,
              uint16_t *act, int64_t lda, int mode) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (mode == LORA_SILU_MUL && N % BLOCK) return -1;
    float *xa = (float *)malloc((size_t)(M * W > 0 ? M * W : 1) * sizeof(float));
    if (!xa) return -2;
    const int64_t blocks = (N + BLOCK - 1) / BLOCK;
    /* a single decode row is a few microseconds of work: less than waking the other threads */
    const int parallel = M * W * (K + N) >= (1 << 18);
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t item = 0; item < M * W; item++) {
            const int64_t m = item / W, j = item % W;
            const int32_t s = slots[m];
            xa[item] = s >= 0 && j < ranks[s] ? dot_bf16(x + m * ldx, a + ((int64_t)s * W + j) * K, K) : 0.0f;
        }
#pragma omp for schedule(static)
        for (int64_t item = 0; item < blocks * M; item++) {
            const int64_t block = item / M, m = item % M, col0 = block * BLOCK;
            const int32_t s = slots[m];
            const int rank = s >= 0 ? ranks[s] : 0;
            if (mode == LORA_ADD && !rank) continue;
            __m512 delta[4];
            expand(xa + m * W, bt + (s >= 0 ? (int64_t)s * W * N : 0), rank, N, col0, delta);
            uint16_t *row = out + m * ldo;
            if (mode == LORA_SILU_MUL) {
                for (int v = 0; v < 2; v++) {
                    const __m512 g = round_bf16(_mm512_add_ps(load_bf16(row + col0 + 16 * v, 0xFFFF), delta[v]));
                    const __m512 u = round_bf16(_mm512_add_ps(load_bf16(row + col0 + 32 + 16 * v, 0xFFFF),
                                                              delta[v + 2]));
                    store_bf16(act + m * lda + block * 32 + 16 * v, _mm512_mul_ps(round_bf16(silu512(g)), u), 0xFFFF);
                }
                continue;
            }
            for (int v = 0; v < 4; v++) {
                const __mmask16 live = live_cols(col0 + 16 * v, N);
                if (!live) break;
                store_bf16(row + col0 + 16 * v, _mm512_add_ps(load_bf16(row + col0 + 16 * v, live), delta[v]), live);
            }
        }
    }
    free(xa);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)slots; (void)ranks; (void)a; (void)bt; (void)W; (void)N; (void)out;
    (void)ldo; (void)act; (void)lda; (void)mode;
    return -1;
#endif
}
