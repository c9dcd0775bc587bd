/* Quantized linear layers on AVX2 through integer dot products: y = x @ dequant(W)^T (+ bias).
 *
 * Without AVX-512, widening every int8/int4 weight to fp32 before its multiply-add made the
 * quantized kernels bound by arithmetic, not memory (int4 no faster than int8, and both behind
 * llama.cpp). Here the activations are quantized to int8 in groups of 32 (scale max|x| / 127,
 * round to nearest even), as llama.cpp's Q8 activations are, and vpmaddubsw multiplies four
 * int8 activations with four weights of one output at a time:
 *   int8  [ceil(N/32)][K/4][32][4]  int8  q[o, 4s + b]                     (per-channel scale)
 *   int4  [ceil(N/32)][K/8][32][4]  uint8 q[o, 8s + b] | q[o, 8s + 4 + b] << 4  (0..15)
 *   scales, mins  [ceil(N/32)][K / group][32]  float; w = q * scale (+ min, int4 only)
 * A 32-bit lane is four k of one output, so a 256-bit load is 8 outputs x 4 (int8) or 8 (int4)
 * k. int8 weights are signed and vpmaddubsw wants one unsigned operand: |w| meets sign(x, w).
 * Sums stay exact in int32 over each group of 32 k, then take the activations' scale in fp32;
 * int4's min term uses the exact fp32 sum of x over its group. K and the group are multiples
 * of 32. Every row count runs here (up to 4 rows share each unpacked weight vector), so prefill
 * and decode round alike.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define XGROUP 32            /* activations per int8 scale */
#define PREFETCH_BYTES 1024  /* as the other linear kernels */
#define ROWS 4               /* rows sharing one unpacked weight vector */

/* 32 activations (fp32 or bf16) -> int8, their scale, and their fp32 sum. */
static void quantize_group(const void *x, int is_bf16, int8_t *q, float *scale, float *sum) {
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    for (int j = 0; j < 4; j++) {
        v[j] = load_f32x8((const char *)x + 8 * j * (is_bf16 ? 2 : 4), is_bf16, 8);
        amax = _mm256_max_ps(amax, _mm256_and_ps(v[j], abs_mask));
        total = _mm256_add_ps(total, v[j]);
    }
    float lanes[8], m = 0.f, s = 0.f;
    _mm256_storeu_ps(lanes, amax);
    for (int j = 0; j < 8; j++) m = lanes[j] > m ? lanes[j] : m;
    _mm256_storeu_ps(lanes, total);
    for (int j = 0; j < 8; j++) s += lanes[j];
    *scale = m / 127.f;
    *sum = s;
    const __m256 inv = _mm256_set1_ps(m > 0.f ? 127.f / m : 0.f);
    __m256i i[4];
    for (int j = 0; j < 4; j++) i[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], inv));
    /* packs work within 128-bit halves: the permute puts the 32 bytes back in order */
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(i[0], i[1]), _mm256_packs_epi32(i[2], i[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(packed, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
}

/* One 8-output slice of one step: per output, the int32 sum over the step's 4 (int8) or 8
 * (int4) k of weight times activation. */
static inline __attribute__((always_inline)) __m256i dot_step(__m256i w, int bits, const int8_t *xk) {
    const __m256i ones = _mm256_set1_epi16(1);
    int32_t x0;
    memcpy(&x0, xk, 4);
    if (bits == 8)
        return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(_mm256_set1_epi32(x0), w)), ones);
    int32_t x1;
    memcpy(&x1, xk + 4, 4);
    const __m256i low = _mm256_set1_epi8(0x0f);
    const __m256i lo = _mm256_maddubs_epi16(_mm256_and_si256(w, low), _mm256_set1_epi32(x0));
    const __m256i hi = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(w, 4), low), _mm256_set1_epi32(x1));
    return _mm256_madd_epi16(_mm256_add_epi16(lo, hi), ones); /* |lo + hi| <= 4 * 15 * 127 */
}

