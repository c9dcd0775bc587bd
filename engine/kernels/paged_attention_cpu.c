/* Paged decode attention for the CPU: one query token per sequence, keys and values read in
 * place from the block cache (no gathered copy), fp32 accumulation, online softmax per tile.
 *
 * Layouts (row-major, contiguous):
 *   q, out        [num_seqs, num_heads, head_dim]
 *   k/v cache     [num_slots, num_kv_heads * head_dim], slot = block * block_size + offset
 *   block_tables  [num_seqs, max_blocks] (int64)
 *   context_lens  [num_seqs] (int64)
 * Query head h reads kv head h / (num_heads / num_kv_heads), as grouped-query attention does.
 * Returns 0, or -1 for a shape it does not handle (the caller falls back to PyTorch).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd_math.h"

#define MAX_GROUP 16
#define MAX_HEAD_DIM 256
#define TILE 16
/* A head size that is not a multiple of 16 (a small draft's 24, say) takes the vector path
 * through masked loads, which for bf16 need AVX-512 BW and VL. */
#if defined(__AVX512BW__) && defined(__AVX512VL__)
#define MASKED_BF16_LOADS 1
#else
#define MASKED_BF16_LOADS 0
#endif

static inline const void *row_ptr(const void *cache, int elem, const int64_t *table, int64_t pos,
                                  int block_size, int64_t stride, int offset) {
    int64_t slot = table[pos / block_size] * block_size + pos % block_size;
    return (const char *)cache + (slot * stride + offset) * elem;
}

/* Cache slots of positions t0 .. t0 + count - 1: one division, then a walk along the blocks. */
static inline void tile_slots(const int64_t *table, int64_t t0, int count, int block_size, int64_t *slots) {
    int64_t block = t0 / block_size;
    int offset = (int)(t0 - block * block_size);
    for (int j = 0; j < count; j++) {
        slots[j] = table[block] * block_size + offset;
        if (++offset == block_size) {
            offset = 0;
            block++;
        }
    }
}

static inline void load_row(const void *src, int is_bf16, int d, float *dst) {
    if (is_bf16) {
        const uint16_t *s = (const uint16_t *)src;
        for (int i = 0; i < d; i++) dst[i] = bf16_to_f32(s[i]);
    } else {
        memcpy(dst, src, (size_t)d * sizeof(float));
    }
}

