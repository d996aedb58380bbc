/*
 * Element-wise ops of the model (SiLU x up, rotary, RMSNorm, greedy argmax) on bf16 rows, one pass
 * each instead of several PyTorch kernels, rounded to bf16 at the same points as the PyTorch code
 * they replace, so results match it. Threads come from OpenMP (the libgomp PyTorch loaded).
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include "bf16_simd.h"
#define HAVE_BF16_FAST_PATH 1
#define MAX_THREADS 64
#else
#define HAVE_BF16_FAST_PATH 0
#endif

#if HAVE_BF16_FAST_PATH
typedef struct {
    const uint16_t *a, *b, *c;
    uint16_t *out;
    int64_t rows, cols, heads, row_begin, row_end;
} RowJob;

/* out[t] = bf16(bf16(silu(gate[t])) * up[t]), gate_up rows = [gate (cols) | up (cols)] */
static void *silu_mul_rows(void *arg) {
    const RowJob *job = (const RowJob *)arg;
    const int64_t I = job->cols;
    for (int64_t t = job->row_begin; t < job->row_end; t++) {
        const uint16_t *gate = job->a + t * 2 * I, *up = gate + I;
        for (int64_t i = 0; i < I; i += 16) {
            const __mmask16 live = (__mmask16)(I - i >= 16 ? 0xFFFF : ((1u << (I - i)) - 1u));
            const __m512 g = load_bf16(gate + i, live);
            store_bf16(job->out + t * I + i, _mm512_mul_ps(round_bf16(silu512(g)), load_bf16(up + i, live)), live);
        }
    }
    return NULL;
}


/* every head of rows [T, heads, D], cos/sin [T, D] */
static void *rotary_rows(void *arg) {
    const RowJob *job = (const RowJob *)arg;
    const int64_t D = job->cols;
    for (int64_t t = job->row_begin; t < job->row_end; t++)
        for (int64_t h = 0; h < job->heads; h++)
            rotate_head(job->a + (t * job->heads + h) * D, job->b + t * D, job->c + t * D,
                        job->out + (t * job->heads + h) * D, D);
    return NULL;
}

/* Rows split across threads when there is enough work to pay for them. */
static void run_rows(void *(*fn)(void *), RowJob base, int num_threads, int64_t work) {
    if (num_threads > MAX_THREADS) num_threads = MAX_THREADS;
    if (work < (1 << 18) || num_threads < 2 || base.rows < 2) num_threads = 1;
    RowJob jobs[MAX_THREADS];
    for (int t = 0; t < num_threads; t++) {
        jobs[t] = base;
        jobs[t].row_begin = base.rows * t / num_threads;
        jobs[t].row_end = base.rows * (t + 1) / num_threads;
    }
#pragma omp parallel for schedule(static, 1) num_threads(num_threads)
    for (int t = 0; t < num_threads; t++) fn(&jobs[t]);
}
#endif

int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t cols, int num_threads) {
#if HAVE_BF16_FAST_PATH
    RowJob job = {gate_up, NULL, NULL, out, rows, cols, 1, 0, 0};
    run_rows(silu_mul_rows, job, num_threads, rows * cols);
    return 0;
#else
    (void)gate_up; (void)out; (void)rows; (void)cols; (void)num_threads;
    return -1;
#endif
}

int rotary_bf16(const uint16_t *x, const uint16_t *cos, const uint16_t *sin, uint16_t *out,
                int64_t rows, int64_t heads, int64_t head_dim, int num_threads) {
#if HAVE_BF16_FAST_PATH
    if (head_dim % 32 != 0) return -1;
    RowJob job = {x, cos, sin, out, rows, head_dim, heads, 0, 0};
    run_rows(rotary_rows, job, num_threads, rows * heads * head_dim);
    return 0;
#else
    (void)x; (void)cos; (void)sin; (void)out; (void)rows; (void)heads; (void)head_dim; (void)num_threads;
    return -1;
#endif
}

/* out[t] = bf16(bf16(x[t] * rsqrt(mean(x[t]^2) + eps)) * weight), the sum of squares in fp32:
 * F.rms_norm rounded once to bf16, then the bf16 weight multiply, as sluice's RMSNorm does. */
int rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t cols, float eps) {
#if HAVE_BF16_FAST_PATH
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 18))
    for (int64_t t = 0; t < rows; t++) {
        const uint16_t *row = x + t * cols;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t i = 0; i < cols; i += 16) {
            const __m512 v = load_bf16(row + i, (__mmask16)(cols - i >= 16 ? 0xFFFF : ((1u << (cols - i)) - 1u)));
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)cols + eps));
        for (int64_t i = 0; i < cols; i += 16) {
            const __mmask16 live = (__mmask16)(cols - i >= 16 ? 0xFFFF : ((1u << (cols - i)) - 1u));
            const __m512 y = round_bf16(_mm512_mul_ps(load_bf16(row + i, live), inv));
            store_bf16(out + t * cols + i, _mm512_mul_ps(y, load_bf16(weight + i, live)), live);
        }
    }
    return 0;
#else
    (void)x; (void)weight; (void)out; (void)rows; (void)cols; (void)eps;
    return -1;
#endif
}

/* out[r] = index of the first maximum of row r of x [rows, cols] (rows ld apart): greedy
 * sampling straight from bf16 logits, one read of them instead of a float32 copy first. */
int argmax_bf16(const uint16_t *x, int64_t rows, int64_t cols, int64_t ld, int64_t *out) {
#if HAVE_BF16_FAST_PATH
#pragma omp parallel for schedule(static) if (rows * cols >= (1 << 20))
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *row = x + r * ld;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        for (int64_t i = 0; i < cols; i += 16) {
            const __mmask16 live = (__mmask16)(cols - i >= 16 ? 0xFFFF : ((1u << (cols - i)) - 1u));
            const __m512 v = load_bf16(row + i, live);
            best = _mm512_mask_max_ps(best, live, best, v);
            nan |= _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q);
        }
        /* like torch.argmax, a NaN counts as the maximum */
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(best));
        int64_t found = 0;
        for (int64_t i = 0; i < cols; i += 16) {
            const __mmask16 live = (__mmask16)(cols - i >= 16 ? 0xFFFF : ((1u << (cols - i)) - 1u));
            const __m512 v = load_bf16(row + i, live);
            const __mmask16 hit = nan ? _mm512_mask_cmp_ps_mask(live, v, v, _CMP_UNORD_Q)
                                      : _mm512_mask_cmp_ps_mask(live, v, top, _CMP_EQ_OQ);
            if (hit) {
                found = i + __builtin_ctz(hit);
                break;
            }
        }
        out[r] = found;
    }
    return 0;
#else
    (void)x; (void)rows; (void)cols; (void)ld; (void)out;
    return -1;
#endif
}
