// Token-level mixed-precision codec. codec.h states the contract, and the
// numpy reference in tests/codec_reference.py must give the same bits, so
// every step below is float32 arithmetic in a fixed order.
#include "codec.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "fp16.h"

// Fast-math lets the compiler drop the rounding in round_clamped and reorder
// float32 steps, so encoded bits would no longer match the reference.
#if defined(__FAST_MATH__)
#error "codec.cpp must be built without -ffast-math"
#endif

namespace qkv {

namespace {

// Below this many rows per worker, starting a thread costs more than the
// rows take to encode, so small calls run on the calling thread.
constexpr int64_t kMinRowsPerThread = 64;

// Caps n so that every byte count below (at most 2 * n per row) fits size_t.
constexpr int64_t kMaxRowElements = int64_t{1} << 40;

std::string width_error(int bits) {
    return "codec: invalid width " + std::to_string(bits) + " bits (expected 2, 3, 4, 8 or 16)";
}

void check_shape(int64_t n, int64_t group_size) {
    if (group_size <= 0 || group_size % 8 != 0) {
        throw std::invalid_argument("codec: group_size must be a positive multiple of 8, got " +
                                    std::to_string(group_size));
    }
    if (n <= 0 || n % group_size != 0) {
        throw std::invalid_argument("codec: row length n must be a positive multiple of group_size " +
                                    std::to_string(group_size) + ", got " + std::to_string(n));
    }
    if (n > kMaxRowElements) {
        throw std::invalid_argument("codec: row length n " + std::to_string(n) + " exceeds the maximum " +
                                    std::to_string(kMaxRowElements));
    }
}

// Payload f16 values are little-endian at any byte offset. Assembling them
// byte by byte avoids unaligned access and does not depend on host order.
void store_f16(uint8_t* dst, uint16_t h) noexcept {
    dst[0] = static_cast<uint8_t>(h & 0xffu);
    dst[1] = static_cast<uint8_t>(h >> 8);
}

uint16_t load_f16(const uint8_t* src) noexcept {
    return static_cast<uint16_t>(src[0] | (src[1] << 8));
}

// Rounds v to the nearest integer (ties to even, like numpy.rint) and clamps
// it to [lo, hi], where lo and hi are integers. Clamping first keeps the
// later cast to an integer defined for NaN (mapped to 0), infinities and
// huge values. Because rounding is monotonic and leaves integers unchanged,
// clamping before rounding gives the same result as clamping after it.
float round_clamped(float v, float lo, float hi) noexcept {
    float c = 0.0f;
    if (v >= lo && v <= hi) {
        c = v;
    } else if (v > hi) {
        c = hi;
    } else if (v < lo) {
        c = lo;
    }
    // Adding 1.5 * 2^23 moves |c| <= 2^22 into the binade where the float
    // spacing is 1, so the addition itself rounds c to an integer, and the
    // subtraction is exact. GCC 12 compiles std::nearbyint to a libm call
    // on baseline x86-64, and this avoids it. Like nearbyint, it rounds ties
    // to even only in the default rounding mode.
    constexpr float kRoundingShift = 12582912.0f;
    return (c + kRoundingShift) - kRoundingShift;
}

// Width 16 row: n f16 values, 2 * n bytes, 16 bits per element.
void encode_f16_row(const float* x, int64_t n, uint8_t* out) noexcept {
    for (int64_t i = 0; i < n; ++i) store_f16(out + 2 * i, fp32_to_fp16(x[i]));
}

void decode_f16_row(const uint8_t* in, int64_t n, float* y) noexcept {
    for (int64_t i = 0; i < n; ++i) y[i] = fp16_to_fp32(load_f16(in + 2 * i));
}

// Width 8 row: n_group f16 scales, then n int8 codes. That is 2 * n_group + n
// bytes, or 8 + 16 / group_size bits per element (8.5 for group 32).
void encode_q8_row(const float* x, int64_t n, int64_t group_size, uint8_t* out) noexcept {
    const int64_t n_group = n / group_size;
    uint8_t* scales = out;
    uint8_t* codes = out + 2 * n_group;

    for (int64_t g = 0; g < n_group; ++g) {
        const float* xg = x + g * group_size;

        // A NaN fails the comparison, so NaN elements do not set the scale.
        float amax = 0.0f;
        for (int64_t i = 0; i < group_size; ++i) {
            const float a = std::fabs(xg[i]);
            if (a > amax) amax = a;
        }

        const float d = amax / 127.0f;
        const uint16_t d16 = fp32_to_fp16(d);
        const float df = fp16_to_fp32(d16);
        const float id = (df != 0.0f) ? 1.0f / df : 0.0f;
        store_f16(scales + 2 * g, d16);

        uint8_t* cg = codes + g * group_size;
        for (int64_t i = 0; i < group_size; ++i) {
            const int q = static_cast<int>(round_clamped(xg[i] * id, -127.0f, 127.0f));
            // Two's complement byte of q, written without a signed shift or cast.
            cg[i] = static_cast<uint8_t>(q < 0 ? q + 256 : q);
        }
    }
}

void decode_q8_row(const uint8_t* in, int64_t n, int64_t group_size, float* y) noexcept {
    const int64_t n_group = n / group_size;
    const uint8_t* scales = in;
    const uint8_t* codes = in + 2 * n_group;

    for (int64_t g = 0; g < n_group; ++g) {
        const float df = fp16_to_fp32(load_f16(scales + 2 * g));
        const uint8_t* cg = codes + g * group_size;
        float* yg = y + g * group_size;
        for (int64_t i = 0; i < group_size; ++i) {
            // The encoder writes -127..127, but a received payload may hold -128.
            const int q = cg[i] < 128 ? cg[i] : cg[i] - 256;
            yg[i] = df * static_cast<float>(q);
        }
    }
}

// Width b in {2, 3, 4} row: n_group f16 scales, n_group f16 minimums, then
// each group's codes as an LSB-first bit stream of group_size * b / 8 bytes.
// That is 4 * n_group + n * b / 8 bytes, or b + 32 / group_size bits per
// element (5 for width 4 and group 32, 4.25 for width 4 and group 128).
// Codes are packed 8 at a time, because 8 codes of b bits fill exactly b
// bytes. Since group_size is a multiple of 8, no group ends mid-byte.
void encode_asym_row(const float* x, int64_t n, int64_t group_size, int bits, uint8_t* out) noexcept {
    const int64_t n_group = n / group_size;
    const int levels = (1 << bits) - 1;
    const int64_t group_code_bytes = group_size / 8 * bits;
    uint8_t* scales = out;
    uint8_t* minimums = out + 2 * n_group;
    uint8_t* codes = out + 4 * n_group;

    for (int64_t g = 0; g < n_group; ++g) {
        const float* xg = x + g * group_size;

        // NaN elements fail both comparisons and are skipped. An all-NaN
        // group keeps mn = +inf and mx = -inf, and its codes become 0.
        float mn = std::numeric_limits<float>::infinity();
        float mx = -std::numeric_limits<float>::infinity();
        for (int64_t i = 0; i < group_size; ++i) {
            if (xg[i] < mn) mn = xg[i];
            if (xg[i] > mx) mx = xg[i];
        }

        const float d = (mx - mn) / static_cast<float>(levels);
        const uint16_t d16 = fp32_to_fp16(d);
        const uint16_t m16 = fp32_to_fp16(mn);
        const float df = fp16_to_fp32(d16);
        const float mf = fp16_to_fp32(m16);
        const float id = (df != 0.0f) ? 1.0f / df : 0.0f;
        store_f16(scales + 2 * g, d16);
        store_f16(minimums + 2 * g, m16);

        uint8_t* cg = codes + g * group_code_bytes;
        for (int64_t i = 0; i < group_size; i += 8) {
            uint32_t packed = 0;
            for (int k = 0; k < 8; ++k) {
                const float q = round_clamped((xg[i + k] - mf) * id, 0.0f, static_cast<float>(levels));
                packed |= static_cast<uint32_t>(q) << (k * bits);
            }
            for (int j = 0; j < bits; ++j) *cg++ = static_cast<uint8_t>((packed >> (8 * j)) & 0xffu);
        }
    }
}

void decode_asym_row(const uint8_t* in, int64_t n, int64_t group_size, int bits, float* y) noexcept {
    const int64_t n_group = n / group_size;
    const uint32_t mask = (1u << bits) - 1u;
    const int64_t group_code_bytes = group_size / 8 * bits;
    const uint8_t* scales = in;
    const uint8_t* minimums = in + 2 * n_group;
    const uint8_t* codes = in + 4 * n_group;

    for (int64_t g = 0; g < n_group; ++g) {
        const float df = fp16_to_fp32(load_f16(scales + 2 * g));
        const float mf = fp16_to_fp32(load_f16(minimums + 2 * g));
        const uint8_t* cg = codes + g * group_code_bytes;
        float* yg = y + g * group_size;

        for (int64_t i = 0; i < group_size; i += 8) {
            uint32_t packed = 0;
            for (int j = 0; j < bits; ++j) packed |= static_cast<uint32_t>(*cg++) << (8 * j);
            for (int k = 0; k < 8; ++k) {
                const float q = static_cast<float>((packed >> (k * bits)) & mask);
                // The product is rounded before the sum because the build uses
                // -ffp-contract=off. The product is also exact, because df has
                // 11 significant bits and q at most 4, so an FMA would agree.
                const float scaled = df * q;
                yg[i + k] = mf + scaled;
            }
        }
    }
}

void encode_row(const float* x, int64_t n, int64_t group_size, int bits, uint8_t* out) noexcept {
    if (bits == 16) {
        encode_f16_row(x, n, out);
    } else if (bits == 8) {
        encode_q8_row(x, n, group_size, out);
    } else {
        encode_asym_row(x, n, group_size, bits, out);
    }
}

void decode_row(const uint8_t* in, int64_t n, int64_t group_size, int bits, float* y) noexcept {
    if (bits == 16) {
        decode_f16_row(in, n, y);
    } else if (bits == 8) {
        decode_q8_row(in, n, group_size, y);
    } else {
        decode_asym_row(in, n, group_size, bits, y);
    }
}

// Validates the shape and every row width, then returns the byte offset of
// each row in the payload, with the total size as the last entry.
std::vector<size_t> row_offsets(int64_t n_rows, int64_t n, const uint8_t* bits, int64_t group_size) {
    if (n_rows < 0) throw std::invalid_argument("codec: n_rows must be >= 0, got " + std::to_string(n_rows));
    check_shape(n, group_size);
    if (n_rows > 0 && bits == nullptr) throw std::invalid_argument("codec: bits is null");

    std::vector<size_t> offsets(static_cast<size_t>(n_rows) + 1, 0);
    for (int64_t r = 0; r < n_rows; ++r) {
        if (!codec_width_valid(bits[r])) {
            throw std::invalid_argument(width_error(bits[r]) + " in row " + std::to_string(r));
        }
        const size_t row_bytes = codec_row_bytes(bits[r], n, group_size);
        if (offsets[r] > std::numeric_limits<size_t>::max() - row_bytes) {
            throw std::invalid_argument("codec: total payload size overflows size_t");
        }
        offsets[r + 1] = offsets[r] + row_bytes;
    }
    return offsets;
}

// Runs fn(begin, end) over contiguous row ranges on up to n_threads threads
// (0 or less means std::thread::hardware_concurrency()). Each row is written
// by exactly one call, so the result does not depend on the thread count.
// fn must not throw, because an exception on a worker thread would end the
// process.
template <typename Fn>
void for_row_ranges(int64_t n_rows, int n_threads, const Fn& fn, int64_t min_per_thread = kMinRowsPerThread) {
    int64_t workers = n_threads;
    if (workers <= 0) workers = static_cast<int64_t>(std::thread::hardware_concurrency());
    workers = std::min(workers, n_rows / min_per_thread);
    if (workers <= 1) {
        fn(int64_t{0}, n_rows);
        return;
    }

    const int64_t base = n_rows / workers;
    const int64_t extra = n_rows % workers;
    auto range_begin = [&](int64_t t) { return t * base + std::min(t, extra); };

    std::vector<std::thread> threads;
    threads.reserve(static_cast<size_t>(workers - 1));
    for (int64_t t = 1; t < workers; ++t) {
        const int64_t begin = range_begin(t);
        const int64_t end = range_begin(t + 1);
        try {
            threads.emplace_back([&fn, begin, end] { fn(begin, end); });
        } catch (const std::system_error&) {
            // The system could not start another thread, so this one runs the range.
            fn(begin, end);
        }
    }
    fn(int64_t{0}, range_begin(1));
    for (std::thread& thread : threads) thread.join();
}

// -- channel layout ------------------------------------------------------------

constexpr int64_t kMaxChannelBlock = int64_t{1} << 24;

struct ChannelBlock {
    int64_t row_begin;
    int64_t row_end;
    size_t offset;   // byte offset of the block in the payload
    bool quantized;  // has a header: some row is below 16 bits
};

// Bytes of a row's codes in the channel layout (no scales: they are in the block header).
size_t channel_row_bytes(int bits, int64_t n) noexcept {
    return static_cast<size_t>(n) / 8 * static_cast<size_t>(bits);
}

// Validates the arguments and splits the rows into blocks; the last entry's
// offset is the total size (it has no rows).
std::vector<ChannelBlock> channel_blocks(int64_t n_rows, int64_t n, const uint8_t* bits, const int32_t* positions,
                                         int64_t block) {
    if (n_rows < 0) throw std::invalid_argument("codec: n_rows must be >= 0, got " + std::to_string(n_rows));
    if (n <= 0 || n % 8 != 0 || n > kMaxRowElements) {
        throw std::invalid_argument("codec: channel row length n must be a positive multiple of 8, got " +
                                    std::to_string(n));
    }
    if (block < 1 || block > kMaxChannelBlock) {
        throw std::invalid_argument("codec: channel block must be in [1, " + std::to_string(kMaxChannelBlock) +
                                    "] positions, got " + std::to_string(block));
    }
    if (n_rows > 0 && (bits == nullptr || positions == nullptr)) {
        throw std::invalid_argument("codec: bits or positions is null");
    }
    std::vector<ChannelBlock> blocks;
    size_t offset = 0;
    const size_t header = 4 * static_cast<size_t>(n);
    auto add = [&offset](size_t bytes) {
        if (offset > std::numeric_limits<size_t>::max() - bytes) {
            throw std::invalid_argument("codec: total payload size overflows size_t");
        }
        offset += bytes;
    };
    int64_t r = 0;
    while (r < n_rows) {
        const int64_t id = positions[r] / block;
        ChannelBlock b{r, r, offset, false};
        size_t rows = 0;
        for (; r < n_rows && positions[r] / block == id; ++r) {
            if (positions[r] < 0 || (r > 0 && positions[r] <= positions[r - 1])) {
                throw std::invalid_argument("codec: positions must be non-negative and strictly ascending (row " +
                                            std::to_string(r) + ", position " + std::to_string(positions[r]) + ")");
            }
            if (!codec_width_valid(bits[r])) {
                throw std::invalid_argument(width_error(bits[r]) + " in row " + std::to_string(r));
            }
            if (bits[r] != 16) b.quantized = true;
            const size_t row = bits[r] == 16 ? 2 * static_cast<size_t>(n) : channel_row_bytes(bits[r], n);
            if (rows > std::numeric_limits<size_t>::max() - row) {
                throw std::invalid_argument("codec: total payload size overflows size_t");
            }
            rows += row;
        }
        b.row_end = r;
        if (b.quantized) add(header);
        add(rows);
        blocks.push_back(b);
    }
    blocks.push_back({n_rows, n_rows, offset, false});
    return blocks;
}

// Per channel, for each width below 16: the step d = r / (2^b - 1) and its inverse.
struct ChannelSteps {
    explicit ChannelSteps(int64_t n) : minimum(static_cast<size_t>(n)) {
        for (auto& v : step) v.resize(static_cast<size_t>(n));
        for (auto& v : inverse) v.resize(static_cast<size_t>(n));
    }
    std::vector<float> minimum;
    std::vector<float> step[4];
    std::vector<float> inverse[4];
};

// Index of a width below 16 in ChannelSteps: 2, 3, 4, 8 -> 0, 1, 2, 3.
int width_slot(int bits) noexcept {
    if (bits == 8) return 3;
    return bits - 2;
}

void channel_steps(const uint8_t* header, int64_t n, ChannelSteps& s) noexcept {
    static const int kWidths[4] = {2, 3, 4, 8};
    for (int64_t c = 0; c < n; ++c) {
        s.minimum[static_cast<size_t>(c)] = fp16_to_fp32(load_f16(header + 2 * c));
        const float range = fp16_to_fp32(load_f16(header + 2 * n + 2 * c));
        for (int w = 0; w < 4; ++w) {
            const float d = range / static_cast<float>((1 << kWidths[w]) - 1);
            s.step[w][static_cast<size_t>(c)] = d;
            s.inverse[w][static_cast<size_t>(c)] = (d != 0.0f) ? 1.0f / d : 0.0f;
        }
    }
}

void encode_channel_block(const float* x, int64_t n, const uint8_t* bits, const ChannelBlock& b, uint8_t* out,
                          ChannelSteps& s) noexcept {
    uint8_t* dst = out + b.offset;
    if (b.quantized) {
        // NaN elements fail both comparisons and are skipped, as in encode_asym_row.
        for (int64_t c = 0; c < n; ++c) {
            float mn = std::numeric_limits<float>::infinity();
            float mx = -std::numeric_limits<float>::infinity();
            for (int64_t r = b.row_begin; r < b.row_end; ++r) {
                if (bits[r] == 16) continue;
                const float v = x[r * n + c];
                if (v < mn) mn = v;
                if (v > mx) mx = v;
            }
            const uint16_t m16 = fp32_to_fp16(mn);
            store_f16(dst + 2 * c, m16);
            store_f16(dst + 2 * n + 2 * c, fp32_to_fp16(mx - fp16_to_fp32(m16)));
        }
        channel_steps(dst, n, s);
        dst += 4 * n;
    }
    for (int64_t r = b.row_begin; r < b.row_end; ++r) {
        const float* xr = x + r * n;
        const int bw = bits[r];
        if (bw == 16) {
            encode_f16_row(xr, n, dst);
            dst += 2 * n;
            continue;
        }
        const int w = width_slot(bw);
        const float levels = static_cast<float>((1 << bw) - 1);
        const float* mf = s.minimum.data();
        const float* id = s.inverse[w].data();
        for (int64_t i = 0; i < n; i += 8) {
            uint64_t packed = 0;
            for (int k = 0; k < 8; ++k) {
                const float q = round_clamped((xr[i + k] - mf[i + k]) * id[i + k], 0.0f, levels);
                packed |= static_cast<uint64_t>(q) << (k * bw);
            }
            for (int j = 0; j < bw; ++j) *dst++ = static_cast<uint8_t>((packed >> (8 * j)) & 0xffu);
        }
    }
}

void decode_channel_block(const uint8_t* in, int64_t n, const uint8_t* bits, const ChannelBlock& b, float* y,
                          ChannelSteps& s) noexcept {
    const uint8_t* src = in + b.offset;
    if (b.quantized) {
        channel_steps(src, n, s);
        src += 4 * n;
    }
    for (int64_t r = b.row_begin; r < b.row_end; ++r) {
        float* yr = y + r * n;
        const int bw = bits[r];
        if (bw == 16) {
            decode_f16_row(src, n, yr);
            src += 2 * n;
            continue;
        }
        const int w = width_slot(bw);
        const uint64_t mask = (uint64_t{1} << bw) - 1u;
        const float* mf = s.minimum.data();
        const float* d = s.step[w].data();
        for (int64_t i = 0; i < n; i += 8) {
            uint64_t packed = 0;
            for (int j = 0; j < bw; ++j) packed |= static_cast<uint64_t>(*src++) << (8 * j);
            for (int k = 0; k < 8; ++k) {
                const float q = static_cast<float>((packed >> (k * bw)) & mask);
                const float scaled = d[i + k] * q;
                yr[i + k] = mf[i + k] + scaled;
            }
        }
    }
}

// Runs fn(block, steps) for every block on up to n_threads threads, each with
// its own scratch. The scratch is the only allocation on a worker thread, so a
// failure there is passed back as std::bad_alloc instead of ending the process.
template <typename Fn>
void for_each_channel_block(const std::vector<ChannelBlock>& blocks, int64_t n, int n_threads, const Fn& fn) {
    const auto n_blocks = static_cast<int64_t>(blocks.size()) - 1;
    std::atomic<bool> out_of_memory{false};
    for_row_ranges(
        n_blocks, n_threads,
        [&](int64_t begin, int64_t end) {
            try {
                ChannelSteps steps(n);
                for (int64_t i = begin; i < end; ++i) fn(blocks[static_cast<size_t>(i)], steps);
            } catch (const std::bad_alloc&) {
                out_of_memory = true;
            }
        },
        1);
    if (out_of_memory) throw std::bad_alloc();
}

}  // namespace

bool codec_width_valid(int bits) {
    return bits == 2 || bits == 3 || bits == 4 || bits == 8 || bits == 16;
}

size_t codec_row_bytes(int bits, int64_t n, int64_t group_size) {
    if (!codec_width_valid(bits)) throw std::invalid_argument(width_error(bits));
    check_shape(n, group_size);

    const size_t elements = static_cast<size_t>(n);
    const size_t n_group = static_cast<size_t>(n / group_size);
    switch (bits) {
        case 16:
            return 2 * elements;
        case 8:
            return 2 * n_group + elements;
        default:
            // n is a multiple of 8, so n * bits / 8 is a whole number of bytes.
            return 4 * n_group + elements / 8 * static_cast<size_t>(bits);
    }
}

void codec_encode(const float* x, int64_t n_rows, int64_t n, const uint8_t* bits, int64_t group_size, uint8_t* out,
                  size_t out_size, int n_threads) {
    const std::vector<size_t> offsets = row_offsets(n_rows, n, bits, group_size);
    const size_t total = offsets.back();
    if (out_size != total) {
        throw std::invalid_argument("codec_encode: output buffer has " + std::to_string(out_size) +
                                    " bytes, but the rows need " + std::to_string(total));
    }
    if (n_rows == 0) return;
    if (x == nullptr || out == nullptr) throw std::invalid_argument("codec_encode: x or out is null");

    for_row_ranges(n_rows, n_threads, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            encode_row(x + r * n, n, group_size, bits[r], out + offsets[static_cast<size_t>(r)]);
        }
    });
}

