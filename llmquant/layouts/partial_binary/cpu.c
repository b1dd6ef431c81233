/* The `partial_binary` layout's C row decoder: W = high_scale * (code - high_zero) where salient,
 * mu + alpha * (2 sign - 1) elsewhere. The row's three streams (salient bitmap, salient codes,
 * signs of the binarized entries) are each read in order; where the latter two start follows from
 * the salient entries in the rows before (the kernel table's row starts).
 * p: words, high scales (fp16 [rows]), alpha, mu (fp16 [rows, groups]), row start (int64 [rows]),
 *    per-chunk counts (unused here)
 * v: mask bit offset, signs bit offset, codes bit offset, high zeros bit offset, chunks, group size, groups
 * spec: high_bit */
#include "../cpu_kernel.h"

void decode_row_partial_binary(const kernel_args *a, int64_t n, float *out) {
    const uint32_t *words = a->p[0];
    const uint16_t *high_scales = a->p[1], *alpha = a->p[2], *mu = a->p[3];
    const int64_t *row_start = a->p[4];
    const int64_t mask_bit = a->v[0], signs_bit = a->v[1], codes_bit = a->v[2], zeros_bit = a->v[3];
    const int64_t group_size = a->v[5], groups = a->v[6], K = a->cols;
    const int high_bit = (int)a->spec;
    const float high_scale = half_to_float(high_scales[n]);
    const float high_zero = (float)bits_at(words, zeros_bit + n * high_bit, high_bit);
    bit_reader salient = reader_at(words, mask_bit + n * K);
    bit_reader codes = reader_at(words, codes_bit + row_start[n] * high_bit);
    bit_reader signs = reader_at(words, signs_bit + n * K - row_start[n]);
    for (int64_t g = 0, start = 0; g < groups; g++, start += group_size) {
        const int64_t end = start + group_size < K ? start + group_size : K;
        const float m = half_to_float(mu[n * groups + g]), al = half_to_float(alpha[n * groups + g]);
        for (int64_t k = start; k < end; k++) {
            if (take(&salient, 1))
                out[k] = high_scale * ((float)take(&codes, high_bit) - high_zero);
            else
                out[k] = m + al * ((float)take(&signs, 1) * 2 - 1);
        }
    }
}
