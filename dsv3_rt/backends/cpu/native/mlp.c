/* SwiGLU MLPs over the tiled weight formats: one call per dense MLP and per MoE layer's routed experts, so
 * a decode step (or an MTP verification of a few tokens) spends no interpreter time per expert.
 *
 * mlp(x) = down(silu(gate x) * up x); the routed experts of a layer are stacked [count, ...] and each runs
 * once over the tokens that chose it; out[t] += weight * expert(x[t]), in fp32. The gate and up products of
 * every selected expert share one pass of the thread team, and so do their down products: two team entries
 * per layer instead of three per expert.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "tiles.h"
#include "vmath.h"

void dsv3_int8_tiles_block(const float *x, const int8_t *tiles, const uint16_t *scale, float *y, long m, long n, long k,
                           long b);
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
void dsv3_int4_quantize(const float *x, long m, long k, int8_t *xq, float *dx, int32_t *xsum);
void dsv3_int4_tiles_block(const uint8_t *tiles, const int8_t *xq, const float *dx, const int32_t *xsum, float *y,
                           long m, long n, long k, long b);
void dsv3_int8_corrections(const float *dx, const int32_t *xsum, long m, long k, float *corr);
void dsv3_int8_tiles_block_q(const int8_t *xq, const float *dx, const float *corr, const int8_t *tiles,
                             const uint16_t *scale, float *y, long m, long n, long k, long b);
#endif

/* One matrix of a stack: its bytes (int8: n*k; int4: 576 per 16 x 64 tile) and its bf16 scales (int8 only). */
typedef struct { const uint8_t *data; const uint16_t *scale; } matrix;

static long matrix_bytes(int bits, long n, long k) { return bits == 8 ? n * k : n * k / 1024 * 576; }

static matrix pick(int bits, const void *data, const void *scale, long e, long n, long k) {
    matrix w = { (const uint8_t *)data + e * matrix_bytes(bits, n, k), NULL };
    if (bits == 8) w.scale = (const uint16_t *)scale + e * n;
    return w;
}

/* y [m, n] = x [m, k] @ w.T; for int4 (and int8 with VNNI), x is first rounded to int8 per group (xq, dx, xsum;
 * int8 takes corr, its per-row offset, instead of xsum). */
typedef struct {
    const float *x; matrix w; float *y; long m, n, k;
    int8_t *xq; float *dx; int32_t *xsum; float *corr;
} product;

static long blocks_of(const product *p) { return (p->n + DSV3_BLOCK_ROWS - 1) / DSV3_BLOCK_ROWS; }

/* Block b of product p. */
static void block(int bits, const product *p, long b) {
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
    if (bits == 4) {
        dsv3_int4_tiles_block(p->w.data, p->xq, p->dx, p->xsum, p->y, p->m, p->n, p->k, b);
        return;
    }
    if (p->xq) {
        dsv3_int8_tiles_block_q(p->xq, p->dx, p->corr, (const int8_t *)p->w.data, p->w.scale, p->y, p->m, p->n, p->k, b);
        return;
    }
#endif
    dsv3_int8_tiles_block(p->x, (const int8_t *)p->w.data, p->w.scale, p->y, p->m, p->n, p->k, b);
}

/* Blocks t0 .. t1 - 1 of the products, numbered one product after the other. */
static void blocks(int bits, const product *ps, long t0, long t1) {
    long i = 0, base = 0;
    for (long t = t0; t < t1; t++) {
        while (t - base >= blocks_of(&ps[i])) base += blocks_of(&ps[i++]);
        block(bits, &ps[i], t - base);
    }
}

