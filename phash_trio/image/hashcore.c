/*
 * phash_trio.image.hashcore: the compiled hashing core.
 *
 * JPEG: single-scan baseline images are entropy-decoded by a port of zune-jpeg 0.5.15's own
 * Huffman decoder (exact on damaged data too: it stops where zune stops). Everything else
 * (progressive, multi-scan) goes through libjpeg-turbo's public API (jpeg_mem_src, a setjmp/
 * longjmp error_exit, an emit_message hook that records "Corrupt JPEG data" warnings instead
 * of printing them, one decompress object per call, jpeg_read_coefficients). Then zune-jpeg's
 * pixel stages are redone bit for bit: stb_image's integer IDCT, triangle chroma upsampling,
 * 14-bit YCbCr->RGB, CMYK/YCCK.
 * Gray: image-rs to_luma8 (f32 BT.709 as moxcms derives it, no FMA). Resize: image-rs
 * imageops::resize with Lanczos3, the same f32 operations in the same order. Mean hash.
 *
 * Exactness rests on plain IEEE f32 arithmetic: build with -ffp-contract=off, never
 * -ffast-math; integer overflow wraps like Rust's release build (-fwrapv).
 * The GIL is released around all pixel work; nothing here keeps global mutable state.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <setjmp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jpeglib.h>
#include <jerror.h>

#include "pdqcore.h"

#if defined(__FAST_MATH__)
#error "hashcore must not be built with -ffast-math: results must be bit-exact"
#endif

/* ------------------------------------------------------------------ errors */

static PyObject *DecodeError;  /* hashcore.JpegLibError: libjpeg refused the data */
static PyObject *MemoryLimit;  /* hashcore.MemoryLimitError: the decode would exceed the budget */

/* ------------------------------------------------------------------ libjpeg binding */

/*
 * The corrupt flag is informational: with the whole input in memory libjpeg-turbo decodes
 * most blocks on its fast Huffman path, which turns a bad code into 0 without a warning.
 * Where zune stops is decided by the zune port below, never by this flag.
 */
typedef struct {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    int corrupt;                       /* a "Corrupt JPEG data" warning was emitted */
    long warnings;
    char message[JMSG_LENGTH_MAX];     /* the fatal error, formatted */
} ErrorManager;

static void on_error_exit(j_common_ptr cinfo) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_emit_message(j_common_ptr cinfo, int level) {
    ErrorManager *err = (ErrorManager *)cinfo->err;
    if (level >= 0) {
        return;  /* trace messages */
    }
    err->warnings++;
    if (!err->corrupt) {
        char text[JMSG_LENGTH_MAX];
        (*cinfo->err->format_message)(cinfo, text);
        if (strncmp(text, "Corrupt JPEG data", 17) == 0) {
            err->corrupt = 1;
        }
    }
}

static void on_output_message(j_common_ptr cinfo) {
    (void)cinfo;  /* never write to stderr */
}

typedef struct {
    int h, v;                    /* sampling factors */
    int rows, cols;              /* coded blocks libjpeg keeps (height/width_in_blocks) */
    size_t plane_rows, plane_cols; /* padded plane, in pixels: whole MCUs */
} Geometry;

typedef struct {
    struct jpeg_decompress_struct cinfo;
    ErrorManager err;
    int created;
    int count;
    int width, height, max_h, max_v;
    Geometry comp[4];
} Reader;

/* Header only: geometry is known afterwards. Returns 0, or -1 with err.message set. */
static int reader_open(Reader *r, const unsigned char *data, size_t size, long max_memory) {
    memset(r, 0, sizeof(*r));
    r->cinfo.err = jpeg_std_error(&r->err.pub);
    r->err.pub.error_exit = on_error_exit;
    r->err.pub.emit_message = on_emit_message;
    r->err.pub.output_message = on_output_message;
    if (setjmp(r->err.jump)) {
        return -1;
    }
    jpeg_create_decompress(&r->cinfo);
    r->created = 1;
    r->cinfo.mem->max_memory_to_use = max_memory;
    jpeg_mem_src(&r->cinfo, data, (unsigned long)size);
    if (jpeg_read_header(&r->cinfo, TRUE) != JPEG_HEADER_OK) {
        snprintf(r->err.message, sizeof(r->err.message), "no image in the JPEG data");
        return -1;
    }
    r->count = r->cinfo.num_components;
    if (r->count < 1 || r->count > 4) {
        snprintf(r->err.message, sizeof(r->err.message), "%d components", r->count);
        return -1;
    }
    r->width = (int)r->cinfo.image_width;
    r->height = (int)r->cinfo.image_height;
    r->max_h = r->cinfo.max_h_samp_factor;
    r->max_v = r->cinfo.max_v_samp_factor;
    size_t mcu_cols = ((size_t)r->width + 8 * r->max_h - 1) / (8 * (size_t)r->max_h);
    size_t mcu_rows = ((size_t)r->height + 8 * r->max_v - 1) / (8 * (size_t)r->max_v);
    for (int c = 0; c < r->count; c++) {
        jpeg_component_info *info = &r->cinfo.comp_info[c];
        Geometry *g = &r->comp[c];
        g->h = info->h_samp_factor;
        g->v = info->v_samp_factor;
        g->cols = (int)info->width_in_blocks;
        g->rows = (int)info->height_in_blocks;
        if (r->count == 1) {
            g->plane_rows = (size_t)g->rows * 8;
            g->plane_cols = (size_t)g->cols * 8;
        } else {
            g->plane_rows = mcu_rows * (size_t)g->v * 8;
            g->plane_cols = mcu_cols * (size_t)g->h * 8;
        }
    }
    return 0;
}

static void reader_close(Reader *r) {
    if (r->created) {
        jpeg_destroy_decompress(&r->cinfo);
        r->created = 0;
    }
}

/* Bytes libjpeg's coefficient arrays take (rounded up to whole MCUs as jdcoefct.c does). */
static size_t coefficient_bytes(const Reader *r) {
    size_t total = 0;
    for (int c = 0; c < r->count; c++) {
        const Geometry *g = &r->comp[c];
        size_t rows = ((size_t)g->rows + g->v - 1) / g->v * g->v;
        size_t cols = ((size_t)g->cols + g->h - 1) / g->h * g->h;
        total += rows * cols * sizeof(JBLOCK);
    }
    return total;
}

/* ------------------------------------------------------------------ zune's IDCT */

/* One stb_image 1-D pass over v[0..7] (stride apart), results to out[0..7] (stride apart). */
#define IDCT_1D(v0, v1, v2, v3, v4, v5, v6, v7, bias, shift, o0, o1, o2, o3, o4, o5, o6, o7) \
    do {                                                                                     \
        int32_t p1 = ((v2) + (v6)) * 2217;                                                   \
        int32_t t2 = p1 + (v6) * -7567;                                                      \
        int32_t t3 = p1 + (v2) * 3135;                                                       \
        int32_t t0 = (int32_t)((uint32_t)((v0) + (v4)) << 12);                               \
        int32_t t1 = (int32_t)((uint32_t)((v0) - (v4)) << 12);                               \
        int32_t x0 = t0 + t3 + (bias), x3 = t0 - t3 + (bias);                                \
        int32_t x1 = t1 + t2 + (bias), x2 = t1 - t2 + (bias);                                \
        int32_t a0 = (v7), a1 = (v5), a2 = (v3), a3 = (v1);                                  \
        int32_t q3 = a0 + a2, q4 = a1 + a3, q1 = a0 + a3, q2 = a1 + a2;                      \
        int32_t p5 = (q3 + q4) * 4816;                                                       \
        q1 = p5 + q1 * -3685;                                                                \
        q2 = p5 + q2 * -10497;                                                               \
        q3 = q3 * -8034;                                                                     \
        q4 = q4 * -1597;                                                                     \
        a3 = a3 * 6149 + q1 + q4;                                                            \
        a2 = a2 * 12586 + q2 + q3;                                                           \
        a1 = a1 * 8410 + q2 + q4;                                                            \
        a0 = a0 * 1223 + q1 + q3;                                                            \
        o0 = (x0 + a3) >> (shift);                                                           \
        o1 = (x1 + a2) >> (shift);                                                           \
        o2 = (x2 + a1) >> (shift);                                                           \
        o3 = (x3 + a0) >> (shift);                                                           \
        o4 = (x3 - a0) >> (shift);                                                           \
        o5 = (x2 - a1) >> (shift);                                                           \
        o6 = (x1 - a2) >> (shift);                                                           \
        o7 = (x0 - a3) >> (shift);                                                           \
    } while (0)

#define ROW_BIAS 512
#define COL_BIAS (512 + 65536 + (128 << 17))

static inline uint8_t clamp_u8(int32_t v) {
    return (uint8_t)(v < 0 ? 0 : (v > 255 ? 255 : v));
}

static void idct_dc(int32_t dc, uint8_t *out, size_t stride) {
    uint8_t value = clamp_u8((dc + 4 + 1024) >> 3);
    for (int y = 0; y < 8; y++) {
        memset(out + y * stride, value, 8);
    }
}

/*
 * zune's IDCT of one dequantised block (natural order) into 8x8 pixels at out (row stride).
 * `small`: every coefficient outside the top-left 4x4 is zero. The arithmetic is then the
 * same with literal zeros (a column of zeros gives exactly 0 in the first pass), which lets
 * the compiler drop the dead terms: zune's idct_4x4 shortcut, with identical results.
 */
static inline void idct_any(const int32_t *d, uint8_t *out, size_t stride, int small) {
    int32_t col[64]; /* col[y * 8 + u] */
    int columns = small ? 4 : 8;
    for (int u = 0; u < columns; u++) {
        const int32_t *v = d + u;
        if (small) {
            IDCT_1D(v[0], v[8], v[16], v[24], 0, 0, 0, 0, ROW_BIAS, 10, col[u], col[8 + u],
                    col[16 + u], col[24 + u], col[32 + u], col[40 + u], col[48 + u],
                    col[56 + u]);
        } else {
            IDCT_1D(v[0], v[8], v[16], v[24], v[32], v[40], v[48], v[56], ROW_BIAS, 10,
                    col[u], col[8 + u], col[16 + u], col[24 + u], col[32 + u], col[40 + u],
                    col[48 + u], col[56 + u]);
        }
    }
    for (int y = 0; y < 8; y++) {
        const int32_t *v = col + y * 8;
        int32_t o[8];
        if (small) {
            IDCT_1D(v[0], v[1], v[2], v[3], 0, 0, 0, 0, COL_BIAS, 17, o[0], o[1], o[2], o[3],
                    o[4], o[5], o[6], o[7]);
        } else {
            IDCT_1D(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], COL_BIAS, 17, o[0], o[1],
                    o[2], o[3], o[4], o[5], o[6], o[7]);
        }
        uint8_t *row = out + y * stride;
        for (int x = 0; x < 8; x++) {
            row[x] = clamp_u8(o[x]);
        }
    }
}

static void idct_small(const int32_t *d, uint8_t *out, size_t stride) {
    idct_any(d, out, stride, 1);
}

