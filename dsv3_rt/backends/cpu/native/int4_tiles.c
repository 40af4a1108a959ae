/* y = x @ W.T for a 4-bit weight stored in tiles of 16 rows x 64 columns ("int4_tiles"), with AVX-512 VNNI.
 *
 * A tile is 576 bytes: the 16 rows' bf16 scales, their bf16 minimums, then 8 chunks of 64 bytes; byte 4r + i
 * of chunk j holds q[r][8j + i] (low nibble) and q[r][8j + 4 + i] (high nibble), w = q * scale + min. Each
 * activation row is rounded to int8 per group of 64 columns (x ~ dx * xq, as llama.cpp rounds activations to
 * Q8 for its 4-bit dot products); one vpdpbusd then multiplies 4 columns of all 16 rows by 4 activations and
 * sums them exactly in int32:
 *   y[r] = sum_g dx_g * (scale[r][g] * sum_c q[r][c] * xq[c] + min[r][g] * sum_c xq[c]).
 * The tiles of one thread are read in address order.
 */
#include <immintrin.h>
#include <stdint.h>

#include "tiles.h"
#include "vmath.h"

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)

#define GROUP 64
#define TILE_BYTES (2 * DSV3_BLOCK_ROWS * 2 + DSV3_BLOCK_ROWS * GROUP / 2) /* scales, minimums, nibbles: 576 */
#define MAX_M 4

extern int dsv3_prefetching; /* Intel only (see int8_tiles.c) */

/* Round each row of x [m, k] to int8 per group of 64 columns (the last one of a row shorter where k % 64 != 0, as
 * int8 weights allow; 4-bit ones are whole groups): xq [m, k], dx [m, groups] (the group's step) and the group's
 * sum of xq. Vectorised, and the same bits as the scalar form: max ignores NaN like fmaxf, vcvtps2dq rounds like
 * nearbyintf, and the int8 store truncates like the (int8_t) cast (a scalar fmaxf call per element took ~15 % of
 * a default-model MoE block). */
void dsv3_int4_quantize(const float *x, long m, long k, int8_t *xq, float *dx, int32_t *xsum) {
    const __m512 magnitude = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    const long groups = (k + GROUP - 1) / GROUP;
    for (long row = 0; row < m; row++)
        for (long g = 0; g < groups; g++) {
            const long c0 = g * GROUP, at = row * k + c0, width = k - c0 < GROUP ? k - c0 : GROUP;
            __mmask16 lanes[GROUP / 16];
            __m512 part[GROUP / 16], amax16 = _mm512_setzero_ps();
            for (int i = 0; i < GROUP / 16; i++) {
                lanes[i] = dsv3_lanes(width - 16 * i);
                part[i] = _mm512_maskz_loadu_ps(lanes[i], x + at + 16 * i);
                amax16 = _mm512_max_ps(_mm512_and_ps(part[i], magnitude), amax16);  /* a NaN lane keeps amax16 */
            }
            const float amax = _mm512_reduce_max_ps(amax16);
            const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            __m512i sum = _mm512_setzero_si512();
            for (int i = 0; i < GROUP / 16; i++) {
                const __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(part[i], inv));  /* 0 in masked lanes */
                _mm_mask_storeu_epi8(xq + at + 16 * i, lanes[i], _mm512_cvtepi32_epi8(q));
                sum = _mm512_add_epi32(sum, q);
            }
            dx[row * groups + g] = amax / 127.0f;
            xsum[row * groups + g] = _mm512_reduce_add_epi32(sum);
        }
}

static inline __attribute__((always_inline)) void tile_rows(const uint8_t *tile, const int8_t *xq,
        const float *dx, const int32_t *xsum, float *y, long n, long k, long n0, long m0, const int mb) {
    const long groups = k / GROUP;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 out[MAX_M];
    for (int m = 0; m < mb; m++) out[m] = _mm512_setzero_ps();
    for (long g = 0; g < groups; g++) {
        const uint8_t *p = tile + g * TILE_BYTES;
        if (dsv3_prefetching)  /* two tiles ahead: 2 GB of tiles, 2 threads, Sapphire Rapids 18.1 -> 19.5 GB/s */
            for (int l = 0; l < TILE_BYTES; l += 64)  /* (never faults past the end) */
                _mm_prefetch((const char *)(p + 2 * TILE_BYTES + l), _MM_HINT_T0);
        /* low and high nibbles in two int32 chains: one chain of 16 dependent vpdpbusd per group held the EPYC at
         * ~21 GB/s from DRAM, two (and no prefetch) ~26 (1408 x 2048 matrices, 2 threads, 4 interleaved runs) */
        __m512i acc[MAX_M], acc_hi[MAX_M];
        for (int m = 0; m < mb; m++) acc[m] = acc_hi[m] = _mm512_setzero_si512();
        for (int j = 0; j < 8; j++) {
            __m512i v = _mm512_loadu_si512(p + 2 * DSV3_BLOCK_ROWS * 2 + 64 * j);
            __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
            for (int m = 0; m < mb; m++) {
                const int8_t *a = xq + (m0 + m) * k + g * GROUP + 8 * j;
                acc[m] = _mm512_dpbusd_epi32(acc[m], lo, _mm512_set1_epi32(*(const int32_t *)a));
                acc_hi[m] = _mm512_dpbusd_epi32(acc_hi[m], hi, _mm512_set1_epi32(*(const int32_t *)(a + 4)));
            }
        }
        for (int m = 0; m < mb; m++) acc[m] = _mm512_add_epi32(acc[m], acc_hi[m]);
        __m512 scale = dsv3_bf16x16(p), mins = dsv3_bf16x16(p + 2 * DSV3_BLOCK_ROWS);
        for (int m = 0; m < mb; m++) {
            long gi = (m0 + m) * groups + g;
            out[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m]), _mm512_mul_ps(scale, _mm512_set1_ps(dx[gi])), out[m]);
            out[m] = _mm512_fmadd_ps(mins, _mm512_set1_ps(dx[gi] * (float)xsum[gi]), out[m]);
        }
    }
    for (int m = 0; m < mb; m++) _mm512_storeu_ps(y + (m0 + m) * n + n0, out[m]);
}

/* All activation rows for weight rows 16b .. 16b + 15, up to MAX_M rows per pass over the tile (one
 * independent block of the product). */
void dsv3_int4_tiles_block(const uint8_t *tiles, const int8_t *xq, const float *dx, const int32_t *xsum, float *y,
                          long m, long n, long k, long b) {
    const uint8_t *tile = tiles + b * (k / GROUP) * TILE_BYTES;
    long m0 = 0;
    for (; m0 + MAX_M <= m; m0 += MAX_M) tile_rows(tile, xq, dx, xsum, y, n, k, b * DSV3_BLOCK_ROWS, m0, MAX_M);
    switch (m - m0) {
        case 3: tile_rows(tile, xq, dx, xsum, y, n, k, b * DSV3_BLOCK_ROWS, m0, 3); break;
        case 2: tile_rows(tile, xq, dx, xsum, y, n, k, b * DSV3_BLOCK_ROWS, m0, 2); break;
        case 1: tile_rows(tile, xq, dx, xsum, y, n, k, b * DSV3_BLOCK_ROWS, m0, 1); break;
    }
}

#endif
