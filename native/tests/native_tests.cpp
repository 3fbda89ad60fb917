// Standalone checks of the f16 conversions and the K/V codec. Built with
// -DQKV_BUILD_TESTS=ON, and meant to run under -DQKV_SANITIZE=ON as well.
// Prints each failure and exits non-zero if any check failed.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "codec.h"
#include "fp16.h"
#include "probe.h"

namespace {

int g_failures = 0;
int g_checks = 0;

void check(bool ok, const std::string& description) {
    ++g_checks;
    if (!ok) {
        ++g_failures;
        std::printf("FAIL: %s\n", description.c_str());
    }
}

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

std::string hex(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof(buf), "0x%x", v);
    return buf;
}

// Converts a float to f16 bits by a different route than fp16.cpp: scale the
// magnitude in double (exact for every float), round to an integer number of
// half-precision steps with ties to even, then assemble the fields. A mantissa
// that rounds up to 2048 carries into the exponent through the addition.
uint16_t slow_fp32_to_fp16(float f) {
    const uint16_t sign = std::signbit(f) ? 0x8000u : 0u;
    if (std::isnan(f)) return static_cast<uint16_t>(sign | 0x7e00u);
    const double a = std::fabs(static_cast<double>(f));
    if (a >= 65520.0) return static_cast<uint16_t>(sign | 0x7c00u);
    if (a < std::ldexp(1.0, -14)) {
        // Subnormal steps are 2^-24. Rounding up to 1024 yields the smallest
        // normal half, whose bit pattern is also 1024.
        return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(a * std::ldexp(1.0, 24))));
    }
    int e = 0;
    std::frexp(a, &e);  // a = m * 2^e with m in [0.5, 1)
    const int exponent = e - 1;
    const double steps = std::nearbyint(a / std::ldexp(1.0, exponent - 10));  // in [1024, 2048]
    const int value = ((exponent + 15) << 10) + static_cast<int>(steps) - 1024;
    return static_cast<uint16_t>(sign | value);
}

void test_fp16_known_values() {
    struct Case {
        float in;
        uint16_t out;
    };
    const Case cases[] = {
        {0.0f, 0x0000},
        {-0.0f, 0x8000},
        {1.0f, 0x3c00},
        {-2.0f, 0xc000},
        {65504.0f, 0x7bff},                        // largest finite half
        {65519.0f, 0x7bff},                        // just below the overflow midpoint
        {65520.0f, 0x7c00},                        // overflow midpoint rounds to infinity
        {std::ldexp(1.0f, -24), 0x0001},           // smallest subnormal half
        {std::ldexp(1.0f, -25), 0x0000},           // tie between 0 and 2^-24 rounds to even 0
        {std::ldexp(3.0f, -25), 0x0002},           // tie between 1 and 2 steps rounds to even 2
        {std::ldexp(1.0f, -14), 0x0400},           // smallest normal half
        {1.0f + std::ldexp(1.0f, -11), 0x3c00},    // tie rounds down to even mantissa 0
        {1.0f + std::ldexp(3.0f, -11), 0x3c02},    // tie rounds up to even mantissa 2
        {std::numeric_limits<float>::infinity(), 0x7c00},
        {-std::numeric_limits<float>::infinity(), 0xfc00},
    };
    for (const Case& c : cases) {
        const uint16_t got = qkv::fp32_to_fp16(c.in);
        check(got == c.out, "fp32_to_fp16(" + std::to_string(c.in) + ") = " + hex(got) + ", expected " + hex(c.out));
    }
    const uint16_t nan16 = qkv::fp32_to_fp16(std::numeric_limits<float>::quiet_NaN());
    check((nan16 & 0x7c00u) == 0x7c00u && (nan16 & 0x3ffu) != 0, "fp32_to_fp16(NaN) is a NaN, got " + hex(nan16));
}

