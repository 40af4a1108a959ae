/* y = (x @ W.T) * scale for an int8 weight stored in tiles of 4 rows x 16 columns ("int8_tiles").
 *
 * Batch-1 decode is a matrix-vector product bounded by how fast the weight streams from memory. With the
 * rows of a tile interleaved 16 bytes at a time, each thread reads its share of the weight strictly in
 * address order, which the hardware prefetcher follows at close to the machine's read bandwidth (rows read
 * side by side from four separate places reach about half of it). Each weight vector is widened to fp32 once
 * and used for up to 4 activation rows, so an MTP verification of 2 tokens reads the weight once.
 * Sums are fp32, activations fp32, the per-row bf16 scale applies to the sum.
 *
 * With AVX-512 VNNI the activations are rounded to int8 per group of 64 columns first (a row's last group shorter
 * where k % 64 != 0; as for the 4-bit kernel, dsv3_int4_quantize) and one vpdpbusd multiplies a whole 4 x 16
 * tile chunk by them, summing exactly in int32: widening each weight to fp32 took 3 instructions per 16 weights and capped one
 * core at ~10 GB/s from DRAM on a Sapphire Rapids, below its read bandwidth. vpdpbusd wants one unsigned
 * operand, so the weight bytes are flipped to w + 128 in a register and 128 * (the group's sum of xq) is
 * taken off again:  y[r] = scale[r] * sum_g dx_g * (sum_c (w[r][c] + 128) * xq[c] - 128 * xsum_g).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifndef __AVX512F__
#error "the int8 tile kernel needs AVX-512F"
#endif

#define TILE_ROWS 4
#define TILE_COLS 16 /* one zmm of fp32 */
#define MAX_M 4      /* activation rows sharing one widened weight vector */

