/*
 * Paged attention on CPU (the native backend, sluice/layers/attention/native.py), one query row at a time: a decode token, or one token of a prompt
 * (its row then sees the keys up to its own position: seq_lens is per row). A windowed layer's row
 * sees only its last `window` keys, and reads only the blocks that hold them; a soft cap turns
 * each scaled score s into cap * tanh(s / cap) before the softmax (Gemma 2).
 *
 * Reads each sequence's K/V straight out of the paged cache, block by block, with an
 * online softmax, so nothing is gathered or copied. Work is split across threads by
 * sequence; one pass over a sequence serves all its query heads (GQA without expansion).
 *
 * Cache layout per layer and block (the native backend's; the portable one keeps token order):
 *   K: [num_kv_heads, head_dim / 2, block_size, 2]  pairs of dims, keys along the row,
 *      so one 64-byte load holds 16 keys x 2 dims: exactly the operand of the bf16
 *      dot-product instruction, and scores of 16 keys need no horizontal reductions.
 *   V: [num_kv_heads, block_size / 2, head_dim, 2]  pairs of keys, dims along the row,
 *      so one load holds 16 dims x 2 keys for the same instruction with (p_j, p_j+1).
 * Also the KV write in that layout, and the fused rotary + KV write of a step's q/k/v.
 * bf16 or f32. A compact cache (int8 or fp8 e4m3 bytes, sluice/quantization/kv_cache.py) keeps
 * token order instead, each (token, kv head) row followed by its bf16 scale: see kv8_scores /
 * kv8_values (vector passes, CPUs with AVX-512 BF16) and attend_seq_kv8 (portable).
 * Built by sluice/layers/native.py with the system C compiler and called through ctypes, which
 * releases the GIL. Threads come from OpenMP: the libgomp PyTorch loaded.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define MAX_HEAD_DIM 256
#define MAX_HEADS 64
#define MAX_BLOCK 256
#define MAX_THREADS 64
/* Blocks sit anywhere in the pool, so hardware prefetchers can't follow them. While a thread
 * computes one row, it fetches the next row's blocks into L2 a few lines at a time, so the
 * memory traffic of a row overlaps the arithmetic of the one before. Beyond this many blocks
 * a row's K/V would no longer fit in L2 beside the current row's (16 x 48 KB for SmolLM2). */
#define MAX_BLOCKS_AHEAD 16

typedef struct {
    const void *q;              /* [num_seqs, num_heads, head_dim] */
    const void *k_cache;
    const void *v_cache;
    const int64_t *block_table; /* [num_seqs, table_width] */
    const int64_t *seq_lens;    /* keys per sequence, including the new token */
    void *out;                  /* [num_seqs, num_heads, head_dim] */
    int64_t num_heads, num_kv_heads, head_dim, block_size, table_width;
    int64_t window;             /* keys a row sees, counting its own; 0: all */
    float scale, soft_cap;      /* soft_cap 0: none */
    int is_bf16;                /* q and out; the cache too unless kv_kind says otherwise */
    int kv_kind;                /* KV_MODEL_DTYPE, KV_INT8 or KV_FP8 */
    int64_t seq_begin, seq_end;
} Job;

#define KV_MODEL_DTYPE 0
#define KV_INT8 1
#define KV_FP8 2

static inline float bf16_to_f32(uint16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    u += 0x7FFFu + ((u >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(u >> 16);
}

static inline float load_elem(const void *base, int64_t index, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)base)[index]) : ((const float *)base)[index];
}

/* Offset of K[token `off` of a block][kv head][dim d] from the block's start. */
static inline int64_t k_offset(int64_t hkv, int64_t d, int64_t off, int64_t D, int64_t bs) {
    return ((hkv * (D / 2) + d / 2) * bs + off) * 2 + (d & 1);
}

/* Offset of V[token `off` of a block][kv head][dim d] from the block's start. */
static inline int64_t v_offset(int64_t hkv, int64_t d, int64_t off, int64_t D, int64_t bs) {
    return ((hkv * (bs / 2) + off / 2) * D + d) * 2 + (off & 1);
}

/* The first key a row sees: the start of its window (0 without one). */
static inline int64_t first_key(const Job *job, int64_t seq) {
    const int64_t len = job->seq_lens[seq];
    return job->window > 0 && len > job->window ? len - job->window : 0;
}

/* Keys from the start of the block holding the first key to the row's own: the span a row's
 * scratch covers, so scratch positions keep the blocks' pairing of keys. */
static inline int64_t row_span(const Job *job, int64_t seq) {
    return job->seq_lens[seq] - first_key(job, seq) / job->block_size * job->block_size;
}