typedef struct {
    const int8_t *xq;    /* [rows][k] */
    const float *dx;     /* [rows][k / XGROUP] */
    const float *xsum;   /* [rows][k / group] */
    int64_t k, group;
    int bits;
} QuantRows;

/* R rows of x against one block, VP of its four 8-output slices at a time (R * VP <= 4
 * accumulators): out[r][32]. One row takes all four slices in one pass over the block, so it
 * streams; more rows take one slice a pass and meet the block again in L1/L2. */
static inline __attribute__((always_inline)) void dot_block(
    const int R, const int VP, const QuantRows *x, const uint8_t *qw, const float *scales,
    const float *mins, float out[ROWS][32]) {
    const int64_t k = x->k, xgroups = k / XGROUP, per_group = x->group / XGROUP;
    const int bits = x->bits, steps = bits == 4 ? 4 : 8, step_k = XGROUP / steps;
    for (int v0 = 0; v0 < 4; v0 += VP) {
        __m256 y[ROWS][4], acc[ROWS][4];
        for (int r = 0; r < R; r++)
            for (int vv = 0; vv < VP; vv++) y[r][vv] = acc[r][vv] = _mm256_setzero_ps();
        for (int64_t xg = 0; xg < xgroups; xg++) {
            __m256i s[ROWS][4];
            for (int r = 0; r < R; r++)
                for (int vv = 0; vv < VP; vv++) s[r][vv] = _mm256_setzero_si256();
            for (int j = 0; j < steps; j++) {
                const int64_t step = xg * steps + j;
                const uint8_t *p = qw + step * 128;
                if (VP == 4) {
                    _mm_prefetch((const char *)p + PREFETCH_BYTES, _MM_HINT_T0);
                    _mm_prefetch((const char *)p + PREFETCH_BYTES + 64, _MM_HINT_T0);
                }
                for (int vv = 0; vv < VP; vv++) {
                    const __m256i w = _mm256_loadu_si256((const __m256i *)(p + 32 * (v0 + vv)));
                    for (int r = 0; r < R; r++)
                        s[r][vv] = _mm256_add_epi32(s[r][vv], dot_step(w, bits, x->xq + r * k + step * step_k));
                }
            }
            for (int r = 0; r < R; r++) {
                const __m256 d = _mm256_set1_ps(x->dx[r * xgroups + xg]);
                for (int vv = 0; vv < VP; vv++)
                    acc[r][vv] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][vv]), d, acc[r][vv]);
            }
            if ((xg + 1) % per_group) continue;
            const int64_t g = xg / per_group, groups = k / x->group;
            for (int vv = 0; vv < VP; vv++) {
                const int64_t at = g * 32 + 8 * (v0 + vv);
                const __m256 sc = _mm256_loadu_ps(scales + at);
                const __m256 mn = mins ? _mm256_loadu_ps(mins + at) : _mm256_setzero_ps();
                for (int r = 0; r < R; r++) { /* sum_k (q s + m) x = s sum_k q x + m sum_k x */
                    y[r][vv] = _mm256_fmadd_ps(acc[r][vv], sc, y[r][vv]);
                    if (mins) y[r][vv] = _mm256_fmadd_ps(mn, _mm256_set1_ps(x->xsum[r * groups + g]), y[r][vv]);
                    acc[r][vv] = _mm256_setzero_ps();
                }
            }
        }
        for (int r = 0; r < R; r++)
            for (int vv = 0; vv < VP; vv++) _mm256_storeu_ps(out[r] + 8 * (v0 + vv), y[r][vv]);
    }
}