/* Every block of every product; one thread team for all of them when the work is worth one. */
static void run(int bits, product *ps, long count) {
    long total = 0, work = 0;
    for (long i = 0; i < count; i++) {
        product *p = &ps[i];
        total += blocks_of(p);
        work += p->m * p->n * p->k;
        p->xq = NULL;
#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
        const long groups = (p->k + 63) / 64;  /* both formats round the activations to int8 (see int8_tiles.c) */
        p->xq = malloc(p->m * p->k);
        p->dx = malloc(p->m * groups * sizeof(float));
        p->xsum = malloc(p->m * groups * sizeof(int32_t));
        p->corr = NULL;
        dsv3_int4_quantize(p->x, p->m, p->k, p->xq, p->dx, p->xsum);
        if (bits == 8) {
            p->corr = malloc(p->m * sizeof(float));
            dsv3_int8_corrections(p->dx, p->xsum, p->m, p->k, p->corr);
        }
#endif
    }
    if (work < DSV3_TEAM_WORK || omp_in_parallel()) {  /* see team.h; inside a team (layers.c's greedy step), on this thread */
        blocks(bits, ps, 0, total);
    } else {
        #pragma omp parallel
        {
            long id = omp_get_thread_num(), threads = omp_get_num_threads();
            blocks(bits, ps, total * id / threads, total * (id + 1) / threads);
        }
    }
    for (long i = 0; i < count; i++)
        if (ps[i].xq) {
            free(ps[i].xq);
            free(ps[i].dx);
            free(ps[i].xsum);
            free(ps[i].corr);
        }
}

void dsv3_tiles_matmuls(int bits, long count, const float *const *xs, const long *ms, long k, const void *const *data,
                        const void *const *scale, const long *ns, float *const *ys);

/* y [m, n] = x [m, k] @ w.T for one tiled weight (bits 8: int8_tiles with its bf16 row scales; 4: int4_tiles,
 * VNNI only): the linear layers' entry point, with the same activation rounding and thread team as the MLPs. */
void dsv3_tiles_matmul(int bits, const float *x, const void *data, const void *scale, float *y, long m, long n, long k) {
    dsv3_tiles_matmuls(bits, 1, &x, &m, k, &data, &scale, &n, &y);
}

/* ys[i] [ms[i], ns[i]] = xs[i] [ms[i], k] @ w_i.T for `count` tiled weights of one format, in one pass of the
 * thread team (an MLA block's kv_a and q_a). */
void dsv3_tiles_matmuls(int bits, long count, const float *const *xs, const long *ms, long k, const void *const *data,
                        const void *const *scale, const long *ns, float *const *ys) {
    product ps[count];
    for (long i = 0; i < count; i++)
        ps[i] = (product){ xs[i], { (const uint8_t *)data[i], (const uint16_t *)scale[i] }, ys[i], ms[i], ns[i], k };
    run(bits, ps, count);
}

/* The first index of the largest of y[0 .. n), as torch.argmax (NaN aside: it never wins here). Per lane the
 * strict > keeps a lane's first maximum; across lanes the lowest index among the equal maxima wins. */
long dsv3_argmax(const float *y, long n) {
    __m512 best = _mm512_set1_ps(-INFINITY);
    __m512i at = _mm512_setzero_si512(), idx = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (long c = 0; c < n; c += 16) {
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), dsv3_lanes(n - c), y + c);
        const __mmask16 up = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ);
        best = _mm512_mask_mov_ps(best, up, v);
        at = _mm512_mask_mov_epi32(at, up, idx);
        idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16));
    }
    const float top = _mm512_reduce_max_ps(best);
    const __mmask16 tops = _mm512_cmp_ps_mask(best, _mm512_set1_ps(top), _CMP_EQ_OQ);
    return _mm512_mask_reduce_min_epi32(tops, at);
}

/* ids [m] = the first argmax of each row of x [m, k] @ W.T (a tiled head): Kernels.greedy_tokens. */
void dsv3_tiles_argmax(int bits, const float *x, const void *data, const void *scale, int64_t *ids, long m, long n, long k) {
    float *y = malloc(m * n * sizeof(float));
    dsv3_tiles_matmul(bits, x, data, scale, y, m, n, k);
    for (long r = 0; r < m; r++) ids[r] = dsv3_argmax(y + r * n, n);
    free(y);
}

