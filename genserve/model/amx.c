/* genserve's AMX linear kernel: y = x W^T in bf16 for the 9-64 rows of a batched decode step
 * (and a prefill chunk), on CPUs with AMX tiles.
 *
 * Why it exists: at 32 rows a decode step's linears are still a pass over every weight, and
 * should run at the memory's read bandwidth; the multiply is cheap on AMX. oneDNN's
 * prepacked bf16 linear read the layers' weights at 16-17 GB/s there, F.linear at 11, where
 * one pass summing a large buffer ran at 26-31 GB/s (2-core AMX Xeon VM). Which kernel runs
 * for which row count is still measured at start-up (hardware.py): this one is a candidate,
 * kept only where it is faster.
 *
 * Layout: the weight is packed once (native.Amx) into the tiles TDPBF16PS reads, 16 output
 * columns by 32 inputs per 1 KB tile, [N/16][K/32][16 pairs of k][16 columns][2]: each
 * column block's tiles follow one another, so the weight streams front to back. A call
 * walks two column blocks (32 outputs) at a time, split between the threads, and for each
 * runs every 32 rows of x through four accumulator tiles (2 x 16 rows by 2 x 16 columns): the
 * two blocks' weights (18-48 KB) stay in cache while the rows go by.
 *
 * A row's result depends only on that row: products of its own inputs, summed in the same
 * order (k blocks ascending) in whatever call it is, so the kernel is batch-invariant by
 * construction (rows are padded with zeros to a multiple of 16, never mixed).
 *
 * Built with the other kernels (-march=native); where the compiler or CPU has no AMX the
 * entry points answer -2 and the kernel is not offered.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__x86_64__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Linux hands a process AMX's tile state only once asked (the state is 8 KB per thread). */
int amx_init(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) ? -1 : 0;
}

/* Tiles 0-3: fp32 accumulators, 16 rows x 16 columns. 4-5: x, 16 rows x 32 bf16. 6-7: the
 * weight, 16 pairs of k x 16 columns x 2 bf16. */
static void configure(void) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    _tile_loadconfig(&c);
}

/* Rows [m, m + 32) (or 16 when `one`) of x against column blocks b and b + 1 (or b alone when
 * `single`), into out[32][32] float32. */
#define KBLOCK_BYTES 1024
/* Into L2, AHEAD_K tiles ahead of the ones being summed in each of the pair's two streams,
 * running on into the next pair's first tiles, the first time a pair is read: 30 layers'
 * linears at 32 rows from memory took 9.7 ms so (2, 4 or 8 ahead alike), 10.6 with the next
 * pair's whole 36 KB fetched a pair ahead (2-core AMX Xeon VM). */
#define AHEAD_K 4
static inline void prefetch_tile(const uint16_t *t) {
    for (int l = 0; l < KBLOCK_BYTES; l += 64) _mm_prefetch((const char *)t + l, _MM_HINT_T1);
}
static void tile_block(const uint16_t *x, size_t ldx, const uint16_t *b0, const uint16_t *b1,
                       const char *next, int fetch, int kblocks, int one, int single,
                       float *out) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int kb = 0; kb < kblocks; kb++) {
        const uint16_t *xa = x + (size_t)kb * 32;
        if (fetch) {
            int ahead = kb + AHEAD_K;
            const uint16_t *n0 = (const uint16_t *)next, *n1 = n0 + (size_t)kblocks * 512;
            if (ahead < kblocks) {
                prefetch_tile(b0 + (size_t)ahead * 512);
                if (!single) prefetch_tile(b1 + (size_t)ahead * 512);
            } else if (next != NULL) {
                prefetch_tile(n0 + (size_t)(ahead - kblocks) * 512);
                prefetch_tile(n1 + (size_t)(ahead - kblocks) * 512);
            }
        }
        _tile_loadd(4, xa, ldx * 2);
        _tile_loadd(6, b0 + (size_t)kb * 512, 64);
        _tile_dpbf16ps(0, 4, 6);
        if (!single) {
            _tile_loadd(7, b1 + (size_t)kb * 512, 64);
            _tile_dpbf16ps(1, 4, 7);
        }
        if (!one) {
            _tile_loadd(5, xa + 16 * ldx, ldx * 2);
            _tile_dpbf16ps(2, 5, 6);
            if (!single) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, out, 128);
    if (!single) _tile_stored(1, out + 16, 128);
    if (!one) {
        _tile_stored(2, out + 16 * 32, 128);
        if (!single) _tile_stored(3, out + 16 * 32 + 16, 128);
    }
}

/* `cols` (16 or 32) results of one row into y at `at`: a scalar loop here cost more than the
 * tiles' multiplies. vcvtneps2bf16 rounds to nearest even as torch does (denormals go to 0). */
static inline void put_row(void *y, int y_bf16, size_t at, const float *v, int cols) {
    if (!y_bf16) {
        for (int j = 0; j < cols; j += 16)
            _mm512_storeu_ps((float *)y + at + j, _mm512_loadu_ps(v + j));
        return;
    }
    uint16_t *dst = (uint16_t *)y + at;
    if (cols == 32) {
        __m512bh both = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(v + 16), _mm512_loadu_ps(v));
        _mm512_storeu_si512(dst, (__m512i)both);
    } else {
        __m256bh half = _mm512_cvtneps_pbh(_mm512_loadu_ps(v));
        _mm256_storeu_si256((__m256i *)dst, (__m256i)half);
    }
}

/* x [M, K] bf16, w packed [N/16][K/32][512] bf16, y [M, N] (bf16 when y_bf16), K % 32 == 0,
 * N % 16 == 0. Returns 0, -1 when memory ran out. */
int amx_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                    int K, int threads) {
    int padded = (M + 15) / 16 * 16;
    const uint16_t *xs = x;
    uint16_t *owned = NULL;
    if (padded != M) { /* whole tiles of 16 rows: the extra rows zeros, their results dropped */
        owned = calloc((size_t)padded * K, sizeof *owned);
        if (owned == NULL) return -1;
        memcpy(owned, x, (size_t)M * K * sizeof *owned);
        xs = owned;
    }
    int kblocks = K / 32, nblocks = N / 16, pairs = (nblocks + 1) / 2;
    size_t block = (size_t)kblocks * 512; /* one column block's packed weights, in bf16 */
#pragma omp parallel num_threads(threads)
    {
        configure();
        float out[32 * 32];
#pragma omp for schedule(static)
        for (int p = 0; p < pairs; p++) {
            int nb = 2 * p, single = nb + 1 >= nblocks, cols = single ? 16 : 32;
            const uint16_t *b0 = w + (size_t)nb * block, *b1 = b0 + block;
            for (int m = 0; m < padded; m += 32) {
                int one = padded - m < 32, rows = M - m < 32 ? M - m : 32;
                const char *next = p + 1 < pairs ? (const char *)(b0 + 2 * block) : NULL;
                tile_block(xs + (size_t)m * K, K, b0, b1, next, m == 0, kblocks, one, single,
                           out);
                for (int i = 0; i < rows; i++)
                    put_row(y, y_bf16, (size_t)(m + i) * N + nb * 16, out + i * 32, cols);
            }
        }
        _tile_release();
    }
    free(owned);
    return 0;
}
#else
int amx_init(void) { return -2; }
int amx_linear_bf16(const uint16_t *x, const uint16_t *w, void *y, int y_bf16, int M, int N,
                    int K, int threads) {
    (void)x, (void)w, (void)y, (void)y_bf16, (void)M, (void)N, (void)K, (void)threads;
    return -2;
}
#endif
