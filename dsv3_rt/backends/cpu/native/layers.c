/* A decode step's whole stack of decoder layers (or an MTP verification's or draft's) and the norm after it in one
 * call: per layer the MLA block (mla_block.c), then the MoE block (moe_block.c) or a dense layer's add_rms_norm and
 * SwiGLU MLP (mlp.c), the same C kernels in the same order as one call per block (bit-identical to it). What it
 * removes is the interpreter between the blocks: after each block's weight stream its code and data are out of the
 * caches, and on the bench preset (int8, 2 threads) the Python, torch and ctypes work between two blocks' C calls
 * took 20-70 us, ~0.7 ms a token. Where every block's products are too small for the thread team (team.h), each
 * thread runs the whole stack for rows of its own, in one team entry instead of two per layer.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"

typedef struct block_args block_args; /* mla_block.c */
typedef struct moe_args moe_args;     /* moe_block.c */
typedef struct mla_call mla_call;     /* mla_block.c: one call's buffers */

mla_call *dsv3_mla_call_new(const block_args *a, const int64_t *positions, long t, const long *spans, long count,
                            int last_only);
void dsv3_mla_call_free(mla_call *c);
void dsv3_mla_rows(const mla_call *shared, const block_args *a, const float *h, const float *residual, const float *norm,
                   float *stream, float *out, long c0, long c1, long q0, long q1);
long dsv3_mla_row_work(const block_args *a);
void dsv3_moe_rows(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                   float *stream, long t, float *out);
long dsv3_moe_row_work(const moe_args *a);
void dsv3_add_rms_norm(const float *x, const float *residual, const float *w, float *y, float *sum, long m, long d,
                       float eps);
void dsv3_mlp(int bits, const float *x, long m, long d, long inter, const void *gate, const void *gate_scale,
              const void *up, const void *up_scale, const void *down, const void *down_scale, float *y);

/* Mirrored by `layers._LayerArgs`. moe NULL: a dense layer, whose MLP is the tiled weights below. */
typedef struct {
    const block_args *mla;
    const float *attn_norm, *ffn_norm;
    const moe_args *moe;
    int bits;
    long inter;
    const void *gate, *gate_scale, *up, *up_scale, *down, *down_scale;
} layer_args;

/* Whether every block of the stack would give each thread rows of its own (team.h): then the whole stack does,
 * in one team entry, with the MLA blocks' waits as its only ones (a row's FFN reads its own rows only): for the
 * latents of earlier rows, or with last_only at barriers. */
static int split_stack(const layer_args *layers, long n_layers, long t, long d) {
    long work = 0;
    for (long i = 0; i < n_layers; i++) {
        const layer_args *l = &layers[i];
        const long ffn = l->moe ? dsv3_moe_row_work(l->moe) : 2 * d * l->inter, mla = dsv3_mla_row_work(l->mla);
        work = ffn > work ? ffn : work;
        work = mla > work ? mla : work;
    }
    return dsv3_split_rows(t, work);
}

/* The stack over cache rows [c0, c1) and query rows [q0, q1) (of t and m): one thread's share, or all of them. c is
 * the MLA blocks' shared call; buffers as in dsv3_decoder_layers, each thread writing its own rows only. */
static void stack_rows(const layer_args *layers, long n_layers, mla_call *c, const float *h, const float *norm, float eps,
                       const long *spans, long count, int last_only, long d, float *const *bufs, float *normed,
                       float *stream, long c0, long c1, long q0, long q1) {
    float *attn = bufs[0], *x = bufs[1], *attn_stream = bufs[2], *last = bufs[3], *next[2] = { bufs[4], bufs[5] };
    const float *cur = h, *residual = NULL;
    const long rows = q1 - q0;
    for (long i = 0; i < n_layers; i++) {
        const layer_args *l = &layers[i];
        float *o = next[i % 2], *s = next[(i + 1) % 2];
        dsv3_mla_rows(c, l->mla, cur, residual, l->attn_norm, attn_stream, attn, c0, c1, q0, q1);
        const float *r = residual ? attn_stream : cur;  /* without a residual the block's stream is its input */
        if (last_only) {  /* each sequence's last row of the stream (another thread's, perhaps: written before the
                           * MLA block's second barrier) */
            for (long q = q0; q < q1; q++)
                memcpy(last + q * d, r + (spans[4 * q + 2] + spans[4 * q + 3] - 1) * d, d * sizeof(float));
            r = last;
        }
        if (rows > 0) {
            if (l->moe) {
                dsv3_moe_rows(l->moe, attn + q0 * d, r + q0 * d, l->ffn_norm, eps, s + q0 * d, rows, o + q0 * d);
            } else {
                dsv3_add_rms_norm(attn + q0 * d, r + q0 * d, l->ffn_norm, x + q0 * d, s + q0 * d, rows, d, eps);
                dsv3_mlp(l->bits, x + q0 * d, rows, d, l->inter, l->gate, l->gate_scale, l->up, l->up_scale, l->down,
                         l->down_scale, o + q0 * d);
            }
        }
        cur = o;
        residual = s;
    }
    if (rows > 0)
        dsv3_add_rms_norm(cur + q0 * d, residual + q0 * d, norm, normed + q0 * d, stream + q0 * d, rows, d, eps);
}

/* The stream h [t, d] through the layers (no residual before the first: as Kernels.decoder_layers), then norm [d]
 * after them: normed = rms_norm(stream) and stream, the residual stream after the last layer, [m, d] each: m = t, or
 * with last_only (a single layer, an MTP module's) m = count, each sequence's last token (every token enters the
 * cache); positions [t]; spans [count][4] = (slot, start, row offset, length) per sequence. */
void dsv3_decoder_layers(const layer_args *layers, long n_layers, const float *h, const float *norm, float eps,
                         const int64_t *positions, long t, const long *spans, long count, int last_only, long d,
                         float *normed, float *stream) {
    const long m = last_only ? count : t;
    float *scratch = malloc((5 * m + t) * d * sizeof(float));
    float *bufs[6] = { scratch, scratch + m * d, scratch + 2 * m * d, scratch + (2 * m + t) * d,
                       scratch + (3 * m + t) * d, scratch + (4 * m + t) * d };  /* attn, x, attn_stream [t], last, next */
    mla_call *c = dsv3_mla_call_new(layers[0].mla, positions, t, spans, count, last_only);
    if (split_stack(layers, n_layers, t, d)) {
        #pragma omp parallel
        {
            const long id = omp_get_thread_num(), threads = omp_get_num_threads();
            long c0, c1, q0, q1;
            dsv3_share(t, id, threads, &c0, &c1);
            dsv3_share(m, id, threads, &q0, &q1);
            stack_rows(layers, n_layers, c, h, norm, eps, spans, count, last_only, d, bufs, normed, stream, c0, c1, q0, q1);
        }
    } else {  /* all rows on this thread, each product on the team where it is big enough */
        stack_rows(layers, n_layers, c, h, norm, eps, spans, count, last_only, d, bufs, normed, stream, 0, t, 0, m);
    }
    dsv3_mla_call_free(c);
    free(scratch);
}
