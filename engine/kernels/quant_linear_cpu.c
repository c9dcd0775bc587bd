/* Weight-only quantized linear layers for the CPU: y = x @ dequant(W)^T (+ bias).
 *
 * Weights are packed in blocks of 32 outputs, like the dense kernel's, step by step along K:
 *   int8  [ceil(N/32)][K][32]   int8, per-output-channel scale (one group spanning K)
 *   int4  [ceil(N/32)][K][16]   uint8: low nibble = output j, high nibble = output j + 16
 *   scales, mins  [ceil(N/32)][K / group][32]  float; w = q * scale (+ min, int4 only)
 * One row of x (decode) runs straight off the quantized bytes: the weights are the traffic, and
 * int8/int4 carry 2x/~3.5x fewer of them than bf16. More rows dequantize one block at a time into
 * a dense block in L2 and reuse the dense kernel's register tiles (AMX tiles for bf16 where the
 * CPU has them), so prefill stays compute-bound.
 * x, y, bias are fp32 or bf16 (is_bf16), accumulation fp32.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd_math.h"

void pilot_linear_block(const void *x, int64_t ldx, const void *block, int64_t k,
                        const void *bias, int64_t col, int64_t n, void *y, int64_t rows,
                        int is_bf16);

#define BLOCK_BYTES (384 * 1024) /* rows of x per cache block, as in the dense kernel */
#define PREFETCH_BYTES 1024

#ifdef __AVX512F__
/* One step along K of a block: 32 dequantized-but-unscaled weights, as two 16-lane halves. */
static inline void load_step(const uint8_t *qw, int64_t i, int bits, __m512 *w0, __m512 *w1) {
    if (bits == 8) {
        const int8_t *q = (const int8_t *)qw + i * 32;
        *w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
        *w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    } else {
        const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qw + i * 16)));
        *w0 = _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(15)));
        *w1 = _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4));
    }
}

/* One row (x already fp32, xsum = its sum per group) against one block. */
static void quant_row(const float *x, const float *xsum, const uint8_t *qw, const float *scales,
                      const float *mins, int64_t k, int64_t group, int bits, const void *bias,
                      int is_bf16, int64_t col, int64_t n, void *y) {
    const int64_t step_bytes = bits == 8 ? 32 : 16;
    __m512 y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, gi++) {
        __m512 a[4], c[4];
        for (int u = 0; u < 4; u++) a[u] = c[u] = _mm512_setzero_ps();
        int64_t i = g0;
        for (; i + 4 <= g0 + group; i += 4) {
            _mm_prefetch((const char *)qw + i * step_bytes + PREFETCH_BYTES, _MM_HINT_T0);
            if (bits == 8) _mm_prefetch((const char *)qw + i * step_bytes + PREFETCH_BYTES + 64, _MM_HINT_T0);
            for (int u = 0; u < 4; u++) {
                __m512 w0, w1;
                load_step(qw, i + u, bits, &w0, &w1);
                const __m512 xv = _mm512_set1_ps(x[i + u]);
                a[u] = _mm512_fmadd_ps(xv, w0, a[u]);
                c[u] = _mm512_fmadd_ps(xv, w1, c[u]);
            }
        }
        for (; i < g0 + group; i++) {
            __m512 w0, w1;
            load_step(qw, i, bits, &w0, &w1);
            a[0] = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), w0, a[0]);
            c[0] = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), w1, c[0]);
        }
        const float *sg = scales + gi * 32;
        const __m512 s0 = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
        const __m512 s1 = _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3]));
        y0 = _mm512_fmadd_ps(s0, _mm512_loadu_ps(sg), y0);
        y1 = _mm512_fmadd_ps(s1, _mm512_loadu_ps(sg + 16), y1);
        if (mins) { /* sum_k (q s + m) x = s sum_k q x + m sum_k x */
            const float *mg = mins + gi * 32;
            y0 = _mm512_fmadd_ps(_mm512_loadu_ps(mg), _mm512_set1_ps(xsum[gi]), y0);
            y1 = _mm512_fmadd_ps(_mm512_loadu_ps(mg + 16), _mm512_set1_ps(xsum[gi]), y1);
        }
    }
    const __mmask16 m0 = col >= n ? 0 : tail_mask(n - col);
    const __mmask16 m1 = col + 16 >= n ? 0 : tail_mask(n - col - 16);
    const int elem = is_bf16 ? 2 : 4;
    if (bias) {
        y0 = _mm512_add_ps(y0, load_f32x16((const char *)bias + col * elem, is_bf16, m0));
        y1 = _mm512_add_ps(y1, load_f32x16((const char *)bias + (col + 16) * elem, is_bf16, m1));
    }
    store_f32x16((char *)y + col * elem, y0, is_bf16, m0);
    store_f32x16((char *)y + (col + 16) * elem, y1, is_bf16, m1);
}

