/* The per-layer element-wise steps, fused so that each is one pass and one call from Python:
 * at batch 1 the dozen PyTorch ops they replace cost more time than the attention itself.
 *
 * Each rounds to bf16 where the unfused PyTorch ops would (between operations), so bf16 results
 * stay those of the reference's order of operations; fp32 is computed in fp32 throughout.
 * Rows are contiguous; returns 0. Without AVX-512 a portable loop of the same order of
 * operations runs (the compiler vectorizes it for the CPU at hand, e.g. AVX2).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd_math.h"

/* Below this many elements a second thread costs more than it saves. */
#define PARALLEL_ELEMENTS (1 << 16)

int pilot_elementwise_caps(void) {
    return 1;
}

#ifndef __AVX512F__
static inline float load1(const void *p, int64_t i, int is_bf16) {
    return is_bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store1(void *p, int64_t i, float v, int is_bf16) {
    if (is_bf16) ((uint16_t *)p)[i] = f32_to_bf16(v);
    else ((float *)p)[i] = v;
}

/* The value the unfused bf16 op would hand on: rounded to bf16 (fp32 passes through). */
static inline float rounded(float v, int is_bf16) {
    return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}
#endif

/* out = RMSNorm(s) * weight, where s = x, or with a residual stream s = x + residual (rounded to
 * the dtype and written back into residual, which then carries s to the next layer). */
int pilot_rms_norm(const void *x, void *residual, const void *weight, void *out, int64_t rows,
                   int64_t dim, float eps, int is_bf16, int num_threads) {
#ifdef __AVX512F__
    const int elem = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *xr = (const char *)x + r * dim * elem;
        char *rr = residual ? (char *)residual + r * dim * elem : NULL;
        char *orow = (char *)out + r * dim * elem;
        __m512 squares = _mm512_setzero_ps();
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = tail_mask(dim - i);
            __m512 v = load_f32x16(xr + i * elem, is_bf16, m);
            if (rr) {
                v = _mm512_add_ps(v, load_f32x16(rr + i * elem, is_bf16, m));
                if (is_bf16) v = through_bf16(v);
                store_f32x16(rr + i * elem, v, is_bf16, m);
            }
            squares = _mm512_fmadd_ps(v, v, squares);
        }
        const float inv = 1.f / sqrtf(_mm512_reduce_add_ps(squares) / (float)dim + eps);
        const char *src = rr ? rr : xr;
        for (int64_t i = 0; i < dim; i += 16) {
            const __mmask16 m = tail_mask(dim - i);
            __m512 v = _mm512_mul_ps(load_f32x16(src + i * elem, is_bf16, m), _mm512_set1_ps(inv));
            if (is_bf16) v = through_bf16(v);
            v = _mm512_mul_ps(v, load_f32x16((const char *)weight + i * elem, is_bf16, m));
            store_f32x16(orow + i * elem, v, is_bf16, m);
        }
    }
    return 0;
#else
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * dim > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t o = r * dim;
        float squares = 0.f;
        for (int64_t i = 0; i < dim; i++) {
            float v = load1(x, o + i, is_bf16);
            if (residual) {
                v = rounded(v + load1(residual, o + i, is_bf16), is_bf16);
                store1(residual, o + i, v, is_bf16);
            }
            squares += v * v;
        }
        const float inv = 1.f / sqrtf(squares / (float)dim + eps);
        const void *src = residual ? residual : x;
        for (int64_t i = 0; i < dim; i++)
            store1(out, o + i, rounded(load1(src, o + i, is_bf16) * inv, is_bf16) * load1(weight, i, is_bf16), is_bf16);
    }
    return 0;
#endif
}

/* SwiGLU's gate: out[r] = silu(gate_up[r, :inter]) * gate_up[r, inter:]. */
int pilot_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t inter, int is_bf16,
                   int num_threads) {
#ifdef __AVX512F__
    const int elem = is_bf16 ? 2 : 4;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * inter > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        const char *gate = (const char *)gate_up + r * 2 * inter * elem;
        const char *up = gate + inter * elem;
        char *orow = (char *)out + r * inter * elem;
        for (int64_t i = 0; i < inter; i += 16) {
            const __mmask16 m = tail_mask(inter - i);
            const __m512 g = load_f32x16(gate + i * elem, is_bf16, m);
            const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
            __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e));
            if (is_bf16) s = through_bf16(s);
            store_f32x16(orow + i * elem, _mm512_mul_ps(s, load_f32x16(up + i * elem, is_bf16, m)),
                         is_bf16, m);
        }
    }
    return 0;
