#include "probe.h"

#include <algorithm>
#include <cstring>
#include <new>
#include <stdexcept>

namespace qkv {

AttentionProbe::AttentionProbe(const GgmlFunctions& functions, int n_layer, int64_t n_embd_q, int64_t n_embd_k,
                               int64_t window)
    : fn_(functions), n_layer_(n_layer), window_(window) {
    if (!fn_.get_name || !fn_.op_desc || !fn_.nelements || !fn_.nbytes || !fn_.is_contiguous || !fn_.tensor_get) {
        throw std::invalid_argument("attention probe: a ggml function pointer is null");
    }
    if (n_layer <= 0 || n_embd_q <= 0 || n_embd_k <= 0 || window <= 0 || window > (int64_t{1} << 16)) {
        throw std::invalid_argument("attention probe: n_layer, row sizes and window must be positive (window <= 65536)");
    }
    queries_.resize(static_cast<size_t>(n_layer));
    keys_.resize(static_cast<size_t>(n_layer));
    for (auto& r : queries_) {
        r.width = n_embd_q;
        r.data.assign(static_cast<size_t>(window * n_embd_q), 0.0f);
    }
    for (auto& r : keys_) {
        r.width = n_embd_k;
        r.data.assign(static_cast<size_t>(window * n_embd_k), 0.0f);
    }
}

bool AttentionProbe::eval_callback(ggml_tensor* t, bool ask, void* user_data) noexcept {
    return static_cast<AttentionProbe*>(user_data)->observe(t, ask);
}

void AttentionProbe::set_enabled(bool enabled) {
    std::lock_guard<std::mutex> lock(mutex_);
    enabled_ = enabled;
}

bool AttentionProbe::enabled() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return enabled_;
}

void AttentionProbe::reset() {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto& r : queries_) r.total = 0;
    for (auto& r : keys_) r.total = 0;
    error_.clear();
}

int AttentionProbe::match(const ggml_tensor* t, bool* keys) const noexcept {
    const char* name = fn_.get_name(t);
    if (name == nullptr) return -1;
    if (std::strncmp(name, "Qcur-", 5) == 0) {
        *keys = false;
    } else if (std::strncmp(name, "Kcur-", 5) == 0) {
        *keys = true;
    } else {
        return -1;
    }
    // The layer number: 1 to 6 decimal digits and nothing else.
    int il = 0;
    int digits = 0;
    for (const char* p = name + 5; *p != '\0'; ++p, ++digits) {
        if (*p < '0' || *p > '9' || digits >= 6) return -1;
        il = il * 10 + (*p - '0');
    }
    if (digits == 0 || il >= n_layer_) return -1;
    // The same name also marks the rows before normalization and RoPE.
    const char* op = fn_.op_desc(t);
    if (op == nullptr || std::strcmp(op, "ROPE") != 0) return -1;
    return il;
}

bool AttentionProbe::observe(ggml_tensor* t, bool ask) noexcept {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!enabled_ || t == nullptr) return !ask;
    bool keys = false;
    const int il = match(t, &keys);
    if (ask) return il >= 0;

    // Returning false would cancel the graph compute, so every path below returns true.
    if (il < 0) return true;
    Ring& r = keys ? keys_[static_cast<size_t>(il)] : queries_[static_cast<size_t>(il)];
    const int64_t n = fn_.nelements(t);
    if (fn_.nbytes(t) != static_cast<size_t>(n) * sizeof(float) || !fn_.is_contiguous(t) || n % r.width != 0) {
        if (error_.empty()) {
            error_ = std::string("tensor ") + fn_.get_name(t) + " is not a contiguous float32 tensor of rows of " +
                     std::to_string(r.width);
        }
        return true;
    }

    const int64_t n_rows = n / r.width;
    const int64_t keep = std::min(n_rows, window_);
    try {
        scratch_.resize(static_cast<size_t>(keep * r.width));
    } catch (const std::bad_alloc&) {
        if (error_.empty()) error_ = "out of memory";
        return true;
    }
    const size_t row_bytes = static_cast<size_t>(r.width) * sizeof(float);
    fn_.tensor_get(t, scratch_.data(), static_cast<size_t>(n_rows - keep) * row_bytes, static_cast<size_t>(keep) * row_bytes);
    r.total += n_rows - keep;
    for (int64_t i = 0; i < keep; ++i, ++r.total) {
        const int64_t slot = r.total % window_;
        std::memcpy(r.data.data() + slot * r.width, scratch_.data() + i * r.width, row_bytes);
    }
    return true;
}

const AttentionProbe::Ring& AttentionProbe::ring(int il, bool keys) const {
    if (il < 0 || il >= n_layer_) {
        throw std::invalid_argument("attention probe: layer " + std::to_string(il) + " out of range [0, " +
                                    std::to_string(n_layer_) + ")");
    }
    return keys ? keys_[static_cast<size_t>(il)] : queries_[static_cast<size_t>(il)];
}

int64_t AttentionProbe::total(int il, bool keys) const {
    std::lock_guard<std::mutex> lock(mutex_);
    return ring(il, keys).total;
}

std::vector<float> AttentionProbe::rows(int il, bool keys, int64_t* n_rows) const {
    std::lock_guard<std::mutex> lock(mutex_);
    const Ring& r = ring(il, keys);
    const int64_t count = std::min(r.total, window_);
    std::vector<float> out(static_cast<size_t>(count * r.width));
    for (int64_t i = 0; i < count; ++i) {
        const int64_t slot = (r.total - count + i) % window_;
        std::memcpy(out.data() + i * r.width, r.data.data() + slot * r.width, static_cast<size_t>(r.width) * sizeof(float));
    }
    *n_rows = count;
    return out;
}

std::string AttentionProbe::error() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return error_;
}

}  // namespace qkv
