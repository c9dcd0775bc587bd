/* Linear layers for the CPU: y[M, N] = x[M, K] @ W^T (+ bias), on a block-packed weight.
 *
 * The weight is packed once into blocks of 32 output features; within a block the two
 * 16-feature halves are interleaved step by step along K, so a block is one contiguous forward
 * stream. At batch 1 decode then reads the weights at the machine's streaming bandwidth (two
 * separate streams per block reached only ~80% of it on a 2-core EPYC); at larger M a 12-row by
 * 32-column register tile reuses every loaded weight vector 12 times, which keeps prefill
 * compute-bound.
 *
 *   fp32 packed  [ceil(N/32)][K][2][16]        float
 *   bf16 packed  [ceil(N/32)][K/2][2][16][2]   bf16 pairs along K, the operand of vdpbf16ps
 *   x, y         [M][K], [M][N] row-major (x's row stride is ldx); bias [N] in x's dtype or NULL
 * Padding outputs (N rounded up to 32) have zero weights and are never stored.
 *
 * Where the CPU has AMX (Intel Sapphire Rapids and later), bf16 with AMX_MIN_ROWS rows or more
 * runs on the tile unit instead: the packed layout is already the B operand of tdpbf16ps (a
 * 16-output half is 16 K-pairs of 64 bytes at a 128-byte stride), so no second copy of the
 * weights is kept. Measured on a 2-core Xeon with AMX: at 256 rows vdpbf16ps reached ~0.1
 * TFLOP/s, a fifth of oneDNN's AMX GEMM, and prefill ran 4-7x slower than it could.
 * Accumulation is fp32 in both cases; bf16 output is rounded to nearest even.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

#include "simd_math.h"

#define MR 12 /* rows of x per register tile */
/* A cache block of rows of x (as many as fit in this many bytes, in L2) meets every weight
 * block before the next starts: the weights stream from memory once per cache block. */
#define BLOCK_BYTES (384 * 1024)
/* Software prefetch this many bytes ahead: on the LM head (49 MB in bf16, larger than any
 * cache) at 16 rows it lifted the rate from ~420 to ~640 GFLOP/s. */
#define PREFETCH_BYTES 1024


#ifdef __AVX512F__
/* One step along K is 128 bytes of a block in both dtypes: 32 fp32, or 32 bf16 pairs. */
#define STEP_BYTES 128

static inline void prefetch_ahead(const void *step) {
    _mm_prefetch((const char *)step + PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char *)step + PREFETCH_BYTES + 64, _MM_HINT_T0);
}

static inline __m512 bias16(const void *bias, int is_bf16, int64_t col, __mmask16 mask) {
    if (!bias) return _mm512_setzero_ps();
    return load_f32x16((const char *)bias + col * (is_bf16 ? 2 : 4), is_bf16, mask);
}

