/*
 * Paged attention for decode rows (one query token per sequence), on CPU.
 *
 * Reads each sequence's K/V straight out of the paged cache, block by block, with an
 * online softmax, so nothing is gathered or copied: at large batch the decode step is
 * bound by reading the cache once. Work items are (sequence, KV head) pairs; the G query
 * heads sharing a KV head are served by one pass over its keys (GQA without expansion).
 *
 * Cache layout per layer: [num_blocks, block_size, num_kv_heads, head_dim], bf16 or f32.
 * Built by sluice/layers/native.py with the system C compiler; called through ctypes,
 * which releases the GIL.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define MAX_HEAD_DIM 256
#define MAX_GROUP 16
#define MAX_HEADS 64
#define MAX_BLOCK 256
#define MAX_THREADS 64

typedef struct {
    const void *q;            /* [num_seqs, num_heads, head_dim] */
    const void *k_cache;
    const void *v_cache;
    const int64_t *block_table; /* [num_seqs, table_width] */
    const int64_t *seq_lens;  /* keys per sequence, including the new token */
    void *out;                /* [num_seqs, num_heads, head_dim] */
    int64_t num_heads, num_kv_heads, head_dim, block_size, table_width;
    float scale;
    int is_bf16;
    int64_t item_begin, item_end;
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

static inline void load_row(const void *base, int64_t offset, int64_t n, int is_bf16, float *dst) {
    if (is_bf16) {
        const uint16_t *src = (const uint16_t *)base + offset;
        for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_f32(src[i]);
    } else {
        memcpy(dst, (const float *)base + offset, (size_t)n * sizeof(float));
    }
}

