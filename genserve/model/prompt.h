/* A prompt chunk's causal attention: the parts amx.c's tiles (amx_attend_causal) and
 * dp.c's AVX512-BF16 dot products (dp_attend_causal) share. Each KV head's keys and values
 * are packed once per call into pairs of bf16 along the dimension a product sums over (the
 * layout both TDPBF16PS and VDPBF16PS read); each task (a query head, 16 rows) then takes its
 * rows' scores in float32, the exact softmax of each row, and the product with the values. */
#ifndef GENSERVE_PROMPT_H
#define GENSERVE_PROMPT_H
#if defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__x86_64__)
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "vexp.h"

#define PA_MAX_DIM 128

/* Keys [0, end) of one head ([end, D] rows of `ld` elements) as S's B tiles: for key block b
 * (16 keys) and dims d0 .. d0 + 31, 16 dim pairs x 16 keys x 2; keys past `end` are zeros. */
static void pack_keys(const uint16_t *k, size_t ld, int end, int D, uint16_t *out, int blocks) {
    int dblocks = D / 32;
    for (int b = 0; b < blocks; b++)
        for (int d = 0; d < dblocks; d++) {
            uint32_t *t = (uint32_t *)(out + ((size_t)b * dblocks + d) * 512);
            for (int n = 0; n < 16; n++) {
                int key = b * 16 + n;
                const uint16_t *row = k + (size_t)key * ld + (size_t)d * 32;
                for (int r = 0; r < 16; r++) {
                    uint32_t pair = 0;
                    if (key < end) memcpy(&pair, row + 2 * r, sizeof pair);
                    t[r * 16 + n] = pair;
                }
            }
        }
}

/* Values [0, end) of one head as O's B tiles: for key block b (32 keys) and dims c * 16 ..
 * c * 16 + 15, 16 key pairs x 16 dims x 2; keys past `end` are zeros. */
static void pack_values(const uint16_t *v, size_t ld, int end, int D, uint16_t *out, int blocks) {
    int cblocks = D / 16;
    const __m256i zero = _mm256_setzero_si256();
    for (int b = 0; b < blocks; b++)
        for (int c = 0; c < cblocks; c++) {
            uint32_t *t = (uint32_t *)(out + ((size_t)b * cblocks + c) * 512);
            for (int r = 0; r < 16; r++) { /* keys 2r and 2r + 1, interleaved dim by dim */
                int key = b * 32 + 2 * r;
                const uint16_t *row = v + (size_t)key * ld + (size_t)c * 16;
                __m256i even = key < end ? _mm256_loadu_si256((const __m256i *)row) : zero;
                __m256i odd = key + 1 < end ? _mm256_loadu_si256((const __m256i *)(row + ld)) : zero;
                __m512i pair = _mm512_or_si512(_mm512_cvtepu16_epi32(even),
                                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(odd), 16));
                _mm512_storeu_si512(t + r * 16, pair);
            }
        }
}

/* Scratch that lives as long as the calling thread, grown when a call needs more: a fresh
 * malloc of a few hundred KB is a fresh mapping, and its page faults cost more than the
 * attention of a 128-token chunk. */
static void *scratch(int which, size_t bytes) {
    static __thread void *held[3];
    static __thread size_t size[3];
    if (size[which] < bytes) {
        void *grown = realloc(held[which], bytes);
        if (grown == NULL) return NULL;
        held[which] = grown, size[which] = bytes;
    }
    return held[which];
}

/* Row i's weights over keys [0, seen) from its scores s (float32, unscaled): P as bf16 into p
 * (zeros from `seen` to `width`, a multiple of 16); returns the sum of the rounded weights.
 * The last partial vector is masked: a scalar tail of up to 15 exps a row was a third of the
 * call. */
static float softmax_row(const float *s, int seen, int width, float scale, uint16_t *p) {
    int whole = seen / 16 * 16;
    __mmask16 tail = (__mmask16)((1u << (seen - whole)) - 1);
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int j = 0; j < whole; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(s + j));
    if (tail) vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, s + whole));
    float top = _mm512_reduce_max_ps(vmax);
    __m512 vs = _mm512_set1_ps(scale), vt = _mm512_set1_ps(top * scale);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int j = 0; j < width; j += 16) {
        __mmask16 live = j + 16 <= whole ? (__mmask16)0xFFFF : j < seen ? tail : 0;
        __m512 e = _mm512_maskz_mov_ps(live, exp16(_mm512_fmsub_ps(
                                                 _mm512_maskz_loadu_ps(live, s + j), vs, vt)));
        __m256i h = (__m256i)_mm512_cvtneps_pbh(e);
        _mm256_storeu_si256((__m256i *)(p + j), h);
        __m512 r = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
        if ((j / 16) & 1)
            acc1 = _mm512_add_ps(acc1, r);
        else
            acc0 = _mm512_add_ps(acc0, r);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

typedef struct {
    const uint16_t *q, *kp, *vp; /* the rows' queries; packed keys and values of every KV head */
    uint16_t *out;
    size_t q_row, out_row;       /* elements from one row to the next */
    int n, start, heads, group, D, kblocks16, kblocks32;
    float scale;
} Prompt;

#endif
#endif
