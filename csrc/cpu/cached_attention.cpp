// cached_attention on the CPU, as flash decoding (the CUDA kernels' spans and merge): a task takes the
// keys [first, first + n) that one row's position sees in one cache head, for all the query heads that
// read that cache head (so each key and value is loaded once for them all), and computes in fp32 (the
// arithmetic of kernels/cached_attention.h) each head's scores, their max, the sum of the weights
// exp(score - max) and the weighted sum of the values. A task that holds all of its row's keys writes
// the output; where a step has few rows (a decode step), rows longer than kSpanKeys are cut into spans
// of kSpanKeys keys, so that the threads share a row, and the task that finishes a row's last span
// combines its spans in a fixed order (merge). The cut depends on the shapes only, never on the number
// of threads: each row's arithmetic is the same however many threads run it. On x86-64 CPUs with AVX2,
// FMA and F16C, the dot products and the weighted sums take 8 values a step with FMA (k and v converted
// to fp32 as they are loaded, the element type a template parameter) and the weights use a vector exp;
// the portable path does the same arithmetic one value at a time (fma and expf).
//
// Speed against the scalar kernel this replaced and F.scaled_dot_product_attention over the same visible
// keys (one thread of a 2-core Sapphire Rapids VM shared with other work, torch 2.14, median of 9 runs;
// B = 1): one decode row at 512 / 4000 keys, fp32, Gemma 3 270M's heads (4 query heads, 1 cache head,
// dim 256) 7.3 ms -> 53 us / 53 ms -> 0.49 ms (SDPA 62 us / 1.25 ms), Llama 8B's (32, 8, dim 128)
// 9.4 ms -> 0.29 ms / 72 ms -> 2.0 ms (SDPA 0.38 / 4.4 ms); bf16 within 0.75-1.25x of SDPA. A prompt of
// 256 rows from position 0 takes 1.4x SDPA's time in fp32 and 5-6x in bf16 (SDPA's GEMMs use AMX there).
#include <torch/csrc/stable/ops.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "csrc/cpu/avx2.h"
#include "csrc/cpu/kernels.h"
#include "kernels/cached_attention.h"