/* A whole block dequantized into the dense kernel's block layout:
 * fp32 [K][2][16], bf16 [K/2][2][16][2] (pairs along K). */
static void dequant_block(const uint8_t *qw, const float *scales, const float *mins, int64_t k,
                          int64_t group, int bits, int is_bf16, void *out) {
    /* bf16: interleave the rows k and k+1 of each half into pairs. */
    const __m512i pair_order = _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8,
        23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    for (int64_t i = 0; i < k; i += is_bf16 ? 2 : 1) {
        __m512 w[2][2]; /* [row k, k+1][half] */
        for (int e = 0; e < (is_bf16 ? 2 : 1); e++) {
            const int64_t gi = (i + e) / group;
            __m512 w0, w1;
            load_step(qw, i + e, bits, &w0, &w1);
            w0 = _mm512_mul_ps(w0, _mm512_loadu_ps(scales + gi * 32));
            w1 = _mm512_mul_ps(w1, _mm512_loadu_ps(scales + gi * 32 + 16));
            if (mins) {
                w0 = _mm512_add_ps(w0, _mm512_loadu_ps(mins + gi * 32));
                w1 = _mm512_add_ps(w1, _mm512_loadu_ps(mins + gi * 32 + 16));
            }
            w[e][0] = w0;
            w[e][1] = w1;
        }
        if (!is_bf16) {
            _mm512_storeu_ps((float *)out + i * 32, w[0][0]);
            _mm512_storeu_ps((float *)out + i * 32 + 16, w[0][1]);
            continue;
        }
#ifdef __AVX512BF16__
        for (int h = 0; h < 2; h++) { /* [k: 16 outputs | k+1: 16 outputs] -> 16 (k, k+1) pairs */
            const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(w[1][h], w[0][h]);
            _mm512_storeu_si512((uint16_t *)out + (i / 2) * 64 + h * 32,
                                _mm512_permutexvar_epi16(pair_order, both));
        }
#endif
    }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/* AVX2 (no AVX-512): the same layout, 8 lanes at a time. x is widened to fp32 first and y goes
 * through 32 floats per block, so bf16 needs no bf16 instructions. */

/* Step i's 32 unscaled weights as four 8-lane vectors: outputs 0-7, 8-15, 16-23, 24-31. */
static inline void load_step8(const uint8_t *qw, int64_t i, int bits, __m256 w[4]) {
    if (bits == 8) {
        const int8_t *q = (const int8_t *)qw + i * 32;
        for (int j = 0; j < 4; j++)
            w[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * j))));
    } else { /* byte j: output j in the low nibble, output j + 16 in the high one */
        const uint8_t *q = qw + i * 16;
        const __m256i lo = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)q));
        const __m256i hi = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8)));
        const __m256i nibble = _mm256_set1_epi32(15);
        w[0] = _mm256_cvtepi32_ps(_mm256_and_si256(lo, nibble));
        w[1] = _mm256_cvtepi32_ps(_mm256_and_si256(hi, nibble));
        w[2] = _mm256_cvtepi32_ps(_mm256_srli_epi32(lo, 4));
        w[3] = _mm256_cvtepi32_ps(_mm256_srli_epi32(hi, 4));
    }
}

/* One fp32 row against one block, off the quantized bytes (decode). */
static void quant_row8(const float *x, const float *xsum, const uint8_t *qw, const float *scales,
                       const float *mins, int64_t k, int64_t group, int bits, float out[32]) {
    __m256 y[4];
    for (int j = 0; j < 4; j++) y[j] = _mm256_setzero_ps();
    for (int64_t g0 = 0, gi = 0; g0 < k; g0 += group, gi++) {
        __m256 a[4], w[4];
        for (int j = 0; j < 4; j++) a[j] = _mm256_setzero_ps();
        for (int64_t i = g0; i < g0 + group; i++) {
            _mm_prefetch((const char *)qw + i * (bits == 8 ? 32 : 16) + PREFETCH_BYTES, _MM_HINT_T0);
            load_step8(qw, i, bits, w);
            const __m256 xv = _mm256_set1_ps(x[i]);
            for (int j = 0; j < 4; j++) a[j] = _mm256_fmadd_ps(xv, w[j], a[j]);
        }
        for (int j = 0; j < 4; j++) { /* sum_k (q s + m) x = s sum_k q x + m sum_k x */
            y[j] = _mm256_fmadd_ps(a[j], _mm256_loadu_ps(scales + gi * 32 + 8 * j), y[j]);
            if (mins) y[j] = _mm256_fmadd_ps(_mm256_loadu_ps(mins + gi * 32 + 8 * j), _mm256_set1_ps(xsum[gi]), y[j]);
        }
    }
    for (int j = 0; j < 4; j++) _mm256_storeu_ps(out + 8 * j, y[j]);
}

