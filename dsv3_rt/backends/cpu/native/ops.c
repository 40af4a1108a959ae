/* The small per-token ops of a decode step, in fp32: each is a handful of torch ops (a few microseconds of
 * dispatch apiece) around very little arithmetic, so at batch 1 one call each saves most of their time.
 * Semantics are the reference kernels' (dsv3_rt/core/kernels.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "team.h"
#include "vmath.h"

void dsv3_tiles_matmul(int bits, const float *x, const void *data, const void *scale, float *y, long m, long n, long k);

static float rms_scale(const float *x, long d, float eps) {
    float ss = 0.0f;
    #pragma omp simd reduction(+ : ss)
    for (long c = 0; c < d; c++) ss += x[c] * x[c];
    return 1.0f / sqrtf(ss / (float)d + eps);
}

/* y = x / sqrt(mean(x^2) + eps) * w, per row of x [m, d]. */
void dsv3_rms_norm(const float *x, const float *w, float *y, long m, long d, float eps) {
    for (long r = 0; r < m; r++) {
        const float *xr = x + r * d;
        float s = rms_scale(xr, d, eps);
        for (long c = 0; c < d; c++) y[r * d + c] = xr[c] * s * w[c];
    }
}

/* out [t, d] = eh_proj @ [rms_norm(e, enorm) ; rms_norm(h, hnorm)] per row, eh_proj [d, 2d] a tiled weight (bits 8:
 * int8_tiles with bf16 row scales, 4: int4_tiles): Kernels.mtp_project, the norms and the product this backend's
 * rms_norm and linear compute, in one call (an MTP draft made five torch ops and three C calls of it). */
void dsv3_mtp_project(int bits, const float *e, const float *h, const float *enorm, const float *hnorm, float eps,
                      const void *data, const void *scale, float *out, long t, long d) {
    float *x = malloc(t * 2 * d * sizeof(float));
    for (long i = 0; i < t; i++) {
        dsv3_rms_norm(e + i * d, enorm, x + i * 2 * d, 1, d, eps);
        dsv3_rms_norm(h + i * d, hnorm, x + i * 2 * d + d, 1, d, eps);
    }
    dsv3_tiles_matmul(bits, x, data, scale, out, t, d, 2 * d);
    free(x);
}

/* sum = x + residual; y = rms_norm(sum). */
void dsv3_add_rms_norm(const float *x, const float *residual, const float *w, float *y, float *sum, long m, long d,
                       float eps) {
    for (long i = 0; i < m * d; i++) sum[i] = x[i] + residual[i];
    dsv3_rms_norm(sum, w, y, m, d, eps);
}

/* Indices of the k largest of v[0..n) into out, largest first, ties to the lowest index (a stable sort). */
static void largest(const float *v, long n, long k, long *out) {
    for (long j = 0; j < k; j++) {
        long best = -1;
        for (long i = 0; i < n; i++) {
            int taken = 0;
            for (long p = 0; p < j; p++) taken |= out[p] == i;
            if (!taken && (best < 0 || v[i] > v[best])) best = i;
        }
        out[j] = best;
    }
}

enum { SIGMOID = 0, SOFTMAX = 1 };
enum { TOP2_SUM = 0, GROUP_MAX = 1, NO_GROUPS = 2 };

/* DeepSeek's router per token of x [t, d] over gate [e, d] (see Kernels.moe_route): scores, bias for the
 * choice only, the best topk_group of n_group groups, then top_k; weights [t, top_k], ids [t, top_k]. */
