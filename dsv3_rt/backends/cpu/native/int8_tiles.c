/* y = (x @ W.T) * scale for an int8 weight stored in blocks of 16 rows, 4 columns at a time ("int8_tiles").
 *
 * A block holds 16 rows; its k columns go in chunks of 4, each chunk 64 bytes where byte 4r + i is w[r][4c + i]. One
 * chunk is one zmm of 16 lanes, each lane one row's 4 columns: vpdpbusd multiplies it by 4 activations at once and
 * adds each row's dot product into that row's own int32 lane, so a block's 16 sums end in one register, with no
 * horizontal reduction. (Tiles of 4 rows x 16 columns needed one per 4 rows: at K = 192, where that and the per-tile
 * work are most of a product, they took twice as long: the default model's 2048-row head share, one thread, 1 row
 * 9.7 -> 4.8 us, 2 rows 11.6 -> 6.5.) Batch-1 decode is a matrix-vector product bounded by how fast the weight
 * streams from memory; each thread reads its share of the blocks strictly in address order, which the hardware
 * prefetcher follows at close to the machine's read bandwidth, and each weight vector serves up to 4 activation
 * rows, so an MTP verification of 2 tokens reads the weight once. The per-row bf16 scale applies to the sum. Where
 * n % 16 != 0 the last block holds the last n % 16 rows, its chunks (n % 16) * 4 bytes each (see tail_block).
 *
 * With AVX-512 VNNI the activations are rounded to int8 per group of 64 columns first (a row's last group shorter
 * where k % 64 != 0; as for the 4-bit kernel, dsv3_int4_quantize) and the sums are exact int32: widening each weight
 * to fp32 took 3 instructions per 16 weights and capped one core at ~10 GB/s from DRAM on a Sapphire Rapids, below its
 * read bandwidth. vpdpbusd wants one unsigned operand, so the weight bytes are flipped to w + 128 in a register and
 * 128 * (the group's sum of xq) is taken off again:  y[r] = scale[r] * (sum_g dx_g * sum_c (w[r][c] + 128) * xq[c]
 * - 128 * sum_g dx_g * xsum_g). Without VNNI the weights widen to fp32 and the sums are fp32.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "tiles.h"
#include "vmath.h"

#ifndef __AVX512F__
#error "the int8 tile kernel needs AVX-512F"
#endif

#define CHUNK_COLS 4 /* a chunk: 16 rows x 4 columns, one zmm */
#define MAX_M 4      /* activation rows sharing one weight vector */

/* Sum of each 128-bit lane (4 floats) of v. */
static inline __m128 lane_sums(__m512 v) {
    __m128 r0 = _mm512_extractf32x4_ps(v, 0), r1 = _mm512_extractf32x4_ps(v, 1);
    __m128 r2 = _mm512_extractf32x4_ps(v, 2), r3 = _mm512_extractf32x4_ps(v, 3);
    _MM_TRANSPOSE4_PS(r0, r1, r2, r3);
    return _mm_add_ps(_mm_add_ps(r0, r1), _mm_add_ps(r2, r3));
}

/* Rows n0 .. n0 + 15 of y for activation rows m0 .. m0 + mb - 1 in fp32; `block` is those weight rows. A quarter of a
 * chunk (16 bytes: rows 4q .. 4q + 3, 4 columns each) widens to one zmm against the 4 activations broadcast per lane. */
static inline __attribute__((always_inline)) void block_rows_f32(const float *x, const int8_t *block,
        const uint16_t *scale, float *y, long n, long k, long n0, long m0, const int mb) {
    __m512 acc[MAX_M][4];  /* acc[m][q]: lane 4 * (row % 4) + column % 4 of rows 4q .. 4q + 3 */
    for (int m = 0; m < mb; m++)
        for (int q = 0; q < 4; q++) acc[m][q] = _mm512_setzero_ps();
    for (long c = 0; c < k; c += CHUNK_COLS) {
        const int8_t *p = block + c * DSV3_BLOCK_ROWS;
        __m512 xv[MAX_M];
        for (int m = 0; m < mb; m++) xv[m] = _mm512_broadcast_f32x4(_mm_loadu_ps(x + (m0 + m) * k + c));
        for (int q = 0; q < 4; q++) {
            const __m512 wv = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16 * q))));
            for (int m = 0; m < mb; m++) acc[m][q] = _mm512_fmadd_ps(wv, xv[m], acc[m][q]);
        }
    }
    float s[DSV3_BLOCK_ROWS];
    _mm512_storeu_ps(s, dsv3_bf16x16(scale + n0));
    for (int q = 0; q < 4; q++)
        for (int m = 0; m < mb; m++)
            _mm_storeu_ps(y + (m0 + m) * n + n0 + 4 * q, _mm_mul_ps(lane_sums(acc[m][q]), _mm_loadu_ps(s + 4 * q)));
}

