/* Load-time conversion of a checkpoint matrix into the cpu backend's formats, with the roundings of formats.py:
 * - int8 (formats.quantize_int8): per row, scale = amax / 127 rounded up to bf16 (so the bf16 scale the kernels read
 *   is the one the values were rounded for), q = round-half-even(w / scale) clamped to +-127; the values row-major
 *   ("int8_rowwise") or in blocks of 16 rows, 4 columns at a time ("int8_tiles", see int8_tiles.c);
 * - int4 (formats.quantize_int4_tiles): per row and 64 columns, min rounded down to bf16, scale = (max - min) / 15
 *   rounded up to bf16, q = round-half-even((w - min) / scale) clamped to 0..15, in tiles of 16 rows x 64 columns
 *   (see int4_tiles.c).
 * The same steps in torch, a few rows at a time, made ~60 % of the bench preset's 8.7 s int8 load: a dozen passes
 * over each chunk and a strided copy into the tiles.
 * Sources: fp32, bf16, or FP8 (e4m3fn / e4m3fnuz: the 256 code values in `table`, each times its block's scale, as
 * the reference dequantises). Weights are finite (a NaN would not propagate into the scale as it does in torch). */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vmath.h"

enum { SRC_F32 = 0, SRC_BF16 = 1, SRC_FP8 = 2 };

static inline float bf16_value(uint32_t b) {
    const uint32_t u = b << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t bf16_nearest(float t) {
    uint32_t u;
    memcpy(&u, &t, sizeof u);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* The largest bf16 <= t (finite t): round to nearest even, one step down (toward -inf) if above. */
static inline uint16_t bf16_round_down(float t) {
    uint16_t b = bf16_nearest(t);
    if (bf16_value(b) > t) b = (b & 0x7FFF) == 0 ? 0x8001 : (b & 0x8000) ? b + 1 : b - 1;
    return b;
}

/* The smallest bf16 >= t, for t > 0 (formats.bf16_round_up): round to nearest even, one step up if below. */
static inline uint16_t bf16_round_up(float t) {
    uint16_t b = bf16_nearest(t);
    if (bf16_value(b) < t) b += 1;
    return b;
}

/* Row r of the source as fp32 into x [k]; returns the row's largest |value|. */
static float source_row(int kind, const void *src, const float *table, const float *block_scale, long bn, long bk,
                        long r, long k, float *x) {
    if (kind == SRC_F32) {
        memcpy(x, (const float *)src + r * k, k * sizeof(float));
    } else if (kind == SRC_BF16) {
        const uint16_t *s = (const uint16_t *)src + r * k;
        for (long c = 0; c < k; c += 16) {
            const __mmask16 lanes = dsv3_lanes(k - c);
            const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(lanes, s + c));
            _mm512_mask_storeu_ps(x + c, lanes, _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16)));
        }
    } else {  /* one block of bk columns at a time: its scale once */
        const uint8_t *s = (const uint8_t *)src + r * k;
        const float *bs = block_scale + (r / bn) * ((k + bk - 1) / bk);
        for (long c0 = 0; c0 < k; c0 += bk) {
            const float scale = bs[c0 / bk];
            for (long c = c0; c < c0 + bk && c < k; c++) x[c] = table[s[c]] * scale;
        }
    }
    __m512 top = _mm512_setzero_ps();
    for (long c = 0; c < k; c += 16)
        top = _mm512_max_ps(top, _mm512_abs_ps(_mm512_maskz_loadu_ps(dsv3_lanes(k - c), x + c)));
    return _mm512_reduce_max_ps(top);
}