/*
 * The full transform, laid out for the vectoriser: pass 1 runs over the 8 columns u at once
 * (lanes u), the intermediate is transposed, pass 2 runs over the 8 rows y at once (lanes y),
 * then a transposing, clamping store. Integer operations only, so every lane computes exactly
 * what the scalar macro computes (wrapping like Rust's release build: -fwrapv).
 */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void idct_full(const int32_t *d, uint8_t *out, size_t stride) {
    int32_t rows[64], cols[64], pixels[64];
    for (int u = 0; u < 8; u++) { /* rows[y * 8 + u] */
        IDCT_1D(d[u], d[8 + u], d[16 + u], d[24 + u], d[32 + u], d[40 + u], d[48 + u],
                d[56 + u], ROW_BIAS, 10, rows[u], rows[8 + u], rows[16 + u], rows[24 + u],
                rows[32 + u], rows[40 + u], rows[48 + u], rows[56 + u]);
    }
    for (int y = 0; y < 8; y++) {
        for (int u = 0; u < 8; u++) {
            cols[u * 8 + y] = rows[y * 8 + u];
        }
    }
    for (int y = 0; y < 8; y++) { /* pixels[x * 8 + y] */
        IDCT_1D(cols[y], cols[8 + y], cols[16 + y], cols[24 + y], cols[32 + y], cols[40 + y],
                cols[48 + y], cols[56 + y], COL_BIAS, 17, pixels[y], pixels[8 + y],
                pixels[16 + y], pixels[24 + y], pixels[32 + y], pixels[40 + y], pixels[48 + y],
                pixels[56 + y]);
    }
    for (int y = 0; y < 8; y++) {
        uint8_t *row = out + y * stride;
        for (int x = 0; x < 8; x++) {
            row[x] = clamp_u8(pixels[x * 8 + y]);
        }
    }
}

/* Any block: the DC shortcut when all 63 AC are zero (same result as the full transform). */
static void idct_dequantised(const int32_t *d, uint8_t *out, size_t stride) {
    int ac = 0, outside = 0;
    for (int i = 1; i < 64; i++) {
        ac |= d[i] != 0;
        outside |= (d[i] != 0) & (((i & 7) >= 4) | (i >= 32));
    }
    if (!ac) {
        idct_dc(d[0], out, stride);
    } else if (!outside) {
        idct_small(d, out, stride);
    } else {
        idct_full(d, out, stride);
    }
}

/* libjpeg's quantised block (natural order) through zune's IDCT. */
static void idct_block(const JCOEF *coef, const UINT16 *quant, uint8_t *out, size_t stride) {
    int32_t d[64];
    for (int i = 0; i < 64; i++) {
        d[i] = (int32_t)coef[i] * (int32_t)quant[i];
    }
    idct_dequantised(d, out, stride);
}

/* ------------------------------------------------------------------ decode to planes */

typedef struct {
    uint8_t *planes[4];          /* padded planes to fill (mode PLANES) */
    int16_t *coefs[4];           /* (rows, cols, 64) int16 (mode COEFS) */
    uint16_t quant[4][64];
} Output;

enum { MODE_PLANES = 0, MODE_COEFS = 1 };

/* Entropy-decode and fill the outputs. Runs without the GIL. */
static int reader_decode(Reader *r, Output *out, int mode) {
    if (setjmp(r->err.jump)) {
        return -1;
    }
    jvirt_barray_ptr *arrays = jpeg_read_coefficients(&r->cinfo);
    for (int c = 0; c < r->count; c++) {
        jpeg_component_info *info = &r->cinfo.comp_info[c];
        int slot = info->quant_tbl_no;
        JQUANT_TBL *table = (slot >= 0 && slot < NUM_QUANT_TBLS) ? r->cinfo.quant_tbl_ptrs[slot]
                                                                   : NULL;
        if (table == NULL) {
            snprintf(r->err.message, sizeof(r->err.message),
                     "JPEG component %d has no quantisation table", c);
            return -1;
        }
        memcpy(out->quant[c], table->quantval, sizeof(out->quant[c]));
        const Geometry *g = &r->comp[c];
        for (int by = 0; by < g->rows; by++) {
            JBLOCKARRAY row = (*r->cinfo.mem->access_virt_barray)(
                (j_common_ptr)&r->cinfo, arrays[c], (JDIMENSION)by, 1, FALSE);
            if (mode == MODE_COEFS) {
                memcpy(out->coefs[c] + (size_t)by * g->cols * 64, row[0],
                       (size_t)g->cols * sizeof(JBLOCK));
                continue;
            }
            uint8_t *plane = out->planes[c];
            for (int bx = 0; bx < g->cols; bx++) {
                idct_block(row[0][bx], out->quant[c],
                           plane + (size_t)by * 8 * g->plane_cols + (size_t)bx * 8,
                           g->plane_cols);
            }
        }
        if (mode == MODE_PLANES) {
            /* edge replication out to whole MCUs (numpy's pad mode="edge") */
            uint8_t *plane = out->planes[c];
            size_t coded_cols = (size_t)g->cols * 8, coded_rows = (size_t)g->rows * 8;
            for (size_t y = 0; y < coded_rows && coded_cols < g->plane_cols; y++) {
                uint8_t *line = plane + y * g->plane_cols;
                memset(line + coded_cols, line[coded_cols - 1], g->plane_cols - coded_cols);
            }
            for (size_t y = coded_rows; y < g->plane_rows; y++) {
                memcpy(plane + y * g->plane_cols, plane + (coded_rows - 1) * g->plane_cols,
                       g->plane_cols);
            }
        }
    }
    return 0; /* jpeg_read_coefficients read up to EOI; destroy releases everything */
}

static PyObject *raise_reader(Reader *r) {
    PyErr_SetString(DecodeError, r->err.message[0] ? r->err.message : "libjpeg failed");
    return NULL;
}

/* decode_planes(data, max_memory) -> (width, height, [(h, v, rows, cols, bytearray)], corrupt) */
static PyObject *decode_planes(PyObject *self, PyObject *args) {
    Py_buffer data;
    long long max_memory;
    int mode = MODE_PLANES;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*L|i", &data, &max_memory, &mode)) {
        return NULL;
    }
    max_memory = max_memory < 0 ? 0 : max_memory; /* 0 would mean "no limit" to libjpeg: */
    max_memory = max_memory == 0 ? 1 : max_memory; /* our estimate below refuses it first */
    Reader *r = PyMem_Calloc(1, sizeof(Reader));
    Output *out = PyMem_Calloc(1, sizeof(Output));
    PyObject *buffers[4] = {NULL, NULL, NULL, NULL};
    PyObject *result = NULL;
    if (r == NULL || out == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = reader_open(r, data.buf, (size_t)data.len, (long)max_memory);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        raise_reader(r);
        goto done;
    }
    size_t needed = coefficient_bytes(r);
    for (int c = 0; c < r->count; c++) {
        const Geometry *g = &r->comp[c];
        needed += mode == MODE_PLANES ? g->plane_rows * g->plane_cols
                                      : (size_t)g->rows * g->cols * 128;
    }
    if (needed > (size_t)max_memory) {
        PyErr_Format(MemoryLimit, "decoding needs %zu MB, limit %lld MB", needed >> 20,
                     max_memory >> 20);
        goto done;
    }
    for (int c = 0; c < r->count; c++) {
        const Geometry *g = &r->comp[c];
        size_t bytes = mode == MODE_PLANES ? g->plane_rows * g->plane_cols
                                           : (size_t)g->rows * g->cols * 128;
        buffers[c] = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)bytes);
        if (buffers[c] == NULL) {
            goto done;
        }
        if (mode == MODE_PLANES) {
            out->planes[c] = (uint8_t *)PyByteArray_AS_STRING(buffers[c]);
        } else {
            out->coefs[c] = (int16_t *)PyByteArray_AS_STRING(buffers[c]);
        }
    }
    Py_BEGIN_ALLOW_THREADS
    status = reader_decode(r, out, mode);
    Py_END_ALLOW_THREADS
    if (status != 0) {
        raise_reader(r);
        goto done;
    }
    PyObject *list = PyList_New(r->count);
    if (list == NULL) {
        goto done;
    }
    for (int c = 0; c < r->count; c++) {
        const Geometry *g = &r->comp[c];
        PyObject *quant = PyBytes_FromStringAndSize((const char *)out->quant[c], 128);
        PyObject *item = quant == NULL ? NULL
            : mode == MODE_PLANES
                ? Py_BuildValue("(iinnON)", g->h, g->v, (Py_ssize_t)g->plane_rows,
                                (Py_ssize_t)g->plane_cols, buffers[c], quant)
                : Py_BuildValue("(iiiiON)", g->h, g->v, g->rows, g->cols, buffers[c], quant);
        if (item == NULL) {
            Py_XDECREF(quant);
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, c, item);
    }
    result = Py_BuildValue("(iiNO)", r->width, r->height, list,
                           r->err.corrupt ? Py_True : Py_False);
done:
    for (int c = 0; c < 4; c++) {
        Py_XDECREF(buffers[c]);
    }
    if (r != NULL) {
        Py_BEGIN_ALLOW_THREADS
        reader_close(r);
        Py_END_ALLOW_THREADS
    }
    PyMem_Free(r);
    PyMem_Free(out);
    PyBuffer_Release(&data);
    return result;
}

/* ------------------------------------------------------------------ zune's baseline decoder */
/*
 * Single-scan baseline JPEGs (the usual photo) are entropy-decoded here exactly as zune-jpeg
 * 0.5.15 does it (bitstream.rs, mcu.rs, huffman.rs): its bit reader (32-bit refills, zero
 * bits after a marker), its 9-bit lookup with the fast AC table, its restart handling (skip
 * to the next marker, restart on any RSTn) and, above all, its stop on a bad Huffman code:
 * the decode ends there and the caller redoes zune's buffers (decoder.keep_stale_blocks).
 * libjpeg instead substitutes zero and goes on, so it cannot tell where zune stopped.
 * Anything outside this model (progressive, several scans, scan components not in frame
 * order, a marker other than RSTn/EOI in the data, a premature end) returns None and the
 * caller uses libjpeg. jpeg/zune_walk.py is the same model in Python (the tests' oracle).
 * Work is bounded by the image size: at most 64 symbols a block.
 */
#define LOOK 9
#define LOOK_MASK ((1 << LOOK) - 1)
#define SLOW_ENTRY ((LOOK + 1) << LOOK)

/* zig-zag position -> natural (row-major) index in a block */
static const uint8_t UN_ZIGZAG[64] = {
    0,  1,  8,  16, 9,  2,  3,  10, 17, 24, 32, 25, 18, 11, 4,  5,
    12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6,  7,  14, 21, 28,
    35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
    58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
};

typedef struct {
    int defined;
    int32_t maxcode[18];
    int32_t offset[18];
    uint8_t values[256];
    int32_t lookup[1 << LOOK];
    int16_t fast_ac[1 << LOOK];
} Huffman;

/* huffman.rs HuffmanTable::make_derived_table; -1 for a bogus table (zune refuses it too). */
static int huffman_build(Huffman *t, const uint8_t *counts, const uint8_t *symbols, int n,
                         int is_dc) {
    uint8_t sizes[257];
    uint32_t codes[257];
    int p = 0;
    memset(t, 0, sizeof(*t));
    memcpy(t->values, symbols, (size_t)n);
    for (int l = 1; l <= 16; l++) {
        for (int i = 0; i < counts[l - 1]; i++) {
            sizes[p++] = (uint8_t)l;
        }
    }
    sizes[p] = 0;
    uint32_t code = 0;
    int si = sizes[0];
    p = 0;
    while (sizes[p] != 0) {
        while (sizes[p] == si) {
            codes[p++] = code++;
        }
        t->maxcode[si] = (int32_t)(code << (16 - si));
        if (code >= (1u << si)) {
            return -1;
        }
        code <<= 1;
        si++;
    }
    p = 0;
    for (int l = 0; l <= 16; l++) {
        if (l == 0 || counts[l - 1] == 0) {
            t->maxcode[l] = -1;
        } else {
            t->offset[l] = p - (int32_t)codes[p];
            p += counts[l - 1];
        }
    }
    t->offset[17] = 0;
    t->maxcode[17] = 0xFFFFF;
    for (int i = 0; i < (1 << LOOK); i++) {
        t->lookup[i] = SLOW_ENTRY;
    }
    p = 0;
    for (int l = 1; l <= LOOK; l++) {
        for (int i = 0; i < counts[l - 1]; i++, p++) {
            int look = (int)(codes[p] << (LOOK - l));
            for (int j = 0; j < (1 << (LOOK - l)); j++) {
                t->lookup[look + j] = (l << LOOK) | t->values[p];
            }
        }
    }
    if (!is_dc) {
        for (int i = 0; i < (1 << LOOK); i++) {
            int entry = t->lookup[i];
            int len = entry >> LOOK, rs = entry & LOOK_MASK;
            int run = (rs >> 4) & 15, mag = rs & 15;
            if (len <= LOOK && mag != 0 && len + mag <= LOOK) {
                int k = ((i << len) & LOOK_MASK) >> (LOOK - mag);
                if (k < (1 << (mag - 1))) {
                    k += (-1 * (1 << mag)) + 1;
                }
                if (k >= -128 && k <= 127) {
                    t->fast_ac[i] = (int16_t)(k * 256 + (run << 4) + (len + mag));
                }
            }
        }
    }
    t->defined = 1;
    return 0;
}