/* Portable path: any dtype/head_dim, one key at a time. */
static void attend_seq_generic(const Job *job, int64_t seq) {
    const int64_t H = job->num_heads, hkv_count = job->num_kv_heads, D = job->head_dim, bs = job->block_size;
    const int64_t G = H / hkv_count, len = job->seq_lens[seq];
    const int64_t block_elems = bs * hkv_count * D;
    const int64_t *table = job->block_table + seq * job->table_width;
    static __thread float q[MAX_HEADS][MAX_HEAD_DIM], acc[MAX_HEADS][MAX_HEAD_DIM];
    float m[MAX_HEADS], l[MAX_HEADS];
    for (int64_t h = 0; h < H; h++) {
        for (int64_t d = 0; d < D; d++) {
            q[h][d] = load_elem(job->q, (seq * H + h) * D + d, job->is_bf16) * job->scale;
            acc[h][d] = 0.0f;
        }
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int64_t pos = first_key(job, seq); pos < len; pos++) {
        const int64_t block = table[pos / bs], off = pos % bs;
        const int64_t base = block * block_elems;
        for (int64_t h = 0; h < H; h++) {
            const int64_t hkv = h / G;
            float score = 0.0f;
            for (int64_t d = 0; d < D; d++)
                score += q[h][d] * load_elem(job->k_cache, base + k_offset(hkv, d, off, D, bs), job->is_bf16);
            if (job->soft_cap > 0.0f) score = job->soft_cap * tanhf(score / job->soft_cap);
            const float new_max = score > m[h] ? score : m[h];
            const float correction = expf(m[h] - new_max), p = expf(score - new_max);
            l[h] = l[h] * correction + p;
            m[h] = new_max;
            for (int64_t d = 0; d < D; d++)
                acc[h][d] = acc[h][d] * correction +
                            p * load_elem(job->v_cache, base + v_offset(hkv, d, off, D, bs), job->is_bf16);
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int64_t d = 0; d < D; d++) {
            const int64_t index = (seq * H + h) * D + d;
            if (job->is_bf16)
                ((uint16_t *)job->out)[index] = f32_to_bf16(acc[h][d] * inv);
            else
                ((float *)job->out)[index] = acc[h][d] * inv;
        }
    }
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "bf16_simd.h"
#define HAVE_BF16_FAST_PATH 1

/* Scratch of one thread: scores [H][padded] floats, then probabilities [H][padded] bf16, for the
 * keys of a row's span (see row_span): position i is key i of the span's first block on. */
typedef struct {
    float *scores;
    uint16_t *probs;
    int64_t padded;
} Scratch;

/* The next row's K and V blocks still to fetch into L2, and where the walk over their lines
 * (all K lines, then all V lines) has got to. */
typedef struct {
    const char *caches[2]; /* K, V */
    int64_t offsets[MAX_BLOCKS_AHEAD]; /* bytes from the start of either cache */
    int64_t count, block_lines, per_call;
    int64_t cache, block, line; /* the walk */
} Prefetcher;

/* Queue the blocks of row `next` that row `seq` does not read itself (a prompt's rows share
 * theirs; seq < 0: none), to be fetched over `calls` calls of prefetch_some. */
static void plan_prefetch(Prefetcher *pf, const Job *job, int64_t seq, int64_t next, int64_t calls) {
    const int64_t bs = job->block_size, block_bytes = bs * job->num_kv_heads * job->head_dim * 2;
    const int64_t *table = job->block_table + (seq < 0 ? 0 : seq) * job->table_width;
    const int64_t *next_table = job->block_table + next * job->table_width;
    const int64_t lo = seq < 0 ? 0 : first_key(job, seq) / bs, hi = seq < 0 ? 0 : (job->seq_lens[seq] + bs - 1) / bs;
    const int64_t next_blocks = (job->seq_lens[next] + bs - 1) / bs;
    pf->caches[0] = (const char *)job->k_cache;
    pf->caches[1] = (const char *)job->v_cache;
    pf->count = 0;
    for (int64_t b = first_key(job, next) / bs; b < next_blocks && pf->count < MAX_BLOCKS_AHEAD; b++)
        if (b < lo || b >= hi || next_table[b] != table[b]) pf->offsets[pf->count++] = next_table[b] * block_bytes;
    pf->block_lines = block_bytes / 64;
    pf->per_call = (2 * pf->count * pf->block_lines + calls - 1) / calls;
    pf->cache = pf->block = pf->line = 0;
}

static inline void prefetch_some(Prefetcher *pf) {
    for (int64_t i = 0; i < pf->per_call; i++) {
        if (pf->block >= pf->count) {
            if (pf->cache == 1 || pf->count == 0) return;
            pf->cache = 1;
            pf->block = 0;
        }
        _mm_prefetch(pf->caches[pf->cache] + pf->offsets[pf->block] + pf->line * 64, _MM_HINT_T1);
        if (++pf->line == pf->block_lines) {
            pf->line = 0;
            pf->block++;
        }
    }
}

/* tanh(x) = 1 - 2 / (exp(2x) + 1), x clamped where tanh is +-1 in float */
static inline __m512 tanh512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-10.0f)), _mm512_set1_ps(10.0f));
    const __m512 e = exp512(_mm512_add_ps(x, x)), one = _mm512_set1_ps(1.0f);
    return _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
}

/* Pass 1: scaled (and capped) scores of the row's keys for the G heads of one kv head; returns
 * their maxima. Two accumulators per head (even and odd dim pairs) keep 2G dot-product chains
 * in flight. */
