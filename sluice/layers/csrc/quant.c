/*
 * Linear layers whose weights stay in GGML's block formats (GGUF files): out[M, N] = x[M, K] @ W[N, K]^T.
 *
 * As llama.cpp does, each row of x is first quantized to int8 in blocks of 32 (one float scale
 * dx per block, and sx = dx * sum(q)), so a weight block meets its activations in one integer
 * dot product (vpdpbusd: u8 x s8 -> int32, AVX-512 VNNI). With a weight block w = d * (q - z) + m:
 *
 *   sum_i w_i x_i  ~=  d * dx * sum_i q_i xq_i  +  (m - d * z) * sx
 *
 * Q4_0 (z 8), Q4_1 (m), Q5_0 (z 16), Q5_1 (m): q is 0..15 / 0..31, unsigned, as vpdpbusd wants.
 * Q8_0: q is signed, so the product is taken as |xq| x sign(q, xq).
 * K-quants hold 256 values per block in sub-blocks with their own 6- or 8-bit scales: Q4_K and
 * Q5_K (8 sub-blocks of 32, d * sc and dmin * m per sub-block: one activation block each), Q6_K
 * (16 sub-blocks of 16, q - 32 signed: an activation block spans two scales, one per half of the
 * dot product's lanes).
 *
 * A weight block is unpacked once and used for up to MR rows of x (PR for the types read two blocks
 * at a time, below); threads split the output columns (and, for many rows, chunks of rows).
 * Weights are read as stored in the file.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* GGML type ids (ggml.h) */
enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

#define QK 32 /* elements per block */
#define MR 4  /* rows of x per tile */
#define NR 4  /* weight rows (output columns) per tile */
#define MC 64 /* rows of x per chunk */
/* Weight rows a tile prefetches ahead, into L2: its NR rows are short streams read side by side,
 * which the hardware prefetcher doesn't follow (weights beyond the L3 were read at 2-4 GB/s) */
#define PREFETCH_ROWS (8 * NR)
#define PREFETCH_HINT _MM_HINT_T1

static inline int64_t gguf_block_bytes(int qtype) {
    switch (qtype) {
        case Q4_0: return 18;
        case Q4_1: return 20;
        case Q5_0: return 22;
        case Q5_1: return 24;
        case Q8_0: return 34;
        case Q4_K: return 144;
        case Q5_K: return 176;
        case Q6_K: return 210;
        default: return 0;
    }
}

static inline int64_t block_values(int qtype) { return qtype >= Q4_K ? 256 : QK; }

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#include <immintrin.h>

#include "simd_math.h"

