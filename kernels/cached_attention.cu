// cached_attention on CUDA, as flash decoding: the cache is cut into spans of 2^shift (plan_spans) key
// positions; a CTA takes one span for one query row and the query heads of one head tile that read
// the same cache head (so each key and value is read once for all of them), and writes the span's
// softmax max, sum and weighted sum of values in fp32 (attention_span_kernel); merge_spans_kernel
// then combines each row's spans. A row whose visible keys lie in one span needs no merge: its CTA
// writes the output itself. A CUDA graph fixes the grid while the positions change, so the grid has
// a slot for every span a row can see: every span of the cache, or with a window of w keys the
// (w - 1) / span + 2 that w consecutive keys can touch, counted from the row's first visible span. A
// CTA whose slot holds no visible key returns before it reads anything, and the merge reads only the
// slots a row uses: the work follows the positions, not the cache's capacity. Both kernels write a row's
// output through an output policy (AttentionOut): the values in q's type, or the Q8_1 blocks that
// quantize_q8_1 makes of them (cached_attention_quantize_q8_1).
//
// Decode attention is latency-bound (a few KB a CTA, from L2): what counts is each warp's chain of
// dependent instructions and round trips. A warp takes kKeyBatch keys a round and issues the next
// round's loads before the current round's arithmetic; it keeps an online softmax in registers, and
// the CTA's warps combine theirs once at the end. Short spans keep a warp's chain short (ncu on the
// H200, 136 keys: 8 keys a warp took 2,400 instructions a warp at 6.4 cycles each, 13.7 us); both
// kernels are programmatic dependent launches (the merge is launched while the spans run); the merge
// spreads a row over its 32-value chunks and its spans over the CTA's threads.
#include "kernels/cached_attention.cuh"
#include "kernels/fused_q8_1_math.h"
#include "kernels/launch.cuh"
#include "kernels/quantize_q8_1_rows.cuh"

namespace torchext {
namespace {

constexpr int kWarps = 8;
constexpr int kThreads = kWarps * kWarp;
constexpr int kKeyBatch = 2;  // keys a warp takes a round
constexpr int kMaxDim = 256;  // a lane holds 8 of a row's values (the op checks dim % 8 == 0, dim <= 256)
constexpr int kMaxHeads = 4;  // query heads a CTA (a larger group takes several CTAs a span)
// A span is 2^shift keys, from one round a warp (16 keys) to 1024.
constexpr int kMinSpanShift = 4, kMaxSpanShift = 10;
static_assert(1 << kMinSpanShift == kWarps * kKeyBatch, "the shortest span is one round of every warp");
// Spans grow until the span CTAs (slots) number at most this, about one a streaming
// multiprocessor (132 on the H100 and H200; at ~180 registers a thread one CTA fills an SM's
// registers): a wave of short chains at full fill, and few enough spans for the merge to be short
// (ncu, H200, 8000 of 8192 keys: 512 spans of 16 keys took 22 us, and their merge 11 us).
constexpr int64_t kTargetCtas = 128;
constexpr int kMergeThreads = 128;
constexpr int kMergeWarps = kMergeThreads / kWarp;
constexpr int kMergeDims = 32;  // values of a row a merge CTA combines: 4 threads x 8

// Values i .. i+7 of an array of type kT as fp32 (i a multiple of 8: 16-byte aligned in a row of
// dim % 8 == 0 values), loaded raw first so that a warp can have several rows in flight.
template <FloatType kT>
struct Row8 {
  static constexpr int kWords = kT == FloatType::F32 ? 8 : 4;
  uint32_t w[kWords];
  __device__ __forceinline__ void load(const void* p, int64_t i) {
    const uint4* src = reinterpret_cast<const uint4*>(static_cast<const uint8_t*>(p) + i * (kWords / 2));
#pragma unroll
    for (int c = 0; c < kWords / 4; ++c) {
      const uint4 u = src[c];
      w[4 * c] = u.x, w[4 * c + 1] = u.y, w[4 * c + 2] = u.z, w[4 * c + 3] = u.w;
    }
  }
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int c = 0; c < kWords; ++c) w[c] = 0;
  }
  __device__ __forceinline__ float operator[](int e) const {
    if constexpr (kT == FloatType::F32) return __uint_as_float(w[e]);
    const uint16_t h = uint16_t(w[e / 2] >> (16 * (e % 2)));
    return kT == FloatType::F16 ? fp16_to_float(fp16_bits(h)) : bf16_to_float(h);
  }
};

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Where a row's spans keep their partial results: sums[(row * slots + slot) * dim + d], the weighted
// sums of values, and stats[row * slots + slot], the span's max score and sum of exp(score - max);
// row = (b * heads + h) * rows + r.
struct Partials {
  float* sums;
  float2* stats;
};