static inline __attribute__((always_inline)) void score_keys(const Job *job, int64_t seq, int64_t hkv,
                                                            const Scratch *sc, Prefetcher *pf, float *max_out,
                                                            const int64_t G, const int64_t D) {
    const int64_t H = job->num_heads, bs = job->block_size;
    const int64_t len = job->seq_lens[seq], first = first_key(job, seq), base = first / bs * bs;
    const int64_t block_elems = bs * job->num_kv_heads * D;
    const uint16_t *kc = (const uint16_t *)job->k_cache;
    const uint32_t *qpairs = (const uint32_t *)((const uint16_t *)job->q + seq * H * D) + hkv * G * (D / 2);
    const int64_t *table = job->block_table + seq * job->table_width;
    const __m512 scale = _mm512_set1_ps(job->scale), cap = _mm512_set1_ps(job->soft_cap);
    const __m512 inv_cap = _mm512_set1_ps(job->soft_cap > 0.0f ? 1.0f / job->soft_cap : 0.0f);
    __m512 maxv[MAX_HEADS];
    for (int64_t g = 0; g < G; g++) maxv[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t start = first, n = 0; start < len; start += n) {
        const int64_t in_block = start % bs;
        n = len - start < 16 ? len - start : 16;
        if (n > bs - in_block) n = bs - in_block;
        const uint16_t *kpairs = kc + table[start / bs] * block_elems + (hkv * (D / 2) * bs + in_block) * 2;
        prefetch_some(pf);
        const __mmask32 pair_mask = (__mmask32)(n == 16 ? 0xFFFFFFFFu : ((1u << (2 * n)) - 1u));
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        __m512 even[MAX_HEADS], odd[MAX_HEADS];
        for (int64_t g = 0; g < G; g++) even[g] = odd[g] = _mm512_setzero_ps();
        for (int64_t i = 0; i < D / 2; i += 2) {
            /* 16 keys x dims (2i, 2i+1), then x dims (2i+2, 2i+3) */
            const __m512bh k0 = (__m512bh)_mm512_maskz_loadu_epi16(pair_mask, kpairs + i * bs * 2);
            const __m512bh k1 = (__m512bh)_mm512_maskz_loadu_epi16(pair_mask, kpairs + (i + 1) * bs * 2);
            for (int64_t g = 0; g < G; g++) {
                even[g] = _mm512_dpbf16_ps(even[g], (__m512bh)_mm512_set1_epi32((int)qpairs[g * (D / 2) + i]), k0);
                odd[g] = _mm512_dpbf16_ps(odd[g], (__m512bh)_mm512_set1_epi32((int)qpairs[g * (D / 2) + i + 1]), k1);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            __m512 s = _mm512_mul_ps(_mm512_add_ps(even[g], odd[g]), scale);
            if (job->soft_cap > 0.0f) s = _mm512_mul_ps(tanh512(_mm512_mul_ps(s, inv_cap)), cap);
            _mm512_mask_storeu_ps(sc->scores + (hkv * G + g) * sc->padded + start - base, live, s);
            maxv[g] = _mm512_mask_max_ps(maxv[g], live, maxv[g], s);
        }
    }
    for (int64_t g = 0; g < G; g++) max_out[g] = _mm512_reduce_max_ps(maxv[g]);
}

/* Pass 2: unnormalised probabilities exp(s - max) of scratch positions lo..hi-1 as bf16 (zero
 * before lo and past hi); returns their sum. */
static float softmax_head(const Scratch *sc, int64_t h, int64_t lo, int64_t hi, float max) {
    const float *s = sc->scores + h * sc->padded;
    uint16_t *p = sc->probs + h * sc->padded;
    const __m512 m = _mm512_set1_ps(max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t pos = 0; pos < hi; pos += 16) {
        const uint32_t upto = hi - pos >= 16 ? 0xFFFFu : (1u << (hi - pos)) - 1u;
        const uint32_t before = lo <= pos ? 0u : lo - pos >= 16 ? 0xFFFFu : (1u << (lo - pos)) - 1u;
        const __mmask16 live = (__mmask16)(upto & ~before);
        const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + pos), m)));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(p + pos), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return _mm512_reduce_add_ps(sum);
}

/* Pass 3: probability-weighted sum of V for the G heads of one kv head, written as bf16.
 * V pairs keys (2j, 2j+1), so one instruction takes the matching pair of probabilities. */
static inline __attribute__((always_inline)) void weigh_values(const Job *job, int64_t seq, int64_t hkv,
                                                              const Scratch *sc, Prefetcher *pf, const float *sums,
                                                              const int64_t G, const int64_t D) {
    const int64_t H = job->num_heads, bs = job->block_size;
    const int64_t len = job->seq_lens[seq], DV = D / 16, first_block = first_key(job, seq) / bs;
    const int64_t block_elems = bs * job->num_kv_heads * D;
    const uint16_t *vc = (const uint16_t *)job->v_cache;
    const int64_t *table = job->block_table + seq * job->table_width;
    __m512 acc[MAX_HEADS][MAX_HEAD_DIM / 16];
    for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < DV; v++) acc[g][v] = _mm512_setzero_ps();
    for (int64_t b = first_block; b * bs < len; b++) {
        const int64_t keys = len - b * bs < bs ? len - b * bs : bs;
        const uint16_t *vpairs = vc + table[b] * block_elems + hkv * (bs / 2) * D * 2;
        for (int64_t j = 0; j < (keys + 1) / 2; j++) {
            if (j % 8 == 0) prefetch_some(pf);
            __m512bh vals[MAX_HEAD_DIM / 16];
            for (int64_t v = 0; v < DV; v++) vals[v] = (__m512bh)_mm512_loadu_si512(vpairs + (j * D + 16 * v) * 2);
            for (int64_t g = 0; g < G; g++) {
                const uint32_t *probs = (const uint32_t *)(sc->probs + (hkv * G + g) * sc->padded);
                const __m512bh pp = (__m512bh)_mm512_set1_epi32((int)probs[(b - first_block) * (bs / 2) + j]);
                for (int64_t v = 0; v < DV; v++) acc[g][v] = _mm512_dpbf16_ps(acc[g][v], pp, vals[v]);
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t h = hkv * G + g;
        const __m512 inv = _mm512_set1_ps(sums[h] > 0.0f ? 1.0f / sums[h] : 0.0f);
        uint16_t *dst = (uint16_t *)job->out + (seq * H + h) * D;
        for (int64_t v = 0; v < DV; v++)
            _mm256_storeu_si256((__m256i *)(dst + 16 * v), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(acc[g][v], inv)));
    }
}

/* bf16 caches, head_dim a multiple of 32. Exact softmax in three passes (scores, softmax,
 * weighted values) through a scratch buffer: one max per head instead of an online rescale
 * per chunk, and every inner loop keeps its accumulators in registers. */
