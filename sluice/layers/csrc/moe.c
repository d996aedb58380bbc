/*
 * Routed experts of a mixture-of-experts layer in one call (bf16, packed weights of gemm.c):
 *
 *   out[t] = bf16( sum_j weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])) ),  e = ids[t, j]
 *
 * The (token, slot) pairs are counting-sorted by expert, each expert's rows are gathered into
 * one block, and each touched expert runs its two matmuls once over all its rows (gate_up with
 * the fused SiLU x up epilogue, then down), so its weights stream from memory once per step
 * however many tokens chose it. The weighted sum runs in float32 in slot order, rounded once at
 * the end, as the PyTorch path does. No Python runs between experts.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int linear_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *packed, int64_t N,
                const float *bias, const uint16_t *residual, int64_t ldr, uint16_t *out, int64_t ldo, int epilogue);

enum { EPI_STORE = 0, EPI_SILU_MUL = 2 };

static inline float bf16_to_f32(uint16_t v) {
    uint32_t bits = (uint32_t)v << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* nearest even, as torch's .to(torch.bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((bits >> 16) | 0x40u); /* NaN stays NaN */
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

/* x [T, H]; ids, weights [T, top_k]; packed_gate_up: E panels of 2I x H, gate_up_stride apart;
 * packed_down: E panels of H x I, down_stride apart; scratch holds T * top_k * (2H + I) bf16;
 * out [T, H]. Returns 0, or -1 when a matmul was refused (no AVX-512 BF16) or memory ran out. */
int moe_experts_bf16(const uint16_t *x, int64_t T, int64_t H, int64_t I, int64_t top_k, const int64_t *ids,
                     const float *weights, int64_t E, const uint16_t *packed_gate_up, int64_t gate_up_stride,
                     const uint16_t *packed_down, int64_t down_stride, uint16_t *scratch, uint16_t *out) {
    const int64_t pairs = T * top_k;
    int64_t *offsets = calloc((size_t)(E + 1), sizeof(int64_t));
    int64_t *position = malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t)); /* pair -> grouped row */
    if (!offsets || !position) {
        free(offsets);
        free(position);
        return -1;
    }
    for (int64_t p = 0; p < pairs; p++) offsets[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    uint16_t *grouped = scratch, *hidden = scratch + pairs * H, *expert_out = hidden + pairs * I;
    {
        int64_t *next = malloc((size_t)E * sizeof(int64_t));
        if (!next) {
            free(offsets);
            free(position);
            return -1;
        }
        memcpy(next, offsets, (size_t)E * sizeof(int64_t));
        for (int64_t p = 0; p < pairs; p++) { /* stable: pairs keep token order within an expert */
            const int64_t row = next[ids[p]]++;
            position[p] = row;
            memcpy(grouped + row * H, x + (p / top_k) * H, (size_t)H * sizeof(uint16_t));
        }
        free(next);
    }
    int status = 0;
    for (int64_t e = 0; e < E && status == 0; e++) {
        const int64_t first = offsets[e], rows = offsets[e + 1] - first;
        if (!rows) continue;
        status = linear_bf16(grouped + first * H, rows, H, H, packed_gate_up + e * gate_up_stride, 2 * I, NULL, NULL,
                             0, hidden + first * I, I, EPI_SILU_MUL);
        if (status == 0)
            status = linear_bf16(hidden + first * I, rows, I, I, packed_down + e * down_stride, H, NULL, NULL, 0,
                                 expert_out + first * H, H, EPI_STORE);
    }
    if (status == 0) {
#pragma omp parallel for schedule(static) if (T * H >= (1 << 14))
        for (int64_t t = 0; t < T; t++) {
            for (int64_t h = 0; h < H; h++) {
                float sum = 0.0f;
                for (int64_t j = 0; j < top_k; j++)
                    sum += bf16_to_f32(expert_out[position[t * top_k + j] * H + h]) * weights[t * top_k + j];
                out[t * H + h] = f32_to_bf16(sum);
            }
        }
    }
    free(offsets);
    free(position);
    return status;
}

/*
 * The same routed experts with their weights as GGML blocks (a GGUF's expert tensors, or
 * `--quantization int8`'s Q8_0 blocks): each touched expert's two matmuls are quant.c's
 * linear_gguf over all its rows (activations quantized per row and block of 32, VNNI dot
 * products), the SiLU x up between them in float32, rounded once to x's dtype.
 */
int linear_gguf(const void *x, int64_t M, int64_t K, int64_t ldx, int bf16, const uint8_t *w, int qtype, int64_t N,
                const float *bias, const void *residual, int64_t ldr, void *out, int64_t ldo);

