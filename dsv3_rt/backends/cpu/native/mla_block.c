/* One pre-norm MLA block of a decode step (or an MTP verification, or a chunk on a cached prefix) in one call:
 *   x = rms_norm(h + residual) (rms_norm(h) without a residual);  kv = x @ kv_a.T;  latent = rms_norm(kv[:r]), k_pe = rope(kv[r:]) -> the fused latent cache;
 *   q = rms_norm(x @ q_a.T) @ q_b.T (or x @ q.T);  q_pe roped;  absorbed attention per sequence;  out = o_heads @ o.T
 * with the same C kernels, in the same order, as the op-by-op path (bit-identical to it). Its value is what it
 * leaves out: between a decode step's big weight streams the interpreter's own code and data fall out of the
 * caches, and each of the block's ~15 torch ops and ctypes calls then cost 2x their warm time (bench preset,
 * int8: the block's ops took ~505 us a layer in sequence against ~160 us of weight reads; this call 304 us).
 */
#include <immintrin.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"

void dsv3_tiles_matmul(int bits, const float *x, const void *data, const void *scale, float *y, long m, long n, long k);
void dsv3_tiles_matmuls(int bits, long count, const float *const *xs, const long *ms, long k, const void *const *data,
                        const void *const *scale, const long *ns, float *const *ys);
void dsv3_rms_norm(const float *x, const float *w, float *y, long m, long d, float eps);
void dsv3_add_rms_norm(const float *x, const float *residual, const float *w, float *y, float *sum, long m, long d,
                       float eps);
void dsv3_rope(const float *x, const int64_t *positions, const float *inv_freq, float factor, float *y, long t,
               long rows_per_token, long d);
void dsv3_mla_absorbed(const float *q_nope, const float *q_pe, const void *w_uk, const void *uk_scale,
                       const void *w_uv_t, const void *uv_scale, const float *keys, float *out, long n, long heads,
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
    const void *w_uk, *w_uv_t;         /* fp32 W_UK [heads, dn, r], W_UV^T [heads, r, dv]; or int8 tiles W_UK^T [heads * r, dn], */
    const void *uk_scale, *uv_scale;   /* W_UV [heads * dv, r] with these bf16 row scales (NULL for fp32): see ops.c */
    float *cache;                      /* this layer's fused cache [slots, max_len, r + dr] */
    long max_len, heads, dn, dr, r, dv;
    const float *inv_freq;
    float rope_factor, eps, softmax_scale;
} block_args;

static void project(const tiled *w, const float *x, float *y, long m) {
    if (m > 0) dsv3_tiles_matmul(w->bits, x, w->data, w->scale, y, m, w->n, w->k);
}

/* One call's inputs and buffers, shared by the threads that split its rows. */
typedef struct mla_call {
    const block_args *a;
    const float *h, *residual, *norm;
    float *stream;
    const int64_t *positions;
    const long *spans, *att;  /* att [count][4]: the query rows' spans (slot, start, query row offset, rows) */
    long t, m, count;
    int last_only;
    float *x, *xm, *kv, *q, *qa, *q_nope, *pe, *q_pe, *out;
    int64_t *pos;
    long *written;  /* per thread of a team: the blocks whose latents it has written (layers.c shares one call) */
} mla_call;

/* Publish that this thread's latents of its current block are in the cache, then wait for those of every thread
 * with earlier rows: a row attends to its own position and earlier ones only, and the threads' shares of the rows
 * follow their ids. Where each query row is its own cache row (no last_only), this replaces a barrier: the thread
 * with the first rows never waits, and a late sibling delays the step once, at the team's end, instead of at each
 * of its blocks (the default model's 2-token verification: two barriers in each of 8 layers). */
static void latents_written(const mla_call *c) {
    const long id = omp_get_thread_num(), done = c->written[id] + 1;
    __atomic_store_n(&c->written[id], done, __ATOMIC_RELEASE);
    for (long j = 0; j < id; j++)
        for (long spins = 0; __atomic_load_n(&c->written[j], __ATOMIC_ACQUIRE) < done; spins++)
            if (spins < 4096) _mm_pause(); else sched_yield();  /* yield where the team outnumbers the cores */
}

/* The block for cache rows [c0, c1) (of t: every row enters the cache) and query rows [q0, q1) (of m: the rows that go
 * on through attention). Called by every thread of a team with its share, or once with all rows. The shares' writes
 * that other threads read come before those reads: with last_only, by barriers (a query row copies the normed row of
 * another share; outside a parallel region they do nothing); else each query row is its own thread's cache row, and
 * only the latents of earlier rows are another thread's (latents_written). */