static inline float bf16_to_float(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* nearest even, as torch rounds */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* a * b rounded once, in an instruction -ffast-math can't reassociate with its neighbours: every
 * output must be computed in the same order whatever tile it falls in (batch invariance) */
static inline float mul(float a, float b) { return _mm_cvtss_f32(_mm_mul_ss(_mm_set_ss(a), _mm_set_ss(b))); }

static inline float half_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

static inline __m512 load16(const void *x, int bf16, int64_t i) { /* 16 values of x as floats */
    if (!bf16) return _mm512_loadu_ps((const float *)x + i);
    const __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One row of x (K values) -> int8 blocks with their scales dx and dx * sum(q): q = round(x * 127 / amax),
 * to nearest even (the rounding mode), as lrintf would. */
static void quantize_row(const void *x, int bf16, int64_t K, int8_t *xq, float *dx, float *sx) {
    for (int64_t b = 0; b < K / QK; b++) {
        const __m512 v0 = load16(x, bf16, b * QK), v1 = load16(x, bf16, b * QK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
        const float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
        _mm_storeu_si128((__m128i *)(xq + b * QK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(xq + b * QK + 16), _mm512_cvtsepi32_epi8(q1));
        dx[b] = d;
        sx[b] = d * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

/* x [M, K] quantized row by row for the integer kernels: xq [M, ldq] (zero past K), the block
 * scales dx and sums sx [M, K / 32] each, and `extra` floats per row of scratch for the caller,
 * in two allocations that release_activations frees. -2: out of memory. */
typedef struct {
    int8_t *xq;
    float *dx, *sx, *extra;
} Activations;

static void release_activations(Activations *a) {
    free(a->xq);
    free(a->dx);
}

static int quantize_activations(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, int64_t ldq, int64_t extra,
                                Activations *a) {
    const int64_t blocks = K / QK;
    a->xq = ldq > K ? calloc((size_t)(M * ldq), 1) : malloc((size_t)(M * ldq));
    a->dx = malloc((size_t)(M * (2 * blocks + extra)) * sizeof(float));
    if (!a->xq || !a->dx) {
        release_activations(a);
        return -2;
    }
    a->sx = a->dx + M * blocks;
    a->extra = a->sx + M * blocks;
    const size_t elem = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++)
        quantize_row((const char *)x + m * ldx * elem, bf16, K, a->xq + m * ldq, a->dx + m * blocks, a->sx + m * blocks);
    return 0;
}

static inline __m256i nibbles(const uint8_t *qs) { /* 16 bytes -> 32 values: low nibbles, then high */
    const __m128i b = _mm_loadu_si128((const __m128i *)qs), mask = _mm_set1_epi8(0x0F);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), mask), _mm_and_si128(b, mask));
}

static inline __m256i fifth_bits(const uint8_t *qh) { /* bit i of qh -> 16 in byte i */
    uint32_t h;
    memcpy(&h, qh, 4);
    return _mm256_maskz_set1_epi8((__mmask32)h, 0x10);
}

static inline __m256i nibbles32(const uint8_t *p, int high) { /* 32 bytes -> their low or high nibbles */
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    if (high) v = _mm256_srli_epi16(v, 4);
    return _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j, packed in 12 bytes */
static inline void k4_scale_min(const uint8_t *s, int j, int *sc, int *m) {
    if (j < 4) {
        *sc = s[j] & 63;
        *m = s[j + 4] & 63;
    } else {
        *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4);
        *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
    }
}

/* The 32 quantized weights meeting activation block b of a row, their scale (d_lo for the first
 * 16 values, d_hi for the rest) and the offset coefficient c: sum w x = d dx dot + c sx. */
static inline __attribute__((always_inline)) __m256i unpack(const uint8_t *row, int64_t b, const int qtype,
                                                            float *d_lo, float *d_hi, float *c) {
    if (qtype == Q4_K || qtype == Q5_K || qtype == Q6_K) {
        const uint8_t *blk = row + (b / 8) * gguf_block_bytes(qtype);
        const int j = (int)(b % 8);
        if (qtype == Q6_K) {
            const int half = j / 4, k = j % 4;
            const int8_t *scales = (const int8_t *)(blk + 192);
            const float d = half_at(blk + 208);
            *d_lo = mul(d, scales[2 * j]), *d_hi = mul(d, scales[2 * j + 1]), *c = 0.0f;
            const __m256i low = nibbles32(blk + half * 64 + (k % 2) * 32, k / 2);
            const __m256i high = _mm256_and_si256(
                _mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(blk + 128 + half * 32)), _mm_cvtsi32_si128(2 * k)),
                _mm256_set1_epi8(3));
            return _mm256_sub_epi8(_mm256_or_si256(low, _mm256_slli_epi16(high, 4)), _mm256_set1_epi8(32));
        }
        int sc, m;
        k4_scale_min(blk + 4, j, &sc, &m);
        *d_lo = *d_hi = mul(half_at(blk), (float)sc);
        *c = -mul(half_at(blk + 2), (float)m);
        __m256i q = nibbles32(blk + (qtype == Q4_K ? 16 : 48) + 32 * (j / 2), j & 1);
        if (qtype == Q5_K) {
            const __mmask32 bit = _mm256_test_epi8_mask(_mm256_loadu_si256((const __m256i *)(blk + 16)),
                                                        _mm256_set1_epi8((char)(1 << j)));
            q = _mm256_or_si256(q, _mm256_maskz_set1_epi8(bit, 0x10));
        }
        return q;
    }
    const uint8_t *blk = row + b * gguf_block_bytes(qtype);
    const float d = half_at(blk);
    *d_lo = *d_hi = d;
    switch (qtype) {
        case Q4_0: *c = -8.0f * d; return nibbles(blk + 2);
        case Q4_1: *c = half_at(blk + 2); return nibbles(blk + 4);
        case Q5_0: *c = -16.0f * d; return _mm256_or_si256(nibbles(blk + 6), fifth_bits(blk + 2));
        case Q5_1: *c = half_at(blk + 2); return _mm256_or_si256(nibbles(blk + 8), fifth_bits(blk + 4));
        default: *c = 0.0f; return _mm256_loadu_si256((const __m256i *)(blk + 2)); /* Q8_0 */
    }
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

typedef struct {
    int64_t M, K, N;
    const uint8_t *w;
    int64_t row_bytes;
    const int8_t *xq; /* [M, ldq]: K rounded up to 64, zero padded */
    int64_t ldq;
    const float *dx, *sx;     /* [M, K / 32] */
    const float *dxv, *sxv;   /* [M, ldq / 64, 16]: dx and sx / 8 of a pair of blocks, 8 lanes each */
    const float *bias;        /* [N] or NULL */
    const void *residual;     /* [M, N] rows ldr apart, x's dtype, or NULL */
    int64_t ldr;
    void *out;
    int64_t ldo;
    int bf16;
} QGemm;

/* out[row, col] = y (+ bias + residual), rounded once to the output dtype */
static inline void store_out(const QGemm *g, int64_t row, int64_t col, float y) {
    if (g->bias) y += g->bias[col];
    const int64_t at = row * g->ldo + col;
    if (g->bf16) {
        if (g->residual) y += bf16_to_float(((const uint16_t *)g->residual)[row * g->ldr + col]);
        ((uint16_t *)g->out)[at] = float_to_bf16(y);
    } else {
        if (g->residual) y += ((const float *)g->residual)[row * g->ldr + col];
        ((float *)g->out)[at] = y;
    }
}

/*
 * Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: two blocks (64 values) per 512-bit register. One masked load
 * brings a pair of blocks; byte and word permutes spread their nibbles into x's order and their
 * float16 scales over the 8 lanes of each block, so a pair costs one vpdpbusd, a convert and two
 * FMAs per row of x, and the horizontal sum is taken once per output. The weight is made
 * unsigned for vpdpbusd (Q8_0: q + 128) and the offset folded into c: w = d * q + c per block.
 */
typedef struct {
    __m512i q;
    __m512 d, c;
} Pair;

typedef struct {
    __m512i bytes, shifts, words; /* permute of the quant bytes, nibble shifts, permute of d and m */
} PairLayout;

static inline int64_t quant_offset(int qtype) { /* where a block's 16 bytes of nibbles (Q8_0: 32 bytes) start */
    return qtype == Q4_0 ? 2 : qtype == Q4_1 ? 4 : qtype == Q5_0 ? 6 : 8;
}

static inline __attribute__((always_inline)) PairLayout pair_layout(const int qtype) {
    const int64_t bb = gguf_block_bytes(qtype), o = quant_offset(qtype);
    uint8_t bytes[64];
    uint16_t shifts[32], words[32];
    for (int j = 0; j < 64; j++) bytes[j] = (uint8_t)(o + (j % 16) + (j / 32) * bb);
    if (qtype == Q8_0) /* from the pair's first 64 bytes (indices < 64), then from the 64 bytes at + 4 */
        for (int j = 0; j < 64; j++) bytes[j] = (uint8_t)(j < 32 ? 2 + j : j + 4 < 64 ? j + 4 : 64 + j);
    for (int j = 0; j < 32; j++) {
        shifts[j] = (uint16_t)((j / 8) % 2 * 4);
        words[j] = (uint16_t)((j / 16) + (j / 8) % 2 * (bb / 2)); /* d0 x 8, d1 x 8, m0 x 8, m1 x 8 */
    }
    PairLayout l = {_mm512_loadu_si512(bytes), _mm512_loadu_si512(shifts), _mm512_loadu_si512(words)};
    return l;
}

static inline __attribute__((always_inline)) Pair unpack_pair(const uint8_t *blk, const int two, const int qtype,
                                                              const PairLayout *l) {
    const int64_t bb = gguf_block_bytes(qtype);
    Pair p;
    if (qtype == Q8_0) { /* 68 bytes: d0, q0 and d1 from the first 64, the rest of q1 from 4 bytes on */
        const __m512i v = _mm512_maskz_loadu_epi8(two ? ~(__mmask64)0 : ((__mmask64)1 << bb) - 1, blk);
        const __m512i tail = _mm512_maskz_loadu_epi8(two ? (__mmask64)0xFFFFFFFFull << 32 : 0, blk + 4);
        p.q = _mm512_xor_si512(_mm512_permutex2var_epi8(v, l->bytes, tail), _mm512_set1_epi8((char)0x80));
        p.d = _mm512_cvtph_ps(_mm512_castsi512_si256(_mm512_permutexvar_epi16(l->words, v)));
        p.c = _mm512_mul_ps(p.d, _mm512_set1_ps(-128.0f));
        return p;
    }
    const __mmask64 live = ((__mmask64)1 << ((two ? 2 : 1) * bb)) - 1;
    const __m512i v = _mm512_maskz_loadu_epi8(live, blk);
    p.q = _mm512_and_si512(_mm512_srlv_epi16(_mm512_permutexvar_epi8(l->bytes, v), l->shifts), _mm512_set1_epi8(0x0F));
    if (qtype == Q5_0 || qtype == Q5_1) {
        uint32_t h[2] = {0, 0};
        memcpy(&h[0], blk + quant_offset(qtype) - 4, 4);
        if (two) memcpy(&h[1], blk + bb + quant_offset(qtype) - 4, 4);
        p.q = _mm512_or_si512(p.q, _mm512_maskz_set1_epi8((__mmask64)h[0] | (__mmask64)h[1] << 32, 0x10));
    }
    const __m512i dm = _mm512_permutexvar_epi16(l->words, v);
    p.d = _mm512_cvtph_ps(_mm512_castsi512_si256(dm));
    if (qtype == Q4_1 || qtype == Q5_1) p.c = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(dm, 1));
    else p.c = _mm512_mul_ps(p.d, _mm512_set1_ps(qtype == Q4_0 ? -8.0f : -16.0f));
    return p;
}

