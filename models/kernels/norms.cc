// Row-wise kernels over the last axis, float32: LayerNorm, RMSNorm and their gradients, and the
// attention tile's softmax with its log-sum-exp.
// Same AOT entry-point signature as activations.cc; rows are spread over threads (parallel_for).
#include <cmath>
#include <vector>

#include "common.h"

namespace {

struct Rows {
  int64_t rows;
  int64_t cols;
};

Rows rows_of(int ndim, const int64_t *shape) {
  const int64_t cols = ndim > 0 ? shape[ndim - 1] : 1;
  return {cols > 0 ? elements(ndim, shape) / cols : 0, cols};
}

// f(i, col, count) for each vector of a row: `count` lanes (8, or fewer at the row's end) starting at `col`.
template <typename F>
inline void each_vector(int64_t cols, F f) {
  int64_t c = 0;
  for (; c + kLanes <= cols; c += kLanes) f(c, kLanes);
  if (c < cols) f(c, cols - c);
}

inline vf get(const float *p, int64_t count) { return count == kLanes ? load(p) : load_part(p, count); }

inline void put(float *p, vf v, int64_t count) {
  if (count == kLanes) {
    store(p, v);
  } else {
    store_part(p, v, count);
  }
}

constexpr int64_t kSumBlock = 64 * kLanes;  // float partial sums over 512 columns, then a double total

// sum over a row of f(col, count), a vector whose lanes past `count` must be zero: long rows
// (70k columns) keep float32 accuracy because each float partial sum stays short.
template <typename F>
inline float row_reduce(int64_t cols, F f) {
  double total = 0.0;
  for (int64_t start = 0; start < cols; start += kSumBlock) {
    const int64_t stop = start + kSumBlock < cols ? start + kSumBlock : cols;
    vf s{};
    int64_t c = start;
    for (; c + kLanes <= stop; c += kLanes) s += f(c, kLanes);
    if (c < stop) s += f(c, stop - c);
    total += static_cast<double>(hsum(s));
  }
  return static_cast<float>(total);
}

inline vf head(vf v, int64_t n) { return n == kLanes ? v : select(lane_index() < static_cast<int32_t>(n), v, vf{}); }

inline float row_max(const float *x, int64_t cols) {
  vf m = splat(-INFINITY);
  each_vector(cols, [&](int64_t c, int64_t n) {
    const vf v = get(x + c, n);
    m = vmax(m, n == kLanes ? v : select(lane_index() < static_cast<int32_t>(n), v, splat(-INFINITY)));
  });
  float best = m[0];
  for (int k = 1; k < kLanes; ++k) best = m[k] > best ? m[k] : best;
  return best;
}

inline float row_sum(const float *x, int64_t cols) {
  return row_reduce(cols, [&](int64_t c, int64_t n) { return get(x + c, n); });
}

inline float centred_square_sum(const float *x, int64_t cols, float mean) {
  return row_reduce(cols, [&](int64_t c, int64_t n) {
    const vf d = get(x + c, n) - mean;
    return head(d * d, n);
  });
}

inline float square_sum(const float *x, int64_t cols) {
  return row_reduce(cols, [&](int64_t c, int64_t n) {
    const vf v = get(x + c, n);
    return v * v;
  });
}

inline float dot(const float *a, const float *b, int64_t cols) {
  return row_reduce(cols, [&](int64_t c, int64_t n) { return get(a + c, n) * get(b + c, n); });
}

// Rows per part so that a part has at least kParallelElements values.
int64_t min_rows(Rows r) { return r.cols > 0 ? (kParallelElements + r.cols - 1) / r.cols : r.rows; }

// f(i) for every row, in parallel parts.
template <typename F>
void each_row(Rows r, F f) {
  parallel_for(r.rows, min_rows(r), [&](int, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) f(i);
  });
}

// Column sums over rows of per-row contributions (dw, db): each part sums its own rows, then the
// parts' partial sums are added in order, so the result does not depend on timing.
template <typename F>
void column_sums(Rows r, int outputs, float *const *out, F row_terms) {
  const int parts = parts_for(r.rows, min_rows(r));
  const size_t stride = static_cast<size_t>(outputs) * r.cols;
  std::vector<float> partial(static_cast<size_t>(parts) * stride, 0.0f);
  parallel_for(r.rows, min_rows(r), [&](int part, int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) row_terms(i, partial.data() + part * stride);
  });
  for (int o = 0; o < outputs; ++o) {
    for (int64_t c = 0; c < r.cols; ++c) {
      float s = 0.0f;
      for (int p = 0; p < parts; ++p) s += partial[p * stride + o * r.cols + c];
      out[o][c] = s;
    }
  }
}

// y = softmax(x + bias) over each row and lse = log(sum(exp(x + bias))): one pass writes the biased
// scores, one turns them into exponentials and sums them, one scales; the row stays in cache between.
template <bool with_bias>
int softmax_lse(void **params, int *ndims, int64_t **shapes) {
  const Rows r = rows_of(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float *bias = with_bias ? static_cast<const float *>(params[1]) : nullptr;
  float *y = static_cast<float *>(params[with_bias ? 2 : 1]);
  float *lse = static_cast<float *>(params[with_bias ? 3 : 2]);
  if (with_bias && elements(ndims[1], shapes[1]) != r.rows * r.cols) return 1;
  each_row(r, [&](int64_t i) {
    const float *xi = x + i * r.cols;
    float *yi = y + i * r.cols;
    if (with_bias) {
      const float *bi = bias + i * r.cols;
      each_vector(r.cols, [&](int64_t c, int64_t n) { put(yi + c, get(xi + c, n) + get(bi + c, n), n); });
      xi = yi;
    }
    const float top = row_max(xi, r.cols);
    const float total = row_reduce(r.cols, [&](int64_t c, int64_t n) {
      const vf e = head(vexp(get(xi + c, n) - top), n);
      put(yi + c, e, n);
      return e;
    });
    const float inv = 1.0f / total;
    each_vector(r.cols, [&](int64_t c, int64_t n) { put(yi + c, get(yi + c, n) * inv, n); });
    lse[i] = top + std::log(total);
  });
  return 0;
}

}  // namespace

