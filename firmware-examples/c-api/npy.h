/*
 * npy.h: a tiny reader for NumPy .npy files holding float32 arrays in C order (what
 * models/digits/samples and models/marker/samples hold), for the C API examples. C99 and C++;
 * header-only. Assumes a little-endian host (checked at run time).
 */
#ifndef PE_EXAMPLES_NPY_H
#define PE_EXAMPLES_NPY_H

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NPY_MAX_RANK 8

/** Shape of the array read. */
typedef struct npy_info {
  size_t rank;
  size_t shape[NPY_MAX_RANK];
  size_t count; /* number of elements */
} npy_info;

static inline int npy_fail(char *err, size_t err_len, const char *path, const char *what) {
  if (err && err_len) snprintf(err, err_len, "%s: %s", path, what);
  return -1;
}

/*
 * Reads the float32 C-order array in `path` into `dst`, which holds `capacity` floats; fills
 * `info`. Returns 0, or -1 with a one-line message in `err` (not a .npy file, another dtype,
 * Fortran order, more than `capacity` elements, truncated data).
 */
static inline int npy_read_f32(const char *path, float *dst, size_t capacity, npy_info *info, char *err, size_t err_len) {
  const uint16_t one = 1;
  unsigned char magic[8];
  char *header = NULL;
  const char *p;
  size_t header_len;
  FILE *f;
  int rc = -1;

  if (*(const unsigned char *)&one != 1) return npy_fail(err, err_len, path, "big-endian hosts are not supported");
  f = fopen(path, "rb");
  if (!f) return npy_fail(err, err_len, path, "cannot open");
  if (fread(magic, 1, 8, f) != 8 || memcmp(magic, "\x93NUMPY", 6) != 0) {
    npy_fail(err, err_len, path, "not a .npy file");
    goto done;
  }
  if (magic[6] == 1) {
    unsigned char n[2];
    if (fread(n, 1, 2, f) != 2) goto truncated;
    header_len = (size_t)n[0] | (size_t)n[1] << 8;
  } else if (magic[6] == 2 || magic[6] == 3) {
    unsigned char n[4];
    if (fread(n, 1, 4, f) != 4) goto truncated;
    header_len = (size_t)n[0] | (size_t)n[1] << 8 | (size_t)n[2] << 16 | (size_t)n[3] << 24;
  } else {
    npy_fail(err, err_len, path, "unknown .npy version");
    goto done;
  }
  header = (char *)malloc(header_len + 1);
  if (!header) {
    npy_fail(err, err_len, path, "out of memory");
    goto done;
  }
  if (fread(header, 1, header_len, f) != header_len) goto truncated;
  header[header_len] = '\0';

  p = strstr(header, "'descr'");
  if (!p || !(p = strchr(p + 7, '\'')) || strncmp(p, "'<f4'", 5) != 0) {
    npy_fail(err, err_len, path, "not a float32 ('<f4') array");
    goto done;
  }
  p = strstr(header, "'fortran_order'");
  if (!p || !strstr(p, "False")) {
    npy_fail(err, err_len, path, "Fortran-order arrays are not supported");
    goto done;
  }
  p = strstr(header, "'shape'");
  if (!p || !(p = strchr(p, '('))) {
    npy_fail(err, err_len, path, "no shape in the header");
    goto done;
  }
  info->rank = 0;
  info->count = 1;
  for (p++; *p && *p != ')';) {
    char *end;
    unsigned long long d;
    while (*p == ' ' || *p == ',') p++;
    if (*p == ')') break;
    d = strtoull(p, &end, 10);
    if (end == p || info->rank == NPY_MAX_RANK) {
      npy_fail(err, err_len, path, "unreadable shape");
      goto done;
    }
    info->shape[info->rank++] = (size_t)d;
    info->count *= (size_t)d;
    p = end;
  }
  if (info->count > capacity) {
    npy_fail(err, err_len, path, "more elements than the buffer holds");
    goto done;
  }
  if (fread(dst, sizeof(float), info->count, f) != info->count) goto truncated;
  rc = 0;
  goto done;
truncated:
  npy_fail(err, err_len, path, "truncated file");
done:
  free(header);
  fclose(f);
  return rc;
}

#endif /* PE_EXAMPLES_NPY_H */
