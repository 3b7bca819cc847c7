// The experts of an MoE layer for a compiled one-token step (a few tokens): models/moe.py's CPU decode path.
// Inputs x (N, H), ids (N, k) as float, weights (N, k), gate_up (E, H, 2I), down (E, I, H) -> out (N, H).
// The (token, expert) pairs are grouped by expert (a counting sort), so each picked expert's matrices are read
// once, in place, and shared by all of its tokens: no copies of expert matrices, unlike a gather per pair.
// Pairs of weight 0 (experts of other ranks) are skipped. Single-threaded: inside MindSpore's graphs, threads
// of its own made this kernel slower (5.7 ms against 3.0 ms at 128 experts, one token).
// Needs H and 2I to be multiples of 8 (the caller checks).
#include <cmath>
#include <cstdint>
#include <vector>

#include "common.h"

namespace {

// rows[r][c] += sum_j a[r][j] * w[j][c] for the m listed rows; w has J rows of `width` floats. Four weight rows
// at a time, so each output row is loaded and stored once per four.
void accumulate(const float *const *a, float *const *rows, int64_t m, const float *w, int64_t J, int64_t width) {
  int64_t j = 0;
  for (; j + 4 <= J; j += 4) {
    const float *w0 = w + j * width, *w1 = w0 + width, *w2 = w1 + width, *w3 = w2 + width;
    for (int64_t r = 0; r < m; ++r) {
      const vf s0 = splat(a[r][j]), s1 = splat(a[r][j + 1]), s2 = splat(a[r][j + 2]), s3 = splat(a[r][j + 3]);
      float *y = rows[r];
      for (int64_t c = 0; c < width; c += kLanes) {
        store(y + c, load(y + c) + s0 * load(w0 + c) + s1 * load(w1 + c) + s2 * load(w2 + c) + s3 * load(w3 + c));
      }
    }
  }
  for (; j < J; ++j) {
    const float *w0 = w + j * width;
    for (int64_t r = 0; r < m; ++r) {
      const vf s0 = splat(a[r][j]);
      float *y = rows[r];
      for (int64_t c = 0; c < width; c += kLanes) store(y + c, load(y + c) + s0 * load(w0 + c));
    }
  }
}

}  // namespace

extern "C" int MoeExperts(int, void **params, int *, int64_t **shapes, const char **, void *, void *) {
  const float *x = static_cast<const float *>(params[0]);
  const float *ids = static_cast<const float *>(params[1]);
  const float *weights = static_cast<const float *>(params[2]);
  const float *gate_up = static_cast<const float *>(params[3]);
  const float *down = static_cast<const float *>(params[4]);
  float *out = static_cast<float *>(params[5]);
  const int64_t n = shapes[0][0], hidden = shapes[0][1], k = shapes[1][1];
  const int64_t experts = shapes[3][0], inter2 = shapes[3][2], inter = shapes[4][1];
  const int64_t pairs = n * k;
  std::vector<int64_t> count(experts + 1, 0), order(pairs), expert_of(pairs);
  for (int64_t p = 0; p < pairs; ++p) {
    const int64_t e = static_cast<int64_t>(ids[p]);
    expert_of[p] = (e >= 0 && e < experts && weights[p] != 0.0f) ? e : experts;
    ++count[expert_of[p]];
  }
  std::vector<int64_t> start(experts + 2, 0);
  for (int64_t e = 0; e <= experts; ++e) start[e + 1] = start[e] + count[e];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  for (int64_t p = 0; p < pairs; ++p) order[fill[expert_of[p]]++] = p;
  const int64_t used = start[experts];  // the pairs that run
  std::vector<float> hid(static_cast<size_t>(used) * inter2, 0.0f), act(static_cast<size_t>(used) * inter);
  std::vector<const float *> a(used);
  std::vector<float *> rows(used);
  for (int64_t q = 0; q < used; ++q) {
    a[q] = x + (order[q] / k) * hidden;
    rows[q] = hid.data() + q * inter2;
  }
  for (int64_t e = 0; e < experts; ++e) {
    if (count[e]) accumulate(a.data() + start[e], rows.data() + start[e], count[e], gate_up + e * hidden * inter2,
                             hidden, inter2);
  }
  for (int64_t q = 0; q < used; ++q) {  // SiLU(gate) x up x the routing weight
    const float w = weights[order[q]];
    const float *h = hid.data() + q * inter2;
    float *y = act.data() + q * inter;
    for (int64_t i = 0; i < inter; ++i) y[i] = w * h[i] / (1.0f + std::exp(-h[i])) * h[inter + i];
  }
  for (int64_t i = 0; i < n * hidden; ++i) out[i] = 0.0f;
  for (int64_t q = 0; q < used; ++q) {
    a[q] = act.data() + q * inter;
    rows[q] = out + (order[q] / k) * hidden;
  }
  for (int64_t e = 0; e < experts; ++e) {
    if (count[e]) accumulate(a.data() + start[e], rows.data() + start[e], count[e], down + e * inter * hidden,
                             inter, hidden);
  }
  return 0;
}