#define PR 2 /* rows of x per pair tile */

static inline __attribute__((always_inline)) void pair_step(const QGemm *g, int64_t row0, const int rows, int64_t n0,
                                                            const int cols, const int qtype, const PairLayout *l,
                                                            int64_t p, const int two, __m512 acc[PR][NR]) {
    const int64_t pairs = g->ldq / 64, bb = gguf_block_bytes(qtype);
    Pair w[NR];
    for (int c = 0; c < cols; c++) {
        const uint8_t *blk = g->w + (n0 + c) * g->row_bytes + 2 * p * bb;
        _mm_prefetch((const char *)blk + PREFETCH_ROWS * g->row_bytes, PREFETCH_HINT);
        if (2 * bb > 64) _mm_prefetch((const char *)blk + PREFETCH_ROWS * g->row_bytes + 64, PREFETCH_HINT);
        w[c] = unpack_pair(blk, two, qtype, l);
    }
    for (int r = 0; r < rows; r++) {
        const int64_t row = row0 + r;
        const __m512i xv = _mm512_loadu_si512(g->xq + row * g->ldq + 64 * p);
        const __m512 dxv = _mm512_loadu_ps(g->dxv + (row * pairs + p) * 16);
        const __m512 sxv = _mm512_loadu_ps(g->sxv + (row * pairs + p) * 16);
        for (int c = 0; c < cols; c++) {
            const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w[c].q, xv);
            acc[r][c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(w[c].d, dxv), acc[r][c]);
            acc[r][c] = _mm512_fmadd_ps(w[c].c, sxv, acc[r][c]);
        }
    }
}

static inline __attribute__((always_inline)) void pair_tile(const QGemm *g, int64_t row0, const int rows, int64_t n0,
                                                            const int cols, const int qtype) {
    const PairLayout l = pair_layout(qtype);
    const int64_t blocks = g->K / QK;
    __m512 acc[PR][NR];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < blocks / 2; p++) pair_step(g, row0, rows, n0, cols, qtype, &l, p, 1, acc);
    if (blocks % 2) pair_step(g, row0, rows, n0, cols, qtype, &l, blocks / 2, 0, acc);
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) store_out(g, row0 + r, n0 + c, _mm512_reduce_add_ps(acc[r][c]));
}

/* rows [row0, row0 + rows) of x against weight rows [n0, n0 + cols): every weight block is unpacked
 * once per tile, and each output keeps its own accumulators, so its value never depends on the tile */
static inline __attribute__((always_inline)) void dot_tile(const QGemm *g, int64_t row0, const int rows, int64_t n0,
                                                           const int cols, const int qtype) {
    const int64_t blocks = g->K / QK;
    __m256 acc[MR][NR];
    __m128 off[MR][NR]; /* in lane 0; an explicit FMA chain the compiler can't reorder per tile shape */
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) acc[r][c] = _mm256_setzero_ps(), off[r][c] = _mm_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i q[NR];
        float d_lo[NR], d_hi[NR], coef[NR];
        for (int c = 0; c < cols; c++) {
            _mm_prefetch((const char *)g->w + (n0 + c + PREFETCH_ROWS) * g->row_bytes + b * g->row_bytes / blocks,
                         PREFETCH_HINT); /* as pair_step does */
            q[c] = unpack(g->w + (n0 + c) * g->row_bytes, b, qtype, &d_lo[c], &d_hi[c], &coef[c]);
        }
        for (int r = 0; r < rows; r++) {
            const int64_t row = row0 + r;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(g->xq + row * g->ldq + b * QK));
            const __m256i xabs = _mm256_abs_epi8(xv);
            const float dx = g->dx[row * blocks + b], sx = g->sx[row * blocks + b];
            for (int c = 0; c < cols; c++) {
                const __m256i dot = qtype == Q8_0 || qtype == Q6_K
                    ? _mm256_dpbusd_epi32(_mm256_setzero_si256(), xabs, _mm256_sign_epi8(q[c], xv))
                    : _mm256_dpbusd_epi32(_mm256_setzero_si256(), q[c], xv);
                const __m256 scale = qtype == Q6_K
                    ? _mm256_set_m128(_mm_set1_ps(mul(d_hi[c], dx)), _mm_set1_ps(mul(d_lo[c], dx)))
                    : _mm256_set1_ps(mul(d_lo[c], dx));
                acc[r][c] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[r][c]);
                off[r][c] = _mm_fmadd_ss(_mm_set_ss(coef[c]), _mm_set_ss(sx), off[r][c]);
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < cols; c++) store_out(g, row0 + r, n0 + c, hsum(acc[r][c]) + _mm_cvtss_f32(off[r][c]));
}

