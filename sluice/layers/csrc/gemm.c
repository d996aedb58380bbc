/*
 * bf16 linear layers on CPUs with AVX-512 BF16: out[M, N] = x[M, K] @ W[N, K]^T, fp32 sums.
 *
 * The weight is packed once at load time into panels of 64 output columns:
 *   packed[panel][K / 2][64][2]   (pairs of k, columns along the row)
 * so each step over k reads 256 contiguous bytes (4 registers of 16 columns x 2 k), exactly
 * the operand of the bf16 pair dot-product instruction, while each row of x contributes one
 * broadcast pair. A 6-row x 64-column tile keeps 24 accumulators in registers for the whole K.
 *
 * Epilogues, fused so the output makes one trip through memory:
 *   EPI_STORE     out = bf16(acc + bias)
 *   EPI_RESIDUAL  out = bf16(bf16(acc + bias) + residual)            (x + o_proj(...), x + down_proj(...))
 *   EPI_SILU_MUL  panels hold 32 gate then 32 up columns; out = bf16(bf16(silu(bf16(g))) * bf16(u))
 * rounded at the same points as the PyTorch code they replace.
 *
 * Threads come from OpenMP; built against the libgomp PyTorch already loaded, so these
 * loops run on the same (already spinning) worker threads as torch's own ops.
 */
#include <omp.h>
#include <stdint.h>
#include <string.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "bf16_simd.h"

#define PANEL 64
#define MR 6
#define MC 240 /* rows of x per chunk: 240 x K bf16 stays in L2 while every panel passes by */

enum { EPI_STORE = 0, EPI_RESIDUAL = 1, EPI_SILU_MUL = 2 };

typedef struct {
    const uint16_t *x;
    int64_t M, K, ldx;
    const uint16_t *packed;
    int64_t N; /* columns of the packed weight (gate + up for EPI_SILU_MUL) */
    const float *bias;
    const uint16_t *residual;
    int64_t ldr;
    uint16_t *out;
    int64_t ldo;
    int epilogue;
} Gemm;

static inline __mmask16 cols_live(int64_t col, int64_t limit) {
    const int64_t n = limit - col;
    return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

static inline __attribute__((always_inline)) void finish_row(const Gemm *g, int64_t row, int64_t col0, const __m512 *acc) {
    uint16_t *out = g->out + row * g->ldo;
    if (g->epilogue == EPI_SILU_MUL) {
        const int64_t out_col = col0 / 2, width = g->N / 2; /* panel p -> output columns [32p, 32p + 32) */
        for (int v = 0; v < 2; v++) {
            const __mmask16 live = cols_live(out_col + 16 * v, width);
            const __m512 gate = round_bf16(acc[v]), up = round_bf16(acc[v + 2]);
            store_bf16(out + out_col + 16 * v, _mm512_mul_ps(round_bf16(silu512(gate)), up), live);
        }
        return;
    }
    for (int v = 0; v < 4; v++) {
        const int64_t col = col0 + 16 * v;
        const __mmask16 live = cols_live(col, g->N);
        if (!live) break;
        __m512 y = acc[v];
        if (g->bias) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(live, g->bias + col));
        if (g->epilogue == EPI_RESIDUAL)
            y = _mm512_add_ps(round_bf16(y), load_bf16(g->residual + row * g->ldr + col, live));
        _mm256_mask_storeu_epi16(out + col, live, (__m256i)_mm512_cvtneps_pbh(y));
    }
}