// Where a row's output goes. Row = (b * heads + h) * rows + r as in q; a thread holds its values col ..
// col+7 (col a multiple of 8). Every lane of a warp calls store, those with `active` false storing nothing
// (the Q8_1 store shuffles within quads of lanes).
template <FloatType kT, bool kQ8_1>
struct AttentionOut {
  static constexpr FloatType kType = kT;
  static __device__ __forceinline__ void store(void* out, const AttentionShape& s, int64_t row, int64_t col,
                                               const float (&v)[8], bool active) {
    if constexpr (!kQ8_1) {
      if (active) store_group8(out, kT, row * s.dim, col, s.dim, true, v);  // 16-byte aligned: col % 8 == 0
    } else {
      // quantize_q8_1 of out [B, H, T, D] read as [B, T, H * D]: the values rounded to kT, as the stored
      // output holds them; a quad's lanes hold the 32 values of one block, which lies inside one head
      // (dim % 32 == 0), block h * dim / 32 + col / 32 of row (b, r).
      float x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = active ? round_to(v[e], kT) : 0.0f;
      const Q8_1Quad quad = quantize_q8_1_quad(x);
      if (!active) return;
      const int64_t r = row % s.rows, bh = row / s.rows, h = bh % s.heads, b = bh / s.heads;
      const int64_t block = (b * s.rows + r) * q8_1_blocks_per_row(s.heads * s.dim) + (h * s.dim + col) / kQ8Block;
      store_q8_1_quad(static_cast<block_q8_1*>(out), block, int(col / 8 % 4), quad);
    }
  }
};

