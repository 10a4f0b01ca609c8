/*
 * classify: the perceiver-edge C API from C.
 *
 * Loads a model exported by `perceiver-edge export` once, allocates its input and output
 * buffers once (sizes from the model), then for each .npy sample (float32, the model's input
 * shape) runs the model and prints one JSON line:
 *
 *   {"example": "c", "sample": "digit_3", "class": 9, "outputs": {"logits": [...]}}
 *
 * `class` is the arg-max of the first output (the digit for models/digits, the heat-map peak
 * pixel for models/marker). Floats are printed with 9 significant digits, which round-trips
 * float32 exactly. Errors: a one-line message on stderr and exit status 1.
 *
 *   usage: classify MODEL.onnx SAMPLE.npy...
 */
#include "npy.h"
#include "perceiver_edge.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_OUTPUTS 8

/* Reports a failed pe_* call (status name and the library's message) and jumps to cleanup. */
#define CHECK(call)                                                                            \
  do {                                                                                         \
    pe_status status_ = (call);                                                                \
    if (status_ != PE_OK) {                                                                    \
      fprintf(stderr, "classify: %s: %s\n", pe_status_name((int)status_), pe_last_error());   \
      goto cleanup;                                                                            \
    }                                                                                          \
  } while (0)

/* The file name without folder and `.npy`, JSON-safe (quotes and backslashes dropped). */
static void sample_name(const char *path, char *out, size_t len) {
  const char *base = strrchr(path, '/');
  size_t n = 0;
  base = base ? base + 1 : path;
  for (; *base && n + 1 < len; base++) {
    if (strcmp(base, ".npy") == 0) break;
    if (*base != '"' && *base != '\\') out[n++] = *base;
  }
  out[n] = '\0';
}

static void print_floats(const float *v, size_t n) {
  size_t i;
  putchar('[');
  for (i = 0; i < n; i++) {
    if (i) fputs(", ", stdout);
    if (isfinite(v[i]))
      printf("%.9g", (double)v[i]);
    else
      fputs("null", stdout);
  }
  putchar(']');
}

int main(int argc, char **argv) {
  pe_model *model = NULL;
  float *input = NULL;
  float *outputs[MAX_OUTPUTS] = {0};
  pe_input in;
  pe_output out[MAX_OUTPUTS];
  const char *out_names[MAX_OUTPUTS];
  size_t in_dims[NPY_MAX_RANK], n_in, n_out, in_rank, in_bytes, i, k;
  pe_dtype dtype;
  int rc = 1;

  if (argc < 3) {
    fprintf(stderr, "usage: %s MODEL.onnx SAMPLE.npy...\n", argv[0]);
    return 2;
  }
  CHECK(pe_model_load(argv[1], &model));

  /* The input: one float32 tensor. */
  CHECK(pe_model_input_count(model, &n_in));
  if (n_in != 1) {
    fprintf(stderr, "classify: %s takes %zu inputs; this example feeds one\n", argv[1], n_in);
    goto cleanup;
  }
  CHECK(pe_model_input_dtype(model, 0, &dtype));
  CHECK(pe_model_input_rank(model, 0, &in_rank));
  if (dtype != PE_DTYPE_F32 || in_rank > NPY_MAX_RANK) {
    fprintf(stderr, "classify: the input must be float32 of rank <= %d\n", NPY_MAX_RANK);
    goto cleanup;
  }
  CHECK(pe_model_input_shape(model, 0, in_dims, NPY_MAX_RANK));
  CHECK(pe_model_input_byte_size(model, 0, &in_bytes));
  input = (float *)malloc(in_bytes);
  if (!input) goto cleanup;
  in.data = input;
  in.byte_len = in_bytes;
  in.dtype = PE_DTYPE_F32;

  /* The outputs: float32 tensors, buffers allocated once. */
  CHECK(pe_model_output_count(model, &n_out));
  if (n_out == 0 || n_out > MAX_OUTPUTS) {
    fprintf(stderr, "classify: %zu outputs; this example handles 1 to %d\n", n_out, MAX_OUTPUTS);
    goto cleanup;
  }
  for (k = 0; k < n_out; k++) {
    CHECK(pe_model_output_dtype(model, k, &dtype));
    if (dtype != PE_DTYPE_F32) {
      fprintf(stderr, "classify: output %zu is not float32\n", k);
      goto cleanup;
    }
    CHECK(pe_model_output_name(model, k, &out_names[k]));
    CHECK(pe_model_output_byte_size(model, k, &out[k].byte_len));
    outputs[k] = (float *)malloc(out[k].byte_len);
    if (!outputs[k]) goto cleanup;
    out[k].data = outputs[k];
    out[k].dtype = PE_DTYPE_F32;
  }

  for (i = 2; i < (size_t)argc; i++) {
    npy_info info;
    char err[512], name[256];
    size_t best = 0, d, n = out[0].byte_len / sizeof(float);
    if (npy_read_f32(argv[i], input, in_bytes / sizeof(float), &info, err, sizeof err) != 0) {
      fprintf(stderr, "classify: %s\n", err);
      goto cleanup;
    }
    for (d = 0; d < in_rank && info.rank == in_rank; d++)
      if (info.shape[d] != in_dims[d]) break;
    if (info.rank != in_rank || d != in_rank) {
      fprintf(stderr, "classify: %s: shape differs from the model's input\n", argv[i]);
      goto cleanup;
    }
    CHECK(pe_model_run(model, &in, 1, out, n_out));
    for (d = 1; d < n; d++)
      if (outputs[0][d] > outputs[0][best]) best = d;
    sample_name(argv[i], name, sizeof name);
    printf("{\"example\": \"c\", \"sample\": \"%s\", \"class\": %zu, \"outputs\": {", name, best);
    for (k = 0; k < n_out; k++) {
      printf("%s\"%s\": ", k ? ", " : "", out_names[k]);
      print_floats(outputs[k], out[k].byte_len / sizeof(float));
    }
    printf("}}\n");
  }
  rc = 0;

cleanup:
  for (k = 0; k < MAX_OUTPUTS; k++) free(outputs[k]);
  free(input);
  if (pe_model_free(model) != PE_OK) {
    fprintf(stderr, "classify: pe_model_free: %s\n", pe_last_error());
    rc = 1;
  }
  return rc;
}
