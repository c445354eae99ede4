// The GPU's reads of 2-byte aligned blocks (BlockWords with its words and half, and load_8_bytes_2_aligned,
// kernels/quant_traits.h) on the host: for the block sizes that take them (Q4_0's and IQ4_NL's 18 bytes,
// Q5_0's 22, Q8_0's 34; Q6_K's 210) at both alignments (a block starting on a 4-byte word and 2 bytes past
// one), every word they return against the block's bytes copied out directly. No byte outside the block's
// allocation may be read: each block ends where its allocation does, so that AddressSanitizer or valgrind
// sees a read past it.
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <vector>

#include "kernels/quant_traits.h"

namespace {

int failures = 0;

template <int S>
void check_block(int offset) {
  // exactly offset + S bytes from operator new (aligned to at least 16): the block starts `offset` (0 or
  // 2) bytes past a word and ends where the allocation does
  std::vector<uint8_t> bytes(offset + S);
  for (int i = 0; i < offset + S; ++i) bytes[i] = uint8_t(37 * i + 11);
  const uint8_t* block = bytes.data() + offset;
  const torchext::BlockWords<S, 2, true> words(block);
  bool ok = true;
  for (int j = 0; j + 4 <= S; j += 2) {
    uint32_t want;
    std::memcpy(&want, block + j, 4);
    ok = ok && words.word(j) == want;
  }
  uint16_t half;
  std::memcpy(&half, block, 2);
  ok = ok && words.half0() == half;
  std::printf("%s: %d-byte block %s\n", ok ? "ok  " : "FAIL", S,
              (reinterpret_cast<uintptr_t>(block) & 2) ? "2 bytes past a word" : "on a word");
  failures += ok ? 0 : 1;
}

// load_8_bytes_2_aligned on Q6_K's 210-byte block, both ways, at every offset its dot product reads (multiples of
// 4 to 200), the block at the start of its allocation or 2 bytes into it.
template <bool kWords>
void check_eight_bytes(int offset) {
  constexpr int S = 210;
  std::vector<uint8_t> bytes(offset + S);
  for (int i = 0; i < offset + S; ++i) bytes[i] = uint8_t(53 * i + 7);
  const uint8_t* block = bytes.data() + offset;
  bool ok = true;
  for (int o = 0; o + 10 <= S; o += 4) {
    uint32_t want[2];
    std::memcpy(want, block + o, 8);
    const torchext::TwoWords got = torchext::load_8_bytes_2_aligned<kWords>(block, o);
    ok = ok && got.lo == want[0] && got.hi == want[1];
  }
  std::printf("%s: 8 bytes of a %d-byte block %s, %s\n", ok ? "ok  " : "FAIL", S,
              offset ? "2 bytes past a word" : "on a word", kWords ? "aligned words" : "2-byte halves");
  failures += ok ? 0 : 1;
}

}  // namespace

int main() {
  for (int offset : {0, 2}) {
    check_block<18>(offset);
    check_block<22>(offset);
    check_block<34>(offset);
    check_eight_bytes<true>(offset);
    check_eight_bytes<false>(offset);
  }
  return failures == 0 ? 0 : 1;
}
