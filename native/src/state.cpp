#include "state.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <thread>

#include "ggml_types.h"

namespace qkv {

namespace {

// Upper bounds that no real cache reaches; they stop a corrupt count from
// driving a huge allocation before the buffer size check can catch it.
constexpr uint32_t kMaxStreams = 4096;
constexpr uint32_t kMaxLayers = 4096;
constexpr uint64_t kMaxRowBytes = uint64_t{1} << 24;

std::string where(size_t section, uint32_t layer) {
    return " (section " + std::to_string(section) + ", layer " + std::to_string(layer) + ", expected layout of " +
           kLlamaCppVersion + ")";
}

class Reader {
  public:
    Reader(const uint8_t* data, size_t size) : data_(data), size_(size) {}

    size_t offset() const { return offset_; }
    size_t remaining() const { return size_ - offset_; }

    const uint8_t* take(size_t n, const char* field) {
        if (n > remaining()) {
            throw StateFormatError(std::string("sequence state truncated: field ") + field + " needs " +
                                   std::to_string(n) + " bytes at offset " + std::to_string(offset_) + ", only " +
                                   std::to_string(remaining()) + " remain (expected layout of " + kLlamaCppVersion +
                                   ")");
        }
        const uint8_t* p = data_ + offset_;
        offset_ += n;
        return p;
    }

    template <typename T>
    T read(const char* field) {
        T value;
        std::memcpy(&value, take(sizeof(T), field), sizeof(T));
        return value;
    }

  private:
    const uint8_t* data_;
    size_t size_;
    size_t offset_ = 0;
};

class Writer {
  public:
    explicit Writer(std::vector<uint8_t>& out) : out_(out) {}

    template <typename T>
    void write(T value) {
        const size_t at = out_.size();
        out_.resize(at + sizeof(T));
        std::memcpy(out_.data() + at, &value, sizeof(T));
    }

    uint8_t* grow(size_t n) {
        const size_t at = out_.size();
        out_.resize(at + n);
        return out_.data() + at;
    }

