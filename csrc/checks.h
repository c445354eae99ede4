// Argument checks shared by every backend. Each message names the argument and says what
// was expected; all raise RuntimeError in Python.
#pragma once

#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/tensor.h>
#include <torch/headeronly/core/ScalarType.h>

#include <climits>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "kernels/activation_math.h"
#include "kernels/expert_slots.h"
#include "kernels/float_types.h"
#include "kernels/quant_traits.h"
#include "kernels/row_index.h"

namespace torchext {

using torch::headeronly::ScalarType;
using torch::stable::Tensor;

// One part of an error message. Numbers go through printf (std::to_string, snprintf), not iostreams:
// an ostream needs libstdc++'s locale, which a copy of libstdc++ linked statically into this library
// (seen with GCC 13 on Ubuntu 24.04) never initialises, so `stream << n` segfaulted there. Floating
// point as %g, as Python writes them (-1e+39, not to_string's 40 digits).
inline void append_part(std::string& s, const char* part) { s += part; }
inline void append_part(std::string& s, const std::string& part) { s += part; }
template <class T, std::enable_if_t<std::is_arithmetic_v<T>, int> = 0>
void append_part(std::string& s, T part) {
  if constexpr (std::is_floating_point_v<T>) {
    char text[32];
    std::snprintf(text, sizeof text, "%g", double(part));
    s += text;
  } else {
    s += std::to_string(part);
  }
}

// Raises RuntimeError with exactly the message given: it starts with the argument's name
// (STD_TORCH_CHECK would put the C++ function, file and line in front of it).
template <class... Args>
[[noreturn]] void fail(const Args&... parts) {
  std::string message;
  (append_part(message, parts), ...);
  throw std::runtime_error(message);
}

#define TORCHEXT_CHECK(cond, ...) \
  do {                            \
    if (!(cond)) ::torchext::fail(__VA_ARGS__); \
  } while (0)

inline const char* dtype_name(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return "float32";
    case ScalarType::Half: return "float16";
    case ScalarType::BFloat16: return "bfloat16";
    case ScalarType::Byte: return "uint8";
    case ScalarType::Char: return "int8";
    case ScalarType::Int: return "int32";
    case ScalarType::Long: return "int64";
    case ScalarType::Double: return "float64";
    case ScalarType::Bool: return "bool";
    case ScalarType::Short: return "int16";
    case ScalarType::ComplexFloat: return "complex64";
    case ScalarType::ComplexDouble: return "complex128";
    default: return "an unsupported dtype";
  }
}

inline const char* qtype_name(QType t) {
  switch (t) {
#define TORCHEXT_QTYPE_NAME(name, id, cpu_gemv_rows, wgmma_rows) \
  case QType::name:                                              \
    return #name;
    TORCHEXT_WEIGHT_FORMATS(TORCHEXT_QTYPE_NAME)
#undef TORCHEXT_QTYPE_NAME
    case QType::Q8_1: return "Q8_1";
    default: return "unknown";
  }
}

// "Q4_0, Q4_1, ... or Q6_K": the catalog's weight formats, for error messages.
inline std::string weight_format_list() {
  std::string list;
  const char* names[] = {
#define TORCHEXT_QTYPE_STRING(name, id, cpu_gemv_rows, wgmma_rows) #name,
      TORCHEXT_WEIGHT_FORMATS(TORCHEXT_QTYPE_STRING)
#undef TORCHEXT_QTYPE_STRING
  };
  const size_t count = sizeof(names) / sizeof(names[0]);
  for (size_t i = 0; i < count; ++i) list += std::string(i == 0 ? "" : i + 1 == count ? " or " : ", ") + names[i];
  return list;
}

// The error for a format id that no kernel handles (the op checks catch it first; this is every
// dispatch's default).
[[noreturn]] inline void fail_unknown_format(QType t, const char* what) {
  fail(what, ": no kernel for weight format id ", int64_t(t), " (", qtype_name(t), "); expected ",
       weight_format_list());
}

// Block geometry of a weight format, read off its traits.
struct FormatInfo {
  QType type;
  int64_t values;  // per block
  int64_t bytes;   // per block
  int64_t align;   // alignment every block keeps when the first one has it
};