void dsv3_moe_route(const float *x, const float *gate, const float *bias, long t, long d, long e, long top_k,
                    long n_group, long topk_group, int scoring, int group_score, int normalize, float scaling,
                    float *weights, int64_t *ids) {
    float scores[e], choice[e], gscore[n_group > 0 ? n_group : 1];
    long pick[top_k > topk_group ? top_k : topk_group];
    for (long r = 0; r < t; r++) {
        const float *xr = x + r * d;
        float mx = -INFINITY, total = 0.0f;
        for (long i = 0; i < e; i++) {
            float s = 0.0f;
            #pragma omp simd reduction(+ : s)
            for (long c = 0; c < d; c++) s += xr[c] * gate[i * d + c];
            scores[i] = s;
            mx = fmaxf(mx, s);
        }
        for (long i = 0; i < e; i++) {
            if (scoring == SIGMOID) {
                scores[i] = 1.0f / (1.0f + expf(-scores[i]));
            } else {
                scores[i] = expf(scores[i] - mx);
                total += scores[i];
            }
        }
        for (long i = 0; i < e; i++) {
            if (scoring == SOFTMAX) scores[i] /= total;
            choice[i] = scores[i] + (bias ? bias[i] : 0.0f);
        }
        if (n_group > 1 && group_score != NO_GROUPS) {
            long per = e / n_group;
            for (long g = 0; g < n_group; g++) {
                long two[2];
                largest(choice + g * per, per, 2, two);
                gscore[g] = group_score == TOP2_SUM ? choice[g * per + two[0]] + choice[g * per + two[1]] : choice[g * per + two[0]];
            }
            largest(gscore, n_group, topk_group, pick);
            for (long g = 0; g < n_group; g++) {
                int kept = 0;
                for (long p = 0; p < topk_group; p++) kept |= pick[p] == g;
                if (!kept)
                    for (long i = g * per; i < (g + 1) * per; i++) choice[i] = -INFINITY;
            }
        }
        largest(choice, e, top_k, pick);
        float sum = 0.0f;
        for (long j = 0; j < top_k; j++) sum += scores[pick[j]];
        for (long j = 0; j < top_k; j++) {
            ids[r * top_k + j] = pick[j];
            weights[r * top_k + j] = (normalize ? scores[pick[j]] / (sum + 1e-20f) : scores[pick[j]]) * scaling;
        }
    }
}

/* MLA in its absorbed form for tokens on a cached prefix (decode, MTP verification, a chunk after a prefix):
 * token i (at position start + i) of one sequence attends over keys[0 .. start + i], the fused latent cache
 * rows [latent r | roped key dr]. Per head h:
 *   q = [W_UK[h]^T q_nope[i, h], q_pe[i, h]],  p = softmax(scale * keys @ q),  out[i, h] = W_UV[h] (p @ latent)
 * q_nope [n, heads, dn], q_pe [n, heads, dr], out [n, heads, dv]. The two weights are fp32, w_uk = W_UK [heads, dn, r]
 * and w_uv_t = W_UV^T [heads, r, dv] (uk_scale and uv_scale NULL), or int8 tiles with bf16 row scales, w_uk = W_UK^T
 * [heads * r, dn] (uk_scale [heads * r]) and w_uv_t = W_UV [heads * dv, r] (uv_scale [heads * dv]): each head's two
 * products are then the int8 tile kernel's matrix-vector products (with VNNI, its activation rounded per 64 as for
 * every int8 product), where summing fp32 rows widened from int8 one by one took ~half of a bench-preset layer's
 * attention.
 * A work item (one thread's) is one token and a block of HEAD_BLOCK heads, in groups of 4 that read each cached
 * key row once together for the scores and once for the sum (head by head, 16 heads reread a layer's cache 16 times). */
#define HEAD_BLOCK 8

typedef struct {
    const float *q_nope, *q_pe, *keys;
    const void *uk_scale, *uv_scale, *w_uk, *w_uv_t;
    float *out;
    long heads, dn, dr, r, dv, start;
    float scale;
} mla_args;

/* acc[c] += sum_a coef[a] * w[a][c] over the rows of fp32 w [rows, cols]. Whole blocks of 64 columns sum in a local
 * block of constant width that the compiler keeps in registers: summed straight into acc, every row stored and
 * reloaded it. Each acc[c] adds the same products in the same order either way. */