typedef struct {
    const uint8_t *data;
    size_t size, pos, overread;
    uint64_t acc; /* the low `bits` bits are valid */
    int bits;
    int marker;   /* -1: none */
    int eoi;
} Bits;

enum { BITS_OK = 0, BITS_STOP = 1 };

static inline int next_byte(Bits *b) {
    b->pos++;
    if (b->pos <= b->size) {
        return b->data[b->pos - 1];
    }
    b->overread++;
    return 0;
}

static int bits_refill(Bits *b) {
    if (b->bits >= 32) {
        return BITS_OK;
    }
    if (b->marker >= 0 || b->eoi) {
        b->acc <<= 32;
        b->bits += 32;
        return BITS_OK;
    }
    if (b->overread > 0) {
        return b->bits == 0 ? BITS_STOP : BITS_OK;
    }
    if (b->pos + 4 <= b->size) {
        const uint8_t *c = b->data + b->pos;
        if (c[0] != 0xFF && c[1] != 0xFF && c[2] != 0xFF && c[3] != 0xFF) {
            b->acc = (b->acc << 32) | ((uint64_t)c[0] << 24) | ((uint64_t)c[1] << 16)
                     | ((uint64_t)c[2] << 8) | c[3];
            b->bits += 32;
            b->pos += 4;
            return BITS_OK;
        }
    }
    for (int i = 0; i < 4; i++) {
        int byte = next_byte(b);
        if (byte == 0xFF) {
            int following = next_byte(b);
            while (following == 0xFF) {
                following = next_byte(b);
            }
            if (following != 0) {
                b->marker = following;
                if (following == 0xD9) {
                    b->acc <<= 8;
                    b->bits += 8;
                }
                return BITS_OK;
            }
        }
        b->acc = (b->acc << 8) | (uint64_t)byte;
        b->bits += 8;
    }
    return BITS_OK;
}

static inline uint32_t bits_peek(const Bits *b, int n) {
    uint64_t v = b->bits >= n ? b->acc >> (b->bits - n) : b->acc << (n - b->bits);
    return (uint32_t)(v & ((1ull << n) - 1));
}

static inline void bits_drop(Bits *b, int n) {
    if (n >= b->bits) {
        b->acc = 0;
        b->bits = 0;
    } else {
        b->bits -= n;
        b->acc &= (1ull << b->bits) - 1;
    }
}

/* decode_huff!: the symbol, or -1 where zune returns an error. */
static inline int bits_symbol(Bits *b, const Huffman *t, int32_t entry) {
    int length = entry >> LOOK;
    int value = entry & LOOK_MASK;
    if (length > LOOK) {
        int32_t code = (int32_t)bits_peek(b, 16);
        while (length < 17 && code >= t->maxcode[length]) {
            length++;
        }
        if (length == 17) {
            return -1;
        }
        value = t->values[((code >> (16 - length)) + t->offset[length]) & 0xFF];
    }
    if (length > b->bits) {
        return -1;
    }
    bits_drop(b, length);
    return value;
}

static inline int32_t huff_extend(int32_t x, int s) {
    return x + ((((x) - (1 << ((s)-1))) >> 31) & (((-1) * (1 << (s))) + 1));
}

/* bitstream.rs decode_mcu_block into `out` (dequantised, natural order); BITS_STOP on error. */
static int decode_block(Bits *b, const Huffman *dc, const Huffman *ac, const int32_t *qt,
                        int32_t *dc_pred, int32_t *out, int *last) {
    if (b->bits < 1 && b->marker >= 0) {
        return BITS_STOP;
    }
    if (b->bits < 32 && bits_refill(b) != BITS_OK) {
        return BITS_STOP;
    }
    int size = bits_symbol(b, dc, dc->lookup[bits_peek(b, LOOK)]);
    if (size < 0) {
        return BITS_STOP;
    }
    int32_t diff = 0;
    if (size > 0 && size <= 16) {
        diff = huff_extend((int32_t)bits_peek(b, size), size);
        bits_drop(b, size);
    } else if (size > 16) {
        bits_drop(b, size); /* a bogus DC size: skip its bits, value undefined */
    }
    *dc_pred += diff;
    out[0] = *dc_pred * qt[0];
    int pos = 1;
    while (pos < 64) {
        if (bits_refill(b) != BITS_OK) {
            return BITS_STOP;
        }
        uint32_t look = bits_peek(b, LOOK);
        int fast = ac->fast_ac[look];
        if (fast != 0) {
            pos += (fast >> 4) & 15;
            int t = UN_ZIGZAG[pos < 63 ? pos : 63];
            out[t] = (int32_t)(fast >> 8) * qt[t];
            bits_drop(b, fast & 15);
            pos++;
            continue;
        }
        int rs = bits_symbol(b, ac, ac->lookup[look]);
        if (rs < 0) {
            return BITS_STOP;
        }
        int run = rs >> 4, s = rs & 15;
        if (s) {
            pos += run;
            int32_t value = huff_extend((int32_t)bits_peek(b, s), s);
            bits_drop(b, s);
            int t = UN_ZIGZAG[pos & 63];
            out[t] = value * qt[t];
            pos++;
        } else if (run != 15) {
            break;
        } else {
            pos += 16;
        }
    }
    *last = pos;
    return BITS_OK;
}

/* Zero a block again after use; only the 4x4 corner can be set when last <= 10. */
static inline void clear_block(int32_t *block, int last) {
    if (last <= 10) {
        for (int y = 0; y < 4; y++) {
            for (int x = 0; x < 4; x++) {
                block[y * 8 + x] = 0;
            }
        }
    } else {
        for (int i = 0; i < 64; i++) {
            block[i] = 0;
        }
    }
}

/* zune's get_marker from the byte position: the next marker, or -1 at the end of data. */
static int bits_next_marker(Bits *b) {
    while (b->pos < b->size) {
        if (b->data[b->pos++] != 0xFF) {
            continue;
        }
        while (b->pos < b->size && b->data[b->pos] == 0xFF) {
            b->pos++;
        }
        if (b->pos >= b->size) {
            return -1;
        }
        int code = b->data[b->pos++];
        if (code != 0) {
            return code;
        }
    }
    return -1;
}

/* What DQT, DHT and DRI segments set: the same for the baseline and progressive decoders. */
typedef struct {
    int32_t quant[4][64]; /* natural order */
    int quant_defined[4];
    Huffman dc[4], ac[4];
    int restart_interval;
} Tables;

/* What the SOF segment says: size, components, their sampling and quantisation tables. */
typedef struct {
    int width, height, count, max_h, max_v;
    int ident[4], h[4], v[4], tq[4];
} Frame;

typedef struct {
    Frame f;
    Tables t;
    int td[4], ta[4];
    size_t scan_start;
    size_t mcu_cols, mcu_rows;
    size_t plane_rows[4], plane_cols[4];
} Baseline;

enum { PARSE_OK = 0, PARSE_OUTSIDE = 1 };

static inline int be16(const uint8_t *p) {
    return (p[0] << 8) | p[1];
}

/* One table segment (DQT, DHT, DRI) into t; PARSE_OUTSIDE if malformed or another segment.
   whole_dht: a DHT segment must end exactly after its last table (the progressive decoder's
   rule); otherwise fewer than 17 trailing bytes are ignored, as the baseline port always did. */
static int parse_tables(Tables *t, int code, const uint8_t *body, size_t size, int whole_dht) {
    if (code == 0xDB) {
        size_t k = 0;
        while (k < size) {
            int precision = body[k] >> 4, slot = body[k] & 15;
            size_t need = 1 + (precision ? 128 : 64);
            if (slot > 3 || k + need > size) {
                return PARSE_OUTSIDE;
            }
            for (int i = 0; i < 64; i++) {
                t->quant[slot][UN_ZIGZAG[i]] =
                    precision ? be16(body + k + 1 + 2 * i) : body[k + 1 + i];
            }
            t->quant_defined[slot] = 1;
            k += need;
        }
        return PARSE_OK;
    }
    if (code == 0xC4) {
        size_t k = 0;
        while (k + 17 <= size) {
            int index = body[k];
            const uint8_t *counts = body + k + 1;
            int total = 0;
            for (int i = 0; i < 16; i++) {
                total += counts[i];
            }
            if (total > 256 || k + 17 + (size_t)total > size || (index & 15) > 3) {
                return PARSE_OUTSIDE;
            }
            int is_dc = !(index & 0x10);
            Huffman *table = is_dc ? &t->dc[index & 3] : &t->ac[index & 3];
            if (huffman_build(table, counts, body + k + 17, total, is_dc) != 0) {
                return PARSE_OUTSIDE;
            }
            k += 17 + (size_t)total;
        }
        return k == size || !whole_dht ? PARSE_OK : PARSE_OUTSIDE;
    }
    if (code == 0xDD) {
        if (size != 2) {
            return PARSE_OUTSIDE;
        }
        t->restart_interval = be16(body);
        return PARSE_OK;
    }
    return PARSE_OUTSIDE;
}

/* The SOF segment into f (8-bit samples, 1-4 components, sampling 1-4); PARSE_OUTSIDE if
   malformed. */
static int parse_frame(Frame *f, const uint8_t *body, size_t size) {
    if (size < 6 || body[0] != 8) {
        return PARSE_OUTSIDE;
    }
    f->height = be16(body + 1);
    f->width = be16(body + 3);
    f->count = body[5];
    if (f->count < 1 || f->count > 4 || size != 6 + 3 * (size_t)f->count || f->width == 0
        || f->height == 0) {
        return PARSE_OUTSIDE;
    }
    f->max_h = f->max_v = 1;
    for (int c = 0; c < f->count; c++) {
        f->ident[c] = body[6 + 3 * c];
        f->h[c] = body[7 + 3 * c] >> 4;
        f->v[c] = body[7 + 3 * c] & 15;
        f->tq[c] = body[8 + 3 * c];
        if (f->h[c] < 1 || f->h[c] > 4 || f->v[c] < 1 || f->v[c] > 4 || f->tq[c] > 3) {
            return PARSE_OUTSIDE;
        }
        f->max_h = f->h[c] > f->max_h ? f->h[c] : f->max_h;
        f->max_v = f->v[c] > f->max_v ? f->v[c] : f->max_v;
    }
    return PARSE_OK;
}