// CTA x = slot + slots * (row + rows * (head tile + tiles * (kv head + kv_heads * b))), one grid
// dimension (up to 2^31 - 1 CTAs, so each index fits 32 bits); kHeads query heads a tile. Slot i takes
// the row's i-th span from its first visible one.
template <class Out, int kHeads>
__global__ void __launch_bounds__(kThreads)
    attention_span_kernel(const void* __restrict__ q, const void* __restrict__ k, const void* __restrict__ v,
                          const int64_t* __restrict__ pos, int64_t window, float scale, AttentionShape s,
                          int span_shift, int64_t slots, Partials part, void* __restrict__ out) {
  constexpr FloatType kT = Out::kType;
  __shared__ float warp_max_score[kWarps][kHeads], warp_sum_weight[kWarps][kHeads];
  __shared__ float4 warp_values[kWarps][kHeads][kMaxDim / 4];
  const unsigned tiles = unsigned((s.group() + kHeads - 1) / kHeads);
  unsigned cta = blockIdx.x;
  const unsigned slot = cta % unsigned(slots);
  cta /= unsigned(slots);
  const unsigned r = cta % unsigned(s.rows);
  cta /= unsigned(s.rows);
  const unsigned tile = cta % tiles;
  cta /= tiles;
  const int64_t kvh = cta % unsigned(s.kv_heads), b = cta / unsigned(s.kv_heads);
  const int64_t h0 = kvh * s.group() + tile * kHeads;  // this CTA's first query head
  const int heads = int(s.group() - tile * kHeads < kHeads ? s.group() - tile * kHeads : kHeads);
  allow_dependent_grids();  // the merge may launch; it waits for this grid before it reads anything
  wait_for_prior_grids();   // q, pos and the caches' newest rows come from the kernels before
  const int64_t p = pos[r];
  if (p < 0 || p >= s.keys) return;  // the merge writes the row's NaNs
  int64_t lo, hi;
  visible_keys(p, window, lo, hi);
  const int64_t span = (lo >> span_shift) + slot;
  if (span > hi >> span_shift) return;
  // every key the row sees in this span: the CTA writes the output itself, and the merge skips the row
  const bool final = lo >> span_shift == hi >> span_shift;
  if (span << span_shift > lo) lo = span << span_shift;
  if (((span + 1) << span_shift) - 1 < hi) hi = ((span + 1) << span_shift) - 1;
  const int warp = threadIdx.x / kWarp, lane = threadIdx.x % kWarp;
  const int64_t cache_row0 = (b * s.kv_heads + kvh) * s.keys;  // row of key 0 in k and v
  const bool has_values = lane * 8 < s.dim;                     // lane l holds values 8l .. 8l+7 of a row

  float qv[kHeads][8];
#pragma unroll
  for (int i = 0; i < kHeads; ++i) {
    Row8<kT> raw;
    raw.zero();
    if (i < heads && has_values) raw.load(q, ((b * s.heads + h0 + i) * s.rows + r) * s.dim + lane * 8);
#pragma unroll
    for (int e = 0; e < 8; ++e) qv[i][e] = raw[e];
  }
  // This warp's online softmax over its keys: the largest score so far, the sum of exp(score - max)
  // and this lane's 8 values of the weighted sum, per head.
  float max_score[kHeads], sum_weight[kHeads], acc[kHeads][8];
#pragma unroll
  for (int i = 0; i < kHeads; ++i) {
    max_score[i] = -INFINITY, sum_weight[i] = 0.0f;
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;
  }
  // Warp w takes rounds w, w + kWarps, ... of kKeyBatch consecutive keys from the span's start (the
  // first visible key's round first); a key outside [lo, hi] weighs 0 and adds zeros, never garbage.
  struct Round {
    Row8<kT> k[kKeyBatch], v[kKeyBatch];
  };
  const auto load_round = [&](int64_t base, Round& rd) {
#pragma unroll
    for (int j = 0; j < kKeyBatch; ++j) {
      rd.k[j].zero(), rd.v[j].zero();
      if (has_values && base + j >= lo && base + j <= hi) {
        rd.k[j].load(k, (cache_row0 + base + j) * s.dim + lane * 8);
        rd.v[j].load(v, (cache_row0 + base + j) * s.dim + lane * 8);
      }
    }
  };
  constexpr int64_t kStride = kWarps * kKeyBatch;
  int64_t base = (span << span_shift) + warp * kKeyBatch;
  base += (lo - base > 0 ? (lo - base) / kStride : 0) * kStride;  // rounds wholly before lo skipped
  if (base + kKeyBatch <= lo) base += kStride;
  Round cur;
  if (base <= hi) load_round(base, cur);
  for (; base <= hi; base += kStride) {
    Round next;
    if (base + kStride <= hi) load_round(base + kStride, next);
    const Round& rd = cur;
#pragma unroll
    for (int i = 0; i < kHeads; ++i) {
      float score[kKeyBatch];
      float batch_max = max_score[i];
#pragma unroll
      for (int j = 0; j < kKeyBatch; ++j) {
        float dot = 0.0f;
#pragma unroll
        for (int e = 0; e < 8; ++e) dot = fmaf(qv[i][e], rd.k[j][e], dot);
        score[j] = base + j >= lo && base + j <= hi ? warp_sum(dot) * scale : -INFINITY;
        batch_max = nan_max(batch_max, score[j]);
      }
      const float rescale = attention_weight(max_score[i], batch_max);
      max_score[i] = batch_max;
      sum_weight[i] *= rescale;
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[i][e] *= rescale;
#pragma unroll
      for (int j = 0; j < kKeyBatch; ++j) {
        const float wgt = attention_weight(score[j], batch_max);
        sum_weight[i] += wgt;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = fmaf(wgt, rd.v[j][e], acc[i][e]);
      }
    }
    cur = next;
  }

  // The warps' softmaxes combined: rescaled to the CTA's max and added up; the row's output itself
  // when the span holds every key the row sees.
#pragma unroll
  for (int i = 0; i < kHeads; ++i) {
    if (lane == 0) warp_max_score[warp][i] = max_score[i], warp_sum_weight[warp][i] = sum_weight[i];
    if (has_values) {
      warp_values[warp][i][lane * 2] = make_float4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
      warp_values[warp][i][lane * 2 + 1] = make_float4(acc[i][4], acc[i][5], acc[i][6], acc[i][7]);
    }
  }
  __syncthreads();
  // Thread t = i * groups + g takes values 8g .. 8g+7 of head i's row: a quad of lanes holds a 32-value
  // chunk. Warps past the last item leave whole (Out::store is warp-collective).
  static_assert(kMaxHeads * kMaxDim / 8 <= kThreads, "a thread for each 8 values of the tile's rows");
  const int groups = int(s.dim / 8), item = threadIdx.x;
  if (warp * kWarp >= heads * groups) return;
  const bool active = item < heads * groups;
  const int i = active ? item / groups : 0, g = item % groups;
  float m = -INFINITY;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) m = nan_max(m, warp_max_score[w][i]);
  float sum[8] = {};
  float total = 0.0f;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) {
    const float f = attention_weight(warp_max_score[w][i], m);
    const float4 x0 = warp_values[w][i][2 * g], x1 = warp_values[w][i][2 * g + 1];
    sum[0] = fmaf(f, x0.x, sum[0]), sum[1] = fmaf(f, x0.y, sum[1]), sum[2] = fmaf(f, x0.z, sum[2]),
    sum[3] = fmaf(f, x0.w, sum[3]), sum[4] = fmaf(f, x1.x, sum[4]), sum[5] = fmaf(f, x1.y, sum[5]),
    sum[6] = fmaf(f, x1.z, sum[6]), sum[7] = fmaf(f, x1.w, sum[7]);
    total = fmaf(f, warp_sum_weight[w][i], total);
  }
  const int64_t row = (b * s.heads + h0 + i) * s.rows + r;
  if (final) {
#pragma unroll
    for (int e = 0; e < 8; ++e) sum[e] /= total;
    Out::store(out, s, row, 8 * g, sum, active);
  } else if (active) {
    float4* dst = reinterpret_cast<float4*>(part.sums + (row * slots + slot) * s.dim + 8 * g);
    dst[0] = make_float4(sum[0], sum[1], sum[2], sum[3]);
    dst[1] = make_float4(sum[4], sum[5], sum[6], sum[7]);
    if (g == 0) part.stats[row * slots + slot] = make_float2(m, total);
  }
}