static inline void store16(void *y, int64_t index, __m512 v, int is_bf16, __mmask16 mask) {
    if (is_bf16)
        _mm256_mask_storeu_epi16((uint16_t *)y + index, mask, (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_mask_storeu_ps((float *)y + index, mask, v);
}

static inline __mmask16 column_mask(int64_t first, int64_t n) {
    return first >= n ? (__mmask16)0 : tail_mask(n - first);
}

/* mr rows of x against one weight block: acc[m][half] += x[m, k] * w[k, half]. */
static inline __attribute__((always_inline)) void tile_f32(
    const int mr, const float *x, int64_t ldx, const float *w, int64_t k, __m512 acc[MR][2]) {
    for (int64_t i = 0; i < k; i++) {
        prefetch_ahead(w + i * 32);
        const __m512 v0 = _mm512_loadu_ps(w + i * 32), v1 = _mm512_loadu_ps(w + i * 32 + 16);
#pragma GCC unroll 12
        for (int m = 0; m < mr; m++) {
            const __m512 a = _mm512_set1_ps(x[m * ldx + i]);
            acc[m][0] = _mm512_fmadd_ps(a, v0, acc[m][0]);
            acc[m][1] = _mm512_fmadd_ps(a, v1, acc[m][1]);
        }
    }
}

#ifdef __AVX512BF16__
static inline __attribute__((always_inline)) void tile_bf16(
    const int mr, const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t k, __m512 acc[MR][2]) {
    for (int64_t i = 0; i < k / 2; i++) {
        prefetch_ahead(w + i * 64);
        const __m512bh v0 = (__m512bh)_mm512_loadu_si512(w + i * 64);
        const __m512bh v1 = (__m512bh)_mm512_loadu_si512(w + i * 64 + 32);
#pragma GCC unroll 12
        for (int m = 0; m < mr; m++) {
            int32_t pair;
            memcpy(&pair, x + m * ldx + 2 * i, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            acc[m][0] = _mm512_dpbf16_ps(acc[m][0], a, v0);
            acc[m][1] = _mm512_dpbf16_ps(acc[m][1], a, v1);
        }
    }
}
#endif

static inline __attribute__((always_inline)) void tile(
    const int mr, const void *x, int64_t ldx, const void *w, int64_t k, const void *bias,
    int64_t col, int64_t n, void *y, int is_bf16) {
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    const __m512 b0 = bias16(bias, is_bf16, col, m0), b1 = bias16(bias, is_bf16, col + 16, m1);
    __m512 acc[MR][2];
#pragma GCC unroll 12
    for (int m = 0; m < mr; m++) {
        acc[m][0] = b0;
        acc[m][1] = b1;
    }
    if (is_bf16) {
#ifdef __AVX512BF16__
        tile_bf16(mr, (const uint16_t *)x, ldx, (const uint16_t *)w, k, acc);
#endif
    } else {
        tile_f32(mr, (const float *)x, ldx, (const float *)w, k, acc);
    }
#pragma GCC unroll 12
    for (int m = 0; m < mr; m++) {
        store16(y, m * n + col, acc[m][0], is_bf16, m0);
        store16(y, m * n + col + 16, acc[m][1], is_bf16, m1);
    }
}

#define TILE_CASE(R) case R: tile(R, x, ldx, w, k, bias, col, n, y, is_bf16); break;

static void tile_any(int mr, const void *x, int64_t ldx, const void *w, int64_t k,
                     const void *bias, int64_t col, int64_t n, void *y, int is_bf16) {
    switch (mr) {
        TILE_CASE(1) TILE_CASE(2) TILE_CASE(3) TILE_CASE(4) TILE_CASE(5) TILE_CASE(6)
        TILE_CASE(7) TILE_CASE(8) TILE_CASE(9) TILE_CASE(10) TILE_CASE(11) TILE_CASE(12)
    }
}

/* One row of x (decode at batch 1) is memory-bound: what matters is loads in flight. Four
 * independent accumulators per half break the latency chain that one leaves. */
static void row(const void *x, const void *w, int64_t k, const void *bias, int64_t col,
                int64_t n, void *y, int is_bf16) {
    __m512 a[4], c[4];
    for (int u = 0; u < 4; u++) a[u] = c[u] = _mm512_setzero_ps();
    int64_t i = 0;
    if (is_bf16) {
#ifdef __AVX512BF16__
        const uint16_t *xb = (const uint16_t *)x, *wb = (const uint16_t *)w;
        int32_t xp[4];
        for (; i + 4 <= k / 2; i += 4) {
            memcpy(xp, xb + 2 * i, sizeof xp);
            for (int u = 0; u < 4; u++) {
                const uint16_t *step = wb + (i + u) * 64;
                prefetch_ahead(step);
                const __m512bh xv = (__m512bh)_mm512_set1_epi32(xp[u]);
                a[u] = _mm512_dpbf16_ps(a[u], xv, (__m512bh)_mm512_loadu_si512(step));
                c[u] = _mm512_dpbf16_ps(c[u], xv, (__m512bh)_mm512_loadu_si512(step + 32));
            }
        }
        for (; i < k / 2; i++) {
            int32_t pair;
            memcpy(&pair, xb + 2 * i, sizeof pair);
            const __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            a[0] = _mm512_dpbf16_ps(a[0], xv, (__m512bh)_mm512_loadu_si512(wb + i * 64));
            c[0] = _mm512_dpbf16_ps(c[0], xv, (__m512bh)_mm512_loadu_si512(wb + i * 64 + 32));
        }
#endif
    } else {
        const float *xf = (const float *)x, *wf = (const float *)w;
        for (; i + 4 <= k; i += 4) {
            for (int u = 0; u < 4; u++) {
                const float *step = wf + (i + u) * 32;
                prefetch_ahead(step);
                const __m512 xv = _mm512_set1_ps(xf[i + u]);
                a[u] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(step), a[u]);
                c[u] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(step + 16), c[u]);
            }
        }
        for (; i < k; i++) {
            const __m512 xv = _mm512_set1_ps(xf[i]);
            a[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wf + i * 32), a[0]);
            c[0] = _mm512_fmadd_ps(xv, _mm512_loadu_ps(wf + i * 32 + 16), c[0]);
        }
    }
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    const __m512 s0 = _mm512_add_ps(_mm512_add_ps(a[0], a[1]), _mm512_add_ps(a[2], a[3]));
    const __m512 s1 = _mm512_add_ps(_mm512_add_ps(c[0], c[1]), _mm512_add_ps(c[2], c[3]));
    store16(y, col, _mm512_add_ps(s0, bias16(bias, is_bf16, col, m0)), is_bf16, m0);
    store16(y, col + 16, _mm512_add_ps(s1, bias16(bias, is_bf16, col + 16, m1)), is_bf16, m1);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define AMX_MIN_ROWS 3 /* from 3 rows the tiles beat the vdpbf16ps tile (each row of which costs
                         * another pass of arithmetic); at 2 they tie, and 1 row streams */
/* The quantized linears' blocks are dequantized one at a time, which costs more than either
 * tile's arithmetic: at 3-7 rows the tiles gained nothing there (int8 and int4, 512 x 3072). */
#define AMX_MIN_ROWS_DEQUANTIZED 8
#define AMX_ROWS 16    /* rows of x per tile */
#define AMX_K 32       /* bf16 values of K per tile step */

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed, aligned(64))) amx_config;

