/* Linear layers for the CPU: y[M, N] = x[M, K] @ W^T (+ bias), on a panel-packed weight.
 *
 * The weight is packed once into panels of 16 output features, each panel a contiguous run
 * over K. At batch 1 a panel is a single forward stream, so decode reads the weights at the
 * machine's streaming bandwidth; at larger M a 12-row by 32-column register tile reuses every
 * loaded weight vector 12 times, which keeps prefill compute-bound.
 *
 *   fp32 packed  [ceil(N/16)][K][16]        float
 *   bf16 packed  [ceil(N/16)][K/2][16][2]   bf16 pairs along K, the operand of vdpbf16ps
 *   x, y         [M][K], [M][N] row-major (x's row stride is ldx); bias [N] in x's dtype or NULL
 * Padding outputs (N rounded up to 16) have zero weights and are never stored.
 * Accumulation is fp32 in both cases; bf16 output is rounded to nearest even.
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define MR 12       /* rows of x per register tile */
/* A cache block of rows of x (as many as fit in this many bytes, in L2) meets every panel before
 * the next block starts: the weights stream from memory once per block. */
#define BLOCK_BYTES (384 * 1024)
/* Software prefetch this many bytes ahead in each panel: on the LM head (49 MB in bf16, larger
 * than any cache) at 16 rows it lifted the rate from ~420 to ~640 GFLOP/s. */
#define PREFETCH_BYTES 1024
#define PREFETCH_F32 (PREFETCH_BYTES / 4)
#define PREFETCH_BF16 (PREFETCH_BYTES / 2)

/* Which dtypes this build supports: bit 0 fp32, bit 1 bf16. */
int pilot_linear_caps(void) {
    int caps = 0;
#ifdef __AVX512F__
    caps |= 1;
#endif
#ifdef __AVX512BF16__
    caps |= 2;
#endif
    return caps;
}

#ifdef __AVX512F__
static inline __mmask16 column_mask(int64_t first, int64_t n) {
    int64_t left = n - first;
    return left >= 16 ? (__mmask16)0xffff : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}

static inline __attribute__((always_inline)) void tile_f32(
    const int mr, const int np, const float *x, int64_t ldx, const float *w, int64_t panel_stride,
    int64_t k, const float *bias, int64_t col, int64_t n, float *y, int64_t ldy) {
    __m512 acc[MR][2];
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias + col) : _mm512_setzero_ps();
    __m512 b1 = (bias && np > 1) ? _mm512_maskz_loadu_ps(m1, bias + col + 16) : _mm512_setzero_ps();
#pragma GCC unroll 12
    for (int m = 0; m < mr; m++) {
        acc[m][0] = b0;
        acc[m][1] = b1;
    }
    const float *w1 = w + panel_stride;
    for (int64_t i = 0; i < k; i++) {
        _mm_prefetch((const char *)(w + i * 16 + PREFETCH_F32), _MM_HINT_T0);
        if (np > 1) _mm_prefetch((const char *)(w1 + i * 16 + PREFETCH_F32), _MM_HINT_T0);
        const __m512 v0 = _mm512_loadu_ps(w + i * 16);
        const __m512 v1 = np > 1 ? _mm512_loadu_ps(w1 + i * 16) : v0;
#pragma GCC unroll 12
        for (int m = 0; m < mr; m++) {
            const __m512 a = _mm512_set1_ps(x[m * ldx + i]);
            acc[m][0] = _mm512_fmadd_ps(a, v0, acc[m][0]);
            if (np > 1) acc[m][1] = _mm512_fmadd_ps(a, v1, acc[m][1]);
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < mr; m++) {
        _mm512_mask_storeu_ps(y + m * ldy + col, m0, acc[m][0]);
        if (np > 1) _mm512_mask_storeu_ps(y + m * ldy + col + 16, m1, acc[m][1]);
    }
}