/* A matrix's last block where n % 16 != 0 (a draft vocabulary's head): the kernels read whole blocks, so it runs as a
 * copy widened to 16 rows (zeros after its own) with its scales, into 16 columns of scratch output of which its own
 * rows are then copied out. At most one block a product, and only for such a matrix. */
typedef struct {
    int8_t *data; /* [16 * k] */
    uint16_t scale[DSV3_BLOCK_ROWS];
    float *y;     /* [m, 16] */
    long rows;
} tail_block;

static int is_tail(long n, long b) { return n - b * DSV3_BLOCK_ROWS < DSV3_BLOCK_ROWS; }

static tail_block tail_new(const int8_t *tiles, const uint16_t *scale, long m, long n, long k, long b) {
    tail_block t = { calloc(DSV3_BLOCK_ROWS * k, 1), { 0 }, malloc(m * DSV3_BLOCK_ROWS * sizeof(float)), n - b * DSV3_BLOCK_ROWS };
    const int8_t *src = tiles + b * DSV3_BLOCK_ROWS * k;
    for (long c = 0; c < k / CHUNK_COLS; c++) memcpy(t.data + 64 * c, src + c * t.rows * CHUNK_COLS, t.rows * CHUNK_COLS);
    memcpy(t.scale, scale + b * DSV3_BLOCK_ROWS, t.rows * sizeof(uint16_t));
    return t;
}

/* Rows r0 .. r1 - 1 of the tail's output into y [.., n] at column n0, and its buffers freed. */
static void tail_done(tail_block *t, float *y, long r0, long r1, long n, long n0) {
    for (long r = r0; r < r1; r++) memcpy(y + r * n + n0, t->y + r * DSV3_BLOCK_ROWS, t->rows * sizeof(float));
    free(t->y);
    free(t->data);
}

/* All activation rows for the 16 weight rows of `block` (output columns n0 .. n0 + 15), up to MAX_M rows a pass. */
static void whole_block_f32(const float *x, const int8_t *block, const uint16_t *scale, float *y, long m, long n, long k,
                            long n0) {
    long m0 = 0;
    for (; m0 + MAX_M <= m; m0 += MAX_M) block_rows_f32(x, block, scale, y, n, k, n0, m0, MAX_M);
    switch (m - m0) {
        case 3: block_rows_f32(x, block, scale, y, n, k, n0, m0, 3); break;
        case 2: block_rows_f32(x, block, scale, y, n, k, n0, m0, 2); break;
        case 1: block_rows_f32(x, block, scale, y, n, k, n0, m0, 1); break;
    }
}

/* All activation rows for weight rows 16b .. 16b + 15 (one block of the product: blocks are independent, so callers
 * may run them on any thread). */
