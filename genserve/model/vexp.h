/* e^x for x <= 0 in plain arithmetic, shared by attend.c (softmax), decode.c and amx.c (SiLU). */
#ifndef GENSERVE_VEXP_H
#define GENSERVE_VEXP_H
#include <math.h>
#include <stdint.h>

/* e^x for x <= 0 in plain arithmetic (Cephes' expf: Cody-Waite reduction by ln 2, a degree-5
 * polynomial, then 2^n through the exponent bits; within 2 ulp), so that the compiler
 * vectorises the softmax loop: libm's expf is a call per element without -ffast-math. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x; /* e^-87 ~ 1.6e-38: nothing next to the largest term, 1 */
    float n = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - n * 0.693359375f + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    union { int32_t i; float f; } two_n = {.i = ((int32_t)n + 127) << 23};
    return (p * r * r + r + 1.0f) * two_n.f;
}

#if defined(__AVX512F__)
#include <immintrin.h>
/* exp_nonpositive, 16 at a time */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(
        _mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    __m512 y = _mm512_add_ps(_mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r), _mm512_set1_ps(1.0f));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(y, _mm512_castsi512_ps(e));
}

/* v * sigmoid(v), 16 at a time, sigmoid from e^-|v| (never overflows); decode.c's SiLU and
 * amx.c's gate/up epilogue share it, so both give the same bits. 1 / (1 + e) from the 14-bit
 * reciprocal and one Newton step (about 1 ulp): the division was the stage's bottleneck,
 * one a cycle per element. */
static inline __m512 silu16(__m512 v) {
    const __m512 one = _mm512_set1_ps(1.f), zero = _mm512_setzero_ps();
    __m512 e = exp16(_mm512_sub_ps(zero, _mm512_abs_ps(v)));
    __m512 den = _mm512_add_ps(one, e), r = _mm512_rcp14_ps(den);
    r = _mm512_mul_ps(r, _mm512_fnmadd_ps(den, r, _mm512_set1_ps(2.f)));
    __mmask16 pos = _mm512_cmp_ps_mask(v, zero, _CMP_GE_OQ);
    return _mm512_mul_ps(v, _mm512_mask_blend_ps(pos, _mm512_mul_ps(e, r), r));
}
#endif
#endif
