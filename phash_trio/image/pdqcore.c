/*
 * PDQ, streamed row by row: the same IEEE f32 operations, in the same order, as Meta's C++
 * reference (ThreatExchange pdq/cpp, BSD licence, Copyright (c) Meta Platforms, Inc. and
 * affiliates) as `pdqhash.compute` runs it, so the bits are the same.
 *
 * The reference blurs the whole float luma image with box filters (Jarosz: along rows, along
 * columns, twice), samples 64x64 points, takes 16x16 DCT coefficients and thresholds them at
 * their median. Each box filter is a running sum whose value depends on every earlier sample,
 * so nothing can be skipped; but every lane (a row for the row passes, a column for the column
 * passes) is independent, so we run 16 rows at a time in SIMD lanes and stream the column
 * passes down the image, keeping only a window of rows. Memory is a few dozen rows, not the
 * image; the second row pass divides only at the 64 sampled columns and the second column
 * pass runs only on those columns.
 *
 * Exactness rests on plain IEEE arithmetic: -ffp-contract=off, never -ffast-math.
 */
#include "pdqcore.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#if defined(__FAST_MATH__)
#error "pdqcore must not be built with -ffast-math: results must be bit-exact"
#endif

#if defined(__GNUC__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
#define PDQ_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define PDQ_CLONES
#endif

/* M_PI (not in strict C11) */
#define PDQ_PI 3.14159265358979323846

#define LANES 8  /* floats in a vector */
#define BLOCK 16 /* rows in a block: two vectors a column, two independent running sums */
#define SIDE 64
#define MIN_HASHABLE_DIM 5

static float dct_matrix[16 * 64];

void pdq_init(void) {
    /* pdqhashing.cpp's dct_matrix_64: a float scale times a double cosine, stored as float. */
    const float scale = (float)sqrt(2.0 / 64.0);
    for (int i = 0; i < 16; i++) {
        for (int j = 0; j < 64; j++) {
            double angle = (PDQ_PI / 2.0 / 64.0) * (double)(i + 1) * (double)(2 * j + 1);
            dct_matrix[i * 64 + j] = (float)((double)scale * cos(angle));
        }
    }
}

struct PdqStream {
    size_t w, h;
    int tiny;   /* a side under 5 pixels: the reference gives a zero hash, quality 0 */
    int direct; /* exactly 64 x 64: the reference skips the filter */
    int wr_full;          /* box window along rows (over x), from the width */
    int wc_full, wc_half; /* box window along columns (over y), from the height */
    size_t rows_in;
    size_t w8;  /* w rounded up to a multiple of 8: the stride of every row buffer */
    float *blk; /* up to 16 luma rows (a block), w8 floats apart */
    float *tbuf, *tout; /* a block interleaved (t[x * 16 + r]), and its first row pass */
    float *spare; /* where the unused lanes of a last, partial block go */
    int blk_n;
    float *ring; /* first row pass, one row of w floats per image row, kept in a ring */
    size_t ring_rows, r1_rows;
    float *csum; /* first column pass: running sums, one per column */
    size_t c1_rows;
    float *blk2; /* up to 16 rows of the first column pass, w8 floats apart */
    int blk2_n;
    size_t blk2_y0;
    float *sel_rows; /* second row pass at the 64 sampled columns: h rows of 64 */
    int selx[SIDE], sely[SIDE];
    float out[SIDE][SIDE];
};

static int window_size(size_t old_dimension) {
    /* downscaling.cpp computeJaroszFilterWindowSize(old, 64), in int as there */
    return (int)(((long long)old_dimension + 2 * SIDE - 1) / (2 * SIDE));
}

static void *zalloc(size_t count, size_t size) {
    if (size != 0 && count > SIZE_MAX / size) {
        return NULL;
    }
    return calloc(count ? count : 1, size);
}

static int is_tiny(size_t width, size_t height) {
    return width < MIN_HASHABLE_DIM || height < MIN_HASHABLE_DIM;
}

static size_t ring_rows_for(size_t height) {
    size_t rows = (size_t)window_size(height) + 2 * BLOCK + 2;
    return rows > height ? height : rows;
}