// Every half converts to float and back to the same bits, apart from NaN
// payloads, which only need to stay NaN.
void test_fp16_round_trip_all_halves() {
    int mismatches = 0;
    for (uint32_t h = 0; h <= 0xffffu; ++h) {
        const float f = qkv::fp16_to_fp32(static_cast<uint16_t>(h));
        const bool is_nan = (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0;
        if (is_nan) {
            if (!std::isnan(f)) ++mismatches;
            continue;
        }
        if (qkv::fp32_to_fp16(f) != h) ++mismatches;
    }
    check(mismatches == 0, "f16 -> f32 -> f16 round trip: " + std::to_string(mismatches) + " mismatches");
}

// Compares fp32_to_fp16 with slow_fp32_to_fp16 at every midpoint between
// neighbouring halves (the ties), one float step either side of each, and
// on random float bit patterns.
void test_fp16_against_slow_reference() {
    int mismatches = 0;
    std::string first;
    auto compare = [&](float f) {
        const uint16_t fast = qkv::fp32_to_fp16(f);
        const uint16_t slow = slow_fp32_to_fp16(f);
        const bool both_nan = std::isnan(f) && (fast & 0x7fffu) > 0x7c00u;
        if (fast != slow && !both_nan) {
            if (mismatches == 0) first = hex(bits_of(f)) + ": " + hex(fast) + " vs " + hex(slow);
            ++mismatches;
        }
    };

    for (uint32_t h = 0; h < 0x7c00u; ++h) {
        const float lo = qkv::fp16_to_fp32(static_cast<uint16_t>(h));
        const float hi = qkv::fp16_to_fp32(static_cast<uint16_t>(h + 1));
        // Halves have 11 significant bits, so their midpoint is exact in float.
        const float mid = lo + (hi - lo) * 0.5f;
        for (float f : {mid, std::nextafter(mid, 0.0f), std::nextafter(mid, 1e30f), lo}) {
            compare(f);
            compare(-f);
        }
    }

    std::mt19937 rng(12345);
    for (int i = 0; i < 1000000; ++i) compare(float_of(static_cast<uint32_t>(rng())));

    check(mismatches == 0, "fp32_to_fp16 vs slow reference: " + std::to_string(mismatches) + " mismatches, first " +
                               first);
}

std::vector<uint8_t> encode(const std::vector<float>& x, const std::vector<uint8_t>& bits, int64_t n,
                            int64_t group_size, int n_threads) {
    size_t total = 0;
    for (uint8_t b : bits) total += qkv::codec_row_bytes(b, n, group_size);
    std::vector<uint8_t> out(total);
    qkv::codec_encode(x.data(), static_cast<int64_t>(bits.size()), n, bits.data(), group_size, out.data(),
                      out.size(), n_threads);
    return out;
}

std::vector<float> decode(const std::vector<uint8_t>& payload, const std::vector<uint8_t>& bits, int64_t n,
                          int64_t group_size, int n_threads) {
    std::vector<float> y(bits.size() * static_cast<size_t>(n));
    qkv::codec_decode(payload.data(), payload.size(), static_cast<int64_t>(bits.size()), n, bits.data(), group_size,
                      y.data(), n_threads);
    return y;
}

std::string bytes_hex(const std::vector<uint8_t>& v) {
    std::string s;
    char buf[4];
    for (uint8_t b : v) {
        std::snprintf(buf, sizeof(buf), "%02x", b);
        s += buf;
    }
    return s;
}

void test_row_bytes() {
    check(qkv::codec_row_bytes(16, 64, 32) == 128, "row bytes width 16");
    check(qkv::codec_row_bytes(8, 64, 32) == 2 * 2 + 64, "row bytes width 8");
    check(qkv::codec_row_bytes(4, 64, 32) == 4 * 2 + 32, "row bytes width 4");
    check(qkv::codec_row_bytes(3, 64, 32) == 4 * 2 + 24, "row bytes width 3");
    check(qkv::codec_row_bytes(2, 64, 8) == 4 * 8 + 16, "row bytes width 2");
}

// Hand-computed payloads pin the byte layout: f16 fields little-endian,
// minimums after scales, and codes packed LSB-first.
void test_known_encodings() {
    {
        // Width 4: d = 7/15 rounds to f16 0x3777 (0.466552734375), and
        // rint(x / d) gives codes 0 2 4 6 9 11 13 15.
        const std::vector<float> x = {0, 1, 2, 3, 4, 5, 6, 7};
        const std::string got = bytes_hex(encode(x, {4}, 8, 8, 1));
        check(got == "7737000020" "64b9fd", "width 4 known encoding: " + got);
    }
    {
        // Width 3: d = 1, codes 0..7 give the 24-bit stream 0xfac688.
        const std::vector<float> x = {0, 1, 2, 3, 4, 5, 6, 7};
        const std::string got = bytes_hex(encode(x, {3}, 8, 8, 1));
        check(got == "003c0000" "88c6fa", "width 3 known encoding: " + got);
    }
    {
        // Width 2: d = 1, codes 0 1 2 3 3 2 1 0.
        const std::vector<float> x = {0, 1, 2, 3, 3, 2, 1, 0};
        const std::string got = bytes_hex(encode(x, {2}, 8, 8, 1));
        check(got == "003c0000" "e41b", "width 2 known encoding: " + got);
    }
    {
        // Width 8: amax 127 gives d = 1, so 0.5 and 63.5 are ties that round to even.
        const std::vector<float> x = {1, -2, 0.5f, 127, -127, 63.5f, 0, 3};
        const std::string got = bytes_hex(encode(x, {8}, 8, 8, 1));
        check(got == "003c" "01fe007f81400003", "width 8 known encoding: " + got);
    }
    {
        const std::vector<float> x = {1, -2, 0.5f, 65504, -0.0f, 3, 0.25f, 7};
        const std::string got = bytes_hex(encode(x, {16}, 8, 8, 1));
        check(got == "003c00c00038ff7b0080004200340047", "width 16 known encoding: " + got);
    }
}

// Returns deterministic test rows with varied content: gaussian, outliers,
// constant rows, zeros and negative-only values.
std::vector<float> make_rows(int64_t n_rows, int64_t n, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> x(static_cast<size_t>(n_rows * n));
    for (int64_t r = 0; r < n_rows; ++r) {
        float* row = x.data() + r * n;
        const int kind = static_cast<int>(r % 5);
        for (int64_t i = 0; i < n; ++i) {
            float v = normal(rng);
            if (kind == 1 && i % 17 == 0) v *= 100.0f;
            if (kind == 2) v = 3.25f;
            if (kind == 3) v = 0.0f;
            if (kind == 4) v = -std::fabs(v) * 50.0f - 1.0f;
            row[i] = v;
        }
    }
    return x;
}

// Checks each decoded element against the worst case of the quantizer:
// half a step, plus the error of storing the scale and the minimum as f16,
// plus a few float32 rounding errors of the largest magnitude in the group.
void test_round_trip_error_bounds() {
    const int64_t n = 256;
    const int64_t group_size = 32;
    const int64_t n_rows = 40;
    const std::vector<float> x = make_rows(n_rows, n, 7);

    for (int bits : {2, 3, 4, 8, 16}) {
        const std::vector<uint8_t> widths(static_cast<size_t>(n_rows), static_cast<uint8_t>(bits));
        const std::vector<float> y = decode(encode(x, widths, n, group_size, 1), widths, n, group_size, 1);
        int violations = 0;
        std::string first;
        for (int64_t start = 0; start < n_rows * n; start += group_size) {
            float mn = x[start], mx = x[start], amax = 0.0f;
            for (int64_t i = start; i < start + group_size; ++i) {
                mn = std::min(mn, x[i]);
                mx = std::max(mx, x[i]);
                amax = std::max(amax, std::fabs(x[i]));
            }
            float bound = 0.0f;
            if (bits == 16) {
                bound = amax * std::ldexp(1.0f, -11) + std::ldexp(1.0f, -25);
            } else if (bits == 8) {
                const float d = amax / 127.0f;
                const float df = qkv::fp16_to_fp32(qkv::fp32_to_fp16(d));
                bound = 0.5f * df + 127.0f * std::fabs(d - df);
            } else {
                const float levels = static_cast<float>((1 << bits) - 1);
                const float d = (mx - mn) / levels;
                const float df = qkv::fp16_to_fp32(qkv::fp32_to_fp16(d));
                const float mf = qkv::fp16_to_fp32(qkv::fp32_to_fp16(mn));
                bound = 0.5f * df + levels * std::fabs(d - df) + std::fabs(mn - mf);
            }
            bound += 8.0f * std::numeric_limits<float>::epsilon() * amax;
            for (int64_t i = start; i < start + group_size; ++i) {
                const float err = std::fabs(x[i] - y[i]);
                if (!(err <= bound)) {
                    if (violations == 0) {
                        first = "index " + std::to_string(i) + " x " + std::to_string(x[i]) + " y " +
                                std::to_string(y[i]) + " bound " + std::to_string(bound);
                    }
                    ++violations;
                }
            }
        }
        check(violations == 0, "width " + std::to_string(bits) + " error bound: " + std::to_string(violations) +
                                   " violations, first " + first);
    }
}

void test_thread_count_invariance() {
    const int64_t n = 128;
    const int64_t group_size = 32;
    const int64_t n_rows = 301;
    const std::vector<float> x = make_rows(n_rows, n, 11);
    std::vector<uint8_t> widths(static_cast<size_t>(n_rows));
    const uint8_t choices[] = {2, 3, 4, 8, 16};
    for (size_t r = 0; r < widths.size(); ++r) widths[r] = choices[r % 5];

    const std::vector<uint8_t> p1 = encode(x, widths, n, group_size, 1);
    const std::vector<float> y1 = decode(p1, widths, n, group_size, 1);
    for (int threads : {0, 2, 4, 7}) {
        const std::vector<uint8_t> p = encode(x, widths, n, group_size, threads);
        const std::vector<float> y = decode(p, widths, n, group_size, threads);
        check(p == p1, "encode with " + std::to_string(threads) + " threads equals 1 thread");
        check(std::memcmp(y.data(), y1.data(), y.size() * sizeof(float)) == 0,
              "decode with " + std::to_string(threads) + " threads equals 1 thread");
    }
}

// NaN and infinity inputs, and decoding arbitrary bytes, must stay free of
// undefined behaviour. The sanitizer build checks that.
void test_non_finite_and_arbitrary_input() {
    const int64_t n = 64;
    const int64_t group_size = 32;
    const float nan = std::numeric_limits<float>::quiet_NaN();
    const float inf = std::numeric_limits<float>::infinity();
    // 127 is exact at every width, because width 8 then has scale 1.
    std::vector<float> x(5 * static_cast<size_t>(n), 127.0f);
    x[3] = nan;
    x[70] = inf;
    x[140] = -inf;
    for (int64_t i = 192; i < 224; ++i) x[static_cast<size_t>(i)] = nan;  // an all-NaN group
    x[300] = 1e30f;
    const std::vector<uint8_t> widths = {2, 3, 4, 8, 16};
    for (uint8_t b : widths) {
        const std::vector<uint8_t> all(5, b);
        const std::vector<float> y = decode(encode(x, all, n, group_size, 1), all, n, group_size, 1);
        // Row 0 has its NaN in group 0, and group 1 holds only 127.
        check(y[40] == 127.0f, "width " + std::to_string(b) + " keeps a finite group next to a NaN group");
    }

    std::mt19937 rng(99);
    size_t total = 0;
    for (uint8_t b : widths) total += qkv::codec_row_bytes(b, n, group_size);
    std::vector<uint8_t> payload(total);
    for (uint8_t& v : payload) v = static_cast<uint8_t>(rng() & 0xffu);
    const std::vector<float> y = decode(payload, widths, n, group_size, 1);
    check(y.size() == 5 * static_cast<size_t>(n), "decode of arbitrary bytes returns every element");
}

template <typename Fn>
void expect_invalid_argument(const std::string& description, const std::string& needle, Fn fn) {
    try {
        fn();
        check(false, description + ": no exception");
    } catch (const std::invalid_argument& e) {
        const std::string message = e.what();
        check(message.find(needle) != std::string::npos,
              description + ": message '" + message + "' does not contain '" + needle + "'");
    }
}

void test_errors() {
    const std::vector<float> x(64, 1.0f);
    std::vector<uint8_t> out(1000);
    const uint8_t bad_width[] = {4, 5};
    expect_invalid_argument("row bytes width 5", "5", [] { qkv::codec_row_bytes(5, 64, 32); });
    expect_invalid_argument("encode width 5", "width 5", [&] {
        qkv::codec_encode(x.data(), 2, 32, bad_width, 32, out.data(), out.size(), 1);
    });
    expect_invalid_argument("decode width 5", "width 5", [&] {
        std::vector<float> y(64);
        qkv::codec_decode(out.data(), out.size(), 2, 32, bad_width, 32, y.data(), 1);
    });
    const uint8_t ok_width[] = {4, 8};
    expect_invalid_argument("encode wrong size", "1000", [&] {
        qkv::codec_encode(x.data(), 2, 32, ok_width, 32, out.data(), out.size(), 1);
    });
    expect_invalid_argument("decode wrong size", "1000", [&] {
        std::vector<float> y(64);
        qkv::codec_decode(out.data(), out.size(), 2, 32, ok_width, 32, y.data(), 1);
    });
    expect_invalid_argument("n not a multiple of group_size", "40", [] { qkv::codec_row_bytes(4, 40, 32); });
    expect_invalid_argument("group_size not a multiple of 8", "12", [] { qkv::codec_row_bytes(4, 48, 12); });
    expect_invalid_argument("n zero", "0", [] { qkv::codec_row_bytes(8, 0, 32); });
}

// Channel layout: a known block, round trips with mixed widths and gaps in the
// positions on 1 and 4 threads, arbitrary payload bytes, and argument checks.
void test_channel_layout() {
    // One block of two rows, n = 8: channel c holds c and c + 2 (range 2), at 2 bits.
    std::vector<float> x(16);
    for (int c = 0; c < 8; ++c) {
        x[static_cast<size_t>(c)] = static_cast<float>(c);
        x[static_cast<size_t>(8 + c)] = static_cast<float>(c + 2);
    }
    const std::vector<uint8_t> bits = {2, 2};
    const std::vector<int32_t> pos = {0, 1};
    const size_t size = qkv::codec_channel_bytes(2, 8, bits.data(), pos.data(), 4);
    check(size == 4 * 8 + 2 * 2, "channel bytes of one block");
    std::vector<uint8_t> out(size);
    qkv::codec_channel_encode(x.data(), 2, 8, bits.data(), pos.data(), 4, out.data(), out.size(), 1);
    std::vector<float> y(16);
    qkv::codec_channel_decode(out.data(), out.size(), 2, 8, bits.data(), pos.data(), 4, y.data(), 1);
    check(y == x, "channel round trip of exactly representable values");
    check(out[32] == 0x00 && out[33] == 0x00 && out[34] == 0xff && out[35] == 0xff, "channel codes 0 and 3");

    std::mt19937 rng(7);
    std::normal_distribution<float> normal(0.0f, 3.0f);
    const int64_t n = 64, rows = 300;
    std::vector<float> big(static_cast<size_t>(rows * n));
    for (auto& v : big) v = normal(rng);
    std::vector<uint8_t> widths(static_cast<size_t>(rows));
    std::vector<int32_t> positions(static_cast<size_t>(rows));
    static const uint8_t kWidths[] = {2, 3, 4, 8, 16};
    int32_t p = 0;
    for (int64_t r = 0; r < rows; ++r) {
        widths[static_cast<size_t>(r)] = kWidths[rng() % 5];
        p += 1 + static_cast<int32_t>(rng() % 3);
        positions[static_cast<size_t>(r)] = p;
    }
    const size_t total = qkv::codec_channel_bytes(rows, n, widths.data(), positions.data(), 32);
    std::vector<uint8_t> one(total), four(total);
    qkv::codec_channel_encode(big.data(), rows, n, widths.data(), positions.data(), 32, one.data(), total, 1);
    qkv::codec_channel_encode(big.data(), rows, n, widths.data(), positions.data(), 32, four.data(), total, 4);
    check(one == four, "channel encode does not depend on the thread count");
    std::vector<float> back(big.size());
    qkv::codec_channel_decode(one.data(), total, rows, n, widths.data(), positions.data(), 32, back.data(), 4);
    float worst = 0.0f;
    for (size_t i = 0; i < big.size(); ++i) worst = std::max(worst, std::fabs(back[i] - big[i]));
    check(worst < 12.0f, "channel round trip error stays within the block range");

    for (auto& b : one) b = static_cast<uint8_t>(rng());
    qkv::codec_channel_decode(one.data(), total, rows, n, widths.data(), positions.data(), 32, back.data(), 2);

    const std::vector<int32_t> descending = {1, 0};
    expect_invalid_argument("channel positions descending", "ascending", [&] {
        qkv::codec_channel_bytes(2, 8, bits.data(), descending.data(), 4);
    });
    expect_invalid_argument("channel block zero", "block", [&] { qkv::codec_channel_bytes(2, 8, bits.data(), pos.data(), 0); });
    expect_invalid_argument("channel n not a multiple of 8", "multiple of 8", [&] {
        qkv::codec_channel_bytes(2, 12, bits.data(), pos.data(), 4);
    });
    expect_invalid_argument("channel payload size", "payload has", [&] {
        qkv::codec_channel_decode(out.data(), out.size() - 1, 2, 8, bits.data(), pos.data(), 4, y.data(), 1);
    });
}

}  // namespace