static inline __attribute__((always_inline)) void run_rows(const QGemm *g, int64_t row, int64_t rows, int64_t n,
                                                           const int cols, const int qtype) {
    if (qtype < Q4_K) {
        if (rows == 1) pair_tile(g, row, 1, n, cols, qtype);
        else pair_tile(g, row, 2, n, cols, qtype);
        return;
    }
    switch (rows) {
        case 4: dot_tile(g, row, 4, n, cols, qtype); break;
        case 3: dot_tile(g, row, 3, n, cols, qtype); break;
        case 2: dot_tile(g, row, 2, n, cols, qtype); break;
        default: dot_tile(g, row, 1, n, cols, qtype); break;
    }
}

static inline __attribute__((always_inline)) void run_chunk(const QGemm *g, int64_t row_begin, int64_t row_end,
                                                            int64_t n_begin, int64_t n_end, const int qtype) {
    for (int64_t n = n_begin; n < n_end; n += NR) {
        const int full = n + NR <= n_end;
        const int64_t mr = qtype < Q4_K ? PR : MR;
        for (int64_t row = row_begin; row < row_end; row += mr) {
            const int64_t rows = row_end - row < mr ? row_end - row : mr;
            if (full) {
                run_rows(g, row, rows, n, NR, qtype);
            } else {
                for (int64_t c = n; c < n_end; c++) run_rows(g, row, rows, c, 1, qtype);
            }
        }
    }
}

#define COLS_PER_ITEM 16

static void run_qgemm(const QGemm *g, int qtype) {
    const int64_t chunks = (g->M + MC - 1) / MC, col_items = (g->N + COLS_PER_ITEM - 1) / COLS_PER_ITEM;
    const int64_t items = chunks * col_items;
#pragma omp parallel for schedule(static) if (g->M * g->N * g->K >= (1 << 16))
    for (int64_t item = 0; item < items; item++) {
        const int64_t chunk = item / col_items, cols = item % col_items;
        const int64_t r0 = chunk * MC, r1 = r0 + MC < g->M ? r0 + MC : g->M;
        const int64_t n0 = cols * COLS_PER_ITEM, n1 = n0 + COLS_PER_ITEM < g->N ? n0 + COLS_PER_ITEM : g->N;
        switch (qtype) { /* one copy of the loops per type, so the unpacking is inlined */
            case Q4_0: run_chunk(g, r0, r1, n0, n1, Q4_0); break;
            case Q4_1: run_chunk(g, r0, r1, n0, n1, Q4_1); break;
            case Q5_0: run_chunk(g, r0, r1, n0, n1, Q5_0); break;
            case Q5_1: run_chunk(g, r0, r1, n0, n1, Q5_1); break;
            case Q4_K: run_chunk(g, r0, r1, n0, n1, Q4_K); break;
            case Q5_K: run_chunk(g, r0, r1, n0, n1, Q5_K); break;
            case Q6_K: run_chunk(g, r0, r1, n0, n1, Q6_K); break;
            default: run_chunk(g, r0, r1, n0, n1, Q8_0); break;
        }
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
static inline __m512i bf16_pairs(__m512 lo, __m512 hi) { /* 32 floats -> 32 bf16 (nearest even), in order */
    const __m512i one = _mm512_set1_epi32(1), bias = _mm512_set1_epi32(0x7FFF);
    const __m512i a = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(lo), _mm512_add_epi32(bias,
                                        _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(lo), 16), one))), 16);
    const __m512i b = _mm512_srli_epi32(_mm512_add_epi32(_mm512_castps_si512(hi), _mm512_add_epi32(bias,
                                        _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(hi), 16), one))), 16);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(a)), _mm512_cvtepi32_epi16(b), 1);
}

/* weight row n's values as bf16 into gemm.c's panel layout: packed[n / 64][K / 2][64][2] */
static inline __attribute__((always_inline)) void dequant_row(const uint8_t *row, int64_t n, int64_t K, uint16_t *packed,
                                                              const int qtype) {
    uint16_t *panel = packed + (n / 64) * K * 64 + (n % 64) * 2;
    for (int64_t b = 0; b < K / QK; b++) {
        float d_lo, d_hi, c;
        const __m256i q = unpack(row, b, qtype, &d_lo, &d_hi, &c);
        const int is_signed = qtype == Q8_0 || qtype == Q6_K;
        const __m128i q0 = _mm256_castsi256_si128(q), q1 = _mm256_extracti128_si256(q, 1);
        const __m512i i0 = is_signed ? _mm512_cvtepi8_epi32(q0) : _mm512_cvtepu8_epi32(q0);
        const __m512i i1 = is_signed ? _mm512_cvtepi8_epi32(q1) : _mm512_cvtepu8_epi32(q1);
        const __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i0), _mm512_set1_ps(d_lo), _mm512_set1_ps(c));
        const __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i1), _mm512_set1_ps(d_hi), _mm512_set1_ps(c));
        uint32_t pairs[16];
        _mm512_storeu_si512(pairs, bf16_pairs(w0, w1));
        uint16_t *dst = panel + (b * QK / 2) * 128;
        for (int p = 0; p < 16; p++) memcpy(dst + p * 128, &pairs[p], 4);
    }
}
#endif

/* W [N, K] as GGML blocks -> bf16 in gemm.c's packed panels (pack_linear_bf16's layout; the
 * padding columns of the last panel are left as they are: linear_bf16 never stores them), for
 * matmuls with many rows, where the bf16 kernel's register tiles beat unpacking a block per row
 * of x. -1: not served here. */
int dequant_pack_gguf(const uint8_t *w, int qtype, int64_t N, int64_t K, uint16_t *packed) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
    if (gguf_block_bytes(qtype) == 0 || K % block_values(qtype)) return -1;
    const int64_t row_bytes = K / block_values(qtype) * gguf_block_bytes(qtype);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        switch (qtype) {
            case Q4_0: dequant_row(row, n, K, packed, Q4_0); break;
            case Q4_1: dequant_row(row, n, K, packed, Q4_1); break;
            case Q5_0: dequant_row(row, n, K, packed, Q5_0); break;
            case Q5_1: dequant_row(row, n, K, packed, Q5_1); break;
            case Q4_K: dequant_row(row, n, K, packed, Q4_K); break;
            case Q5_K: dequant_row(row, n, K, packed, Q5_K); break;
            case Q6_K: dequant_row(row, n, K, packed, Q6_K); break;
            default: dequant_row(row, n, K, packed, Q8_0); break;
        }
    }
    return 0;
#else
    (void)w; (void)qtype; (void)N; (void)K; (void)packed;
    return -1;
#endif
}

