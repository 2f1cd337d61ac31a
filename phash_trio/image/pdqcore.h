/*
 * PDQ, streamed: a port of Meta's C++ reference (ThreatExchange pdq/cpp: pdqhashing.cpp,
 * downscaling.cpp, torben.cpp; BSD licence, Copyright (c) Meta Platforms, Inc. and affiliates)
 * that gives the same bits as `pdqhash.compute` (PyPI, which HMA 2.0 calls) for the same RGB8
 * pixels, without holding the image as floats.
 */
#ifndef PHASH_TRIO_PDQCORE_H
#define PHASH_TRIO_PDQCORE_H

#include <stddef.h>
#include <stdint.h>

typedef struct PdqStream PdqStream;

/* Call once before any other function (builds the DCT matrix). */
void pdq_init(void);

/* The most a stream may allocate: its rows are width floats each, so only an absurdly wide
   image (over ~120,000-240,000 pixels, by height) is refused. */
#define PDQ_MAX_STREAM_BYTES ((size_t)64 << 20)

/* What a stream for a width x height image allocates (0 under 5 pixels a side). */
size_t pdq_stream_bytes(size_t width, size_t height);

/* A stream for a width x height image; NULL when out of memory or over the limit above. */
PdqStream *pdq_open(size_t width, size_t height);

/* The next row of the image as RGB8 (3 * width bytes). Rows come in order, top first. */
void pdq_push_rgb(PdqStream *s, const uint8_t *rgb);

/* Where the caller writes the next row's float luma (width contiguous floats, see pdq_luma),
   then commits it with pdq_commit_row: no copy. NULL when the image is under 5 pixels a
   side (its hash is zero whatever the pixels: skip the luma). */
float *pdq_row_slots(PdqStream *s);
void pdq_commit_row(PdqStream *s);

/* pdqhash's luma of one RGB8 pixel, float(r * 0.299 + g * 0.587 + b * 0.114) computed in
   double, is the correctly rounded float of (299 r + 587 g + 114 b) / 1000: the double sum
   is within ~1e-13 of that rational, which is never that close to a point halfway between
   two floats (checked for all 2^24 colours in tests/test_pdqcore.py). One exact integer sum
   and one IEEE float division: 8 lanes at a time instead of 4 doubles. */
static inline float pdq_luma(int r, int g, int b) {
    return (float)(299 * r + 587 * g + 114 * b) / 1000.0f;
}

/* After the last row: the hash (32 bytes, big-endian: bit i*16+j of Meta's Hash256 is bit
   i*16+j of the 256-bit number) and the quality 0-100. Frees the stream. */
void pdq_finish(PdqStream *s, uint8_t hash[32], int *quality);

/* Frees a stream that will not be finished (error paths). */
void pdq_close(PdqStream *s);

#endif
