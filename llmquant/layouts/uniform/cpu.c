/* The `uniform` layout's C row decoder: W[n, k] = scale[n, g] * (code - zero[n, g]).
 * p: words, scales (fp16 [rows, groups]), g_idx (int32 [cols], read only with act-order)
 * v: codes bit offset, zeros bit offset, group size, groups
 * spec: bits | sym << 4 | has g_idx << 5 */
#include "../cpu_kernel.h"

void decode_row_uniform(const kernel_args *a, int64_t n, float *out) {
    const uint32_t *words = a->p[0];
    const uint16_t *scales = a->p[1];
    const int32_t *g_idx = a->p[2];
    const int64_t codes_bit = a->v[0], zeros_bit = a->v[1], group_size = a->v[2], groups = a->v[3];
    const int bits = (int)(a->spec & 15), sym = (int)((a->spec >> 4) & 1), has_g_idx = (int)(a->spec >> 5);
    const int64_t K = a->cols;
    if (has_g_idx) {
        bit_reader codes = reader_at(words, codes_bit + n * K * bits); /* act-order: each column names its group */
        for (int64_t k = 0; k < K; k++) {
            const int64_t slot = n * groups + g_idx[k];
            const float z = sym ? (float)(1u << (bits - 1)) : (float)bits_at(words, zeros_bit + slot * bits, bits);
            out[k] = half_to_float(scales[slot]) * ((float)take(&codes, bits) - z);
        }
        return;
    }
    unpack_run(words, codes_bit + n * K * bits, bits, K, out);
    for (int64_t g = 0, start = 0; g < groups; g++, start += group_size) {
        const int64_t slot = n * groups + g, end = start + group_size < K ? start + group_size : K;
        const float s = half_to_float(scales[slot]);
        const float z = sym ? (float)(1u << (bits - 1)) : (float)bits_at(words, zeros_bit + slot * bits, bits);
        for (int64_t k = start; k < end; k++) out[k] = s * (out[k] - z); /* vectorised: codes are already there */
    }
}