/* x [M, K] (rows ldx apart; bf16 when bf16, else float32) @ W^T, W [N, K] as GGML blocks of type
 * qtype (rows of K / 32 blocks), + bias (float32 [N] or NULL) + residual ([M, N] rows ldr apart, x's
 * dtype, or NULL) -> out [M, N] (rows ldo apart, x's dtype). -1: not served here. */
int linear_gguf(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, const uint8_t *w, int qtype, int64_t N,
                const float *bias, const void *residual, int64_t ldr, void *out, int64_t ldo) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
    if (gguf_block_bytes(qtype) == 0 || K % block_values(qtype)) return -1;
    const int64_t blocks = K / QK, ldq = (K + 63) / 64 * 64, pairs = ldq / 64;
    Activations a;
    if (quantize_activations(x, M, K, ldx, bf16, ldq, 32 * pairs, &a)) return -2;
    float *dxv = a.extra, *sxv = dxv + M * pairs * 16; /* each row's block scales spread over 8 lanes */
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < 2 * pairs; b++)
            for (int i = 0; i < 8; i++) {
                dxv[(m * pairs) * 16 + b * 8 + i] = b < blocks ? a.dx[m * blocks + b] : 0.0f;
                sxv[(m * pairs) * 16 + b * 8 + i] = b < blocks ? a.sx[m * blocks + b] * 0.125f : 0.0f;
            }
    QGemm g = {M, K, N, w, K / block_values(qtype) * gguf_block_bytes(qtype), a.xq, ldq, a.dx, a.sx, dxv, sxv,
               bias, residual, ldr, out, ldo, bf16};
    run_qgemm(&g, qtype);
    release_activations(&a);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)bf16; (void)w; (void)qtype; (void)N; (void)bias; (void)residual;
    (void)ldr; (void)out; (void)ldo;
    return -1;
#endif
}

/*
 * int8 linear layers (W8A8): a weight quantized per output channel (w = sw[n] * q), activations
 * per row (x = sx[m] * xq, dynamic). vpdpbusd wants one unsigned operand, so x is stored as
 * xq + 128 and the 128 * sum_k q[n, k] this adds is taken off at the end:
 *
 *   out[m, n] = sx[m] * sw[n] * (sum_k (xq + 128) q  -  128 * qsum[n])
 *
 * The weight is packed once at load into panels of 64 columns, four k per column:
 * packed[panel][K4 / 4][64][4], K4 = K rounded up to 4 (zero padded), so each step over k
 * reads 256 contiguous bytes against a broadcast 4 bytes of x; a 6 x 64 tile keeps 24 int32
 * accumulators in registers for the whole K.
 */
#define PANEL8 64
#define MR8 6

static inline int64_t round4(int64_t k) { return (k + 3) / 4 * 4; }

/* w [N, K] int8 -> packed panels; qsum[n] = sum_k w[n, k] */
int pack_int8(const int8_t *w, int8_t *packed, int32_t *qsum, int64_t N, int64_t K) {
    const int64_t K4 = round4(K), panels = (N + PANEL8 - 1) / PANEL8;
    memset(packed, 0, (size_t)(panels * K4 * PANEL8));
    for (int64_t n = 0; n < N; n++) {
        int8_t *dst = packed + (n / PANEL8) * K4 * PANEL8 + (n % PANEL8) * 4;
        int32_t sum = 0;
        for (int64_t k = 0; k < K; k++) {
            dst[(k / 4) * PANEL8 * 4 + (k % 4)] = w[n * K + k];
            sum += w[n * K + k];
        }
        qsum[n] = sum;
    }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
typedef struct {
    const uint8_t *xu; /* [M, K4]: xq + 128 */
    const float *sx;
    int64_t M, K4, N;
    const int8_t *packed;
    const float *sw, *bias;
    const int32_t *qsum;
    const void *residual;
    int64_t ldr;
    void *out;
    int64_t ldo;
    int bf16, epilogue;
} I8Gemm;

enum { I8_STORE = 0, I8_RESIDUAL = 1, I8_GELU = 3 }; /* native.py's EPI_STORE, EPI_RESIDUAL, EPI_GELU */

static inline __m256i bf16_bits(__m512 y) { /* 16 floats -> bf16, nearest even, with AVX-512F alone */
    const __m512i bits = _mm512_castps_si512(y);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    return _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), odd)), 16));
}

static inline __m512 bf16_rounded(__m512 y) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits(y)), 16));
}

static inline __m512 load16_masked(const void *x, int bf16, int64_t i, __mmask16 live) { /* floats, 0 where dead */
    if (!bf16) return _mm512_maskz_loadu_ps(live, (const float *)x + i);
    const __m256i h = _mm256_maskz_loadu_epi16(live, (const uint16_t *)x + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __attribute__((always_inline)) void tile8(const I8Gemm *g, int64_t row0, int64_t panel, const int rows) {
    const int64_t quads = g->K4 / 4;
    const int8_t *b = g->packed + panel * g->K4 * PANEL8;
    __m512i acc[MR8][4];
    for (int i = 0; i < rows; i++)
        for (int v = 0; v < 4; v++) acc[i][v] = _mm512_setzero_si512();
    for (int64_t p = 0; p < quads; p++) {
        const __m512i b0 = _mm512_loadu_si512(b + p * 256), b1 = _mm512_loadu_si512(b + p * 256 + 64);
        const __m512i b2 = _mm512_loadu_si512(b + p * 256 + 128), b3 = _mm512_loadu_si512(b + p * 256 + 192);
        for (int i = 0; i < rows; i++) {
            int32_t quad;
            memcpy(&quad, g->xu + (row0 + i) * g->K4 + p * 4, 4);
            const __m512i a = _mm512_set1_epi32(quad);
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], a, b0);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], a, b1);
            acc[i][2] = _mm512_dpbusd_epi32(acc[i][2], a, b2);
            acc[i][3] = _mm512_dpbusd_epi32(acc[i][3], a, b3);
        }
    }
    for (int v = 0; v < 4; v++) {
        const int64_t col = panel * PANEL8 + 16 * v, left = g->N - col;
        if (left <= 0) break;
        const __mmask16 live = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
        const __m512i correction = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(live, g->qsum + col), 7);
        const __m512 sw = _mm512_maskz_loadu_ps(live, g->sw + col);
        const __m512 bias = g->bias ? _mm512_maskz_loadu_ps(live, g->bias + col) : _mm512_setzero_ps();
        for (int i = 0; i < rows; i++) {
            const int64_t row = row0 + i;
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][v], correction));
            __m512 y = _mm512_fmadd_ps(dot, _mm512_mul_ps(sw, _mm512_set1_ps(g->sx[row])), bias);
            if (g->epilogue != I8_STORE && g->bf16) y = bf16_rounded(y); /* the product as torch holds it */
            if (g->epilogue == I8_GELU) y = gelu512(y);
            if (g->epilogue == I8_RESIDUAL) y = _mm512_add_ps(y, load16_masked(g->residual, g->bf16, row * g->ldr + col, live));
            if (g->bf16)
                _mm256_mask_storeu_epi16((uint16_t *)g->out + row * g->ldo + col, live, bf16_bits(y));
            else
                _mm512_mask_storeu_ps((float *)g->out + row * g->ldo + col, live, y);
        }
    }
}

