/* The small per-token ops of a decode step, in fp32: each is a handful of torch ops (a few microseconds of
 * dispatch apiece) around very little arithmetic, so at batch 1 one call each saves most of their time.
 * Semantics are the reference kernels' (dsv3_rt/core/kernels.py).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

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