static inline float bf16_to_float(uint16_t b) {
    uint32_t u = (uint32_t)b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Rows n0..n0+3 of y for activation rows m0..m0+mb-1; `tile` is the 4 x K block of those weight rows. */
static inline __attribute__((always_inline)) void tile_rows(const float *x, const int8_t *tile,
        const uint16_t *scale, float *y, long n, long k, long n0, long m0, const int mb) {
    __m512 acc[MAX_M][TILE_ROWS];
    for (int m = 0; m < mb; m++)
        for (int r = 0; r < TILE_ROWS; r++) acc[m][r] = _mm512_setzero_ps();
    for (long c = 0; c < k; c += TILE_COLS) {
        const int8_t *p = tile + c * TILE_ROWS;
        __m512 xv[MAX_M];
        for (int m = 0; m < mb; m++) xv[m] = _mm512_loadu_ps(x + (m0 + m) * k + c);
        for (int r = 0; r < TILE_ROWS; r++) {
            __m128i q = _mm_loadu_si128((const __m128i *)(p + TILE_COLS * r));
            __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
            for (int m = 0; m < mb; m++) acc[m][r] = _mm512_fmadd_ps(wv, xv[m], acc[m][r]);
        }
    }
    for (int r = 0; r < TILE_ROWS; r++) {
        float s = bf16_to_float(scale[n0 + r]);
        for (int m = 0; m < mb; m++) y[(m0 + m) * n + n0 + r] = _mm512_reduce_add_ps(acc[m][r]) * s;
    }
}

/* All activation rows for weight rows 4b .. 4b + 3, up to MAX_M rows per pass over the tile (one block of
 * the product: blocks are independent, so callers may run them on any thread). */
void dsv3_int8_tiles_block(const float *x, const int8_t *tiles, const uint16_t *scale, float *y, long m, long n, long k,
                          long b) {
    const int8_t *tile = tiles + b * TILE_ROWS * k;
    long m0 = 0;
    for (; m0 + MAX_M <= m; m0 += MAX_M) tile_rows(x, tile, scale, y, n, k, b * TILE_ROWS, m0, MAX_M);
    switch (m - m0) {
        case 3: tile_rows(x, tile, scale, y, n, k, b * TILE_ROWS, m0, 3); break;
        case 2: tile_rows(x, tile, scale, y, n, k, b * TILE_ROWS, m0, 2); break;
        case 1: tile_rows(x, tile, scale, y, n, k, b * TILE_ROWS, m0, 1); break;
    }
}

#if defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define GROUP 64
#define PREFETCH 2048 /* bytes ahead of the group being read (1024-4096 measured the same) */

/* A software prefetch ahead of the stream pays on Intel and costs on AMD, whose L2 stream prefetcher already runs
 * ahead of a sequential read: from DRAM on a Sapphire Rapids (2 threads) 23 -> 27 GB/s with it, on an EPYC ~24 ->
 * ~29 GB/s without it (a plain read: ~30). Products whose weight is in cache measured the same either way. */
int dsv3_prefetching; /* read by the 4-bit kernel too */
__attribute__((constructor)) static void choose_prefetch(void) {
    __builtin_cpu_init();
    dsv3_prefetching = __builtin_cpu_is("intel");
}

/* Sum of each 128-bit lane (one tile row: 4 int32 lanes of column quads) of v. */
static inline __m128 row_sums(__m512 v) {
    __m128 r0 = _mm512_extractf32x4_ps(v, 0), r1 = _mm512_extractf32x4_ps(v, 1);
    __m128 r2 = _mm512_extractf32x4_ps(v, 2), r3 = _mm512_extractf32x4_ps(v, 3);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    return _mm_add_ps(_mm_add_ps(r0, r1), _mm_add_ps(r2, r3));
}

/* out[t][m] += dx_g * (the int32 sums of group g's `steps` 16-column steps) for `tiles` consecutive weight tiles (1 or
 * 2, `stride` bytes apart) and mb activation rows. Two tiles share each activation load (a 128-bit broadcast per row
 * and 16 columns), as in dsv3_int8_tiles_w8a8. Two int32 chains per row (even and odd steps): one chain of four
 * dependent vpdpbusd held a product whose weight is in cache to its latency (512 x 192, one row, with the
 * corrections below: 3.5 -> 2.2 us). `steps` is a constant at each call, so the chains stay in registers (a
 * run-time count spilled them: prefill-128 of the bench preset ran 0.55x). */
static inline __attribute__((always_inline)) void group_q(const int8_t *xq, const float *dx, const int8_t *p, long stride,
        long k, long groups, long g, long m0, const int mb, const int steps, const int tiles, __m512 out[2][MAX_M]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (dsv3_prefetching)
        for (int t = 0; t < tiles; t++)
            for (int l = 0; l < GROUP * TILE_ROWS; l += 64)  /* (prefetches never fault past the end) */
                _mm_prefetch((const char *)(p + t * stride + PREFETCH + l), _MM_HINT_T0);
    __m512i acc[2][MAX_M][2];
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < mb; m++) acc[t][m][0] = acc[t][m][1] = _mm512_setzero_si512();
    for (int c = 0; c < steps; c++) {  /* 4 rows x 16 columns, then the next 16 columns */
        __m512i w[2];
        for (int t = 0; t < tiles; t++) w[t] = _mm512_xor_si512(_mm512_loadu_si512(p + t * stride + c * TILE_COLS * TILE_ROWS), flip);
        for (int m = 0; m < mb; m++) {
            __m512i a = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + (m0 + m) * k + g * GROUP + c * TILE_COLS)));
            for (int t = 0; t < tiles; t++) acc[t][m][c & 1] = _mm512_dpbusd_epi32(acc[t][m][c & 1], w[t], a);
        }
    }
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < mb; m++) {
            __m512i sum = _mm512_add_epi32(acc[t][m][0], acc[t][m][1]);
            out[t][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(dx[(m0 + m) * groups + g]), out[t][m]);
        }
}

static inline __attribute__((always_inline)) void tile_rows_q(const int8_t *xq, const float *dx, const float *corr,
        const int8_t *tile, const uint16_t *scale, float *y, long n, long k, long n0, long m0, const int mb,
        const int tiles) {
    const long full = k / GROUP, groups = (k + GROUP - 1) / GROUP;  /* a row's last group short where k % 64 != 0 */
    const long stride = TILE_ROWS * k;
    __m512 out[2][MAX_M];
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < mb; m++) out[t][m] = _mm512_setzero_ps();
    for (long g = 0; g < full; g++)
        group_q(xq, dx, tile + g * GROUP * TILE_ROWS, stride, k, groups, g, m0, mb, GROUP / TILE_COLS, tiles, out);
    const int8_t *last = tile + full * GROUP * TILE_ROWS;
    switch ((k - full * GROUP) / TILE_COLS) {
        case 3: group_q(xq, dx, last, stride, k, groups, full, m0, mb, 3, tiles, out); break;
        case 2: group_q(xq, dx, last, stride, k, groups, full, m0, mb, 2, tiles, out); break;
        case 1: group_q(xq, dx, last, stride, k, groups, full, m0, mb, 1, tiles, out); break;
    }
    for (int t = 0; t < tiles; t++) {  /* the four rows' bf16 scales, widened to fp32 by a 16-bit shift */
        const long r = n0 + t * TILE_ROWS;
        const __m128 s = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(scale + r))), 16));
        for (int m = 0; m < mb; m++)
            _mm_storeu_ps(y + (m0 + m) * n + r, _mm_mul_ps(_mm_sub_ps(row_sums(out[t][m]), _mm_set1_ps(corr[m0 + m])), s));
    }
}