/* A whole block dequantized and scaled: fp32 [K][32]. */
static void dequant_block8(const uint8_t *qw, const float *scales, const float *mins, int64_t k,
                           int64_t group, int bits, float *out) {
    for (int64_t i = 0; i < k; i++) {
        const int64_t gi = i / group;
        __m256 w[4];
        load_step8(qw, i, bits, w);
        for (int j = 0; j < 4; j++) {
            __m256 v = _mm256_mul_ps(w[j], _mm256_loadu_ps(scales + gi * 32 + 8 * j));
            if (mins) v = _mm256_add_ps(v, _mm256_loadu_ps(mins + gi * 32 + 8 * j));
            _mm256_storeu_ps(out + i * 32 + 8 * j, v);
        }
    }
}

/* Two fp32 rows (the second may be absent) against a dequantized block. */
static void dense_rows8(const float *x0, const float *x1, const float *dense, int64_t k,
                        float out0[32], float out1[32]) {
    __m256 a[4], b[4];
    for (int j = 0; j < 4; j++) a[j] = b[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 xa = _mm256_set1_ps(x0[i]), xb = _mm256_set1_ps(x1 ? x1[i] : 0.f);
        for (int j = 0; j < 4; j++) {
            const __m256 w = _mm256_loadu_ps(dense + i * 32 + 8 * j);
            a[j] = _mm256_fmadd_ps(xa, w, a[j]);
            b[j] = _mm256_fmadd_ps(xb, w, b[j]);
        }
    }
    for (int j = 0; j < 4; j++) {
        _mm256_storeu_ps(out0 + 8 * j, a[j]);
        _mm256_storeu_ps(out1 + 8 * j, b[j]);
    }
}

/* Columns col.. of one output row from 32 floats: bias added, tail clipped, fp32 or bf16. */
static void store_block(const float acc[32], const void *bias, int64_t col, int64_t n, void *yrow,
                        int is_bf16) {
    for (int j = 0; j < 32 && col + j < n; j++) {
        float v = acc[j];
        if (bias) v += is_bf16 ? bf16_to_f32(((const uint16_t *)bias)[col + j]) : ((const float *)bias)[col + j];
        if (is_bf16) ((uint16_t *)yrow)[col + j] = f32_to_bf16(v);
        else ((float *)yrow)[col + j] = v;
    }
}

static int quant_linear_avx2(const void *x, int64_t ldx, const uint8_t *qw, const float *scales,
                             const float *mins, const void *bias, void *y, int64_t m, int64_t n,
                             int64_t k, int bits, int64_t group, int is_bf16, int num_threads) {
    const int elem = is_bf16 ? 2 : 4;
    const int64_t blocks = (n + 31) / 32, groups = k / group;
    const int64_t block_bytes = k * (bits == 8 ? 32 : 16);
    float *xf = malloc((size_t)(m * k + m * groups) * sizeof(float));
    if (!xf) return -1;
    float *xsum = xf + m * k;
    for (int64_t r = 0; r < m; r++) {
        const char *row = (const char *)x + r * ldx * elem;
        for (int64_t i = 0; i < k; i++)
            xf[r * k + i] = is_bf16 ? bf16_to_f32(((const uint16_t *)row)[i]) : ((const float *)row)[i];
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.f;
            for (int64_t i = g * group; i < (g + 1) * group; i++) s += xf[r * k + i];
            xsum[r * groups + g] = s;
        }
    }
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *dense = m > 1 ? aligned_alloc(32, (size_t)((32 * k * sizeof(float) + 31) / 32 * 32)) : NULL;
        if (m > 1 && !dense) {
#pragma omp atomic write
            failed = 1;
        }
        float acc0[32], acc1[32];