#ifdef __AVX512F__
static inline __m512 load16(const void *src, int is_bf16) {
    if (is_bf16) {
        __m256i raw = _mm256_loadu_si256((const __m256i *)src);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
    return _mm512_loadu_ps(src);
}

/* The first lanes of `mask` from src, zeros in the rest: a head size that is not a multiple of
 * 16 ends in a short chunk, and reading past it would touch the next head's (or no) memory. */
static inline __m512 load16_mask(const void *src, int is_bf16, __mmask16 mask) {
    if (mask == 0xFFFF) return load16(src, is_bf16);
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    if (is_bf16) {
        __m256i raw = _mm256_maskz_loadu_epi16(mask, src);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
    }
#endif
    return _mm512_maskz_loadu_ps(mask, src);
}

/* 16 vectors in, one out: lane j holds the sum of v[j]'s lanes. ~45 shuffles and adds for 16
 * dot products, where reducing each on its own costs ~8 dependent operations apiece. */
static inline __m512 transpose_sum16(const __m512 v[TILE]) {
    __m512 pair[8], quad[4], oct[2];
    for (int i = 0; i < 8; i++) /* lanes of 128 bits: [a0+a2, b0+b2, a1+a3, b1+b3] */
        pair[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                                _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* lanes of 128 bits: [a, b, c, d] partial sums */
        __m512d x = _mm512_castps_pd(pair[2 * i]), y = _mm512_castps_pd(pair[2 * i + 1]);
        quad[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    for (int i = 0; i < 2; i++) /* fold the four 128-bit lanes pairwise */
        oct[i] = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], 0x88),
                               _mm512_shuffle_f32x4(quad[2 * i], quad[2 * i + 1], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(oct[0], oct[1], 0x88),
                         _mm512_shuffle_f32x4(oct[0], oct[1], 0xdd));
}

/* One (sequence, kv head), 16 * (CH - 1) < d <= 16 * CH: `group` query heads share its keys
 * and values; the last chunk of a head size that is not a multiple of 16 is masked.
 * Per tile of 16 tokens: scores for all 16 at once (a register per token, then one transposed
 * sum), an online-softmax update, then the weighted values. bf16 keys meet bf16 queries in
 * vdpbf16ps without conversion; bf16 values are widened once per tile and reused by the group. */
static inline __attribute__((always_inline)) void attend_avx512_ch(
    const int CH, const void *q, const void *k_cache, const void *v_cache, int is_bf16,
    const int64_t *table, int64_t ctx, float *out, int kvh, int group, int kv_heads, int d,
    int block_size, float scale) {
    const int elem = is_bf16 ? 2 : 4;
    const int64_t stride = (int64_t)kv_heads * d;
    const __mmask16 tail = d % 16 ? (__mmask16)((1u << (d % 16)) - 1u) : (__mmask16)0xFFFF;
#define CHUNK_MASK(c) ((c) == CH - 1 ? tail : (__mmask16)0xFFFF)
#ifdef __AVX512BF16__
    const int pair_dot = is_bf16 && d % 32 == 0;
#else
    const int pair_dot = 0;
#endif
    float qs[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float acc[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float vt[TILE][MAX_HEAD_DIM] __attribute__((aligned(64)));
    float ps[TILE] __attribute__((aligned(64)));
    float m[MAX_GROUP], l[MAX_GROUP];
    const char *krow[TILE], *vrow[TILE];
    for (int g = 0; g < group; g++) {
        const char *qg = (const char *)q + (int64_t)(kvh * group + g) * d * elem;
        for (int c = 0; c < CH; c++) {
            _mm512_store_ps(qs[g] + 16 * c, load16_mask(qg + c * 16 * elem, is_bf16, CHUNK_MASK(c)));
            _mm512_store_ps(acc[g] + 16 * c, _mm512_setzero_ps());
        }
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    for (int64_t t0 = 0; t0 < ctx; t0 += TILE) {
        const int n = ctx - t0 < TILE ? (int)(ctx - t0) : TILE;
        for (int j = 0; j < TILE; j++) { /* rows past the context repeat the last live one */
            const int64_t pos = t0 + (j < n ? j : n - 1);
            krow[j] = row_ptr(k_cache, elem, table, pos, block_size, stride, kvh * d);
            vrow[j] = row_ptr(v_cache, elem, table, pos, block_size, stride, kvh * d);
        }
        if (t0 + TILE < ctx) { /* the next tile's rows, while this one computes */
            const int64_t pos = t0 + TILE + TILE - 1 < ctx ? t0 + TILE + TILE - 1 : ctx - 1;
            for (int64_t p = t0 + TILE; p <= pos; p++) {
                const char *kn = row_ptr(k_cache, elem, table, p, block_size, stride, kvh * d);
                const char *vn = row_ptr(v_cache, elem, table, p, block_size, stride, kvh * d);
                for (int b = 0; b < d * elem; b += 64) {
                    _mm_prefetch(kn + b, _MM_HINT_T0);
                    _mm_prefetch(vn + b, _MM_HINT_T0);
                }
            }
        }
        const int widen_v = is_bf16 && group > 1;
        if (widen_v)
            for (int j = 0; j < n; j++)
                for (int c = 0; c < CH; c++)
                    _mm512_store_ps(vt[j] + 16 * c, load16_mask(vrow[j] + c * 32, 1, CHUNK_MASK(c)));
        const __mmask16 live = (__mmask16)((1u << n) - 1u);
        for (int g = 0; g < group; g++) {
            __m512 dot[TILE];
            if (pair_dot) {
#ifdef __AVX512BF16__
                const char *qg = (const char *)q + (int64_t)(kvh * group + g) * d * 2;
                __m512bh qp[MAX_HEAD_DIM / 32];
                for (int c = 0; c < CH / 2; c++) qp[c] = (__m512bh)_mm512_loadu_si512(qg + 64 * c);
                for (int j = 0; j < TILE; j++) {
                    __m512 sum = _mm512_setzero_ps();
                    for (int c = 0; c < CH / 2; c++)
                        sum = _mm512_dpbf16_ps(sum, qp[c], (__m512bh)_mm512_loadu_si512(krow[j] + 64 * c));
                    dot[j] = sum;
                }
#endif
            } else {
                __m512 qv[MAX_HEAD_DIM / 16];
                for (int c = 0; c < CH; c++) qv[c] = _mm512_load_ps(qs[g] + 16 * c);
                for (int j = 0; j < TILE; j++) {
                    __m512 sum = _mm512_setzero_ps();
                    for (int c = 0; c < CH; c++)
                        sum = _mm512_fmadd_ps(qv[c], load16_mask(krow[j] + c * 16 * elem, is_bf16, CHUNK_MASK(c)), sum);
                    dot[j] = sum;
                }
            }
            __m512 sv = _mm512_mul_ps(transpose_sum16(dot), _mm512_set1_ps(scale));
            sv = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), live, sv);
            const float tile_max = _mm512_reduce_max_ps(sv);
            const float new_max = tile_max > m[g] ? tile_max : m[g];
            const float correction = expf(m[g] - new_max);
            const __m512 p = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(sv, _mm512_set1_ps(new_max))));
            l[g] = l[g] * correction + _mm512_reduce_add_ps(p);
            m[g] = new_max;
            _mm512_store_ps(ps, p);
            __m512 a[MAX_HEAD_DIM / 16];
            const __m512 cv = _mm512_set1_ps(correction);
            for (int c = 0; c < CH; c++) a[c] = _mm512_mul_ps(_mm512_load_ps(acc[g] + 16 * c), cv);
            for (int j = 0; j < n; j++) {
                const __m512 pj = _mm512_set1_ps(ps[j]);
                for (int c = 0; c < CH; c++) {
                    const __m512 vv = widen_v ? _mm512_load_ps(vt[j] + 16 * c)
                                              : load16_mask(vrow[j] + c * 16 * elem, is_bf16, CHUNK_MASK(c));
                    a[c] = _mm512_fmadd_ps(pj, vv, a[c]);
                }
            }
            for (int c = 0; c < CH; c++) _mm512_store_ps(acc[g] + 16 * c, a[c]);
        }
    }
    for (int g = 0; g < group; g++) {
        const __m512 inv = _mm512_set1_ps(1.f / l[g]);
        for (int c = 0; c < CH; c++)
            _mm512_mask_storeu_ps(out + (int64_t)g * d + 16 * c, CHUNK_MASK(c),
                                  _mm512_mul_ps(_mm512_load_ps(acc[g] + 16 * c), inv));
    }
#undef CHUNK_MASK
}