// Max (NaN kept) and sum of exp(score - max) of two softmax pieces, as (max, sum) pairs.
__device__ __forceinline__ float2 combine_stats(float2 a, float2 b) {
  const float m = nan_max(a.x, b.x);
  return make_float2(m, a.y * attention_weight(a.x, m) + b.y * attention_weight(b.x, m));
}

// CTA x = chunk + chunks * row: values kMergeDims * chunk .. + kMergeDims - 1 of one (batch, head,
// row), from the spans the row sees, rescaled to their common max and added up. Thread t takes 8
// values (t % 4) and the spans t / 4, + 32, ...; warp 0's first quad stores the chunk. A row the span
// kernel finished is left alone.
template <class Out>
__global__ void __launch_bounds__(kMergeThreads)
    merge_spans_kernel(Partials part, const int64_t* __restrict__ pos, int64_t window, AttentionShape s,
                       int span_shift, int64_t slots, void* __restrict__ out) {
  __shared__ float2 warp_stats[kMergeWarps];
  __shared__ float4 warp_values[kMergeWarps][kMergeDims / 4];
  const unsigned chunks = unsigned((s.dim + kMergeDims - 1) / kMergeDims);
  const unsigned row = blockIdx.x / chunks, r = row % unsigned(s.rows);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  const int64_t d0 = blockIdx.x % chunks * kMergeDims + lane % 4 * 8;  // this thread's first value
  const bool stores = warp == 0 && lane < 4 && d0 < s.dim;             // Out::store's active lanes
  allow_dependent_grids();
  wait_for_prior_grids();
  const int64_t p = pos[r];
  if (p < 0 || p >= s.keys) {
    if (warp == 0) {  // the whole warp: Out::store may shuffle
      float nan[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) nan[e] = NAN;
      Out::store(out, s, row, d0, nan, stores);
    }
    return;
  }
  int64_t first, last;
  visible_keys(p, window, first, last);
  const int64_t used = (last >> span_shift) - (first >> span_shift) + 1;  // the row's slots
  if (used == 1) return;  // the span kernel wrote the row
  const float2* stats = part.stats + row * slots;
  float2 st = make_float2(-INFINITY, 0.0f);
  for (int64_t sp = threadIdx.x; sp < used; sp += kMergeThreads) st = combine_stats(st, stats[sp]);
#pragma unroll
  for (int m = kWarp / 2; m > 0; m /= 2)
    st = combine_stats(st, make_float2(__shfl_xor_sync(0xffffffffu, st.x, m), __shfl_xor_sync(0xffffffffu, st.y, m)));
  if (lane == 0) warp_stats[warp] = st;
  __syncthreads();
  st = warp_stats[0];
#pragma unroll
  for (int w = 1; w < kMergeWarps; ++w) st = combine_stats(st, warp_stats[w]);
  const float m = st.x, total = st.y;

  float acc[8] = {};
  if (d0 < s.dim) {
    const float* sums = part.sums + row * slots * s.dim + d0;
#pragma unroll 4
    for (int64_t sp = threadIdx.x / 4; sp < used; sp += kMergeThreads / 4) {
      const float f = attention_weight(stats[sp].x, m);
      const float4 a = reinterpret_cast<const float4*>(sums + sp * s.dim)[0];
      const float4 c = reinterpret_cast<const float4*>(sums + sp * s.dim)[1];
      acc[0] = fmaf(f, a.x, acc[0]), acc[1] = fmaf(f, a.y, acc[1]), acc[2] = fmaf(f, a.z, acc[2]),
      acc[3] = fmaf(f, a.w, acc[3]), acc[4] = fmaf(f, c.x, acc[4]), acc[5] = fmaf(f, c.y, acc[5]),
      acc[6] = fmaf(f, c.z, acc[6]), acc[7] = fmaf(f, c.w, acc[7]);
    }
  }
  // Sum over the warp's 8 span lanes of each value quad, then over the warps.
#pragma unroll
  for (int e = 0; e < 8; ++e)
#pragma unroll
    for (int mask = 4; mask < kWarp; mask *= 2) acc[e] += __shfl_xor_sync(0xffffffffu, acc[e], mask);
  if (lane < 4) {
    warp_values[warp][lane * 2] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    warp_values[warp][lane * 2 + 1] = make_float4(acc[4], acc[5], acc[6], acc[7]);
  }
  __syncthreads();
  if (warp == 0) {  // the whole warp calls Out::store; lane j < 4 stores values 8j .. 8j+7 of the chunk
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      x[e] = 0.0f;
#pragma unroll
      for (int w = 0; w < kMergeWarps; ++w) x[e] += reinterpret_cast<const float*>(warp_values[w])[lane % 4 * 8 + e];
      x[e] /= total;
    }
    Out::store(out, s, row, d0, x, stores);
  }
}

