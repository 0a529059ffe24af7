/* Runs an llvmlite-generated kernel object (edgetk.kernels.llvm_codebook / llvm_codebook_q8, any target) on one
 * test case.
 *
 * case file (little endian, int64 fields):
 *   magic 0x4b43454843424345 ("ECBCHECK"), fn (0 = gemv_work_par, 1 = gemm_work_par,
 *   2 = q8_work_par, 3 = gemmb_work_par, 4 = i8q_work_par, 5 = i8_work_par, 6 = few_work_par, 7 = gemvk_work_par),
 *   n_items, n_threads,
 *   out_off, out_bytes, ptr_mask (bit i: args[i] is an offset into the blob, or -1 for NULL), n_args,
 *   args[n_args], blob_bytes, blob[blob_bytes]
 * Writes blob[out_off : out_off + out_bytes] to the output file. Exit code 0 on success. An optional third
 * argument runs the kernel that many times (0: not at all; instruction counts per call under qemu take the
 * difference of two counts).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* weak: an object holds either the float32 kernels (gemv, gemm split by rows / by batch tiles), the int8-LUT
 * gemv (q8), the int8 prefill GEMM (llvm_gemm_i8: activation quantization, row blocks) or the few-input GEMM
 * (llvm_codebook_few) */
void gemv_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void gemm_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void q8_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void gemmb_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void i8q_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void i8_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void few_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));
void gemvk_work_par(int64_t *args, int64_t n_items, int64_t n_threads) __attribute__((weak));

static int64_t rd(FILE *f) {
    int64_t v;
    if (fread(&v, sizeof v, 1, f) != 1) { fprintf(stderr, "short case file\n"); exit(2); }
    return v;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) { fprintf(stderr, "usage: %s case.bin out.bin [calls]\n", argv[0]); return 2; }
    long calls = argc == 4 ? atol(argv[3]) : 1;
    FILE *f = fopen(argv[1], "rb");
    if (!f) { perror(argv[1]); return 2; }
    if (rd(f) != 0x4b43454843424345LL) { fprintf(stderr, "bad magic\n"); return 2; }
    int64_t fn = rd(f), n_items = rd(f), n_threads = rd(f), out_off = rd(f), out_bytes = rd(f);
    int64_t mask = rd(f), n_args = rd(f);
    int64_t *args = calloc((size_t)n_args, sizeof(int64_t));
    for (int64_t i = 0; i < n_args; i++) args[i] = rd(f);
    int64_t blob_bytes = rd(f);
    char *blob = aligned_alloc(64, (size_t)((blob_bytes + 63) / 64 * 64));
    if (!args || !blob || fread(blob, 1, (size_t)blob_bytes, f) != (size_t)blob_bytes) {
        fprintf(stderr, "cannot read blob\n");
        return 2;
    }
    fclose(f);
    for (int64_t i = 0; i < n_args; i++)
        if ((mask >> i) & 1) args[i] = args[i] < 0 ? 0 : (int64_t)(intptr_t)(blob + args[i]);
    void (*kernels[8])(int64_t *, int64_t, int64_t) = {gemv_work_par, gemm_work_par, q8_work_par, gemmb_work_par,
                                                       i8q_work_par, i8_work_par, few_work_par, gemvk_work_par};
    if (fn < 0 || fn > 7 || !kernels[fn]) { fprintf(stderr, "kernel %lld is not in this object\n", (long long)fn); return 2; }
    for (long c = 0; c < calls; c++) kernels[fn](args, n_items, n_threads);
    FILE *o = fopen(argv[2], "wb");
    if (!o || fwrite(blob + out_off, 1, (size_t)out_bytes, o) != (size_t)out_bytes) { perror(argv[2]); return 2; }
    fclose(o);
    return 0;
}