void dsv3_int8_tiles_block(const float *x, const int8_t *tiles, const uint16_t *scale, float *y, long m, long n, long k,
                          long b) {
    if (is_tail(n, b)) {
        tail_block t = tail_new(tiles, scale, m, n, k, b);
        whole_block_f32(x, t.data, t.scale, t.y, m, DSV3_BLOCK_ROWS, k, 0);
        tail_done(&t, y, 0, m, n, b * DSV3_BLOCK_ROWS);
        return;
    }
    whole_block_f32(x, tiles + b * DSV3_BLOCK_ROWS * k, scale, y, m, n, k, b * DSV3_BLOCK_ROWS);
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

/* 4 activations of row m at column c, in every lane. */
static inline __m512i quad(const int8_t *xq, long k, long m, long c) {
    int32_t v;
    __builtin_memcpy(&v, xq + m * k + c, sizeof v);
    return _mm512_set1_epi32(v);
}

/* out[m] += dx_g * (the int32 sums of group g's `chunks` chunks) for one block and mb activation rows. Two int32
 * chains per row (even and odd chunks): one chain of dependent vpdpbusd holds a product whose weight is in cache to
 * its latency. The chains are named, not indexed by chunk: where the compiler does not unroll the chunk loop (from 3
 * rows) an index kept them in memory, 1.8x the time. */
static inline __attribute__((always_inline)) void group_q(const int8_t *xq, const float *dx, const int8_t *p, long k,
        long groups, long g, long m0, const int mb, const int chunks, __m512 out[MAX_M]) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    if (dsv3_prefetching)
        for (int l = 0; l < chunks * 64; l += 64)  /* (prefetches never fault past the end) */
            _mm_prefetch((const char *)(p + PREFETCH + l), _MM_HINT_T0);
    __m512i even[MAX_M], odd[MAX_M];
    for (int m = 0; m < mb; m++) even[m] = odd[m] = _mm512_setzero_si512();
    for (int c = 0; c < chunks; c += 2) {  /* chunks is even */
        const __m512i w0 = _mm512_xor_si512(_mm512_loadu_si512(p + 64 * c), flip);
        const __m512i w1 = _mm512_xor_si512(_mm512_loadu_si512(p + 64 * c + 64), flip);
        for (int m = 0; m < mb; m++) {
            even[m] = _mm512_dpbusd_epi32(even[m], w0, quad(xq, k, m0 + m, g * GROUP + CHUNK_COLS * c));
            odd[m] = _mm512_dpbusd_epi32(odd[m], w1, quad(xq, k, m0 + m, g * GROUP + CHUNK_COLS * c + CHUNK_COLS));
        }
    }
    for (int m = 0; m < mb; m++)
        out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(even[m], odd[m])),
                                 _mm512_set1_ps(dx[(m0 + m) * groups + g]), out[m]);
}

static inline __attribute__((always_inline)) void block_rows_q(const int8_t *xq, const float *dx, const float *corr,
        const int8_t *block, const uint16_t *scale, float *y, long n, long k, long n0, long m0, const int mb) {
    const long full = k / GROUP, groups = (k + GROUP - 1) / GROUP;  /* a row's last group short where k % 64 != 0 */
    __m512 out[MAX_M];
    for (int m = 0; m < mb; m++) out[m] = _mm512_setzero_ps();
    for (long g = 0; g < full; g++)
        group_q(xq, dx, block + g * GROUP * DSV3_BLOCK_ROWS, k, groups, g, m0, mb, GROUP / CHUNK_COLS, out);
    const int8_t *last = block + full * GROUP * DSV3_BLOCK_ROWS;
    switch ((k - full * GROUP) / 16) {  /* k % 16 == 0 */
        case 3: group_q(xq, dx, last, k, groups, full, m0, mb, 12, out); break;
        case 2: group_q(xq, dx, last, k, groups, full, m0, mb, 8, out); break;
        case 1: group_q(xq, dx, last, k, groups, full, m0, mb, 4, out); break;
    }
    const __m512 s = dsv3_bf16x16(scale + n0);
    for (int m = 0; m < mb; m++)
        _mm512_storeu_ps(y + (m0 + m) * n + n0, _mm512_mul_ps(_mm512_sub_ps(out[m], _mm512_set1_ps(corr[m0 + m])), s));
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

static void whole_block_q(const int8_t *xq, const float *dx, const float *corr, const int8_t *block,
                          const uint16_t *scale, float *y, long m, long n, long k, long n0) {
    long m0 = 0;
    for (; m0 + MAX_M <= m; m0 += MAX_M) block_rows_q(xq, dx, corr, block, scale, y, n, k, n0, m0, MAX_M);
    switch (m - m0) {
        case 3: block_rows_q(xq, dx, corr, block, scale, y, n, k, n0, m0, 3); break;
        case 2: block_rows_q(xq, dx, corr, block, scale, y, n, k, n0, m0, 2); break;
        case 1: block_rows_q(xq, dx, corr, block, scale, y, n, k, n0, m0, 1); break;
    }
}

/* dsv3_int8_tiles_block over activations rounded by dsv3_int4_quantize. Whole products, with the rounding and the
 * thread team, run through dsv3_tiles_matmul (mlp.c), as the 4-bit ones do. */
void dsv3_int8_tiles_block_q(const int8_t *xq, const float *dx, const float *corr, const int8_t *tiles,
                             const uint16_t *scale, float *y, long m, long n, long k, long b) {
    if (is_tail(n, b)) {
        tail_block t = tail_new(tiles, scale, m, n, k, b);
        whole_block_q(xq, dx, corr, t.data, t.scale, t.y, m, DSV3_BLOCK_ROWS, k, 0);
        tail_done(&t, y, 0, m, n, b * DSV3_BLOCK_ROWS);
        return;
    }
    whole_block_q(xq, dx, corr, tiles + b * DSV3_BLOCK_ROWS * k, scale, y, m, n, k, b * DSV3_BLOCK_ROWS);
}

/* Rows n0 .. n0 + 16 * blocks - 1 of y (`blocks` consecutive weight blocks, 1 or 2) for activation rows m0 .. m0 + mb
 * - 1, one int32 chain per block and row. Two blocks share each activation broadcast (0.75 loads per vpdpbusd at 4
 * rows). */
static inline __attribute__((always_inline)) void block_rows_w8a8(const int8_t *xq, const float *xs, const int32_t *xsum,
        const int8_t *block, const uint16_t *scale, float *y, long n, long k, long n0, long m0, const int mb,
        const int blocks) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[2][MAX_M];
    for (int t = 0; t < blocks; t++)
        for (int m = 0; m < mb; m++) acc[t][m] = _mm512_setzero_si512();
    for (long c = 0; c < k; c += CHUNK_COLS) {
        __m512i w[2];
        for (int t = 0; t < blocks; t++) w[t] = _mm512_xor_si512(_mm512_loadu_si512(block + t * DSV3_BLOCK_ROWS * k + c * DSV3_BLOCK_ROWS), flip);
        for (int m = 0; m < mb; m++) {
            const __m512i a = quad(xq, k, m0 + m, c);
            for (int t = 0; t < blocks; t++) acc[t][m] = _mm512_dpbusd_epi32(acc[t][m], w[t], a);
        }
    }
    for (int t = 0; t < blocks; t++) {
        const long r = n0 + t * DSV3_BLOCK_ROWS;
        const __m512 s = dsv3_bf16x16(scale + r);
        for (int m = 0; m < mb; m++) {
            const __m512i sum = _mm512_sub_epi32(acc[t][m], _mm512_set1_epi32(128 * xsum[m0 + m]));
            _mm512_storeu_ps(y + (m0 + m) * n + r, _mm512_mul_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(sum), _mm512_set1_ps(xs[m0 + m])), s));
        }
    }
}