#define COLUMN_BLOCK 64
static inline __attribute__((always_inline)) void add_block(const float *w, const float *coef, long rows, long cols,
                                                            long c0, long width, float *acc) {
    for (long a = 0; a < rows; a++) {
        const float *wa = w + a * cols + c0, ca = coef[a];
        #pragma omp simd
        for (long c = 0; c < width; c++) acc[c] += ca * wa[c];
    }
}

static void add_rows(const float *w, const float *coef, long rows, long cols, float *acc) {
    long c0 = 0;
    for (; c0 + COLUMN_BLOCK <= cols; c0 += COLUMN_BLOCK) {
        float block[COLUMN_BLOCK];
        memcpy(block, acc + c0, sizeof block);
        add_block(w, coef, rows, cols, c0, COLUMN_BLOCK, block);
        memcpy(acc + c0, block, sizeof block);
    }
    if (c0 < cols) add_block(w, coef, rows, cols, c0, cols - c0, acc + c0);  /* the last cols % 64 columns */
}

/* y [rows] = w x for head h: fp32 (x @ w[h], w [heads, cols, rows]) or int8 tiles (w [heads * rows, cols] with bf16
 * row scales). */
static void head_product(const void *w, const void *scale, long h, const float *x, long rows, long cols, float *y) {
    if (scale) {
        dsv3_tiles_matmul(8, x, (const int8_t *)w + h * rows * cols, (const uint16_t *)scale + h * rows, y, 1, rows, cols);
        return;
    }
    for (long c = 0; c < rows; c++) y[c] = 0.0f;
    add_rows((const float *)w + h * rows * cols, x, cols, rows, y);
}

/* p = softmax(p) over n floats, in place. */
static void softmax(float *p, long n) {
    __m512 top = _mm512_set1_ps(-INFINITY), sum = _mm512_setzero_ps();
    for (long j = 0; j < n; j += 16) {
        const __mmask16 lanes = dsv3_lanes(n - j);
        top = _mm512_mask_max_ps(top, lanes, top, _mm512_maskz_loadu_ps(lanes, p + j));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    for (long j = 0; j < n; j += 16) {
        const __mmask16 lanes = dsv3_lanes(n - j);
        const __m512 e = dsv3_exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(lanes, p + j), mx));
        _mm512_mask_storeu_ps(p + j, lanes, e);
        sum = _mm512_mask_add_ps(sum, lanes, sum, e);
    }
    const __m512 total = _mm512_set1_ps(_mm512_reduce_add_ps(sum));
    for (long j = 0; j < n; j += 16) {
        const __mmask16 lanes = dsv3_lanes(n - j);
        _mm512_mask_storeu_ps(p + j, lanes, _mm512_div_ps(_mm512_maskz_loadu_ps(lanes, p + j), total));
    }
}

/* p[b][j] = scale * q[b] . keys[j] for nh (<= 4) heads q [nh, width] and keys [len, width]. Four keys by the nh heads
 * at a time: each loaded vector feeds 4 FMAs (one key row against one query row fed 1 and held the loads to the
 * FMA rate), and the 16 sums reduce together. */