/* Linux hands out the tile state only on request, once per process; -1 unknown, 0 no, 1 yes. */
static int amx_state = -1;

static int amx_usable(void) {
    if (amx_state < 0) {
        const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
        amx_state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    }
    return amx_state;
}

/* Tiles 0-1: the two 16-output halves of C (fp32); 2: 16 rows x 32 K of x; 3-4: the halves'
 * 16 K-pairs. The configuration is per thread. */
static void amx_configure(void) {
    amx_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette_id = 1;
    for (int t = 0; t < 5; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

/* AMX_ROWS rows of x (row stride ldx, bf16) against one packed block, into c[16][32] fp32. */
static inline void amx_tile(const uint16_t *x, int64_t ldx, const uint16_t *w, int64_t k, float *c) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t kk = 0; kk < k; kk += AMX_K) {
        _tile_loadd(2, x + kk, ldx * 2);
        const uint16_t *step = w + kk * 32; /* K-pair kk/2, 128 bytes a pair */
        _tile_loadd(3, step, 128);
        _tile_loadd(4, step + 32, 128);
        _tile_dpbf16ps(0, 2, 3);
        _tile_dpbf16ps(1, 2, 4);
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
}

/* `rows` rows of x against one packed block (tiles configured): whole tiles straight from x,
 * the last rows, fewer than a tile, from `last`: those rows copied into a zeroed tile of their
 * own (a tile's shape is set per thread, and a short one would mean configuring again). */
static void amx_rows(const uint16_t *x, int64_t ldx, const uint16_t *wb, int64_t k, const void *bias,
                     int64_t col, int64_t n, uint16_t *y, int64_t rows, const uint16_t *last) {
    float c[AMX_ROWS * 32] __attribute__((aligned(64)));
    const __mmask16 m0 = column_mask(col, n), m1 = column_mask(col + 16, n);
    const __m512 b0 = bias16(bias, 1, col, m0), b1 = bias16(bias, 1, col + 16, m1);
    for (int64_t r = 0; r < rows; r += AMX_ROWS) {
        const int mr = (int)(rows - r < AMX_ROWS ? rows - r : AMX_ROWS);
        if (mr < AMX_ROWS)
            amx_tile(last, k, wb, k, c);
        else
            amx_tile(x + r * ldx, ldx, wb, k, c);
        for (int i = 0; i < mr; i++) {
            store16(y, (r + i) * n + col, _mm512_add_ps(_mm512_load_ps(c + i * 32), b0), 1, m0);
            store16(y, (r + i) * n + col + 16, _mm512_add_ps(_mm512_load_ps(c + i * 32 + 16), b1), 1, m1);
        }
    }
}

/* The rows of x past its last whole tile, copied into a zeroed tile (NULL if there are none).
 * Made once a call: copied again for every weight block, it cost a decode batch of 8 rows more
 * than the tile arithmetic did. */
static uint16_t *amx_last_tile(const uint16_t *x, int64_t ldx, int64_t rows, int64_t k) {
    const int64_t whole = rows / AMX_ROWS * AMX_ROWS;
    if (whole == rows) return NULL;
    uint16_t *last = (uint16_t *)calloc((size_t)(AMX_ROWS * k), 2);
    if (!last) return NULL;
    for (int64_t i = whole; i < rows; i++) memcpy(last + (i - whole) * k, x + i * ldx, (size_t)k * 2);
    return last;
}

static int amx_fits(int is_bf16, int64_t rows, int64_t k, int64_t min_rows) {
    return is_bf16 && rows >= min_rows && k % AMX_K == 0 && amx_usable();
}

static int amx_linear(const uint16_t *x, int64_t ldx, const uint16_t *w, const void *bias, uint16_t *y,
                      int64_t m, int64_t n, int64_t k, int num_threads) {
    const int64_t blocks = (n + 31) / 32;
    int64_t mc = BLOCK_BYTES / (k * 2) / AMX_ROWS * AMX_ROWS;
    if (mc < AMX_ROWS) mc = AMX_ROWS;
    /* Row blocks are whole tiles, so only the last block's last tile is short. */
    uint16_t *last = amx_last_tile(x, ldx, m, k);
    if (!last && m % AMX_ROWS) return -1;
#pragma omp parallel num_threads(num_threads)
    {
        amx_configure();
        for (int64_t r0 = 0; r0 < m; r0 += mc) {
            const int64_t rows = m - r0 < mc ? m - r0 : mc;
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < blocks; b++)
                amx_rows(x + r0 * ldx, ldx, w + b * 32 * k, k, bias, 32 * b, n, y + r0 * n, rows, last);
        }
        _tile_release();
    }
    free(last);
    return 0;
}
#endif