/* Read the rebuilt stream (SOI, tables, SOF, one SOS, data, EOI; checked by markers.py). */
static int baseline_parse(Baseline *bl, const uint8_t *d, size_t n) {
    size_t at = 2;
    int have_frame = 0;
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) {
        return PARSE_OUTSIDE;
    }
    for (;;) {
        if (at + 4 > n || d[at] != 0xFF) {
            return PARSE_OUTSIDE;
        }
        int code = d[at + 1];
        size_t length = (size_t)be16(d + at + 2);
        if (length < 2 || at + 2 + length > n) {
            return PARSE_OUTSIDE;
        }
        const uint8_t *body = d + at + 4;
        size_t size = length - 2;
        at += 2 + length;
        if (code == 0xDB || code == 0xC4 || code == 0xDD) {
            if (parse_tables(&bl->t, code, body, size, 0) != PARSE_OK) {
                return PARSE_OUTSIDE;
            }
        } else if (code == 0xC0 || code == 0xC1) {
            if (parse_frame(&bl->f, body, size) != PARSE_OK) {
                return PARSE_OUTSIDE;
            }
            have_frame = 1;
        } else if (code == 0xDA) {
            if (!have_frame || size < 1 || body[0] != bl->f.count
                || size != 4 + 2 * (size_t)bl->f.count) {
                return PARSE_OUTSIDE;
            }
            for (int c = 0; c < bl->f.count; c++) {
                if (body[1 + 2 * c] != bl->f.ident[c]) {
                    return PARSE_OUTSIDE;
                }
                bl->td[c] = body[2 + 2 * c] >> 4;
                bl->ta[c] = body[2 + 2 * c] & 15;
                if (bl->td[c] > 3 || bl->ta[c] > 3 || !bl->t.dc[bl->td[c]].defined
                    || !bl->t.ac[bl->ta[c]].defined || !bl->t.quant_defined[bl->f.tq[c]]) {
                    return PARSE_OUTSIDE;
                }
            }
            bl->scan_start = at;
            break;
        } else {
            return PARSE_OUTSIDE; /* progressive or anything else */
        }
    }
    /* one scan only: its data must run to the final EOI */
    for (size_t i = bl->scan_start; i + 1 < n; i++) {
        if (d[i] == 0xFF) {
            int next = d[i + 1];
            if (next != 0 && next != 0xFF && !(next >= 0xD0 && next <= 0xD7)) {
                if (i != n - 2 || next != 0xD9) {
                    return PARSE_OUTSIDE;
                }
                break;
            }
        }
    }
    if (bl->f.count == 1) {
        bl->mcu_cols = ((size_t)bl->f.width + 7) / 8;
        bl->mcu_rows = ((size_t)bl->f.height + 7) / 8;
        bl->plane_cols[0] = bl->mcu_cols * 8;
        bl->plane_rows[0] = bl->mcu_rows * 8;
    } else {
        bl->mcu_cols = ((size_t)bl->f.width + 8 * bl->f.max_h - 1) / (8 * (size_t)bl->f.max_h);
        bl->mcu_rows = ((size_t)bl->f.height + 8 * bl->f.max_v - 1) / (8 * (size_t)bl->f.max_v);
        for (int c = 0; c < bl->f.count; c++) {
            bl->plane_cols[c] = bl->mcu_cols * (size_t)bl->f.h[c] * 8;
            bl->plane_rows[c] = bl->mcu_rows * (size_t)bl->f.v[c] * 8;
        }
    }
    return PARSE_OK;
}

enum { RUN_DONE = 0, RUN_STOPPED = 1, RUN_OUTSIDE = 2, RUN_EXHAUSTED = 3 };

typedef struct {
    size_t row, col;
    int block;
} Stop;

/* mcu.rs decode_mcu_ycbcr_baseline over the whole image, IDCT into the padded planes. */
static int baseline_run(const Baseline *bl, const uint8_t *d, size_t n, uint8_t **planes,
                        Stop *stop) {
    Bits b = {.data = d, .size = n, .pos = bl->scan_start, .marker = -1};
    int32_t dc_pred[4] = {0, 0, 0, 0};
    int32_t block[64];
    int last = 64;
    for (int i = 0; i < 64; i++) {
        block[i] = 0;
    }
    int interval = bl->t.restart_interval;
    int todo = interval;
    int single = bl->f.count == 1;
    for (size_t row = 0; row < bl->mcu_rows; row++) {
        if (b.overread > 0) {
            return RUN_OUTSIDE; /* zune fills the rest with 128 here; libjpeg's view is kept */
        }
        for (size_t col = 0; col < bl->mcu_cols; col++) {
            int index = 0;
            for (int c = 0; c < bl->f.count; c++) {
                int h = single ? 1 : bl->f.h[c], v = single ? 1 : bl->f.v[c];
                size_t stride = bl->plane_cols[c];
                for (int y = 0; y < v; y++) {
                    for (int x = 0; x < h; x++, index++) {
                        if (decode_block(&b, &bl->t.dc[bl->td[c]], &bl->t.ac[bl->ta[c]],
                                         bl->t.quant[bl->f.tq[c]], &dc_pred[c], block, &last)
                            != BITS_OK) {
                            stop->row = row;
                            stop->col = col;
                            stop->block = index;
                            return RUN_STOPPED;
                        }
                        uint8_t *at = planes[c] + (row * (size_t)v * 8 + (size_t)y * 8) * stride
                                      + (col * (size_t)h + (size_t)x) * 8;
                        /* zune: idct_1x1 for len <= 1, idct_4x4 for len <= 10 (zig-zag
                           positions 0..9 all lie in the 4x4 corner), else the full one */
                        if (last <= 1) {
                            idct_dc(block[0], at, stride);
                        } else if (last <= 10) {
                            idct_small(block, at, stride);
                        } else {
                            idct_full(block, at, stride);
                        }
                        clear_block(block, last);
                    }
                }
            }
            if (interval) {
                todo--;
                if (todo == 0) {
                    /* mcu_prog.rs handle_rst_main: an exhausted refill is zune's error */
                    if (bits_refill(&b) != BITS_OK) {
                        return RUN_EXHAUSTED;
                    }
                    if (b.marker < 0 && !b.eoi) {
                        b.marker = bits_next_marker(&b);
                    }
                    if (b.marker >= 0xD0 && b.marker <= 0xD7) {
                        b.acc = 0;
                        b.bits = 0;
                        b.marker = -1;
                        b.overread = 0;
                        dc_pred[0] = dc_pred[1] = dc_pred[2] = dc_pred[3] = 0;
                    }
                    todo = interval;
                }
            }
        }
        if (b.marker == 0xD9) {
            b.marker = -1;
            b.eoi = 1;
        } else if (b.marker >= 0 && !(b.marker >= 0xD0 && b.marker <= 0xD7)) {
            return RUN_OUTSIDE;
        }
    }
    return RUN_DONE;
}

/* decode_baseline(data, max_memory) -> None (outside the model) or
   (width, height, [(h, v, rows, cols, bytearray, b"")], stop: (row, col, block) | None) */