static void block_rows(const mla_call *c, long c0, long c1, long q0, long q1) {
    const block_args *a = c->a;
    const long heads = a->heads, dn = a->dn, dr = a->dr, r = a->r, width = r + dr, qw = dn + dr, d = a->kv_a.k;
    const long lora = a->q_a.data ? a->q_a.n : 0, m = c->m;
    if (c->residual)
        dsv3_add_rms_norm(c->h + c0 * d, c->residual + c0 * d, c->norm, c->x + c0 * d, c->stream + c0 * d, c1 - c0, d, a->eps);
    else
        dsv3_rms_norm(c->h + c0 * d, c->norm, c->x + c0 * d, c1 - c0, d, a->eps);
    if (c->last_only) {
        #pragma omp barrier
    }
    for (long s = 0; s < c->count; s++) {  /* the query rows: all rows, or each sequence's last */
        const long at = c->att[4 * s + 2], rows = c->att[4 * s + 3];
        const long first = c->last_only ? c->spans[4 * s + 2] + c->spans[4 * s + 3] - 1 : at;
        for (long i = at > q0 ? at : q0; i < at + rows && i < q1; i++)
            memcpy(c->xm + i * d, c->x + (first + i - at) * d, d * sizeof(float));
    }
    float *kv = c->kv + c0 * width, *qa = c->qa + q0 * lora;
    if (lora && a->q_a.bits == a->kv_a.bits && c1 > c0 && q1 > q0) {  /* both read x: one pass of the thread team */
        const float *xs[2] = { c->x + c0 * d, c->xm + q0 * d };
        const void *data[2] = { a->kv_a.data, a->q_a.data }, *scale[2] = { a->kv_a.scale, a->q_a.scale };
        const long ms[2] = { c1 - c0, q1 - q0 }, ns[2] = { a->kv_a.n, lora };
        float *ys[2] = { kv, qa };
        dsv3_tiles_matmuls(a->kv_a.bits, 2, xs, ms, d, data, scale, ns, ys);
    } else {
        project(&a->kv_a, c->x + c0 * d, kv, c1 - c0);
        if (lora) project(&a->q_a, c->xm + q0 * d, qa, q1 - q0);
    }
    for (long s = 0; s < c->count; s++) {  /* this step's latents and roped keys into the cache */
        const long slot = c->spans[4 * s], start = c->spans[4 * s + 1], off = c->spans[4 * s + 2], n = c->spans[4 * s + 3];
        for (long i = off > c0 ? off : c0; i < off + n && i < c1; i++) {
            float *row = a->cache + (slot * a->max_len + start + i - off) * width;
            const float *src = c->kv + i * width;
            dsv3_rms_norm(src, a->kv_a_norm, row, 1, r, a->eps);
            dsv3_rope(src + r, c->positions + i, a->inv_freq, a->rope_factor, row + r, 1, 1, dr);
        }
    }
    float *q = c->q + q0 * heads * qw;
    if (lora) {
        float *normed = c->qa + (m + q0) * lora;
        dsv3_rms_norm(qa, a->q_a_norm, normed, q1 - q0, lora, a->eps);
        project(&a->q_b, normed, q, q1 - q0);
    } else {
        project(&a->q_b, c->xm + q0 * d, q, q1 - q0);
    }
    /* split q [m, heads, dn + dr] into q_nope and the roped q_pe */
    for (long i = q0 * heads; i < q1 * heads; i++) {
        memcpy(c->q_nope + i * dn, c->q + i * qw, dn * sizeof(float));
        memcpy(c->pe + i * dr, c->q + i * qw + dn, dr * sizeof(float));
    }
    dsv3_rope(c->pe + q0 * heads * dr, c->pos + q0, a->inv_freq, a->rope_factor, c->q_pe + q0 * heads * dr, q1 - q0, heads, dr);
    if (c->last_only) {
        #pragma omp barrier
    } else {
        latents_written(c);
    }
    /* the heads' outputs [q1 - q0, heads, dv] reuse this share's rows of q (dv <= dn + dr is checked by the caller):
     * the other shares' rows of q may still be in use */
    float *heads_out = c->q + q0 * heads * qw;
    for (long s = 0; s < c->count; s++) {  /* each sequence's query rows in [q0, q1) */
        const long slot = c->att[4 * s], start = c->att[4 * s + 1], at = c->att[4 * s + 2], rows = c->att[4 * s + 3];
        const long lo = at > q0 ? at : q0, hi = at + rows < q1 ? at + rows : q1;
        if (hi > lo)
            dsv3_mla_absorbed(c->q_nope + lo * heads * dn, c->q_pe + lo * heads * dr, a->w_uk, a->uk_scale, a->w_uv_t,
                              a->uv_scale, a->cache + slot * a->max_len * width, heads_out + (lo - q0) * heads * a->dv, hi - lo,
                              heads, dn, dr, r, a->dv, start + lo - at, a->softmax_scale);
    }
    project(&a->o, heads_out, c->out + q0 * a->o.n, q1 - q0);
}

/* c's row tables for its spans: the rows that go on past the cache, their positions (pos [m]) and spans (att). */
static void query_rows(mla_call *c) {
    int64_t *pos = malloc(c->m * sizeof(int64_t));
    long *att = malloc(4 * c->count * sizeof(long));
    for (long s = 0; s < c->count; s++) {
        const long *span = c->spans + 4 * s;  /* slot, start, row offset, length */
        const long n = span[3], first = c->last_only ? span[2] + n - 1 : span[2], rows = c->last_only ? 1 : n;
        const long at = c->last_only ? s : span[2];
        memcpy(pos + at, c->positions + first, rows * sizeof(int64_t));
        const long query[4] = { span[0], span[1] + n - rows, at, rows };
        memcpy(att + 4 * s, query, sizeof query);
    }
    c->pos = pos, c->att = att;
}

