/* SwiGLU MLPs over the tiled weight formats: one call per dense MLP and per MoE layer's routed experts, so
 * a decode step (or an MTP verification of a few tokens) spends no interpreter time per expert.
 *
 * mlp(x) = down(silu(gate x) * up x); the routed experts of a layer are stacked [count, ...] and each runs
 * once over the tokens that chose it; out[t] += weight * expert(x[t]), in fp32.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void dsv3_int8_tiles_matmul(const float *x, const int8_t *tiles, const uint16_t *scale, float *y, long m, long n, long k);
#if defined(__AVX512VNNI__)
void dsv3_int4_tiles_matmul(const float *x, const uint8_t *tiles, float *y, long m, long n, long k);
#endif

/* One matrix of a stack: its bytes (int8: n*k; int4: 576 per 16 x 64 tile) and its bf16 scales (int8 only). */
typedef struct { const uint8_t *data; const uint16_t *scale; } matrix;

static long matrix_bytes(int bits, long n, long k) { return bits == 8 ? n * k : n * k / 1024 * 576; }

static matrix pick(int bits, const void *data, const void *scale, long e, long n, long k) {
    matrix w = { (const uint8_t *)data + e * matrix_bytes(bits, n, k), NULL };
    if (bits == 8) w.scale = (const uint16_t *)scale + e * n;
    return w;
}

static void matmul(int bits, const float *x, matrix w, float *y, long m, long n, long k) {
#if defined(__AVX512VNNI__)
    if (bits == 4) {
        dsv3_int4_tiles_matmul(x, w.data, y, m, n, k);
        return;
    }
#endif
    dsv3_int8_tiles_matmul(x, (const int8_t *)w.data, w.scale, y, m, n, k);
}

/* y [m, d] = down(silu(gate x) * up x) for x [m, d]; hidden width `inter`. */
static void swiglu(int bits, const float *x, matrix gate, matrix up, matrix down, float *y, long m, long d, long inter) {
    float *g = malloc(2 * m * inter * sizeof(float)), *u = g + m * inter;
    matmul(bits, x, gate, g, m, inter, d);
    matmul(bits, x, up, u, m, inter, d);
    for (long i = 0; i < m * inter; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    matmul(bits, g, down, y, m, d, inter);
    free(g);
}

void dsv3_mlp(int bits, const float *x, long m, long d, long inter, const void *gate, const void *gate_scale,
              const void *up, const void *up_scale, const void *down, const void *down_scale, float *y) {
    swiglu(bits, x, pick(bits, gate, gate_scale, 0, inter, d), pick(bits, up, up_scale, 0, inter, d),
           pick(bits, down, down_scale, 0, d, inter), y, m, d, inter);
}

/* out [t, d] (zeroed here) = sum over (token, slot) of weights * expert ids - first, for the held experts. */
void dsv3_moe_experts(int bits, const float *x, const int64_t *ids, const float *weights, long t, long topk,
                      long first, long count, long d, long inter, const void *gate, const void *gate_scale,
                      const void *up, const void *up_scale, const void *down, const void *down_scale, float *out) {
    memset(out, 0, t * d * sizeof(float));
    long pairs = t * topk;
    long *order = malloc(pairs * sizeof(long));
    long n_order = 0;
    for (long p = 0; p < pairs; p++) {  /* the held pairs, grouped by expert (stable insertion: pairs are few) */
        long e = ids[p] - first;
        if (e < 0 || e >= count) continue;
        long at = n_order++;
        while (at > 0 && ids[order[at - 1]] > ids[p]) { order[at] = order[at - 1]; at--; }
        order[at] = p;
    }
    float *xe = malloc(2 * (n_order ? n_order : 1) * d * sizeof(float)), *ye = xe + n_order * d;
    for (long s = 0; s < n_order;) {
        long e = ids[order[s]] - first, rows = 0;
        for (long r = s; r < n_order && ids[order[r]] - first == e; r++, rows++)
            memcpy(xe + rows * d, x + order[r] / topk * d, d * sizeof(float));
        swiglu(bits, xe, pick(bits, gate, gate_scale, e, inter, d), pick(bits, up, up_scale, e, inter, d),
               pick(bits, down, down_scale, e, d, inter), ye, rows, d, inter);
        for (long r = 0; r < rows; r++) {
            long p = order[s + r];
            float w = weights[p], *o = out + p / topk * d;
            for (long c = 0; c < d; c++) o[c] += w * ye[r * d + c];
        }
        s += rows;
    }
    free(xe);
    free(order);
}