/* out: n x k int8 (tiled: k % 16 == 0), scale_out: n bf16. */
void dsv3_quantize_int8(int kind, const void *src, const float *table, const float *block_scale, long bn, long bk,
                        long n, long k, int tiled, int8_t *out, uint16_t *scale_out) {
    #pragma omp parallel
    {
        float *x = malloc(k * sizeof(float));
        #pragma omp for schedule(static)
        for (long r = 0; r < n; r++) {
            const float amax = source_row(kind, src, table, block_scale, bn, bk, r, k, x);
            const uint16_t b = bf16_round_up(fmaxf(amax, 1e-30f) / 127.0f);
            scale_out[r] = b;
            const __m512 s = _mm512_set1_ps(bf16_value(b)), lo = _mm512_set1_ps(-127.0f), hi = _mm512_set1_ps(127.0f);
            for (long c = 0; c < k; c += 16) {
                const __mmask16 lanes = dsv3_lanes(k - c);
                __m512 q = _mm512_roundscale_ps(_mm512_div_ps(_mm512_maskz_loadu_ps(lanes, x + c), s),
                                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                q = _mm512_min_ps(_mm512_max_ps(q, lo), hi);
                /* the register form and a byte store: vpmovsdb to memory is microcoded on AMD's Zen 4 */
                const __m128i bytes = _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(q));
                if (!tiled) {
                    _mm_mask_storeu_epi8(out + r * k + c, lanes, bytes);
                    continue;
                }
                /* 4 columns in each of 4 chunks of the row's block, which holds `rows` rows (fewer in a last one) */
                const long rows = n - r / 16 * 16 < 16 ? n - r / 16 * 16 : 16;
                int8_t four[16], *dst = out + (r / 16) * 16 * k + (c / 4) * rows * 4 + (r % 16) * 4;
                _mm_storeu_si128((__m128i *)four, bytes);
                for (int j = 0; j < 4; j++) memcpy(dst + rows * 4 * j, four + 4 * j, 4);
            }
        }
        free(x);
    }
}

/* out: n / 16 x k / 64 tiles of 576 bytes (n % 16 == 0, k % 64 == 0): the 16 rows' bf16 scales, their bf16 minimums,
 * then byte 64 j + 4 r + i holding row r's columns 8 j + i (low nibble) and 8 j + 4 + i (high nibble). */
void dsv3_quantize_int4_tiles(int kind, const void *src, const float *table, const float *block_scale, long bn,
                              long bk, long n, long k, uint8_t *out) {
    #pragma omp parallel
    {
        float *x = malloc(k * sizeof(float));
        #pragma omp for schedule(static)
        for (long r = 0; r < n; r++) {
            source_row(kind, src, table, block_scale, bn, bk, r, k, x);
            for (long g = 0; g < k / 64; g++) {
                const float *v = x + 64 * g;
                __m512 lo = _mm512_loadu_ps(v), hi = lo;
                for (int q = 1; q < 4; q++) {
                    lo = _mm512_min_ps(lo, _mm512_loadu_ps(v + 16 * q));
                    hi = _mm512_max_ps(hi, _mm512_loadu_ps(v + 16 * q));
                }
                const float group_lo = _mm512_reduce_min_ps(lo), group_hi = _mm512_reduce_max_ps(hi);
                const uint16_t low = bf16_round_down(group_lo);
                const float low_f = bf16_value(low);
                const uint16_t scale = bf16_round_up(fmaxf((group_hi - low_f) / 15.0f, 1e-30f));
                uint8_t *tile = out + ((r / 16) * (k / 64) + g) * 576;
                memcpy(tile + 2 * (r % 16), &scale, 2);
                memcpy(tile + 32 + 2 * (r % 16), &low, 2);
                int32_t q[64];
                const __m512 s = _mm512_set1_ps(bf16_value(scale)), m = _mm512_set1_ps(low_f);
                for (int c = 0; c < 64; c += 16) {
                    __m512 y = _mm512_roundscale_ps(_mm512_div_ps(_mm512_sub_ps(_mm512_loadu_ps(v + c), m), s),
                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                    y = _mm512_min_ps(_mm512_max_ps(y, _mm512_setzero_ps()), _mm512_set1_ps(15.0f));
                    _mm512_storeu_si512(q + c, _mm512_cvtps_epi32(y));
                }
                uint8_t *nibbles = tile + 64 + 4 * (r % 16);
                for (int j = 0; j < 8; j++)
                    for (int i = 0; i < 4; i++) nibbles[64 * j + i] = (uint8_t)(q[8 * j + i] | (q[8 * j + 4 + i] << 4));
            }
        }
        free(x);
    }
}
