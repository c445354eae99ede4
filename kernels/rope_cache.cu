// rope_cache_write on CUDA: a warp a head of one (batch, row): q's heads, k's, and v's to copy. A
// decode step has few heads (Gemma 3 270M: 4 + 1 + 1 a row), so the kernel's time is its chain of
// memory round trips, not its arithmetic: each lane issues all its loads of a step at once (unrolled
// register arrays), and a head of up to 256 values takes three round trips (the position; the head,
// its table rows and weights together with the norm's values; the stores).
#include "kernels/launch.cuh"
#include "kernels/rope_cache.cuh"

namespace torchext {
namespace {

constexpr int kWarps = 4;
constexpr int kThreads = kWarps * kWarp;
constexpr int kLaneValues = 8;  // values a lane loads at once for the sum of squares and v's copy (a head of 256)
constexpr int kPairs = 4;        // pairs (i, i + dim/2) a lane rotates at once (a head of 256)
constexpr float kNaN = __builtin_nanf("");

// The sum of squares of head x (values x0 ..) in fused_q8_1_math.h's order, on every lane: lane l
// adds values l, l + 32, ... (the CPU's partial sum l), then the partial sums are folded in halves.
template <FloatType kT>
__device__ float head_sum_squares(const void* x, int64_t x0, int64_t dim) {
  static_assert(kRmsLanes == kWarp, "lane l keeps partial sum l of fused_q8_1_math.h's order");
  const int lane = threadIdx.x % kWarp;
  float partial = 0.0f;
  for (int64_t base = lane; base < dim; base += kWarp * kLaneValues) {
    float v[kLaneValues];
#pragma unroll
    for (int j = 0; j < kLaneValues; ++j) {
      const int64_t i = base + j * kWarp;
      v[j] = i < dim ? load_float(x, x0 + i, kT) : 0.0f;  // + 0 * 0 leaves the partial sum (>= +0) as it is
    }
#pragma unroll
    for (int j = 0; j < kLaneValues; ++j) partial = add_rn(partial, mul_rn(v[j], v[j]));
  }
#pragma unroll
  for (int h = kWarp / 2; h > 0; h /= 2) partial = add_rn(partial, __shfl_xor_sync(0xffffffffu, partial, h));
  return partial;
}

// A lane's kPairs pairs (i, i + dim/2), i = base, base + 32, ..., of a head: its values, the table
// rows' cos and sin and the norm's weights, loaded together; then normed (by `inverse` and the
// weights, when the norm has them), rotated and stored.
template <FloatType kT>
struct PairChunk {
  float lo[kPairs], hi[kPairs], c_lo[kPairs], s_lo[kPairs], c_hi[kPairs], s_hi[kPairs], w_lo[kPairs], w_hi[kPairs];

  __device__ void load(const void* x, int64_t x0, HeadNorm norm, const float* cos, const float* sin, int64_t half,
                       int64_t base) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int64_t i = base + j * kWarp;
      if (i >= half) break;
      lo[j] = load_float(x, x0 + i, kT), hi[j] = load_float(x, x0 + i + half, kT);
      c_lo[j] = cos[i], s_lo[j] = sin[i], c_hi[j] = cos[i + half], s_hi[j] = sin[i + half];
      if (norm.weight) {
        w_lo[j] = load_float(norm.weight, i, norm.type);
        w_hi[j] = load_float(norm.weight, i + half, norm.type);
      }
    }
  }

  __device__ void store(HeadNorm norm, float inverse, int64_t half, int64_t base, void* out, int64_t out0) {
#pragma unroll
    for (int j = 0; j < kPairs; ++j) {
      const int64_t i = base + j * kWarp;
      if (i >= half) break;
      float x_lo = lo[j], x_hi = hi[j];
      if (norm.weight) {
        x_lo = rms_norm_value(x_lo, inverse, w_lo[j], kT);
        x_hi = rms_norm_value(x_hi, inverse, w_hi[j], kT);
      }
      float out_lo, out_hi;
      rotate_pair(x_lo, x_hi, c_lo[j], s_lo[j], c_hi[j], s_hi[j], out_lo, out_hi);
      store_float(out, out0 + i, kT, out_lo);
      store_float(out, out0 + i + half, kT, out_hi);
    }
  }
};

// Head x (values x0 ..) -> out (values out0 ..), both of type kT: RMS-normalised when norm.weight is
// set, then rotated by cos and sin [dim] (the position's table rows). The first chunk's loads are
// issued before the sum of squares' own, so that both wait together.
template <FloatType kT>
__device__ void norm_rotate_head(const void* x, int64_t x0, HeadNorm norm, float eps, const float* cos,
                                 const float* sin, int64_t dim, void* out, int64_t out0) {
  const int64_t half = dim / 2, first = threadIdx.x % kWarp;
  PairChunk<kT> chunk;
  chunk.load(x, x0, norm, cos, sin, half, first);
  const float inverse = norm.weight ? rms_inverse(head_sum_squares<kT>(x, x0, dim), dim, eps) : 1.0f;
  chunk.store(norm, inverse, half, first, out, out0);
  for (int64_t base = first + kWarp * kPairs; base < half; base += kWarp * kPairs) {
    chunk.load(x, x0, norm, cos, sin, half, base);
    chunk.store(norm, inverse, half, base, out, out0);
  }
}

