#include "fp16.h"

#include <cstring>

namespace qkv {

namespace {

uint32_t bits_of(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof(u));
    return u;
}

float float_of(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof(f));
    return f;
}

}  // namespace

uint16_t fp32_to_fp16(float f) {
    const uint32_t x = bits_of(f);
    const uint32_t sign = (x >> 16) & 0x8000u;
    const uint32_t abs = x & 0x7fffffffu;

    if (abs > 0x7f800000u) {
        // NaN: keep it a quiet NaN.
        return static_cast<uint16_t>(sign | 0x7e00u);
    }
    if (abs >= 0x477ff000u) {
        // Rounds to a magnitude of at least 65520: overflow to infinity.
        return static_cast<uint16_t>(sign | 0x7c00u);
    }
    if (abs < 0x38800000u) {
        // Below the smallest normal half (2^-14): a subnormal half or zero.
        // Adding 0.5 moves the value so that the float adder rounds the
        // mantissa to half's subnormal step (2^-24) with ties to even.
        const float shifted = float_of(abs) + 0.5f;
        return static_cast<uint16_t>(sign | (bits_of(shifted) - 0x3f000000u));
    }
    // Normal half: rebias the exponent, then round the 13 dropped mantissa
    // bits to nearest even.
    const uint32_t mant_odd = (abs >> 13) & 1u;
    const uint32_t rounded = abs + 0xc8000fffu + mant_odd;
    return static_cast<uint16_t>(sign | (rounded >> 13));
}

float fp16_to_fp32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t mant = h & 0x3ffu;

    if (exp == 0) {
        // Zero or subnormal: mant * 2^-24.
        const float value = static_cast<float>(mant) * (1.0f / 16777216.0f);
        return float_of(sign | bits_of(value));
    }
    if (exp == 0x1f) {
        return float_of(sign | 0x7f800000u | (mant << 13));
    }
    return float_of(sign | ((exp + 112u) << 23) | (mant << 13));
}

uint16_t fp32_to_bf16(float f) {
    const uint32_t x = bits_of(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) {
        return static_cast<uint16_t>((x >> 16) | 64u);  // quiet NaN, as ggml does
    }
    return static_cast<uint16_t>((x + (0x7fffu + ((x >> 16) & 1u))) >> 16);
}

float bf16_to_fp32(uint16_t h) {
    return float_of(static_cast<uint32_t>(h) << 16);
}

}  // namespace qkv