static PyObject *decode_baseline(PyObject *self, PyObject *args) {
    Py_buffer data;
    long long max_memory;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*L", &data, &max_memory)) {
        return NULL;
    }
    max_memory = max_memory < 0 ? 0 : max_memory;
    PyObject *result = NULL;
    PyObject *buffers[4] = {NULL, NULL, NULL, NULL};
    uint8_t *planes[4] = {NULL, NULL, NULL, NULL};
    Baseline *bl = PyMem_Calloc(1, sizeof(Baseline));
    if (bl == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = baseline_parse(bl, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    if (status != PARSE_OK) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    size_t needed = 0;
    for (int c = 0; c < bl->f.count; c++) {
        needed += bl->plane_rows[c] * bl->plane_cols[c];
    }
    if (needed > (size_t)max_memory) {
        PyErr_Format(MemoryLimit, "decoding needs %zu MB, limit %lld MB", needed >> 20,
                     max_memory >> 20);
        goto done;
    }
    for (int c = 0; c < bl->f.count; c++) {
        buffers[c] = PyByteArray_FromStringAndSize(
            NULL, (Py_ssize_t)(bl->plane_rows[c] * bl->plane_cols[c]));
        if (buffers[c] == NULL) {
            goto done;
        }
        planes[c] = (uint8_t *)PyByteArray_AS_STRING(buffers[c]);
    }
    Stop stop = {0, 0, 0};
    Py_BEGIN_ALLOW_THREADS
    status = baseline_run(bl, data.buf, (size_t)data.len, planes, &stop);
    if (status == RUN_STOPPED) {
        /* rows after the stopping MCU row are never decoded: zero, not stale memory */
        for (int c = 0; c < bl->f.count; c++) {
            size_t v = bl->f.count == 1 ? 1 : (size_t)bl->f.v[c];
            size_t first = (stop.row + 1) * v * 8;
            if (first < bl->plane_rows[c]) {
                memset(planes[c] + first * bl->plane_cols[c], 0,
                       (bl->plane_rows[c] - first) * bl->plane_cols[c]);
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (status == RUN_OUTSIDE) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    if (status == RUN_EXHAUSTED) {
        PyErr_SetString(DecodeError, "Exhausted data in the image");
        goto done;
    }
    PyObject *list = PyList_New(bl->f.count);
    if (list == NULL) {
        goto done;
    }
    for (int c = 0; c < bl->f.count; c++) {
        PyObject *item = Py_BuildValue("(iinnOy#)", bl->f.h[c], bl->f.v[c],
                                       (Py_ssize_t)bl->plane_rows[c],
                                       (Py_ssize_t)bl->plane_cols[c], buffers[c], "", (Py_ssize_t)0);
        if (item == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, c, item);
    }
    if (status == RUN_STOPPED) {
        result = Py_BuildValue("(iiN(nni))", bl->f.width, bl->f.height, list, (Py_ssize_t)stop.row,
                               (Py_ssize_t)stop.col, stop.block);
    } else {
        result = Py_BuildValue("(iiNO)", bl->f.width, bl->f.height, list, Py_None);
    }
done:
    for (int c = 0; c < 4; c++) {
        Py_XDECREF(buffers[c]);
    }
    PyMem_Free(bl);
    PyBuffer_Release(&data);
    return result;
}

/* ------------------------------------------------------------------ progressive decoder */
/*
 * Progressive JPEGs (libjpeg's jdphuff.c algorithm: DC first/refine, AC first/refine with EOB
 * runs, restarts), entropy-decoded here rather than by libjpeg-turbo because its progressive
 * path is the slowest step of a photo. Intact files give libjpeg's coefficients exactly (the
 * tests compare them file by file). Anything unusual -- a bad Huffman code, a missing table,
 * a marker where a restart should be, an out-of-range position -- returns "outside" and the
 * caller decodes the file with libjpeg as before, so damaged progressive files keep libjpeg's
 * reading of them.
 */
typedef struct {
    Frame f;
    Tables t;
    size_t mcu_cols, mcu_rows;
    size_t coded_cols[4], coded_rows[4]; /* blocks a non-interleaved scan codes */
    size_t grid_cols[4], grid_rows[4];   /* blocks of whole MCUs (>= coded) */
    size_t plane_rows[4], plane_cols[4];
    size_t after_frame; /* first byte after the SOF segment */
} Progressive;


/* Segments up to and including SOF2; geometry. */
static int progressive_parse(Progressive *pg, const uint8_t *d, size_t n) {
    size_t at = 2;
    if (n < 4 || d[0] != 0xFF || d[1] != 0xD8) {
        return PARSE_OUTSIDE;
    }
    for (;;) {
        if (at + 4 > n || d[at] != 0xFF) {
            return PARSE_OUTSIDE;
        }
        int code = d[at + 1];
        size_t length = (size_t)be16(d + at + 2);
        if (length < 2 || at + 2 + length > n) {
            return PARSE_OUTSIDE;
        }
        const uint8_t *body = d + at + 4;
        size_t size = length - 2;
        at += 2 + length;
        if (code == 0xC2) {
            if (parse_frame(&pg->f, body, size) != PARSE_OK) {
                return PARSE_OUTSIDE;
            }
            pg->after_frame = at;
            break;
        }
        if (parse_tables(&pg->t, code, body, size, 1) != PARSE_OK) {
            return PARSE_OUTSIDE;
        }
    }
    size_t w = (size_t)pg->f.width, hh = (size_t)pg->f.height;
    if (pg->f.count == 1) {
        pg->mcu_cols = (w + 7) / 8;
        pg->mcu_rows = (hh + 7) / 8;
        pg->coded_cols[0] = pg->grid_cols[0] = pg->mcu_cols;
        pg->coded_rows[0] = pg->grid_rows[0] = pg->mcu_rows;
    } else {
        pg->mcu_cols = (w + 8 * pg->f.max_h - 1) / (8 * (size_t)pg->f.max_h);
        pg->mcu_rows = (hh + 8 * pg->f.max_v - 1) / (8 * (size_t)pg->f.max_v);
        for (int c = 0; c < pg->f.count; c++) {
            pg->coded_cols[c] = (w * pg->f.h[c] + 8 * pg->f.max_h - 1) / (8 * (size_t)pg->f.max_h);
            pg->coded_rows[c] = (hh * pg->f.v[c] + 8 * pg->f.max_v - 1) / (8 * (size_t)pg->f.max_v);
            pg->grid_cols[c] = pg->mcu_cols * pg->f.h[c];
            pg->grid_rows[c] = pg->mcu_rows * pg->f.v[c];
        }
    }
    for (int c = 0; c < pg->f.count; c++) {
        pg->plane_cols[c] = pg->grid_cols[c] * 8;
        pg->plane_rows[c] = pg->grid_rows[c] * 8;
    }
    return PARSE_OK;
}

/* n bits (n <= 16) or -1 when the data ran out. */
static inline int32_t bits_get(Bits *b, int n) {
    if (n == 0) {
        return 0;
    }
    if (b->bits < n && (bits_refill(b) != BITS_OK || b->bits < n)) {
        return -1;
    }
    int32_t value = (int32_t)bits_peek(b, n);
    bits_drop(b, n);
    return value;
}

static inline int prog_symbol(Bits *b, const Huffman *t) {
    if (b->bits < 16 && bits_refill(b) != BITS_OK) {
        return -1;
    }
    return bits_symbol(b, t, t->lookup[bits_peek(b, LOOK)]);
}

typedef struct {
    int comps, ci[4], td[4], ta[4];
    int ss, se, ah, al;
} ScanHeader;

/* One block of one scan; BITS_OK, or BITS_STOP for anything unusual. */
static int prog_block(Bits *b, const Progressive *pg, const ScanHeader *sh, int k_index,
                      int16_t *coef, int16_t *dc, uint64_t *nonzero, int32_t *eobrun,
                      int32_t *dc_pred) {
    if (sh->ss == 0) {
        if (sh->ah == 0) {
            int s = prog_symbol(b, &pg->t.dc[sh->td[k_index]]);
            if (s < 0 || s > 15) {
                return BITS_STOP;
            }
            int32_t r = bits_get(b, s);
            if (r < 0) {
                return BITS_STOP;
            }
            *dc_pred += s ? huff_extend(r, s) : 0;
            *dc = (int16_t)(int32_t)((uint32_t)*dc_pred << sh->al);
        } else {
            int32_t bit = bits_get(b, 1);
            if (bit < 0) {
                return BITS_STOP;
            }
            if (bit) {
                *dc = (int16_t)(*dc | (1 << sh->al));
            }
        }
        return BITS_OK;
    }
    const Huffman *ac = &pg->t.ac[sh->ta[k_index]];
    if (sh->ah == 0) {
        if (*eobrun > 0) {
            (*eobrun)--;
            return BITS_OK;
        }
        for (int k = sh->ss; k <= sh->se; k++) {
            int rs = prog_symbol(b, ac);
            if (rs < 0) {
                return BITS_STOP;
            }
            int r = rs >> 4, s = rs & 15;
            if (s) {
                k += r;
                int32_t value = bits_get(b, s);
                if (k > 63 || value < 0) {
                    return BITS_STOP;
                }
                int16_t stored = (int16_t)(int32_t)((uint32_t)huff_extend(value, s) << sh->al);
                coef[UN_ZIGZAG[k]] = stored;
                *nonzero |= (uint64_t)(stored != 0) << k;
            } else if (r == 15) {
                k += 15;
            } else {
                int32_t extra = bits_get(b, r);
                if (extra < 0) {
                    return BITS_STOP;
                }
                *eobrun = (1 << r) + extra - 1;
                break;
            }
        }
        return BITS_OK;
    }
    /* AC refinement (jdphuff.c decode_mcu_AC_refine) */
    int16_t p1 = (int16_t)(1 << sh->al), m1 = (int16_t)(-1 * (1 << sh->al));
    int k = sh->ss;
    if (*eobrun == 0) {
        for (; k <= sh->se; k++) {
            int rs = prog_symbol(b, ac);
            if (rs < 0) {
                return BITS_STOP;
            }
            int r = rs >> 4, s = rs & 15;
            int16_t value = 0;
            if (s) {
                if (s != 1) {
                    return BITS_STOP;
                }
                int32_t sign = bits_get(b, 1);
                if (sign < 0) {
                    return BITS_STOP;
                }
                value = sign ? p1 : m1;
            } else if (r != 15) {
                int32_t extra = bits_get(b, r);
                if (extra < 0) {
                    return BITS_STOP;
                }
                *eobrun = (1 << r) + extra;
                break;
            }
            do {
                int16_t *c = coef + UN_ZIGZAG[k];
                if ((*nonzero >> k) & 1) { /* the mask, not *c: no load for zeros */
                    int32_t bit = bits_get(b, 1);
                    if (bit < 0) {
                        return BITS_STOP;
                    }
                    if (bit && (*c & p1) == 0) {
                        *c = (int16_t)(*c >= 0 ? *c + p1 : *c + m1);
                    }
                } else if (--r < 0) {
                    break;
                }
                k++;
            } while (k <= sh->se);
            if (s) {
                if (k > 63) {
                    return BITS_STOP;
                }
                coef[UN_ZIGZAG[k]] = value;
                *nonzero |= 1ull << k;
            }
        }
    }
    if (*eobrun > 0) {
        /* only the coefficients already nonzero take a correction bit: walk the mask of
           positions k..se (ascending, as the plain loop would), not all 64 coefficients */
        if (k <= sh->se) {
            uint64_t band = (sh->se == 63 ? ~0ull : ((1ull << (sh->se + 1)) - 1)) & (~0ull << k);
            uint64_t todo = *nonzero & band;
            while (todo) {
                int at = __builtin_ctzll(todo);
                todo &= todo - 1;
                int16_t *c = coef + UN_ZIGZAG[at];
                int32_t bit = bits_get(b, 1);
                if (bit < 0) {
                    return BITS_STOP;
                }
                if (bit && (*c & p1) == 0) {
                    *c = (int16_t)(*c >= 0 ? *c + p1 : *c + m1);
                }
            }
        }
        (*eobrun)--;
    }
    return BITS_OK;
}

/* Decode every scan into coefs[c] ((grid_rows, grid_cols, 64) int16, zeroed). */
static int progressive_run(Progressive *pg, const uint8_t *d, size_t n, int16_t **coefs,
                           int16_t **dcs, uint64_t **masks) {
    size_t at = pg->after_frame;
    for (;;) {
        /* segments up to the next SOS, or EOI */
        if (at + 2 > n || d[at] != 0xFF) {
            return RUN_OUTSIDE;
        }
        int code = d[at + 1];
        if (code == 0xD9) {
            return RUN_DONE;
        }
        if (at + 4 > n) {
            return RUN_OUTSIDE;
        }
        size_t length = (size_t)be16(d + at + 2);
        if (length < 2 || at + 2 + length > n) {
            return RUN_OUTSIDE;
        }
        const uint8_t *body = d + at + 4;
        size_t size = length - 2;
        at += 2 + length;
        if (code != 0xDA) {
            if (parse_tables(&pg->t, code, body, size, 1) != PARSE_OK) {
                return RUN_OUTSIDE;
            }
            continue;
        }
        ScanHeader sh;
        sh.comps = size >= 1 ? body[0] : 0;
        if (sh.comps < 1 || sh.comps > 4 || size != 4 + 2 * (size_t)sh.comps) {
            return RUN_OUTSIDE;
        }
        int last = -1;
        for (int i = 0; i < sh.comps; i++) {
            int found = -1;
            for (int c = 0; c < pg->f.count; c++) {
                found = pg->f.ident[c] == body[1 + 2 * i] ? c : found;
            }
            if (found <= last) {
                return RUN_OUTSIDE; /* unknown, repeated or out of frame order */
            }
            last = found;
            sh.ci[i] = found;
            sh.td[i] = body[2 + 2 * i] >> 4;
            sh.ta[i] = body[2 + 2 * i] & 15;
        }
        sh.ss = body[1 + 2 * sh.comps];
        sh.se = body[2 + 2 * sh.comps];
        sh.ah = body[3 + 2 * sh.comps] >> 4;
        sh.al = body[3 + 2 * sh.comps] & 15;
        if (sh.al > 13 || sh.se > 63 || sh.ss > sh.se || (sh.ss == 0 && sh.se != 0)
            || (sh.ss > 0 && sh.comps != 1)) {
            return RUN_OUTSIDE;
        }
        for (int i = 0; i < sh.comps; i++) {
            if (sh.td[i] > 3 || sh.ta[i] > 3
                || (sh.ss == 0 && sh.ah == 0 && !pg->t.dc[sh.td[i]].defined)
                || (sh.ss > 0 && !pg->t.ac[sh.ta[i]].defined)) {
                return RUN_OUTSIDE;
            }
        }
        Bits b = {.data = d, .size = n, .pos = at, .marker = -1};
        int32_t dc_pred[4] = {0, 0, 0, 0};
        int32_t eobrun = 0;
        int interval = pg->t.restart_interval, todo = interval;
        int interleaved = sh.comps > 1;
        size_t rows, cols;
        if (interleaved) {
            rows = pg->mcu_rows;
            cols = pg->mcu_cols;
        } else {
            rows = pg->coded_rows[sh.ci[0]];
            cols = pg->coded_cols[sh.ci[0]];
        }
        for (size_t row = 0; row < rows; row++) {
            for (size_t col = 0; col < cols; col++) {
                if (interleaved) {
                    for (int i = 0; i < sh.comps; i++) {
                        int c = sh.ci[i];
                        for (int y = 0; y < pg->f.v[c]; y++) {
                            for (int x = 0; x < pg->f.h[c]; x++) {
                                size_t by = row * pg->f.v[c] + y, bx = col * pg->f.h[c] + x;
                                size_t at_block = by * pg->grid_cols[c] + bx;
                                if (prog_block(&b, pg, &sh, i, coefs[c] + at_block * 64,
                                               dcs[c] + at_block, masks[c] + at_block, &eobrun,
                                               &dc_pred[c])
                                    != BITS_OK) {
                                    return RUN_OUTSIDE;
                                }
                            }
                        }
                    }
                } else {
                    int c = sh.ci[0];
                    size_t at_block = row * pg->grid_cols[c] + col;
                    if (prog_block(&b, pg, &sh, 0, coefs[c] + at_block * 64, dcs[c] + at_block,
                                   masks[c] + at_block, &eobrun, &dc_pred[c])
                        != BITS_OK) {
                        return RUN_OUTSIDE;
                    }
                }
                if (interval && --todo == 0 && !(row == rows - 1 && col == cols - 1)) {
                    /* the next bytes must be an RSTn marker */
                    if (b.marker < 0) {
                        b.marker = bits_next_marker(&b);
                    }
                    if (!(b.marker >= 0xD0 && b.marker <= 0xD7)) {
                        return RUN_OUTSIDE;
                    }
                    b.acc = 0;
                    b.bits = 0;
                    b.marker = -1;
                    dc_pred[0] = dc_pred[1] = dc_pred[2] = dc_pred[3] = 0;
                    eobrun = 0;
                    todo = interval;
                }
            }
        }
        if (eobrun > 0) {
            return RUN_OUTSIDE; /* an EOB run past the end of the scan */
        }
        /* the scan ends at the next marker: find it, point `at` at its 0xFF */
        if (b.marker < 0) {
            b.marker = bits_next_marker(&b);
        }
        if (b.marker < 0 || (b.marker >= 0xD0 && b.marker <= 0xD7)) {
            return RUN_OUTSIDE;
        }
        at = b.pos - 2;
        while (at > 0 && d[at] != 0xFF) {
            at--;
        }
    }
}

/* decode_progressive(data, max_memory) -> None (outside the model) or
   (width, height, [(h, v, rows, cols, bytearray, b"")], None) */
static PyObject *decode_progressive(PyObject *self, PyObject *args) {
    Py_buffer data;
    long long max_memory;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*L", &data, &max_memory)) {
        return NULL;
    }
    max_memory = max_memory < 0 ? 0 : max_memory;
    PyObject *result = NULL;
    PyObject *buffers[4] = {NULL, NULL, NULL, NULL};
    uint8_t *planes[4] = {NULL, NULL, NULL, NULL};
    int16_t *coefs[4] = {NULL, NULL, NULL, NULL};
    uint64_t *masks[4] = {NULL, NULL, NULL, NULL}; /* per block: zig-zag positions != 0 */
    int16_t *dcs[4] = {NULL, NULL, NULL, NULL};     /* per block: DC, kept apart (dense) */
    Progressive *pg = PyMem_Calloc(1, sizeof(Progressive));
    if (pg == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = progressive_parse(pg, data.buf, (size_t)data.len);
    Py_END_ALLOW_THREADS
    if (status != PARSE_OK) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    size_t needed = 0;
    for (int c = 0; c < pg->f.count; c++) {
        size_t samples = pg->plane_rows[c] * pg->plane_cols[c];
        needed += samples * 3 + samples / 64 * 10; /* plane, int16 coefficients, mask + DC */
    }
    if (needed > (size_t)max_memory) {
        PyErr_Format(MemoryLimit, "decoding needs %zu MB, limit %lld MB", needed >> 20,
                     max_memory >> 20);
        goto done;
    }
    for (int c = 0; c < pg->f.count; c++) {
        size_t samples = pg->plane_rows[c] * pg->plane_cols[c];
        buffers[c] = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)samples);
        coefs[c] = PyMem_RawCalloc(samples, sizeof(int16_t));
        masks[c] = PyMem_RawCalloc(samples / 64, sizeof(uint64_t));
        dcs[c] = PyMem_RawCalloc(samples / 64, sizeof(int16_t));
        if (buffers[c] == NULL || coefs[c] == NULL || masks[c] == NULL || dcs[c] == NULL) {
            if (buffers[c] != NULL) {
                PyErr_NoMemory();
            }
            goto done;
        }
        planes[c] = (uint8_t *)PyByteArray_AS_STRING(buffers[c]);
    }
    Py_BEGIN_ALLOW_THREADS
    status = progressive_run(pg, data.buf, (size_t)data.len, coefs, dcs, masks);
    if (status == RUN_DONE) {
        for (int c = 0; c < pg->f.count; c++) {
            const int32_t *q = pg->t.quant[pg->f.tq[c]];
            for (size_t by = 0; by < pg->grid_rows[c]; by++) {
                for (size_t bx = 0; bx < pg->grid_cols[c]; bx++) {
                    size_t at_block = by * pg->grid_cols[c] + bx;
                    const int16_t *coef = coefs[c] + at_block * 64;
                    int32_t block[64];
                    block[0] = (int32_t)dcs[c][at_block] * q[0];
                    for (int i = 1; i < 64; i++) {
                        block[i] = (int32_t)coef[i] * q[i];
                    }
                    idct_dequantised(block, planes[c] + by * 8 * pg->plane_cols[c] + bx * 8,
                                     pg->plane_cols[c]);
                }
            }
        }
    }
    Py_END_ALLOW_THREADS
    if (status != RUN_DONE || !pg->t.quant_defined[pg->f.tq[0]]) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    for (int c = 0; c < pg->f.count; c++) {
        if (!pg->t.quant_defined[pg->f.tq[c]]) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    PyObject *list = PyList_New(pg->f.count);
    if (list == NULL) {
        goto done;
    }
    for (int c = 0; c < pg->f.count; c++) {
        PyObject *item = Py_BuildValue("(iinnOy#)", pg->f.h[c], pg->f.v[c],
                                       (Py_ssize_t)pg->plane_rows[c],
                                       (Py_ssize_t)pg->plane_cols[c], buffers[c], "",
                                       (Py_ssize_t)0);
        if (item == NULL) {
            Py_DECREF(list);
            goto done;
        }
        PyList_SET_ITEM(list, c, item);
    }
    result = Py_BuildValue("(iiNO)", pg->f.width, pg->f.height, list, Py_None);
done:
    for (int c = 0; c < 4; c++) {
        Py_XDECREF(buffers[c]);
        PyMem_RawFree(coefs[c]);
        PyMem_RawFree(masks[c]);
        PyMem_RawFree(dcs[c]);
    }
    PyMem_Free(pg);
    PyBuffer_Release(&data);
    return result;
}

/* ------------------------------------------------------------------ upsampling + colour */

enum { MODEL_LUMA = 0, MODEL_YCBCR = 1, MODEL_RGB = 2, MODEL_CMYK = 3, MODEL_YCCK = 4 };
enum { WANT_GRAY = 0, WANT_RGB = 1 };

/* to_luma8: (c as f32 * (1/255)) * k per channel, the same f32 operations as image-rs. */
static float luma_scale, luma_kr, luma_kg, luma_kb;

static float f32_from_bits(uint32_t bits) {
    float f;
    memcpy(&f, &bits, sizeof(f));
    return f;
}

static void init_luma_tables(void) {
    luma_kr = f32_from_bits(0x3e59c05bu);
    luma_kg = f32_from_bits(0x3f3715fcu);
    luma_kb = f32_from_bits(0x3d93cf75u);
    volatile float one = 1.0f, top = 255.0f;
    luma_scale = one / top;
}

/* Arithmetic, not table lookups, so that the compiler can vectorise it; every operation is a
   plain IEEE f32 multiply or add (no FMA: -ffp-contract=off), as in image-rs. */
static inline uint8_t luma8(int r, int g, int b) {
    float total = (((float)r * luma_scale) * luma_kr + ((float)g * luma_scale) * luma_kg)
                  + ((float)b * luma_scale) * luma_kb;
    total = total * 255.0f;
    total = total + 0.5f; /* round half away from zero (total >= 0): truncation below */
    int value = (int)total;
    return (uint8_t)(value > 255 ? 255 : value);
}

typedef struct {
    const uint8_t *plane;
    size_t rows, cols;  /* padded plane size */
    int rh, rv;         /* upsampling ratio (horizontal, vertical) */
    int triangle;
} Source;

#define SCALAR_FALLBACK_BELOW 18

/* Row y of the plane upsampled to `width` samples into out (uses tmp of 2*cols+2). */
static void upsample_row(const Source *s, size_t y, size_t width, uint8_t *out, uint8_t *tmp) {
    const uint8_t *row;
    size_t n = s->cols;
    if (s->rv == 1) {
        row = s->plane + y * n;
    } else if (s->triangle) {
        size_t source = y >> 1, last = s->rows - 1;
        size_t near = source;
        size_t far = (y & 1) ? (source + 1 < last ? source + 1 : last)
                             : (source > 0 ? source - 1 : 0);
        const uint8_t *a = s->plane + near * n, *b = s->plane + far * n;
        for (size_t x = 0; x < n; x++) {
            tmp[x] = (uint8_t)((3 * a[x] + b[x] + 2) >> 2);
        }
        row = tmp;
    } else {
        size_t source = y / (size_t)s->rv;
        if (source >= s->rows) {
            source = s->rows - 1;
        }
        row = s->plane + source * n;
    }
    if (s->rh == 1) {
        memcpy(out, row, width);
        return;
    }
    if (!s->triangle) {
        for (size_t x = 0; x < width; x++) {
            size_t source = x / (size_t)s->rh;
            out[x] = row[source < n ? source : n - 1];
        }
        return;
    }
    /* out[0] = r[0]; out[2i] = (3 r[i] + r[i-1] + 2) >> 2; out[2i+1] = (3 r[i] + r[i+1] + 2) >> 2;
       out[2n-1] = r[n-1]; rows under 18 samples: zune's scalar fallback quirk at 2n-2.
       Even and odd outputs are computed into two runs, then interleaved (vectorises well). */
    uint8_t *even = tmp + n, *odd = tmp + 2 * n;
    even[0] = row[0];
    for (size_t i = 1; i < n; i++) {
        even[i] = (uint8_t)((3 * row[i] + row[i - 1] + 2) >> 2);
    }
    for (size_t i = 0; i + 1 < n; i++) {
        odd[i] = (uint8_t)((3 * row[i] + row[i + 1] + 2) >> 2);
    }
    odd[n - 1] = row[n - 1];
    if (n < SCALAR_FALLBACK_BELOW && n >= 2) {
        even[n - 1] = (uint8_t)((3 * row[n - 2] + row[n - 1] + 2) >> 2);
    }
    size_t pairs = width / 2;
    for (size_t i = 0; i < pairs; i++) {
        out[2 * i] = even[i];
        out[2 * i + 1] = odd[i];
    }
    if (width & 1) {
        out[width - 1] = even[pairs];
    }
}

static inline uint8_t blinn(int a, int k) {
    int t = a * k + 128;
    return (uint8_t)((t + (t >> 8)) >> 8);
}

static inline void ycbcr(int y, int cb, int cr, uint8_t *rgb) {
    int r = y + ((8191 + (cr - 128) * 22970) >> 14);
    int g = y + ((8191 + (cb - 128) * -5638 + (cr - 128) * -11700) >> 14);
    int b = y + ((8191 + (cb - 128) * 29032) >> 14);
    rgb[0] = clamp_u8(r);
    rgb[1] = clamp_u8(g);
    rgb[2] = clamp_u8(b);
}

static inline int ycc_r(int y, int cr) {
    return y + ((8191 + (cr - 128) * 22970) >> 14);
}
static inline int ycc_g(int y, int cb, int cr) {
    return y + ((8191 + (cb - 128) * -5638 + (cr - 128) * -11700) >> 14);
}
static inline int ycc_b(int y, int cb) {
    return y + ((8191 + (cb - 128) * 29032) >> 14);
}

static inline int32_t clamp255(int32_t v) {
    v = v < 0 ? 0 : v;
    return v > 255 ? 255 : v;
}

/* The hot loop of a colour photo: YCbCr -> RGB (zune) -> to_luma8 (image-rs), written so
   that the compiler vectorises it (int32 lanes, then f32 lanes; the same IEEE operations, so
   the same results: no FMA in either clone, -ffp-contract=off). */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void ycbcr_to_gray(const uint8_t *l0, const uint8_t *l1, const uint8_t *l2, size_t width,
                          uint8_t *dst) {
    const float s = luma_scale, kr = luma_kr, kg = luma_kg, kb = luma_kb;
    for (size_t x = 0; x < width; x++) {
        int32_t y = l0[x], cb = (int32_t)l1[x] - 128, cr = (int32_t)l2[x] - 128;
        int32_t r = clamp255(y + ((8191 + cr * 22970) >> 14));
        int32_t g = clamp255(y + ((8191 + cb * -5638 + cr * -11700) >> 14));
        int32_t b = clamp255(y + ((8191 + cb * 29032) >> 14));
        float total = (((float)r * s) * kr + ((float)g * s) * kg) + ((float)b * s) * kb;
        total = total * 255.0f;
        total = total + 0.5f;
        int32_t value = (int32_t)total;
        dst[x] = (uint8_t)(value > 255 ? 255 : value);
    }
}

/* ycbcr_to_gray, plus PDQ's float luma of the same RGB pixels (pdq_luma in pdqcore.h). */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void ycbcr_to_gray_pdq(const uint8_t *l0, const uint8_t *l1, const uint8_t *l2,
                              size_t width, uint8_t *dst, float *luma) {
    const float s = luma_scale, kr = luma_kr, kg = luma_kg, kb = luma_kb;
    for (size_t x = 0; x < width; x++) {
        int32_t y = l0[x], cb = (int32_t)l1[x] - 128, cr = (int32_t)l2[x] - 128;
        int32_t r = clamp255(y + ((8191 + cr * 22970) >> 14));
        int32_t g = clamp255(y + ((8191 + cb * -5638 + cr * -11700) >> 14));
        int32_t b = clamp255(y + ((8191 + cb * 29032) >> 14));
        float total = (((float)r * s) * kr + ((float)g * s) * kg) + ((float)b * s) * kb;
        total = total * 255.0f;
        total = total + 0.5f;
        int32_t value = (int32_t)total;
        dst[x] = (uint8_t)(value > 255 ? 255 : value);
        luma[x] = pdq_luma(r, g, b);
    }
}

/* One output row from upsampled component lines, one tight loop per model and output. */
static void convert_row(int model, int want, const uint8_t *const *l, size_t width, uint8_t *dst) {
    const uint8_t *l0 = l[0], *l1 = l[1], *l2 = l[2], *l3 = l[3];
    if (want == WANT_GRAY) {
        switch (model) {
        case MODEL_LUMA:
            memcpy(dst, l0, width);
            return;
        case MODEL_YCBCR:
            ycbcr_to_gray(l0, l1, l2, width, dst);
            return;
        default:
            break;
        }
    }
    for (size_t x = 0; x < width; x++) {
        uint8_t r, g, b;
        switch (model) {
        case MODEL_LUMA:
            r = g = b = l0[x];
            break;
        case MODEL_RGB:
            r = l0[x];
            g = l1[x];
            b = l2[x];
            break;
        case MODEL_CMYK:
            r = blinn(l0[x], l3[x]);
            g = blinn(l1[x], l3[x]);
            b = blinn(l2[x], l3[x]);
            break;
        case MODEL_YCCK:
            r = blinn(255 - clamp_u8(ycc_r(l0[x], l2[x])), l3[x]);
            g = blinn(255 - clamp_u8(ycc_g(l0[x], l1[x], l2[x])), l3[x]);
            b = blinn(255 - clamp_u8(ycc_b(l0[x], l1[x])), l3[x]);
            break;
        default:
            r = clamp_u8(ycc_r(l0[x], l2[x]));
            g = clamp_u8(ycc_g(l0[x], l1[x], l2[x]));
            b = clamp_u8(ycc_b(l0[x], l1[x]));
            break;
        }
        if (want == WANT_GRAY) {
            dst[x] = luma8(r, g, b);
        } else {
            dst[3 * x] = r;
            dst[3 * x + 1] = g;
            dst[3 * x + 2] = b;
        }
    }
}

/* Assemble rows [0, height) into out (gray: width bytes a row; rgb: 3 * width). With a PDQ
   stream (want gray), every row also goes into it as RGB, rows from fill_row on as grey 128
   (where a damaged file stopped: what the Python side fills the gray image with). */
static int assemble_rows(const Source *src, int count, int model, int want, size_t width,
                         size_t height, uint8_t *out, PdqStream *pdq, size_t fill_row) {
    size_t widest = 0;
    for (int c = 0; c < count; c++) {
        widest = src[c].cols > widest ? src[c].cols : widest;
    }
    size_t row_len = width > 2 * widest ? width : 2 * widest;
    size_t rgb_len = pdq != NULL ? 3 * width : 0;
    uint8_t *scratch = malloc((size_t)count * row_len + 3 * widest + 16 + rgb_len);
    if (scratch == NULL) {
        return -1;
    }
    const uint8_t *lines[4] = {NULL, NULL, NULL, NULL};
    uint8_t *tmp = scratch + (size_t)count * row_len;
    uint8_t *rgb = tmp + 3 * widest + 16;
    for (size_t y = 0; y < height; y++) {
        uint8_t *dst = out + y * width * (want == WANT_RGB ? 3 : 1);
        if (pdq != NULL && y >= fill_row) {
            memset(dst, 128, width);
            memset(rgb, 128, 3 * width);
            pdq_push_rgb(pdq, rgb);
            continue;
        }
        for (int c = 0; c < count; c++) {
            if (src[c].rh == 1 && src[c].rv == 1) {
                lines[c] = src[c].plane + y * src[c].cols; /* no copy needed */
            } else {
                uint8_t *line = scratch + (size_t)c * row_len;
                upsample_row(&src[c], y, width, line, tmp);
                lines[c] = line;
            }
        }
        if (pdq == NULL) {
            convert_row(model, want, lines, width, dst);
        } else if (model == MODEL_YCBCR && pdq_row_slots(pdq) != NULL) {
            ycbcr_to_gray_pdq(lines[0], lines[1], lines[2], width, dst, pdq_row_slots(pdq));
            pdq_commit_row(pdq);
        } else {
            convert_row(model, WANT_RGB, lines, width, rgb);
            if (model == MODEL_LUMA) {
                memcpy(dst, lines[0], width); /* as convert_row's gray output */
            } else {
                for (size_t x = 0; x < width; x++) {
                    dst[x] = luma8(rgb[3 * x], rgb[3 * x + 1], rgb[3 * x + 2]);
                }
            }
            pdq_push_rgb(pdq, rgb);
        }
    }
    free(scratch);
    return 0;
}

/* The planes argument of assemble and assemble_pdq: [(buffer, rows, cols, rh, rv)]. Returns
   the number of buffers held in views (to release), or -1 with an exception set. */
static int parse_planes(PyObject *planes, Py_ssize_t width, Py_ssize_t height, int model,
                        Py_buffer *views, Source *src) {
    Py_ssize_t count = PyList_GET_SIZE(planes);
    int expected = model == MODEL_LUMA ? 1 : (model == MODEL_CMYK || model == MODEL_YCCK) ? 4 : 3;
    if (count != expected || width <= 0 || height <= 0) {
        PyErr_SetString(PyExc_ValueError, "assemble: bad plane count or size");
        return -1;
    }
    int held = 0;
    for (Py_ssize_t c = 0; c < count; c++) {
        PyObject *item = PyList_GET_ITEM(planes, c);
        PyObject *buffer;
        Py_ssize_t rows, cols;
        int rh, rv;
        if (!PyArg_ParseTuple(item, "Onnii", &buffer, &rows, &cols, &rh, &rv)) {
            goto fail;
        }
        if (PyObject_GetBuffer(buffer, &views[c], PyBUF_C_CONTIGUOUS) != 0) {
            goto fail;
        }
        held++;
        if (rows <= 0 || cols <= 0 || rh < 1 || rv < 1 || views[c].len != rows * cols
            || (size_t)cols * rh < (size_t)width || (size_t)rows * rv < (size_t)height) {
            PyErr_SetString(PyExc_ValueError, "assemble: plane smaller than the image");
            goto fail;
        }
        src[c].plane = views[c].buf;
        src[c].rows = (size_t)rows;
        src[c].cols = (size_t)cols;
        src[c].rh = rh;
        src[c].rv = rv;
        src[c].triangle = (rh == 2 && rv == 1) || (rh == 1 && rv == 2) || (rh == 2 && rv == 2);
    }
    return held;
fail:
    for (int c = 0; c < held; c++) {
        PyBuffer_Release(&views[c]);
    }
    return -1;
}

/* assemble(planes: [(buffer, rows, cols, rh, rv)], width, height, model, want) -> bytearray */
static PyObject *assemble(PyObject *self, PyObject *args) {
    PyObject *planes;
    Py_ssize_t width, height;
    int model, want;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nnii", &PyList_Type, &planes, &width, &height, &model,
                          &want)) {
        return NULL;
    }
    if (want != WANT_GRAY && want != WANT_RGB) {
        PyErr_SetString(PyExc_ValueError, "assemble: bad output kind");
        return NULL;
    }
    Py_buffer views[4];
    Source src[4];
    int held = parse_planes(planes, width, height, model, views, src);
    if (held < 0) {
        return NULL;
    }
    size_t bytes = (size_t)width * (size_t)height * (want == WANT_RGB ? 3 : 1);
    PyObject *result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)bytes);
    if (result != NULL) {
        uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(result);
        int status;
        Py_BEGIN_ALLOW_THREADS
        status = assemble_rows(src, held, model, want, (size_t)width, (size_t)height, out, NULL,
                               (size_t)height);
        Py_END_ALLOW_THREADS
        if (status != 0) {
            Py_CLEAR(result);
            PyErr_NoMemory();
        }
    }
    for (int c = 0; c < held; c++) {
        PyBuffer_Release(&views[c]);
    }
    return result;
}