/* corr[r] = 128 * sum_g dx_g * xsum_g for each activation row: the flip's offset, the same for every weight row. */
void dsv3_int8_corrections(const float *dx, const int32_t *xsum, long m, long k, float *corr) {
    const long groups = (k + GROUP - 1) / GROUP;
    for (long r = 0; r < m; r++) {
        float c = 0.0f;
        for (long g = 0; g < groups; g++) c += 128.0f * dx[r * groups + g] * (float)xsum[r * groups + g];
        corr[r] = c;
    }
}

static inline __attribute__((always_inline)) void block_q(const int8_t *xq, const float *dx, const float *corr,
        const int8_t *tiles, const uint16_t *scale, float *y, long m, long n, long k, long b, const int count) {
    const int8_t *tile = tiles + b * TILE_ROWS * k;
    long m0 = 0;
    for (; m0 + MAX_M <= m; m0 += MAX_M) tile_rows_q(xq, dx, corr, tile, scale, y, n, k, b * TILE_ROWS, m0, MAX_M, count);
    switch (m - m0) {
        case 3: tile_rows_q(xq, dx, corr, tile, scale, y, n, k, b * TILE_ROWS, m0, 3, count); break;
        case 2: tile_rows_q(xq, dx, corr, tile, scale, y, n, k, b * TILE_ROWS, m0, 2, count); break;
        case 1: tile_rows_q(xq, dx, corr, tile, scale, y, n, k, b * TILE_ROWS, m0, 1, count); break;
    }
}

/* dsv3_int8_tiles_block over activations rounded by dsv3_int4_quantize, for blocks b .. b + count - 1 (count 1 or 2:
 * see group_q). Whole products, with the rounding and the thread team, run through dsv3_tiles_matmul (mlp.c), as
 * the 4-bit ones do. */
void dsv3_int8_tiles_block_q(const int8_t *xq, const float *dx, const float *corr, const int8_t *tiles,
                             const uint16_t *scale, float *y, long m, long n, long k, long b, int count) {
    if (count == 2)
        block_q(xq, dx, corr, tiles, scale, y, m, n, k, b, 2);
    else
        block_q(xq, dx, corr, tiles, scale, y, m, n, k, b, 1);
}

/* The four row sums of v's 128-bit lanes (one tile row each), in int32. */
static inline __m128i row_sums_epi32(__m512i v) {
    __m128 r0 = _mm_castsi128_ps(_mm512_extracti32x4_epi32(v, 0)), r1 = _mm_castsi128_ps(_mm512_extracti32x4_epi32(v, 1));
    __m128 r2 = _mm_castsi128_ps(_mm512_extracti32x4_epi32(v, 2)), r3 = _mm_castsi128_ps(_mm512_extracti32x4_epi32(v, 3));
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);  /* moves bits only */
    return _mm_add_epi32(_mm_add_epi32(_mm_castps_si128(r0), _mm_castps_si128(r1)),
                         _mm_add_epi32(_mm_castps_si128(r2), _mm_castps_si128(r3)));
}

/* Rows n0 .. n0 + 4 * tiles - 1 of y (`tiles` consecutive weight tiles, 1 or 2) for activation rows m0 .. m0 + mb - 1.
 * Two tiles share each activation load: a 128-bit broadcast per row and 16 columns fed one vpdpbusd with one tile
 * (1.25 loads per vpdpbusd) and held the kernel below torch's int8 GEMM at 1024 rows. */
static inline __attribute__((always_inline)) void tile_rows_w8a8(const int8_t *xq, const float *xs, const int32_t *xsum,
        const int8_t *tile, const uint16_t *scale, float *y, long n, long k, long n0, long m0, const int mb,
        const int tiles) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[2][MAX_M];  /* one int32 chain per tile and activation row */
    for (int t = 0; t < tiles; t++)
        for (int m = 0; m < mb; m++) acc[t][m] = _mm512_setzero_si512();
    for (long c = 0; c < k; c += TILE_COLS) {
        __m512i w[2];
        for (int t = 0; t < tiles; t++) w[t] = _mm512_xor_si512(_mm512_loadu_si512(tile + t * TILE_ROWS * k + c * TILE_ROWS), flip);
        for (int m = 0; m < mb; m++) {
            const __m512i a = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(xq + (m0 + m) * k + c)));
            for (int t = 0; t < tiles; t++) acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], w[t], a);
        }
    }
    for (int t = 0; t < tiles; t++) {
        const long r = n0 + t * TILE_ROWS;
        const __m128 s = _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)(scale + r))), 16));
        for (int m = 0; m < mb; m++) {
            const __m128i sum = _mm_sub_epi32(row_sums_epi32(acc[t][m]), _mm_set1_epi32(128 * xsum[m0 + m]));
            _mm_storeu_ps(y + (m0 + m) * n + r, _mm_mul_ps(_mm_mul_ps(_mm_cvtepi32_ps(sum), _mm_set1_ps(xs[m0 + m])), s));
        }
    }
}