static inline __attribute__((always_inline)) void attend_seq_shape(const Job *job, int64_t seq, const Scratch *sc,
                                                                  Prefetcher *pf, const int64_t G, const int64_t D) {
    const int64_t H = job->num_heads, hkv_count = H / G;
    const int64_t span = row_span(job, seq), skipped = span - (job->seq_lens[seq] - first_key(job, seq));
    float maxima[MAX_HEADS], sums[MAX_HEADS];
    for (int64_t hkv = 0; hkv < hkv_count; hkv++) score_keys(job, seq, hkv, sc, pf, maxima + hkv * G, G, D);
    for (int64_t h = 0; h < H; h++) sums[h] = softmax_head(sc, h, skipped, span, maxima[h]);
    for (int64_t hkv = 0; hkv < hkv_count; hkv++) weigh_values(job, seq, hkv, sc, pf, sums, G, D);
}

/* Common shapes get their own copy with G and D known, so the compiler keeps every
 * accumulator in a register; other shapes run the same code with runtime sizes. */
static void attend_seq_bf16(const Job *job, int64_t seq, const Scratch *sc, Prefetcher *pf) {
    const int64_t G = job->num_heads / job->num_kv_heads, D = job->head_dim;
#define SHAPE(g, d) if (G == g && D == d) { attend_seq_shape(job, seq, sc, pf, g, d); return; }
    SHAPE(1, 64) SHAPE(2, 64) SHAPE(3, 64) SHAPE(4, 64) SHAPE(8, 64)
    SHAPE(1, 128) SHAPE(2, 128) SHAPE(4, 128) SHAPE(5, 128) SHAPE(6, 128) SHAPE(7, 128) SHAPE(8, 128)
#undef SHAPE
    attend_seq_shape(job, seq, sc, pf, G, D);
}

#else
#define HAVE_BF16_FAST_PATH 0
#endif

/* ---- A compact cache: per block, [block_size][num_kv_heads] rows of head_dim bytes (int8, or
 * fp8 e4m3) each followed by its bf16 scale; an element is its byte's value times the scale. */

static float fp8_values[256]; /* every fp8 e4m3 byte's value, for the portable path */

static void fill_fp8_values(void) {
    for (int b = 0; b < 256; b++) {
        const int e = (b >> 3) & 15, m = b & 7;
        const float magnitude = e ? ldexpf(1.0f + m / 8.0f, e - 7) : ldexpf((float)m, -9);
        fp8_values[b] = b & 0x80 ? -magnitude : magnitude;
    }
}

/* One row of bytes -> D floats (without its scale). */
static inline void dequant_row(const uint8_t *src, int kind, int64_t D, float *dst) {
#if defined(__AVX512F__)
    if (D % 16 == 0) {
        for (int64_t d = 0; d < D; d += 16) {
            const __m128i bytes = _mm_loadu_si128((const __m128i *)(src + d));
            if (kind == KV_INT8) {
                _mm512_storeu_ps(dst + d, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes)));
            } else {
                /* e4m3's sign, exponent and mantissa moved into a half's fields give value / 2^8,
                 * exactly (subnormals too): widen, shift, convert, scale */
                const __m256i b = _mm256_cvtepu8_epi16(bytes);
                const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8);
                const __m256i rest = _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7F)), 7);
                const __m512 half = _mm512_cvtph_ps(_mm256_or_si256(sign, rest));
                _mm512_storeu_ps(dst + d, _mm512_mul_ps(half, _mm512_set1_ps(256.0f)));
            }
        }
        return;
    }
#endif
    if (kind == KV_INT8)
        for (int64_t d = 0; d < D; d++) dst[d] = (float)(int8_t)src[d];
    else
        for (int64_t d = 0; d < D; d++) dst[d] = fp8_values[src[d]];
}

static inline float row_scale(const uint8_t *row, int64_t D) {
    uint16_t bits;
    memcpy(&bits, row + D, sizeof bits);
    return bf16_to_f32(bits);
}

#if HAVE_BF16_FAST_PATH
/*
 * The compact cache's vector path: exact softmax in three passes, as the bf16 path does. A row's
 * bytes become floats in registers (int8: one widening convert; fp8 e4m3: its fields moved into a
 * half's, which is the value / 256 exactly) and its scale is applied once per key, to the dot
 * product or to the probability, never to the elements. Scores of 16 keys are reduced together
 * (sum16) into one vector, so the softmax pass and the masks work 16 keys at a time.
 */
#define KV8_MAX_G 16

static inline __m512 kv8_load16(const uint8_t *src, const int kind) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)src);
    if (kind == KV_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(bytes));
    const __m256i z = _mm256_slli_epi16(_mm256_cvtepu8_epi16(bytes), 7); /* as kv8_load32 */
    return _mm512_cvtph_ps(_mm256_add_epi16(z, _mm256_and_si256(z, _mm256_set1_epi16(0x4000))));
}

/* 32 bytes -> two vectors of 16 floats: for fp8, one widening and one pass of the field moves
 * over 32 elements at once. */
static inline void kv8_load32(const uint8_t *src, const int kind, __m512 *lo, __m512 *hi) {
    if (kind == KV_INT8) {
        *lo = kv8_load16(src, kind);
        *hi = kv8_load16(src + 16, kind);
        return;
    }
    const __m512i b = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)src));
    /* b << 7 puts exponent and mantissa in place and the sign one bit low: adding that bit to
     * itself moves it up */
    const __m512i z = _mm512_slli_epi16(b, 7);
    const __m512i half = _mm512_add_epi16(z, _mm512_and_si512(z, _mm512_set1_epi16(0x4000)));
    *lo = _mm512_cvtph_ps(_mm512_castsi512_si256(half));
    *hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(half, 1));
}

/* A row of D bytes (D a multiple of 16) -> D / 16 vectors. */
static inline __attribute__((always_inline)) void kv8_load_row(const uint8_t *src, const int64_t D, const int kind,
                                                              __m512 *out) {
    int64_t v = 0;
    for (; v + 2 <= D / 16; v += 2) kv8_load32(src + 16 * v, kind, &out[v], &out[v + 1]);
    if (v < D / 16) out[v] = kv8_load16(src + 16 * v, kind);
}