/* rows [row0, row0 + rows) x one panel; rows <= MR and known at compile time in each copy */
static inline __attribute__((always_inline)) void tile(const Gemm *g, int64_t row0, int64_t panel, const int rows) {
    const int64_t pairs = g->K / 2;
    const uint16_t *b = g->packed + panel * pairs * PANEL * 2;
    const uint32_t *a[MR];
    for (int i = 0; i < rows; i++) a[i] = (const uint32_t *)(g->x + (row0 + i) * g->ldx);
    __m512 acc[MR][4];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < 4; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(b + p * 128);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(b + p * 128 + 32);
        const __m512bh b2 = (__m512bh)_mm512_loadu_si512(b + p * 128 + 64);
        const __m512bh b3 = (__m512bh)_mm512_loadu_si512(b + p * 128 + 96);
        for (int i = 0; i < rows; i++) {
            const __m512bh ai = (__m512bh)_mm512_set1_epi32((int)a[i][p]);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
            acc[i][2] = _mm512_dpbf16_ps(acc[i][2], ai, b2);
            acc[i][3] = _mm512_dpbf16_ps(acc[i][3], ai, b3);
        }
    }
    for (int i = 0; i < rows; i++) finish_row(g, row0 + i, panel * PANEL, acc[i]);
}

static void tile_any(const Gemm *g, int64_t row0, int64_t panel, int64_t rows) {
    switch (rows) {
        case 6: tile(g, row0, panel, 6); break;
        case 5: tile(g, row0, panel, 5); break;
        case 4: tile(g, row0, panel, 4); break;
        case 3: tile(g, row0, panel, 3); break;
        case 2: tile(g, row0, panel, 2); break;
        default: tile(g, row0, panel, 1); break;
    }
}

/* Work items are (chunk of rows, panel), chunk-major, split evenly over the threads: with few
 * rows the threads split the panels (each streams its share of the weight once); with many,
 * the chunks. Chunks are even in size, and made smaller when there are too few items to balance. */
static void run_gemm(const Gemm *g) {
    const int64_t panels = (g->N + PANEL - 1) / PANEL;
    const int threads = omp_get_max_threads();
    int64_t chunks = (g->M + MC - 1) / MC;
    while (chunks * panels < 8 * threads && chunks * 8 * MR <= g->M) chunks *= 2; /* chunks of >= 4 tiles */
    const int64_t rows_per_chunk = ((g->M + chunks - 1) / chunks + MR - 1) / MR * MR;
    chunks = (g->M + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t items = panels * chunks;
#pragma omp parallel for schedule(static) if (g->M * g->N * g->K >= (1 << 16))
    for (int64_t item = 0; item < items; item++) {
        const int64_t chunk = item / panels, panel = item % panels;
        const int64_t begin = chunk * rows_per_chunk;
        const int64_t end = begin + rows_per_chunk < g->M ? begin + rows_per_chunk : g->M;
        for (int64_t row = begin; row < end; row += MR)
            tile_any(g, row, panel, end - row < MR ? end - row : MR);
    }
}
#endif

/* w [N, K] row-major -> packed panels (zero-padded to whole panels). K must be even. */
int pack_linear_bf16(const uint16_t *w, uint16_t *packed, int64_t N, int64_t K) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (K % 2) return -1;
    const int64_t panels = (N + PANEL - 1) / PANEL, pairs = K / 2;
    memset(packed, 0, (size_t)(panels * pairs * PANEL * 2) * sizeof(uint16_t));
    for (int64_t n = 0; n < N; n++) {
        uint16_t *dst = packed + (n / PANEL) * pairs * PANEL * 2 + (n % PANEL) * 2;
        for (int64_t k = 0; k < K; k++) dst[(k / 2) * PANEL * 2 + (k % 2)] = w[n * K + k];
    }
    return 0;
#else
    (void)w; (void)packed; (void)N; (void)K;
    return -1;
#endif
}

int linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                const float *bias, const uint16_t *residual, int64_t ldr, uint16_t *out, int64_t ldo, int epilogue) {
#if defined(__AVX512F__) && defined(__AVX512BF16__)
    if (K % 2 || (epilogue == EPI_SILU_MUL && N % PANEL)) return -1;
    Gemm g = {x, M, K, ldx, packed, N, bias, residual, ldr, out, ldo, epilogue};
    run_gemm(&g);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)packed; (void)N; (void)bias; (void)residual; (void)ldr;
    (void)out; (void)ldo; (void)epilogue;
    return -1;
#endif
}