inline FormatInfo format_info(int64_t qtype, const char* arg = "qtype") {
  FormatInfo info{};
  const bool known = visit_weight_format(QType(qtype), [&](auto traits) {
    using T = decltype(traits);
    info = FormatInfo{QType(qtype), T::kValues, T::kBytes, T::kAlign};
  });
  TORCHEXT_CHECK(known, arg, ": unknown or unsupported weight format id ", qtype,
                  " (expected a gguf GGMLQuantizationType of ", weight_format_list(), ")");
  return info;
}

// a * b, or an error naming what overflowed int64 (a wrapped product once let a 144-byte weight
// pass as 2^60 + 1 rows and be read far out of bounds).
inline int64_t checked_mul(int64_t a, int64_t b, const char* what) {
  int64_t p = 0;
  TORCHEXT_CHECK(!__builtin_mul_overflow(a, b, &p), what, ": the size overflows int64 (", a, " x ", b, ")");
  return p;
}

// Whether a row of k values is whole blocks, as a format requires unless it is one of the 256-value
// formats, whose last block may run past k (the k-quants' zero padding); otherwise the error.
inline void check_whole_blocks(const FormatInfo& f, int64_t k, const char* arg) {
  TORCHEXT_CHECK(f.values == kSuperBlock || k % f.values == 0, arg, ": ", qtype_name(f.type), " rows are whole ",
                 f.values, "-value blocks, so k must be a multiple of ", f.values, "; got ", k);
}

// Bytes of one row of k > 0 values: ceil(k / values) blocks (no overflow: k / values + 1 <= k).
inline int64_t row_bytes(const FormatInfo& f, int64_t k) {
  return checked_mul(k / f.values + (k % f.values != 0), f.bytes, "k");
}

// The kernels' element type for a torch dtype; nullopt for a dtype they do not take.
inline std::optional<FloatType> float_type_of(ScalarType t) {
  switch (t) {
    case ScalarType::Float: return FloatType::F32;
    case ScalarType::Half: return FloatType::F16;
    case ScalarType::BFloat16: return FloatType::BF16;
    default: return std::nullopt;
  }
}

// The torch dtype of an element type (float_type_of's inverse).
inline ScalarType scalar_type_of(FloatType t) {
  switch (t) {
    case FloatType::F16: return ScalarType::Half;
    case FloatType::BF16: return ScalarType::BFloat16;
    default: return ScalarType::Float;
  }
}

// The element type of an op's output `dtype` argument (callers map None to float32 first).
inline FloatType output_float_type(ScalarType dtype) {
  const std::optional<FloatType> f = float_type_of(dtype);
  TORCHEXT_CHECK(f, "dtype: expected float32, float16 or bfloat16, got ", dtype_name(dtype));
  return *f;
}

inline FloatType float_type(const Tensor& t, const char* arg) {
  const std::optional<FloatType> f = float_type_of(t.scalar_type());
  TORCHEXT_CHECK(f, arg, ": expected a float32, float16 or bfloat16 tensor, got ", dtype_name(t.scalar_type()));
  return *f;
}

inline void check_defined_contiguous(const Tensor& t, const char* arg) {
  TORCHEXT_CHECK(t.defined(), arg, ": expected a tensor, got None");
  TORCHEXT_CHECK(t.is_contiguous(), arg, ": expected a contiguous tensor (call .contiguous() first)");
}

inline void check_same_device(const Tensor& a, const char* a_name, const Tensor& b, const char* b_name) {
  TORCHEXT_CHECK(a.is_cpu() == b.is_cpu() && a.get_device_index() == b.get_device_index(), a_name, " and ",
                  b_name, ": expected tensors on the same device, got ", a_name, " on ",
                  a.is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(a.get_device_index()), " and ", b_name,
                  " on ", b.is_cpu() ? std::string("cpu") : "cuda:" + std::to_string(b.get_device_index()));
}

inline void check_alignment(const Tensor& t, int64_t align, const char* arg, const char* why) {
  TORCHEXT_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % uintptr_t(align) == 0, arg,
                  ": storage must be ", align, "-byte aligned (", why, "); got an address ",
                  reinterpret_cast<uintptr_t>(t.data_ptr()) % uintptr_t(align), " bytes past that");
}

inline void check_shape_nk(int64_t n, int64_t k) {
  TORCHEXT_CHECK(n > 0, "n: expected a positive number of output rows, got ", n);
  TORCHEXT_CHECK(k > 0, "k: expected a positive row length, got ", k);
}

