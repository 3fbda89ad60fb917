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