void codec_decode(const uint8_t* in, size_t in_size, int64_t n_rows, int64_t n, const uint8_t* bits,
                  int64_t group_size, float* y, int n_threads) {
    const std::vector<size_t> offsets = row_offsets(n_rows, n, bits, group_size);
    const size_t total = offsets.back();
    if (in_size != total) {
        throw std::invalid_argument("codec_decode: payload has " + std::to_string(in_size) +
                                    " bytes, but the row widths need " + std::to_string(total));
    }
    if (n_rows == 0) return;
    if (in == nullptr || y == nullptr) throw std::invalid_argument("codec_decode: payload or y is null");

    for_row_ranges(n_rows, n_threads, [&](int64_t begin, int64_t end) {
        for (int64_t r = begin; r < end; ++r) {
            decode_row(in + offsets[static_cast<size_t>(r)], n, group_size, bits[r], y + r * n);
        }
    });
}

size_t codec_channel_bytes(int64_t n_rows, int64_t n, const uint8_t* bits, const int32_t* positions, int64_t block) {
    return channel_blocks(n_rows, n, bits, positions, block).back().offset;
}

void codec_channel_encode(const float* x, int64_t n_rows, int64_t n, const uint8_t* bits, const int32_t* positions,
                          int64_t block, uint8_t* out, size_t out_size, int n_threads) {
    const std::vector<ChannelBlock> blocks = channel_blocks(n_rows, n, bits, positions, block);
    if (out_size != blocks.back().offset) {
        throw std::invalid_argument("codec_channel_encode: output buffer has " + std::to_string(out_size) +
                                    " bytes, but the rows need " + std::to_string(blocks.back().offset));
    }
    if (n_rows == 0) return;
    if (x == nullptr || out == nullptr) throw std::invalid_argument("codec_channel_encode: x or out is null");
    for_each_channel_block(blocks, n, n_threads,
                           [&](const ChannelBlock& block, ChannelSteps& steps) { encode_channel_block(x, n, bits, block, out, steps); });
}

void codec_channel_decode(const uint8_t* in, size_t in_size, int64_t n_rows, int64_t n, const uint8_t* bits,
                          const int32_t* positions, int64_t block, float* y, int n_threads) {
    const std::vector<ChannelBlock> blocks = channel_blocks(n_rows, n, bits, positions, block);
    if (in_size != blocks.back().offset) {
        throw std::invalid_argument("codec_channel_decode: payload has " + std::to_string(in_size) +
                                    " bytes, but the row widths need " + std::to_string(blocks.back().offset));
    }
    if (n_rows == 0) return;
    if (in == nullptr || y == nullptr) throw std::invalid_argument("codec_channel_decode: payload or y is null");
    for_each_channel_block(blocks, n, n_threads,
                           [&](const ChannelBlock& block, ChannelSteps& steps) { decode_channel_block(in, n, bits, block, y, steps); });
}

}  // namespace qkv