/* assemble_pdq(planes, width, height, model, fill_row) -> (gray bytearray, 32 bytes, quality):
   the gray image of assemble(..., WANT_GRAY) and pdq_rgb of the RGB image, in one pass with
   no RGB image in memory; rows from fill_row on are grey 128. */
static PyObject *assemble_pdq(PyObject *self, PyObject *args) {
    PyObject *planes;
    Py_ssize_t width, height, fill_row;
    int model;
    (void)self;
    if (!PyArg_ParseTuple(args, "O!nnin", &PyList_Type, &planes, &width, &height, &model,
                          &fill_row)) {
        return NULL;
    }
    Py_buffer views[4];
    Source src[4];
    int held = parse_planes(planes, width, height, model, views, src);
    if (held < 0) {
        return NULL;
    }
    PyObject *gray = NULL, *result = NULL;
    PdqStream *pdq = pdq_open((size_t)width, (size_t)height);
    if (pdq == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    gray = PyByteArray_FromStringAndSize(NULL, width * height);
    if (gray == NULL) {
        pdq_close(pdq);
        goto done;
    }
    uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(gray);
    uint8_t hash[32];
    int quality = 0, status;
    size_t fill = fill_row < 0 ? 0 : (size_t)fill_row;
    Py_BEGIN_ALLOW_THREADS
    status = assemble_rows(src, held, model, WANT_GRAY, (size_t)width, (size_t)height, out, pdq,
                           fill);
    if (status == 0) {
        pdq_finish(pdq, hash, &quality);
    } else {
        pdq_close(pdq);
    }
    Py_END_ALLOW_THREADS
    if (status != 0) {
        PyErr_NoMemory();
        goto done;
    }
    result = Py_BuildValue("Oy#i", gray, (const char *)hash, (Py_ssize_t)32, quality);
done:
    Py_XDECREF(gray);
    for (int c = 0; c < held; c++) {
        PyBuffer_Release(&views[c]);
    }
    return result;
}

/* idct(dequantised int32 blocks, n*64 in natural order) -> bytearray of n 8x8 blocks. */
static PyObject *idct(PyObject *self, PyObject *args) {
    Py_buffer view;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &view)) {
        return NULL;
    }
    if (view.len % (64 * (Py_ssize_t)sizeof(int32_t))) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "idct: need whole blocks of 64 int32");
        return NULL;
    }
    Py_ssize_t blocks = view.len / (64 * (Py_ssize_t)sizeof(int32_t));
    PyObject *result = PyByteArray_FromStringAndSize(NULL, blocks * 64);
    if (result != NULL) {
        uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(result);
        const int32_t *d = view.buf;
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < blocks; i++) {
            idct_dequantised(d + 64 * i, out + 64 * i, 8);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return result;
}