namespace torchext::cpu {
namespace {

// Keys a span of a cut row (the last span of a row may have fewer); a multiple of 8.
constexpr int64_t kSpanKeys = 128;
// Rows are cut into spans only where a step has fewer (batch, cache head, row) triples than this: more
// rows spread over the threads already, without partial results to write and merge.
constexpr int64_t kFewRows = 32;
// Query heads a tile of the AVX2 loops (their accumulators stay in registers).
constexpr int64_t kHeadTile = 4;

struct Attention {
  const void *q, *k, *v;
  float scale;
  AttentionShape s;
  void* out;     // [batch, heads, rows, dim], q's type
  float* sums;   // [slot, group, dim]: a span's weighted sums of values (rows of more than one span)
  float* stats;  // [slot, group, 2]: the span's max score and sum of weights
};

// Keys [first, first + n) of cache head kv of sequence b, for row r of the query heads that read it.
struct Span {
  int64_t b, kv, r, first, n;
  int64_t slot;  // where the partial results go, -1 for a row's only span (the task writes the output)
};

// A thread's buffers: the group's query rows in fp32 [group, dim], and their scores, then weights
// [group, kSpanKeys rounded up to 8 for the longest span], then each head's max and sum of weights.
struct Scratch {
  std::vector<float> q, w, max, total;
  int64_t stride;  // of w's rows
};

int64_t query_row(const AttentionShape& s, const Span& sp, int64_t g) {
  return ((sp.b * s.heads + sp.kv * s.group() + g) * s.rows + sp.r) * s.dim;
}
int64_t cache_row(const AttentionShape& s, const Span& sp) {
  return ((sp.b * s.kv_heads + sp.kv) * s.keys + sp.first) * s.dim;
}

// A span's max score and sum of weights for head g, which the merge reads beside its weighted sums.
void store_stats(const Attention& a, const Span& sp, int64_t g, float max, float total) {
  const int64_t i = sp.slot * a.s.group() + g;
  a.stats[2 * i] = max;
  a.stats[2 * i + 1] = total;
}

// Head g's weighted sums acc[dim] and sum of weights: the output (acc / total) of a whole row, else the
// partial results of a span.
template <FloatType kT>
void finish_portable(const Attention& a, const Span& sp, int64_t g, const float* acc, float max, float total) {
  const int64_t dim = a.s.dim, group = a.s.group();
  if (sp.slot < 0) {
    for (int64_t d = 0; d < dim; ++d) store_float(a.out, query_row(a.s, sp, g) + d, kT, acc[d] / total);
    return;
  }
  std::copy(acc, acc + dim, a.sums + (sp.slot * group + g) * dim);
  store_stats(a, sp, g, max, total);
}

template <FloatType kT>
void span_portable(const Attention& a, const Span& sp, Scratch& sc) {
  const int64_t dim = a.s.dim, key0 = cache_row(a.s, sp);
  float* qrow = sc.q.data();
  float* score = sc.w.data();
  float* acc = qrow + dim;
  for (int64_t g = 0; g < a.s.group(); ++g) {
    for (int64_t d = 0; d < dim; ++d) qrow[d] = load_float(a.q, query_row(a.s, sp, g) + d, kT);
    float m = -INFINITY;
    for (int64_t j = 0; j < sp.n; ++j) {
      float dot = 0.0f;
      for (int64_t d = 0; d < dim; ++d) dot = std::fma(qrow[d], load_float(a.k, key0 + j * dim + d, kT), dot);
      score[j] = dot * a.scale;
      m = nan_max(m, score[j]);
    }
    float total = 0.0f;
    std::fill(acc, acc + dim, 0.0f);
    for (int64_t j = 0; j < sp.n; ++j) {
      const float e = attention_weight(score[j], m);
      total += e;
      for (int64_t d = 0; d < dim; ++d) acc[d] = std::fma(e, load_float(a.v, key0 + j * dim + d, kT), acc[d]);
    }
    finish_portable<kT>(a, sp, g, acc, m, total);
  }
}

#if defined(__x86_64__) || defined(_M_X64)
// The scores of query rows g0 .. g0 + kHeads - 1 (fp32 in q, dim apart) against keys j .. j + kKeys - 1,
// each key's 8-value step loaded once for all the heads.
template <FloatType kT, int kHeads, int kKeys>
TORCHEXT_AVX2_INLINE void score_tile(const Attention& a, const float* q, int64_t key0, int64_t j, float* w,
                                     int64_t stride) {
  const int64_t dim = a.s.dim;
  __m256 acc[kHeads][kKeys];
  for (int i = 0; i < kHeads; ++i)
    for (int l = 0; l < kKeys; ++l) acc[i][l] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dim; d += 8) {
    __m256 key[kKeys];
    for (int l = 0; l < kKeys; ++l) key[l] = load_eight(a.k, key0 + (j + l) * dim + d, kT);
    for (int i = 0; i < kHeads; ++i) {
      const __m256 x = _mm256_loadu_ps(q + i * dim + d);
      for (int l = 0; l < kKeys; ++l) acc[i][l] = _mm256_fmadd_ps(x, key[l], acc[i][l]);
    }
  }
  for (int i = 0; i < kHeads; ++i)
    for (int l = 0; l < kKeys; ++l) w[i * stride + j + l] = sum_lanes(acc[i][l]) * a.scale;
}

// Head g (of a tile) has its weighted sums of values d .. d + 8 kVectors - 1 in acc: the output of a
// whole row, else the partial sums of a span.
template <FloatType kT, int kVectors>
TORCHEXT_AVX2_INLINE void finish_avx2(const Attention& a, const Span& sp, int64_t g, int64_t d, const __m256* acc,
                                      float total) {
  const int64_t dim = a.s.dim, group = a.s.group();
  if (sp.slot < 0) {
    const __m256 t = _mm256_set1_ps(total);
    const int64_t out0 = query_row(a.s, sp, g) + d;
    for (int l = 0; l < kVectors; ++l) store_eight(a.out, out0 + 8 * l, kT, _mm256_div_ps(acc[l], t));
  } else {
    float* sums = a.sums + (sp.slot * group + g) * dim + d;
    for (int l = 0; l < kVectors; ++l) _mm256_storeu_ps(sums + 8 * l, acc[l]);
  }
}

// Heads g0 .. g0 + kHeads - 1: their weighted sums of values d .. d + 8 kVectors - 1 over the span, each
// value loaded once for all the heads.
template <FloatType kT, int kHeads, int kVectors>
TORCHEXT_AVX2_INLINE void value_tile(const Attention& a, const Span& sp, int64_t g0, int64_t d, const Scratch& sc) {
  const int64_t dim = a.s.dim, value0 = cache_row(a.s, sp) + d;
  __m256 acc[kHeads][kVectors];
  for (int i = 0; i < kHeads; ++i)
    for (int l = 0; l < kVectors; ++l) acc[i][l] = _mm256_setzero_ps();
  for (int64_t j = 0; j < sp.n; ++j) {
    __m256 value[kVectors];
    for (int l = 0; l < kVectors; ++l) value[l] = load_eight(a.v, value0 + j * dim + 8 * l, kT);
    for (int i = 0; i < kHeads; ++i) {
      const __m256 e = _mm256_broadcast_ss(&sc.w[(g0 + i) * sc.stride + j]);
      for (int l = 0; l < kVectors; ++l) acc[i][l] = _mm256_fmadd_ps(e, value[l], acc[i][l]);
    }
  }
  for (int i = 0; i < kHeads; ++i) finish_avx2<kT, kVectors>(a, sp, g0 + i, d, acc[i], sc.total[g0 + i]);
}

// kHeads heads from g0 through the span's scores (then softmax weights, by the caller) and values; the
// keys and the dims go in tiles of kHeads x kTile accumulators (8 at most: 12 of the 16 registers with
// the loaded keys or values), the remainder one key or 8 values at a time.
template <FloatType kT, int kHeads>
TORCHEXT_AVX2_INLINE void scores_avx2(const Attention& a, const Span& sp, int64_t g0, Scratch& sc) {
  constexpr int kKeys = kHeads >= 3 ? 2 : 4;
  const float* q = &sc.q[g0 * a.s.dim];
  float* w = &sc.w[g0 * sc.stride];
  const int64_t key0 = cache_row(a.s, sp);
  int64_t j = 0;
  for (; j + kKeys <= sp.n; j += kKeys) score_tile<kT, kHeads, kKeys>(a, q, key0, j, w, sc.stride);
  for (; j < sp.n; ++j) score_tile<kT, kHeads, 1>(a, q, key0, j, w, sc.stride);
}
template <FloatType kT, int kHeads>
TORCHEXT_AVX2_INLINE void values_avx2(const Attention& a, const Span& sp, int64_t g0, const Scratch& sc) {
  constexpr int kVectors = 8 / kHeads;
  int64_t d = 0;
  for (; d + 8 * kVectors <= a.s.dim; d += 8 * kVectors) value_tile<kT, kHeads, kVectors>(a, sp, g0, d, sc);
  for (; d < a.s.dim; d += 8) value_tile<kT, kHeads, 1>(a, sp, g0, d, sc);
}

// Head g's scores (w, n of them, then -inf up to a multiple of 8) -> their max (NaN if one is NaN) and
// weights attention_weight(score, max), and the weights' sum.
TORCHEXT_AVX2_INLINE void softmax_avx2(float* w, int64_t n, float& max, float& total) {
  const __m256 minus_inf = _mm256_set1_ps(-INFINITY);
  for (int64_t j = n; j % 8 != 0; ++j) w[j] = -INFINITY;
  __m256 m = minus_inf, nan = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 x = _mm256_loadu_ps(w + j);
    m = _mm256_max_ps(m, x);
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  }
  m = _mm256_max_ps(m, _mm256_permute2f128_ps(m, m, 1));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(1, 0, 3, 2)));
  m = _mm256_max_ps(m, _mm256_shuffle_ps(m, m, _MM_SHUFFLE(2, 3, 0, 1)));
  max = _mm256_movemask_ps(nan) ? NAN : _mm256_cvtss_f32(m);
  const __m256 mm = _mm256_set1_ps(max);
  __m256 sum = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; j += 8) {
    const __m256 x = _mm256_loadu_ps(w + j);
    const __m256 e = _mm256_andnot_ps(_mm256_cmp_ps(x, minus_inf, _CMP_EQ_OQ), exp8(_mm256_sub_ps(x, mm)));
    _mm256_storeu_ps(w + j, e);
    sum = _mm256_add_ps(sum, e);
  }
  total = sum_lanes(sum);
}

