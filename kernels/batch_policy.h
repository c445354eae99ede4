// Which kernel serves a matmul of `rows` activation rows: the one batch policy that every op,
// QuantLinear and WeightCache.matmul go through (csrc/ops.h asks choose_matmul_path, the CUDA GEMV
// launcher asks choose_gemv_kernel). torchext.ops.gemv_max_rows mirrors max_gemv_rows for
// nn.shared_input, and tests/test_matmul.py::test_gemv_max_rows_is_the_policy pins the two together.
#pragma once

#include <algorithm>
#include <cstdint>

#include "kernels/blocks.h"

namespace torchext {

enum class GemvKernel : int { Dp4a = 0, Int8Mma = 1 };

// Up to 16 rows a CUDA GEMV on Q8_1 activations reads each weight byte once for all rows (the CPU's
// limit is the format's: cpu_max_gemv_rows below). Measured on an H100 with bench/gemv.py,
// 2026-11-24, L2 cold: 16 rows by the tensor-core GEMV take 17.7 us on 4096x4096 Q4_K and 307 us on
// 128256x4096 (dense: 36.7 and 1015 us); on the H200 (2026-12-02) 4096x14336 takes 41.5 us at 16
// rows and the tiled GEMM 36.5 at 17.
constexpr int64_t kMaxGemvRows = 16;

// The DP4A kernel does 4 multiply-adds per instruction and row, so it becomes instruction-bound as
// rows are added (8 rows: 3-6x the 1-row time); the int8 tensor-core kernel (sm_80 and newer)
// computes 16 weight rows x 8 activation rows per mma.sync. Measured as above, 128256x4096:
//   k-quants from 2 rows: Q4_K 2 rows 140 us by MMA against 169 by DP4A (1 row: DP4A 105 against
//     140; 8 rows: 198 against 606); Q6_K 2 rows 271 against 275, 4 rows 285 against 442.
//   32-value formats from 9 rows: their 2-byte-aligned 18-34-byte blocks cost the MMA kernel's
//     quad-per-row loads 2-byte accesses, so DP4A wins up to 8 rows (Q8_0 8 rows: 452 against 497
//     us; Q5_0 368 against 487) and MMA from 16 (Q8_0 608 against 905; Q5_0 600 against 735).
constexpr int64_t kMinMmaRowsSuperBlocks = 2;  // 256-value formats (Q4_K, Q5_K, Q6_K)
constexpr int64_t kMinMmaRowsSmallBlocks = 9;  // 32-value formats, and NVFP4's 64 (not measured)
constexpr int64_t kMaxMmaRows = kMaxGemvRows;  // one launch of the MMA kernel takes up to 16 rows
constexpr int64_t kMaxDp4aRows = 8;            // the DP4A kernel stages up to 8 rows

// What computes a matmul of float activations against a quantized weight: the GEMVs on Q8_1
// activations, the tiled GEMM (qgemm.cu: weights dequantized in registers, activations unrounded) up
// to kMaxTiledGemmRows, and from there a dense GEMM on the dequantized weight (each weight exactly as
// dequantize() gives it). The tiled GEMM runs on CUDA for fp16/bf16 activations on sm_80+ with K a
// multiple of 8 and 16-byte aligned operands; where it does not (fp32 activations on CUDA) the GEMVs
// serve up to kMaxGemvRows rows and the dense GEMM beyond; on the CPU, up to cpu_max_gemv_rows.
// Where it runs, it takes over from the GEMVs at kMinTiledGemmRows rows, and for formats of 32 or 64
// values a block from kMinTiledGemmRowsSmallBlocks rows on weights of kLargeWeightValues or more.
// Measured on an H200 with bench/paths.py, 2026-12-03, L2 cold, bf16, µs, GEMV / tiled GEMM with
// exact weights (the default, bf16 weights computed in bf16 where the format allows, is as fast or
// faster):
//   4096x14336 Q4_K  8 rows 28.0 / 31.6, 10 rows 34.8 / 31.7, 16 rows 41.2 / 32.0; IQ2_XS 16 rows
//              78.9 / 45.6; 14336x4096 Q4_K 9 rows 36.3 / 35.2, 16 rows 45.9 / 35.6; Q5_K 9 rows
//              40.8 / 37.6; 3072x12288 Q4_K 10 rows 30.1 / 24.4; 4096x4096 Q6_K 10 rows 20.7 / 15.4.
//   32-value formats: the DP4A GEMV's time steps up from 5 rows (4096x4096 Q8_0 4 / 5 / 8 rows 16.1 /
//              21.3 / 22.6, tiled 15.9; Q4_0 13.5 / 18.6 / 19.8, tiled 13.5; 3072x3072 Q4_0 11.0 /
//              15.4 / 16.3, tiled 13.2; 262144x640 Q8_0 125.9 / 202.6 / 207.2, tiled 125.4), while
//              the tiled GEMM takes 8-9 µs at least, so on small weights the GEMV keeps 8 rows
//              (2048x640 Q8_0 8 rows 6.4 / 8.8; 640x2048 Q5_0 7.9 / 9.9).
// Formats slower tiled than by their GEMV at 9-12 rows, not singled out: IQ4_XS (14336x4096 9 rows
// 42.8 / 48.8, 12288x3072 31.9 / 37.8; bf16 cannot hold its +-127 values computed) and the GEMVs of
// small weights (2048x640 Q5_0 10 rows 8.3 / 9.3). The GEMVs take at most kMaxGemvRows rows; the
// tiled GEMM serves to kMaxTiledGemmRows and the dense GEMM from there (bench/NOTES.md, "past 64
// rows": from 65 rows the tiled GEMM wins only for some formats and shapes).
enum class MatmulPath : int { Gemv = 0, TiledGemm = 1, Dense = 2 };

constexpr int64_t kMinTiledGemmRows = 9;
constexpr int64_t kMinTiledGemmRowsSmallBlocks = 5;
constexpr int64_t kLargeWeightValues = int64_t(1) << 23;  // 2896 x 2896
constexpr int64_t kMaxTiledGemmRows = 64;
// On weights under kLargeWeightValues the tiled GEMM's fixed costs (its pipeline's fill and drain,
// a grid too small to fill the GPU) outweigh the weight bytes it saves past 16 rows: there the dense
// path (one dequantization into a temporary and cuBLAS) serves instead. H100, L2 cold, bf16, µs,
// tiled GEMM / dense path at 17 and 32 rows (bench/paths.py, 2026-12-06): 2048x640 Q4_K 7.4 / 7.0,
// 7.8 / 6.9; Q5_0 8.7 / 6.3, 8.9 / 6.2; Q6_K 8.5 / 7.1, 8.7 / 7.0; Q8_0 8.8 / 6.5, 9.0 / 6.4;
// 1024x640 Q4_K 7.4 / 6.1; 640x2048 Q5_0 9.1 / 7.9, Q8_0 9.7 / 8.1, Q6_K 8.5 / 8.4, but Q4_K 7.7 /
// 8.3 (the one loss, 8%); from 33 rows the dense path wins on all of them (Q4_K 2048x640 64 rows
// 10.0 / 7.0, 256 rows by the wgmma kernel 11.9 / 7.4). On 3072x3072, just over 2^23, the tiled GEMM
// stays ahead for Q4_K (64 rows 15.8 / 17.5) and the dense path leads Q5_0 by 12-16% at 33-64 rows.
constexpr int64_t kMaxTiledGemmRowsSmallWeight = 16;
// On compute capability 9.0, where the build has the wgmma GEMM (qgemm_wgmma.cu), the tiled GEMM
// reaches further: warp-specialized CTAs that dequantize each weight stage once for 128 or 256
// activation rows. Against the dense path on the H200 (bench/paths.py, L2 cold, bf16, µs, 14336x4096
// / 4096x14336): Q4_K 128 rows 55.3 / 48.2 against 91.4 / 95.8, 256 rows 60.2 / 61.2 against 102.5 /
// 106.1; Q6_K 256 rows 92.7 against 103.7; but at 512 rows Q6_K 184.1 and IQ4_XS 171.6 against the
// dense path's 143.1 and 133.4 (their dequantization, 6-bit and exact 8-bit, costs more per stage),
// so it stops at 256. (Those are the shared-memory kernel's; Q6_K's register kernel, since, took 57.3 µs
// at 256 rows on both shapes on an H100, where that kernel took 87.0 / 93.1, and its chunks now pay: below.)
constexpr int64_t kMaxWgmmaRows = 256;
// The formats whose threads build the wgmma GEMM's register fragments (Q4_K, Q5_K and Q6_K: qgemm_wgmma_regs.cuh)
// take it from here on weights of kMinWgmmaRegsValues or more, where the mma.sync kernels' tiles would: its 32-row
// tile to 32 rows, its 64-row tile to 64. H200, L2 cold, bf16, µs, mma.sync -> register tile at 33 / 48 / 64 rows
// (bench/paths.py, 2026-12-06): Q4_K 4096x14336 35.6 / 37.7 / 38.9 -> 28.0 / 28.9 / 29.8, 14336x4096 40.8 / 41.8 /
// 43.2 -> 29.4 / 29.6 / 30.0; Q5_K 4096x14336 38.5 / 39.5 / 41.0 -> 33.1 / 33.3 / 34.0, 14336x4096 43.3 / 44.0 /
// 45.5 -> 34.2 / 34.5 / 34.9. Q6_K on an H100 (2026-12-07; bf16 46.1-47.0 / 43.7-44.2): 4096x14336 47.7 / 50.6 ->
// 35.6 / 36.4 at 33 / 64 rows, 14336x4096 56.9 / 56.9 -> 41.3 / 38.4. Below 33 rows, H100, 2026-12-07, mma.sync ->
// the 32-row register tile at 16 / 32 rows: Q4_K 4096x14336 28.1 / 29.5 -> 22.9 / 23.8, 14336x4096 31.0 / 32.2 ->
// 23.4 / 23.5, 128256x4096 201.0 / 203.3 -> 168.8 / 179.9; Q6_K 39.3 / 40.1 -> 29.7 / 29.8, 42.6 / 43.8 -> 30.2 /
// 30.2, 307.8 / 310.8 -> 222.3 / 224.4 (the 64-row register tile there took Q4_K 24.7 / 25.4, 26.8 / 25.2, 214.7 /
// 190.3).
// Weights of 2^22 values to kLargeWeightValues, which the tiled GEMM serves to 16 rows, gain as much (H100,
// 2026-12-07, mma.sync -> the 32-row register tile at 9 / 12 / 16 rows, two runs alike, bf16 5.7-8.5):
// Q4_K 2048x2048 7.5 / 8.2 / 8.4 -> 5.8 / 6.6 / 6.7, 1024x4096 8.2 / 8.2 / 8.3 -> 6.6 / 6.5 / 6.6, 4096x1024
// 8.2 / 8.2 / 8.3 -> 6.5 / 6.6 / 6.8; Q6_K 2048x2048 9.0 / 9.1 / 9.2 -> 7.5 / 7.5 / 7.7, 1024x4096 9.1 / 9.1 /
// 9.2 -> 7.5 / 7.6 / 7.7 (Q6_K's 4096x1024 rows, 840 bytes, are no multiple of 16: not the register kernel's).
// Smaller ones, not measured, keep mma.sync.
constexpr int64_t kMinWgmmaRegsRows = 9;
constexpr int64_t kMinWgmmaRegsValues = int64_t(1) << 22;
// ... and from kMinRegsGemmRowsLargeWeight rows, in place of the GEMVs, on weights of kMinRegsGemmEarlyValues or
// more (tiled_gemm_first_row below says why).
constexpr int64_t kMinRegsGemmRowsLargeWeight = 2;
constexpr int64_t kMinRegsGemmEarlyValues = int64_t(1) << 25;

// The first row the register-fragment kernel takes on an n x k weight of its formats (0: none, under
// kMinWgmmaRegsValues): in place of the mma.sync tiles from kMinWgmmaRegsRows, of the GEMVs from
// kMinRegsGemmRowsLargeWeight on weights of kMinRegsGemmEarlyValues or more.
inline int64_t regs_gemm_first_row(int64_t n, int64_t k) {
  if (n * k < kMinWgmmaRegsValues) return 0;
  return n * k >= kMinRegsGemmEarlyValues ? kMinRegsGemmRowsLargeWeight : kMinWgmmaRegsRows;
}

// Of the rows that reach the tiled GEMM, the first the register-fragment kernel serves: regs_gemm_first_row's, and
// where that is kMinRegsGemmRowsLargeWeight, also 1 row, which reaches it only by exact=True or as the last 256-row
// chunk's remainder (257 rows). The kernel's time does not change with its rows; the mma.sync tiles' 1 row cost
// more. H100, 2026-12-07, L2 cold, bf16, µs, mma.sync -> register kernel, two rounds alike: exact=True at 1 row
// Q4_K 4096x14336 31.1 -> 29.0, 14336x4096 35.5 -> 31.2, 12288x3072 27.8 -> 24.8, 128256x4096 243.1 -> 206.9; Q6_K
// 42.0 -> 34.7, 47.6 -> 36.3, 128256x4096 347.6 -> 270.5; Q5_K 0-8% (3072x12288 26.5 both); 257 rows (the policy)
// Q4_K 79.5 -> 74.0, 81.6 -> 74.8, 63.6 -> 57.8, 674.2 -> 630.0; Q5_K 83.6 -> 80.4; Q6_K 94.7 -> 84.7, 98.0 -> 85.2.
inline int64_t regs_tiled_gemm_first_row(int64_t n, int64_t k) {
  const int64_t first = regs_gemm_first_row(n, k);
  return first == kMinRegsGemmRowsLargeWeight ? 1 : first;
}

// Past that, launch_qgemm runs the wgmma GEMM on chunks of kMaxWgmmaRows rows, the last one what is
// left (by the tiled GEMM's kernels up to 64 rows), up to the catalog's wgmma rows (blocks.h), on
// weights of kMinWgmmaChunkedValues values or more whose rows hold kMinWgmmaChunkedK values or more
// (tiled_gemm_rows_for). Each chunk reads the weight again, so that pays only where the kernel's 256
// rows take well under the dense path's time: on large weights it takes the step at 257 rows away
// for Q4_K, Q5_K and Q6_K, whose chunks stay level with or ahead of the dense path to 512 rows. Measured on
// an H100 with the chunks, L2 cold, bf16, µs, 256 rows by the wgmma GEMM, then chunks / dense path at
// 257, 384 and 512 rows (qmatmul against dequantize + F.linear, 2026-12-05 and 06):
//   4096x14336 Q4_K 72.3, 98.6 / 131.0, 125.3 / 146.3, 139.4 / 144.2; Q5_K 75.6, 102.6 / 141.2, 127.6 /
//     156.3, 143.8 / 155.8; 14336x4096 Q4_K 67.6, 97.1 / 118.4, 125.3 / 129.5, 131.9 / 156.1; Q5_K
//     81.1, 111.6 / 128.4, 140.3 / 140.6, 153.8 / 166.2; 3072x12288 Q4_K 50.1, 73.3 / 97.7, 88.7 /
//     89.9, 98.5 / 95.5; Q5_K 53.3, 77.8 / 104.2, 97.3 / 97.3, 107.3 / 104.0.
// Rows of 3072 values lost with the kernel of then (12288x3072 Q4_K 46.5, 75.4 / 76.8, 92.2 / 82.5, 97.6 /
// 95.9: 12 chunks of K a CTA and no K split at 96 CTAs) and win with today's (H100, 2026-12-07, 256 rows 38.5,
// then chunks / dense path at 257, 320, 384, 448 and 512 rows: Q4_K 51.4 / 75.6, 59.1 / 82.2, 65.0 / 82.5,
// 78.8 / 95.1, 80.0 / 97.0; Q5_K 54.8 / 84.1 to 83.5 / 104.1; 16384x3072 Q4_K 58.2 / 102.6 to 85.0 / 129.0):
// 17-45% less time, hence kMinWgmmaChunkedK (Q6_K's rows of 3072 values, 2520 bytes, are no multiple of 16:
// not the wgmma kernels'; shorter rows were not measured). Q2_K lost from 384 rows on 3072x12288 (87.1 / 81.0,
// 97.8 / 87.7) and at 257 on 14336x4096 (107.6 / 105.8), though it won on 4096x14336 (103.1 / 118.4). Chunks
// lost where the kernel's 256 rows cost more (Q6_K on the shared-memory kernel 4096x14336 99.9, 135.2 / 133.0,
// 175.7 / 148.8; Q3_K, IQ4_XS); Q6_K's register kernel wins (H100, 2026-12-07, 384 and 512 rows, chunks / dense
// path (bf16): 4096x14336 93.3 / 147.7 (86.2), 114.1 / 143.4 (78.1); 14336x4096 101.3 / 132.6 (62.8),
// 117.2 / 159.3 (87.2)). Chunks lost where the few-row chunk costs more (the grid formats, MXFP4 and
// NVFP4: 257 rows 47-48 µs over 256, Q4_K 26), and for the 32-value formats past 257-384 rows (Q4_0
// 14336x4096: 384 rows 133.8 / 118.4).
// Small weights lose even at 256 rows (Q4_K 3072x3072 23.3 / 22.1; 4096x4096 28.2 / 36.7, where a
// 1-row chunk's ~14 µs would cost more than the dense path gains), so the chunks start at 2^25 values,
// between 4096x4096 and the shapes above.
constexpr int64_t kMinWgmmaChunkedValues = int64_t(1) << 25;
constexpr int64_t kMinWgmmaChunkedK = 3072;

// The catalog's batch-policy columns for format t (blocks.h): its CPU GEMV rows and wgmma rows.
struct CatalogRows {
  int64_t cpu_gemv_rows, wgmma_rows;
};
inline CatalogRows catalog_rows(QType t) {
  switch (t) {
#define TORCHEXT_CATALOG_ROWS(name, id, cpu_gemv_rows, wgmma_rows) \
  case QType::name:                                               \
    return {cpu_gemv_rows, wgmma_rows};
    TORCHEXT_WEIGHT_FORMATS(TORCHEXT_CATALOG_ROWS)
#undef TORCHEXT_CATALOG_ROWS
    default: return {kMaxGemvRows, kMaxWgmmaRows};  // not a weight format: the op checks have refused it already
  }
}

inline int64_t wgmma_max_rows(QType t) { return catalog_rows(t).wgmma_rows; }

// The CPU's GEMV takes any number of rows, but re-reads and re-unpacks its share of the weight for every 4
// of them (csrc/cpu/gemv_q8_1_x86.cpp), so its time grows with the rows, while the dense path's (tiles of
// weight rows dequantized to fp32 by each thread, then MKL) grows slowly: where they cross is the format's
// unpacking cost, so the limit is the catalog's CPU GEMV rows (blocks.h). Measured on the 2-core Xeon VM
// (README, "On the CPU"; AVX512-VNNI), 2026-12-05, bench/cpu.py --crossover (qmatmul_q8_1 on
// quantize_q8_1's bytes against qmatmul exact, best of 3 with the paths alternating; bench/NOTES.md,
// twenty-second session), 2 threads: the largest of 1, 2, 4, 8, 12, 16, 24, 32, 48, 64 rows at which the
// GEMV is no slower came out the same in three runs on 4096x4096 (fp32 twice, bf16) and one on 14336x4096
// fp32, but for a step either way at ties. A small weight (2048x640) crosses about a step lower (16 rows of
// Q4_0: 1.22x the dense path), NVFP4 higher (level to 12). One thread crosses 0-2 steps higher: from 16
// rows MKL's kernel makes the dense path 2.9x slower there than on two threads (4096x4096 Q4_K 16.0 against
// 5.3-5.5 ms; 12 rows 9.1 against 5.2), so the formats whose GEMV is within 12% of it at 16 rows on two
// threads and 0.57-0.74x on one keep 16.
inline int64_t cpu_max_gemv_rows(QType t) { return catalog_rows(t).cpu_gemv_rows; }

// The first row the tiled GEMM takes from the GEMVs on an n x k weight of block_values values a block (256, or 32 and
// NVFP4's 64); register_kernel: the register-fragment wgmma kernel takes the weight's rows (qgemm_wgmma_regs_supports).
// The register kernel's 32-row tile takes the same time at 1 row as at 9 (its tile is a fixed cost), where the GEMVs'
// grows with the rows: on weights of kMinRegsGemmEarlyValues or more it serves from kMinRegsGemmRowsLargeWeight rows.
// H100, L2 cold, bf16, µs, GEMV -> register tile at 2 / 4 / 8 rows (bench/paths.py, 2026-12-07, the mean of two
// rounds): Q4_K 4096x14336 25.4 / 25.1 / 31.1 -> 23.4 / 23.3 / 23.4, 14336x4096 27.2 / 28.4 / 32.2 -> 23.3 / 23.2 /
// 23.1, 128256x4096 189.5 / 197.2 / 232.1 -> 156.7 / 155.6 / 147.4 (two CTAs an SM), 3072x12288 20.6 / 21.5 / 25.3 ->
// 18.5, 12288x3072 19.8 / 20.8 / 23.2 -> 18.2; Q5_K 26.6 / 27.0 / 33.4 -> 28.0 / 27.9 / 27.8 (the one loss, at 2-4
// rows), 30.5 / 30.4 / 34.2 -> 28.3, 219.0 / 226.5 / 264.0 -> 184.8 / 183.8 / 183.9, 23.1 / 23.9 / 27.8 -> 21.8, 22.8 /
// 23.4 / 25.7 -> 22.2; Q6_K 39.4 / 40.9 / 46.8 -> 29.2 / 30.0 / 29.6, 45.0 / 46.9 / 50.9 -> 30.0 / 30.4 / 30.7, 325.9 /
// 340.1 / 378.5 -> 207.2 / 206.5 / 201.2, 35.5 / 35.3 / 37.1 -> 22.9, 35.0 / 36.3 / 39.9 -> 33.3 / 33.5 / 33.5. At 1
// row the GEMVs keep it: Q4_K 19.1 against 22.7 on 4096x14336, Q6_K 176.3 against 207.6 on 128256x4096 and 19.5 against
// 33.3 on 12288x3072 (it wins Q6_K's 4096x14336, 42.2 against 29.0, and 3072x12288, 23.8 against 22.9). The GEMVs'
// figures are from before they let the next kernel start only once done with their rows (launch.cuh), which took 0-5%
// off them at 2-4 rows of these shapes. On 4096x4096 (2^24 values) the GEMVs stay ahead of or level with it to 6 rows
// for Q4_K and to 8 for Q5_K (Q5_K 2 / 4 / 8 rows 11.0 / 11.3 / 12.9 -> 12.6 / 12.7 / 12.7), so the early start needs
// 2^25 values.
inline int64_t tiled_gemm_first_row(int block_values, int64_t n, int64_t k, bool register_kernel) {
  const int64_t first =
      block_values < 256 && n * k >= kLargeWeightValues ? kMinTiledGemmRowsSmallBlocks : kMinTiledGemmRows;
  const int64_t regs_first = register_kernel ? regs_gemm_first_row(n, k) : 0;
  return regs_first > 0 ? std::min(first, regs_first) : first;
}

// The most rows of a product that qmatmul sends to the GEMVs. gemv_rows: the most rows the backend's GEMV
// takes where the tiled GEMM does not run (kMaxGemvRows on CUDA, cpu_max_gemv_rows on the CPU);
// tiled_first_row: the first row the tiled GEMM takes for these operands (0: it does not run).
inline int64_t max_gemv_rows(int64_t gemv_rows, int64_t tiled_first_row) {
  return tiled_first_row == 0 ? gemv_rows : tiled_first_row - 1;
}

// The most rows the tiled GEMM takes on an n x k weight, of the backend's tiled_gemm_rows: to
// kMaxTiledGemmRowsSmallWeight on weights under kLargeWeightValues, the wgmma GEMM's chunks past
// kMaxWgmmaRows on weights of kMinWgmmaChunkedValues or more with rows of kMinWgmmaChunkedK only.
inline int64_t tiled_gemm_rows_for(int64_t tiled_gemm_rows, int64_t n, int64_t k) {
  const int64_t values = n * k;
  if (values < kLargeWeightValues) return std::min(tiled_gemm_rows, kMaxTiledGemmRowsSmallWeight);
  const bool chunks = values >= kMinWgmmaChunkedValues && k >= kMinWgmmaChunkedK;
  return chunks ? tiled_gemm_rows : std::min(tiled_gemm_rows, kMaxWgmmaRows);
}

// exact: the caller asked for unrounded activations (qmatmul's `exact`), so never the GEMVs.
inline MatmulPath choose_matmul_path(int64_t rows, int64_t n, int64_t k, int64_t gemv_rows, int64_t tiled_first_row,
                                     int64_t tiled_gemm_rows, bool exact) {
  if (!exact && rows <= max_gemv_rows(gemv_rows, tiled_first_row)) return MatmulPath::Gemv;
  return rows <= tiled_gemm_rows_for(tiled_gemm_rows, n, k) ? MatmulPath::TiledGemm : MatmulPath::Dense;
}

// The expert-indexed matmul (qmatmul_id: T tokens, each routed to top_k of E experts) decides on T
// alone, a static shape, never on the ids (reading them would need a host sync): an expert receives
// at most T activation rows when a token's top_k ids are distinct, so up to gemv_rows tokens
// (kMaxGemvRows on CUDA, the format's cpu_max_gemv_rows on the CPU) one GEMV pass per selected expert
// serves all of its rows, each expert's weight read once whatever the number of tokens routed to it;
// more tokens take the grouped tiled GEMM (unrounded activations, as qmatmul beyond its GEMV rows),
// or the dense path where that does not run. Repeated ids in a token are allowed: the kernels then
// take an expert's rows in several groups.
inline MatmulPath choose_matmul_id_path(int64_t tokens, int64_t gemv_rows, bool grouped_gemm_runs, bool exact) {
  if (!exact && tokens <= gemv_rows) return MatmulPath::Gemv;
  return grouped_gemm_runs ? MatmulPath::TiledGemm : MatmulPath::Dense;
}

// block_values: the weight format's values per block (256, or 32 and NVFP4's 64: the formats of
// smaller blocks, whose MMA items are one block each); int8_mma: the device has int8 mma.sync (compute
// capability 8.0 or newer).
inline GemvKernel choose_gemv_kernel(int64_t rows, int block_values, bool int8_mma) {
  const int64_t min_mma_rows = block_values >= 256 ? kMinMmaRowsSuperBlocks : kMinMmaRowsSmallBlocks;
  return int8_mma && rows >= min_mma_rows ? GemvKernel::Int8Mma : GemvKernel::Dp4a;
}

}  // namespace torchext
