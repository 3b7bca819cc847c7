// Element-wise activations and their gradients, float32, for MindSpore's CPU "aot" custom operators.
//
// Every entry point has the signature MindSpore's AOT interface calls:
//   int Name(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *stream, void *extra)
// with the inputs first and the outputs after them in `params`. Shapes are treated as flat arrays.
#include "common.h"

namespace {

// erf(a) / a for |a| <= 1 (used up to kSmall): least-squares fit in a^2 (relative error 3e-12 in float64).
inline vf erf_small(vf a) {
  const vf s = a * a;
  vf p = splat(1.0690297711501984e-06f);
  p = p * s - 1.3947530814295561e-05f;
  p = p * s + 1.1962407266384589e-04f;
  p = p * s - 8.5431012666571660e-04f;
  p = p * s + 5.2238036900377070e-03f;
  p = p * s - 2.6866137987274344e-02f;
  p = p * s + 1.1283791362949436e-01f;
  p = p * s - 3.7612638891974450e-01f;
  p = p * s + 1.1283791670948404e+00f;
  return a * p;
}

constexpr float kSmall = 0.75f;  // |x| / sqrt(2) below this takes erf_small, above it erfc_large

// erfc(a) for a = |x| / sqrt(2) >= kSmall, given |x|: t * exp(-a^2 + q(t)) with t = 1 / (1 + a / 2),
// q fitted on [0.75, 10.5] (4.7e-9 in float64). a^2 is taken as x^2 / 2 from |x| itself, since the rounding
// of |x| / sqrt(2) would put 1e-5 of relative error into exp(-a^2) at a = 8.
inline vf erfc_large(vf ax) {
  const vf t = 1.0f / (1.0f + (0.5f * 0.70710678118654752f) * ax);
  vf q = splat(0.22729790627151214f);
  q = q * t - 1.0915157511364482f;
  q = q * t + 2.029270155344556f;
  q = q * t - 1.7333128222579735f;
  q = q * t + 0.6790469177044448f;
  q = q * t - 0.35339389632590446f;
  q = q * t + 0.14008598613933407f;
  q = q * t + 0.36741001154879904f;
  q = q * t + 1.0005802490433058f;
  q = q * t - 1.2655314265475066f;
  // -a^2 + q as hi + lo, exactly: Dekker's product (|x| = high + low in 12-bit halves, whose products
  // are exact), halved, and Knuth's two-sum, so that exp sees the large exponent without rounding error
  const vf high = as_vf(as_vi(ax) & -4096);
  const vf low = ax - high;
  const vf x2 = ax * ax;
  const vf a2 = 0.5f * x2;
  const vf a2_low = 0.5f * (((high * high - x2) + 2.0f * high * low) + low * low);
  const vf hi = q - a2;
  const vf q_part = hi + a2;
  const vf sum_error = (q - q_part) + (-a2 - (hi - q_part));
  return t * exp_sum(hi, sum_error - a2_low);
}

// Phi(x) = P(N(0,1) <= x), the standard normal CDF, to float32 rounding in both tails.
inline vf normal_cdf(vf x) {
  const vf ax = vmax(x, -x);
  const vf a = ax * 0.70710678118654752f;
  const vi small = a < kSmall;
  // erfc(15 / sqrt(2)) is 0 in float32 already; the clamp keeps inf out of the arithmetic
  const vf half_erfc = 0.5f * erfc_large(vmin(vmax(ax, splat(kSmall * 1.41421356237309505f)), splat(15.0f)));
  const vf half_erf = 0.5f * erf_small(vmin(a, splat(kSmall)));
  const vf upper = select(small, 0.5f + half_erf, 1.0f - half_erfc);  // Phi(|x|)
  const vf lower = select(small, 0.5f - half_erf, half_erfc);         // Phi(-|x|)
  return select(x < 0.0f, lower, upper);
}

constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kQuick = 1.702f;

inline vf gelu_tanh_arg(vf x) { return 2.0f * kSqrt2OverPi * (x + kTanhCubic * x * x * x); }

inline vf gelu_tanh_gate(vf x) { return sigmoid(gelu_tanh_arg(x)); }  // 0.5 * (1 + tanh(u)) == sigmoid(2u)

// sigmoid(v) and sigmoid'(v) = s (1 - s); for v > 0 the latter as e s^2 with e = exp(-v), no cancellation
// when s is near 1 (for v < 0, e may be inf and s (1 - s) is exact enough)
struct Sigmoid {
  vf s;
  vf ds;
};

inline Sigmoid sigmoid_and_slope(vf v) {
  const vf e = vexp(-v);
  const vf s = 1.0f / (1.0f + e);
  return {s, select(v > 0.0f, e * s * s, s - s * s)};
}

template <typename F>
int unary(void **params, int *ndims, int64_t **shapes, F f) {
  map1(static_cast<const float *>(params[0]), static_cast<float *>(params[1]), elements(ndims[0], shapes[0]), f);
  return 0;
}

template <typename F>
int binary(void **params, int *ndims, int64_t **shapes, F f) {
  map2(static_cast<const float *>(params[0]), static_cast<const float *>(params[1]), static_cast<float *>(params[2]),
       elements(ndims[0], shapes[0]), f);
  return 0;
}

}  // namespace