#else
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * inter > PARALLEL_ELEMENTS)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t i = 0; i < inter; i++) {
            const float g = load1(gate_up, r * 2 * inter + i, is_bf16);
            const float silu = rounded(g / (1.f + expf(-g)), is_bf16);
            store1(out, r * inter + i, silu * load1(gate_up, r * 2 * inter + inter + i, is_bf16), is_bf16);
        }
    }
    return 0;
#endif
}

/* One head of x rotated in place with the position's cos and signed-sin rows. */
static inline void rotate_head(char *x, const char *c, const char *s, int half, int is_bf16) {
    const int elem = is_bf16 ? 2 : 4;
#ifdef __AVX512F__
    for (int i = 0; i < half; i += 16) {
        const __mmask16 m = tail_mask(half - i);
        const __m512 a = load_f32x16(x + i * elem, is_bf16, m);
        const __m512 b = load_f32x16(x + (half + i) * elem, is_bf16, m);
        __m512 ac = _mm512_mul_ps(a, load_f32x16(c + i * elem, is_bf16, m));
        __m512 bc = _mm512_mul_ps(b, load_f32x16(c + (half + i) * elem, is_bf16, m));
        if (is_bf16) {
            ac = through_bf16(ac);
            bc = through_bf16(bc);
        }
        store_f32x16(x + i * elem, _mm512_fmadd_ps(b, load_f32x16(s + i * elem, is_bf16, m), ac), is_bf16, m);
        store_f32x16(x + (half + i) * elem, _mm512_fmadd_ps(a, load_f32x16(s + (half + i) * elem, is_bf16, m), bc),
                     is_bf16, m);
    }
#else
    (void)elem;
    for (int i = 0; i < half; i++) {
        const float a = load1(x, i, is_bf16), b = load1(x, half + i, is_bf16);
        const float ac = rounded(a * load1(c, i, is_bf16), is_bf16);
        const float bc = rounded(b * load1(c, half + i, is_bf16), is_bf16);
        store1(x, i, fmaf(b, load1(s, i, is_bf16), ac), is_bf16);
        store1(x, half + i, fmaf(a, load1(s, half + i, is_bf16), bc), is_bf16);
    }
#endif
}

/* Rotates the query and key heads of each token's fused q|k|v row in place (HF Llama's
 * half-split rotation, x * cos + roll(x, d/2) * signed_sin, tables [max_pos, d] in the model's
 * dtype), then copies the token's keys and values into its cache slot. */
int pilot_rope_and_cache(void *qkv, int64_t tokens, const int64_t *positions, const void *cos,
                         const void *signed_sin, int heads, int kv_heads, int d, void *k_cache,
                         void *v_cache, const int64_t *slots, int is_bf16, int num_threads) {
    if (d % 2) return -1;
    const int elem = is_bf16 ? 2 : 4, half = d / 2;
    const int64_t width = (int64_t)(heads + 2 * kv_heads) * d, kv_bytes = (int64_t)kv_heads * d * elem;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (tokens * width > PARALLEL_ELEMENTS)
    for (int64_t t = 0; t < tokens; t++) {
        char *row = (char *)qkv + t * width * elem;
        const char *c = (const char *)cos + positions[t] * d * elem;
        const char *s = (const char *)signed_sin + positions[t] * d * elem;
        for (int h = 0; h < heads + kv_heads; h++) rotate_head(row + (int64_t)h * d * elem, c, s, half, is_bf16);
        memcpy((char *)k_cache + slots[t] * kv_bytes, row + (int64_t)heads * d * elem, (size_t)kv_bytes);
        memcpy((char *)v_cache + slots[t] * kv_bytes, row + (int64_t)(heads + kv_heads) * d * elem,
               (size_t)kv_bytes);
    }
    return 0;
}