static inline __attribute__((always_inline)) void scores(const float *q, long width, const float *keys, long len,
        float scale, float *p, const int nh) {
    long j = 0;
    for (; j + 4 <= len; j += 4) {
        __m512 acc[16];  /* acc[4 * key + head]: dsv3_hsum16_transposed puts its sum in lane 4 * head + key */
        for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
        for (long c = 0; c < width; c += 16) {
            const __mmask16 lanes = dsv3_lanes(width - c);
            __m512 k[4];
            for (int kk = 0; kk < 4; kk++) k[kk] = _mm512_maskz_loadu_ps(lanes, keys + (j + kk) * width + c);
            for (int b = 0; b < nh; b++) {
                const __m512 qv = _mm512_maskz_loadu_ps(lanes, q + b * width + c);
                for (int kk = 0; kk < 4; kk++) acc[4 * kk + b] = _mm512_fmadd_ps(qv, k[kk], acc[4 * kk + b]);
            }
        }
        float sums[16];
        _mm512_storeu_ps(sums, _mm512_mul_ps(dsv3_hsum16_transposed(acc), _mm512_set1_ps(scale)));
        for (int b = 0; b < nh; b++) memcpy(p + b * len + j, sums + 4 * b, 4 * sizeof(float));
    }
    for (; j < len; j++)
        for (int b = 0; b < nh; b++) {
            float sum = 0.0f;
            #pragma omp simd reduction(+ : sum)
            for (long c = 0; c < width; c++) sum += q[b * width + c] * keys[j * width + c];
            p[b * len + j] = sum * scale;
        }
}

/* latent[b] = sum_j p[b][j] * keys[j][0 .. r) for nh (<= 4) heads. Blocks of 64 columns sum in registers over all
 * the keys, each key block loaded once for the nh heads: summed in memory, every key stored and reloaded the
 * heads' sums, a chain that took ~30 % of the default model's attention. The same FMAs in the same order. */
static inline __attribute__((always_inline)) void weighted_latent(const float *p, long len, const float *keys,
        long width, long r, float *latent, const int nh) {
    for (long c0 = 0; c0 < r; c0 += 64) {
        __mmask16 lanes[4];
        __m512 acc[4][4];
        for (int q = 0; q < 4; q++) {
            lanes[q] = dsv3_lanes(r - c0 - 16 * q);
            for (int b = 0; b < nh; b++) acc[b][q] = _mm512_setzero_ps();
        }
        for (long j = 0; j < len; j++) {
            __m512 k[4];
            for (int q = 0; q < 4; q++) k[q] = _mm512_maskz_loadu_ps(lanes[q], keys + j * width + c0 + 16 * q);
            for (int b = 0; b < nh; b++) {
                const __m512 pj = _mm512_set1_ps(p[b * len + j]);
                for (int q = 0; q < 4; q++) acc[b][q] = _mm512_fmadd_ps(pj, k[q], acc[b][q]);
            }
        }
        for (int b = 0; b < nh; b++)
            for (int q = 0; q < 4; q++) _mm512_mask_storeu_ps(latent + b * r + c0 + 16 * q, lanes[q], acc[b][q]);
    }
}

/* latent [nh, r] = softmax(scale * q @ keys.T) @ keys[:, :r] for nh (<= 4) heads; p [nh, len] the scores. */
static inline __attribute__((always_inline)) void attend(const float *q, long width, const float *keys, long len,
        float scale, long r, float *p, float *latent, const int nh) {
    scores(q, width, keys, len, scale, p, nh);
    for (int b = 0; b < nh; b++) softmax(p + b * len, len);
    weighted_latent(p, len, keys, width, r, latent, nh);
}

/* Token i, heads h0 .. h0 + nh - 1. */
static void mla_heads(const mla_args *m, long i, long h0, long nh) {
    const long r = m->r, dn = m->dn, dr = m->dr, dv = m->dv, width = r + dr, len = m->start + i + 1;
    const float *keys = m->keys;
    float *q = malloc(nh * (width + len + r) * sizeof(float)), *p = q + nh * width, *latent = p + nh * len;
    for (long b = 0; b < nh; b++) {  /* q[b] = [q_nope @ w_uk, q_pe] for head h0 + b */
        long ih = i * m->heads + h0 + b, h = h0 + b;
        float *qb = q + b * width;
        head_product(m->w_uk, m->uk_scale, h, m->q_nope + ih * dn, r, dn, qb);
        memcpy(qb + r, m->q_pe + ih * dr, dr * sizeof(float));
    }
    for (long b = 0; b < nh; b += 4) {  /* groups of up to 4 heads: see scores and weighted_latent */
        float *qb = q + b * width, *pb = p + b * len, *lb = latent + b * r;
        switch (nh - b < 4 ? nh - b : 4) {
            case 4: attend(qb, width, keys, len, m->scale, r, pb, lb, 4); break;
            case 3: attend(qb, width, keys, len, m->scale, r, pb, lb, 3); break;
            case 2: attend(qb, width, keys, len, m->scale, r, pb, lb, 2); break;
            case 1: attend(qb, width, keys, len, m->scale, r, pb, lb, 1); break;
        }
    }
    for (long b = 0; b < nh; b++) {
        float *o = m->out + (i * m->heads + h0 + b) * dv;
        const long h = h0 + b;
        head_product(m->w_uv_t, m->uv_scale, h, latent + b * r, dv, r, o);
    }
    free(q);
}

