/*
 * A stack of Llama-shaped decoder layers in one call, for the small batches of decode: the same
 * kernels the layer-by-layer Python path calls, in the same order on the same buffers (so the
 * results are bit for bit the same), without ~20 us of Python and ctypes around each of the
 * eight calls a layer makes. llama.cpp runs a graph for the same reason.
 *
 * Per layer, x [T, hidden] bf16 (updated in place):
 *   h = rms_norm(x) ; qkv = h W_qkv^T ; q, cache <- rope(qkv) ; a = paged_attention(q)
 *   x2 = x + a W_o^T ; h = rms_norm(x2) ; g = silu(h W_gate^T) * (h W_up^T) ; x = x2 + g W_down^T
 */
#include <stdint.h>
#include <stdlib.h>

int rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int64_t rows, int64_t cols, float eps);
int silu_mul_bf16(const uint16_t *gate_up, uint16_t *out, int64_t rows, int64_t cols, int num_threads);
int rope_qkv_cache_bf16(const uint16_t *qkv, int64_t ld_qkv, const uint16_t *cos, const uint16_t *sin,
                        uint16_t *q_out, uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots,
                        int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t bs);
int paged_attention(const void *q, const void *k_cache, const void *v_cache, const int64_t *block_table,
                    const int64_t *seq_lens, void *out, int64_t num_seqs, int64_t num_heads, int64_t num_kv_heads,
                    int64_t head_dim, int64_t block_size, int64_t table_width, int64_t window, float scale,
                    float soft_cap, int is_bf16, int num_threads);
int linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                const float *bias, const uint16_t *residual, int64_t ldr, uint16_t *out, int64_t ldo, int epilogue);
int linear_gguf(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, const uint8_t *w, int qtype, int64_t N,
                const float *bias, const void *residual, int64_t ldr, void *out, int64_t ldo);
int linear_gguf_x16(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, const uint8_t *w, int qtype, int64_t N,
                    const float *bias, const void *residual, int64_t ldr, void *out, int64_t ldo);

/* How a linear layer's weight is stored (decoder_stack.py's KIND_*) */
enum { KIND_BF16_PANELS = 0, KIND_GGUF = 1, KIND_GGUF_REPACKED = 2 };
enum { EPI_STORE = 0, EPI_RESIDUAL = 1, EPI_SILU_MUL = 2 }; /* gemm.c's epilogues */
enum { QKV, O, GATE_UP, DOWN, LINEARS };
/* a layer's pointers: its two norm weights, then each linear's weight and float32 bias (or 0) */
enum { INPUT_NORM, POST_NORM, WEIGHT0, POINTERS = WEIGHT0 + 2 * LINEARS };

typedef struct {
    int64_t kind, qtype, n;
    const void *weight;
    const float *bias;
} StackLinear;

/* x [T, K] @ W^T (+ bias) (+ residual [T, n]) -> out [T, n]; EPI_SILU_MUL (bf16 panels only):
 * silu(gate) * up -> out [T, n / 2] */
static int run_linear(const StackLinear *lin, const uint16_t *x, int64_t T, int64_t K, const uint16_t *residual,
                      uint16_t *out, int epilogue) {
    switch (lin->kind) {
    case KIND_BF16_PANELS:
        return linear_bf16(x, T, K, K, lin->weight, lin->n, lin->bias, residual, lin->n, out,
                           epilogue == EPI_SILU_MUL ? lin->n / 2 : lin->n, epilogue);
    case KIND_GGUF:
        return linear_gguf(x, T, K, K, 1, lin->weight, (int)lin->qtype, lin->n, lin->bias, residual, lin->n, out,
                           lin->n);
    case KIND_GGUF_REPACKED:
        return linear_gguf_x16(x, T, K, K, 1, lin->weight, (int)lin->qtype, lin->n, lin->bias, residual, lin->n,
                               out, lin->n);
    default:
        return -1;
    }
}