template <FloatType kT>
TORCHEXT_AVX2 void span_avx2(const Attention& a, const Span& sp, Scratch& sc) {
  const int64_t dim = a.s.dim, group = a.s.group();
  for (int64_t g = 0; g < group; ++g) {
    const int64_t q0 = query_row(a.s, sp, g);
    for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(&sc.q[g * dim + d], load_eight(a.q, q0 + d, kT));
  }
  for (int64_t g0 = 0; g0 < group; g0 += kHeadTile) {
    switch (std::min(kHeadTile, group - g0)) {
      case 1: scores_avx2<kT, 1>(a, sp, g0, sc); break;
      case 2: scores_avx2<kT, 2>(a, sp, g0, sc); break;
      case 3: scores_avx2<kT, 3>(a, sp, g0, sc); break;
      default: scores_avx2<kT, 4>(a, sp, g0, sc);
    }
  }
  for (int64_t g = 0; g < group; ++g) softmax_avx2(&sc.w[g * sc.stride], sp.n, sc.max[g], sc.total[g]);
  for (int64_t g0 = 0; g0 < group; g0 += kHeadTile) {
    switch (std::min(kHeadTile, group - g0)) {
      case 1: values_avx2<kT, 1>(a, sp, g0, sc); break;
      case 2: values_avx2<kT, 2>(a, sp, g0, sc); break;
      case 3: values_avx2<kT, 3>(a, sp, g0, sc); break;
      default: values_avx2<kT, 4>(a, sp, g0, sc);
    }
  }
  if (sp.slot >= 0)
    for (int64_t g = 0; g < group; ++g) store_stats(a, sp, g, sc.max[g], sc.total[g]);
}
#endif

