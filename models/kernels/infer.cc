// Output shapes and dtypes of every kernel, called by MindSpore from C++ (ops.Custom with out_shape and
// out_dtype None). Python infer functions fail in the graphs MindSpore compiles at run time (its AnyType
// kernel actors), where the op is no longer a Python primitive ("The prim is not a PrimitivePy").
#include <cstdint>
#include <initializer_list>
#include <vector>

class AotExtra;
enum TypeId : int {};

namespace {

std::vector<int64_t> shape_of(int *ndims, int64_t **shapes, int input) {
  return std::vector<int64_t>(shapes[input], shapes[input] + ndims[input]);
}

}  // namespace

// One output shaped and typed like the first input.
#define LIKE_INPUT0(name)                                                                         \
  extern "C" std::vector<int64_t> name##InferShape(int *ndims, int64_t **shapes, AotExtra *) { \
    return shape_of(ndims, shapes, 0);                                                          \
  }                                                                                             \
  extern "C" TypeId name##InferType(std::vector<TypeId> types, AotExtra *) { return types[0]; }

// Several outputs, shaped like the listed inputs, all typed like the first input.
#define LIKE_INPUTS(name, ...)                                                                                 \
  extern "C" std::vector<std::vector<int64_t>> name##InferShape(int *ndims, int64_t **shapes, AotExtra *) { \
    std::vector<std::vector<int64_t>> out;                                                                   \
    for (int input : {__VA_ARGS__}) out.push_back(shape_of(ndims, shapes, input));                         \
    return out;                                                                                              \
  }                                                                                                          \
  extern "C" std::vector<TypeId> name##InferType(std::vector<TypeId> types, AotExtra *) {                   \
    return std::vector<TypeId>(std::initializer_list<int>{__VA_ARGS__}.size(), types[0]);                    \
  }

LIKE_INPUT0(GeluErf)
LIKE_INPUT0(GeluErfGrad)
LIKE_INPUT0(GeluTanh)
LIKE_INPUT0(GeluTanhGrad)
LIKE_INPUT0(QuickGelu)
LIKE_INPUT0(QuickGeluGrad)
LIKE_INPUT0(Silu)
LIKE_INPUT0(SiluGrad)
LIKE_INPUT0(SiluMul)
LIKE_INPUT0(MoeExperts)
LIKE_INPUTS(SiluMulGrad, 0, 1)
LIKE_INPUT0(LayerNorm)
LIKE_INPUTS(LayerNormGrad, 0, 1, 1)
LIKE_INPUT0(RmsNorm)
LIKE_INPUTS(RmsNormGrad, 0, 1)
LIKE_INPUT0(Rotary)
LIKE_INPUT0(RotaryGrad)

// softmax (x's shape) and its log-sum-exp (x's shape without the last axis), from x and maybe a bias.
#define SOFTMAX_LSE(name)                                                                                      \
  extern "C" std::vector<std::vector<int64_t>> name##InferShape(int *ndims, int64_t **shapes, AotExtra *) { \
    std::vector<int64_t> rows = shape_of(ndims, shapes, 0);                                                  \
    if (!rows.empty()) rows.pop_back();                                                                      \
    return {shape_of(ndims, shapes, 0), rows};                                                               \
  }                                                                                                          \
  extern "C" std::vector<TypeId> name##InferType(std::vector<TypeId> types, AotExtra *) {                   \
    return {types[0], types[0]};                                                                             \
  }

SOFTMAX_LSE(SoftmaxLse)
SOFTMAX_LSE(SoftmaxLseBias)
