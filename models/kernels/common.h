// Shared by the kernel sources: GCC vector types (8 floats), loops over flat arrays, and a vector exp.
//
// The kernels are written on explicit vectors rather than left to the auto-vectoriser, which gives up
// on the selects in exp and erf ("control flow in loop") and would run them one float at a time.
#pragma once

#include <sched.h>

#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

constexpr int kLanes = 8;
typedef float vf __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kLanes * sizeof(int32_t))));

constexpr int64_t kParallelElements = 1 << 16;  // per thread: below this, starting a thread costs more than it saves

// CPUs this process may run on.
inline int cpu_count() {
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof set, &set) != 0) return 1;
  const int n = CPU_COUNT(&set);
  return n > 0 ? n : 1;
}

// f(part, begin, end) over [0, n) cut into at most cpu_count() parts of at least `min_items` items, the first
// part on the calling thread. Plain threads that end with the call, not OpenMP: libgomp's workers spin after
// a parallel region and, on a 2-core machine, slow down the MindSpore matmul that runs next.
template <typename F>
int parallel_for(int64_t n, int64_t min_items, F f) {
  int64_t parts = n / (min_items > 0 ? min_items : 1);
  const int64_t cpus = cpu_count();
  parts = parts > cpus ? cpus : (parts < 1 ? 1 : parts);
  if (parts == 1) {
    f(0, 0, n);
    return 1;
  }
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(parts - 1));
  for (int64_t p = 1; p < parts; ++p) threads.emplace_back(f, static_cast<int>(p), n * p / parts, n * (p + 1) / parts);
  f(0, 0, n / parts);
  for (auto &t : threads) t.join();
  return static_cast<int>(parts);
}

inline int parts_for(int64_t n, int64_t min_items) {  // the number of parts parallel_for would use
  int64_t parts = n / (min_items > 0 ? min_items : 1);
  const int64_t cpus = cpu_count();
  return static_cast<int>(parts > cpus ? cpus : (parts < 1 ? 1 : parts));
}

inline int64_t elements(int ndim, const int64_t *shape) {
  int64_t n = 1;
  for (int d = 0; d < ndim; ++d) n *= shape[d];
  return n;
}

inline vf splat(float v) { return vf{} + v; }

inline vf load(const float *p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void store(float *p, vf v) { std::memcpy(p, &v, sizeof v); }

inline vf load_part(const float *p, int64_t count) {  // the first `count` lanes, the others zero
  vf v{};
  std::memcpy(&v, p, static_cast<size_t>(count) * sizeof(float));
  return v;
}

inline void store_part(float *p, vf v, int64_t count) {
  std::memcpy(p, &v, static_cast<size_t>(count) * sizeof(float));
}

inline vf as_vf(vi v) { return (vf)v; }  // GCC vector casts reinterpret the bits

inline vi as_vi(vf v) { return (vi)v; }

inline vi lane_index() { return vi{0, 1, 2, 3, 4, 5, 6, 7}; }

inline vf select(vi mask, vf a, vf b) { return mask ? a : b; }

inline vf vmin(vf a, vf b) { return a < b ? a : b; }

inline vf vmax(vf a, vf b) { return a > b ? a : b; }

inline float hsum(vf v) {
  float s = 0.0f;
  for (int k = 0; k < kLanes; ++k) s += v[k];
  return s;
}

// e^(hi + lo), |lo| small, to about 1 ulp: hi + lo = n ln2 + r with |r| <= ln2 / 2 (n ln2 taken off `hi`
// exactly, so a large `hi` loses nothing), e^r by a degree-7 fit (relative 1.3e-10 in float64); 2^n is
// applied in two halves, so results down to the smallest subnormal, and overflow to inf, come out right.
inline vf exp_sum(vf hi, vf lo) {
  hi = vmax(vmin(hi, splat(89.0f)), splat(-104.0f));
  const vf round = splat(12582912.0f);  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (hi * 1.4426950408889634f + round) - round;
  vf r = hi - n * 0.693145751953125f;
  r = r - n * 1.428606765330187e-06f;
  r = r + lo;
  vf p = splat(1.9818066813463643e-04f);
  p = p * r + 1.3942480788545972e-03f;
  p = p * r + 8.3334330864220080e-03f;
  p = p * r + 4.1666321696361390e-02f;
  p = p * r + 1.6666666206762784e-01f;
  p = p * r + 5.0000000621467320e-01f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vi k = __builtin_convertvector(n, vi);
  const vi k1 = k >> 1;
  const vi k2 = k - k1;
  return p * as_vf((k1 + 127) << 23) * as_vf((k2 + 127) << 23);
}

inline vf vexp(vf x) { return exp_sum(x, vf{}); }

inline vf sigmoid(vf v) { return 1.0f / (1.0f + vexp(-v)); }

// y[i] = f(x[i]) over n floats, in vectors of 8 (the tail padded), in parallel parts for large n.
template <typename F>
void map1(const float *x, float *y, int64_t n, F f) {
  const int64_t blocks = n / kLanes;
  parallel_for(blocks, kParallelElements / kLanes, [&](int, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) store(y + b * kLanes, f(load(x + b * kLanes)));
  });
  const int64_t i = blocks * kLanes;
  if (i < n) store_part(y + i, f(load_part(x + i, n - i)), n - i);
}

template <typename F>
void map2(const float *x1, const float *x2, float *y, int64_t n, F f) {
  const int64_t blocks = n / kLanes;
  parallel_for(blocks, kParallelElements / kLanes, [&](int, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) store(y + b * kLanes, f(load(x1 + b * kLanes), load(x2 + b * kLanes)));
  });
  const int64_t i = blocks * kLanes;
  if (i < n) store_part(y + i, f(load_part(x1 + i, n - i), load_part(x2 + i, n - i)), n - i);
}
