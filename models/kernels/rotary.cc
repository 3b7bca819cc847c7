// Rotary position embedding in one pass: y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x2, x1].
//
// x is (A, B, C, d) and cos/sin (A', B', C', d), each of A', B', C' equal to x's or 1, broadcast as numpy
// does (the angles are shared by the heads, and by the frames of a chunk), read in place rather than
// broadcast in memory, which MindSpore's CPU kernels do several times slower than an equal-shape
// product. The inner loop has no branches and no aliasing, so -O3 vectorises it.
#include "common.h"

namespace {

bool broadcasts(int64_t from, int64_t to) { return from == to || from == 1; }

// sign +1: the forward rotation; -1: its transpose (the gradient with respect to x).
template <int sign>
int rotate(void **params, int *ndims, int64_t **shapes) {
  if (ndims[0] != 4 || ndims[1] != 4) return 1;
  const int64_t *xs = shapes[0], *cs = shapes[1];
  const int64_t d = xs[3];
  if (d % 2 || cs[3] != d || !broadcasts(cs[0], xs[0]) || !broadcasts(cs[1], xs[1]) || !broadcasts(cs[2], xs[2]))
    return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *cos = static_cast<const float *>(params[1]);
  const float *sin = static_cast<const float *>(params[2]);
  float *y = static_cast<float *>(params[3]);
  const int64_t half = d / 2, rows = xs[0] * xs[1] * xs[2];
  parallel_for(rows, kParallelElements / d, [&](int, int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t a = row / (xs[1] * xs[2]), b = row / xs[2] % xs[1], k = row % xs[2];
      const int64_t angle = ((a % cs[0]) * cs[1] + b % cs[1]) * cs[2] + k % cs[2];
      const float *__restrict__ c = cos + angle * d;
      const float *__restrict__ sn = sin + angle * d;
      const float *__restrict__ x1 = x + row * d;
      const float *__restrict__ x2 = x1 + half;
      float *__restrict__ y1 = y + row * d;
      float *__restrict__ y2 = y1 + half;
      for (int64_t j = 0; j < half; ++j) {
        if (sign > 0) {
          y1[j] = x1[j] * c[j] - x2[j] * sn[j];
          y2[j] = x2[j] * c[half + j] + x1[j] * sn[half + j];
        } else {
          y1[j] = x1[j] * c[j] + x2[j] * sn[half + j];
          y2[j] = x2[j] * c[half + j] - x1[j] * sn[j];
        }
      }
    }
  });
  return 0;
}

}  // namespace

// inputs x, cos, sin -> y
extern "C" int Rotary(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return rotate<1>(params, ndims, shapes);
}

// inputs dy, cos, sin -> dx
extern "C" int RotaryGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return rotate<-1>(params, ndims, shapes);
}
