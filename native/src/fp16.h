// Conversions between float32 and the 16-bit float formats that llama.cpp
// caches use. Both round to nearest, ties to even, like numpy's astype and
// ggml's reference converters, so results agree bit for bit.
#pragma once

#include <cstdint>

namespace qkv {

uint16_t fp32_to_fp16(float f);
float fp16_to_fp32(uint16_t h);

uint16_t fp32_to_bf16(float f);
float bf16_to_fp32(uint16_t h);

}  // namespace qkv