static void run_i8gemm(const I8Gemm *g) {
    const int64_t panels = (g->N + PANEL8 - 1) / PANEL8;
    int64_t chunk_rows = 8 * MR8;
    const int64_t chunks = (g->M + chunk_rows - 1) / chunk_rows, items = chunks * panels;
#pragma omp parallel for schedule(static) if (g->M * g->N * g->K4 >= (1 << 16))
    for (int64_t item = 0; item < items; item++) {
        const int64_t chunk = item / panels, panel = item % panels;
        const int64_t begin = chunk * chunk_rows, end = begin + chunk_rows < g->M ? begin + chunk_rows : g->M;
        for (int64_t row = begin; row < end; row += MR8) {
            switch (end - row < MR8 ? end - row : MR8) {
                case 6: tile8(g, row, panel, 6); break;
                case 5: tile8(g, row, panel, 5); break;
                case 4: tile8(g, row, panel, 4); break;
                case 3: tile8(g, row, panel, 3); break;
                case 2: tile8(g, row, panel, 2); break;
                default: tile8(g, row, panel, 1); break;
            }
        }
    }
}

/* One row of x (K values) -> xq + 128 as bytes (K4 of them, the padding 128) and its scale
 * amax / 127: q = round(x * 127 / amax) to nearest even (the rounding mode), as lrintf would.
 * amax is the row's own max |x|, or *given where not NULL. */
static void quantize_row_u8(const void *x, int bf16, int64_t K, int64_t K4, const float *given, uint8_t *xu,
                            float *sx) {
    __m512 amax16 = _mm512_setzero_ps();
    for (int64_t k = 0; !given && k < K; k += 16) {
        const __mmask16 live = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
        amax16 = _mm512_max_ps(amax16, _mm512_abs_ps(load16_masked(x, bf16, k, live)));
    }
    const float amax = given ? *given : _mm512_reduce_max_ps(amax16), inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *sx = amax / 127.0f;
    for (int64_t k = 0; k < K4; k += 16) {
        const int64_t left = K4 - k < 16 ? K4 - k : 16;
        const __mmask16 out = (__mmask16)((1u << left) - 1u);
        const __mmask16 live = K - k >= 16 ? (__mmask16)0xFFFF : K > k ? (__mmask16)((1u << (K - k)) - 1u) : 0;
        const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load16_masked(x, bf16, k, live), _mm512_set1_ps(inv)));
        _mm_mask_storeu_epi8(xu + k, out, _mm512_cvtepi32_epi8(_mm512_add_epi32(q, _mm512_set1_epi32(128))));
    }
}
#endif

/* x [M, K] (rows ldx apart; bf16 or float32) @ W^T (+ bias float32 [N] or NULL), W packed by
 * pack_int8 with per-channel scales sw [N] -> out [M, N] in x's dtype, through one epilogue:
 * I8_STORE, I8_RESIDUAL (+ residual [M, N], rows ldr apart, x's dtype) or I8_GELU, the product
 * first rounded to x's dtype as a separate torch op would hold it. Each row of x is quantized with
 * its own max |x|, or amax_x [M] where given (a tensor-parallel rank's share of a row, quantized as
 * the whole row is). -1: not served here. */
int linear_int8(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, const int8_t *packed, const float *sw,
                const int32_t *qsum, int64_t N, const float *bias, const void *residual, int64_t ldr, void *out,
                int64_t ldo, int epilogue, const float *amax_x) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
    const int64_t K4 = round4(K);
    uint8_t *xu = malloc((size_t)(M * K4));
    float *sx = malloc((size_t)M * sizeof(float));
    if (!xu || !sx) {
        free(xu);
        free(sx);
        return -2;
    }
    const size_t elem = bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) if (M >= 16)
    for (int64_t m = 0; m < M; m++)
        quantize_row_u8((const char *)x + m * ldx * elem, bf16, K, K4, amax_x ? amax_x + m : NULL, xu + m * K4, sx + m);
    I8Gemm g = {xu, sx, M, K4, N, packed, sw, bias, qsum, residual, ldr, out, ldo, bf16, epilogue};
    run_i8gemm(&g);
    free(xu);
    free(sx);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)bf16; (void)packed; (void)sw; (void)qsum; (void)N; (void)bias;
    (void)residual; (void)ldr; (void)out; (void)ldo; (void)epilogue; (void)amax_x;
    return -1;
#endif
}

/*
 * Q4_0, Q4_1 and Q8_0 repacked at load for the integer kernel ("x16"): 16 weight rows interleaved
 * block by block, so one 512-bit register holds 4 consecutive values of each of 16 rows and a
 * broadcast 4 bytes of x meet them in one vpdpbusd (lane r: the dot of row r), as the W8A8 panels
 * do. Per group of 16 rows and block of 32 values:
 *   4-bit: 4 steps of 64 bytes, byte 4r + j of step s: values 4s + j (low nibble) and 16 + 4s + j
 *          (high nibble) of row r; then d [16] float16, and Q4_1's m [16] float16;
 *   Q8_0:  8 steps of 64 bytes, q + 128 (unsigned, as vpdpbusd's first operand wants), then d [16].
 * The same bytes as the file (16 x the block size per group and block), so memory stays the file's.
 * x stays signed: sum (q + 128) x = sum q x + 128 sum x, and 128 d sx is taken off as Q4_0's 8 d is.
 * The 32 outputs of a block's dot products are in registers at once: one convert and two FMAs per
 * block and row of x give 16 outputs, no horizontal sums.
 */
#define XG 16  /* weight rows per group */
#define XMR 6  /* rows of x per tile */
#define XMC 48 /* rows of x per work item */