static void attend_item(const Job *job, int64_t item) {
    const int64_t hkv_count = job->num_kv_heads, D = job->head_dim, bs = job->block_size;
    const int64_t G = job->num_heads / hkv_count;
    const int64_t seq = item / hkv_count, hkv = item % hkv_count;
    const int64_t len = job->seq_lens[seq];
    const int64_t token_stride = hkv_count * D, block_stride = bs * token_stride;

    float q[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
    float m[MAX_GROUP], l[MAX_GROUP], s[MAX_GROUP][MAX_BLOCK];
    float key[MAX_HEAD_DIM], val[MAX_HEAD_DIM];
    for (int64_t g = 0; g < G; g++) {
        load_row(job->q, (seq * job->num_heads + hkv * G + g) * D, D, job->is_bf16, q[g]);
        for (int64_t d = 0; d < D; d++) { q[g][d] *= job->scale; acc[g][d] = 0.0f; }
        m[g] = -INFINITY;
        l[g] = 0.0f;
    }
    const int64_t *table = job->block_table + seq * job->table_width;
    for (int64_t start = 0; start < len; start += bs) {
        const int64_t n = (len - start < bs) ? len - start : bs;
        const int64_t base = table[start / bs] * block_stride + hkv * D;
        for (int64_t j = 0; j < n; j++) {
            load_row(job->k_cache, base + j * token_stride, D, job->is_bf16, key);
            for (int64_t g = 0; g < G; g++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += q[g][d] * key[d];
                s[g][j] = dot;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float block_max = m[g];
            for (int64_t j = 0; j < n; j++) block_max = s[g][j] > block_max ? s[g][j] : block_max;
            const float correction = expf(m[g] - block_max);
            l[g] *= correction;
            for (int64_t d = 0; d < D; d++) acc[g][d] *= correction;
            for (int64_t j = 0; j < n; j++) {
                s[g][j] = expf(s[g][j] - block_max);
                l[g] += s[g][j];
            }
            m[g] = block_max;
        }
        for (int64_t j = 0; j < n; j++) {
            load_row(job->v_cache, base + j * token_stride, D, job->is_bf16, val);
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g][j];
                for (int64_t d = 0; d < D; d++) acc[g][d] += p * val[d];
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const float inv = l[g] > 0.0f ? 1.0f / l[g] : 0.0f;
        const int64_t offset = (seq * job->num_heads + hkv * G + g) * D;
        if (job->is_bf16) {
            uint16_t *dst = (uint16_t *)job->out + offset;
            for (int64_t d = 0; d < D; d++) dst[d] = f32_to_bf16(acc[g][d] * inv);
        } else {
            float *dst = (float *)job->out + offset;
            for (int64_t d = 0; d < D; d++) dst[d] = acc[g][d] * inv;
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

/* All heads of one sequence, for bf16 caches with head_dim a multiple of 32 (<= 256).
 * Serving every KV head in one pass reads each cached token's K (and V) row for all heads
 * as one contiguous run, so a block streams from memory instead of being read in strides. */
static void attend_seq_bf16(const Job *job, int64_t seq) {
    const int64_t H = job->num_heads, hkv_count = job->num_kv_heads, D = job->head_dim, bs = job->block_size;
    const int64_t G = H / hkv_count, DV = D / 32;
    const int64_t len = job->seq_lens[seq];
    const int64_t token_stride = hkv_count * D, block_stride = bs * token_stride;
    const uint16_t *kc = (const uint16_t *)job->k_cache, *vc = (const uint16_t *)job->v_cache;

    __m512bh q[MAX_HEADS][MAX_HEAD_DIM / 32];
    __m512 acc[MAX_HEADS][MAX_HEAD_DIM / 16];
    float m[MAX_HEADS], l[MAX_HEADS];
    float s[MAX_HEADS][16] __attribute__((aligned(64)));
    const uint16_t *qrow = (const uint16_t *)job->q + seq * H * D;
    for (int64_t h = 0; h < H; h++) {
        for (int64_t v = 0; v < DV; v++) q[h][v] = (__m512bh)_mm512_loadu_si512(qrow + h * D + 32 * v);
        for (int64_t v = 0; v < 2 * DV; v++) acc[h][v] = _mm512_setzero_ps();
        m[h] = -INFINITY;
        l[h] = 0.0f;
    }
    const int64_t *table = job->block_table + seq * job->table_width;
    for (int64_t start = 0; start < len; start += 16) {
        /* 16 keys at a time, never crossing a block: a chunk is one contiguous run of rows. */
        const int64_t in_block = start % bs;
        int64_t n = len - start < 16 ? len - start : 16;
        if (n > bs - in_block) n = bs - in_block;
        const int64_t offset = table[start / bs] * block_stride + in_block * token_stride;
        const uint16_t *kbase = kc + offset, *vbase = vc + offset;
        for (int64_t j = 0; j < n; j++) {
            for (int64_t h = 0; h < H; h++) {
                const uint16_t *krow = kbase + j * token_stride + (h / G) * D;
                __m512 dot = _mm512_setzero_ps();
                for (int64_t v = 0; v < DV; v++)
                    dot = _mm512_dpbf16_ps(dot, q[h][v], (__m512bh)_mm512_loadu_si512(krow + 32 * v));
                s[h][j] = _mm512_reduce_add_ps(dot) * job->scale;
            }
        }
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        for (int64_t h = 0; h < H; h++) {
            const __m512 scores = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), live, s[h]);
            const float block_max = fmaxf(m[h], _mm512_reduce_max_ps(scores));
            const __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(scores, _mm512_set1_ps(block_max))));
            const float correction = expf(m[h] - block_max);
            l[h] = l[h] * correction + _mm512_reduce_add_ps(p);
            m[h] = block_max;
            _mm512_store_ps(s[h], p);
            const __m512 c = _mm512_set1_ps(correction);
            for (int64_t v = 0; v < 2 * DV; v++) acc[h][v] = _mm512_mul_ps(acc[h][v], c);
        }
        for (int64_t j = 0; j < n; j++) {
            for (int64_t kv = 0; kv < hkv_count; kv++) {
                const uint16_t *vrow = vbase + j * token_stride + kv * D;
                for (int64_t v = 0; v < 2 * DV; v++) {
                    const __m512 val = bf16x16_to_f32(vrow + 16 * v);
                    for (int64_t h = kv * G; h < (kv + 1) * G; h++)
                        acc[h][v] = _mm512_fmadd_ps(_mm512_set1_ps(s[h][j]), val, acc[h][v]);
                }
            }
        }
    }
    for (int64_t h = 0; h < H; h++) {
        const float inv = l[h] > 0.0f ? 1.0f / l[h] : 0.0f;
        uint16_t *dst = (uint16_t *)job->out + (seq * H + h) * D;
        float tmp[16] __attribute__((aligned(64)));
        for (int64_t v = 0; v < 2 * DV; v++) {
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
#if HAVE_BF16_FAST_PATH
    if (job->is_bf16 && job->head_dim % 32 == 0 && job->num_heads <= MAX_HEADS) {
        /* items are (sequence, KV head) pairs; this path takes whole sequences */
        const int64_t hkv = job->num_kv_heads;
        for (int64_t seq = (job->item_begin + hkv - 1) / hkv; seq < (job->item_end + hkv - 1) / hkv; seq++)
            attend_seq_bf16(job, seq);
        return NULL;
    }
#endif
    for (int64_t item = job->item_begin; item < job->item_end; item++) attend_item(job, item);
    return NULL;
}

/* Returns 0 on success, -1 when a size exceeds the compiled limits (caller falls back). */
int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache,
                           const int64_t *block_table, const int64_t *seq_lens, void *out,
                           int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                           int64_t head_dim, int64_t block_size, int64_t table_width,
                           float scale, int is_bf16, int num_threads) {
    if (head_dim > MAX_HEAD_DIM || block_size > MAX_BLOCK || num_heads % num_kv_heads != 0 ||
        num_heads / num_kv_heads > MAX_GROUP)
        return -1;
    const int64_t items = num_seqs * num_kv_heads;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (num_threads > items) num_threads = (int)(items > 0 ? items : 1);
    Job jobs[MAX_THREADS];
    pthread_t threads[MAX_THREADS];
    for (int t = 0; t < num_threads; t++) {
        Job job = {q, k_cache, v_cache, block_table, seq_lens, out, num_heads, num_kv_heads,
                   head_dim, block_size, table_width, scale, is_bf16,
                   items * t / num_threads, items * (t + 1) / num_threads};
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
