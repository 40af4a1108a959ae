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
#include "tiles.h"

typedef struct block_args block_args; /* mla_block.c */
typedef struct moe_args moe_args;     /* moe_block.c */
typedef struct mla_call mla_call;     /* mla_block.c: one call's buffers */

mla_call *dsv3_mla_call_new(const block_args *a, const int64_t *positions, long t, const long *spans, long count,
                            int last_only);
void dsv3_mla_call_free(mla_call *c);
mla_call *dsv3_mla_view(const mla_call *c, const long *spans);
void dsv3_mla_view_free(mla_call *v);
void dsv3_mla_rows(const mla_call *shared, const block_args *a, const float *h, const float *residual, const float *norm,
                   float *stream, float *out, long c0, long c1, long q0, long q1);
long dsv3_mla_row_work(const block_args *a);
void dsv3_moe_rows(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                   float *stream, long t, float *out);
long dsv3_moe_row_work(const moe_args *a);
void dsv3_moe_team_rows(const moe_args *a, const float *h, const float *residual, const float *norm, float eps,
                        float *stream, long t, float *out, long r0, long r1, float *scratch);
long dsv3_moe_team_floats(const moe_args *a, long t);
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
 * the MLA blocks' shared call; buffers as in dsv3_decoder_layers, each thread writing its own rows only; bufs[6], with
 * last_only: the team's scratch for an MoE block over fewer query rows than threads (dsv3_moe_team_rows), which every
 * thread then runs over all of them. */
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
        if (bufs[6] && l->moe && count < omp_get_num_threads()) {
            #pragma omp barrier  /* every query row's attn and last, which each thread now reads */
            dsv3_moe_team_rows(l->moe, attn, r, l->ffn_norm, eps, s, count, o, q0, q1, bufs[6]);
        } else if (rows > 0) {
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

/* A stack call's buffers: the scratch stack_rows writes (attn, x, attn_stream [t], last, next; with last_only over an
 * MoE layer, the team's MoE scratch) and the MLA blocks' shared call, for t rows (m = count with last_only, else t). */
typedef struct {
    float *scratch, *bufs[7];
    mla_call *c;
} stack_call;

static stack_call stack_call_new(const layer_args *layers, const int64_t *positions, long t, const long *spans, long count,
                                 int last_only, long d) {
    const long m = last_only ? count : t;
    const long team_moe = last_only && layers[0].moe ? dsv3_moe_team_floats(layers[0].moe, m) : 0;  /* (one layer) */
    stack_call s = { malloc(((5 * m + t) * d + team_moe) * sizeof(float)), { NULL }, NULL };
    float *b = s.scratch;
    float *bufs[7] = { b, b + m * d, b + 2 * m * d, b + (2 * m + t) * d, b + (3 * m + t) * d, b + (4 * m + t) * d,
                       team_moe ? b + (5 * m + t) * d : NULL };
    memcpy(s.bufs, bufs, sizeof bufs);
    s.c = dsv3_mla_call_new(layers[0].mla, positions, t, spans, count, last_only);
    return s;
}

static void stack_call_free(stack_call *s) {
    dsv3_mla_call_free(s->c);
    free(s->scratch);
}

/* The stream h [t, d] through the layers (no residual before the first: as Kernels.decoder_layers), then norm [d]
 * after them: normed = rms_norm(stream) and stream, the residual stream after the last layer, [m, d] each: m = t, or
 * with last_only (a single layer, an MTP module's) m = count, each sequence's last token (every token enters the
 * cache); positions [t]; spans [count][4] = (slot, start, row offset, length) per sequence. */
void dsv3_decoder_layers(const layer_args *layers, long n_layers, const float *h, const float *norm, float eps,
                         const int64_t *positions, long t, const long *spans, long count, int last_only, long d,
                         float *normed, float *stream) {
    const long m = last_only ? count : t;
    stack_call s = stack_call_new(layers, positions, t, spans, count, last_only, d);
    if (split_stack(layers, n_layers, t, d)) {
        #pragma omp parallel
        {
            const long id = omp_get_thread_num(), threads = omp_get_num_threads();
            long c0, c1, q0, q1;
            dsv3_share(t, id, threads, &c0, &c1);
            dsv3_share(m, id, threads, &q0, &q1);
            stack_rows(layers, n_layers, s.c, h, norm, eps, spans, count, last_only, d, s.bufs, normed, stream, c0, c1, q0, q1);
        }
    } else {  /* all rows on this thread, each product on the team where it is big enough */
        stack_rows(layers, n_layers, s.c, h, norm, eps, spans, count, last_only, d, s.bufs, normed, stream, 0, t, 0, m);
    }
    stack_call_free(&s);
}

void dsv3_embedding_int8(const int8_t *data, const uint16_t *scale, const int64_t *ids, float *out, long n, long d);
void dsv3_mtp_project(int bits, const float *e, const float *h, const float *enorm, const float *hnorm, float eps,
                      const void *data, const void *scale, float *out, long t, long d);
void dsv3_tiles_argmax(int bits, const float *x, const void *data, const void *scale, int64_t *ids, long m, long n, long k);
void dsv3_tiles_matmul(int bits, const float *x, const void *data, const void *scale, float *y, long m, long n, long k);
long dsv3_argmax(const float *y, long n);

/* A stack with its embedding (int8_rowwise [vocab, d]: int8 rows, bf16 scales), final norm and head (int8_tiles,
 * `vocab` rows). head_ids: each head row's token (NULL: row i is token i). segments: the rows a head's argmax scores,
 * n_segments (first row, rows) pairs shared out between the threads in order (NULL: every row, the 16-row blocks shared
 * evenly). A draft vocabulary makes both: a head whose rows are arranged so that each thread's share of the main head
 * begins with its share of the draft rows, which the draft then scores while the main head has left them in cache. */
typedef struct {
    const int8_t *embed;
    const uint16_t *embed_scale;
    const layer_args *layers;
    long n_layers;
    const float *norm;
    const void *head, *head_scale;
    long vocab;
    const int64_t *head_ids;
    const long *segments;
    long n_segments;
} model_part;

/* Mirrored by `layers._StepArgs`. mtp.layers NULL: no MTP module. */
typedef struct {
    model_part main, mtp;
    const float *enorm, *hnorm;
    int eh_bits;
    const void *eh, *eh_scale;
} step_args;

/* Whether token `token` scoring v beats the best so far (id < 0: none): the larger score, on a tie the lower token,
 * which keeps torch's first argmax whatever order the head's rows are in. */
static int beats(float v, int64_t token, float best, int64_t id) {
    return id < 0 || v > best || (v == best && token < id);
}

/* The index of y[0 .. n)'s largest value, the one with the lowest token (ids: each index's token; NULL: the index). */
static long token_argmax(const float *y, long n, const int64_t *ids) {
    long i = dsv3_argmax(y, n);
    if (ids) {
        const float top = y[i];
        long equal = 0;
        for (long j = 0; j < n; j++)
            equal += y[j] == top;
        for (long j = i + 1; equal > 1 && j < n; j++)
            if (y[j] == top && ids[j] < ids[i])
                i = j;
    }
    return i;
}

/* Rows [first, first + n) of m's head (those it has) against x [t, d] (whole 16-row blocks, the first n scored): each
 * row's best token folded into value, id [t]. */
static void score_rows(const model_part *m, const float *x, long t, long d, long first, long n, float *value, int64_t *id) {
    if (n > m->vocab - first)
        n = m->vocab - first;
    if (n <= 0)
        return;
    /* whole blocks: n up to a multiple of 16 rows, or to the head's end (whose last block may hold fewer) */
    const long b = DSV3_BLOCK_ROWS, up = (n + b - 1) / b * b, rows = up < m->vocab - first ? up : m->vocab - first;
    const int64_t *ids = m->head_ids ? m->head_ids + first : NULL;
    float *y = malloc(t * rows * sizeof(float));
    dsv3_tiles_matmul(8, x, (const int8_t *)m->head + first * d, (const uint16_t *)m->head_scale + first, y, t, rows, d);
    for (long r = 0; r < t; r++) {
        const long i = token_argmax(y + r * rows, n, ids);
        const int64_t token = ids ? ids[i] : first + i;
        if (beats(y[r * rows + i], token, value[r], id[r]))
            value[r] = y[r * rows + i], id[r] = token;
    }
    free(y);
}

/* ids [t] = each row's first argmax (by token) of x [t, d] @ head.T, every thread of a team calling it once x is
 * written: each scores its share of the head's rows for all rows (the head read once, as in one call's team), then
 * picks the winner of the rows [r0, r1) of its own among the shares' (value, id [threads, t]: each share's best per
 * row, shared by the team; id -1: a share without rows); every (NULL: none), this thread's own copy of all t winners,
 * which it may read without waiting for the other threads' rows of ids. */
static void head_argmax(const model_part *m, const float *x, long t, long d, float *value, int64_t *id, int64_t *ids,
                        long r0, long r1, int64_t *every) {
    const long me = omp_get_thread_num(), threads = omp_get_num_threads();
    #pragma omp barrier
    for (long r = 0; r < t; r++)
        id[me * t + r] = -1;
    long s0, s1;
    if (m->segments) {
        dsv3_share(m->n_segments, me, threads, &s0, &s1);
        for (long s = s0; s < s1; s++)
            score_rows(m, x, t, d, m->segments[2 * s], m->segments[2 * s + 1], value + me * t, id + me * t);
    } else {
        const long b = DSV3_BLOCK_ROWS;
        dsv3_share((m->vocab + b - 1) / b, me, threads, &s0, &s1);
        score_rows(m, x, t, d, b * s0, b * (s1 - s0), value + me * t, id + me * t);  /* (clipped to the head there) */
    }
    #pragma omp barrier
    for (long r = every ? 0 : r0; r < (every ? t : r1); r++) {
        long best = 0;
        for (long j = 1; j < threads; j++)
            if (id[j * t + r] >= 0 && beats(value[j * t + r], id[j * t + r], value[best * t + r], id[best * t + r]))
                best = j;
        if (every)
            every[r] = id[best * t + r];
        if (r >= r0 && r < r1)
            ids[r] = id[best * t + r];
    }
}

/* head_argmax's scratch for a team over t rows: each share's best value and token per row, [threads, t]. */
typedef struct {
    float *value;
    int64_t *id;
} head_shares;

static head_shares head_shares_new(long t) {
    const long n = omp_get_max_threads() * t;
    return (head_shares){ malloc(n * sizeof(float)), malloc(n * sizeof(int64_t)) };
}

static void head_shares_free(head_shares s) {
    free(s.id);
    free(s.value);
}

/* head_argmax from one thread: a team of its own shares the head. */
static void team_head_argmax(const model_part *m, const float *x, long t, long d, int64_t *ids) {
    const head_shares s = head_shares_new(t);
    #pragma omp parallel
    {
        long r0, r1;
        dsv3_share(t, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
        head_argmax(m, x, t, d, s.value, s.id, ids, r0, r1, NULL);
    }
    head_shares_free(s);
}

/* The argmax of m's head for rows [r0, r1) of x [t, d]: shared by the team (value, id: head_argmax's; every: see
 * there), or from this thread (id NULL: every row; a head with arranged rows on a team of its own). */
static void part_head(const model_part *m, const float *x, long t, long d, float *value, int64_t *id, int64_t *ids,
                      long r0, long r1, int64_t *every) {
    if (id)
        head_argmax(m, x, t, d, value, id, ids, r0, r1, every);
    else if (m->head_ids || m->segments)
        team_head_argmax(m, x, t, d, ids);
    else
        dsv3_tiles_argmax(8, x, m->head, m->head_scale, ids, t, m->vocab, d);
}

/* Each sequence's rows that the main model's tokens confirm (AttnBatch.confirmed): its last token, then each draft
 * while it equals the token picked at the row before it. kept: spans with their lengths cut to those rows. */
static void confirmed_spans(const long *spans, long count, const int64_t *ids, const int64_t *tokens, long *kept) {
    for (long s = 0; s < count; s++) {
        const long off = spans[4 * s + 2], n = spans[4 * s + 3];
        long rows = 1;
        while (rows < n && tokens[off + rows - 1] == ids[off + rows])
            rows++;
        memcpy(kept + 4 * s, spans + 4 * s, 3 * sizeof(long));
        kept[4 * s + 3] = rows;
    }
}

/* Rows [r0, r1) of a greedy step (see dsv3_greedy_step): one thread's share of a team, or all rows on this thread (id
 * NULL). mtp: the MTP module's last_only call. work: x, normed, y, the main stack's stream with a module (stream is
 * then its [count, d]) [t, d] each, and the module's normed rows [count, d]. */
static void step_rows(const step_args *a, const stack_call *main, const stack_call *mtp, const int64_t *ids, float eps,
                      long t, const long *spans, long count, long d, float *const *work, float *value, int64_t *id,
                      int64_t *tokens, int64_t *drafts, float *stream, long r0, long r1) {
    float *x = work[0], *normed = work[1], *y = work[2], *mtp_normed = work[4];
    const long rows = r1 - r0;
    dsv3_embedding_int8(a->main.embed, a->main.embed_scale, ids + r0, x + r0 * d, rows, d);
    stack_rows(a->main.layers, a->main.n_layers, main->c, x, a->main.norm, eps, spans, count, 0, d, main->bufs, normed,
               mtp ? work[3] : stream, r0, r1, r0, r1);
    int64_t *every = mtp && id ? malloc(t * sizeof(int64_t)) : NULL;  /* a team's: every row's token, this thread's copy */
    part_head(&a->main, normed, t, d, value, id, tokens, r0, r1, every);
    if (!mtp)
        return;
    const int64_t *picked = every ? every : tokens;
    long q0 = 0, q1 = count;  /* the module's query rows: each sequence's last confirmed row */
    if (id)
        dsv3_share(count, omp_get_thread_num(), omp_get_num_threads(), &q0, &q1);
    long *kept = malloc(4 * count * sizeof(long));
    confirmed_spans(spans, count, ids, picked, kept);
    mla_call *view = dsv3_mla_view(mtp->c, kept);
    if (rows > 0) {  /* (rows past a sequence's confirmed ones too: cheaper than a gather; they stay out of the cache) */
        dsv3_embedding_int8(a->mtp.embed, a->mtp.embed_scale, tokens + r0, x + r0 * d, rows, d);
        dsv3_mtp_project(a->eh_bits, x + r0 * d, normed + r0 * d, a->enorm, a->hnorm, eps, a->eh, a->eh_scale, y + r0 * d,
                         rows, d);
    }
    stack_rows(a->mtp.layers, a->mtp.n_layers, view, y, a->mtp.norm, eps, kept, count, 1, d, mtp->bufs, mtp_normed, stream,
               r0, r1, q0, q1);
    part_head(&a->mtp, mtp_normed, count, d, value, id, drafts, q0, q1, NULL);
    dsv3_mla_view_free(view);
    free(kept);
    free(every);
}

/* Kernels.greedy_step: ids [t] (each sequence's last token and its drafts) through the embedding, the main stack and its
 * norm, tokens [t] = each row's first argmax of the head; with an MTP module, over each sequence's confirmed rows
 * (confirmed_spans), each row's token through its embedding and mtp_project (with the main model's normed row), its
 * layer (last_only at the last confirmed row) and its norm: drafts [count] = the argmax of its head there, stream
 * [count, d] = its layer's output stream there (without: [t, d], the main stack's). The C functions of those ops,
 * each row's sums as in one call per op (bit-identical to it): a decode step, or an MTP verification and the next
 * draft, returns to the interpreter once. Where both stacks split their rows between the threads (team.h), each
 * thread takes its rows through the whole step in one team entry, the heads' vocabulary split between the threads
 * (head_argmax), instead of four team entries (two stacks, two heads). */
void dsv3_greedy_step(const step_args *a, const int64_t *ids, float eps, const int64_t *positions, long t,
                      const long *spans, long count, long d, int64_t *tokens, int64_t *drafts, float *stream) {
    float *buf = malloc(5 * t * d * sizeof(float));
    float *work[5] = { buf, buf + t * d, buf + 2 * t * d, buf + 3 * t * d, buf + 4 * t * d };
    stack_call main = stack_call_new(a->main.layers, positions, t, spans, count, 0, d), mtp = { 0 };
    if (a->mtp.layers)
        mtp = stack_call_new(a->mtp.layers, positions, t, spans, count, 1, d);
    const stack_call *with_mtp = a->mtp.layers ? &mtp : NULL;
    const int split = split_stack(a->main.layers, a->main.n_layers, t, d)
                      && (!with_mtp || split_stack(a->mtp.layers, a->mtp.n_layers, t, d));
    if (split) {
        const head_shares s = head_shares_new(t);
        #pragma omp parallel
        {
            long r0, r1;
            dsv3_share(t, omp_get_thread_num(), omp_get_num_threads(), &r0, &r1);
            step_rows(a, &main, with_mtp, ids, eps, t, spans, count, d, work, s.value, s.id, tokens, drafts, stream, r0, r1);
        }
        head_shares_free(s);
    } else {
        step_rows(a, &main, with_mtp, ids, eps, t, spans, count, d, work, NULL, NULL, tokens, drafts, stream, 0, t);
    }
    if (with_mtp)
        stack_call_free(&mtp);
    stack_call_free(&main);
    free(buf);
}