// What every quantized weight check starts with: a known format, n, k > 0, whole blocks of k, and
// the weight a defined, contiguous uint8 tensor. Its shape is the caller's to check.
inline FormatInfo check_weight_bytes(const Tensor& w, int64_t qtype, int64_t n, int64_t k, const char* arg) {
  const FormatInfo f = format_info(qtype);
  check_shape_nk(n, k);
  check_whole_blocks(f, k, "k");
  check_defined_contiguous(w, arg);
  TORCHEXT_CHECK(w.scalar_type() == ScalarType::Byte, arg, ": expected raw ", qtype_name(f.type),
                  " bytes as a uint8 tensor, got ", dtype_name(w.scalar_type()));
  return f;
}

// A quantized weight: uint8, contiguous, exactly n rows of ceil(k / values) blocks.
inline FormatInfo check_weight(const Tensor& w, int64_t qtype, int64_t n, int64_t k, const char* arg = "w") {
  const FormatInfo f = check_weight_bytes(w, qtype, n, k, arg);
  const int64_t expected = checked_mul(n, row_bytes(f, k), "n");
  TORCHEXT_CHECK(w.numel() == expected, arg, ": expected ", expected, " bytes for ", qtype_name(f.type),
                  " with n=", n, ", k=", k, " (", n, " rows of ", row_bytes(f, k), " bytes), got ", w.numel());
  check_alignment(w, f.align, arg, "the alignment of its blocks");
  return f;
}

// Float activations [..., k].
inline FloatType check_activations(const Tensor& x, int64_t k, const char* arg = "x") {
  check_defined_contiguous(x, arg);
  const FloatType t = float_type(x, arg);
  TORCHEXT_CHECK(x.dim() >= 1, arg, ": expected at least one dimension [..., K], got a scalar");
  TORCHEXT_CHECK(x.size(x.dim() - 1) == k, arg, ": expected the last dimension to be k=", k, ", got ",
                  x.size(x.dim() - 1));
  return t;
}

// Activations [..., K] with K > 0, the input of every op that produces Q8_1 activations.
inline FloatType check_q8_1_source(const Tensor& x, const char* arg) {
  TORCHEXT_CHECK(x.defined() && x.dim() >= 1, arg, ": expected activations of shape [..., K]");
  const int64_t k = x.size(x.dim() - 1);
  TORCHEXT_CHECK(k > 0, arg, ": expected a positive last dimension (K), got ", k);
  return check_activations(x, k, arg);
}

// "[2, 640]", as Python prints list(t.shape).
inline std::string shape_string(const Tensor& t) {
  std::string s = "[";
  for (int64_t d = 0; d < t.dim(); ++d) s += (d ? ", " : "") + std::to_string(t.size(d));
  return s + "]";
}

// t, a second input of ref's dtype and shape (no broadcasting), contiguous, on ref's device.
inline void check_like(const Tensor& t, const char* arg, const Tensor& ref, const char* ref_arg) {
  check_defined_contiguous(t, arg);
  TORCHEXT_CHECK(t.scalar_type() == ref.scalar_type(), arg, ": expected the dtype of ", ref_arg, " (",
                  dtype_name(ref.scalar_type()), "), got ", dtype_name(t.scalar_type()));
  TORCHEXT_CHECK(t.sizes().equals(ref.sizes()), arg, ": expected the shape of ", ref_arg, " ", shape_string(ref),
                  ", got ", shape_string(t));
  check_same_device(ref, ref_arg, t, arg);
}

// A norm's weight for x [..., k]: [k], float32 or x's dtype, on x's device.
inline FloatType check_norm_weight(const Tensor& weight, const char* arg, const Tensor& x, int64_t k) {
  check_defined_contiguous(weight, arg);
  TORCHEXT_CHECK(weight.scalar_type() == ScalarType::Float || weight.scalar_type() == x.scalar_type(), arg,
                  ": expected float32 or the dtype of x (", dtype_name(x.scalar_type()), "), got ",
                  dtype_name(weight.scalar_type()));
  TORCHEXT_CHECK(weight.dim() == 1 && weight.size(0) == k, arg, ": expected shape [", k,
                  "] (x's last dimension), got ", shape_string(weight));
  check_same_device(x, "x", weight, arg);
  return float_type(weight, arg);
}

inline void check_eps(double eps) {
  // fp32 holds it (the kernels add it in fp32), and a NaN fails both comparisons
  TORCHEXT_CHECK(eps >= 0.0 && eps <= 3.4028234663852886e38, "eps: expected a number >= 0 that float32 holds");
}

