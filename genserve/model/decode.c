/* Every decoder layer of a decode step in one call: RMSNorm, q/k/v, rotary, the cache write,
 * attention, o, RMSNorm, gate/up, SiLU and down, for the few rows of a step of decodes.
 *
 * Why it exists: at one row the weights' reads are only part of a step. On the 2-core AMX
 * Xeon this project is measured on, a bf16 one-row step of a SmolLM2-135M-shaped Llama took
 * 26.8 ms with gemv.c's linears, of which about 11 ms were torch's small ops between them
 * (two RMSNorms a layer at 60 us each, rotary, SiLU, the cache writes, SDPA over one
 * sequence at 66 us): each costs microseconds of dispatch for a few hundred numbers.
 * torch.compile of the step removed part of it (24 ms against 34 ms eager then). Here the
 * glue between the linears is a few plain loops, and the linears and attention are gemv.c's
 * and attend.c's kernels, so a step is one call from Python.
 *
 * The numbers follow the eager path's (runner.py): every value torch would round to the
 * model's dtype is rounded here at the same point, the linears are the same kernels and the
 * attention is attend_lanes. Only the norms' sums run in another order, so a row's result
 * is close to the eager path's, not the same bits: the runner sends free decodes only
 * (never a seeded or --deterministic row, whose bits must not depend on the path).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

int gemv_i8(const void *x, int x_bf16, const int8_t *w, const float *scales, void *y,
            int y_bf16, int M, int N, int K, int threads);
int gemv_bf16(const void *x, int x_bf16, const uint16_t *w, void *y, int y_bf16, int M, int N,
              int K, int threads);
int gemv_f32(const void *x, int x_bf16, const float *w, void *y, int y_bf16, int M, int N,
             int K, int threads);
int attend_lanes(const void *q, const void *k, const void *v, void *out, const int32_t *lanes,
                 const int32_t *lengths, int B, int heads, int kv_heads, int D, int64_t rows,
                 int64_t row0, int64_t lane_len, float scale, int bf16, int threads);

enum { FORMAT_F32 = 0, FORMAT_BF16 = 1, FORMAT_I8 = 2 };
#define MAX_HEAD_DIM 256

typedef struct { /* one linear: y = x W^T (* scales) (+ bias) */
    const void *w;       /* [n, k] row-major, in `format` */
    const float *scales; /* int8: one per output row; else NULL */
    const void *bias;    /* [n] in the activations' dtype, or NULL */
    int64_t format, n, k;
} Lin;

typedef struct { /* one decoder layer's weights and cache (fixed while a runner lives) */
    const void *input_norm, *post_norm; /* [hidden] in the activations' dtype */
    Lin qkv, o, gate_up, down;
    void *k_cache, *v_cache; /* [kv_heads, cache_rows, dim] */
} Layer;

typedef struct { /* the model's shape and one step's rows */
    int64_t rows, hidden, heads, kv_heads, dim, inter, cache_rows, bf16, threads;
    double eps, scale;
    const float *cos, *sin;          /* [rows, dim]: transformers' tables at each row's position */
    const int64_t *write;            /* [rows]: cache row of each row's new key and value */
    const int32_t *starts, *lengths; /* [rows]: cache row of position 0, positions attended */
} Step;