using SpanFn = void (*)(const Attention&, const Span&, Scratch&);

template <FloatType kT>
SpanFn span_fn() {
#if defined(__x86_64__) || defined(_M_X64)
  static const bool avx2 = has_avx2();
  if (avx2) return span_avx2<kT>;
#endif
  return span_portable<kT>;
}

// Head g of a cut row: its spans' partial results (slots slot0 ..) rescaled to their common max and
// added up in order (the CUDA kernels' merge), divided by the sum of weights.
void merge(const Attention& a, int64_t slot0, int64_t spans, const Span& row, int64_t g, FloatType t,
           std::vector<float>& acc) {  // acc: dim floats at least
  const int64_t dim = a.s.dim, group = a.s.group();
  float m = -INFINITY;
  for (int64_t c = 0; c < spans; ++c) m = nan_max(m, a.stats[2 * ((slot0 + c) * group + g)]);
  float total = 0.0f;
  std::fill(acc.begin(), acc.begin() + dim, 0.0f);
  for (int64_t c = 0; c < spans; ++c) {
    const int64_t i = (slot0 + c) * group + g;
    const float e = attention_weight(a.stats[2 * i], m);
    total += a.stats[2 * i + 1] * e;
    for (int64_t d = 0; d < dim; ++d) acc[d] += a.sums[i * dim + d] * e;
  }
  for (int64_t d = 0; d < dim; ++d) store_float(a.out, query_row(a.s, row, g) + d, t, acc[d] / total);
}

}  // namespace