#pragma omp for schedule(static)
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *qb = qw + b * block_bytes;
            const float *sb = scales + b * groups * 32, *mb = mins ? mins + b * groups * 32 : NULL;
            if (m == 1) {
                quant_row8(xf, xsum, qb, sb, mb, k, group, bits, acc0);
                store_block(acc0, bias, 32 * b, n, y, is_bf16);
                continue;
            }
            if (!dense) continue;
            dequant_block8(qb, sb, mb, k, group, bits, dense);
            for (int64_t r = 0; r < m; r += 2) {
                const int two = r + 1 < m;
                dense_rows8(xf + r * k, two ? xf + (r + 1) * k : NULL, dense, k, acc0, acc1);
                store_block(acc0, bias, 32 * b, n, (char *)y + r * n * elem, is_bf16);
                if (two) store_block(acc1, bias, 32 * b, n, (char *)y + (r + 1) * n * elem, is_bf16);
            }
        }
        free(dense);
    }
    free(xf);
    return failed ? -1 : 0;
}
#endif

/* What pilot_quant_linear runs on this build: 1 = fp32 activations, 2 = bf16 ones. */
int pilot_quant_linear_caps(void) {
#if defined(__AVX512F__)
#ifdef __AVX512BF16__
    return 3;
#else
    return 1;
#endif
#elif defined(__AVX2__) && defined(__FMA__)
    return 3;
#else
    return 0;
#endif
}

/* Returns 0, or -1 for what this build or these arguments cannot run (PyTorch is used). */
int pilot_quant_linear(const void *x, int64_t ldx, const uint8_t *qw, const float *scales,
                       const float *mins, const void *bias, void *y, int64_t m, int64_t n,
                       int64_t k, int bits, int64_t group, int is_bf16, int num_threads) {
#ifdef __AVX512F__
#ifndef __AVX512BF16__
    if (is_bf16) return -1;
#endif
    if ((bits != 8 && bits != 4) || group <= 0 || k % group || (is_bf16 && k % 2)) return -1;
    const int elem = is_bf16 ? 2 : 4;
    const int64_t blocks = (n + 31) / 32, groups = k / group;
    const int64_t block_bytes = k * (bits == 8 ? 32 : 16);
    if (m == 1) {
        float *xf = malloc((size_t)(k + groups) * sizeof(float));
        if (!xf) return -1;
        float *xsum = xf + k;
        for (int64_t i = 0; i < k; i++)
            xf[i] = is_bf16 ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
        for (int64_t g = 0; g < groups; g++) {
            float s = 0.f;
            for (int64_t i = g * group; i < (g + 1) * group; i++) s += xf[i];
            xsum[g] = s;
        }
#pragma omp parallel for schedule(static) num_threads(num_threads)
        for (int64_t b = 0; b < blocks; b++)
            quant_row(xf, xsum, qw + b * block_bytes, scales + b * groups * 32,
                      mins ? mins + b * groups * 32 : NULL, k, group, bits, bias, is_bf16,
                      32 * b, n, y);
        free(xf);
        return 0;
    }
    int64_t mc = BLOCK_BYTES / (k * elem) / 12 * 12;
    if (mc < 12) mc = 12;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        void *dense = aligned_alloc(64, (size_t)((32 * k * elem + 63) / 64 * 64));
        if (!dense) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t r0 = 0; r0 < m && dense; r0 += mc) {
            const int64_t rows = m - r0 < mc ? m - r0 : mc;
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < blocks; b++) {
                dequant_block(qw + b * block_bytes, scales + b * groups * 32,
                              mins ? mins + b * groups * 32 : NULL, k, group, bits, is_bf16, dense);
                pilot_linear_block((const char *)x + r0 * ldx * elem, ldx, dense, k, bias, 32 * b,
                                   n, (char *)y + r0 * n * elem, rows, is_bf16);
            }
        }
        free(dense);
    }
    return failed ? -1 : 0;
#elif defined(__AVX2__) && defined(__FMA__)
    if ((bits != 8 && bits != 4) || group <= 0 || k % group) return -1;
    return quant_linear_avx2(x, ldx, qw, scales, mins, bias, y, m, n, k, bits, group, is_bf16, num_threads);
#else
    (void)x; (void)ldx; (void)qw; (void)scales; (void)mins; (void)bias; (void)y; (void)m;
    (void)n; (void)k; (void)bits; (void)group; (void)is_bf16; (void)num_threads;
    return -1;
#endif
}
