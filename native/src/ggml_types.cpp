#include "ggml_types.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>

#include "fp16.h"

namespace qkv {

namespace {

uint16_t load_u16(const uint8_t* p) {
    uint16_t v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof(v)); }

float load_f32(const uint8_t* p) {
    float v;
    std::memcpy(&v, p, sizeof(v));
    return v;
}

void store_f32(uint8_t* p, float v) { std::memcpy(p, &v, sizeof(v)); }

// ggml's quantize_row_q8_0_ref: symmetric, scale amax/127, round half away from zero.
void quantize_block_q8_0(const float* x, uint8_t* out) {
    float amax = 0.0f;
    for (int j = 0; j < kQK8_0; ++j) {
        amax = std::fmax(amax, std::fabs(x[j]));
    }
    const float d = amax / 127.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(out, fp32_to_fp16(d));
    for (int j = 0; j < kQK8_0; ++j) {
        const float v = x[j] * id;
        out[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::roundf(v)));
    }
}

void dequantize_block_q8_0(const uint8_t* in, float* y) {
    const float d = fp16_to_fp32(load_u16(in));
    for (int j = 0; j < kQK8_0; ++j) {
        y[j] = static_cast<float>(static_cast<int8_t>(in[2 + j])) * d;
    }
}

// ggml's quantize_row_q4_0_ref: the element of largest magnitude maps to -8.
void quantize_block_q4_0(const float* x, uint8_t* out) {
    float amax = 0.0f;
    float max = 0.0f;
    for (int j = 0; j < kQK4_0; ++j) {
        if (amax < std::fabs(x[j])) {
            amax = std::fabs(x[j]);
            max = x[j];
        }
    }
    const float d = max / -8.0f;
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    store_u16(out, fp32_to_fp16(d));
    for (int j = 0; j < kQK4_0 / 2; ++j) {
        const float x0 = x[j] * id;
        const float x1 = x[kQK4_0 / 2 + j] * id;
        const int q0 = std::min(15, static_cast<int>(static_cast<int8_t>(x0 + 8.5f)));
        const int q1 = std::min(15, static_cast<int>(static_cast<int8_t>(x1 + 8.5f)));
        out[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
    }
}

void dequantize_block_q4_0(const uint8_t* in, float* y) {
    const float d = fp16_to_fp32(load_u16(in));
    for (int j = 0; j < kQK4_0 / 2; ++j) {
        const int x0 = (in[2 + j] & 0x0f) - 8;
        const int x1 = (in[2 + j] >> 4) - 8;
        y[j] = static_cast<float>(x0) * d;
        y[j + kQK4_0 / 2] = static_cast<float>(x1) * d;
    }
}

}  // namespace

bool ggml_type_supported(int32_t type) {
    switch (static_cast<GgmlType>(type)) {
        case GgmlType::F32:
        case GgmlType::F16:
        case GgmlType::BF16:
        case GgmlType::Q8_0:
        case GgmlType::Q4_0:
            return true;
    }
    return false;
}

bool ggml_type_quantized(int32_t type) {
    return type == static_cast<int32_t>(GgmlType::Q8_0) || type == static_cast<int32_t>(GgmlType::Q4_0);
}

std::string ggml_type_name(int32_t type) {
    switch (static_cast<GgmlType>(type)) {
        case GgmlType::F32: return "f32";
        case GgmlType::F16: return "f16";
        case GgmlType::BF16: return "bf16";
        case GgmlType::Q8_0: return "q8_0";
        case GgmlType::Q4_0: return "q4_0";
    }
    return "ggml type " + std::to_string(type);
}

int64_t ggml_block_size(int32_t type) {
    switch (static_cast<GgmlType>(type)) {
        case GgmlType::Q8_0: return kQK8_0;
        case GgmlType::Q4_0: return kQK4_0;
        default: return 1;
    }
}

size_t ggml_type_size(int32_t type) {
    switch (static_cast<GgmlType>(type)) {
        case GgmlType::F32: return 4;
        case GgmlType::F16: return 2;
        case GgmlType::BF16: return 2;
        case GgmlType::Q8_0: return sizeof(BlockQ8_0);
        case GgmlType::Q4_0: return sizeof(BlockQ4_0);
    }
    throw std::invalid_argument("unsupported " + ggml_type_name(type));
}

size_t ggml_row_size(int32_t type, int64_t n) {
    return ggml_type_size(type) * static_cast<size_t>(n / ggml_block_size(type));
}

void ggml_row_to_float(int32_t type, const uint8_t* src, float* dst, int64_t n) {
    switch (static_cast<GgmlType>(type)) {
        case GgmlType::F32:
            for (int64_t i = 0; i < n; ++i) dst[i] = load_f32(src + 4 * i);
            return;
        case GgmlType::F16:
            for (int64_t i = 0; i < n; ++i) dst[i] = fp16_to_fp32(load_u16(src + 2 * i));
            return;
        case GgmlType::BF16:
            for (int64_t i = 0; i < n; ++i) dst[i] = bf16_to_fp32(load_u16(src + 2 * i));
            return;
        case GgmlType::Q8_0:
            for (int64_t b = 0; b < n / kQK8_0; ++b) {
                dequantize_block_q8_0(src + b * sizeof(BlockQ8_0), dst + b * kQK8_0);
            }
            return;
        case GgmlType::Q4_0:
            for (int64_t b = 0; b < n / kQK4_0; ++b) {
                dequantize_block_q4_0(src + b * sizeof(BlockQ4_0), dst + b * kQK4_0);
            }
            return;
    }
    throw std::invalid_argument("unsupported " + ggml_type_name(type));
}

void ggml_row_from_float(int32_t type, const float* src, uint8_t* dst, int64_t n) {
    switch (static_cast<GgmlType>(type)) {
        case GgmlType::F32:
            for (int64_t i = 0; i < n; ++i) store_f32(dst + 4 * i, src[i]);
            return;
        case GgmlType::F16:
            for (int64_t i = 0; i < n; ++i) store_u16(dst + 2 * i, fp32_to_fp16(src[i]));
            return;
        case GgmlType::BF16:
            for (int64_t i = 0; i < n; ++i) store_u16(dst + 2 * i, fp32_to_bf16(src[i]));
            return;
        case GgmlType::Q8_0:
            for (int64_t b = 0; b < n / kQK8_0; ++b) {
                quantize_block_q8_0(src + b * kQK8_0, dst + b * sizeof(BlockQ8_0));
            }
            return;
        case GgmlType::Q4_0:
            for (int64_t b = 0; b < n / kQK4_0; ++b) {
                quantize_block_q4_0(src + b * kQK4_0, dst + b * sizeof(BlockQ4_0));
            }
            return;
    }
    throw std::invalid_argument("unsupported " + ggml_type_name(type));
}

}  // namespace qkv
