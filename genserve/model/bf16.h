/* bf16 <-> float32 for genserve's native kernels (gemv.c, attend.c, decode.c). */
#ifndef GENSERVE_BF16_H
#define GENSERVE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* Element i of a buffer in the model's dtype (bf16 when `bf16`, else float32), as float32. */
static inline float elem_get(const void *p, int bf16, size_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void elem_put(void *p, int bf16, size_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

#if defined(__AVX512BF16__)
#include <immintrin.h>
/* 16 bf16 -> float32, exactly */
static inline __m512 widen16(__m256i b) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16));
}

/* 16 float32 rounded to bf16 as torch rounds (nearest even), kept as float32.
 * vcvtneps2bf16 reads a subnormal float32 as zero, which only values below 1e-38 meet. */
static inline __m512 round16(__m512 v) { return widen16((__m256i)_mm512_cvtneps_pbh(v)); }
#endif
#endif
