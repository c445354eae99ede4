// Calls torchext ops through the PyTorch dispatcher from C++, as a LibTorch program would,
// and checks each result against arithmetic done here. Usage: test_dispatcher libtorchext_ops.so
#include <dlfcn.h>
#include <torch/csrc/stable/library.h>
#include <torch/csrc/stable/ops.h>
#include <torch/csrc/stable/tensor.h>

#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>

#include "kernels/q8_1_rows.h"

using torch::headeronly::ScalarType;
using torch::stable::Tensor;
namespace sd = torch::stable::detail;

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s: %s\n", ok ? "ok  " : "FAIL", what.c_str());
  failures += ok ? 0 : 1;
}

template <size_t N>
AOTITorchError call(const char* op, std::array<StableIValue, N>& stack) {
  return torch_call_dispatcher(op, "", stack.data(), TORCH_ABI_VERSION);
}

Tensor float_tensor(std::initializer_list<int64_t> shape) { return torch::stable::empty(shape, ScalarType::Float); }

void test_quantize_q8_1() {
  Tensor x = float_tensor({2, 300});
  float* p = static_cast<float*>(x.data_ptr());
  for (int i = 0; i < 600; ++i) p[i] = float((i * 37) % 101 - 50) / 8.0f;
  std::array<StableIValue, 1> stack{sd::from(x)};
  expect(call("torchext::quantize_q8_1", stack) == TORCH_SUCCESS, "quantize_q8_1 runs");
  Tensor q = sd::to<Tensor>(stack[0]);
  expect(q.dim() == 2 && q.size(0) == 2 && q.size(1) == 16 * 36, "quantize_q8_1 pads 300 values to 16 blocks");
  const auto* b = static_cast<const torchext::block_q8_1*>(q.data_ptr());
  float amax = 0.0f;
  for (int l = 0; l < 32; ++l) amax = std::fmax(amax, std::fabs(p[l]));
  bool qs_ok = true;
  for (int l = 0; l < 32; ++l) qs_ok &= b[0].qs[l] == int8_t(std::round(p[l] / torchext::q8_1_scale(amax)));
  const torchext::Q8Scales s = torchext::Q8Scales::of_word(b[0].scale);
  int sum_qs = 0;
  for (int l = 0; l < 32; ++l) sum_qs += b[0].qs[l];
  expect(s.d == torchext::q8_1_scale(amax) && s.s * torchext::kQ8SumScale == s.d * float(sum_qs) && qs_ok,
         "quantize_q8_1 block 0: d = amax/127 (rounded up to 10 mantissa bits), qs = round(x/d), d * sum(qs) "
         "(scaled by 1 / kQ8SumScale)");
  bool pad_zero = true;
  for (int l = 0; l < 32; ++l) pad_zero &= b[15].qs[l] == 0;  // values 480..511 of row 0 are all padding
  expect(pad_zero && b[15].scale == 0, "quantize_q8_1 zero-pads past K");
}

void test_qmatmul_q8_0() {
  // A Q8_0 weight with d = 1 and small integer quants times integer activations: exact result.
  const int64_t n = 3, k = 64;
  Tensor w = torch::stable::empty({n, k / 32 * 34}, ScalarType::Byte);
  auto* blocks = static_cast<torchext::block_q8_0*>(w.data_ptr());
  for (int64_t i = 0; i < n * k / 32; ++i) {
    blocks[i].d = torchext::float_to_fp16(1.0f);
    for (int l = 0; l < 32; ++l) blocks[i].qs[l] = int8_t((i * 7 + l) % 9 - 4);
  }
  Tensor x = float_tensor({1, k});
  float* xp = static_cast<float*>(x.data_ptr());
  for (int l = 0; l < k; ++l) xp[l] = float(l % 5 - 2);
  xp[0] = 127.0f;  // block amax 127 makes d = 1 and Q8_1 lossless
  xp[32] = -127.0f;
  std::array<StableIValue, 5> stack{sd::from(w), sd::from(int64_t(torchext::QType::Q8_0)), sd::from(x), sd::from(n), sd::from(k)};
  expect(call("torchext::qmatmul", stack) == TORCH_SUCCESS, "qmatmul Q8_0 runs");
  Tensor y = sd::to<Tensor>(stack[0]);
  bool exact = y.numel() == n;
  for (int64_t i = 0; i < n && exact; ++i) {
    float ref = 0.0f;
    for (int l = 0; l < k; ++l) ref += float(blocks[i * 2 + l / 32].qs[l % 32]) * xp[l];
    exact &= static_cast<const float*>(y.data_ptr())[i] == ref;
  }
  expect(exact, "qmatmul Q8_0 equals the integer dot product");

  std::array<StableIValue, 5> bad{sd::from(w), sd::from(int64_t(99)), sd::from(x), sd::from(n), sd::from(k)};
  expect(call("torchext::qmatmul", bad) != TORCH_SUCCESS, "qmatmul rejects an unknown format id");
}

void test_gelu() {
  Tensor x = float_tensor({5});
  float* p = static_cast<float*>(x.data_ptr());
  const float v[5] = {-3.0f, -0.5f, 0.0f, 0.5f, 3.0f};
  std::memcpy(p, v, sizeof(v));
  std::array<StableIValue, 2> stack{sd::from(x), sd::from(std::string("none"))};
  expect(call("torchext::gelu", stack) == TORCH_SUCCESS, "gelu runs");
  Tensor y = sd::to<Tensor>(stack[0]);
  bool close = true;
  for (int i = 0; i < 5; ++i) {
    const double ref = 0.5 * v[i] * (1.0 + std::erf(v[i] / std::sqrt(2.0)));
    close &= std::fabs(static_cast<const float*>(y.data_ptr())[i] - ref) < 1e-6;
  }
  expect(close, "gelu matches 0.5 x (1 + erf(x / sqrt 2))");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 || dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "usage: test_dispatcher LIBRARY (%s)\n", dlerror());
    return 2;
  }
  test_quantize_q8_1();
  test_qmatmul_q8_0();
  test_gelu();
  std::printf("%d failed\n", failures);
  return failures == 0 ? 0 : 1;
}
