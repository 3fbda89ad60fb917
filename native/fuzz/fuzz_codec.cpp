// libFuzzer target: the K/V codec decoders (row and channel layouts) on
// arbitrary payloads, widths and positions, and encode-decode round trips of
// arbitrary float rows.
// Invalid arguments may be rejected with std::invalid_argument; anything
// else (a crash, a sanitizer report) is a finding.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "codec.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    if (size < 4) return 0;
    // Header: group size selector, row length selector, row count.
    const int64_t group_size = 8 << (data[0] % 5);        // 8..128
    const int64_t n = group_size * (1 + data[1] % 8);     // up to 8 groups
    const int64_t n_rows = 1 + data[2] % 16;
    data += 3;
    size -= 3;

    std::vector<uint8_t> bits(static_cast<size_t>(n_rows));
    for (int64_t i = 0; i < n_rows; ++i) {
        bits[static_cast<size_t>(i)] = i < static_cast<int64_t>(size) ? data[i] % 18 : 4;
    }
    const size_t skip = std::min(size, static_cast<size_t>(n_rows));
    data += skip;
    size -= skip;

    // Decode the rest as a payload (mostly the wrong size: must be rejected cleanly).
    std::vector<float> y(static_cast<size_t>(n_rows * n));
    try {
        qkv::codec_decode(data, size, n_rows, n, bits.data(), group_size, y.data(), 1);
    } catch (const std::invalid_argument&) {
    }

    // Round trip: the rest as float rows (zero-padded), encoded at valid widths.
    static const uint8_t kWidths[] = {2, 3, 4, 8, 16};
    for (auto& b : bits) b = kWidths[b % 5];
    std::vector<float> x(static_cast<size_t>(n_rows * n), 0.0f);
    std::memcpy(x.data(), data, std::min(size, x.size() * sizeof(float)));
    size_t total = 0;
    for (auto b : bits) total += qkv::codec_row_bytes(b, n, group_size);
    std::vector<uint8_t> payload(total);
    qkv::codec_encode(x.data(), n_rows, n, bits.data(), group_size, payload.data(), payload.size(), 1);
    qkv::codec_decode(payload.data(), payload.size(), n_rows, n, bits.data(), group_size, y.data(), 1);

    // Channel layout: positions from the payload bytes (mostly invalid orders:
    // must be rejected cleanly), the same payload decoded, then a round trip.
    std::vector<int32_t> positions(static_cast<size_t>(n_rows));
    int32_t p = 0;
    for (int64_t i = 0; i < n_rows; ++i) {
        const uint8_t step = i < static_cast<int64_t>(size) ? data[i] : 1;
        p += (step % 4 == 0) ? -1 : step % 4;
        positions[static_cast<size_t>(i)] = p;
    }
    const int64_t block = 1 + group_size / 8;
    try {
        qkv::codec_channel_decode(data, size, n_rows, n, bits.data(), positions.data(), block, y.data(), 1);
    } catch (const std::invalid_argument&) {
    }
    for (int64_t i = 0; i < n_rows; ++i) positions[static_cast<size_t>(i)] = static_cast<int32_t>(3 * i);
    std::vector<uint8_t> channel(qkv::codec_channel_bytes(n_rows, n, bits.data(), positions.data(), block));
    qkv::codec_channel_encode(x.data(), n_rows, n, bits.data(), positions.data(), block, channel.data(),
                              channel.size(), 2);
    qkv::codec_channel_decode(channel.data(), channel.size(), n_rows, n, bits.data(), positions.data(), block,
                              y.data(), 2);
    return 0;
}