#define ATTEND_CASE(N)                                                                        \
    case N:                                                                                   \
        attend_avx512_ch(N, q, k_cache, v_cache, is_bf16, table, ctx, out, kvh, group,        \
                         kv_heads, d, block_size, scale);                                     \
        break;

/* d <= MAX_HEAD_DIM; common head sizes get code with the loop bounds fixed. */
static void attend_avx512(const void *q, const void *k_cache, const void *v_cache, int is_bf16,
                          const int64_t *table, int64_t ctx, float *out, int kvh, int group,
                          int kv_heads, int d, int block_size, float scale) {
    switch ((d + 15) / 16) {
        ATTEND_CASE(1) ATTEND_CASE(2) ATTEND_CASE(4) ATTEND_CASE(6) ATTEND_CASE(8)
        ATTEND_CASE(16)
    default:
        attend_avx512_ch((d + 15) / 16, q, k_cache, v_cache, is_bf16, table, ctx, out, kvh, group,
                         kv_heads, d, block_size, scale);
    }
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define TILE8 8

/* 8 vectors in, one out: lane j holds the sum of v[j]'s lanes. */
static inline __m256 transpose_sum8(const __m256 v[TILE8]) {
    const __m256 s01 = _mm256_hadd_ps(v[0], v[1]), s23 = _mm256_hadd_ps(v[2], v[3]);
    const __m256 s45 = _mm256_hadd_ps(v[4], v[5]), s67 = _mm256_hadd_ps(v[6], v[7]);
    const __m256 a = _mm256_hadd_ps(s01, s23), b = _mm256_hadd_ps(s45, s67); /* per 128-bit half */
    return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

static inline float hmax8(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}

static inline float hsum8(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* The AVX-512 path's tiled online softmax, 8 tokens a tile and 8 lanes (d a multiple of 8).
 * A tile's keys and values are widened to fp32 once and shared by the group's query heads. */
static void attend_avx2(const void *q, const void *k_cache, const void *v_cache, int is_bf16,
                        const int64_t *table, int64_t ctx, float *out, int kvh, int group,
                        int kv_heads, int d, int block_size, float scale) {
    const int elem = is_bf16 ? 2 : 4, ch = d / 8;
    const int64_t stride = (int64_t)kv_heads * d;
    float qs[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(32)));
    float acc[MAX_GROUP][MAX_HEAD_DIM] __attribute__((aligned(32)));
    float kt[TILE8][MAX_HEAD_DIM] __attribute__((aligned(32)));
    float vt[TILE8][MAX_HEAD_DIM] __attribute__((aligned(32)));
    float ps[TILE8] __attribute__((aligned(32)));
    float m[MAX_GROUP], l[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        load_row((const char *)q + (int64_t)(kvh * group + g) * d * elem, is_bf16, d, qs[g]);
        memset(acc[g], 0, (size_t)d * sizeof(float));
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int64_t t0 = 0; t0 < ctx; t0 += TILE8) {
        const int n = ctx - t0 < TILE8 ? (int)(ctx - t0) : TILE8;
        /* This tile's slots and the next one's, from one division (one a row cost more than
         * the arithmetic); the next tile's rows are prefetched while this one computes. */
        int64_t slots[2 * TILE8];
        const int ahead = ctx - t0 < 2 * TILE8 ? (int)(ctx - t0) : 2 * TILE8;
        tile_slots(table, t0, ahead, block_size, slots);
        for (int j = 0; j < TILE8; j++) { /* rows past the context repeat the last live one */
            const int64_t row = (slots[j < n ? j : n - 1] * stride + (int64_t)kvh * d) * elem;
            load_row((const char *)k_cache + row, is_bf16, d, kt[j]);
            if (j < n) load_row((const char *)v_cache + row, is_bf16, d, vt[j]);
        }
        for (int j = TILE8; j < ahead; j++) {
            const int64_t row = (slots[j] * stride + (int64_t)kvh * d) * elem;
            for (int b = 0; b < d * elem; b += 64) {
                _mm_prefetch((const char *)k_cache + row + b, _MM_HINT_T0);
                _mm_prefetch((const char *)v_cache + row + b, _MM_HINT_T0);
            }
        }
        const __m256 live = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(n), lane));
        for (int g = 0; g < group; g++) {
            __m256 dot[TILE8]; /* eight independent chains: one would wait on each FMA's latency */
            for (int j = 0; j < TILE8; j++) dot[j] = _mm256_setzero_ps();
            for (int c = 0; c < ch; c++) {
                const __m256 qv = _mm256_load_ps(qs[g] + 8 * c);
                for (int j = 0; j < TILE8; j++) dot[j] = _mm256_fmadd_ps(qv, _mm256_load_ps(kt[j] + 8 * c), dot[j]);
            }
            const __m256 sv = _mm256_blendv_ps(_mm256_set1_ps(-INFINITY),
                                               _mm256_mul_ps(transpose_sum8(dot), _mm256_set1_ps(scale)), live);
            const float tile_max = hmax8(sv);
            const float new_max = tile_max > m[g] ? tile_max : m[g];
            const float correction = expf(m[g] - new_max);
            const __m256 p = _mm256_and_ps(live, exp256(_mm256_sub_ps(sv, _mm256_set1_ps(new_max))));
            l[g] = l[g] * correction + hsum8(p);
            m[g] = new_max;
            _mm256_store_ps(ps, p);
            const __m256 cv = _mm256_set1_ps(correction);
            int c = 0;
            for (; c + 4 <= ch; c += 4) { /* four chunks at once: four chains through the tile */
                __m256 a[4];
                for (int u = 0; u < 4; u++) a[u] = _mm256_mul_ps(_mm256_load_ps(acc[g] + 8 * (c + u)), cv);
                for (int j = 0; j < n; j++) {
                    const __m256 pj = _mm256_set1_ps(ps[j]);
                    for (int u = 0; u < 4; u++) a[u] = _mm256_fmadd_ps(pj, _mm256_load_ps(vt[j] + 8 * (c + u)), a[u]);
                }
                for (int u = 0; u < 4; u++) _mm256_store_ps(acc[g] + 8 * (c + u), a[u]);
            }
            for (; c < ch; c++) {
                __m256 a = _mm256_mul_ps(_mm256_load_ps(acc[g] + 8 * c), cv);
                for (int j = 0; j < n; j++)
                    a = _mm256_fmadd_ps(_mm256_set1_ps(ps[j]), _mm256_load_ps(vt[j] + 8 * c), a);
                _mm256_store_ps(acc[g] + 8 * c, a);
            }
        }
    }
    for (int g = 0; g < group; g++) {
        const __m256 inv = _mm256_set1_ps(1.f / l[g]);
        for (int c = 0; c < ch; c++)
            _mm256_storeu_ps(out + (int64_t)g * d + 8 * c, _mm256_mul_ps(_mm256_load_ps(acc[g] + 8 * c), inv));
    }
}
#endif

