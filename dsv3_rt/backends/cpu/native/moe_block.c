/* One pre-norm MoE block of a decode step (or an MTP verification or draft) in one call: the norm, DeepSeek's router,
 * the selected routed experts and the shared expert, summed:
 *   x = rms_norm(h + residual);  out = moe_experts(x, moe_route(x)) + shared(x),
 * with the same C kernels, in the same order, as the op-by-op path (bit-identical to it). Like mla_block.c, what it
 * removes is the interpreter between the three: on the default model each of those calls cost 10-25 us of Python,
 * torch and ctypes around 2-8 us of C.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"

void dsv3_moe_route(const float *x, const float *gate, const float *bias, long t, long d, long e, long top_k,
                    long n_group, long topk_group, int scoring, int group_score, int normalize, float scaling,
                    float *weights, int64_t *ids);
void dsv3_moe_experts(int bits, const float *x, const int64_t *ids, const float *weights, long t, long topk,
                      long first, long count, long d, long inter, const void *gate, const void *gate_scale,
                      const void *up, const void *up_scale, const void *down, const void *down_scale, float *out);
void dsv3_moe_experts_team(int bits, const float *x, const int64_t *ids, const float *weights, long t, long topk,
                           long first, long count, long d, long inter, const void *gate, const void *gate_scale,
                           const void *up, const void *up_scale, const void *down, const void *down_scale,
                           long shared_inter, const void *const *shared, float *shared_out, float *ye, float *out,
                           long r0, long r1);
void dsv3_add_rms_norm(const float *x, const float *residual, const float *w, float *y, float *sum, long m, long d,
                       float eps);
void dsv3_mlp(int bits, const float *x, long m, long d, long inter, const void *gate, const void *gate_scale,
              const void *up, const void *up_scale, const void *down, const void *down_scale, float *y);

/* Mirrored by `moe._BlockArgs`. shared_gate NULL: no shared expert. Weights are tiled, all of one `bits`. */
typedef struct moe_args {
    int bits;
    const float *router, *bias;  /* [e, d] fp32; bias [e] or NULL */
    long e, d, top_k, n_group, topk_group;
    int scoring, group_score, normalize;
    float scaling;
    long first, count, inter;    /* the held routed experts: global ids first .. first + count - 1 */
    const void *gate, *gate_scale, *up, *up_scale, *down, *down_scale;
    long shared_inter;
    const void *shared_gate, *shared_gate_scale, *shared_up, *shared_up_scale, *shared_down, *shared_down_scale;
} moe_args;

/* DeepSeek's router under a's settings: weights and ids [t, top_k] for the normed rows x [t, d]. */
static void route(const moe_args *a, const float *x, long t, float *weights, int64_t *ids) {
    dsv3_moe_route(x, a->router, a->bias, t, a->d, a->e, a->top_k, a->n_group, a->topk_group, a->scoring, a->group_score,
                   a->normalize, a->scaling, weights, ids);
}

/* The block over rows of h, residual, stream and out [t, d] (layers.c runs each thread's share of a stack's rows). */
void dsv3_moe_rows(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                   float *stream, long t, float *out) {
    const long d = a->d;
    float *x = malloc(t * d * sizeof(float));
    dsv3_add_rms_norm(h, residual, norm, x, stream, t, d, eps);
    float *weights = malloc(t * a->top_k * sizeof(float) + (a->shared_gate ? t * d * sizeof(float) : 0));
    float *shared = weights + t * a->top_k;
    int64_t *ids = malloc(t * a->top_k * sizeof(int64_t));
    route(a, x, t, weights, ids);
    dsv3_moe_experts(a->bits, x, ids, weights, t, a->top_k, a->first, a->count, d, a->inter, a->gate, a->gate_scale,
                     a->up, a->up_scale, a->down, a->down_scale, out);
    if (a->shared_gate) {
        dsv3_mlp(a->bits, x, t, d, a->shared_inter, a->shared_gate, a->shared_gate_scale, a->shared_up,
                 a->shared_up_scale, a->shared_down, a->shared_down_scale, shared);
        for (long i = 0; i < t * d; i++) out[i] += shared[i];
    }
    free(ids);
    free(weights);
    free(x);
}

/* dsv3_moe_rows over t rows shared by a team whose threads outnumber them (an MTP module's query rows: one per
 * sequence), called by every thread with all t rows once each row's h and residual are written: each normalises and
 * routes every row (the same sums, in a buffer of its own), the selected experts and the shared expert go to the
 * threads in turn (dsv3_moe_experts_team), and each writes its rows [r0, r1) of stream and out. Without it a k = 1
 * step's one MTP row ran its three experts one after the other while the other thread waited; with it the default
 * model's block took 8.9 instead of 10.9 us on the row's thread (in-C timing, 8 alternating rounds). scratch
 * [(t * top_k + t) * d], the team's. */
void dsv3_moe_team_rows(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                        float *stream, long t, float *out, long r0, long r1, float *scratch) {
    const long d = a->d;
    float *x = malloc(2 * t * d * sizeof(float)), *sum = x + t * d;
    dsv3_add_rms_norm(h, residual, norm, x, sum, t, d, eps);
    memcpy(stream + r0 * d, sum + r0 * d, (r1 - r0) * d * sizeof(float));
    float *weights = malloc(t * a->top_k * sizeof(float));
    int64_t *ids = malloc(t * a->top_k * sizeof(int64_t));
    route(a, x, t, weights, ids);
    const void *shared[6] = { a->shared_gate, a->shared_gate_scale, a->shared_up, a->shared_up_scale, a->shared_down,
                              a->shared_down_scale };
    float *shared_out = scratch + t * a->top_k * d;
    dsv3_moe_experts_team(a->bits, x, ids, weights, t, a->top_k, a->first, a->count, d, a->inter, a->gate, a->gate_scale,
                          a->up, a->up_scale, a->down, a->down_scale, a->shared_gate ? a->shared_inter : 0, shared,
                          shared_out, scratch, out, r0, r1);
    if (a->shared_gate)
        for (long i = r0 * d; i < r1 * d; i++) out[i] += shared_out[i];
    free(ids);
    free(weights);
    free(x);
}

/* The floats of dsv3_moe_team_rows's scratch over t rows. */
long dsv3_moe_team_floats(const moe_args *a, long t) {
    return (t * a->top_k + t) * a->d;
}

/* A row's largest pass: the gate and up products of its routed experts, or of the shared expert (team.h). */
long dsv3_moe_row_work(const moe_args *a) {
    const long routed = a->top_k * a->inter;
    return 2 * a->d * (routed > a->shared_inter ? routed : a->shared_inter);
}

/* The residual stream h, residual [t, d] -> out [t, d], this rank's part (the caller's all_reduce sums the ranks),
 * and stream = h + residual; norm [d] the block's pre-norm. Rows go to threads of their own where the block's
 * products are small (team.h). */
void dsv3_moe_block(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                    float *stream, long t, float *out) {
    const long d = a->d;
    if (!dsv3_split_rows(t, dsv3_moe_row_work(a))) {
        dsv3_moe_rows(a, h, residual, norm, eps, stream, t, out);
        return;
    }
    #pragma omp parallel
    {
        long r0, r1;
        dsv3_share(t, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        if (r1 > r0)
            dsv3_moe_rows(a, h + r0 * d, residual + r0 * d, norm, eps, stream + r0 * d, r1 - r0, out + r0 * d);
    }
}