/* A row's scale, with fp8's factor 256 folded in. */
static inline float kv8_scale(const uint8_t *row, int64_t D, const int kind) {
    return row_scale(row, D) * (kind == KV_FP8 ? 256.0f : 1.0f);
}

/* r[i] = the sum of v[i]'s 16 lanes: pairs within 128-bit lanes, then across them. */
static inline __m512 sum16(const __m512 *v) {
    __m512 t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        const __m512d a = _mm512_castps_pd(t[2 * i]), b = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    for (int i = 0; i < 2; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

/* Fetch block b of a row's table (if it has one) into L2 while the block before it is read. */
static inline void kv8_prefetch(const uint8_t *cache, const int64_t *table, int64_t b, int64_t blocks,
                                int64_t block_bytes) {
    if (b >= blocks) return;
    const char *p = (const char *)cache + table[b] * block_bytes;
    for (int64_t line = 0; line < block_bytes; line += 64) _mm_prefetch(p + line, _MM_HINT_T1);
}

/* Pass 1 for the G heads of kv head hkv: scores[h][i] of key first + i, scaled and capped; their maxima. */
static inline __attribute__((always_inline)) void kv8_scores(const Job *job, int64_t seq, int64_t hkv, const float *q,
                                                            float *scores, int64_t padded, float *max_out,
                                                            const int64_t G, const int64_t D, const int kind) {
    const int64_t Hkv = job->num_kv_heads, bs = job->block_size, row = D + 2, block_bytes = bs * Hkv * row;
    const int64_t len = job->seq_lens[seq], first = first_key(job, seq), blocks = (len + bs - 1) / bs;
    const int64_t *table = job->block_table + seq * job->table_width;
    const uint8_t *kc = (const uint8_t *)job->k_cache;
    const __m512 cap = _mm512_set1_ps(job->soft_cap);
    const __m512 inv_cap = _mm512_set1_ps(job->soft_cap > 0.0f ? 1.0f / job->soft_cap : 0.0f);
    __m512 qv[KV8_MAX_G][MAX_HEAD_DIM / 16], maxv[KV8_MAX_G];
    for (int64_t g = 0; g < G; g++) {
        maxv[g] = _mm512_set1_ps(-INFINITY);
        for (int64_t v = 0; v < D / 16; v++) qv[g][v] = _mm512_loadu_ps(q + (hkv * G + g) * D + 16 * v);
    }
    int64_t b = first / bs, off = first % bs; /* the next key's block and place in it */
    if (hkv == 0) kv8_prefetch(kc, table, b + 1, blocks, block_bytes);
    for (int64_t start = first; start < len; start += 16) {
        const int64_t n = len - start < 16 ? len - start : 16;
        __m512 part[KV8_MAX_G][16];
        float ks[16];
        for (int64_t j = 0; j < 16; j++) {
            if (j >= n) {
                ks[j] = 0.0f;
                for (int64_t g = 0; g < G; g++) part[g][j] = _mm512_setzero_ps();
                continue;
            }
            const uint8_t *krow = kc + table[b] * block_bytes + (off * Hkv + hkv) * row;
            if (++off == bs) {
                off = 0;
                b++;
                if (hkv == 0) kv8_prefetch(kc, table, b + 1, blocks, block_bytes);
            }
            __m512 k[MAX_HEAD_DIM / 16];
            kv8_load_row(krow, D, kind, k);
            ks[j] = kv8_scale(krow, D, kind);
            for (int64_t g = 0; g < G; g++) {
                __m512 acc = _mm512_mul_ps(qv[g][0], k[0]);
                for (int64_t v = 1; v < D / 16; v++) acc = _mm512_fmadd_ps(qv[g][v], k[v], acc);
                part[g][j] = acc;
            }
        }
        const __m512 kscale = _mm512_loadu_ps(ks);
        const __mmask16 live = (__mmask16)(n == 16 ? 0xFFFFu : (1u << n) - 1u);
        for (int64_t g = 0; g < G; g++) {
            __m512 s = _mm512_mul_ps(sum16(part[g]), kscale);
            if (job->soft_cap > 0.0f) s = _mm512_mul_ps(tanh512(_mm512_mul_ps(s, inv_cap)), cap);
            _mm512_mask_storeu_ps(scores + (hkv * G + g) * padded + start - first, live, s);
            maxv[g] = _mm512_mask_max_ps(maxv[g], live, maxv[g], s);
        }
    }
    for (int64_t g = 0; g < G; g++) max_out[g] = _mm512_reduce_max_ps(maxv[g]);
}

/* Pass 2: scores of one head -> exp(s - max) in place; returns their sum. */
static float kv8_softmax(float *s, int64_t n, float max) {
    const __m512 m = _mm512_set1_ps(max);
    __m512 sum = _mm512_setzero_ps();
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 live = (__mmask16)(n - i >= 16 ? 0xFFFFu : (1u << (n - i)) - 1u);
        const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(live, s + i), m));
        sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(live, e));
        _mm512_mask_storeu_ps(s + i, live, e);
    }
    return _mm512_reduce_add_ps(sum);
}

/* Pass 3 for the G heads of kv head hkv: the probability-weighted sum of V (each probability
 * times its row's scale), normalised, written in q's dtype. */
