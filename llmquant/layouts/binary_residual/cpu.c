/* The `binary_residual` layout's C row decoder (BiLLM): salient columns a1 s1 + m1 + a2 s2 + m2, the
 * others sa s1 + sm if sparse else ca s1 + cm, with s = 2 sign - 1 and 8 parameters per (row, block).
 * The row's streams (first signs, the column bitmap, second signs at salient columns, the sparse flag
 * elsewhere) are each read in order.
 * p: words, salient columns before each column (int32 [cols]; unused here), params (fp16 [rows, blocks, 8])
 * v: columns bit offset, signs, signs2, sparse flags bit offsets, salient columns in all, blocksize, blocks */
#include "../cpu_kernel.h"

void decode_row_binary_residual(const kernel_args *a, int64_t n, float *out) {
    const uint32_t *words = a->p[0];
    const uint16_t *params = a->p[2];
    const int64_t columns_bit = a->v[0], signs_bit = a->v[1], signs2_bit = a->v[2], sparse_bit = a->v[3];
    const int64_t salient_total = a->v[4], blocksize = a->v[5], blocks = a->v[6], K = a->cols;
    bit_reader signs = reader_at(words, signs_bit + n * K);
    bit_reader columns = reader_at(words, columns_bit);
    bit_reader signs2 = reader_at(words, signs2_bit + n * salient_total);
    bit_reader sparse = reader_at(words, sparse_bit + n * (K - salient_total));
    for (int64_t b = 0, start = 0; b < blocks; b++, start += blocksize) {
        const int64_t end = start + blocksize < K ? start + blocksize : K;
        float p[8];
        for (int j = 0; j < 8; j++) p[j] = half_to_float(params[(n * blocks + b) * 8 + j]);
        for (int64_t k = start; k < end; k++) {
            const float s1 = (float)take(&signs, 1) * 2 - 1;
            if (take(&columns, 1)) {
                const float s2 = (float)take(&signs2, 1) * 2 - 1;
                out[k] = p[0] * s1 + p[1] + p[2] * s2 + p[3];
            } else if (take(&sparse, 1)) {
                out[k] = p[6] * s1 + p[7];
            } else {
                out[k] = p[4] * s1 + p[5];
            }
        }
    }
}