/* `rows` rows (x advanced to the first) against one block, 32 outputs from col, into y. */
static void dot_rows(const QuantRows *x, int64_t rows, const uint8_t *qw, const float *scales,
                     const float *mins, const void *bias, int64_t col, int64_t n, void *y, int is_bf16) {
    const int elem = is_bf16 ? 2 : 4;
    const int64_t xgroups = x->k / XGROUP, groups = x->k / x->group;
    float out[ROWS][32];
    for (int64_t r0 = 0; r0 < rows; r0 += ROWS) {
        const int64_t left = rows - r0;
        const QuantRows at = {x->xq + r0 * x->k, x->dx + r0 * xgroups, x->xsum + r0 * groups,
                              x->k, x->group, x->bits};
        const int count = left < ROWS ? (int)left : ROWS;
        switch (count) {
            case 1: dot_block(1, 4, &at, qw, scales, mins, out); break;
            case 2: dot_block(2, 2, &at, qw, scales, mins, out); break;
            case 3: dot_block(3, 1, &at, qw, scales, mins, out); break;
            default: dot_block(4, 1, &at, qw, scales, mins, out); break;
        }
        for (int r = 0; r < count; r++)
            for (int j = 0; j < 4 && col + 8 * j < n; j++) {
                const int64_t c = col + 8 * j;
                __m256 v = _mm256_loadu_ps(out[r] + 8 * j);
                if (bias) v = _mm256_add_ps(v, load_f32x8((const char *)bias + c * elem, is_bf16, n - c));
                store_f32x8((char *)y + ((r0 + r) * n + c) * elem, v, is_bf16, n - c);
            }
    }
}

int pilot_quant_dot(const void *x, int64_t ldx, const uint8_t *qw, const float *scales,
                    const float *mins, const void *bias, void *y, int64_t m, int64_t n, int64_t k,
                    int bits, int64_t group, int is_bf16, int num_threads) {
    if ((bits != 8 && bits != 4) || k % XGROUP || group <= 0 || group % XGROUP || k % group) return -1;
    const int elem = is_bf16 ? 2 : 4;
    const int64_t xgroups = k / XGROUP, groups = k / group, blocks = (n + 31) / 32;
    int8_t *xq = malloc((size_t)(m * k));
    float *dx = malloc((size_t)(m * (xgroups + groups)) * sizeof(float));
    float *partial = malloc((size_t)(m * xgroups) * sizeof(float));
    if (!xq || !dx || !partial) {
        free(xq), free(dx), free(partial);
        return -1;
    }
    float *xsum = dx + m * xgroups;
    for (int64_t r = 0; r < m; r++) {
        for (int64_t g = 0; g < xgroups; g++)
            quantize_group((const char *)x + (r * ldx + g * XGROUP) * elem, is_bf16, xq + r * k + g * XGROUP,
                           dx + r * xgroups + g, partial + r * xgroups + g);
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.f;
            for (int64_t j = 0; j < group / XGROUP; j++) s += partial[r * xgroups + g * (group / XGROUP) + j];
            xsum[r * groups + g] = s;
        }
    }
    free(partial);
    const QuantRows rows = {xq, dx, xsum, k, group, bits};
    const int64_t block_bytes = k * (bits == 8 ? 32 : 16);
#pragma omp parallel for schedule(static) num_threads(num_threads)
    for (int64_t b = 0; b < blocks; b++)
        dot_rows(&rows, m, qw + b * block_bytes, scales + b * groups * 32, mins ? mins + b * groups * 32 : NULL,
                 bias, 32 * b, n, y, is_bf16);
    free(xq);
    free(dx);
    return 0;
}
#else
int pilot_quant_dot(const void *x, int64_t ldx, const uint8_t *qw, const float *scales,
                    const float *mins, const void *bias, void *y, int64_t m, int64_t n, int64_t k,
                    int bits, int64_t group, int is_bf16, int num_threads) {
    (void)x; (void)ldx; (void)qw; (void)scales; (void)mins; (void)bias; (void)y; (void)m;
    (void)n; (void)k; (void)bits; (void)group; (void)is_bf16; (void)num_threads;
    return -1;
}
#endif

/* Whether this build runs pilot_quant_dot. */
int pilot_quant_dot_caps(void) {
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    return 1;
#else
    return 0;
#endif
}
