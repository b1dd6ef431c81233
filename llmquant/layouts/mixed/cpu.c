/* The `mixed` layout's C row decoder: per group of width b, W = scale * (code - zero) (b >= 2) or
 * W = mu + scale * (2 code - 1) (b = 1).
 * p: words, group table (int64 [groups, 7], see kernels.py), scales (fp16), means of 1-bit groups (fp16)
 * v: group size, groups */
#include "../cpu_kernel.h"

void decode_row_mixed(const kernel_args *a, int64_t n, float *out) {
    const uint32_t *words = a->p[0];
    const int64_t *table = a->p[1];
    const uint16_t *scales = a->p[2], *means = a->p[3];
    const int64_t group_size = a->v[0], groups = a->v[1], K = a->cols;
    for (int64_t g = 0; g < groups; g++) {
        const int64_t *t = table + g * 7;
        const int width = (int)t[0];
        const int64_t code_base = t[1], code_columns = t[2], first = t[3], zero_base = t[4], of_width = t[5], rank = t[6];
        const float s = half_to_float(scales[n * groups + g]);
        const int64_t start = g * group_size, end = start + group_size < K ? start + group_size : K;
        unpack_run(words, code_base + (n * code_columns + first) * width, width, end - start, out + start);
        if (width == 1) {
            const float mu = half_to_float(means[n * of_width + rank]);
            for (int64_t k = start; k < end; k++) out[k] = mu + s * (2 * out[k] - 1);
        } else {
            const float z = (float)bits_at(words, zero_base + (n * of_width + rank) * width, width);
            for (int64_t k = start; k < end; k++) out[k] = s * (out[k] - z);
        }
    }
}
