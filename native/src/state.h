// Translator for the buffer of llama_state_seq_get_data / set_data.
//
// Layout (llama.cpp as vendored by llama-cpp-python 0.3.36, see
// src/llama-context.cpp and src/llama-kv-cache.cpp), all little-endian:
//   u32 magic 0xaf143cd8, i32 seq_id,
//   then one section per KV cache (iSWA models: the full-attention cache,
//   then the sliding-window cache):
//     u32 n_stream; per stream: u32 cell_count, and when it is not zero:
//       per cell: i32 pos, u32 n_seq_id, n_seq_id x i32 seq_id
//       u32 v_trans, u32 n_layer
//       per layer: i32 k_type, u64 k_size_row, cell_count K rows
//       v_trans == 0: per layer: i32 v_type, u64 v_size_row, cell_count V rows
//       v_trans == 1: per layer: i32 v_type, u32 v_size_el, u32 n_embd_v_gqa,
//                     then for each of the n_embd_v_gqa channels the
//                     cell_count elements of that channel
//
// Quantized caches (q8_0, q4_0) of this llama.cpp store K and V rotated by a
// Walsh-Hadamard matrix over chunks of the row; parsing undoes the rotation
// and building applies it, so the floats here are always the model's own K/V.
#pragma once

#include <cstddef>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace qkv {

constexpr uint32_t kStateSeqMagic = 0xaf143cd8u;
constexpr const char* kLlamaCppVersion = "llama.cpp as vendored by llama-cpp-python 0.3.36";

// Raised for any buffer that does not match the layout above.
class StateFormatError : public std::runtime_error {
  public:
    using std::runtime_error::runtime_error;
};

struct StateLayer {
    int32_t k_type = 0;
    int32_t v_type = 0;
    int64_t n_embd_k = 0;
    int64_t n_embd_v = 0;
    std::vector<float> k;  // (cell_count, n_embd_k)
    std::vector<float> v;  // (cell_count, n_embd_v)
};

struct StateSection {
    uint32_t n_stream = 0;
    uint32_t stream = 0;  // the stream whose cells are listed (0 when empty)
    uint32_t cell_count = 0;
    uint32_t v_trans = 0;
    std::vector<int32_t> pos;  // (cell_count) in the cache's cell order
    std::vector<StateLayer> layers;
};

struct SeqState {
    int32_t seq_id = 0;
    std::vector<StateSection> sections;
};

// Rotation of quantized caches: the chunk lengths of the Walsh-Hadamard
// transform applied to K and to V rows, or 0 when the cache is never rotated.
struct Rotation {
    int64_t k_chunk = 0;
    int64_t v_chunk = 0;
};

// Parse a sequence state. Every count and size is checked against the
// buffer before it is used; any mismatch raises StateFormatError.
SeqState parse_seq_state(const uint8_t* data, size_t size, const Rotation& rotation, int n_threads);

struct BuildLayer {
    const float* k = nullptr;  // (cell_count, n_embd_k)
    const float* v = nullptr;  // (cell_count, n_embd_v)
    int64_t n_embd_k = 0;
    int64_t n_embd_v = 0;
};

struct BuildSection {
    uint32_t n_stream = 1;
    uint32_t stream = 0;
    std::vector<int32_t> pos;  // (cell_count)
    std::vector<BuildLayer> layers;
};

struct BuildOptions {
    int32_t seq_id = 0;
    int32_t k_type = 1;  // f16
    int32_t v_type = 1;
    bool v_trans = true;
    Rotation rotation;
};

// Build a buffer that llama_state_seq_set_data accepts for a context with
// the given cache types and V layout.
std::vector<uint8_t> build_seq_state(const std::vector<BuildSection>& sections, const BuildOptions& options,
                                     int n_threads);

// In-place Walsh-Hadamard transform of consecutive chunks of `chunk` values,
// scaled by 1/sqrt(chunk). It is its own inverse. n must be a multiple of chunk,
// and chunk a power of two.
void hadamard_chunks(float* x, int64_t n, int64_t chunk);

}  // namespace qkv