/* Portable version of the same computation. */
static void attend_generic(const void *q, const void *k_cache, const void *v_cache, int is_bf16,
                           const int64_t *table, int64_t ctx, float *out, int kvh, int group,
                           int kv_heads, int d, int block_size, float scale) {
    const int elem = is_bf16 ? 2 : 4;
    const int64_t stride = (int64_t)kv_heads * d;
    float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM], row[MAX_HEAD_DIM];
    float m[MAX_GROUP], l[MAX_GROUP];
    for (int g = 0; g < group; g++) {
        load_row((const char *)q + (int64_t)(kvh * group + g) * d * elem, is_bf16, d, qf[g]);
        for (int i = 0; i < d; i++) { qf[g][i] *= scale; acc[g][i] = 0.f; }
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    for (int64_t t = 0; t < ctx; t++) {
        load_row(row_ptr(k_cache, elem, table, t, block_size, stride, kvh * d), is_bf16, d, row);
        float p[MAX_GROUP];
        for (int g = 0; g < group; g++) {
            float dot = 0.f;
            for (int i = 0; i < d; i++) dot += qf[g][i] * row[i];
            float new_max = dot > m[g] ? dot : m[g];
            float correction = expf(m[g] - new_max);
            p[g] = expf(dot - new_max);
            l[g] = l[g] * correction + p[g];
            m[g] = new_max;
            for (int i = 0; i < d; i++) acc[g][i] *= correction;
        }
        load_row(row_ptr(v_cache, elem, table, t, block_size, stride, kvh * d), is_bf16, d, row);
        for (int g = 0; g < group; g++)
            for (int i = 0; i < d; i++) acc[g][i] += p[g] * row[i];
    }
    for (int g = 0; g < group; g++)
        for (int i = 0; i < d; i++) out[(int64_t)g * d + i] = acc[g][i] / l[g];
}