// Query heads a CTA takes: the group rounded up to a power of two, at most kMaxHeads.
int head_tile(const AttentionShape& s) {
  const int64_t g = s.group();
  return g <= 1 ? 1 : g <= 2 ? 2 : kMaxHeads;
}

int64_t head_tiles(const AttentionShape& s) { return (s.group() + head_tile(s) - 1) / head_tile(s); }

// The CTAs of attention_span_kernel for one span of every (batch, kv head, head tile, row).
int64_t ctas_per_span(const AttentionShape& s) { return s.rows * head_tiles(s) * s.kv_heads * s.batch; }

// The spans' length, 2^shift keys, and the slots of a row: the spans it can see.
struct SpanPlan {
  int shift;
  int64_t slots;
};

SpanPlan plan_spans(const AttentionShape& s, int64_t window) {
  const auto slots = [&](int shift) {
    const int64_t spans = ((s.keys - 1) >> shift) + 1;
    const int64_t in_window = window > 0 ? ((window - 1) >> shift) + 2 : spans;
    return in_window < spans ? in_window : spans;
  };
  int shift = kMinSpanShift;
  while (shift < kMaxSpanShift && slots(shift) * ctas_per_span(s) > kTargetCtas) ++shift;
  return {shift, slots(shift)};
}

int64_t merge_ctas(const AttentionShape& s) {
  return s.batch * s.heads * s.rows * ((s.dim + kMergeDims - 1) / kMergeDims);
}

