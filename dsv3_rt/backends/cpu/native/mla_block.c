/* One pre-norm MLA block of a decode step (or an MTP verification, or a chunk on a cached prefix) in one call:
 *   x = rms_norm(h + residual) (rms_norm(h) without a residual);  kv = x @ kv_a.T;  latent = rms_norm(kv[:r]), k_pe = rope(kv[r:]) -> the fused latent cache;
 *   q = rms_norm(x @ q_a.T) @ q_b.T (or x @ q.T);  q_pe roped;  absorbed attention per sequence;  out = o_heads @ o.T
 * with the same C kernels, in the same order, as the op-by-op path (bit-identical to it). Its value is what it
 * leaves out: between a decode step's big weight streams the interpreter's own code and data fall out of the
 * caches, and each of the block's ~15 torch ops and ctypes calls then cost 2x their warm time (bench preset,
 * int8: the block's ops took ~505 us a layer in sequence against ~160 us of weight reads; this call 304 us).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

void dsv3_tiles_matmul(int bits, const float *x, const void *data, const void *scale, float *y, long m, long n, long k);
void dsv3_tiles_matmuls(int bits, long count, const float *const *xs, const long *ms, long k, const void *const *data,
                        const void *const *scale, const long *ns, float *const *ys);
void dsv3_rms_norm(const float *x, const float *w, float *y, long m, long d, float eps);
void dsv3_add_rms_norm(const float *x, const float *residual, const float *w, float *y, float *sum, long m, long d,
                       float eps);
void dsv3_rope(const float *x, const int64_t *positions, const float *inv_freq, float factor, float *y, long t,
               long rows_per_token, long d);
void dsv3_mla_absorbed(const float *q_nope, const float *q_pe, const void *w_uk, const float *uk_scale,
                       const void *w_uv_t, const float *uv_scale, const float *keys, float *out, long n, long heads,
                       long dn, long dr, long r, long dv, long start, float scale);

/* A tiled weight [n, k] (bits 8: int8_tiles and its bf16 row scales; 4: int4_tiles, scale NULL). */
typedef struct {
    int bits;
    const void *data, *scale;
    long n, k;
} tiled;

/* Mirrored by `attention._BlockArgs`. q_a.data NULL: no query compression, q_b is the whole query projection. */
typedef struct {
    tiled q_a, q_b, kv_a, o;
    const float *q_a_norm, *kv_a_norm;
    const void *w_uk, *w_uv_t;         /* [heads, dn, r], [heads, r, dv]: fp32, or int8 with the scales below */
    const float *uk_scale, *uv_scale;  /* [heads, dn], [heads, r]; NULL for fp32 */
    float *cache;                      /* this layer's fused cache [slots, max_len, r + dr] */
    long max_len, heads, dn, dr, r, dv;
    const float *inv_freq;
    float rope_factor, eps, softmax_scale;
} block_args;

static void project(const tiled *w, const float *x, float *y, long m) {
    dsv3_tiles_matmul(w->bits, x, w->data, w->scale, y, m, w->n, w->k);
}

/* The residual stream h [t, D] and residual (NULL in a first layer) -> out [t, o.n] (last_only: [count, o.n], each
 * sequence's last token; every token enters the cache) and stream = h + residual [t, D] (untouched without a
 * residual); norm [D] the block's pre-norm; positions [t]; spans [count][4] = (slot, start, row offset, length). */