static inline int x16_type(int qtype) { return qtype == Q4_0 || qtype == Q4_1 || qtype == Q8_0; }

/* bytes of one group's block: 16 x the GGML block */
static inline int64_t x16_block_bytes(int qtype) { return XG * gguf_block_bytes(qtype); }

/* size of the repacked weight: N rounded up to 16 rows */
int64_t repacked_gguf_bytes(int qtype, int64_t N, int64_t K) {
    if (!x16_type(qtype) || K % QK) return -1;
    return (N + XG - 1) / XG * (K / QK) * x16_block_bytes(qtype);
}

/* w [N, K] as GGML blocks -> the x16 layout (rows past N zero). -1: not served here. */
int repack_gguf(const uint8_t *w, int qtype, int64_t N, int64_t K, uint8_t *packed) {
    if (!x16_type(qtype) || K % QK) return -1;
    const int64_t blocks = K / QK, bb = gguf_block_bytes(qtype), gb = x16_block_bytes(qtype);
    const int64_t groups = (N + XG - 1) / XG;
    memset(packed, 0, (size_t)(groups * blocks * gb));
    for (int64_t n = 0; n < N; n++) {
        const int64_t g = n / XG, r = n % XG;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *src = w + (n * blocks + b) * bb;
            uint8_t *dst = packed + (g * blocks + b) * gb;
            if (qtype == Q8_0) {
                for (int i = 0; i < QK; i++) dst[(i / 4) * 64 + 4 * r + i % 4] = (uint8_t)(src[2 + i] ^ 0x80);
                memcpy(dst + 512 + 2 * r, src, 2);
                continue;
            }
            const uint8_t *qs = src + (qtype == Q4_0 ? 2 : 4); /* byte i: value i (low), value 16 + i (high) */
            for (int i = 0; i < 16; i++) dst[(i / 4) * 64 + 4 * r + i % 4] = qs[i];
            memcpy(dst + 256 + 2 * r, src, 2);
            if (qtype == Q4_1) memcpy(dst + 288 + 2 * r, src + 2, 2);
        }
    }
    return 0;
}

/* The inverse of repack_gguf: the first N rows back as GGML blocks (for paths that read blocks as stored). */
int unrepack_gguf(const uint8_t *packed, int qtype, int64_t N, int64_t K, uint8_t *w) {
    if (!x16_type(qtype) || K % QK) return -1;
    const int64_t blocks = K / QK, bb = gguf_block_bytes(qtype), gb = x16_block_bytes(qtype);
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const int64_t g = n / XG, r = n % XG;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *src = packed + (g * blocks + b) * gb;
            uint8_t *dst = w + (n * blocks + b) * bb;
            if (qtype == Q8_0) {
                for (int i = 0; i < QK; i++) dst[2 + i] = (uint8_t)(src[(i / 4) * 64 + 4 * r + i % 4] ^ 0x80);
                memcpy(dst, src + 512 + 2 * r, 2);
                continue;
            }
            uint8_t *qs = dst + (qtype == Q4_0 ? 2 : 4);
            for (int i = 0; i < 16; i++) qs[i] = src[(i / 4) * 64 + 4 * r + i % 4];
            memcpy(dst, src + 256 + 2 * r, 2);
            if (qtype == Q4_1) memcpy(dst + 2, src + 288 + 2 * r, 2);
        }
    }
    return 0;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
typedef struct {
    int64_t M, K, N;
    const uint8_t *w; /* x16 layout */
    const int8_t *xq; /* [M, K] */
    const float *dx, *sx; /* [M, K / 32] */
    const float *bias;
    const void *residual;
    int64_t ldr;
    void *out;
    int64_t ldo;
    int bf16;
} X16Gemm;

/* rows [row0, row0 + rows) of x against weight group g: 16 outputs per row, each summed over the
 * blocks in order, whatever the tile */
static inline __attribute__((always_inline)) void x16_tile(const X16Gemm *g, int64_t row0, const int rows, int64_t grp,
                                                           const int qtype) {
    const int64_t blocks = g->K / QK, gb = x16_block_bytes(qtype);
    const uint8_t *wg = g->w + grp * blocks * gb;
    __m512 acc[XMR];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *blk = wg + b * gb;
        _mm_prefetch((const char *)blk + 8 * gb, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * gb + 64, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * gb + 128, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * gb + 192, _MM_HINT_T0);
        _mm_prefetch((const char *)blk + 8 * gb + 256, _MM_HINT_T0);
        if (qtype == Q8_0) {
            _mm_prefetch((const char *)blk + 8 * gb + 320, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 8 * gb + 384, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 8 * gb + 448, _MM_HINT_T0);
            _mm_prefetch((const char *)blk + 8 * gb + 512, _MM_HINT_T0);
        }
        __m512i wq[8];
        __m512 d, c;
        if (qtype == Q8_0) {
            for (int s = 0; s < 8; s++) wq[s] = _mm512_loadu_si512(blk + 64 * s);
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 512)));
            c = _mm512_mul_ps(d, _mm512_set1_ps(-128.0f));
        } else {
            const __m512i mask = _mm512_set1_epi8(0x0F);
            for (int s = 0; s < 4; s++) {
                const __m512i v = _mm512_loadu_si512(blk + 64 * s);
                wq[s] = _mm512_and_si512(v, mask);
                wq[s + 4] = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 256)));
            c = qtype == Q4_1 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(blk + 288)))
                              : _mm512_mul_ps(d, _mm512_set1_ps(-8.0f));
        }
        for (int r = 0; r < rows; r++) {
            const int64_t row = row0 + r;
            int32_t xb[8]; /* x's 32 values, 4 per broadcast */
            memcpy(xb, g->xq + row * g->K + b * QK, sizeof xb);
            __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[0], _mm512_set1_epi32(xb[0]));
            __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq[4], _mm512_set1_epi32(xb[4]));
            for (int s = 1; s < 4; s++) {
                lo = _mm512_dpbusd_epi32(lo, wq[s], _mm512_set1_epi32(xb[s]));
                hi = _mm512_dpbusd_epi32(hi, wq[s + 4], _mm512_set1_epi32(xb[s + 4]));
            }
            const __m512 dot = _mm512_cvtepi32_ps(_mm512_add_epi32(lo, hi));
            const float dx = g->dx[row * blocks + b], sx = g->sx[row * blocks + b];
            acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(d, _mm512_set1_ps(dx)), acc[r]);
            acc[r] = _mm512_fmadd_ps(c, _mm512_set1_ps(sx), acc[r]);
        }
    }
    const int64_t col = grp * XG, left = g->N - col;
    const __mmask16 live = left >= XG ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
    const __m512 bias = g->bias ? _mm512_maskz_loadu_ps(live, g->bias + col) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        const int64_t row = row0 + r;
        __m512 y = _mm512_add_ps(acc[r], bias);
        if (g->bf16) {
            if (g->residual) {
                const __m256i res = _mm256_maskz_loadu_epi16(live, (const uint16_t *)g->residual + row * g->ldr + col);
                y = _mm512_add_ps(y, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(res), 16)));
            }
            const __m512i bits = _mm512_castps_si512(y);
            const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                    _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1)))), 16);
            _mm256_mask_storeu_epi16((uint16_t *)g->out + row * g->ldo + col, live, _mm512_cvtepi32_epi16(rounded));
        } else {
            if (g->residual) y = _mm512_add_ps(y, _mm512_maskz_loadu_ps(live, (const float *)g->residual + row * g->ldr + col));
            _mm512_mask_storeu_ps((float *)g->out + row * g->ldo + col, live, y);
        }
    }
}