  private:
    std::vector<uint8_t>& out_;
};

// Multiply two sizes, failing instead of wrapping around.
size_t checked_mul(size_t a, size_t b, const char* what) {
    if (a != 0 && b > std::numeric_limits<size_t>::max() / a) {
        throw StateFormatError(std::string("sequence state size overflow in ") + what);
    }
    return a * b;
}

// Run fn(i) for i in [0, n) on up to n_threads threads.
template <typename Fn>
void parallel_for(int64_t n, int n_threads, Fn fn) {
    if (n_threads <= 0) {
        n_threads = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    }
    n_threads = static_cast<int>(std::min<int64_t>(n_threads, n));
    if (n_threads <= 1) {
        for (int64_t i = 0; i < n; ++i) fn(i);
        return;
    }
    std::vector<std::thread> threads;
    std::vector<std::exception_ptr> errors(static_cast<size_t>(n_threads));
    for (int t = 0; t < n_threads; ++t) {
        threads.emplace_back([&, t] {
            try {
                for (int64_t i = t; i < n; i += n_threads) fn(i);
            } catch (...) {
                errors[static_cast<size_t>(t)] = std::current_exception();
            }
        });
    }
    for (auto& thread : threads) thread.join();
    for (auto& error : errors) {
        if (error) std::rethrow_exception(error);
    }
}

bool rotated(int32_t type, int64_t chunk) { return chunk > 0 && ggml_type_quantized(type); }

void check_type(int32_t type, const char* field, size_t section, uint32_t layer) {
    if (!ggml_type_supported(type)) {
        throw StateFormatError(std::string("unsupported KV cache type in ") + field + ": " + ggml_type_name(type) +
                               where(section, layer) + "; use f32, f16, bf16, q8_0 or q4_0");
    }
}

// Number of elements in a row of `row_bytes` bytes of `type`.
int64_t row_elements(int32_t type, uint64_t row_bytes, const char* field, size_t section, uint32_t layer) {
    const size_t type_size = ggml_type_size(type);
    if (row_bytes == 0 || row_bytes > kMaxRowBytes || row_bytes % type_size != 0) {
        throw StateFormatError(std::string("invalid ") + field + " " + std::to_string(row_bytes) + " for type " +
                               ggml_type_name(type) + where(section, layer));
    }
    return static_cast<int64_t>(row_bytes / type_size) * ggml_block_size(type);
}

void check_rotation_chunk(int64_t n, int64_t chunk, const char* field, size_t section, uint32_t layer) {
    if (chunk > 0 && n % chunk != 0) {
        throw StateFormatError(std::string(field) + " of " + std::to_string(n) +
                               " elements is not a multiple of the rotation chunk " + std::to_string(chunk) +
                               where(section, layer));
    }
}

StateSection parse_section(Reader& reader, size_t index, const Rotation& rotation, int n_threads) {
    StateSection section;
    section.n_stream = reader.read<uint32_t>("n_stream");
    if (section.n_stream == 0 || section.n_stream > kMaxStreams) {
        throw StateFormatError("invalid n_stream " + std::to_string(section.n_stream) + " in section " +
                               std::to_string(index) + " (expected 1.." + std::to_string(kMaxStreams) + ", layout of " +
                               kLlamaCppVersion + ")");
    }

    bool found = false;
    for (uint32_t s = 0; s < section.n_stream; ++s) {
        const uint32_t cell_count = reader.read<uint32_t>("cell_count");
        if (cell_count == 0) {
            continue;
        }
        if (found) {
            throw StateFormatError("section " + std::to_string(index) + " has cells in more than one stream (" +
                                   std::to_string(section.stream) + " and " + std::to_string(s) +
                                   "); a single-sequence state lists one stream");
        }
        found = true;
        section.stream = s;
        section.cell_count = cell_count;

        // Each cell needs at least 12 bytes of metadata, so a count larger
        // than that bound is a lie and is rejected before any allocation.
        if (cell_count > reader.remaining() / 12) {
            throw StateFormatError("cell_count " + std::to_string(cell_count) + " in section " +
                                   std::to_string(index) + " exceeds what the remaining " +
                                   std::to_string(reader.remaining()) + " bytes can hold");
        }
        section.pos.resize(cell_count);
        for (uint32_t i = 0; i < cell_count; ++i) {
            section.pos[i] = reader.read<int32_t>("pos");
            const uint32_t n_seq_id = reader.read<uint32_t>("n_seq_id");
            if (n_seq_id != 1) {
                throw StateFormatError("cell " + std::to_string(i) + " of section " + std::to_string(index) +
                                       " lists " + std::to_string(n_seq_id) +
                                       " sequence ids, expected 1 for a single-sequence state (a state of a model "
                                       "with M-RoPE or per-cell extensions is not supported)");
            }
            reader.read<int32_t>("seq_id");
        }

        section.v_trans = reader.read<uint32_t>("v_trans");
        if (section.v_trans > 1) {
            throw StateFormatError("invalid v_trans " + std::to_string(section.v_trans) + " in section " +
                                   std::to_string(index) + " (expected 0 or 1)");
        }
        const uint32_t n_layer = reader.read<uint32_t>("n_layer");
        if (n_layer == 0 || n_layer > kMaxLayers) {
            throw StateFormatError("invalid n_layer " + std::to_string(n_layer) + " in section " +
                                   std::to_string(index));
        }
        section.layers.resize(n_layer);

        // First pass: record where each layer's rows are, checking every
        // size against the buffer. Second pass: convert in parallel.
        struct Span {
            const uint8_t* data;
            uint64_t row_bytes;
        };
        std::vector<Span> k_spans(n_layer);
        std::vector<Span> v_spans(n_layer);

        for (uint32_t il = 0; il < n_layer; ++il) {
            StateLayer& layer = section.layers[il];
            layer.k_type = reader.read<int32_t>("k_type");
            check_type(layer.k_type, "k_type", index, il);
            const uint64_t k_size_row = reader.read<uint64_t>("k_size_row");
            layer.n_embd_k = row_elements(layer.k_type, k_size_row, "k_size_row", index, il);
            if (rotated(layer.k_type, rotation.k_chunk)) {
                check_rotation_chunk(layer.n_embd_k, rotation.k_chunk, "K row", index, il);
            }
            k_spans[il] = {reader.take(checked_mul(k_size_row, cell_count, "K rows"), "K rows"), k_size_row};
        }

        for (uint32_t il = 0; il < n_layer; ++il) {
            StateLayer& layer = section.layers[il];
            layer.v_type = reader.read<int32_t>("v_type");
            check_type(layer.v_type, "v_type", index, il);
            if (section.v_trans == 0) {
                const uint64_t v_size_row = reader.read<uint64_t>("v_size_row");
                layer.n_embd_v = row_elements(layer.v_type, v_size_row, "v_size_row", index, il);
                v_spans[il] = {reader.take(checked_mul(v_size_row, cell_count, "V rows"), "V rows"), v_size_row};
            } else {
                if (ggml_type_quantized(layer.v_type)) {
                    throw StateFormatError("transposed V of quantized type " + ggml_type_name(layer.v_type) +
                                           where(index, il) + "; llama.cpp needs flash attention for quantized V");
                }
                const uint32_t v_size_el = reader.read<uint32_t>("v_size_el");
                if (v_size_el != ggml_type_size(layer.v_type)) {
                    throw StateFormatError("v_size_el " + std::to_string(v_size_el) + " does not match type " +
                                           ggml_type_name(layer.v_type) + " (" +
                                           std::to_string(ggml_type_size(layer.v_type)) + ")" + where(index, il));
                }
                const uint32_t n_embd_v_gqa = reader.read<uint32_t>("n_embd_v_gqa");
                if (n_embd_v_gqa == 0 || n_embd_v_gqa > kMaxRowBytes) {
                    throw StateFormatError("invalid n_embd_v_gqa " + std::to_string(n_embd_v_gqa) + where(index, il));
                }
                layer.n_embd_v = n_embd_v_gqa;
                const size_t bytes = checked_mul(checked_mul(v_size_el, n_embd_v_gqa, "V"), cell_count, "V");
                v_spans[il] = {reader.take(bytes, "V columns"), v_size_el};
            }
            if (rotated(layer.v_type, rotation.v_chunk)) {
                check_rotation_chunk(layer.n_embd_v, rotation.v_chunk, "V row", index, il);
            }
        }

        // Every size was checked above, so the allocations below are bounded
        // by the buffer itself.
        parallel_for(n_layer, n_threads, [&](int64_t il) {
            StateLayer& layer = section.layers[static_cast<size_t>(il)];
            const Span& ks = k_spans[static_cast<size_t>(il)];
            const Span& vs = v_spans[static_cast<size_t>(il)];

            layer.k.resize(static_cast<size_t>(cell_count) * static_cast<size_t>(layer.n_embd_k));
            for (uint32_t i = 0; i < cell_count; ++i) {
                float* row = layer.k.data() + static_cast<size_t>(i) * layer.n_embd_k;
                ggml_row_to_float(layer.k_type, ks.data + i * ks.row_bytes, row, layer.n_embd_k);
                if (rotated(layer.k_type, rotation.k_chunk)) hadamard_chunks(row, layer.n_embd_k, rotation.k_chunk);
            }

            layer.v.resize(static_cast<size_t>(cell_count) * static_cast<size_t>(layer.n_embd_v));
            if (section.v_trans == 0) {
                for (uint32_t i = 0; i < cell_count; ++i) {
                    float* row = layer.v.data() + static_cast<size_t>(i) * layer.n_embd_v;
                    ggml_row_to_float(layer.v_type, vs.data + i * vs.row_bytes, row, layer.n_embd_v);
                    if (rotated(layer.v_type, rotation.v_chunk)) {
                        hadamard_chunks(row, layer.n_embd_v, rotation.v_chunk);
                    }
                }
            } else {
                // Channel-major in the buffer: channel j's cell_count elements are
                // contiguous, so each channel converts in one call.
                std::vector<float> column(cell_count);
                for (int64_t j = 0; j < layer.n_embd_v; ++j) {
                    const uint8_t* src = vs.data + static_cast<size_t>(j) * cell_count * vs.row_bytes;
                    ggml_row_to_float(layer.v_type, src, column.data(), cell_count);
                    for (uint32_t i = 0; i < cell_count; ++i) {
                        layer.v[static_cast<size_t>(i) * layer.n_embd_v + j] = column[i];
                    }
                }
            }
        });
    }
    return section;
}

void write_rows(Writer& writer, int32_t type, const float* x, int64_t n_rows, int64_t n, int64_t chunk,
                int n_threads) {
    const size_t row_bytes = ggml_row_size(type, n);
    uint8_t* out = writer.grow(row_bytes * static_cast<size_t>(n_rows));
    const bool rotate = rotated(type, chunk);
    parallel_for(n_rows, n_rows >= 256 ? n_threads : 1, [&](int64_t i) {
        const float* row = x + i * n;
        if (rotate) {
            std::vector<float> tmp(row, row + n);
            hadamard_chunks(tmp.data(), n, chunk);
            ggml_row_from_float(type, tmp.data(), out + i * row_bytes, n);
        } else {
            ggml_row_from_float(type, row, out + i * row_bytes, n);
        }
    });
}

}  // namespace

void hadamard_chunks(float* x, int64_t n, int64_t chunk) {
    const float scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(chunk)));
    for (int64_t base = 0; base + chunk <= n; base += chunk) {
        float* c = x + base;
        for (int64_t h = 1; h < chunk; h *= 2) {
            for (int64_t i = 0; i < chunk; i += 2 * h) {
                for (int64_t j = i; j < i + h; ++j) {
                    const float a = c[j];
                    const float b = c[j + h];
                    c[j] = a + b;
                    c[j + h] = a - b;
                }
            }
        }
        for (int64_t j = 0; j < chunk; ++j) c[j] *= scale;
    }
}