static inline float load_value(const void *base, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)base)[i]) : ((const float *)base)[i];
}

static inline void store_value(void *base, int64_t i, int bf16, float v) {
    if (bf16) ((uint16_t *)base)[i] = f32_to_bf16(v);
    else ((float *)base)[i] = v;
}

/* silu(gate) * up of one row [gate I | up I] into hidden [I]. Not vectorised: the vector and
 * scalar expf differ in the last bit, and which elements take which would depend on alignment,
 * so a token's output would depend on its batch. */
__attribute__((optimize("no-tree-vectorize"))) static void silu_mul_row(const void *gate_up, int64_t I, int bf16,
                                                                        void *hidden) {
    for (int64_t i = 0; i < I; i++) {
        const float g = load_value(gate_up, i, bf16), u = load_value(gate_up, I + i, bf16);
        /* clamped: -ffast-math assumes expf never overflows to infinity */
        store_value(hidden, i, bf16, g / (1.0f + expf(fminf(-g, 88.0f))) * u);
    }
}

/* x [T, H] (bf16 when bf16, else float32); gate_up: E experts of 2I rows (gate rows, then up rows)
 * of H / block values blocks, gate_up_stride bytes apart; down: E experts of H rows of I values,
 * down_stride bytes apart; scratch holds T * top_k * (2H + 3I) values of x's dtype; out [T, H].
 * Returns 0, or linear_gguf's refusal (-1: not served on this CPU, -2: out of memory). */
int moe_experts_gguf(const void *x, int bf16, int64_t T, int64_t H, int64_t I, int64_t top_k, const int64_t *ids,
                     const float *weights, int64_t E, const uint8_t *gate_up, int64_t gate_up_stride, int gate_up_type,
                     const uint8_t *down, int64_t down_stride, int down_type, void *scratch, void *out) {
    const int64_t pairs = T * top_k;
    const size_t elem = bf16 ? 2 : 4;
    int64_t *offsets = calloc((size_t)(E + 2), sizeof(int64_t));
    int64_t *position = malloc((size_t)(pairs > 0 ? pairs : 1) * sizeof(int64_t));
    int64_t *next = malloc((size_t)(E > 0 ? E : 1) * sizeof(int64_t));
    if (!offsets || !position || !next) {
        free(offsets);
        free(position);
        free(next);
        return -2;
    }
    for (int64_t p = 0; p < pairs; p++) offsets[ids[p] + 1]++;
    for (int64_t e = 0; e < E; e++) offsets[e + 1] += offsets[e];
    char *grouped = scratch, *gu = grouped + pairs * H * elem, *hidden = gu + pairs * 2 * I * elem;
    char *expert_out = hidden + pairs * I * elem;
    memcpy(next, offsets, (size_t)E * sizeof(int64_t));
    for (int64_t p = 0; p < pairs; p++) { /* stable: pairs keep token order within an expert */
        const int64_t row = next[ids[p]]++;
        position[p] = row;
        memcpy(grouped + row * H * elem, (const char *)x + (p / top_k) * H * elem, (size_t)H * elem);
    }
    free(next);
    int status = 0;
    for (int64_t e = 0; e < E && status == 0; e++) {
        const int64_t first = offsets[e], rows = offsets[e + 1] - first;
        if (!rows) continue;
        status = linear_gguf(grouped + first * H * elem, rows, H, H, bf16, gate_up + e * gate_up_stride, gate_up_type,
                             2 * I, NULL, NULL, 0, gu + first * 2 * I * elem, 2 * I);
        if (status != 0) break;
        for (int64_t r = first; r < first + rows; r++) silu_mul_row(gu + r * 2 * I * elem, I, bf16, hidden + r * I * elem);
        status = linear_gguf(hidden + first * I * elem, rows, I, I, bf16, down + e * down_stride, down_type, H, NULL,
                             NULL, 0, expert_out + first * H * elem, H);
    }
    if (status == 0) {
#pragma omp parallel for schedule(static) if (T * H >= (1 << 14))
        for (int64_t t = 0; t < T; t++)
            for (int64_t h = 0; h < H; h++) {
                float sum = 0.0f;
                for (int64_t j = 0; j < top_k; j++)
                    sum += load_value(expert_out, position[t * top_k + j] * H + h, bf16) * weights[t * top_k + j];
                store_value(out, t * H + h, bf16, sum);
            }
    }
    free(offsets);
    free(position);
    return status;
}