static inline __attribute__((always_inline)) void kv8_values(const Job *job, int64_t seq, int64_t hkv,
                                                            const float *probs, int64_t padded, const float *sums,
                                                            const int64_t G, const int64_t D, const int kind) {
    const int64_t H = job->num_heads, Hkv = job->num_kv_heads, bs = job->block_size, row = D + 2;
    const int64_t block_bytes = bs * Hkv * row, len = job->seq_lens[seq], first = first_key(job, seq);
    const int64_t blocks = (len + bs - 1) / bs, *table = job->block_table + seq * job->table_width;
    const uint8_t *vc = (const uint8_t *)job->v_cache;
    __m512 acc[KV8_MAX_G][MAX_HEAD_DIM / 16];
    for (int64_t g = 0; g < G; g++)
        for (int64_t v = 0; v < D / 16; v++) acc[g][v] = _mm512_setzero_ps();
    int64_t b = first / bs, off = first % bs;
    if (hkv == 0) kv8_prefetch(vc, table, b + 1, blocks, block_bytes);
    for (int64_t pos = first; pos < len; pos++) {
        const uint8_t *vrow = vc + table[b] * block_bytes + (off * Hkv + hkv) * row;
        if (++off == bs) {
            off = 0;
            b++;
            if (hkv == 0) kv8_prefetch(vc, table, b + 1, blocks, block_bytes);
        }
        __m512 vals[MAX_HEAD_DIM / 16];
        kv8_load_row(vrow, D, kind, vals);
        const float vs = kv8_scale(vrow, D, kind);
        for (int64_t g = 0; g < G; g++) {
            const __m512 p = _mm512_set1_ps(probs[(hkv * G + g) * padded + pos - first] * vs);
            for (int64_t v = 0; v < D / 16; v++) acc[g][v] = _mm512_fmadd_ps(p, vals[v], acc[g][v]);
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const int64_t h = hkv * G + g;
        const __m512 inv = _mm512_set1_ps(sums[h] > 0.0f ? 1.0f / sums[h] : 0.0f);
        for (int64_t v = 0; v < D / 16; v++) {
            const __m512 y = _mm512_mul_ps(acc[g][v], inv);
            const int64_t at = (seq * H + h) * D + 16 * v;
            if (job->is_bf16) _mm256_storeu_si256((__m256i *)((uint16_t *)job->out + at), (__m256i)_mm512_cvtneps_pbh(y));
            else _mm512_storeu_ps((float *)job->out + at, y);
        }
    }
}

static inline __attribute__((always_inline)) void kv8_seq_shape(const Job *job, int64_t seq, float *q, float *scores,
                                                               int64_t padded, const int64_t G, const int64_t D,
                                                               const int kind) {
    const int64_t H = job->num_heads, hkv_count = H / G, keys = job->seq_lens[seq] - first_key(job, seq);
    for (int64_t i = 0; i < H * D; i++) q[i] = load_elem(job->q, seq * H * D + i, job->is_bf16) * job->scale;
    float maxima[MAX_HEADS], sums[MAX_HEADS];
    for (int64_t hkv = 0; hkv < hkv_count; hkv++)
        kv8_scores(job, seq, hkv, q, scores, padded, maxima + hkv * G, G, D, kind);
    for (int64_t h = 0; h < H; h++) sums[h] = kv8_softmax(scores + h * padded, keys, maxima[h]);
    for (int64_t hkv = 0; hkv < hkv_count; hkv++) kv8_values(job, seq, hkv, scores, padded, sums, G, D, kind);
}

/* Common shapes get their own copy, so the accumulators stay in registers. */
static void attend_seq_kv8_fast(const Job *job, int64_t seq, float *q, float *scores, int64_t padded) {
    const int64_t G = job->num_heads / job->num_kv_heads, D = job->head_dim;
    const int kind = job->kv_kind;
#define SHAPE(g, d)                                                                        \
    if (G == g && D == d) {                                                                \
        if (kind == KV_INT8) kv8_seq_shape(job, seq, q, scores, padded, g, d, KV_INT8);    \
        else kv8_seq_shape(job, seq, q, scores, padded, g, d, KV_FP8);                     \
        return;                                                                            \
    }
    SHAPE(1, 64) SHAPE(2, 64) SHAPE(3, 64) SHAPE(4, 64) SHAPE(1, 128) SHAPE(2, 128) SHAPE(4, 128) SHAPE(8, 128)
#undef SHAPE
    if (kind == KV_INT8) kv8_seq_shape(job, seq, q, scores, padded, G, D, KV_INT8);
    else kv8_seq_shape(job, seq, q, scores, padded, G, D, KV_FP8);
}

/* The rows of a job over a compact cache on the vector path; 0, or -1 where it can't serve them. */
static int run_job_kv8_fast(const Job *job) {
    const int64_t G = job->num_heads / job->num_kv_heads;
    if (job->head_dim % 16 || G > KV8_MAX_G) return -1;
    int64_t longest = 0;
    for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++) {
        const int64_t keys = job->seq_lens[seq] - first_key(job, seq);
        if (keys > longest) longest = keys;
    }
    const int64_t padded = (longest + 15) / 16 * 16;
    float *scores = (float *)aligned_alloc(64, (size_t)(job->num_heads * (padded > 0 ? padded : 16)) * sizeof(float));
    float *q = (float *)aligned_alloc(64, (size_t)(job->num_heads * job->head_dim) * sizeof(float));
    const int ok = scores != NULL && q != NULL;
    if (ok)
        for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++) attend_seq_kv8_fast(job, seq, q, scores, padded);
    free(scores);
    free(q);
    return ok ? 0 : -1;
}
#endif

/* One query row over a compact cache, portably (no AVX-512 BF16, or shapes the vector passes don't
 * take): each key's K and V rows dequantized and folded into an online softmax, one pass serving
 * the G query heads of a kv head. */
