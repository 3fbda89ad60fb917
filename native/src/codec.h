// Token-level mixed-precision codec for K/V rows.
//
// Each row (one token's K or V for one layer, n = n_embd_k_gqa or
// n_embd_v_gqa elements) is stored at its own width in bits:
//   16      f16 passthrough: n little-endian f16 values.
//   8       symmetric: per group of group_size elements one f16 scale d,
//           then n int8 codes; x ~= d * q.
//   4, 3, 2 asymmetric: per group one f16 scale d and one f16 minimum m,
//           then the codes of each group packed LSB-first; x ~= m + d * q.
// A row's bytes are: [scales f16 x n_group][minimums f16 x n_group, only for
// widths 2-4][codes]. docs/cachecard.md gives the exact rounding rules.
#pragma once

#include <cstddef>
#include <cstdint>

namespace qkv {

bool codec_width_valid(int bits);

// Bytes of one encoded row of n elements. Throws std::invalid_argument when
// bits is not a valid width, or n is not a positive multiple of group_size,
// or group_size is not a positive multiple of 8.
size_t codec_row_bytes(int bits, int64_t n, int64_t group_size);

// Encode n_rows rows.
//   x:    (n_rows, n) float32, row-major
//   bits: (n_rows) width of each row
//   out:  out_size bytes, which must equal the sum of codec_row_bytes
void codec_encode(const float* x, int64_t n_rows, int64_t n, const uint8_t* bits,
                  int64_t group_size, uint8_t* out, size_t out_size, int n_threads);

// Decode n_rows rows.
//   in:   in_size bytes, which must equal the sum of codec_row_bytes
//   bits: (n_rows) width of each row
//   y:    (n_rows, n) float32, row-major
void codec_decode(const uint8_t* in, size_t in_size, int64_t n_rows, int64_t n,
                  const uint8_t* bits, int64_t group_size, float* y, int n_threads);

}  // namespace qkv

namespace qkv {

// Channel layout, for keys. Rows (ascending positions) are grouped into
// blocks of the positions p with the same p / block. A block whose rows are
// all 16 bits holds those rows as f16. Any other block starts with a header
// of n f16 channel minimums m and n f16 channel ranges r, taken over the
// block's rows below 16 bits; each such row then holds n codes of its own
// width b (2, 3, 4 or 8) packed LSB-first, n * b / 8 bytes, with
// x ~= m + (r / (2^b - 1)) * q per channel. 16-bit rows stay f16.
// n must be a positive multiple of 8, block at least 1, positions strictly
// ascending and non-negative; violations throw std::invalid_argument.

// Bytes of n_rows rows in the channel layout.
size_t codec_channel_bytes(int64_t n_rows, int64_t n, const uint8_t* bits, const int32_t* positions, int64_t block);

void codec_channel_encode(const float* x, int64_t n_rows, int64_t n, const uint8_t* bits, const int32_t* positions,
                          int64_t block, uint8_t* out, size_t out_size, int n_threads);

void codec_channel_decode(const uint8_t* in, size_t in_size, int64_t n_rows, int64_t n, const uint8_t* bits,
                          const int32_t* positions, int64_t block, float* y, int n_threads);

}  // namespace qkv