void cached_attention(const void* q, const void* k, const void* v, const int64_t* pos, int64_t window, float scale,
                      const AttentionShape& s, FloatType t, void* out) {
  const int64_t heads = s.batch * s.kv_heads, group = s.group();  // heads: the (batch, cache head) pairs
  const int64_t span_keys = heads * s.rows < kFewRows ? kSpanKeys : s.keys;
  // The rows in the order 0, T-1, 1, T-2, ...: the causal rows of a prompt grow with r, and this order
  // gives each of parallel_for's contiguous ranges of tasks about the same work.
  std::vector<int64_t> row(s.rows), first(s.rows), last(s.rows), task0(s.rows + 1, 0), slot0(s.rows + 1, 0);
  int64_t visible = 0;
  for (int64_t i = 0; i < s.rows; ++i) {
    row[i] = i % 2 == 0 ? i / 2 : s.rows - 1 - i / 2;
    visible_keys(pos[row[i]], window, first[i], last[i]);  // ops.h checked 0 <= pos[r] < keys
    const int64_t n = last[i] - first[i] + 1, spans = (n + span_keys - 1) / span_keys;
    visible += n;
    task0[i + 1] = task0[i] + spans;
    slot0[i + 1] = slot0[i] + (spans > 1 ? spans : 0);
  }
  const int64_t tasks = task0[s.rows], slots = slot0[s.rows];  // for each (batch, cache head)
  std::vector<float> sums(size_t(heads * slots * group * s.dim)), stats(size_t(heads * slots * group * 2));
  // the spans of each (batch, cache head, cut row) still running, indexed as its first slot: the task that
  // finishes the last one merges them, in the same parallel region (a region costs a barrier)
  std::vector<std::atomic<int64_t>> running(size_t(heads * slots));
  for (int64_t head = 0; head < heads; ++head)
    for (int64_t i = 0; i < s.rows; ++i)
      if (slot0[i + 1] > slot0[i]) running[head * slots + slot0[i]] = slot0[i + 1] - slot0[i];
  const Attention a{q, k, v, scale, s, out, sums.data(), stats.data()};
  const SpanFn span = t == FloatType::F32 ? span_fn<FloatType::F32>()
                      : t == FloatType::F16 ? span_fn<FloatType::F16>()
                                            : span_fn<FloatType::BF16>();
  // a task reads group x n x dim of q . k and as many weights x v: a decode step's short rows run on one thread
  const int64_t grain = parallel_grain(std::max<int64_t>(1, 2 * group * visible * s.dim / tasks));
  torch::stable::parallel_for(0, heads * tasks, grain, [&](int64_t begin, int64_t end) {
    const int64_t stride = (std::min(span_keys, s.keys) + 7) / 8 * 8;
    Scratch sc{std::vector<float>(size_t(std::max<int64_t>(group, 2) * s.dim)),
               std::vector<float>(size_t(group * stride)), std::vector<float>(size_t(group)),
               std::vector<float>(size_t(group)), stride};
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / tasks, u = task % tasks;
      const int64_t i = std::upper_bound(task0.begin(), task0.end(), u) - task0.begin() - 1;
      const int64_t c = u - task0[i], spans = task0[i + 1] - task0[i];
      const int64_t begin_key = first[i] + c * span_keys, n = std::min(span_keys, last[i] + 1 - begin_key);
      const int64_t slot = spans > 1 ? head * slots + slot0[i] + c : -1;
      const Span sp{head / s.kv_heads, head % s.kv_heads, row[i], begin_key, n, slot};
      span(a, sp, sc);
      if (slot >= 0 && running[head * slots + slot0[i]].fetch_sub(1, std::memory_order_acq_rel) == 1)
        for (int64_t g = 0; g < group; ++g) merge(a, head * slots + slot0[i], spans, sp, g, t, sc.q);
    }
  });
}

}  // namespace torchext::cpu
