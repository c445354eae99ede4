// The GEMV's loop over weight rows, included by gemv_q8_1_x86.cpp once per instruction set: the
// includer defines TORCHEXT_GEMV_ISA (the tag type whose dot_lanes this body calls) and
// TORCHEXT_GEMV_TARGET (its target attribute's string). A target attribute holds for every
// instantiation of a template, and a body compiled for one set cannot inline another set's
// intrinsics, so the one text is compiled once per tag as an overload on it.
//
// Output rows [begin, end) for activation rows r0 .. r0 + R - 1; xs: every activation block's scales.
template <class Traits, int R>
__attribute__((target(TORCHEXT_GEMV_TARGET))) void gemv_rows(TORCHEXT_GEMV_ISA, const uint8_t* w, int64_t k,
                                                             const block_q8_1* xq, const XScales& xs,
                                                             int64_t x_stride, int64_t r0, int64_t n, int64_t begin,
                                                             int64_t end, void* out, FloatType ot) {
  using C = Avx2Chunk<Traits>;
  constexpr int kChunks = Traits::kValues / kQ8Block;
  constexpr bool kBlockScales = HasBlockScales<C>::value;
  static_assert(!kBlockScales || kChunks == 8, "block scales are one lane a chunk");
  const int64_t blocks = weight_row_blocks<Traits>(k);
  const int64_t row_bytes = blocks * Traits::kBytes;
  const float* xd = xs.d.data();
  const float* xsum = xs.s.data();
  for (int64_t i = begin; i < end; ++i) {
    const uint8_t* wrow = w + i * row_bytes;
    __m256 acc[R], offsets[R];  // offsets: kBlockScales, lane c the offsets of chunks c of each block
    float offset[R];
    for (int r = 0; r < R; ++r) acc[r] = offsets[r] = _mm256_setzero_ps(), offset[r] = 0.0f;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* blk = wrow + b * Traits::kBytes;
      for (int o = 0; o < Traits::kBytes; o += 64)
        _mm_prefetch(reinterpret_cast<const char*>(blk) + kPrefetchAhead + o, _MM_HINT_T0);
      __m256 lo[R], hi[R];  // kBlockScales: lane c is chunk c's scale, weight times activation
      if constexpr (kBlockScales) {
        const BlockScales bs = C::block_scales(blk);
        const __m256 scaled_offset = _mm256_mul_ps(bs.offset, _mm256_set1_ps(kQ8SumScale));  // meets xsum (Q8Scales)
        for (int r = 0; r < R; ++r) {
          const int64_t x = (r0 + r) * x_stride + b * kChunks;
          const __m256 d = _mm256_loadu_ps(xd + x);
          lo[r] = _mm256_mul_ps(bs.d_lo, d);
          hi[r] = C::kHalfScales ? _mm256_mul_ps(bs.d_hi, d) : lo[r];
          offsets[r] = _mm256_fmadd_ps(scaled_offset, _mm256_loadu_ps(xsum + x), offsets[r]);
        }
      }
#pragma GCC unroll 8  // a constant c: each chunk's scale unpacking and shifts resolve at compile time
      for (int c = 0; c < kChunks; ++c) {
        const Chunk ch = C::load(blk, c);  // kBlockScales: only its quants are used
        const int64_t j = b * kChunks + c;  // the activations' Q8_1 block
        for (int r = 0; r < R; ++r) {
          const int64_t x = (r0 + r) * x_stride + j;
          __m256 scale;
          if constexpr (kBlockScales) {
            const __m256i lane = _mm256_set1_epi32(c);
            scale = _mm256_permutevar8x32_ps(lo[r], lane);
            if (C::kHalfScales) scale = _mm256_blend_ps(scale, _mm256_permutevar8x32_ps(hi[r], lane), 0xF0);
          } else {
            scale = C::kHalfScales ? _mm256_setr_m128(_mm_set1_ps(ch.d_lo * xd[x]), _mm_set1_ps(ch.d_hi * xd[x]))
                                   : _mm256_set1_ps(ch.d_lo * xd[x]);
            // the offsets times kQ8SumScale meet the scaled sums (Q8Scales)
            if constexpr (C::kHalfMins)
              offset[r] += ch.offset_lo() * kQ8SumScale * xs.halves[x].lo +
                           ch.offset_hi() * kQ8SumScale * xs.halves[x].hi;
            else offset[r] += ch.offset_lo() * kQ8SumScale * xsum[x];
          }
          const __m256i sums = TORCHEXT_GEMV_ISA::dot_lanes(dot_operands<C::kSigned>(ch.q, xq[x].qs));
          acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sums), scale, acc[r]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      store_float(out, (r0 + r) * n + i, ot, sum_lanes(acc[r]) + (kBlockScales ? sum_lanes(offsets[r]) : offset[r]));
  }
}