// A stand-in for ggml's tensor, which the probe reads only through the functions below.
struct ggml_tensor {
    std::string name;
    std::string op;
    std::vector<float> data;
};

namespace {

const char* fake_name(const ggml_tensor* t) { return t->name.c_str(); }
const char* fake_op(const ggml_tensor* t) { return t->op.c_str(); }
int64_t fake_nelements(const ggml_tensor* t) { return static_cast<int64_t>(t->data.size()); }
size_t fake_nbytes(const ggml_tensor* t) { return t->data.size() * sizeof(float); }
bool fake_contiguous(const ggml_tensor*) { return true; }
void fake_get(const ggml_tensor* t, void* dst, size_t offset, size_t size) {
    std::memcpy(dst, reinterpret_cast<const char*>(t->data.data()) + offset, size);
}

// The attention probe: the tensors it requests, its ring of the last rows, and its checks.
void test_attention_probe() {
    qkv::GgmlFunctions fn;
    fn.get_name = fake_name;
    fn.op_desc = fake_op;
    fn.nelements = fake_nelements;
    fn.nbytes = fake_nbytes;
    fn.is_contiguous = fake_contiguous;
    fn.tensor_get = fake_get;
    qkv::AttentionProbe probe(fn, 2, 4, 2, 3);
    auto ask = [&probe](const std::string& name, const std::string& op) {
        ggml_tensor t{name, op, {}};
        return qkv::AttentionProbe::eval_callback(&t, true, &probe);
    };
    check(!ask("Qcur-1", "ROPE"), "probe asks for nothing while disabled");
    probe.set_enabled(true);
    check(ask("Qcur-1", "ROPE"), "probe asks for Qcur-1 after RoPE");
    check(ask("Kcur-0", "ROPE"), "probe asks for Kcur-0 after RoPE");
    check(!ask("Qcur-1", "MUL_MAT"), "probe skips Qcur-1 before RoPE");
    check(!ask("Qcur-2", "ROPE"), "probe skips a layer out of range");
    check(!ask("Qcur-", "ROPE"), "probe skips a name without a layer");
    check(!ask("Qcur-1x", "ROPE"), "probe skips a name with trailing characters");
    check(!ask("Vcur-1", "ROPE"), "probe skips values");

    // Two ubatches of 3 and 2 query rows of 4 elements for layer 1; the ring keeps 3.
    ggml_tensor first{"Qcur-1", "ROPE", {0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2}};
    ggml_tensor second{"Qcur-1", "ROPE", {3, 3, 3, 3, 4, 4, 4, 4}};
    check(qkv::AttentionProbe::eval_callback(&first, false, &probe), "probe continues the compute");
    check(qkv::AttentionProbe::eval_callback(&second, false, &probe), "probe continues the compute");
    int64_t n_rows = 0;
    const std::vector<float> rows = probe.rows(1, false, &n_rows);
    check(probe.total(1, false) == 5, "probe counts every row");
    check(n_rows == 3 && rows.size() == 12, "probe keeps the window");
    check(rows.front() == 2.0f && rows.back() == 4.0f, "probe keeps the last rows, oldest first");
    check(probe.total(0, false) == 0 && probe.total(1, true) == 0, "probe keeps layers and kinds apart");

    ggml_tensor odd{"Kcur-0", "ROPE", {1, 2, 3}};
    check(qkv::AttentionProbe::eval_callback(&odd, false, &probe), "probe continues after a bad tensor");
    check(probe.error().find("Kcur-0") != std::string::npos, "probe reports a tensor of the wrong size");
    probe.reset();
    check(probe.error().empty() && probe.total(1, false) == 0, "probe reset clears rows and errors");
    expect_invalid_argument("probe layer out of range", "out of range", [&] { probe.total(5, false); });
    qkv::GgmlFunctions missing;
    expect_invalid_argument("probe without functions", "null", [&] { qkv::AttentionProbe bad(missing, 1, 4, 4, 4); });
}

}  // namespace

int main() {
    test_fp16_known_values();
    test_fp16_round_trip_all_halves();
    test_fp16_against_slow_reference();
    test_row_bytes();
    test_known_encodings();
    test_round_trip_error_bounds();
    test_thread_count_invariance();
    test_non_finite_and_arbitrary_input();
    test_errors();
    test_channel_layout();
    test_attention_probe();
    std::printf("%d checks, %d failures\n", g_checks, g_failures);
    return g_failures == 0 ? 0 : 1;
}
