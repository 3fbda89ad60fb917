// libFuzzer target: the llama.cpp sequence-state parser.
// Any input may be rejected with StateFormatError; anything else (a crash,
// a sanitizer report, another exception) is a finding. Inputs that parse are
// rebuilt and parsed again, which must succeed and give the same values.
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "state.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
    // The size's parity picks the rotation setting, as a quantized cache would,
    // so the seed corpus of real states is used unchanged.
    const qkv::Rotation rotation = (size & 1) ? qkv::Rotation{64, 64} : qkv::Rotation{0, 0};
    qkv::SeqState state;
    try {
        state = qkv::parse_seq_state(data, size, rotation, 1);
    } catch (const qkv::StateFormatError&) {
        return 0;
    }

    std::vector<qkv::BuildSection> sections;
    for (const auto& section : state.sections) {
        if (section.cell_count == 0) continue;
        qkv::BuildSection built;
        built.n_stream = section.n_stream;
        built.stream = section.stream;
        built.pos = section.pos;
        for (const auto& layer : section.layers) {
            built.layers.push_back({layer.k.data(), layer.v.data(), layer.n_embd_k, layer.n_embd_v});
        }
        sections.push_back(std::move(built));
    }
    if (sections.empty()) return 0;
    qkv::BuildOptions options;
    options.seq_id = state.seq_id;
    options.k_type = 0;  // f32 keeps every parsed value exactly
    options.v_type = 0;
    options.v_trans = false;
    const std::vector<uint8_t> rebuilt = qkv::build_seq_state(sections, options, 1);
    const qkv::SeqState again = qkv::parse_seq_state(rebuilt.data(), rebuilt.size(), qkv::Rotation{}, 1);
    size_t j = 0;
    for (const auto& section : state.sections) {
        if (section.cell_count == 0) continue;
        const auto& other = again.sections.at(j++);
        if (other.pos != section.pos) __builtin_trap();
        for (size_t il = 0; il < section.layers.size(); ++il) {
            const auto& a = section.layers[il];
            const auto& b = other.layers.at(il);
            // Compare bits: NaN payloads must survive too.
            if (a.k.size() != b.k.size() || std::memcmp(a.k.data(), b.k.data(), a.k.size() * sizeof(float)) != 0) {
                __builtin_trap();
            }
        }
    }
    return 0;
}