/* Rows of x against one packed 32-output block, for kernels that build blocks on the fly
 * (the quantized linears dequantize a block into scratch, then run it here). */
void pilot_linear_block(const void *x, int64_t ldx, const void *block, int64_t k,
                        const void *bias, int64_t col, int64_t n, void *y, int64_t rows,
                        int is_bf16) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    uint16_t *last;
    if (amx_fits(is_bf16, rows, k, AMX_MIN_ROWS_DEQUANTIZED) /* the quantized linears' blocks */
        && ((last = amx_last_tile((const uint16_t *)x, ldx, rows, k)) || rows % AMX_ROWS == 0)) {
        amx_configure();
        amx_rows((const uint16_t *)x, ldx, (const uint16_t *)block, k, bias, col, n, (uint16_t *)y, rows, last);
        _tile_release();
        free(last);
        return;
    }
#endif
    const int elem = is_bf16 ? 2 : 4;
    for (int64_t r = 0; r < rows; r += MR) {
        const int mr = (int)(rows - r < MR ? rows - r : MR);
        tile_any(mr, (const char *)x + r * ldx * elem, ldx, block, k, bias, col, n,
                 (char *)y + r * n * elem, is_bf16);
    }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* AVX2 (no AVX-512): the same packed layouts, 8 lanes at a time, accumulating in fp32.
 * A 32-bit lane of the bf16 pair layout holds (k, k+1) of one output, so a shift and a mask
 * widen both to fp32 in registers and bf16 needs no bf16 instructions. Rows of x are widened
 * to fp32 once a call; above one row each bf16 block is widened once into an fp32 block in L2,
 * which the register tile then reuses for every row. */