size_t pdq_stream_bytes(size_t width, size_t height) {
    if (is_tiny(width, height)) {
        return 0;
    }
    if (width > 0x7FFFFFFF || height > 0x7FFFFFFF) {
        return SIZE_MAX;
    }
    size_t w8 = (width + LANES - 1) / LANES * LANES;
    size_t rows = 4 * BLOCK + 2 + ring_rows_for(height); /* blk tbuf tout blk2, spare csum */
    return (w8 * rows + height * SIDE) * sizeof(float) + sizeof(PdqStream);
}

PdqStream *pdq_open(size_t width, size_t height) {
    if (pdq_stream_bytes(width, height) > PDQ_MAX_STREAM_BYTES) {
        return NULL;
    }
    PdqStream *s = zalloc(1, sizeof(PdqStream));
    if (s == NULL) {
        return NULL;
    }
    s->w = width;
    s->h = height;
    s->tiny = is_tiny(width, height);
    if (s->tiny) {
        return s; /* nothing to keep: the hash is zero */
    }
    s->direct = width == SIDE && height == SIDE;
    s->wr_full = window_size(width);
    s->wc_full = window_size(height);
    s->wc_half = (s->wc_full + 2) / 2;
    s->ring_rows = ring_rows_for(height);
    for (int i = 0; i < SIDE; i++) {
        /* downscaling.cpp decimateFloat: (int)(((i + 0.5) * in) / out) in double */
        s->sely[i] = (int)(((i + 0.5) * (double)height) / SIDE);
        s->selx[i] = (int)(((i + 0.5) * (double)width) / SIDE);
    }
    s->w8 = (width + LANES - 1) / LANES * LANES;
    s->blk = zalloc(BLOCK * s->w8, sizeof(float));
    s->tbuf = zalloc(BLOCK * s->w8, sizeof(float));
    s->tout = zalloc(BLOCK * s->w8, sizeof(float));
    s->spare = zalloc(s->w8, sizeof(float));
    s->ring = zalloc(s->ring_rows * s->w8, sizeof(float));
    s->csum = zalloc(s->w8, sizeof(float));
    s->blk2 = zalloc(BLOCK * s->w8, sizeof(float));
    s->sel_rows = zalloc(height * SIDE, sizeof(float));
    if (s->blk == NULL || s->tbuf == NULL || s->tout == NULL || s->spare == NULL
        || s->ring == NULL || s->csum == NULL || s->blk2 == NULL || s->sel_rows == NULL) {
        pdq_close(s);
        return NULL;
    }
    return s;
}

void pdq_close(PdqStream *s) {
    if (s == NULL) {
        return;
    }
    free(s->blk);
    free(s->tbuf);
    free(s->tout);
    free(s->spare);
    free(s->ring);
    free(s->csum);
    free(s->blk2);
    free(s->sel_rows);
    free(s);
}

/* ---------------------------------------------------------------- vectors of 8 floats
 * GCC vector extensions: lane-wise IEEE operations, the same as the scalar reference, on AVX
 * registers in the avx2 clone and SSE pairs otherwise.
 */
typedef float v8f __attribute__((vector_size(32)));
typedef int v8i __attribute__((vector_size(32)));

