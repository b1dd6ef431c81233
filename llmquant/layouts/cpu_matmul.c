/* The CPU kernels' driver: y = x W^T without the dense W, for every layout (a C row decoder each).
 *
 *   llmquant_gemv: few tokens. Each thread decodes one weight row at a time into a buffer of K
 *                  floats (it stays in L1/L2) and takes its dot product with every token's x.
 *   llmquant_rows: rows [n0, n1) of W into a caller's buffer, for many tokens: the caller multiplies
 *                  that block with a BLAS GEMM (torch.mm) and moves on, so W is never whole.
 * Both split rows over OpenMP threads; results do not depend on the thread count.
 */
#include <stdlib.h>
#include "cpu_kernel.h"

typedef void (*row_decoder)(const kernel_args *, int64_t, float *);

static const row_decoder DECODERS[] = {
    decode_row_uniform, decode_row_mixed, decode_row_partial_binary, decode_row_binary_residual,
};

/* Dot product with eight independent partial sums (the compiler vectorises them; the order of the
 * additions is fixed, so the result is the same on every run). */
static float dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int j = 0; j < 8; j++) s[j] += a[i + j] * b[i + j];
    float total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; i++) total += a[i] * b[i];
    return total;
}

int llmquant_gemv(int layout, const kernel_args *a, const float *x, int64_t m, float *y, int threads) {
    const row_decoder decode = DECODERS[layout];
    const int64_t rows = a->rows, cols = a->cols;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *row = malloc(sizeof(float) * (size_t)(cols > 0 ? cols : 1));
        if (!row) {
#pragma omp atomic write
            failed = 1;
        }
        /* Every thread reaches the worksharing loop (a thread that skipped it would hang the others). */
#pragma omp for schedule(static)
        for (int64_t n = 0; n < rows; n++) {
            if (!row) continue;
            decode(a, n, row);
            for (int64_t t = 0; t < m; t++) y[t * rows + n] = dot(x + t * cols, row, cols);
        }
        free(row);
    }
    return failed;
}

void llmquant_rows(int layout, const kernel_args *a, int64_t n0, int64_t n1, float *out, int threads) {
    const row_decoder decode = DECODERS[layout];
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t n = n0; n < n1; n++) decode(a, n, out + (n - n0) * a->cols);
}