/* g = silu(g) * u = g / (1 + exp(-g)) * u over n floats. */
static void silu_mul(float *g, const float *u, long n) {
    for (long c = 0; c < n; c += 16) {
        const __mmask16 lanes = dsv3_lanes(n - c);
        const __m512 x = _mm512_maskz_loadu_ps(lanes, g + c);
        const __m512 e = dsv3_exp16(_mm512_sub_ps(_mm512_setzero_ps(), x));
        const __m512 y = _mm512_mul_ps(_mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e)), _mm512_maskz_loadu_ps(lanes, u + c));
        _mm512_mask_storeu_ps(g + c, lanes, y);
    }
}

/* SwiGLU of `count` MLPs at once: mlp i maps xs[i] [ms[i], d] to ys[i] through gate/up/down[i]. */
static void swiglu(int bits, long count, const float *const *xs, const long *ms, const matrix *gate, const matrix *up,
                   const matrix *down, float *const *ys, long d, long inter) {
    long rows = 0;
    for (long i = 0; i < count; i++) rows += ms[i];
    float *h = malloc(2 * rows * inter * sizeof(float));
    product *ps = malloc(2 * count * sizeof(product));
    float *g = h;
    for (long i = 0; i < count; i++) {
        ps[2 * i] = (product){ xs[i], gate[i], g, ms[i], inter, d };
        ps[2 * i + 1] = (product){ xs[i], up[i], g + ms[i] * inter, ms[i], inter, d };
        g += 2 * ms[i] * inter;
    }
    run(bits, ps, 2 * count);
    g = h;
    for (long i = 0; i < count; i++) {
        const float *u = g + ms[i] * inter;
        silu_mul(g, u, ms[i] * inter);
        ps[i] = (product){ g, down[i], ys[i], ms[i], d, inter };
        g += 2 * ms[i] * inter;
    }
    run(bits, ps, count);
    free(ps);
    free(h);
}

void dsv3_mlp(int bits, const float *x, long m, long d, long inter, const void *gate, const void *gate_scale,
              const void *up, const void *up_scale, const void *down, const void *down_scale, float *y) {
    matrix g = pick(bits, gate, gate_scale, 0, inter, d), u = pick(bits, up, up_scale, 0, inter, d),
           w = pick(bits, down, down_scale, 0, d, inter);
    swiglu(bits, 1, &x, &m, &g, &u, &w, &y, d, inter);
}

/* A MoE layer's held (token, slot) pairs grouped by expert: one SwiGLU MLP per selected expert over its tokens' rows
 * (xs, ms, the expert's matrices), its outputs ys[i] [ms[i], d] rows of ye [held, d], pair order[r] at row r. */
typedef struct {
    long held, experts;
    long *order;
    float *xe, *ye;
    const float **xs;
    float **ys;
    long *ms;
    matrix *gs, *us, *ds;
} expert_plan;

/* The plan of the pairs (ids [t, topk]) whose experts are held (first .. first + count - 1), its rows of x gathered;
 * ye: where the experts' outputs go ([held, d]; NULL: a buffer of the plan's own). */
static expert_plan plan_experts(int bits, const float *x, const int64_t *ids, long t, long topk, long first, long count,
                                long d, long inter, const void *gate, const void *gate_scale, const void *up,
                                const void *up_scale, const void *down, const void *down_scale, float *ye) {
    expert_plan p = { 0 };
    const long pairs = t * topk;
    p.order = malloc(pairs * sizeof(long));
    for (long q = 0; q < pairs; q++) {  /* the held pairs, grouped by expert (stable insertion: pairs are few) */
        if (ids[q] - first < 0 || ids[q] - first >= count) continue;
        long at = p.held++;
        while (at > 0 && ids[p.order[at - 1]] > ids[q]) { p.order[at] = p.order[at - 1]; at--; }
        p.order[at] = q;
    }
    const long cap = p.held ? p.held : 1;
    p.xe = malloc((ye ? 1 : 2) * cap * d * sizeof(float));
    p.ye = ye ? ye : p.xe + cap * d;
    p.xs = malloc(cap * sizeof(float *));
    p.ys = malloc(cap * sizeof(float *));
    p.ms = malloc(cap * sizeof(long));
    p.gs = malloc(3 * cap * sizeof(matrix)), p.us = p.gs + cap, p.ds = p.us + cap;
    for (long s = 0; s < p.held; p.experts++) {
        const long e = ids[p.order[s]] - first, i = p.experts;
        long rows = 0;
        p.xs[i] = p.xe + s * d;
        p.ys[i] = p.ye + s * d;
        for (; s + rows < p.held && ids[p.order[s + rows]] - first == e; rows++)
            memcpy(p.xe + (s + rows) * d, x + p.order[s + rows] / topk * d, d * sizeof(float));
        p.ms[i] = rows;
        p.gs[i] = pick(bits, gate, gate_scale, e, inter, d);
        p.us[i] = pick(bits, up, up_scale, e, inter, d);
        p.ds[i] = pick(bits, down, down_scale, e, d, inter);
        s += rows;
    }
    return p;
}