#define F32_CASE(R)                                                                         \
    case R:                                                                                 \
        if (np == 2) tile_f32(R, 2, x, ldx, w, panel_stride, k, bias, col, n, y, ldy);      \
        else tile_f32(R, 1, x, ldx, w, panel_stride, k, bias, col, n, y, ldy);              \
        break;

static void tile_f32_any(int mr, int np, const float *x, int64_t ldx, const float *w,
                         int64_t panel_stride, int64_t k, const float *bias, int64_t col,
                         int64_t n, float *y, int64_t ldy) {
    switch (mr) {
        F32_CASE(1) F32_CASE(2) F32_CASE(3) F32_CASE(4) F32_CASE(5) F32_CASE(6)
        F32_CASE(7) F32_CASE(8) F32_CASE(9) F32_CASE(10) F32_CASE(11) F32_CASE(12)
    }
}

/* One row of x (decode at batch 1): memory-bound, so what matters is keeping enough loads in
 * flight. Four independent accumulators per panel break the FMA latency chain that two leave. */
static void row_f32(const float *x, const float *w, int64_t panel_stride, int64_t k, int np,
                    const float *bias, int64_t col, int64_t n, float *y) {
    const float *w1 = w + panel_stride;
    __m512 a[4], c[4];
    for (int u = 0; u < 4; u++) a[u] = c[u] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 4 <= k; i += 4) {
        _mm_prefetch((const char *)(w + i * 16 + PREFETCH_F32), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i * 16 + PREFETCH_F32 + 16), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i * 16 + PREFETCH_F32 + 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i * 16 + PREFETCH_F32 + 48), _MM_HINT_T0);
        for (int u = 0; u < 4; u++)
            a[u] = _mm512_fmadd_ps(_mm512_set1_ps(x[i + u]), _mm512_loadu_ps(w + (i + u) * 16), a[u]);
        if (np > 1) {
            _mm_prefetch((const char *)(w1 + i * 16 + PREFETCH_F32), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i * 16 + PREFETCH_F32 + 16), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i * 16 + PREFETCH_F32 + 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i * 16 + PREFETCH_F32 + 48), _MM_HINT_T0);
            for (int u = 0; u < 4; u++)
                c[u] = _mm512_fmadd_ps(_mm512_set1_ps(x[i + u]), _mm512_loadu_ps(w1 + (i + u) * 16), c[u]);
        }
    }
    for (; i < k; i++) {
        a[0] = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(w + i * 16), a[0]);
        if (np > 1) c[0] = _mm512_fmadd_ps(_mm512_set1_ps(x[i]), _mm512_loadu_ps(w1 + i * 16), c[0]);
    }
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    __m512 s0 = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    if (bias) s0 = _mm512_add_ps(s0, _mm512_maskz_loadu_ps(m0, bias + col));
    _mm512_mask_storeu_ps(y + col, m0, s0);
    if (np > 1) {
        __m512 s1 = _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3]));
        if (bias) s1 = _mm512_add_ps(s1, _mm512_maskz_loadu_ps(m1, bias + col + 16));
        _mm512_mask_storeu_ps(y + col + 16, m1, s1);
    }
}
#endif

#ifdef __AVX512BF16__
static inline __attribute__((always_inline)) void tile_bf16(
    const int mr, const int np, const uint16_t *x, int64_t ldx, const uint16_t *w,
    int64_t panel_stride, int64_t k, const uint16_t *bias, int64_t col, int64_t n, uint16_t *y,
    int64_t ldy) {
    __m512 acc[MR][2];
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    /* bf16 -> fp32 is a 16-bit shift left. */
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
    if (bias) {
        b0 = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m0, bias + col)), 16));
        if (np > 1)
            b1 = _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m1, bias + col + 16)), 16));
    }
