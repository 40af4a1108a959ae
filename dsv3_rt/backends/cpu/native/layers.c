/* A decode step's whole stack of decoder layers (or an MTP verification's) in one call: per layer the MLA block
 * (mla_block.c), then the MoE block (moe_block.c) or a dense layer's add_rms_norm and SwiGLU MLP (mlp.c), the same C
 * kernels in the same order as one call per block (bit-identical to it). What it removes is the interpreter between
 * the blocks: after each block's weight stream its code and data are out of the caches, and on the bench preset
 * (int8, 2 threads) the Python, torch and ctypes work between two blocks' C calls took 20-70 us, ~0.7 ms a token.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct block_args block_args; /* mla_block.c */
typedef struct moe_args moe_args;     /* moe_block.c */

void dsv3_mla_block(const block_args *a, const float *h, const float *residual, const float *norm, float *stream,
                    const int64_t *positions, long t, const long *spans, long count, int last_only, float *out);
void dsv3_moe_block(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                    float *stream, long t, float *out);
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

/* The stream h [t, d] through the layers (no residual before the first: as Kernels.decoder_layers), then norm [d]
 * after them: normed = rms_norm(stream) and stream, the residual stream after the last layer, [m, d] each: m = t, or
 * with last_only (a single layer, an MTP module's) m = count, each sequence's last token (every token enters the
 * cache); positions [t]; spans [count][4] = (slot, start, row offset, length) per sequence. */
void dsv3_decoder_layers(const layer_args *layers, long n_layers, const float *h, const float *norm, float eps,
                         const int64_t *positions, long t, const long *spans, long count, int last_only, long d,
                         float *normed, float *stream) {
    const long m = last_only ? count : t;
    float *scratch = malloc((4 * m + t) * d * sizeof(float));
    float *attn = scratch, *x = attn + m * d, *attn_stream = x + m * d, *next[2] = { attn_stream + t * d, attn_stream + t * d + m * d };
    const float *cur = h, *residual = NULL;
    for (long i = 0; i < n_layers; i++) {
        const layer_args *l = &layers[i];
        float *o = next[i % 2], *s = next[(i + 1) % 2];
        dsv3_mla_block(l->mla, cur, residual, l->attn_norm, attn_stream, positions, t, spans, count, last_only, attn);
        const float *r = residual ? attn_stream : cur;  /* without a residual the block's stream is its input */
        if (last_only) {  /* the stream rows of each sequence's last token, in x until the FFN block reads them */
            for (long q = 0; q < count; q++)
                memcpy(x + q * d, r + (spans[4 * q + 2] + spans[4 * q + 3] - 1) * d, d * sizeof(float));
            memcpy(attn_stream, x, m * d * sizeof(float));
            r = attn_stream;
        }
        if (l->moe) {
            dsv3_moe_block(l->moe, attn, r, l->ffn_norm, eps, s, m, o);
        } else {
            dsv3_add_rms_norm(attn, r, l->ffn_norm, x, s, m, d, eps);
            dsv3_mlp(l->bits, x, m, d, l->inter, l->gate, l->gate_scale, l->up, l->up_scale, l->down, l->down_scale, o);
        }
        cur = o;
        residual = s;
    }
    dsv3_add_rms_norm(cur, residual, norm, normed, stream, m, d, eps);
    free(scratch);
}