#define MR8 6 /* rows of x per register tile: 6 rows x 16 outputs is 12 of the 16 ymm registers */

static inline void prefetch_step(const void *step) {
    _mm_prefetch((const char *)step + PREFETCH_BYTES, _MM_HINT_T0);
    _mm_prefetch((const char *)step + PREFETCH_BYTES + 64, _MM_HINT_T0);
}

/* One fp32 row against one packed block (128 bytes a step in both dtypes): 32 sums in out. */
static void row8(const float *x, const void *w, int64_t k, int is_bf16, __m256 out[4]) {
    __m256 a[4], c[4]; /* two chains per output vector: an FMA's latency outlasts one step */
    for (int j = 0; j < 4; j++) a[j] = c[j] = _mm256_setzero_ps();
    if (is_bf16) {
        const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
        for (int64_t i = 0; i < k / 2; i++) {
            const uint16_t *step = (const uint16_t *)w + i * 64;
            prefetch_step(step);
            const __m256 x0 = _mm256_set1_ps(x[2 * i]), x1 = _mm256_set1_ps(x[2 * i + 1]);
            for (int j = 0; j < 4; j++) {
                const __m256i pairs = _mm256_loadu_si256((const __m256i *)(step + 16 * j));
                a[j] = _mm256_fmadd_ps(x0, _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)), a[j]);
                c[j] = _mm256_fmadd_ps(x1, _mm256_castsi256_ps(_mm256_and_si256(pairs, high)), c[j]);
            }
        }
    } else {
        const float *wf = (const float *)w;
        int64_t i = 0;
        for (; i + 2 <= k; i += 2) {
            prefetch_step(wf + i * 32);
            prefetch_step(wf + i * 32 + 32);
            const __m256 x0 = _mm256_set1_ps(x[i]), x1 = _mm256_set1_ps(x[i + 1]);
            for (int j = 0; j < 4; j++) {
                a[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wf + i * 32 + 8 * j), a[j]);
                c[j] = _mm256_fmadd_ps(x1, _mm256_loadu_ps(wf + i * 32 + 32 + 8 * j), c[j]);
            }
        }
        if (i < k) {
            const __m256 x0 = _mm256_set1_ps(x[i]);
            for (int j = 0; j < 4; j++) a[j] = _mm256_fmadd_ps(x0, _mm256_loadu_ps(wf + i * 32 + 8 * j), a[j]);
        }
    }
    for (int j = 0; j < 4; j++) out[j] = _mm256_add_ps(a[j], c[j]);
}

/* A bf16 packed block widened to the fp32 packed layout [K][32]. */
static void widen_block(const uint16_t *w, int64_t k, float *out) {
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    for (int64_t i = 0; i < k / 2; i++) {
        for (int j = 0; j < 4; j++) {
            const __m256i pairs = _mm256_loadu_si256((const __m256i *)(w + i * 64 + 16 * j));
            _mm256_storeu_ps(out + 2 * i * 32 + 8 * j, _mm256_castsi256_ps(_mm256_slli_epi32(pairs, 16)));
            _mm256_storeu_ps(out + (2 * i + 1) * 32 + 8 * j, _mm256_castsi256_ps(_mm256_and_si256(pairs, high)));
        }
    }
}