#pragma GCC unroll 12
    for (int m = 0; m < mr; m++) {
        acc[m][0] = b0;
        acc[m][1] = b1;
    }
    const uint16_t *w1 = w + panel_stride;
    for (int64_t i = 0; i < k / 2; i++) {
        _mm_prefetch((const char *)(w + i * 32 + PREFETCH_BF16), _MM_HINT_T0);
        if (np > 1) _mm_prefetch((const char *)(w1 + i * 32 + PREFETCH_BF16), _MM_HINT_T0);
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w + i * 32);
        const __m512bh v1 = np > 1 ? (__m512bh)_mm512_loadu_si512(w1 + i * 32) : v0;
#pragma GCC unroll 12
        for (int m = 0; m < mr; m++) {
            int32_t pair;
            memcpy(&pair, x + m * ldx + 2 * i, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, v0);
            if (np > 1) acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, v1);
        }
    }
#pragma GCC unroll 12
    for (int m = 0; m < mr; m++) {
        _mm256_mask_storeu_epi16(y + m * ldy + col, m0, (__m256i)_mm512_cvtneps_pbh(acc[m][0]));
        if (np > 1)
            _mm256_mask_storeu_epi16(y + m * ldy + col + 16, m1,
                                     (__m256i)_mm512_cvtneps_pbh(acc[m][1]));
    }
}

#define BF16_CASE(R)                                                                        \
    case R:                                                                                 \
        if (np == 2) tile_bf16(R, 2, x, ldx, w, panel_stride, k, bias, col, n, y, ldy);     \
        else tile_bf16(R, 1, x, ldx, w, panel_stride, k, bias, col, n, y, ldy);             \
        break;

static void tile_bf16_any(int mr, int np, const uint16_t *x, int64_t ldx, const uint16_t *w,
                          int64_t panel_stride, int64_t k, const uint16_t *bias, int64_t col,
                          int64_t n, uint16_t *y, int64_t ldy) {
    switch (mr) {
        BF16_CASE(1) BF16_CASE(2) BF16_CASE(3) BF16_CASE(4) BF16_CASE(5) BF16_CASE(6)
        BF16_CASE(7) BF16_CASE(8) BF16_CASE(9) BF16_CASE(10) BF16_CASE(11) BF16_CASE(12)
    }
}

static inline __m512 bf16x16_to_f32(const uint16_t *src, __mmask16 mask) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src)), 16));
}

/* As row_f32: one row of x, four accumulators per panel; a pair of K per vdpbf16ps. */
static void row_bf16(const uint16_t *x, const uint16_t *w, int64_t panel_stride, int64_t k,
                     int np, const uint16_t *bias, int64_t col, int64_t n, uint16_t *y) {
    const uint16_t *w1 = w + panel_stride;
    const int64_t pairs = k / 2;
    __m512 a[4], c[4];
    for (int u = 0; u < 4; u++) a[u] = c[u] = _mm512_setzero_ps();
    int32_t xp[4];
    int64_t i = 0;
    for (; i + 4 <= pairs; i += 4) {
        memcpy(xp, x + 2 * i, sizeof xp);
        _mm_prefetch((const char *)(w + i * 32 + PREFETCH_BF16), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i * 32 + PREFETCH_BF16 + 32), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i * 32 + PREFETCH_BF16 + 64), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + i * 32 + PREFETCH_BF16 + 96), _MM_HINT_T0);
        for (int u = 0; u < 4; u++)
            a[u] = _mm512_dpbf16_ps(a[u], (__m512bh)_mm512_set1_epi32(xp[u]),
                                    (__m512bh)_mm512_loadu_si512(w + (i + u) * 32));
        if (np > 1) {
            _mm_prefetch((const char *)(w1 + i * 32 + PREFETCH_BF16), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i * 32 + PREFETCH_BF16 + 32), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i * 32 + PREFETCH_BF16 + 64), _MM_HINT_T0);
            _mm_prefetch((const char *)(w1 + i * 32 + PREFETCH_BF16 + 96), _MM_HINT_T0);
            for (int u = 0; u < 4; u++)
                c[u] = _mm512_dpbf16_ps(c[u], (__m512bh)_mm512_set1_epi32(xp[u]),
                                        (__m512bh)_mm512_loadu_si512(w1 + (i + u) * 32));
        }
    }
    for (; i < pairs; i++) {
        int32_t pair;
        memcpy(&pair, x + 2 * i, sizeof pair);
        a[0] = _mm512_dpbf16_ps(a[0], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)_mm512_loadu_si512(w + i * 32));
        if (np > 1)
            c[0] = _mm512_dpbf16_ps(c[0], (__m512bh)_mm512_set1_epi32(pair), (__m512bh)_mm512_loadu_si512(w1 + i * 32));
    }
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    __m512 s0 = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    if (bias) s0 = _mm512_add_ps(s0, bf16x16_to_f32(bias + col, m0));
    _mm256_mask_storeu_epi16(y + col, m0, (__m256i)_mm512_cvtneps_pbh(s0));
    if (np > 1) {
        __m512 s1 = _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3]));
        if (bias) s1 = _mm512_add_ps(s1, bf16x16_to_f32(bias + col + 16, m1));
        _mm256_mask_storeu_epi16(y + col + 16, m1, (__m256i)_mm512_cvtneps_pbh(s1));
    }
}
#endif