static void attend_seq_kv8(const Job *job, int64_t seq) {
    const int64_t H = job->num_heads, Hkv = job->num_kv_heads, D = job->head_dim, bs = job->block_size;
    const int64_t G = H / Hkv, len = job->seq_lens[seq], row = D + 2, block_bytes = bs * Hkv * row;
    const int64_t *table = job->block_table + seq * job->table_width;
    const uint8_t *kc = (const uint8_t *)job->k_cache, *vc = (const uint8_t *)job->v_cache;
    static __thread float q[MAX_HEADS][MAX_HEAD_DIM], acc[MAX_HEADS][MAX_HEAD_DIM];
    float m[MAX_HEADS], l[MAX_HEADS], kf[MAX_HEAD_DIM], vf[MAX_HEAD_DIM];
    for (int64_t h = 0; h < H; h++) {
        for (int64_t d = 0; d < D; d++) {
            q[h][d] = load_elem(job->q, (seq * H + h) * D + d, job->is_bf16) * job->scale;
            acc[h][d] = 0.0f;
        }
        m[h] = -1e30f; /* not -INFINITY: -ffast-math assumes none */
        l[h] = 0.0f;
    }
    for (int64_t pos = first_key(job, seq); pos < len; pos++) {
        const int64_t base = table[pos / bs] * block_bytes + (pos % bs) * Hkv * row;
        for (int64_t hkv = 0; hkv < Hkv; hkv++) {
            const uint8_t *krow = kc + base + hkv * row, *vrow = vc + base + hkv * row;
            dequant_row(krow, job->kv_kind, D, kf);
            dequant_row(vrow, job->kv_kind, D, vf);
            const float k_scale = row_scale(krow, D), v_scale = row_scale(vrow, D);
            for (int64_t h = hkv * G; h < (hkv + 1) * G; h++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += q[h][d] * kf[d];
                float score = dot * k_scale;
                if (job->soft_cap > 0.0f) score = job->soft_cap * tanhf(score / job->soft_cap);
                float correction = 1.0f;
                if (score > m[h]) {
                    correction = expf(m[h] - score);
                    m[h] = score;
                }
                const float p = expf(score - m[h]), pv = p * v_scale;
                l[h] = l[h] * correction + p;
                for (int64_t d = 0; d < D; d++) acc[h][d] = acc[h][d] * correction + pv * vf[d];
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        for (int64_t d = 0; d < D; d++) {
            const int64_t index = (seq * H + h) * D + d;
            if (job->is_bf16)
                ((uint16_t *)job->out)[index] = f32_to_bf16(acc[h][d] * inv);
            else
                ((float *)job->out)[index] = acc[h][d] * inv;
        }
    }
}

static void *run_job(void *arg) {
    Job *job = (Job *)arg;
    if (job->kv_kind != KV_MODEL_DTYPE) {
#if HAVE_BF16_FAST_PATH
        if (run_job_kv8_fast(job) == 0) return NULL;
#endif
        for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++) attend_seq_kv8(job, seq);
        return NULL;
    }
#if HAVE_BF16_FAST_PATH
    if (job->is_bf16 && job->head_dim % 32 == 0) {
        int64_t longest = 0;
        for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++)
            if (row_span(job, seq) > longest) longest = row_span(job, seq);
        Scratch sc = {NULL, NULL, (longest + 31) / 32 * 32};
        const size_t count = (size_t)(job->num_heads * sc.padded);
        sc.scores = (float *)aligned_alloc(64, count * sizeof(float));
        sc.probs = (uint16_t *)aligned_alloc(64, count * sizeof(uint16_t));
        if (sc.scores != NULL && sc.probs != NULL) {
            Prefetcher pf;
            plan_prefetch(&pf, job, -1, job->seq_begin, 1); /* nothing runs before the first row: */
            prefetch_some(&pf);                              /* fetch all of it now */
            for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++) {
                /* one prefetch_some per 16 keys per kv head, in the score pass and the value pass */
                const int64_t calls = 2 * job->num_kv_heads * ((row_span(job, seq) + 15) / 16);
                if (seq + 1 < job->seq_end) plan_prefetch(&pf, job, seq, seq + 1, calls);
                else pf.per_call = 0; /* the last row: nothing after it to fetch */
                attend_seq_bf16(job, seq, &sc, &pf);
            }
            free(sc.scores);
            free(sc.probs);
            return NULL;
        }
        free(sc.scores);
        free(sc.probs);
    }
#endif
    for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++) attend_seq_generic(job, seq);
    return NULL;
}

/* Splits the rows over threads and runs them: work grows with each row's keys (prefill rows see
 * 1..n keys), so by key count. */
static void run_jobs(const Job *job, int64_t num_seqs, int num_threads) {
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > num_seqs) num_threads = (int)(num_seqs > 0 ? num_seqs : 1);
    Job jobs[MAX_THREADS];
    int64_t total = 0;
    for (int64_t seq = 0; seq < num_seqs; seq++) total += row_span(job, seq) + 1;
    int64_t seq = 0, done = 0;
    for (int t = 0; t < num_threads; t++) {
        const int64_t begin = seq, target = total * (t + 1) / num_threads;
        while (seq < num_seqs && (t == num_threads - 1 || done + row_span(job, seq) + 1 <= target || seq == begin))
            done += row_span(job, seq++) + 1;
        jobs[t] = *job;
        jobs[t].seq_begin = begin;
        jobs[t].seq_end = seq;
    }
#pragma omp parallel for schedule(static, 1) num_threads(num_threads)
    for (int t = 0; t < num_threads; t++) run_job(&jobs[t]);
}

static int shape_ok(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t block_size) {
    return head_dim <= MAX_HEAD_DIM && head_dim % 2 == 0 && block_size <= MAX_BLOCK && num_heads <= MAX_HEADS &&
           num_heads % num_kv_heads == 0;
}