/*
 * x [T, hidden] bf16 through L layers, in place. pointers [L][POINTERS] and linears [L][LINEARS][2]
 * (kind, qtype) describe the layers; kv_caches [L] each point at a layer's cache [2, ...]: K
 * blocks, then V blocks kv_stride elements later. cos / sin [T, D]; slots [T]; block_table
 * [T, table_width] and seq_lens [T] per token row, as the native attention backend reads them.
 * Returns 0, or the first kernel's refusal (x is then undefined: the caller raises).
 */
int decoder_stack_bf16(uint16_t *x, int64_t T, int64_t L, const int64_t *pointers, const int64_t *linears,
                       int64_t hidden, int64_t H, int64_t Hkv, int64_t D, int64_t inter, float eps, float scale,
                       const uint16_t *cos, const uint16_t *sin, const int64_t *kv_caches, int64_t kv_stride,
                       int64_t block_size, const int64_t *slots, const int64_t *block_table, int64_t table_width,
                       const int64_t *seq_lens, int num_threads) {
    const int64_t qkv_n = (H + 2 * Hkv) * D;
    /* h, x2 [T, hidden]; qkv [T, qkv_n]; q, attn [T, H * D]; gate_up [T, 2 inter]; act [T, inter] */
    const int64_t per_row = 2 * hidden + qkv_n + 2 * H * D + 3 * inter;
    uint16_t *scratch = malloc((size_t)(T * per_row) * sizeof(uint16_t));
    if (!scratch) return -2;
    uint16_t *h = scratch, *x2 = h + T * hidden, *qkv = x2 + T * hidden, *q = qkv + T * qkv_n, *attn = q + T * H * D,
             *gate_up = attn + T * H * D, *act = gate_up + T * 2 * inter;
    const int64_t n[LINEARS] = {qkv_n, hidden, 2 * inter, hidden};
    int status = 0;
    for (int64_t l = 0; l < L && status == 0; l++) {
        const int64_t *p = pointers + l * POINTERS, *kinds = linears + l * LINEARS * 2;
        StackLinear lin[LINEARS];
        for (int i = 0; i < LINEARS; i++)
            lin[i] = (StackLinear){kinds[2 * i], kinds[2 * i + 1], n[i], (const void *)p[WEIGHT0 + 2 * i],
                                   (const float *)p[WEIGHT0 + 2 * i + 1]};
        uint16_t *k_cache = (uint16_t *)kv_caches[l], *v_cache = k_cache + kv_stride;
        status = rms_norm_bf16(x, (const uint16_t *)p[INPUT_NORM], h, T, hidden, eps);
        if (status == 0) status = run_linear(&lin[QKV], h, T, hidden, NULL, qkv, EPI_STORE);
        if (status == 0) status = rope_qkv_cache_bf16(qkv, qkv_n, cos, sin, q, k_cache, v_cache, slots, T, H, Hkv, D,
                                                      block_size);
        if (status == 0) status = paged_attention(q, k_cache, v_cache, block_table, seq_lens, attn, T, H, Hkv, D,
                                                  block_size, table_width, 0, scale, 0.0f, 1, num_threads);
        if (status == 0) status = run_linear(&lin[O], attn, T, H * D, x, x2, EPI_RESIDUAL);
        if (status == 0) status = rms_norm_bf16(x2, (const uint16_t *)p[POST_NORM], h, T, hidden, eps);
        if (status == 0 && lin[GATE_UP].kind == KIND_BF16_PANELS) {
            status = run_linear(&lin[GATE_UP], h, T, hidden, NULL, act, EPI_SILU_MUL);
        } else if (status == 0) {
            status = run_linear(&lin[GATE_UP], h, T, hidden, NULL, gate_up, EPI_STORE);
            if (status == 0) status = silu_mul_bf16(gate_up, act, T, inter, num_threads);
        }
        if (status == 0) status = run_linear(&lin[DOWN], act, T, inter, x2, x, EPI_RESIDUAL);
    }
    free(scratch);
    return status;
}