/* Returns 0, or -1 when this build cannot run the dtype (the caller keeps another path). */
int pilot_linear(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int64_t m,
                 int64_t n, int64_t k, int is_bf16, int num_threads) {
    if (!(pilot_linear_caps() & (is_bf16 ? 2 : 1)) || (is_bf16 && k % 2)) return -1;
#ifdef __AVX512F__
    const int64_t panels = (n + 15) / 16, pairs = (panels + 1) / 2;
    const int64_t panel_stride = 16 * k; /* elements between consecutive panels */
    const int64_t row_bytes = k * (is_bf16 ? 2 : 4);
    int64_t mc = BLOCK_BYTES / row_bytes / MR * MR;
    if (mc < MR) mc = MR;
    /* Threads split the output columns: each streams its own share of the weights once per
     * cache block of rows, and a single block (decode) streams them exactly once. */
#pragma omp parallel num_threads(num_threads)
    {
        for (int64_t r0 = 0; r0 < m; r0 += mc) {
            const int64_t rows = m - r0 < mc ? m - r0 : mc;
#pragma omp for schedule(static) nowait
            for (int64_t p = 0; p < pairs; p++) {
                const int np = 2 * p + 1 < panels ? 2 : 1;
                const int64_t col = 32 * p;
                if (m == 1) {
                    if (is_bf16) {
#ifdef __AVX512BF16__
                        row_bf16((const uint16_t *)x, (const uint16_t *)w + 2 * p * panel_stride,
                                 panel_stride, k, np, (const uint16_t *)bias, col, n, (uint16_t *)y);
#endif
                    } else {
                        row_f32((const float *)x, (const float *)w + 2 * p * panel_stride,
                                panel_stride, k, np, (const float *)bias, col, n, (float *)y);
                    }
                    continue;
                }
                for (int64_t r = r0; r < r0 + rows; r += MR) {
                    const int mr = (int)(r0 + rows - r < MR ? r0 + rows - r : MR);
                    if (is_bf16) {
#ifdef __AVX512BF16__
                        tile_bf16_any(mr, np, (const uint16_t *)x + r * ldx, ldx,
                                      (const uint16_t *)w + 2 * p * panel_stride, panel_stride, k,
                                      (const uint16_t *)bias, col, n, (uint16_t *)y + r * n, n);
#endif
                    } else {
                        tile_f32_any(mr, np, (const float *)x + r * ldx, ldx,
                                     (const float *)w + 2 * p * panel_stride, panel_stride, k,
                                     (const float *)bias, col, n, (float *)y + r * n, n);
                    }
                }
            }
        }
    }
    return 0;
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)m; (void)n; (void)k;
    (void)num_threads;
    return -1;
#endif
}
