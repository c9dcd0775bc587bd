/* Helpers shared by the CPU kernels: bf16 <-> fp32 and a vectorised exp. */
#ifndef PILOT_SIMD_MATH_H
#define PILOT_SIMD_MATH_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline float bf16_to_f32(uint16_t x) {
    uint32_t bits = (uint32_t)x << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    bits += 0x7fffu + ((bits >> 16) & 1u); /* round to nearest even */
    return (uint16_t)(bits >> 16);
}

#ifdef __AVX512F__
/* exp(x): 2^(x log2 e) with a degree-6 polynomial on the fraction and scalef for the exponent;
 * relative error ~2e-7. Arguments below -100 give ~0 (so -inf gives 0, not NaN). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-100.f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n); /* in [-0.5, 0.5] */
    __m512 p = _mm512_set1_ps(1.5403530393381606e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Up to 16 elements (mask) of fp32 or bf16 as fp32, and back with round-to-nearest-even. */
static inline __m512 load_f32x16(const void *src, int is_bf16, __mmask16 mask) {
    if (is_bf16)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src)), 16));
    return _mm512_maskz_loadu_ps(mask, src);
}

static inline __m512i round_to_bf16_bits(__m512 v) {
    /* Rounded bf16 in the upper half of each 32-bit lane (NaN inputs stay NaN). */
    __m512i bits = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_mask_or_epi32(rounded, nan, bits, _mm512_set1_epi32(0x400000));
}

static inline void store_f32x16(void *dst, __m512 v, int is_bf16, __mmask16 mask) {
    if (is_bf16)
        _mm256_mask_storeu_epi16(dst, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16_bits(v), 16)));
    else
        _mm512_mask_storeu_ps(dst, mask, v);
}

/* v rounded to bf16 and back: the value a bf16 tensor would hold between two operations. */
static inline __m512 through_bf16(__m512 v) {
    return _mm512_castsi512_ps(_mm512_and_si512(round_to_bf16_bits(v), _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __mmask16 tail_mask(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__)
/* AVX2: up to 8 elements (`left` of them, the rest zero / untouched) of fp32 or bf16 as fp32,
 * and back with round-to-nearest-even. */
static inline __m256 load_f32x8(const void *src, int is_bf16, int64_t left) {
    if (left < 8) {
        float tmp[8] = {0};
        for (int64_t j = 0; j < left; j++)
            tmp[j] = is_bf16 ? bf16_to_f32(((const uint16_t *)src)[j]) : ((const float *)src)[j];
        return _mm256_loadu_ps(tmp);
    }
    if (is_bf16)
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)src)), 16));
    return _mm256_loadu_ps((const float *)src);
}

static inline void store_f32x8(void *dst, __m256 v, int is_bf16, int64_t left) {
    if (left < 8) {
        float tmp[8];
        _mm256_storeu_ps(tmp, v);
        for (int64_t j = 0; j < left; j++) {
            if (is_bf16) ((uint16_t *)dst)[j] = f32_to_bf16(tmp[j]);
            else ((float *)dst)[j] = tmp[j];
        }
        return;
    }
    if (!is_bf16) {
        _mm256_storeu_ps((float *)dst, v);
        return;
    }
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q); /* NaN stays NaN: quieted, not rounded */
    rounded = _mm256_castps_si256(_mm256_blendv_ps(
        _mm256_castsi256_ps(rounded), _mm256_castsi256_ps(_mm256_or_si256(bits, _mm256_set1_epi32(0x400000))), nan));
    rounded = _mm256_srli_epi32(rounded, 16);
    _mm_storeu_si128((__m128i *)dst, _mm_packus_epi32(_mm256_castsi256_si128(rounded),
                                                      _mm256_extracti128_si256(rounded, 1)));
}

/* exp(x) as exp512 computes it, 8 lanes; the power of two is built in the exponent bits, so
 * arguments are clamped to [-87, 88] (below -87 the result is ~1e-38 instead of 0). */
static inline __m256 exp256(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.f)), _mm256_set1_ps(88.f));
    const __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    const __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 f = _mm256_sub_ps(t, n); /* in [-0.5, 0.5] */
    __m256 p = _mm256_set1_ps(1.5403530393381606e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    const __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}
#endif

#endif