/* Weight blocks from `block` (1 or 2, output columns from n0) against activation rows r0 .. r1 - 1. */
static inline __attribute__((always_inline)) void blocks_w8a8(const int8_t *xq, const float *xs, const int32_t *xsum,
        const int8_t *block, const uint16_t *scale, float *y, long n, long k, long n0, long r0, long r1, const int blocks) {
    long m0 = r0;
    for (; m0 + MAX_M <= r1; m0 += MAX_M) block_rows_w8a8(xq, xs, xsum, block, scale, y, n, k, n0, m0, MAX_M, blocks);
    switch (r1 - m0) {
        case 3: block_rows_w8a8(xq, xs, xsum, block, scale, y, n, k, n0, m0, 3, blocks); break;
        case 2: block_rows_w8a8(xq, xs, xsum, block, scale, y, n, k, n0, m0, 2, blocks); break;
        case 1: block_rows_w8a8(xq, xs, xsum, block, scale, y, n, k, n0, m0, 1, blocks); break;
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
    const long whole = n / DSV3_BLOCK_ROWS, pairs = whole / 2, items = pairs + whole % 2 + (n % DSV3_BLOCK_ROWS != 0);
    for (long r0 = 0; r0 < m; r0 += W8A8_ROWS) {
        const long r1 = m - r0 < W8A8_ROWS ? m : r0 + W8A8_ROWS;
        #pragma omp parallel for schedule(static)
        for (long p = 0; p < items; p++) {
            const long b = p < pairs ? 2 * p : p == pairs && whole % 2 ? whole - 1 : whole;
            if (b == whole) {  /* the tail */
                tail_block t = tail_new(tiles, scale, m, n, k, b);
                blocks_w8a8(xq, xs, xsum, t.data, t.scale, t.y, DSV3_BLOCK_ROWS, k, 0, r0, r1, 1);
                tail_done(&t, y, r0, r1, n, b * DSV3_BLOCK_ROWS);
            } else if (p < pairs) {
                blocks_w8a8(xq, xs, xsum, tiles + b * DSV3_BLOCK_ROWS * k, scale, y, n, k, b * DSV3_BLOCK_ROWS, r0, r1, 2);
            } else {
                blocks_w8a8(xq, xs, xsum, tiles + b * DSV3_BLOCK_ROWS * k, scale, y, n, k, b * DSV3_BLOCK_ROWS, r0, r1, 1);
            }
        }
    }
    free(xsum);
    free(xs);
    free(xq);
}
#endif