/* Bias (or 0) for outputs col.., fp32. */
static inline __m256 bias8(const void *bias, int is_bf16, int64_t col, int64_t n) {
    if (!bias || col >= n) return _mm256_setzero_ps();
    return load_f32x8((const char *)bias + col * (is_bf16 ? 2 : 4), is_bf16, n - col);
}

/* y[row, col + 8j ..] = acc[j] + bias, for the j whose outputs exist. */
static inline void store_outputs(void *y, int64_t row, const __m256 *acc, int vectors, const void *bias,
                                 int64_t col, int64_t n, int is_bf16) {
    const int elem = is_bf16 ? 2 : 4;
    for (int j = 0; j < vectors && col + 8 * j < n; j++) {
        const int64_t c = col + 8 * j;
        store_f32x8((char *)y + (row * n + c) * elem, _mm256_add_ps(acc[j], bias8(bias, is_bf16, c, n)),
                    is_bf16, n - c);
    }
}

/* mr fp32 rows of x against one 16-output half of an fp32 block [K][32] (half h). */
static inline __attribute__((always_inline)) void tile8(
    const int mr, const float *x, int64_t ldx, const float *w, int64_t k, int h, __m256 acc[MR8][2]) {
#pragma GCC unroll 6
    for (int m = 0; m < mr; m++) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i++) {
        const __m256 v0 = _mm256_loadu_ps(w + i * 32 + 16 * h), v1 = _mm256_loadu_ps(w + i * 32 + 16 * h + 8);
#pragma GCC unroll 6
        for (int m = 0; m < mr; m++) {
            const __m256 a = _mm256_broadcast_ss(x + m * ldx + i);
            acc[m][0] = _mm256_fmadd_ps(a, v0, acc[m][0]);
            acc[m][1] = _mm256_fmadd_ps(a, v1, acc[m][1]);
        }
    }
}

/* Rows of fp32 x (row stride ldx) against an fp32 block [K][32]: outputs col.. of y's rows. */
void pilot_linear_block8(const float *x, int64_t ldx, const float *w, int64_t k, const void *bias,
                         int64_t col, int64_t n, void *y, int64_t rows, int is_bf16) {
    __m256 acc[MR8][2];
    for (int64_t r = 0; r < rows; r += MR8) {
        const int mr = (int)(rows - r < MR8 ? rows - r : MR8);
        for (int h = 0; h < 2; h++) {
            const float *xr = x + r * ldx;
            switch (mr) {
                case 1: tile8(1, xr, ldx, w, k, h, acc); break;
                case 2: tile8(2, xr, ldx, w, k, h, acc); break;
                case 3: tile8(3, xr, ldx, w, k, h, acc); break;
                case 4: tile8(4, xr, ldx, w, k, h, acc); break;
                case 5: tile8(5, xr, ldx, w, k, h, acc); break;
                default: tile8(6, xr, ldx, w, k, h, acc); break;
            }
            for (int m = 0; m < mr; m++) store_outputs(y, r + m, acc[m], 2, bias, col + 16 * h, n, is_bf16);
        }
    }
}