// Bytes of a Q8_1 row of k > 0 values: k padded to whole 256-value super-blocks, 36 bytes per 32 values
// (an error naming `what` where they overflow int64).
inline int64_t q8_1_row_bytes(int64_t k, const char* what) {
  return checked_mul(k / kSuperBlock + (k % kSuperBlock != 0), kSuperBlock / kQ8Block * int64_t(sizeof(block_q8_1)),
                     what);
}

// Q8_1 activations [..., q8_1_row_bytes(k)], as quantize_q8_1 makes them.
inline void check_q8_1(const Tensor& xq, int64_t k, const char* arg = "xq") {
  check_defined_contiguous(xq, arg);
  TORCHEXT_CHECK(xq.scalar_type() == ScalarType::Byte, arg, ": expected Q8_1 bytes as a uint8 tensor, got ",
                  dtype_name(xq.scalar_type()));
  TORCHEXT_CHECK(xq.dim() >= 1, arg, ": expected at least one dimension [..., bytes], got a scalar");
  const int64_t expected = q8_1_row_bytes(k, "k");
  TORCHEXT_CHECK(xq.size(xq.dim() - 1) == expected, arg, ": expected the last dimension to be ", expected,
                  " bytes (k=", k, " padded to whole 256-value super-blocks, 36 bytes per 32 values), got ",
                  xq.size(xq.dim() - 1));
  check_alignment(xq, 4, arg, "Q8_1 quants are read as 32-bit words");
}

// The operands of qmatmul_id: the experts' weights [E, n, row bytes], activations x [T, k] (read by
// every slot of a token) or [T, top_k, k] (one row per slot), expert ids [T, top_k].
struct MatmulIdOperands {
  FormatInfo format;
  FloatType xt;
  int64_t tokens;
  ExpertSlots slots;
};

inline MatmulIdOperands check_matmul_id(const Tensor& w, int64_t qtype, const Tensor& x, const Tensor& ids, int64_t n,
                                        int64_t k) {
  const FormatInfo f = check_weight_bytes(w, qtype, n, k, "w");
  const int64_t rb = row_bytes(f, k);
  TORCHEXT_CHECK(w.dim() == 3 && w.size(0) > 0 && w.size(1) == n && w.size(2) == rb, "w: expected ",
                  qtype_name(f.type), " experts of shape [E, n, row bytes] = [E, ", n, ", ", rb, "] with E > 0, got ",
                  shape_string(w));
  TORCHEXT_CHECK(w.size(0) <= kMaxExperts, "w: at most ", kMaxExperts, " experts, got ", w.size(0));
  check_alignment(w, f.align, "w", "the alignment of its blocks");
  const FloatType xt = check_activations(x, k);
  TORCHEXT_CHECK(x.dim() == 2 || x.dim() == 3, "x: expected [T, k] or [T, top_k, k], got ", x.dim(), " dimensions");
  check_defined_contiguous(ids, "ids");
  TORCHEXT_CHECK(ids.scalar_type() == ScalarType::Long || ids.scalar_type() == ScalarType::Int,
                  "ids: expected int64 or int32 expert ids, got ", dtype_name(ids.scalar_type()));
  TORCHEXT_CHECK(ids.dim() == 2 && ids.size(0) == x.size(0) && (x.dim() == 2 || x.size(1) == ids.size(1)),
                  "ids: expected [T, top_k] for x of shape [T, k] or [T, top_k, k], got ids ", shape_string(ids),
                  " and x ", shape_string(x));
  check_same_device(w, "w", x, "x");
  check_same_device(w, "w", ids, "ids");
  const int64_t slots = checked_mul(ids.size(0), ids.size(1), "ids");
  TORCHEXT_CHECK(slots <= INT32_MAX, "ids: at most 2^31 - 1 slots (T x top_k), got ", slots);
  const RowIndex id_rows{ids.data_ptr(), ids.scalar_type() == ScalarType::Long};
  return {f, xt, ids.size(0), ExpertSlots{id_rows, slots, w.size(0), ids.size(1), x.dim() == 3}};
}

inline bool parse_approximate(const std::string& approximate) {
  TORCHEXT_CHECK(approximate == "none" || approximate == "tanh",
                  "approximate: expected 'none' or 'tanh' (as torch.nn.functional.gelu), got '", approximate, "'");
  return approximate == "tanh";
}

inline GateActivation gelu_activation(const std::string& approximate) {
  return parse_approximate(approximate) ? GateActivation::GeluTanh : GateActivation::GeluErf;
}

}  // namespace torchext