// dim values of type kT from src to dst, their bits as they are; a lane's kLaneValues loads at once.
template <FloatType kT>
__device__ void copy_head(const void* src, int64_t src0, void* dst, int64_t dst0, int64_t dim) {
  using Value = std::conditional_t<kT == FloatType::F32, uint32_t, uint16_t>;
  const Value* from = static_cast<const Value*>(src) + src0;
  Value* to = static_cast<Value*>(dst) + dst0;
  for (int64_t base = threadIdx.x % kWarp; base < dim; base += kWarp * kLaneValues) {
    Value v[kLaneValues];
#pragma unroll
    for (int j = 0; j < kLaneValues; ++j)
      if (base + j * kWarp < dim) v[j] = from[base + j * kWarp];
#pragma unroll
    for (int j = 0; j < kLaneValues; ++j)
      if (base + j * kWarp < dim) to[base + j * kWarp] = v[j];
  }
}

// Warp w of the grid: head w % heads of row w / heads = b * rows + r, where a row's heads are q's,
// k's, then v's (a warp copies each v head: its loads do not wait behind k's stores).
template <FloatType kT>
__global__ void __launch_bounds__(kThreads)
    rope_cache_write_kernel(HeadRows q, HeadRows k, HeadRows v, const float* __restrict__ cos,
                            const float* __restrict__ sin, const int64_t* __restrict__ pos, HeadNorm q_norm,
                            HeadNorm k_norm, float eps, RopeShape s, void* __restrict__ q_out,
                            void* __restrict__ k_cache, void* __restrict__ v_cache) {
  const int64_t heads = s.heads + 2 * s.kv_heads;
  const int64_t w = int64_t(blockIdx.x) * kWarps + threadIdx.x / kWarp;
  allow_dependent_grids();
  wait_for_prior_grids();  // q, k, v and the positions come from the kernels before
  if (w >= s.batch * s.rows * heads) return;
  const int64_t h = w % heads, row = w / heads, b = row / s.rows, r = row % s.rows;
  const int64_t p = pos[r];
  const bool valid = p >= 0 && p < s.keys;  // checking on the host would synchronise
  if (h < s.heads) {
    const int64_t out0 = ((b * s.heads + h) * s.rows + r) * s.dim;
    if (!valid) {  // no table row to rotate by: a NaN row, as cached_attention gives such a position
      for (int64_t i = threadIdx.x % kWarp; i < s.dim; i += kWarp) store_float(q_out, out0 + i, kT, kNaN);
      return;
    }
    norm_rotate_head<kT>(q.data, b * q.batch_stride + r * q.row_stride + h * s.dim, q_norm, eps, cos + p * s.dim,
                         sin + p * s.dim, s.dim, q_out, out0);
    return;
  }
  if (!valid) return;  // the caches are left alone
  const int64_t kvh = (h - s.heads) % s.kv_heads;
  const int64_t cache0 = ((b * s.kv_heads + kvh) * s.keys + p) * s.dim;
  if (h < s.heads + s.kv_heads) {
    norm_rotate_head<kT>(k.data, b * k.batch_stride + r * k.row_stride + kvh * s.dim, k_norm, eps, cos + p * s.dim,
                         sin + p * s.dim, s.dim, k_cache, cache0);
  } else {
    copy_head<kT>(v.data, b * v.batch_stride + r * v.row_stride + kvh * s.dim, v_cache, cache0, s.dim);
  }
}

int64_t grid_ctas(const RopeShape& s) {
  return (s.batch * s.rows * (s.heads + 2 * s.kv_heads) + kWarps - 1) / kWarps;
}

template <FloatType kT>
cudaError_t launch(const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos, const float* sin,
                   const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps, const RopeShape& s, void* q_out,
                   void* k_cache, void* v_cache, cudaStream_t stream) {
  return launch_dependent(rope_cache_write_kernel<kT>, dim3(unsigned(grid_ctas(s))), dim3(kThreads), 0, stream, q, k,
                          v, cos, sin, pos, q_norm, k_norm, eps, s, q_out, k_cache, v_cache);
}

}  // namespace

bool rope_cache_write_fits_grid(const RopeShape& s) { return grid_ctas(s) <= kMaxGridX; }

cudaError_t launch_rope_cache_write(const HeadRows& q, const HeadRows& k, const HeadRows& v, const float* cos,
                                    const float* sin, const int64_t* pos, HeadNorm q_norm, HeadNorm k_norm, float eps,
                                    const RopeShape& s, FloatType t, void* q_out, void* k_cache, void* v_cache,
                                    cudaStream_t stream) {
  if (!rope_cache_write_fits_grid(s)) return cudaErrorInvalidValue;
  switch (t) {
    case FloatType::F16:
      return launch<FloatType::F16>(q, k, v, cos, sin, pos, q_norm, k_norm, eps, s, q_out, k_cache, v_cache, stream);
    case FloatType::BF16:
      return launch<FloatType::BF16>(q, k, v, cos, sin, pos, q_norm, k_norm, eps, s, q_out, k_cache, v_cache, stream);
    default:
      return launch<FloatType::F32>(q, k, v, cos, sin, pos, q_norm, k_norm, eps, s, q_out, k_cache, v_cache, stream);
  }
}

}  // namespace torchext