static inline float rnd(float v, int bf16) { return bf16 ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float get(const void *p, int bf16, size_t i) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void put(void *p, int bf16, size_t i, float v) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* y [M, n] (float32, each value as the eager path rounds it) = x [M, k] W^T (+ bias). */
static int linear(const Lin *L, const void *x, int x_bf16, float *y, int M, const Step *s) {
    int n = (int)L->n, k = (int)L->k, t = (int)s->threads, rc;
    if (L->format == FORMAT_I8)
        rc = gemv_i8(x, x_bf16, (const int8_t *)L->w, L->scales, y, 0, M, n, k, t);
    else if (L->format == FORMAT_BF16)
        rc = gemv_bf16(x, x_bf16, (const uint16_t *)L->w, y, 0, M, n, k, t);
    else
        rc = gemv_f32(x, x_bf16, (const float *)L->w, y, 0, M, n, k, t);
    if (rc) return rc;
    int bf16 = (int)s->bf16;
    for (size_t i = 0; i < (size_t)M * n; i++) {
        float v = rnd(y[i], bf16); /* the kernel's output, in the model's dtype */
        y[i] = L->bias ? rnd(v + get(L->bias, bf16, i % n), bf16) : v;
    }
    return 0;
}

/* transformers' LlamaRMSNorm: normalised in float32, rounded, then times the weight. */
static void rms_norm(const void *x, const void *w, float *out, const Step *s) {
    int bf16 = (int)s->bf16;
    size_t H = (size_t)s->hidden;
    for (size_t m = 0; m < (size_t)s->rows; m++) {
        float ss = 0.f;
        for (size_t i = 0; i < H; i++) {
            float v = get(x, bf16, m * H + i);
            ss += v * v;
        }
        float r = 1.f / sqrtf(ss / (float)H + (float)s->eps);
        for (size_t i = 0; i < H; i++)
            out[m * H + i] = rnd(get(w, bf16, i) * rnd(get(x, bf16, m * H + i) * r, bf16), bf16);
    }
}

/* Rotate-half rotary on `count` heads of one row, in place: x*cos + rotate_half(x)*sin, each
 * product and the sum rounded as torch rounds them (llama_math.rope). */
static void rotate(float *x, int count, int D, const float *cos, const float *sin, int bf16) {
    int half = D / 2;
    float tmp[MAX_HEAD_DIM];
    for (int h = 0; h < count; h++, x += D) {
        for (int d = 0; d < D; d++) {
            float other = d < half ? -x[d + half] : x[d - half];
            float a = rnd(x[d] * cos[d], bf16), b = rnd(other * sin[d], bf16);
            tmp[d] = rnd(a + b, bf16);
        }
        for (int d = 0; d < D; d++) x[d] = tmp[d];
    }
}

/* x += y, row by row, in the model's dtype. */
static void residual(void *x, const float *y, size_t count, int bf16) {
    for (size_t i = 0; i < count; i++) put(x, bf16, i, get(x, bf16, i) + y[i]);
}

typedef struct {
    float *h, *qkv, *gu, *act, *y;
    void *q, *att; /* in the model's dtype, as attend_lanes reads and writes them */
} Scratch;

static int attention(const Layer *L, Scratch *b, const Step *s) {
    int bf16 = (int)s->bf16, D = (int)s->dim, heads = (int)s->heads, kv = (int)s->kv_heads;
    size_t width = (size_t)(heads + 2 * kv) * D;
    for (size_t m = 0; m < (size_t)s->rows; m++) {
        float *row = b->qkv + m * width;
        rotate(row, heads + kv, D, s->cos + m * D, s->sin + m * D, bf16); /* q and k */
        for (size_t i = 0; i < (size_t)heads * D; i++) put(b->q, bf16, m * heads * D + i, row[i]);
        for (int g = 0; g < kv; g++) {
            size_t at = ((size_t)g * s->cache_rows + (size_t)s->write[m]) * D;
            const float *k = row + (size_t)(heads + g) * D, *v = row + (size_t)(heads + kv + g) * D;
            for (int d = 0; d < D; d++) {
                put(L->k_cache, bf16, at + d, k[d]);
                put(L->v_cache, bf16, at + d, v[d]);
            }
        }
    }
    return attend_lanes(b->q, L->k_cache, L->v_cache, b->att, s->starts, s->lengths,
                        (int)s->rows, heads, kv, D, s->cache_rows, 0, 1, (float)s->scale, bf16,
                        (int)s->threads);
}

static int layer(const Layer *L, void *x, Scratch *b, const Step *s) {
    int bf16 = (int)s->bf16, M = (int)s->rows, rc;
    size_t H = (size_t)s->hidden, I = (size_t)s->inter;
    rms_norm(x, L->input_norm, b->h, s);
    if ((rc = linear(&L->qkv, b->h, 0, b->qkv, M, s))) return rc;
    if ((rc = attention(L, b, s))) return rc;
    if ((rc = linear(&L->o, b->att, bf16, b->y, M, s))) return rc;
    residual(x, b->y, (size_t)M * H, bf16);
    rms_norm(x, L->post_norm, b->h, s);
    if ((rc = linear(&L->gate_up, b->h, 0, b->gu, M, s))) return rc;
    for (size_t m = 0; m < (size_t)M; m++)
        for (size_t i = 0; i < I; i++) {
            float g = b->gu[m * 2 * I + i], u = b->gu[m * 2 * I + I + i];
            b->act[m * I + i] = rnd(rnd(g / (1.f + expf(-g)), bf16) * u, bf16);
        }
    if ((rc = linear(&L->down, b->act, 0, b->y, M, s))) return rc;
    residual(x, b->y, (size_t)M * H, bf16);
    return 0;
}

/* x [rows, hidden] in the model's dtype, updated in place through `count` layers. Returns 0,
 * -1 when memory ran out, -2 for a shape past the fixed buffers (or attend_lanes' codes). */
int decode_layers(const Layer *layers, int count, const Step *s, void *x) {
    size_t M = (size_t)s->rows, H = (size_t)s->hidden, I = (size_t)s->inter, D = (size_t)s->dim;
    size_t heads = (size_t)s->heads, width = (heads + 2 * (size_t)s->kv_heads) * D;
    if (D > MAX_HEAD_DIM || D % 2) return -2;
    size_t floats = M * (H + width + 2 * I + I + H + 2 * heads * D);
    float *all = (float *)malloc(floats * sizeof(float));
    if (all == NULL) return -1;
    Scratch b = {.h = all};
    b.qkv = b.h + M * H;
    b.gu = b.qkv + M * width;
    b.act = b.gu + M * 2 * I;
    b.y = b.act + M * I;
    b.q = b.y + M * H;
    b.att = (float *)b.q + M * heads * D; /* bf16 uses the first half of each: room for f32 */
    int rc = 0;
    for (int i = 0; i < count && rc == 0; i++) rc = layer(&layers[i], x, &b, s);
    free(all);
    return rc;
}