/* A call's buffers and row tables for t rows (m of them query rows) of this block's shapes; layers.c shares one
 * between the layers of a stack, whose blocks all have these shapes. */
mla_call *dsv3_mla_call_new(const block_args *a, const int64_t *positions, long t, const long *spans, long count,
                            int last_only) {
    const long heads = a->heads, dn = a->dn, dr = a->dr, r = a->r, qw = dn + dr, d = a->kv_a.k;
    const long m = last_only ? count : t, lora = a->q_a.data ? a->q_a.n : 0;
    mla_call *c = calloc(1, sizeof(mla_call));
    c->a = a, c->positions = positions, c->spans = spans;
    c->t = t, c->m = m, c->count = count, c->last_only = last_only;
    query_rows(c);
    c->x = malloc(t * d * sizeof(float));
    c->xm = malloc(m * d * sizeof(float));
    c->kv = malloc(t * (r + dr) * sizeof(float));
    c->q = malloc(m * heads * qw * sizeof(float));
    c->qa = malloc(2 * m * lora * sizeof(float) + 1);
    c->q_nope = malloc(m * heads * (dn + 2 * dr) * sizeof(float));
    c->pe = c->q_nope + m * heads * dn;
    c->q_pe = c->pe + m * heads * dr;
    c->written = calloc(omp_get_max_threads(), sizeof(long));
    return c;
}

/* A thread's own view of a last_only call c with each sequence's span cut to spans (a greedy step's confirmed rows,
 * known once the step's tokens are: layers.c): c's buffers, with row tables of its own (the same in every thread). Only
 * the spans' rows enter the cache, and each one's last goes on. Freed by dsv3_mla_view_free. */
mla_call *dsv3_mla_view(const mla_call *c, const long *spans) {
    mla_call *v = malloc(sizeof *v);
    *v = *c;
    v->spans = spans;
    query_rows(v);
    return v;
}

/* A view's row tables and itself: all a view owns, and what a call owns besides its buffers. */
void dsv3_mla_view_free(mla_call *v) {
    free((long *)v->att);
    free(v->pos);
    free(v);
}

void dsv3_mla_call_free(mla_call *c) {
    free(c->written);
    free(c->q_nope);
    free(c->qa);
    free(c->q);
    free(c->kv);
    free(c->xm);
    free(c->x);
    dsv3_mla_view_free(c);
}

/* The block `a` over cache rows [c0, c1) and query rows [q0, q1) of a call's buffers (see block_rows): every thread
 * of a team with its share, or one thread with all of them. */
void dsv3_mla_rows(const mla_call *shared, const block_args *a, const float *h, const float *residual, const float *norm,
                   float *stream, float *out, long c0, long c1, long q0, long q1) {
    mla_call c = *shared;
    c.a = a, c.h = h, c.residual = residual, c.norm = norm, c.stream = stream, c.out = out;
    block_rows(&c, c0, c1, q0, q1);
}

/* The largest pass of one row (kv_a with q_a, q_b, o, the attention's two weight products): what team.h compares. */
long dsv3_mla_row_work(const block_args *a) {
    const long lora = a->q_a.data ? a->q_a.n : 0;
    long work = (a->kv_a.n + lora) * a->kv_a.k;
    const long per_row[3] = { a->q_b.n * a->q_b.k, a->o.n * a->o.k, a->heads * (a->dn * a->r + a->r * a->dv) };
    for (int i = 0; i < 3; i++) work = per_row[i] > work ? per_row[i] : work;
    return work;
}

/* The residual stream h [t, D] and residual (NULL in a first layer) -> out [t, o.n] (last_only: [count, o.n], each
 * sequence's last token; every token enters the cache) and stream = h + residual [t, D] (untouched without a
 * residual); norm [D] the block's pre-norm; positions [t]; spans [count][4] = (slot, start, row offset, length).
 * Rows go to threads of their own where the block's products are small (team.h). */
void dsv3_mla_block(const block_args *a, const float *h, const float *residual, const float *norm, float *stream,
                    const int64_t *positions, long t, const long *spans, long count, int last_only, float *out) {
    mla_call *c = dsv3_mla_call_new(a, positions, t, spans, count, last_only);
    if (dsv3_split_rows(t, dsv3_mla_row_work(a))) {
        #pragma omp parallel
        {
            const long id = omp_get_thread_num(), threads = omp_get_num_threads();
            long c0, c1, q0, q1;
            dsv3_share(t, id, threads, &c0, &c1);
            dsv3_share(c->m, id, threads, &q0, &q1);
            dsv3_mla_rows(c, a, h, residual, norm, stream, out, c0, c1, q0, q1);
        }
    } else {
        dsv3_mla_rows(c, a, h, residual, norm, stream, out, 0, t, 0, c->m);
    }
    dsv3_mla_call_free(c);
}