/* luma(rgb buffer (n*3 bytes)) -> bytearray of n: to_luma8 of 8-bit RGB. */
static PyObject *luma(PyObject *self, PyObject *args) {
    Py_buffer view;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*", &view)) {
        return NULL;
    }
    if (view.len % 3) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "luma: length is not a multiple of 3");
        return NULL;
    }
    Py_ssize_t n = view.len / 3;
    PyObject *result = PyByteArray_FromStringAndSize(NULL, n);
    if (result != NULL) {
        const uint8_t *rgb = view.buf;
        uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(result);
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            out[i] = luma8(rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]);
        }
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&view);
    return result;
}

/* ------------------------------------------------------------------ Lanczos3 resize */

static const float PI_F32 = 3.14159265358979323846f;

static float sinc(float t) {
    if (t == 0.0f) {
        return 1.0f;
    }
    float a = t * PI_F32;
    return sinf(a) / a;
}

static float lanczos3(float x) {
    if (fabsf(x) < 3.0f) {
        return sinc(x) * sinc(x / 3.0f);
    }
    return 0.0f;
}

typedef struct {
    size_t left, count;
    float *weights; /* count normalised weights */
} Taps;

/* image-rs sample.rs weights of each output position; one malloc'd block, or NULL. */
static float *make_taps(size_t n, size_t out, Taps *taps) {
    float ratio = (float)n / (float)out;
    float sratio = ratio < 1.0f ? 1.0f : ratio;
    float support = 3.0f * sratio;
    size_t total = 0;
    for (size_t o = 0; o < out; o++) {
        float centre = ((float)o + 0.5f) * ratio;
        double lo = floor((double)(centre - support)), hi = ceil((double)(centre + support));
        long long left = (long long)lo, right = (long long)hi;
        if (left < 0) left = 0;
        if (left > (long long)n - 1) left = (long long)n - 1;
        if (right < left + 1) right = left + 1;
        if (right > (long long)n) right = (long long)n;
        taps[o].left = (size_t)left;
        taps[o].count = (size_t)(right - left);
        total += taps[o].count;
    }
    float *block = malloc(total * sizeof(float) + 1);
    if (block == NULL) {
        return NULL;
    }
    float *next = block;
    for (size_t o = 0; o < out; o++) {
        float centre = ((float)o + 0.5f) * ratio - 0.5f;
        float sum = 0.0f;
        taps[o].weights = next;
        for (size_t i = 0; i < taps[o].count; i++) {
            float w = lanczos3(((float)(taps[o].left + i) - centre) / sratio);
            next[i] = w;
            sum += w;
        }
        for (size_t i = 0; i < taps[o].count; i++) {
            next[i] /= sum;
        }
        next += taps[o].count;
    }
    return block;
}