static void plan_free(expert_plan *p) {
    free(p->gs);
    free(p->ms);
    free(p->ys);
    free(p->xs);
    free(p->xe);
    free(p->order);
}

/* out rows [r0, r1) of [t, d] = their pairs' weights * expert outputs, summed in the plan's order. */
static void sum_experts(const expert_plan *p, const float *weights, long topk, long d, float *out, long r0, long r1) {
    memset(out + r0 * d, 0, (r1 - r0) * d * sizeof(float));
    for (long r = 0; r < p->held; r++) {
        const long row = p->order[r] / topk;
        if (row < r0 || row >= r1) continue;
        float w = weights[p->order[r]], *o = out + row * d;
        for (long c = 0; c < d; c++) o[c] += w * p->ye[r * d + c];
    }
}

/* out [t, d] = sum over (token, slot) of weights * expert ids - first, for the held experts. */
void dsv3_moe_experts(int bits, const float *x, const int64_t *ids, const float *weights, long t, long topk,
                      long first, long count, long d, long inter, const void *gate, const void *gate_scale,
                      const void *up, const void *up_scale, const void *down, const void *down_scale, float *out) {
    expert_plan p = plan_experts(bits, x, ids, t, topk, first, count, d, inter, gate, gate_scale, up, up_scale, down,
                                 down_scale, NULL);
    swiglu(bits, p.experts, p.xs, p.ms, p.gs, p.us, p.ds, p.ys, d, inter);
    sum_experts(&p, weights, topk, d, out, 0, t);
    plan_free(&p);
}

/* dsv3_moe_experts, and the shared expert (shared_inter 0: none) into shared [t, d], for a team: each thread plans
 * every pair (the same plan), runs the MLPs i = its id, its id + threads, ... of the selected experts and then the
 * shared one, writing their outputs where the team reads them (ye [t * topk, d]), and after a barrier sums its rows
 * [r0, r1) of out. Each MLP's rows are the sums one thread would make, so out is bit for bit dsv3_moe_experts's. */
void dsv3_moe_experts_team(int bits, const float *x, const int64_t *ids, const float *weights, long t, long topk,
                           long first, long count, long d, long inter, const void *gate, const void *gate_scale,
                           const void *up, const void *up_scale, const void *down, const void *down_scale,
                           long shared_inter, const void *const *shared, float *shared_out, float *ye, float *out,
                           long r0, long r1) {
    const long me = omp_get_thread_num(), threads = omp_get_num_threads();
    expert_plan p = plan_experts(bits, x, ids, t, topk, first, count, d, inter, gate, gate_scale, up, up_scale, down,
                                 down_scale, ye);
    for (long i = me; i < p.experts; i += threads)
        swiglu(bits, 1, &p.xs[i], &p.ms[i], &p.gs[i], &p.us[i], &p.ds[i], &p.ys[i], d, inter);
    if (shared_inter && p.experts % threads == me)
        dsv3_mlp(bits, x, t, d, shared_inter, shared[0], shared[1], shared[2], shared[3], shared[4], shared[5],
                 shared_out);
    #pragma omp barrier
    sum_experts(&p, weights, topk, d, out, r0, r1);
    plan_free(&p);
}