/* Returns 0 on success, -1 when a size exceeds the compiled limits (caller falls back). */
int paged_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_table, const int64_t *seq_lens, void *out,
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t table_width, int64_t window,
                           float scale, float soft_cap, int is_bf16, int num_threads) {
    if (!shape_ok(num_heads, num_kv_heads, head_dim, block_size)) return -1;
    const Job job = {q, k_cache, v_cache, block_table, seq_lens, out, num_heads, num_kv_heads, head_dim,
                     block_size, table_width, window > 0 ? window : 0, scale, soft_cap > 0.0f ? soft_cap : 0.0f,
                     is_bf16, KV_MODEL_DTYPE, 0, 0};
    run_jobs(&job, num_seqs, num_threads);
    return 0;
}

/* paged_attention over a compact cache (kv_kind KV_INT8 or KV_FP8); q and out bf16 or f32. */
int paged_attention_kv8(const void *q, const void *k_cache, const void *v_cache,
                        const int64_t *block_table, const int64_t *seq_lens, void *out,
                        int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                        int64_t head_dim, int64_t block_size, int64_t table_width, int64_t window,
                        float scale, float soft_cap, int is_bf16, int kv_kind, int num_threads) {
    if (!shape_ok(num_heads, num_kv_heads, head_dim, block_size) || (kv_kind != KV_INT8 && kv_kind != KV_FP8))
        return -1;
    if (kv_kind == KV_FP8 && fp8_values[0x38] == 0.0f) fill_fp8_values(); /* 0x38 is 1.0 */
    const Job job = {q, k_cache, v_cache, block_table, seq_lens, out, num_heads, num_kv_heads, head_dim,
                     block_size, table_width, window > 0 ? window : 0, scale, soft_cap > 0.0f ? soft_cap : 0.0f,
                     is_bf16, kv_kind, 0, 0};
    run_jobs(&job, num_seqs, num_threads);
    return 0;
}

/* Store new tokens' K/V [T, num_kv_heads, head_dim] at their slots, in the paired layouts
 * above. A plain loop: PyTorch's advanced-index scatter into the paired layout costs ~10x more. */
#define WRITE_KV(T_)                                                                               \
    for (int64_t t = 0; t < num_tokens; t++) {                                                     \
        const int64_t block = slots[t] / bs, off = slots[t] % bs, base = block * block_elems;      \
        for (int64_t h = 0; h < num_kv_heads; h++) {                                               \
            const T_ *ks = (const T_ *)k + (t * num_kv_heads + h) * D;                             \
            const T_ *vs = (const T_ *)v + (t * num_kv_heads + h) * D;                             \
            T_ *kd = (T_ *)k_cache + base + k_offset(h, 0, off, D, bs);                            \
            T_ *vd = (T_ *)v_cache + base + v_offset(h, 0, off, D, bs);                            \
            for (int64_t d = 0; d < D; d += 2) {                                                   \
                kd[d * bs] = ks[d]; /* dims (d, d+1) are a pair; pairs sit bs*2 apart */           \
                kd[d * bs + 1] = ks[d + 1];                                                        \
            }                                                                                      \
            for (int64_t d = 0; d < D; d++) vd[2 * d] = vs[d];                                     \
        }                                                                                          \
    }

void write_kv(void *k_cache, void *v_cache, const void *k, const void *v, const int64_t *slots,
              int64_t num_tokens, int64_t num_kv_heads, int64_t head_dim, int64_t block_size, int64_t elem_size) {
    const int64_t D = head_dim, bs = block_size, block_elems = bs * num_kv_heads * D;
    if (elem_size == 2) {
        WRITE_KV(uint16_t)
    } else {
        WRITE_KV(float)
    }
}
#undef WRITE_KV

/* One pass over a step's fused q/k/v projection [T, (H + 2 Hkv) * D] (rows ld_qkv apart):
 * rotates q into q_out [T, H, D], and rotates k and stores it, with v, straight into the paged
 * cache at each token's slot (the layouts of write_kv). Replaces rotary + three copies + write_kv. */
int rope_qkv_cache_bf16(const uint16_t *qkv, int64_t ld_qkv, const uint16_t *cos, const uint16_t *sin,
                        uint16_t *q_out, uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots,
                        int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t bs) {
#if HAVE_BF16_FAST_PATH
    if (D % 32 != 0 || D > MAX_HEAD_DIM) return -1;
    const int64_t block_elems = bs * Hkv * D;
#pragma omp parallel for schedule(static) if (T * (H + 2 * Hkv) * D >= (1 << 14))
    for (int64_t t = 0; t < T; t++) {
        const uint16_t *row = qkv + t * ld_qkv, *c = cos + t * D, *s = sin + t * D;
        for (int64_t h = 0; h < H; h++) rotate_head(row + h * D, c, s, q_out + (t * H + h) * D, D);
        const int64_t base = slots[t] / bs * block_elems, off = slots[t] % bs;
        for (int64_t h = 0; h < Hkv; h++) {
            uint16_t k[MAX_HEAD_DIM];
            rotate_head(row + (H + h) * D, c, s, k, D);
            uint16_t *kd = k_cache + base + k_offset(h, 0, off, D, bs);
            uint16_t *vd = v_cache + base + v_offset(h, 0, off, D, bs);
            const uint16_t *v = row + (H + Hkv + h) * D;
            for (int64_t d = 0; d < D; d += 2) {
                kd[d * bs] = k[d];
                kd[d * bs + 1] = k[d + 1];
            }
            for (int64_t d = 0; d < D; d++) vd[2 * d] = v[d];
        }
    }
    return 0;
#else
    (void)qkv; (void)ld_qkv; (void)cos; (void)sin; (void)q_out; (void)k_cache; (void)v_cache; (void)slots;
    (void)T; (void)H; (void)Hkv; (void)D; (void)bs;
    return -1;
#endif
}