/* acc[x] += row[x] * weight for every column: each lane is one of Rust's sequential sums. */
#if defined(__GNUC__) && defined(__x86_64__) && defined(__GLIBC__) && !defined(__clang__)
__attribute__((target_clones("avx2", "default")))
#endif
static void accumulate_row(float *restrict acc, const uint8_t *restrict row, size_t w,
                           float weight) {
    for (size_t x = 0; x < w; x++) {
        acc[x] = acc[x] + (float)row[x] * weight;
    }
}

/* imageops::resize(gray, out_w, out_h, Lanczos3): vertical pass into f32, then horizontal. */
static int resize_u8(const uint8_t *src, size_t w, size_t h, size_t out_w, size_t out_h,
                     uint8_t *dst) {
    if (w == out_w && h == out_h) {
        memcpy(dst, src, w * h);
        return 0;
    }
    int status = -1;
    Taps *vt = malloc(out_h * sizeof(Taps)), *ht = malloc(out_w * sizeof(Taps));
    float *vw = NULL, *hw = NULL, *mid = malloc(out_h * w * sizeof(float));
    if (vt == NULL || ht == NULL || mid == NULL) goto done;
    vw = make_taps(h, out_h, vt);
    hw = make_taps(w, out_w, ht);
    if (vw == NULL || hw == NULL) goto done;
    for (size_t o = 0; o < out_h; o++) {
        float *acc = mid + o * w;
        for (size_t x = 0; x < w; x++) acc[x] = 0.0f;
        for (size_t i = 0; i < vt[o].count; i++) {
            accumulate_row(acc, src + (vt[o].left + i) * w, w, vt[o].weights[i]);
        }
    }
    for (size_t y = 0; y < out_h; y++) {
        const float *row = mid + y * w;
        for (size_t o = 0; o < out_w; o++) {
            float t = 0.0f;
            const float *weights = ht[o].weights;
            const float *values = row + ht[o].left;
            for (size_t i = 0; i < ht[o].count; i++) {
                t = t + values[i] * weights[i];
            }
            t = t < 0.0f ? 0.0f : (t > 255.0f ? 255.0f : t);
            dst[y * out_w + o] = (uint8_t)roundf(t);
        }
    }
    status = 0;
done:
    free(vt);
    free(ht);
    free(vw);
    free(hw);
    free(mid);
    return status;
}

static int gray_view(PyObject *args, Py_buffer *view, Py_ssize_t *w, Py_ssize_t *h,
                     Py_ssize_t *ow, Py_ssize_t *oh, int sized) {
    int ok = sized ? PyArg_ParseTuple(args, "y*nnnn", view, w, h, ow, oh)
                   : PyArg_ParseTuple(args, "y*nn", view, w, h);
    if (!ok) {
        return -1;
    }
    if (*w <= 0 || *h <= 0 || view->len != *w * *h || (sized && (*ow <= 0 || *oh <= 0))) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "need a non-empty width x height gray buffer");
        return -1;
    }
    return 0;
}

/* resize_gray(buffer, width, height, out_width, out_height) -> bytearray */
static PyObject *resize_gray(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t w, h, ow, oh;
    (void)self;
    if (gray_view(args, &view, &w, &h, &ow, &oh, 1) != 0) {
        return NULL;
    }
    PyObject *result = PyByteArray_FromStringAndSize(NULL, ow * oh);
    if (result != NULL) {
        int status;
        uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(result);
        Py_BEGIN_ALLOW_THREADS
        status = resize_u8(view.buf, (size_t)w, (size_t)h, (size_t)ow, (size_t)oh, out);
        Py_END_ALLOW_THREADS
        if (status != 0) {
            Py_CLEAR(result);
            PyErr_NoMemory();
        }
    }
    PyBuffer_Release(&view);
    return result;
}

/* mean_hash(buffer, width, height) -> int: image_hasher Mean 8x8, LsbFirst, as an int. */
static PyObject *mean_hash(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t w, h;
    uint8_t small[64];
    int status;
    (void)self;
    if (gray_view(args, &view, &w, &h, NULL, NULL, 0) != 0) {
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS
    status = resize_u8(view.buf, (size_t)w, (size_t)h, 8, 8, small);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    if (status != 0) {
        return PyErr_NoMemory();
    }
    unsigned sum = 0;
    for (int i = 0; i < 64; i++) sum += small[i];
    unsigned mean = sum / 64;
    unsigned long long value = 0;
    for (int row = 0; row < 8; row++) {
        unsigned byte = 0;
        for (int col = 0; col < 8; col++) {
            byte |= (unsigned)(small[row * 8 + col] >= mean) << col;
        }
        value = (value << 8) | byte;
    }
    return PyLong_FromUnsignedLongLong(value);
}

/* ------------------------------------------------------------------ module */

/* pdq_rgb(rgb, width, height) -> (32 bytes, quality): pdqhash.compute's PDQ of RGB8 pixels. */
static PyObject *pdq_rgb(PyObject *self, PyObject *args) {
    Py_buffer view;
    Py_ssize_t width, height;
    (void)self;
    if (!PyArg_ParseTuple(args, "y*nn", &view, &width, &height)) {
        return NULL;
    }
    if (width <= 0 || height <= 0 || width > PY_SSIZE_T_MAX / 3 / height
        || view.len != width * height * 3) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "pdq_rgb: need width * height * 3 bytes of RGB8");
        return NULL;
    }
    PdqStream *stream = pdq_open((size_t)width, (size_t)height);
    if (stream == NULL) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    uint8_t hash[32];
    int quality;
    const uint8_t *rgb = view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t y = 0; y < height; y++) {
        pdq_push_rgb(stream, rgb + (size_t)y * (size_t)width * 3);
    }
    pdq_finish(stream, hash, &quality);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&view);
    return Py_BuildValue("y#i", (const char *)hash, (Py_ssize_t)32, quality);
}

/* pdq_stream_bytes(width, height) -> what a PDQ stream for that image allocates */
static PyObject *pdq_stream_bytes_py(PyObject *self, PyObject *args) {
    Py_ssize_t width, height;
    (void)self;
    if (!PyArg_ParseTuple(args, "nn", &width, &height)) {
        return NULL;
    }
    if (width < 0 || height < 0) {
        PyErr_SetString(PyExc_ValueError, "pdq_stream_bytes: negative size");
        return NULL;
    }
    return PyLong_FromSize_t(pdq_stream_bytes((size_t)width, (size_t)height));
}

static PyMethodDef methods[] = {
    {"decode_planes", decode_planes, METH_VARARGS,
     "decode_planes(data, max_memory, mode=0) -> (width, height, components, corrupt)"},
    {"decode_baseline", decode_baseline, METH_VARARGS,
     "decode_baseline(data, max_memory) -> None or (width, height, components, stop)"},
    {"decode_progressive", decode_progressive, METH_VARARGS,
     "decode_progressive(data, max_memory) -> None or (width, height, components, None)"},
    {"assemble", assemble, METH_VARARGS,
     "assemble(planes, width, height, model, want) -> bytearray"},
    {"assemble_pdq", assemble_pdq, METH_VARARGS,
     "assemble_pdq(planes, width, height, model, fill_row) -> (gray, 32 bytes, quality)"},
    {"luma", luma, METH_VARARGS, "luma(rgb) -> bytearray: image-rs to_luma8 of RGB8"},
    {"idct", idct, METH_VARARGS, "idct(int32 blocks) -> bytearray: zune's IDCT per block"},
    {"resize_gray", resize_gray, METH_VARARGS,
     "resize_gray(gray, width, height, out_width, out_height) -> bytearray"},
    {"mean_hash", mean_hash, METH_VARARGS, "mean_hash(gray, width, height) -> int"},
    {"pdq_stream_bytes", pdq_stream_bytes_py, METH_VARARGS,
     "pdq_stream_bytes(width, height) -> bytes a PDQ stream allocates"},
    {"pdq_rgb", pdq_rgb, METH_VARARGS, "pdq_rgb(rgb, width, height) -> (32 bytes, quality)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "hashcore", "The compiled hashing core (see hashcore.c).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit_hashcore(void) {
    init_luma_tables();
    pdq_init();
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    DecodeError = PyErr_NewException("phash_trio.image.hashcore.JpegLibError", NULL, NULL);
    MemoryLimit = PyErr_NewException("phash_trio.image.hashcore.MemoryLimitError", NULL, NULL);
    if (DecodeError == NULL || MemoryLimit == NULL
        || PyModule_AddObjectRef(m, "JpegLibError", DecodeError) < 0
        || PyModule_AddObjectRef(m, "MemoryLimitError", MemoryLimit) < 0
        || PyModule_AddIntConstant(m, "MODEL_LUMA", MODEL_LUMA) < 0
        || PyModule_AddIntConstant(m, "MODEL_YCBCR", MODEL_YCBCR) < 0
        || PyModule_AddIntConstant(m, "MODEL_RGB", MODEL_RGB) < 0
        || PyModule_AddIntConstant(m, "MODEL_CMYK", MODEL_CMYK) < 0
        || PyModule_AddIntConstant(m, "MODEL_YCCK", MODEL_YCCK) < 0
        || PyModule_AddIntConstant(m, "WANT_GRAY", WANT_GRAY) < 0
        || PyModule_AddIntConstant(m, "WANT_RGB", WANT_RGB) < 0
        || PyModule_AddIntConstant(m, "PDQ_MAX_STREAM_BYTES", (long)PDQ_MAX_STREAM_BYTES) < 0
        || PyModule_AddIntConstant(m, "MODE_PLANES", MODE_PLANES) < 0
        || PyModule_AddIntConstant(m, "MODE_COEFS", MODE_COEFS) < 0
#ifdef LIBJPEG_TURBO_VERSION_NUMBER
        || PyModule_AddIntConstant(m, "LIBJPEG_TURBO_VERSION_NUMBER",
                                   LIBJPEG_TURBO_VERSION_NUMBER) < 0
#endif
        || PyModule_AddIntConstant(m, "JPEG_LIB_VERSION", JPEG_LIB_VERSION) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