static inline __attribute__((always_inline)) void x16_item(const X16Gemm *g, int64_t r0, int64_t r1, int64_t grp,
                                                           const int qtype) {
    for (int64_t row = r0; row < r1; row += XMR) {
        switch (r1 - row < XMR ? r1 - row : XMR) {
            case 6: x16_tile(g, row, 6, grp, qtype); break;
            case 5: x16_tile(g, row, 5, grp, qtype); break;
            case 4: x16_tile(g, row, 4, grp, qtype); break;
            case 3: x16_tile(g, row, 3, grp, qtype); break;
            case 2: x16_tile(g, row, 2, grp, qtype); break;
            default: x16_tile(g, row, 1, grp, qtype); break;
        }
    }
}

static void run_x16(const X16Gemm *g, int qtype) {
    const int64_t groups = (g->N + XG - 1) / XG, chunks = (g->M + XMC - 1) / XMC, items = chunks * groups;
#pragma omp parallel for schedule(static) if (g->M * g->N * g->K >= (1 << 16))
    for (int64_t item = 0; item < items; item++) {
        const int64_t chunk = item / groups, grp = item % groups;
        const int64_t r0 = chunk * XMC, r1 = r0 + XMC < g->M ? r0 + XMC : g->M;
        switch (qtype) {
            case Q4_0: x16_item(g, r0, r1, grp, Q4_0); break;
            case Q4_1: x16_item(g, r0, r1, grp, Q4_1); break;
            default: x16_item(g, r0, r1, grp, Q8_0); break;
        }
    }
}
#endif

/* linear_gguf's product with W repacked by repack_gguf. -1: not served here. */
int linear_gguf_x16(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, const uint8_t *w, int qtype, int64_t N,
                    const float *bias, const void *residual, int64_t ldr, void *out, int64_t ldo) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
    if (!x16_type(qtype) || K % QK) return -1;
    Activations a;
    if (quantize_activations(x, M, K, ldx, bf16, K, 0, &a)) return -2;
    X16Gemm g = {M, K, N, w, a.xq, a.dx, a.sx, bias, residual, ldr, out, ldo, bf16};
    run_x16(&g, qtype);
    release_activations(&a);
    return 0;
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)bf16; (void)w; (void)qtype; (void)N; (void)bias; (void)residual;
    (void)ldr; (void)out; (void)ldo;
    return -1;
#endif
}

/* rows ids [n] of a weight in the x16 layout, dequantized (d * q + m) -> out [n, K] (bf16 or float32):
 * an embedding that shares its blocks with a tied lm_head */
int gguf_x16_rows(const uint8_t *w, int qtype, int64_t N, int64_t K, const int64_t *ids, int64_t n, void *out,
                  int bf16) {
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
    if (!x16_type(qtype) || K % QK) return -1;
    const int64_t blocks = K / QK, gb = x16_block_bytes(qtype);
    for (int64_t t = 0; t < n; t++) {
        if (ids[t] < 0 || ids[t] >= N) return -3;
        const int64_t g = ids[t] / XG, r = ids[t] % XG;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *blk = w + (g * blocks + b) * gb;
            for (int i = 0; i < QK; i++) {
                float v;
                if (qtype == Q8_0) {
                    const int q = (int)blk[(i / 4) * 64 + 4 * r + i % 4] - 128;
                    v = half_at(blk + 512 + 2 * r) * (float)q;
                } else {
                    const uint8_t byte = blk[((i % 16) / 4) * 64 + 4 * r + i % 4];
                    const int q = i < 16 ? byte & 0xF : byte >> 4;
                    const float d = half_at(blk + 256 + 2 * r);
                    v = qtype == Q4_1 ? d * (float)q + half_at(blk + 288 + 2 * r) : d * (float)(q - 8);
                }
                const int64_t at = t * K + b * QK + i;
                if (bf16) {
                    uint32_t bits;
                    memcpy(&bits, &v, 4);
                    ((uint16_t *)out)[at] = (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
                } else {
                    ((float *)out)[at] = v;
                }
            }
        }
    }
    return 0;
#else
    (void)w; (void)qtype; (void)N; (void)K; (void)ids; (void)n; (void)out; (void)bf16;
    return -1;
#endif
}

/* The machine's int8 peak, for benchmarks: every thread runs 16 independent vpdpbusd chains in
 * registers for `iters` rounds. Returns the integer ops done (2 per multiply-add), or -1 without VNNI. */
double vnni_peak_ops(int64_t iters) {
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
    double total = 0.0;
#pragma omp parallel reduction(+ : total)
    {
        __m512i acc[16];
        const __m512i a = _mm512_set1_epi8(1), b = _mm512_set1_epi8((char)omp_get_thread_num());
        for (int i = 0; i < 16; i++) acc[i] = _mm512_set1_epi32(i);
        for (int64_t it = 0; it < iters; it++)
            for (int i = 0; i < 16; i++) acc[i] = _mm512_dpbusd_epi32(acc[i], a, b);
        int32_t sink = 0;
        for (int i = 0; i < 16; i++) sink += _mm512_reduce_add_epi32(acc[i]);
        total += 2.0 * 64 * 16 * (double)iters + (sink == 42 ? 1e-9 : 0.0); /* keeps the loop */
    }
    return total;
#else
    (void)iters;
    return -1.0;
#endif
}
