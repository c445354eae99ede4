// The GEMV's loop over weight rows, included by gemv_q8_1_x86.cpp once per instruction set: the
// includer defines TORCHEXT_GEMV_ISA (the tag type whose dot_lanes this body calls) and
// TORCHEXT_GEMV_TARGET (its target attribute's string). A target attribute holds for every
// instantiation of a template, and a body compiled for one set cannot inline another set's
// intrinsics, so the one text is compiled once per tag as an overload on it.
//
// Output rows [begin, end) for activation rows r0 .. r0 + R - 1.
// xs: every activation block's scales, decoded once per call; hs: their HalfSums (kHalfMins only).
template <class Traits, int R>
__attribute__((target(TORCHEXT_GEMV_TARGET))) void gemv_rows(TORCHEXT_GEMV_ISA, const uint8_t* w, int64_t k,
                                                             const block_q8_1* xq, const Q8Scales* xs,
                                                             const HalfSums* hs, int64_t x_stride, int64_t r0,
                                                             int64_t n, int64_t begin, int64_t end, void* out,
                                                             FloatType ot) {
  using C = Avx2Chunk<Traits>;
  constexpr int kChunks = Traits::kValues / kQ8Block;
  const int64_t blocks = (k + Traits::kValues - 1) / Traits::kValues;
  const int64_t row_bytes = blocks * Traits::kBytes;
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* wrow = w + i * row_bytes;
    __m256 acc[R];
    float offset[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps(), offset[r] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
#pragma GCC unroll 8  // a constant c: each chunk's scale unpacking and shifts resolve at compile time
      for (int c = 0; c < kChunks; ++c) {
        const Chunk ch = C::load(wrow + b * Traits::kBytes, c);
        const int64_t j = b * kChunks + c;  // the activations' Q8_1 block
        for (int r = 0; r < R; ++r) {
          const int64_t x = (r0 + r) * x_stride + j;
          const Q8Scales xd = xs[x];
          const __m256 scale = C::kHalfScales ? _mm256_setr_m128(_mm_set1_ps(ch.d_lo * xd.d), _mm_set1_ps(ch.d_hi * xd.d))
                                              : _mm256_set1_ps(ch.d_lo * xd.d);
          const __m256i sums = TORCHEXT_GEMV_ISA::dot_lanes(dot_operands<C::kSigned>(ch.q, xq[x].qs));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
          if constexpr (C::kHalfMins) offset[r] += ch.offset_lo() * hs[x].lo + ch.offset_hi() * hs[x].hi;
          else offset[r] += ch.offset_lo() * xd.s;
        }
      }
    }
    for (int r = 0; r < R; ++r) store_float(out, (r0 + r) * n + i, ot, sum_lanes(acc[r]) + offset[r]);
  }
}