static int linear_avx2(const void *x, int64_t ldx, const void *w, const void *bias, void *y,
                       int64_t m, int64_t n, int64_t k, int is_bf16, int num_threads) {
    const int64_t blocks = (n + 31) / 32, block_bytes = 32 * k * (is_bf16 ? 2 : 4);
    /* fp32 rows of x: x itself, or widened from bf16 into a buffer of stride k */
    const float *xf = (const float *)x;
    float *widened = NULL;
    int64_t ldf = ldx;
    if (is_bf16) {
        widened = malloc((size_t)(m * k) * sizeof(float));
        if (!widened) return -1;
        for (int64_t r = 0; r < m; r++)
            for (int64_t i = 0; i < k; i++) widened[r * k + i] = bf16_to_f32(((const uint16_t *)x)[r * ldx + i]);
        xf = widened;
        ldf = k;
    }
    int64_t mc = BLOCK_BYTES / (k * 4) / MR8 * MR8;
    if (mc < MR8) mc = MR8;
    int failed = 0;
#pragma omp parallel num_threads(num_threads)
    {
        float *dense = is_bf16 && m > 1 ? aligned_alloc(32, (size_t)((32 * k * 4 + 31) / 32 * 32)) : NULL;
        if (is_bf16 && m > 1 && !dense) {
#pragma omp atomic write
            failed = 1;
        }
        for (int64_t r0 = 0; r0 < m && !(is_bf16 && m > 1 && !dense); r0 += mc) {
            const int64_t rows = m - r0 < mc ? m - r0 : mc;
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < blocks; b++) {
                const char *wb = (const char *)w + b * block_bytes;
                if (m == 1) {
                    __m256 acc[4];
                    row8(xf, wb, k, is_bf16, acc);
                    store_outputs(y, 0, acc, 4, bias, 32 * b, n, is_bf16);
                    continue;
                }
                if (is_bf16) widen_block((const uint16_t *)wb, k, dense);
                pilot_linear_block8(xf + r0 * ldf, ldf, is_bf16 ? dense : (const float *)wb, k, bias,
                                    32 * b, n, (char *)y + r0 * n * (is_bf16 ? 2 : 4), rows, is_bf16);
            }
        }
        free(dense);
    }
    free(widened);
    return failed ? -1 : 0;
}
#endif

/* Which dtypes this build supports: bit 0 fp32, bit 1 bf16; bit 2: bf16 prefill on AMX tiles. */
int pilot_linear_caps(void) {
    int caps = 0;
#ifdef __AVX512F__
    caps |= 1;
#endif
#ifdef __AVX512BF16__
    caps |= 2;
#endif
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
    caps |= 3;
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx_usable()) caps |= 4;
#endif
    return caps;
}

/* Returns 0, or -1 when this build cannot run the dtype (the caller keeps another path). */
int pilot_linear(const void *x, int64_t ldx, const void *w, const void *bias, void *y, int64_t m,
                 int64_t n, int64_t k, int is_bf16, int num_threads) {
    if (!(pilot_linear_caps() & (is_bf16 ? 2 : 1)) || (is_bf16 && k % 2)) return -1;
#ifdef __AVX512F__
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (amx_fits(is_bf16, m, k, AMX_MIN_ROWS)
        && amx_linear((const uint16_t *)x, ldx, (const uint16_t *)w, bias, (uint16_t *)y, m, n, k, num_threads) == 0)
        return 0; /* else the tail's copy found no memory: the register tile needs none */
#endif
    const int elem = is_bf16 ? 2 : 4;
    const int64_t blocks = (n + 31) / 32, block_elems = 32 * k;
    int64_t mc = BLOCK_BYTES / (k * elem) / MR * MR;
    if (mc < MR) mc = MR;
    /* Threads split the output columns: each streams its own contiguous share of the weights
     * once per cache block of rows, and a single block (decode) streams them exactly once. */
#pragma omp parallel num_threads(num_threads)
    {
        for (int64_t r0 = 0; r0 < m; r0 += mc) {
            const int64_t rows = m - r0 < mc ? m - r0 : mc;
#pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < blocks; b++) {
                const char *wb = (const char *)w + b * block_elems * elem;
                if (m == 1) {
                    row(x, wb, k, bias, 32 * b, n, y, is_bf16);
                    continue;
                }
                pilot_linear_block((const char *)x + r0 * ldx * elem, ldx, wb, k, bias, 32 * b, n,
                                   (char *)y + r0 * n * elem, rows, is_bf16);
            }
        }
    }
    return 0;
#elif defined(__AVX2__) && defined(__FMA__)
    return linear_avx2(x, ldx, w, bias, y, m, n, k, is_bf16, num_threads);
#else
    (void)x; (void)ldx; (void)w; (void)bias; (void)y; (void)m; (void)n; (void)k;
    (void)num_threads;
    return -1;
#endif
}