void dsv3_mla_block(const block_args *a, const float *h, const float *residual, const float *norm, float *stream,
                    const int64_t *positions, long t, const long *spans, long count, int last_only, float *out) {
    const long heads = a->heads, dn = a->dn, dr = a->dr, r = a->r, width = r + dr, qw = dn + dr, d = a->kv_a.k;
    const long m = last_only ? count : t, lora = a->q_a.data ? a->q_a.n : 0;
    float *x = malloc(t * d * sizeof(float));
    if (residual)
        dsv3_add_rms_norm(h, residual, norm, x, stream, t, d, a->eps);
    else
        dsv3_rms_norm(h, norm, x, t, d, a->eps);
    /* the rows that go on past the cache (xm, their positions, their spans): all of them, or each sequence's last */
    float *xm = malloc(m * d * sizeof(float));
    int64_t *pos = malloc(m * sizeof(int64_t));
    long *att = malloc(4 * count * sizeof(long));
    for (long s = 0; s < count; s++) {
        const long slot = spans[4 * s], start = spans[4 * s + 1], off = spans[4 * s + 2], n = spans[4 * s + 3];
        const long first = last_only ? off + n - 1 : off, rows = last_only ? 1 : n, at = last_only ? s : off;
        memcpy(xm + at * d, x + first * d, rows * d * sizeof(float));
        memcpy(pos + at, positions + first, rows * sizeof(int64_t));
        const long span[4] = { slot, start + n - rows, at, rows };
        memcpy(att + 4 * s, span, sizeof span);
    }
    float *kv = malloc(t * width * sizeof(float)), *q = malloc(m * heads * qw * sizeof(float));
    float *qa = malloc(2 * m * lora * sizeof(float) + 1);
    if (lora && a->q_a.bits == a->kv_a.bits) {  /* both read x: one pass of the thread team */
        const float *xs[2] = { x, xm };
        const void *data[2] = { a->kv_a.data, a->q_a.data }, *scale[2] = { a->kv_a.scale, a->q_a.scale };
        const long ms[2] = { t, m }, ns[2] = { a->kv_a.n, lora };
        float *ys[2] = { kv, qa };
        dsv3_tiles_matmuls(a->kv_a.bits, 2, xs, ms, d, data, scale, ns, ys);
    } else {
        project(&a->kv_a, x, kv, t);
        if (lora) project(&a->q_a, xm, qa, m);
    }
    for (long s = 0; s < count; s++) {  /* this step's latents and roped keys into the cache */
        const long slot = spans[4 * s], start = spans[4 * s + 1], off = spans[4 * s + 2], n = spans[4 * s + 3];
        for (long i = 0; i < n; i++) {
            float *row = a->cache + (slot * a->max_len + start + i) * width;
            const float *src = kv + (off + i) * width;
            dsv3_rms_norm(src, a->kv_a_norm, row, 1, r, a->eps);
            dsv3_rope(src + r, positions + off + i, a->inv_freq, a->rope_factor, row + r, 1, 1, dr);
        }
    }
    if (lora) {
        dsv3_rms_norm(qa, a->q_a_norm, qa + m * lora, m, lora, a->eps);
        project(&a->q_b, qa + m * lora, q, m);
    } else {
        project(&a->q_b, xm, q, m);
    }
    /* split q [m, heads, dn + dr] into q_nope and the roped q_pe */
    float *q_nope = malloc(m * heads * (dn + 2 * dr) * sizeof(float)), *pe = q_nope + m * heads * dn, *q_pe = pe + m * heads * dr;
    for (long i = 0; i < m * heads; i++) {
        memcpy(q_nope + i * dn, q + i * qw, dn * sizeof(float));
        memcpy(pe + i * dr, q + i * qw + dn, dr * sizeof(float));
    }
    dsv3_rope(pe, pos, a->inv_freq, a->rope_factor, q_pe, m, heads, dr);
    float *heads_out = q;  /* [m, heads, dv] reuses q's buffer (dv <= dn + dr is checked by the caller) */
    for (long s = 0; s < count; s++) {
        const long slot = att[4 * s], start = att[4 * s + 1], off = att[4 * s + 2], n = att[4 * s + 3];
        dsv3_mla_absorbed(q_nope + off * heads * dn, q_pe + off * heads * dr, a->w_uk, a->uk_scale, a->w_uv_t,
                          a->uv_scale, a->cache + slot * a->max_len * width, heads_out + off * heads * a->dv, n, heads,
                          dn, dr, r, a->dv, start, a->softmax_scale);
    }
    project(&a->o, heads_out, out, m);
    free(q_nope);
    free(qa);
    free(q);
    free(kv);
    free(att);
    free(pos);
    free(xm);
    free(x);
}