/* Weight tiles b .. b + tiles - 1 (1 or 2) against activation rows r0 .. r1 - 1. */
static inline __attribute__((always_inline)) void tiles_w8a8(const int8_t *xq, const float *xs, const int32_t *xsum,
        const int8_t *tiles_data, const uint16_t *scale, float *y, long n, long k, long b, long r0, long r1, const int tiles) {
    const int8_t *tile = tiles_data + b * TILE_ROWS * k;
    long m0 = r0;
    for (; m0 + MAX_M <= r1; m0 += MAX_M) tile_rows_w8a8(xq, xs, xsum, tile, scale, y, n, k, b * TILE_ROWS, m0, MAX_M, tiles);
    switch (r1 - m0) {
        case 3: tile_rows_w8a8(xq, xs, xsum, tile, scale, y, n, k, b * TILE_ROWS, m0, 3, tiles); break;
        case 2: tile_rows_w8a8(xq, xs, xsum, tile, scale, y, n, k, b * TILE_ROWS, m0, 2, tiles); break;
        case 1: tile_rows_w8a8(xq, xs, xsum, tile, scale, y, n, k, b * TILE_ROWS, m0, 1, tiles); break;
    }
}

#define W8A8_ROWS 256 /* activation rows a pass over the weight serves: 512 KiB of int8 rows at K = 2048, in L2 */

/* y [m, n] = x [m, k] @ W.T in W8A8: each row of x rounded to int8 with its own step xs = max(amax, 1e-30) / 127,
 * exact int32 sums, then y = float(sum) * xs * scale[r]: bit for bit torch's `_int_mm` form of it (the prefill
 * path it replaces, which untiled the weight 8 MiB at a time for each product). */
void dsv3_int8_tiles_w8a8(const float *x, const int8_t *tiles, const uint16_t *scale, float *y, long m, long n, long k) {
    int8_t *xq = malloc(m * k);
    float *xs = malloc(m * sizeof(float));
    int32_t *xsum = malloc(m * sizeof(int32_t));
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    #pragma omp parallel for schedule(static)
    for (long r = 0; r < m; r++) {
        const float *xr = x + r * k;
        __m512 top = _mm512_setzero_ps();
        for (long c = 0; c < k; c += 16) top = _mm512_max_ps(_mm512_and_ps(_mm512_loadu_ps(xr + c), magnitude), top);
        const float amax = _mm512_reduce_max_ps(top), step = (amax > 1e-30f ? amax : 1e-30f) / 127.0f;
        const __m512 sv = _mm512_set1_ps(step);
        __m512i sum = _mm512_setzero_si512();
        for (long c = 0; c < k; c += 16) {
            const __m512i q = _mm512_cvtps_epi32(_mm512_div_ps(_mm512_loadu_ps(xr + c), sv));  /* x / step, half to even */
            _mm_storeu_si128((__m128i *)(xq + r * k + c), _mm512_cvtepi32_epi8(q));
            sum = _mm512_add_epi32(sum, q);
        }
        xs[r] = step;
        xsum[r] = _mm512_reduce_add_epi32(sum);
    }
    const long blocks = n / TILE_ROWS, pairs = blocks / 2;
    for (long r0 = 0; r0 < m; r0 += W8A8_ROWS) {
        const long r1 = m - r0 < W8A8_ROWS ? m : r0 + W8A8_ROWS;
        #pragma omp parallel for schedule(static)
        for (long p = 0; p < pairs + blocks % 2; p++) {
            if (p < pairs) tiles_w8a8(xq, xs, xsum, tiles, scale, y, n, k, 2 * p, r0, r1, 2);
            else tiles_w8a8(xq, xs, xsum, tiles, scale, y, n, k, blocks - 1, r0, r1, 1);
        }
    }
    free(xsum);
    free(xs);
    free(xq);
}
#endif
