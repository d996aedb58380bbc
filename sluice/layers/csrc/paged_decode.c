/*
 * Paged attention for decode rows (one query token per sequence), on CPU.
 *
 * Reads each sequence's K/V straight out of the paged cache, block by block, with an
 * online softmax, so nothing is gathered or copied. Work is split across threads by
 * sequence; one pass over a sequence serves all its query heads (GQA without expansion).
 *
 * Cache layout per layer and block (see sluice/layers/attention.py):
 *   K: [num_kv_heads, head_dim / 2, block_size, 2]  pairs of dims, keys along the row,
 *      so one 64-byte load holds 16 keys x 2 dims: exactly the operand of the bf16
 *      dot-product instruction, and scores of 16 keys need no horizontal reductions.
 *   V: [num_kv_heads, block_size / 2, head_dim, 2]  pairs of keys, dims along the row,
 *      so one load holds 16 dims x 2 keys for the same instruction with (p_j, p_j+1).
 * bf16 or f32. Built by sluice/layers/native.py with the system C compiler and called
 * through ctypes, which releases the GIL.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_HEADS 64
#define MAX_BLOCK 256
#define MAX_THREADS 64

typedef struct {
    const void *q;              /* [num_seqs, num_heads, head_dim] */
    const void *k_cache;
    const void *v_cache;
    const int64_t *block_table; /* [num_seqs, table_width] */
    const int64_t *seq_lens;    /* keys per sequence, including the new token */
    void *out;                  /* [num_seqs, num_heads, head_dim] */
    int64_t num_heads, num_kv_heads, head_dim, block_size, table_width;
    float scale;
    int is_bf16;
    int64_t seq_begin, seq_end;
} Job;

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
    for (int64_t pos = 0; pos < len; pos++) {
        const int64_t block = table[pos / bs], off = pos % bs;
        const int64_t base = block * block_elems;
        for (int64_t h = 0; h < H; h++) {
            const int64_t hkv = h / G;
            float score = 0.0f;
            for (int64_t d = 0; d < D; d++)
                score += q[h][d] * load_elem(job->k_cache, base + k_offset(hkv, d, off, D, bs), job->is_bf16);
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
#include <immintrin.h>
#define HAVE_BF16_FAST_PATH 1

/* exp for lanes <= 0 (softmax inputs after max subtraction): 2^(x log2 e), degree-6 fit. */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(t, n); /* in [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5353362e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3398874e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline __m512 bf16x16_to_f32(const uint16_t *src) {
    const __m256i raw = _mm256_loadu_si256((const __m256i *)src);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

/* bf16 caches, head_dim a multiple of 32: up to 16 keys of one block per chunk. */
static void attend_seq_bf16(const Job *job, int64_t seq) {
    const int64_t H = job->num_heads, hkv_count = job->num_kv_heads, D = job->head_dim, bs = job->block_size;
    const int64_t G = H / hkv_count, len = job->seq_lens[seq];
    const int64_t block_elems = bs * hkv_count * D;
    const uint16_t *kc = (const uint16_t *)job->k_cache, *vc = (const uint16_t *)job->v_cache;
    const uint32_t *qpairs = (const uint32_t *)((const uint16_t *)job->q + seq * H * D); /* [H][D/2] */
    const int64_t *table = job->block_table + seq * job->table_width;

    __m512 acc[MAX_HEADS][MAX_HEAD_DIM / 16];
    float m[MAX_HEADS], l[MAX_HEADS];
    float p[MAX_HEADS][16] __attribute__((aligned(64)));
    for (int64_t h = 0; h < H; h++) {
        for (int64_t v = 0; v < D / 16; v++) acc[h][v] = _mm512_setzero_ps();
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    for (int64_t start = 0, n = 0; start < len; start += n) {
        const int64_t in_block = start % bs;
        n = len - start < 16 ? len - start : 16;
        if (n > bs - in_block) n = bs - in_block;
        const int64_t base = table[start / bs] * block_elems;
        if (start + n < len && (start + n) % bs == 0) {
            /* blocks sit anywhere in the pool: pull the next one in while this one computes */
            const int64_t next = table[(start + n) / bs] * block_elems;
            for (int64_t e = 0; e < block_elems; e += 32) {
                _mm_prefetch((const char *)(kc + next + e), _MM_HINT_T0);
                _mm_prefetch((const char *)(vc + next + e), _MM_HINT_T0);
            }
        }
        const __mmask32 pair_mask = (__mmask32)(n == 16 ? 0xFFFFFFFFu : ((1u << (2 * n)) - 1u));
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        for (int64_t hkv = 0; hkv < hkv_count; hkv++) {
            __m512 score[MAX_HEADS];
            for (int64_t g = 0; g < G; g++) score[g] = _mm512_setzero_ps();
            const uint16_t *kpairs = kc + base + (hkv * (D / 2) * bs + in_block) * 2;
            for (int64_t i = 0; i < D / 2; i++) {
                /* 16 keys x dims (2i, 2i+1) */
                const __m512bh keys = (__m512bh)_mm512_maskz_loadu_epi16(pair_mask, kpairs + i * bs * 2);
                for (int64_t g = 0; g < G; g++) {
                    const __m512bh qq = (__m512bh)_mm512_set1_epi32((int)qpairs[(hkv * G + g) * (D / 2) + i]);
                    score[g] = _mm512_dpbf16_ps(score[g], qq, keys);
                }
            }
            for (int64_t g = 0; g < G; g++) {
                const int64_t h = hkv * G + g;
                const __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), live, score[g],
                                                    _mm512_set1_ps(job->scale));
                const float block_max = fmaxf(m[h], _mm512_reduce_max_ps(s));
                const __m512 e = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(s, _mm512_set1_ps(block_max))));
                const float correction = expf(m[h] - block_max);
                l[h] = l[h] * correction + _mm512_reduce_add_ps(e);
                m[h] = block_max;
                _mm512_store_ps(p[h], e);
                const __m512 c = _mm512_set1_ps(correction);
                for (int64_t v = 0; v < D / 16; v++) acc[h][v] = _mm512_mul_ps(acc[h][v], c);
            }
        }
        /* probabilities as bf16 pairs (p_2i, p_2i+1); lanes past n are zero */
        uint32_t ppairs[MAX_HEADS][8] __attribute__((aligned(32)));
        for (int64_t h = 0; h < H; h++)
            _mm256_store_si256((__m256i *)ppairs[h], (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(p[h])));
        for (int64_t i = 0; i < (n + 1) / 2; i++) {
            for (int64_t hkv = 0; hkv < hkv_count; hkv++) {
                const uint16_t *vpairs = vc + base + ((hkv * (bs / 2) + in_block / 2 + i) * D) * 2;
                for (int64_t v = 0; v < D / 16; v++) {
                    const __m512bh vals = (__m512bh)_mm512_loadu_si512(vpairs + 32 * v); /* 16 dims x 2 keys */
                    for (int64_t h = hkv * G; h < (hkv + 1) * G; h++)
                        acc[h][v] = _mm512_dpbf16_ps(acc[h][v], (__m512bh)_mm512_set1_epi32((int)ppairs[h][i]), vals);
                }
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        uint16_t *dst = (uint16_t *)job->out + (seq * H + h) * D;
        float tmp[16] __attribute__((aligned(64)));
        for (int64_t v = 0; v < D / 16; v++) {
            _mm512_store_ps(tmp, _mm512_mul_ps(acc[h][v], _mm512_set1_ps(inv)));
            for (int i = 0; i < 16; i++) dst[16 * v + i] = f32_to_bf16(tmp[i]);
        }
    }
}
#else
#define HAVE_BF16_FAST_PATH 0
#endif

static void *run_job(void *arg) {
    const Job *job = (const Job *)arg;
    int fast = 0;
#if HAVE_BF16_FAST_PATH
    fast = job->is_bf16 && job->head_dim % 32 == 0;
#endif
    for (int64_t seq = job->seq_begin; seq < job->seq_end; seq++) {
#if HAVE_BF16_FAST_PATH
        if (fast) {
            attend_seq_bf16(job, seq);
            continue;
        }
#endif
        attend_seq_generic(job, seq);
    }
    (void)fast;
    return NULL;
}

/* Returns 0 on success, -1 when a size exceeds the compiled limits (caller falls back). */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_table, const int64_t *seq_lens, void *out,
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t table_width,
                           float scale, int is_bf16, int num_threads) {
    if (head_dim > MAX_HEAD_DIM || head_dim % 2 != 0 || block_size > MAX_BLOCK || num_heads > MAX_HEADS ||
        num_heads % num_kv_heads != 0)
        return -1;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > num_seqs) num_threads = (int)(num_seqs > 0 ? num_seqs : 1);
    Job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    for (int t = 0; t < num_threads; t++) {
        Job job = {q, k_cache, v_cache, block_table, seq_lens, out, num_heads, num_kv_heads,
                   head_dim, block_size, table_width, scale, is_bf16,
                   num_seqs * t / num_threads, num_seqs * (t + 1) / num_threads};
        jobs[t] = job;
    }
    int started = 0;
    for (int t = 1; t < num_threads; t++) {
        if (pthread_create(&threads[t], NULL, run_job, &jobs[t]) != 0) break;
        started = t;
    }
    run_job(&jobs[0]);
    for (int t = started + 1; t < num_threads; t++) run_job(&jobs[t]); /* threads that failed to start */
    for (int t = 1; t <= started; t++) pthread_join(threads[t], NULL);
    return 0;
}