extern "C" {

// inputs x (..., n) -> softmax over the last axis (..., n), its log-sum-exp (...)
int SoftmaxLse(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return softmax_lse<false>(params, ndims, shapes);
}

// inputs x (..., n), bias (x's shape) -> softmax(x + bias), its log-sum-exp
int SoftmaxLseBias(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return softmax_lse<true>(params, ndims, shapes);
}

// inputs x (..., H), weight (H), bias (H), eps (1) -> (x - mean) / sqrt(var + eps) * weight + bias
int LayerNorm(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const Rows r = rows_of(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *b = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *y = static_cast<float *>(params[4]);
  each_row(r, [&](int64_t i) {
    const float *xi = x + i * r.cols;
    float *yi = y + i * r.cols;
    const float mean = row_sum(xi, r.cols) / static_cast<float>(r.cols);
    const float rstd = 1.0f / std::sqrt(centred_square_sum(xi, r.cols, mean) / static_cast<float>(r.cols) + eps);
    each_vector(r.cols, [&](int64_t c, int64_t n) {
      put(yi + c, (get(xi + c, n) - mean) * rstd * get(w + c, n) + get(b + c, n), n);
    });
  });
  return 0;
}

// inputs x, weight, dy, eps -> dx, d weight, d bias (mean and rstd recomputed from x)
int LayerNormGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const Rows r = rows_of(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *const sums[2] = {static_cast<float *>(params[5]), static_cast<float *>(params[6])};
  const float inv_cols = 1.0f / static_cast<float>(r.cols);
  column_sums(r, 2, sums, [&](int64_t i, float *partial) {
    const float *xi = x + i * r.cols;
    const float *dyi = dy + i * r.cols;
    float *dxi = dx + i * r.cols;
    const float mean = row_sum(xi, r.cols) * inv_cols;
    const float rstd = 1.0f / std::sqrt(centred_square_sum(xi, r.cols, mean) * inv_cols + eps);
    const float g_mean = dot(dyi, w, r.cols) * inv_cols;
    const float gx_mean = row_reduce(r.cols, [&](int64_t c, int64_t n) {
      return head((get(xi + c, n) - mean) * rstd * get(dyi + c, n) * get(w + c, n), n);
    }) * inv_cols;
    each_vector(r.cols, [&](int64_t c, int64_t n) {
      const vf xhat = (get(xi + c, n) - mean) * rstd;
      const vf d = get(dyi + c, n);
      put(partial + c, get(partial + c, n) + d * xhat, n);
      put(partial + r.cols + c, get(partial + r.cols + c, n) + d, n);
      put(dxi + c, rstd * (d * get(w + c, n) - g_mean - xhat * gx_mean), n);
    });
  });
  return 0;
}

// inputs x (..., H), weight (H), eps (1) -> weight * x / sqrt(mean(x^2) + eps)
int RmsNorm(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const Rows r = rows_of(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float eps = *static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  each_row(r, [&](int64_t i) {
    const float *xi = x + i * r.cols;
    float *yi = y + i * r.cols;
    const float rstd = 1.0f / std::sqrt(square_sum(xi, r.cols) / static_cast<float>(r.cols) + eps);
    each_vector(r.cols, [&](int64_t c, int64_t n) { put(yi + c, get(w + c, n) * (get(xi + c, n) * rstd), n); });
  });
  return 0;
}

// inputs x, weight, dy, eps -> dx, d weight
int RmsNormGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const Rows r = rows_of(ndims[0], shapes[0]);
  const float *x = static_cast<const float *>(params[0]);
  const float *w = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  const float eps = *static_cast<const float *>(params[3]);
  float *dx = static_cast<float *>(params[4]);
  float *const sums[1] = {static_cast<float *>(params[5])};
  const float inv_cols = 1.0f / static_cast<float>(r.cols);
  column_sums(r, 1, sums, [&](int64_t i, float *partial) {
    const float *xi = x + i * r.cols;
    const float *dyi = dy + i * r.cols;
    float *dxi = dx + i * r.cols;
    const float rstd = 1.0f / std::sqrt(square_sum(xi, r.cols) * inv_cols + eps);
    const float gx_mean = row_reduce(r.cols, [&](int64_t c, int64_t n) {
      return get(dyi + c, n) * get(w + c, n) * get(xi + c, n) * rstd;
    }) * inv_cols;
    each_vector(r.cols, [&](int64_t c, int64_t n) {
      const vf xhat = get(xi + c, n) * rstd;
      const vf d = get(dyi + c, n);
      put(partial + c, get(partial + c, n) + d * xhat, n);
      put(dxi + c, rstd * (d * get(w + c, n) - xhat * gx_mean), n);
    });
  });
  return 0;
}

}  // extern "C"
