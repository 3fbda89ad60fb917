// Observes llama.cpp's compute graph through its eval callback. It keeps the
// last rows of each layer's queries and keys after RoPE ("Qcur-<il>" and
// "Kcur-<il>", op ROPE), from which the attention controller computes how
// much attention recent queries give each cached token.
//
// ggml_tensor stays opaque here: ggml's own exported functions, passed in
// as pointers, read the name, op, size and data. Nothing depends on the
// struct layout of the llama.cpp build.
#pragma once

#include <cstddef>
#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

struct ggml_tensor;

namespace qkv {

struct GgmlFunctions {
    const char* (*get_name)(const ggml_tensor*) = nullptr;
    const char* (*op_desc)(const ggml_tensor*) = nullptr;
    int64_t (*nelements)(const ggml_tensor*) = nullptr;
    size_t (*nbytes)(const ggml_tensor*) = nullptr;
    bool (*is_contiguous)(const ggml_tensor*) = nullptr;
    void (*tensor_get)(const ggml_tensor*, void*, size_t, size_t) = nullptr;
};

class AttentionProbe {
public:
    // n_embd_q: query elements per token (n_head * head size); n_embd_k: key
    // elements per token (n_head_kv * head size); window: rows kept per layer.
    // Throws std::invalid_argument on a null function or a non-positive size.
    AttentionProbe(const GgmlFunctions& functions, int n_layer, int64_t n_embd_q, int64_t n_embd_k, int64_t window);

    // The ggml_backend_sched_eval_callback; user_data is the probe.
    static bool eval_callback(ggml_tensor* t, bool ask, void* user_data) noexcept;

    void set_enabled(bool enabled);
    bool enabled() const;
    void reset();

    int n_layer() const { return n_layer_; }
    int64_t window() const { return window_; }
    // Rows captured for layer il since the last reset (query rows when keys is false).
    int64_t total(int il, bool keys) const;
    // The kept rows of layer il, oldest first: (min(total, window), width) row-major.
    std::vector<float> rows(int il, bool keys, int64_t* n_rows) const;
    // The first anomaly seen (a tensor of unexpected type or size), or "".
    std::string error() const;

private:
    struct Ring {
        std::vector<float> data;
        int64_t width = 0;
        int64_t total = 0;
    };

    bool observe(ggml_tensor* t, bool ask) noexcept;
    // Layer index and kind of a tensor to capture, or il = -1.
    int match(const ggml_tensor* t, bool* keys) const noexcept;
    const Ring& ring(int il, bool keys) const;

    GgmlFunctions fn_;
    int n_layer_;
    int64_t window_;
    bool enabled_ = false;
    std::vector<Ring> queries_;
    std::vector<Ring> keys_;
    std::vector<float> scratch_;
    std::string error_;
    mutable std::mutex mutex_;
};

}  // namespace qkv