template <class Out, int kHeads>
cudaError_t launch(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window, float scale,
                   const AttentionShape& s, float* workspace, void* out, cudaStream_t stream) {
  const SpanPlan plan = plan_spans(s, window);
  const Partials part{workspace,
                      reinterpret_cast<float2*>(workspace + s.batch * s.heads * s.rows * plan.slots * s.dim)};
  const cudaError_t err = launch_dependent(attention_span_kernel<Out, kHeads>,
                                           dim3(unsigned(plan.slots * ctas_per_span(s))), dim3(kThreads), 0, stream,
                                           q, k, v, pos, window, scale, s, plan.shift, plan.slots, part, out);
  if (err != cudaSuccess) return err;
  return launch_dependent(merge_spans_kernel<Out>, dim3(unsigned(merge_ctas(s))), dim3(kMergeThreads), 0, stream, part,
                          pos, window, s, plan.shift, plan.slots, out);
}

template <class Out>
cudaError_t launch_for_tile(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window,
                            float scale, const AttentionShape& s, float* workspace, void* out, cudaStream_t stream) {
  switch (head_tile(s)) {
    case 1: return launch<Out, 1>(q, k, v, pos, window, scale, s, workspace, out, stream);
    case 2: return launch<Out, 2>(q, k, v, pos, window, scale, s, workspace, out, stream);
    default: return launch<Out, kMaxHeads>(q, k, v, pos, window, scale, s, workspace, out, stream);
  }
}

// Both ops' launcher: the output values of type t, or (kQ8_1) their Q8_1 blocks.
template <bool kQ8_1>
cudaError_t launch_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window,
                             float scale, const AttentionShape& s, FloatType t, float* workspace, void* out,
                             cudaStream_t stream) {
  if (s.dim % (kQ8_1 ? kQ8Block : 8) != 0 || s.dim > kMaxDim || !cached_attention_fits_grid(s, window))
    return cudaErrorInvalidValue;
  switch (t) {
    case FloatType::F16:
      return launch_for_tile<AttentionOut<FloatType::F16, kQ8_1>>(q, k, v, pos, window, scale, s, workspace, out,
                                                                  stream);
    case FloatType::BF16:
      return launch_for_tile<AttentionOut<FloatType::BF16, kQ8_1>>(q, k, v, pos, window, scale, s, workspace, out,
                                                                   stream);
    default:
      return launch_for_tile<AttentionOut<FloatType::F32, kQ8_1>>(q, k, v, pos, window, scale, s, workspace, out,
                                                                  stream);
  }
}

}  // namespace

int64_t cached_attention_workspace_floats(const AttentionShape& s, int64_t window) {
  return s.batch * s.heads * s.rows * plan_spans(s, window).slots * (s.dim + 2);
}

bool cached_attention_fits_grid(const AttentionShape& s, int64_t window) {
  return plan_spans(s, window).slots * ctas_per_span(s) <= kMaxGridX && merge_ctas(s) <= kMaxGridX;
}

cudaError_t launch_cached_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window,
                                    float scale, const AttentionShape& s, FloatType t, float* workspace, void* out,
                                    cudaStream_t stream) {
  return launch_attention<false>(q, k, v, pos, window, scale, s, t, workspace, out, stream);
}

cudaError_t launch_cached_attention_quantize_q8_1(const void* q, const void* k, const void* v, const int64_t* pos,
                                                  int64_t window, float scale, const AttentionShape& s, FloatType t,
                                                  float* workspace, block_q8_1* out, cudaStream_t stream) {
  return launch_attention<true>(q, k, v, pos, window, scale, s, t, workspace, out, stream);
}

}  // namespace torchext