extern "C" {

int GeluErf(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return unary(params, ndims, shapes, [](vf x) { return x * normal_cdf(x); });
}

// inputs x, dy -> dx = dy * (Phi(x) + x phi(x))
int GeluErfGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return binary(params, ndims, shapes, [](vf x, vf dy) {
    return dy * (normal_cdf(x) + x * kInvSqrt2Pi * vexp(-0.5f * x * x));
  });
}

int GeluTanh(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return unary(params, ndims, shapes, [](vf x) { return x * gelu_tanh_gate(x); });
}

int GeluTanhGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return binary(params, ndims, shapes, [](vf x, vf dy) {
    const Sigmoid g = sigmoid_and_slope(gelu_tanh_arg(x));
    const vf du = 2.0f * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x * x);
    return dy * (g.s + x * g.ds * du);
  });
}

int QuickGelu(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return unary(params, ndims, shapes, [](vf x) { return x * sigmoid(kQuick * x); });
}

int QuickGeluGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return binary(params, ndims, shapes, [](vf x, vf dy) {
    const Sigmoid g = sigmoid_and_slope(kQuick * x);
    return dy * (g.s + kQuick * x * g.ds);
  });
}

int Silu(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return unary(params, ndims, shapes, [](vf x) { return x * sigmoid(x); });
}

int SiluGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return binary(params, ndims, shapes, [](vf x, vf dy) {
    const Sigmoid g = sigmoid_and_slope(x);
    return dy * (g.s + x * g.ds);
  });
}

// inputs gate, up -> silu(gate) * up (SwiGLU)
int SiluMul(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  return binary(params, ndims, shapes, [](vf g, vf u) { return g * sigmoid(g) * u; });
}

// inputs gate, up, dy -> d gate, d up
int SiluMulGrad(int, void **params, int *ndims, int64_t **shapes, const char **, void *, void *) {
  const int64_t n = elements(ndims[0], shapes[0]);
  const float *gate = static_cast<const float *>(params[0]);
  const float *up = static_cast<const float *>(params[1]);
  const float *dy = static_cast<const float *>(params[2]);
  float *dgate = static_cast<float *>(params[3]);
  float *dup = static_cast<float *>(params[4]);
  const auto one = [](vf g, vf u, vf d, vf &dg, vf &du) {
    const Sigmoid sg = sigmoid_and_slope(g);
    dg = d * u * (sg.s + g * sg.ds);
    du = d * g * sg.s;
  };
  const int64_t blocks = n / kLanes;
  parallel_for(blocks, kParallelElements / kLanes, [&](int, int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t i = b * kLanes;
      vf dg, du;
      one(load(gate + i), load(up + i), load(dy + i), dg, du);
      store(dgate + i, dg);
      store(dup + i, du);
    }
  });
  const int64_t i = blocks * kLanes;
  if (i < n) {
    vf dg, du;
    one(load_part(gate + i, n - i), load_part(up + i, n - i), load_part(dy + i, n - i), dg, du);
    store_part(dgate + i, dg, n - i);
    store_part(dup + i, du, n - i);
  }
  return 0;
}

}  // extern "C"