namespace {

SeqState parse_all(const uint8_t* data, size_t size, const Rotation& rotation, int n_threads) {
    Reader reader(data, size);
    SeqState state;

    const uint32_t magic = reader.read<uint32_t>("magic");
    if (magic != kStateSeqMagic) {
        char buf[96];
        std::snprintf(buf, sizeof(buf), "invalid sequence state magic 0x%08x (expected 0x%08x)", magic,
                      kStateSeqMagic);
        throw StateFormatError(buf);
    }
    state.seq_id = reader.read<int32_t>("seq_id");

    while (reader.remaining() > 0) {
        if (state.sections.size() >= 8) {
            throw StateFormatError("sequence state has more than 8 KV cache sections");
        }
        state.sections.push_back(parse_section(reader, state.sections.size(), rotation, n_threads));
    }
    if (state.sections.empty()) {
        throw StateFormatError("sequence state has no KV cache section");
    }
    return state;
}

}  // namespace

SeqState parse_seq_state(const uint8_t* data, size_t size, const Rotation& rotation, int n_threads) {
    try {
        return parse_all(data, size, rotation, n_threads);
    } catch (const StateFormatError& error) {
        const std::string message = error.what();
        if (message.find(kLlamaCppVersion) != std::string::npos) throw;
        throw StateFormatError(message + " (expected the layout of " + kLlamaCppVersion + ")");
    }
}