/* As paged_decode_attention, with sequence b's query at q + b * q_stride elements (the
 * decoder-layer kernel reads queries in place from the fused q|k|v rows). */
int paged_decode_attention_strided(const void *q, int64_t q_stride, const void *k_cache,
                                   const void *v_cache, int is_bf16, const int64_t *block_tables,
                                   const int64_t *context_lens, void *out, int num_seqs, int heads,
                                   int kv_heads, int d, int block_size, int max_blocks, float scale,
                                   int num_threads) {
    if (kv_heads <= 0 || heads % kv_heads || heads / kv_heads > MAX_GROUP || d > MAX_HEAD_DIM)
        return -1;
    const int group = heads / kv_heads, elem = is_bf16 ? 2 : 4;
    const int64_t work = (int64_t)num_seqs * kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t w = 0; w < work; w++) {
        const int64_t b = w / kv_heads;
        const int kvh = (int)(w % kv_heads);
        const char *qb = (const char *)q + b * q_stride * elem;
        float res[MAX_GROUP * MAX_HEAD_DIM];
#ifdef __AVX512F__
        if (d % 16 == 0 || MASKED_BF16_LOADS)
            attend_avx512(qb, k_cache, v_cache, is_bf16, block_tables + b * max_blocks,
                          context_lens[b], res, kvh, group, kv_heads, d, block_size, scale);
        else
#elif defined(__AVX2__) && defined(__FMA__)
        if (d % 8 == 0)
            attend_avx2(qb, k_cache, v_cache, is_bf16, block_tables + b * max_blocks,
                        context_lens[b], res, kvh, group, kv_heads, d, block_size, scale);
        else
#endif
            attend_generic(qb, k_cache, v_cache, is_bf16, block_tables + b * max_blocks,
                           context_lens[b], res, kvh, group, kv_heads, d, block_size, scale);
        const int64_t base = (b * heads + (int64_t)kvh * group) * d;
        for (int i = 0; i < group * d; i++) {
            if (is_bf16) ((uint16_t *)out)[base + i] = f32_to_bf16(res[i]);
            else ((float *)out)[base + i] = res[i];
        }
    }
    return 0;
}

int paged_decode_attention(const void *q, const void *k_cache, const void *v_cache, int is_bf16,
                           const int64_t *block_tables, const int64_t *context_lens, void *out,
                           int num_seqs, int heads, int kv_heads, int d, int block_size,
                           int max_blocks, float scale, int num_threads) {
    return paged_decode_attention_strided(q, (int64_t)heads * d, k_cache, v_cache, is_bf16,
                                          block_tables, context_lens, out, num_seqs, heads,
                                          kv_heads, d, block_size, max_blocks, scale, num_threads);
}