__attribute__((always_inline)) static inline v8f load8(const float *p) {
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

__attribute__((always_inline)) static inline void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

#if defined(__clang__)
#define SHUF(a, b, ...) __builtin_shufflevector((a), (b), __VA_ARGS__)
#else
#define SHUF(a, b, ...) __builtin_shuffle((a), (b), (v8i){__VA_ARGS__})
#endif

/* out[c][r] = in[r][c] for an 8x8 tile: rows of `in` are `istride` floats apart, of `out`
   `ostride` apart. */
__attribute__((always_inline)) static inline void transpose8(const float *in, size_t istride, float *out, size_t ostride) {
    v8f r0 = load8(in), r1 = load8(in + istride), r2 = load8(in + 2 * istride),
        r3 = load8(in + 3 * istride), r4 = load8(in + 4 * istride), r5 = load8(in + 5 * istride),
        r6 = load8(in + 6 * istride), r7 = load8(in + 7 * istride);
    v8f t0 = SHUF(r0, r1, 0, 8, 1, 9, 4, 12, 5, 13), t1 = SHUF(r0, r1, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f t2 = SHUF(r2, r3, 0, 8, 1, 9, 4, 12, 5, 13), t3 = SHUF(r2, r3, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f t4 = SHUF(r4, r5, 0, 8, 1, 9, 4, 12, 5, 13), t5 = SHUF(r4, r5, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f t6 = SHUF(r6, r7, 0, 8, 1, 9, 4, 12, 5, 13), t7 = SHUF(r6, r7, 2, 10, 3, 11, 6, 14, 7, 15);
    v8f u0 = SHUF(t0, t2, 0, 1, 8, 9, 4, 5, 12, 13), u1 = SHUF(t0, t2, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u2 = SHUF(t1, t3, 0, 1, 8, 9, 4, 5, 12, 13), u3 = SHUF(t1, t3, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u4 = SHUF(t4, t6, 0, 1, 8, 9, 4, 5, 12, 13), u5 = SHUF(t4, t6, 2, 3, 10, 11, 6, 7, 14, 15);
    v8f u6 = SHUF(t5, t7, 0, 1, 8, 9, 4, 5, 12, 13), u7 = SHUF(t5, t7, 2, 3, 10, 11, 6, 7, 14, 15);
    store8(out, SHUF(u0, u4, 0, 1, 2, 3, 8, 9, 10, 11));
    store8(out + ostride, SHUF(u1, u5, 0, 1, 2, 3, 8, 9, 10, 11));
    store8(out + 2 * ostride, SHUF(u2, u6, 0, 1, 2, 3, 8, 9, 10, 11));
    store8(out + 3 * ostride, SHUF(u3, u7, 0, 1, 2, 3, 8, 9, 10, 11));
    store8(out + 4 * ostride, SHUF(u0, u4, 4, 5, 6, 7, 12, 13, 14, 15));
    store8(out + 5 * ostride, SHUF(u1, u5, 4, 5, 6, 7, 12, 13, 14, 15));
    store8(out + 6 * ostride, SHUF(u2, u6, 4, 5, 6, 7, 12, 13, 14, 15));
    store8(out + 7 * ostride, SHUF(u3, u7, 4, 5, 6, 7, 12, 13, 14, 15));
}

/* 16 rows of `stride` floats (w8 of them used, a multiple of 8) -> interleaved
   t[x * 16 + r] */
PDQ_CLONES
static void interleave_rows(const float *rows, size_t stride, size_t w8, float *t) {
    for (size_t x = 0; x < w8; x += LANES) {
        transpose8(rows + x, stride, t + x * BLOCK, BLOCK);
        transpose8(rows + LANES * stride + x, stride, t + x * BLOCK + LANES, BLOCK);
    }
}

/* interleaved t[x * 16 + r] -> 16 row pointers */
PDQ_CLONES
static void deinterleave_rows(const float *t, size_t w8, float *const *rows) {
    float tile[LANES * LANES];
    for (size_t x = 0; x < w8; x += LANES) {
        for (int half = 0; half < 2; half++) {
            transpose8(t + x * BLOCK + half * LANES, BLOCK, tile, LANES);
            for (int r = 0; r < LANES; r++) {
                memcpy(rows[half * LANES + r] + x, tile + r * LANES, LANES * sizeof(float));
            }
        }
    }
}

/* ---------------------------------------------------------------- the box filter, 16 lanes
 * downscaling.cpp box1DFloat on 16 interleaved vectors at once: in[i * 16 + r] is element i
 * of vector r. Phase by phase as there: accumulate, write with a growing window, slide,
 * shrink. box_all writes every output to out[i * 16 + r]; box_picked only the outputs at the
 * sampled indices sel[0..63] (increasing, maybe repeated), to picked[k * 16 + r].
 */
#define BOX_ADD(p) (lo += load8(p), hi += load8((p) + LANES))
#define BOX_SUB(p) (lo -= load8(p), hi -= load8((p) + LANES))

PDQ_CLONES
static void box_all(const float *restrict in, int len, int full, float *restrict out) {
    int half = (full + 2) / 2;
    int phase1 = half - 1, phase2 = full - half + 1, phase3 = len - full, phase4 = half - 1;
    v8f lo = {0, 0, 0, 0, 0, 0, 0, 0}, hi = lo;
    const float *ri = in, *li = in;
    float window = (float)full;
    for (int i = 0; i < phase1; i++, ri += BLOCK) {
        BOX_ADD(ri);
    }
    for (int i = 0; i < phase2; i++, ri += BLOCK, out += BLOCK) {
        BOX_ADD(ri);
        float grown = (float)(phase1 + i + 1);
        store8(out, lo / grown);
        store8(out + LANES, hi / grown);
    }
    for (int i = 0; i < phase3; i++, ri += BLOCK, li += BLOCK, out += BLOCK) {
        BOX_ADD(ri);
        BOX_SUB(li);
        store8(out, lo / window);
        store8(out + LANES, hi / window);
    }
    for (int i = 0; i < phase4; i++, li += BLOCK, out += BLOCK) {
        BOX_SUB(li);
        float shrunk = (float)(full - i - 1);
        store8(out, lo / shrunk);
        store8(out + LANES, hi / shrunk);
    }
}

PDQ_CLONES
static void box_picked(const float *restrict in, int len, int full, const int *sel,
                       float *restrict picked) {
    int half = (full + 2) / 2;
    int phase1 = half - 1, phase2 = full - half + 1, phase3 = len - full, phase4 = half - 1;
    v8f lo = {0, 0, 0, 0, 0, 0, 0, 0}, hi = lo;
    const float *ri = in, *li = in;
    int oi = 0, k = 0;
#define PDQ_PICK(count)                                                                         \
    while (k < SIDE && sel[k] == oi) {                                                          \
        store8(picked + k * BLOCK, lo / (float)(count));                                        \
        store8(picked + k * BLOCK + LANES, hi / (float)(count));                                \
        k++;                                                                                    \
    }
    for (int i = 0; i < phase1; i++, ri += BLOCK) {
        BOX_ADD(ri);
    }
    for (int i = 0; i < phase2; i++, ri += BLOCK, oi++) {
        BOX_ADD(ri);
        PDQ_PICK(phase1 + i + 1);
    }
    for (int i = 0; i < phase3; i++, ri += BLOCK, li += BLOCK, oi++) {
        BOX_ADD(ri);
        BOX_SUB(li);
        PDQ_PICK(full);
    }
    for (int i = 0; i < phase4; i++, li += BLOCK, oi++) {
        BOX_SUB(li);
        PDQ_PICK(full - i - 1);
    }
#undef PDQ_PICK
}

#undef BOX_ADD
#undef BOX_SUB

PDQ_CLONES
static void add_row(float *restrict acc, const float *restrict row, size_t n) {
    for (size_t x = 0; x < n; x++) {
        acc[x] += row[x];
    }
}

/* One step of the column pass: acc += added (if any); acc -= removed (if any), in that order
   as in the reference; dst = acc / window. */
PDQ_CLONES
static void column_step(float *restrict acc, const float *restrict added,
                        const float *restrict removed, size_t n, float window,
                        float *restrict dst) {
    if (added != NULL && removed != NULL) {
        for (size_t x = 0; x < n; x++) {
            float v = acc[x] + added[x];
            v = v - removed[x];
            acc[x] = v;
            dst[x] = v / window;
        }
    } else if (added != NULL) {
        for (size_t x = 0; x < n; x++) {
            float v = acc[x] + added[x];
            acc[x] = v;
            dst[x] = v / window;
        }
    } else if (removed != NULL) {
        for (size_t x = 0; x < n; x++) {
            float v = acc[x] - removed[x];
            acc[x] = v;
            dst[x] = v / window;
        }
    } else {
        for (size_t x = 0; x < n; x++) {
            dst[x] = acc[x] / window;
        }
    }
}

static float *ring_row(PdqStream *s, size_t y) { return s->ring + (y % s->ring_rows) * s->w8; }

/* Second row pass on the buffered rows of the first column pass, at the sampled columns. */
static void run_block2(PdqStream *s) {
    float picked[SIDE * BLOCK];
    interleave_rows(s->blk2, s->w8, s->w8, s->tbuf);
    box_picked(s->tbuf, (int)s->w, s->wr_full, s->selx, picked);
    for (int r = 0; r < s->blk2_n; r++) {
        float *dst = s->sel_rows + (s->blk2_y0 + (size_t)r) * SIDE;
        for (int k = 0; k < SIDE; k++) {
            dst[k] = picked[k * BLOCK + r];
        }
    }
    s->blk2_y0 += (size_t)s->blk2_n;
    s->blk2_n = 0;
}

/* First column pass: emit every output row whose inputs are all in the ring. */
static void emit_columns(PdqStream *s) {
    const size_t h = s->h, half = (size_t)s->wc_half, full = (size_t)s->wc_full;
    while (s->c1_rows < h) {
        size_t o = s->c1_rows;
        size_t need = o + half < h ? o + half : h;
        if (s->r1_rows < need) {
            return;
        }
        if (o == 0) {
            for (size_t a = 0; a + 1 < half; a++) {
                add_row(s->csum, ring_row(s, a), s->w8);
            }
        }
        const float *added = o + half - 1 < h ? ring_row(s, o + half - 1) : NULL;
        const float *removed = NULL;
        size_t taken = 0;
        if (o + half >= full + 1) {
            removed = ring_row(s, o + half - full - 1);
            taken = o + half - full;
        }
        size_t window = need - taken;
        column_step(s->csum, added, removed, s->w8, (float)(int)window,
                    s->blk2 + (size_t)s->blk2_n * s->w8);
        s->blk2_n++;
        s->c1_rows++;
        if (s->blk2_n == BLOCK || s->c1_rows == h) {
            run_block2(s);
        }
    }
}

/* First row pass on the buffered luma rows, into the ring. */
static void run_block(PdqStream *s) {
    float *rows[BLOCK];
    for (int r = 0; r < BLOCK; r++) {
        /* lanes past the last row are computed on stale data and thrown away */
        rows[r] = r < s->blk_n ? ring_row(s, s->r1_rows + (size_t)r) : s->spare;
    }
    interleave_rows(s->blk, s->w8, s->w8, s->tbuf);
    box_all(s->tbuf, (int)s->w, s->wr_full, s->tout);
    deinterleave_rows(s->tout, s->w8, rows);
    s->r1_rows += (size_t)s->blk_n;
    s->blk_n = 0;
    emit_columns(s);
}

float *pdq_row_slots(PdqStream *s) {
    return s->tiny ? NULL : s->blk + (size_t)s->blk_n * s->w8;
}

void pdq_commit_row(PdqStream *s) {
    if (s->tiny || s->rows_in >= s->h) {
        return;
    }
    if (s->direct) {
        memcpy(s->out[s->rows_in], s->blk, SIDE * sizeof(float));
        s->rows_in++;
        return;
    }
    s->blk_n++;
    s->rows_in++;
    if (s->blk_n == BLOCK || s->rows_in == s->h) {
        run_block(s);
    }
}

PDQ_CLONES
static void luma_row(const uint8_t *restrict rgb, size_t n, float *restrict dst) {
    for (size_t x = 0; x < n; x++) {
        dst[x] = pdq_luma(rgb[3 * x], rgb[3 * x + 1], rgb[3 * x + 2]);
    }
}

void pdq_push_rgb(PdqStream *s, const uint8_t *rgb) {
    if (s->tiny) {
        return;
    }
    luma_row(rgb, s->w, pdq_row_slots(s));
    pdq_commit_row(s);
}

/* Second column pass at the sampled columns (64 lanes), sampled at the 64 rows. */
static void final_columns(PdqStream *s) {
    const int len = (int)s->h, full = s->wc_full, half = s->wc_half;
    int phase1 = half - 1, phase2 = full - half + 1, phase3 = len - full, phase4 = half - 1;
    float sum[SIDE] = {0};
    const float *in = s->sel_rows;
    int ri = 0, li = 0, oi = 0, k = 0, window = 0;
#define PDQ_PICK()                                                                              \
    do {                                                                                        \
        float div = (float)window;                                                              \
        while (k < SIDE && s->sely[k] == oi) {                                                  \
            for (int c = 0; c < SIDE; c++) {                                                    \
                s->out[k][c] = sum[c] / div;                                                    \
            }                                                                                   \
            k++;                                                                                \
        }                                                                                       \
    } while (0)
    for (int i = 0; i < phase1; i++, ri++, window++) {
        for (int c = 0; c < SIDE; c++) {
            sum[c] += in[ri * SIDE + c];
        }
    }
    for (int i = 0; i < phase2; i++, ri++, oi++) {
        for (int c = 0; c < SIDE; c++) {
            sum[c] += in[ri * SIDE + c];
        }
        window++;
        PDQ_PICK();
    }
    for (int i = 0; i < phase3; i++, ri++, li++, oi++) {
        for (int c = 0; c < SIDE; c++) {
            sum[c] += in[ri * SIDE + c];
        }
        for (int c = 0; c < SIDE; c++) {
            sum[c] -= in[li * SIDE + c];
        }
        PDQ_PICK();
    }
    for (int i = 0; i < phase4; i++, li++, oi++) {
        for (int c = 0; c < SIDE; c++) {
            sum[c] -= in[li * SIDE + c];
        }
        window--;
        PDQ_PICK();
    }
#undef PDQ_PICK
}

/* pdqhashing.cpp pdqImageDomainQualityMetric */
static int quality_metric(float a[SIDE][SIDE]) {
    int gradient_sum = 0;
    for (int i = 0; i < 63; i++) {
        for (int j = 0; j < 64; j++) {
            float u = a[i][j], v = a[i + 1][j];
            int d = (int)(((u - v) * 100.0f) / 255.0f);
            gradient_sum += abs(d);
        }
    }
    for (int i = 0; i < 64; i++) {
        for (int j = 0; j < 63; j++) {
            float u = a[i][j], v = a[i][j + 1];
            int d = (int)(((u - v) * 100.0f) / 255.0f);
            gradient_sum += abs(d);
        }
    }
    int quality = gradient_sum / 90;
    return quality > 100 ? 100 : quality;
}

/* pdqhashing.cpp dct64To16: B = D A D^T, sums in the reference's order */
static void dct64to16(float a[SIDE][SIDE], float b[16][16]) {
    float t[16][64];
    for (int i = 0; i < 16; i++) {
        for (int j = 0; j < 64; j++) {
            const float *pd = &dct_matrix[i * 64];
            float sumk = 0.0f;
            for (int k = 0; k < 64; k++) {
                sumk += pd[k] * a[k][j];
            }
            t[i][j] = sumk;
        }
    }
    for (int i = 0; i < 16; i++) {
        for (int j = 0; j < 16; j++) {
            const float *pd = &dct_matrix[j * 64];
            float sumk = 0.0f;
            for (int k = 0; k < 64; k++) {
                sumk += t[i][k] * pd[k];
            }
            b[i][j] = sumk;
        }
    }
}

/* torben.cpp: the median without sorting, as the reference picks it */
static float torben(const float *m, int n) {
    int i, less, greater, equal;
    float min, max, guess, maxltguess, mingtguess;
    min = max = m[0];
    for (i = 1; i < n; i++) {
        if (m[i] < min) {
            min = m[i];
        }
        if (m[i] > max) {
            max = m[i];
        }
    }
    for (;;) {
        guess = (min + max) / 2;
        less = 0;
        greater = 0;
        equal = 0;
        maxltguess = min;
        mingtguess = max;
        for (i = 0; i < n; i++) {
            if (m[i] < guess) {
                less++;
                if (m[i] > maxltguess) {
                    maxltguess = m[i];
                }
            } else if (m[i] > guess) {
                greater++;
                if (m[i] < mingtguess) {
                    mingtguess = m[i];
                }
            } else {
                equal++;
            }
        }
        if (less <= (n + 1) / 2 && greater <= (n + 1) / 2) {
            break;
        } else if (less > greater) {
            max = maxltguess;
        } else {
            min = mingtguess;
        }
    }
    if (less >= (n + 1) / 2) {
        return maxltguess;
    } else if (less + equal >= (n + 1) / 2) {
        return guess;
    }
    return mingtguess;
}

void pdq_finish(PdqStream *s, uint8_t hash[32], int *quality) {
    memset(hash, 0, 32);
    *quality = 0;
    if (s->tiny) {
        pdq_close(s);
        return;
    }
    if (!s->direct) {
        final_columns(s);
    }
    *quality = quality_metric(s->out);
    float b[16][16];
    dct64to16(s->out, b);
    float median = torben(&b[0][0], 256);
    for (int i = 0; i < 16; i++) {
        for (int j = 0; j < 16; j++) {
            if (b[i][j] > median) {
                int bit = i * 16 + j; /* Hash256::setBit: w[bit >> 4] |= 1 << (bit & 15) */
                hash[31 - (bit >> 3)] |= (uint8_t)(1u << (bit & 7));
            }
        }
    }
    pdq_close(s);
}
