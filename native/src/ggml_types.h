// The ggml tensor types that llama.cpp KV caches use, with their row sizes
// and conversions to and from float32. Quantized conversions follow ggml's
// reference (scalar) code for the same llama.cpp version.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace qkv {

// Values of enum ggml_type in ggml.h.
enum class GgmlType : int32_t {
    F32 = 0,
    F16 = 1,
    Q4_0 = 2,
    Q8_0 = 8,
    BF16 = 30,
};

constexpr int kQK4_0 = 32;
constexpr int kQK8_0 = 32;

// block_q4_0: one f16 scale and 32 4-bit codes, 4.5 bits per element.
struct BlockQ4_0 {
    uint16_t d;
    uint8_t qs[kQK4_0 / 2];
};
static_assert(sizeof(BlockQ4_0) == 18, "block_q4_0 must match ggml's layout");

// block_q8_0: one f16 scale and 32 int8 codes, 8.5 bits per element.
struct BlockQ8_0 {
    uint16_t d;
    int8_t qs[kQK8_0];
};
static_assert(sizeof(BlockQ8_0) == 34, "block_q8_0 must match ggml's layout");

bool ggml_type_supported(int32_t type);
bool ggml_type_quantized(int32_t type);
std::string ggml_type_name(int32_t type);

// Elements per block (1 for the float types).
int64_t ggml_block_size(int32_t type);
// Bytes per block, the "element size" llama.cpp writes for transposed V.
size_t ggml_type_size(int32_t type);
// Bytes of one row of n elements; n must be a multiple of the block size.
size_t ggml_row_size(int32_t type, int64_t n);

// Convert one row of n elements. `src` and `dst` may be unaligned.
void ggml_row_to_float(int32_t type, const uint8_t* src, float* dst, int64_t n);
void ggml_row_from_float(int32_t type, const float* src, uint8_t* dst, int64_t n);

}  // namespace qkv