static void mla_item(const mla_args *m, long t) {
    const long blocks = (m->heads + HEAD_BLOCK - 1) / HEAD_BLOCK, h0 = t % blocks * HEAD_BLOCK;
    mla_heads(m, t / blocks, h0, m->heads - h0 < HEAD_BLOCK ? m->heads - h0 : HEAD_BLOCK);
}

void dsv3_mla_absorbed(const float *q_nope, const float *q_pe, const void *w_uk, const void *uk_scale,
                       const void *w_uv_t, const void *uv_scale, const float *keys, float *out, long n, long heads,
                       long dn, long dr, long r, long dv, long start, float scale) {
    const mla_args m = { q_nope, q_pe, keys, uk_scale, uv_scale, w_uk, w_uv_t, out, heads, dn, dr, r, dv, start, scale };
    const long items = n * ((heads + HEAD_BLOCK - 1) / HEAD_BLOCK);
    /* per token and head: the two weight products (dn x r, r x dv) and the scores and sums over the context;
     * the weights alone are 2 MiB a layer at DeepSeek's shapes, worth both threads even for a short context */
    if (n * heads * (dn * r + r * dv + 2 * (start + n) * (r + dr)) < DSV3_TEAM_WORK) {
        for (long t = 0; t < items; t++) mla_item(&m, t);
    } else {
        #pragma omp parallel for schedule(static)
        for (long t = 0; t < items; t++) mla_item(&m, t);
    }
}

/* Rotate interleaved pairs (x[2j], x[2j+1]) of each row of x [t, rows_per_token, d] by the angle
 * positions[token] * inv_freq[j], scaled by factor (the reference's rope; cos and sin once per token). */
void dsv3_rope(const float *x, const int64_t *positions, const float *inv_freq, float factor, float *y, long t,
               long rows_per_token, long d) {
    float cs[d];
    for (long i = 0; i < t; i++) {
        for (long j = 0; j < d / 2; j++) {
            const float a = (float)positions[i] * inv_freq[j];
            cs[2 * j] = cosf(a) * factor;
            cs[2 * j + 1] = sinf(a) * factor;
        }
        for (long row = 0; row < rows_per_token; row++) {
            const float *xr = x + (i * rows_per_token + row) * d;
            float *yr = y + (i * rows_per_token + row) * d;
            for (long j = 0; j < d; j += 2) {
                yr[j] = xr[j] * cs[j] - xr[j + 1] * cs[j + 1];
                yr[j + 1] = xr[j] * cs[j + 1] + xr[j + 1] * cs[j];
            }
        }
    }
}

/* out [n, d] = rows ids of an int8 table [V, d] times their bf16 row scales (the int8_rowwise embedding). */
void dsv3_embedding_int8(const int8_t *data, const uint16_t *scale, const int64_t *ids, float *out, long n, long d) {
    for (long i = 0; i < n; i++) {
        const int8_t *row = data + ids[i] * d;
        const uint32_t bits = (uint32_t)scale[ids[i]] << 16;
        float s;
        memcpy(&s, &bits, sizeof s);
        for (long c = 0; c < d; c++) out[i * d + c] = (float)row[c] * s;
    }
}