std::vector<uint8_t> build_seq_state(const std::vector<BuildSection>& sections, const BuildOptions& options,
                                     int n_threads) {
    if (!ggml_type_supported(options.k_type) || !ggml_type_supported(options.v_type)) {
        throw std::invalid_argument("unsupported target cache type: K " + ggml_type_name(options.k_type) + ", V " +
                                    ggml_type_name(options.v_type));
    }
    if (options.v_trans && ggml_type_quantized(options.v_type)) {
        throw std::invalid_argument("transposed V of quantized type " + ggml_type_name(options.v_type) +
                                    " is not a llama.cpp layout");
    }

    std::vector<uint8_t> out;
    Writer writer(out);
    writer.write<uint32_t>(kStateSeqMagic);
    writer.write<int32_t>(options.seq_id);

    for (size_t si = 0; si < sections.size(); ++si) {
        const BuildSection& section = sections[si];
        const uint32_t cell_count = static_cast<uint32_t>(section.pos.size());
        if (section.n_stream == 0 || section.stream >= section.n_stream) {
            throw std::invalid_argument("invalid stream " + std::to_string(section.stream) + " of n_stream " +
                                        std::to_string(section.n_stream) + " in section " + std::to_string(si));
        }
        writer.write<uint32_t>(section.n_stream);
        for (uint32_t s = 0; s < section.n_stream; ++s) {
            const uint32_t count = s == section.stream ? cell_count : 0;
            writer.write<uint32_t>(count);
            if (count == 0) {
                continue;
            }
            for (uint32_t i = 0; i < cell_count; ++i) {
                writer.write<int32_t>(section.pos[i]);
                writer.write<uint32_t>(1);
                writer.write<int32_t>(options.seq_id);
            }
            writer.write<uint32_t>(options.v_trans ? 1 : 0);
            writer.write<uint32_t>(static_cast<uint32_t>(section.layers.size()));

            for (const BuildLayer& layer : section.layers) {
                if (layer.n_embd_k % ggml_block_size(options.k_type) != 0) {
                    throw std::invalid_argument("K row of " + std::to_string(layer.n_embd_k) +
                                                " elements does not fit type " + ggml_type_name(options.k_type));
                }
                writer.write<int32_t>(options.k_type);
                writer.write<uint64_t>(ggml_row_size(options.k_type, layer.n_embd_k));
                write_rows(writer, options.k_type, layer.k, cell_count, layer.n_embd_k, options.rotation.k_chunk,
                           n_threads);
            }
            for (const BuildLayer& layer : section.layers) {
                writer.write<int32_t>(options.v_type);
                if (!options.v_trans) {
                    if (layer.n_embd_v % ggml_block_size(options.v_type) != 0) {
                        throw std::invalid_argument("V row of " + std::to_string(layer.n_embd_v) +
                                                    " elements does not fit type " + ggml_type_name(options.v_type));
                    }
                    writer.write<uint64_t>(ggml_row_size(options.v_type, layer.n_embd_v));
                    write_rows(writer, options.v_type, layer.v, cell_count, layer.n_embd_v,
                               options.rotation.v_chunk, n_threads);
                } else {
                    const size_t el = ggml_type_size(options.v_type);
                    writer.write<uint32_t>(static_cast<uint32_t>(el));
                    writer.write<uint32_t>(static_cast<uint32_t>(layer.n_embd_v));
                    uint8_t* dst = writer.grow(el * static_cast<size_t>(layer.n_embd_v) * cell_count);
                    std::vector<float> column(cell_count);
                    for (int64_t j = 0; j < layer.n_embd_v; ++j) {
                        for (uint32_t i = 0; i < cell_count; ++i) {
                            column[i] = layer.v[static_cast<size_t>(i) * layer.n_embd_v + j];
                        }
                        ggml_row_from_float(options.v_type, column.data(), dst + j * cell_count * el, cell_count);
                    }
                }
            }
        }
    }
    return out;
}

}  // namespace qkv
