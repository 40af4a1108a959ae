/* y = (x @ W.T) * scale for an int8 weight stored in tiles of 4 rows x 16 columns ("int8_tiles").
 *
 * Batch-1 decode is a matrix-vector product bounded by how fast the weight streams from memory. With the
 * rows of a tile interleaved 16 bytes at a time, each thread reads its share of the weight strictly in
 * address order, which the hardware prefetcher follows at close to the machine's read bandwidth (rows read
 * side by side from four separate places reach about half of it). Each weight vector is widened to fp32 once
 * and used for up to 4 activation rows, so an MTP verification of 2 tokens reads the weight once.
 * Sums are fp32, activations fp32, the per-row bf16 scale applies to the sum.
 */
#include <immintrin.h>
#include <stdint.h>
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

/* x [m, k] fp32, tiles [n/4, k/16, 4, 16] int8, scale [n] bf16, y [m, n] fp32; n % 4 == 0, k % 16 == 0. */
void dsv3_int8_tiles_matmul(const float *x, const int8_t *tiles, const uint16_t *scale, float *y,
                            long m, long n, long k) {
    if (n * k * m < 65536) {  /* a thread team costs more than it saves (entering one costs ~0.5 us) */
        for (long b = 0; b < n / TILE_ROWS; b++) dsv3_int8_tiles_block(x, tiles, scale, y, m, n, k, b);
        return;
    }
    #pragma omp parallel for schedule(static)
    for (long b = 0; b < n / TILE_ROWS; b++) dsv3_int8_tiles_block(x, tiles, scale, y, m, n, k, b);
}
