// Python bindings of the native core: the K/V codec and the llama.cpp
// sequence-state translator. Arrays cross the boundary as numpy arrays.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
#include <memory>

#include "codec.h"
#include "ggml_types.h"
#include "probe.h"
#include "state.h"

namespace py = pybind11;

namespace {

using F32Array = py::array_t<float, py::array::c_style | py::array::forcecast>;
using U8Array = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;
using I32Array = py::array_t<int32_t, py::array::c_style | py::array::forcecast>;

// Hand a vector's storage to numpy without a copy.
template <typename T>
py::array_t<T> to_numpy(std::vector<T>&& values, std::vector<py::ssize_t> shape) {
    auto* owner = new std::vector<T>(std::move(values));
    py::capsule free_owner(owner, [](void* p) { delete static_cast<std::vector<T>*>(p); });
    return py::array_t<T>(shape, owner->data(), free_owner);
}

py::array_t<uint8_t> encode(const F32Array& x, const U8Array& bits, int64_t group_size, int n_threads) {
    if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D (n_rows, n), got " + std::to_string(x.ndim()) + "-D");
    const int64_t n_rows = x.shape(0);
    const int64_t n = x.shape(1);
    if (bits.ndim() != 1 || bits.shape(0) != n_rows) {
        throw std::invalid_argument("bits must have one width per row: got " + std::to_string(bits.size()) +
                                    " widths for " + std::to_string(n_rows) + " rows");
    }
    const uint8_t* b = bits.data();
    size_t total = 0;
    for (int64_t i = 0; i < n_rows; ++i) total += qkv::codec_row_bytes(b[i], n, group_size);
    std::vector<uint8_t> out(total);
    {
        py::gil_scoped_release release;
        qkv::codec_encode(x.data(), n_rows, n, b, group_size, out.data(), out.size(), n_threads);
    }
    return to_numpy(std::move(out), {static_cast<py::ssize_t>(total)});
}

py::array_t<float> decode(const U8Array& payload, const U8Array& bits, int64_t n, int64_t group_size, int n_threads) {
    if (bits.ndim() != 1) throw std::invalid_argument("bits must be 1-D");
    const int64_t n_rows = bits.shape(0);
    qkv::codec_row_bytes(16, n, group_size);  // validates n and group_size before the allocation
    std::vector<float> y(static_cast<size_t>(n_rows) * static_cast<size_t>(n));
    {
        py::gil_scoped_release release;
        qkv::codec_decode(payload.data(), static_cast<size_t>(payload.size()), n_rows, n, bits.data(), group_size,
                          y.data(), n_threads);
    }
    return to_numpy(std::move(y), {n_rows, n});
}

void check_rows(const U8Array& bits, const I32Array& positions, int64_t n_rows) {
    if (bits.ndim() != 1 || bits.shape(0) != n_rows || positions.ndim() != 1 || positions.shape(0) != n_rows) {
        throw std::invalid_argument("bits and positions must have one entry per row: got " +
                                    std::to_string(bits.size()) + " widths and " + std::to_string(positions.size()) +
                                    " positions for " + std::to_string(n_rows) + " rows");
    }
}

size_t channel_bytes(const U8Array& bits, const I32Array& positions, int64_t n, int64_t block) {
    const int64_t n_rows = bits.ndim() == 1 ? bits.shape(0) : -1;
    check_rows(bits, positions, n_rows);
    return qkv::codec_channel_bytes(n_rows, n, bits.data(), positions.data(), block);
}

py::array_t<uint8_t> channel_encode(const F32Array& x, const U8Array& bits, const I32Array& positions, int64_t block,
                                    int n_threads) {
    if (x.ndim() != 2) throw std::invalid_argument("x must be 2-D (n_rows, n), got " + std::to_string(x.ndim()) + "-D");
    const int64_t n_rows = x.shape(0);
    const int64_t n = x.shape(1);
    check_rows(bits, positions, n_rows);
    const size_t total = qkv::codec_channel_bytes(n_rows, n, bits.data(), positions.data(), block);
    std::vector<uint8_t> out(total);
    {
        py::gil_scoped_release release;
        qkv::codec_channel_encode(x.data(), n_rows, n, bits.data(), positions.data(), block, out.data(), out.size(),
                                  n_threads);
    }
    return to_numpy(std::move(out), {static_cast<py::ssize_t>(total)});
}

py::array_t<float> channel_decode(const U8Array& payload, const U8Array& bits, const I32Array& positions, int64_t n,
                                  int64_t block, int n_threads) {
    const int64_t n_rows = bits.ndim() == 1 ? bits.shape(0) : -1;
    check_rows(bits, positions, n_rows);
    // Validates every argument before the allocation.
    qkv::codec_channel_bytes(n_rows, n, bits.data(), positions.data(), block);
    std::vector<float> y(static_cast<size_t>(n_rows) * static_cast<size_t>(n));
    {
        py::gil_scoped_release release;
        qkv::codec_channel_decode(payload.data(), static_cast<size_t>(payload.size()), n_rows, n, bits.data(),
                                  positions.data(), block, y.data(), n_threads);
    }
    return to_numpy(std::move(y), {n_rows, n});
}

py::dict parse_state(const py::buffer& buffer, int64_t k_chunk, int64_t v_chunk, int n_threads) {
    py::buffer_info info = buffer.request();
    if (info.ndim != 1 || info.itemsize != 1) throw std::invalid_argument("state must be a 1-D byte buffer");
    qkv::SeqState state;
    {
        py::gil_scoped_release release;
        state = qkv::parse_seq_state(static_cast<const uint8_t*>(info.ptr), static_cast<size_t>(info.size),
                                     qkv::Rotation{k_chunk, v_chunk}, n_threads);
    }
    py::list sections;
    for (auto& section : state.sections) {
        py::list layers;
        for (auto& layer : section.layers) {
            py::dict d;
            d["k_type"] = layer.k_type;
            d["v_type"] = layer.v_type;
            d["k"] = to_numpy(std::move(layer.k), {static_cast<py::ssize_t>(section.cell_count), layer.n_embd_k});
            d["v"] = to_numpy(std::move(layer.v), {static_cast<py::ssize_t>(section.cell_count), layer.n_embd_v});
            layers.append(d);
        }
        py::dict s;
        s["n_stream"] = section.n_stream;
        s["stream"] = section.stream;
        s["cell_count"] = section.cell_count;
        s["v_trans"] = section.v_trans;
        s["pos"] = to_numpy(std::move(section.pos), {static_cast<py::ssize_t>(section.cell_count)});
        s["layers"] = layers;
        sections.append(s);
    }
    py::dict out;
    out["seq_id"] = state.seq_id;
    out["sections"] = sections;
    return out;
}

py::bytes build_state(const py::list& sections, int32_t seq_id, int32_t k_type, int32_t v_type, bool v_trans,
                      int64_t k_chunk, int64_t v_chunk, int n_threads) {
    // Keep the converted arrays alive while the native code reads them.
    std::vector<F32Array> keep;
    std::vector<qkv::BuildSection> built;
    for (const auto& item : sections) {
        const py::dict s = item.cast<py::dict>();
        qkv::BuildSection section;
        section.n_stream = s["n_stream"].cast<uint32_t>();
        section.stream = s["stream"].cast<uint32_t>();
        const I32Array pos = s["pos"].cast<I32Array>();
        section.pos.assign(pos.data(), pos.data() + pos.size());
        const auto cell_count = static_cast<py::ssize_t>(section.pos.size());
        for (const auto& layer_item : s["layers"].cast<py::list>()) {
            const py::tuple kv = layer_item.cast<py::tuple>();
            F32Array k = kv[0].cast<F32Array>();
            F32Array v = kv[1].cast<F32Array>();
            if (k.ndim() != 2 || v.ndim() != 2 || k.shape(0) != cell_count || v.shape(0) != cell_count) {
                throw std::invalid_argument("each layer needs K and V of shape (cell_count=" +
                                            std::to_string(cell_count) + ", n_embd)");
            }
            section.layers.push_back({k.data(), v.data(), k.shape(1), v.shape(1)});
            keep.push_back(std::move(k));
            keep.push_back(std::move(v));
        }
        built.push_back(std::move(section));
    }
    qkv::BuildOptions options;
    options.seq_id = seq_id;
    options.k_type = k_type;
    options.v_type = v_type;
    options.v_trans = v_trans;
    options.rotation = {k_chunk, v_chunk};
    std::vector<uint8_t> out;
    {
        py::gil_scoped_release release;
        out = qkv::build_seq_state(built, options, n_threads);
    }
    return py::bytes(reinterpret_cast<const char*>(out.data()), out.size());
}

py::array_t<float> hadamard(const F32Array& x, int64_t chunk) {
    const int64_t last = x.ndim() > 0 ? x.shape(x.ndim() - 1) : 0;
    if (chunk <= 0 || (chunk & (chunk - 1)) != 0 || last % chunk != 0) {
        throw std::invalid_argument("chunk must be a power of two dividing the last dimension " +
                                    std::to_string(last) + ", got " + std::to_string(chunk));
    }
    auto out = py::array_t<float>(x.request().shape);
    std::memcpy(out.mutable_data(), x.data(), sizeof(float) * static_cast<size_t>(x.size()));
    {
        py::gil_scoped_release release;
        qkv::hadamard_chunks(out.mutable_data(), out.size(), chunk);
    }
    return out;
}

std::unique_ptr<qkv::AttentionProbe> make_probe(const py::dict& functions, int n_layer, int64_t n_embd_q,
                                               int64_t n_embd_k, int64_t window) {
    qkv::GgmlFunctions fn;
    auto address = [&functions](const char* name) -> uintptr_t {
        if (!functions.contains(name)) throw std::invalid_argument(std::string("missing ggml function ") + name);
        return functions[name].cast<uintptr_t>();
    };
    fn.get_name = reinterpret_cast<decltype(fn.get_name)>(address("ggml_get_name"));
    fn.op_desc = reinterpret_cast<decltype(fn.op_desc)>(address("ggml_op_desc"));
    fn.nelements = reinterpret_cast<decltype(fn.nelements)>(address("ggml_nelements"));
    fn.nbytes = reinterpret_cast<decltype(fn.nbytes)>(address("ggml_nbytes"));
    fn.is_contiguous = reinterpret_cast<decltype(fn.is_contiguous)>(address("ggml_is_contiguous"));
    fn.tensor_get = reinterpret_cast<decltype(fn.tensor_get)>(address("ggml_backend_tensor_get"));
    return std::make_unique<qkv::AttentionProbe>(fn, n_layer, n_embd_q, n_embd_k, window);
}

py::array_t<float> probe_rows(const qkv::AttentionProbe& probe, int il, bool keys) {
    int64_t n_rows = 0;
    std::vector<float> rows = probe.rows(il, keys, &n_rows);
    const int64_t width = n_rows > 0 ? static_cast<int64_t>(rows.size()) / n_rows : 0;
    return to_numpy(std::move(rows), {static_cast<py::ssize_t>(n_rows), static_cast<py::ssize_t>(width)});
}

}  // namespace

PYBIND11_MODULE(_native, m) {
    m.doc() = "Native core of qkvshare_edge: K/V codec and llama.cpp sequence-state translator";

    py::register_exception<qkv::StateFormatError>(m, "StateFormatError", PyExc_ValueError);

    m.def("codec_width_valid", &qkv::codec_width_valid, py::arg("bits"));
    m.def("codec_row_bytes", &qkv::codec_row_bytes, py::arg("bits"), py::arg("n"), py::arg("group_size"));
    m.def("codec_encode", &encode, py::arg("x"), py::arg("bits"), py::arg("group_size"), py::arg("n_threads") = 0);
    m.def("codec_decode", &decode, py::arg("payload"), py::arg("bits"), py::arg("n"), py::arg("group_size"),
          py::arg("n_threads") = 0);

    m.def("codec_channel_bytes", &channel_bytes, py::arg("bits"), py::arg("positions"), py::arg("n"),
          py::arg("block"));
    m.def("codec_channel_encode", &channel_encode, py::arg("x"), py::arg("bits"), py::arg("positions"),
          py::arg("block"), py::arg("n_threads") = 0);
    m.def("codec_channel_decode", &channel_decode, py::arg("payload"), py::arg("bits"), py::arg("positions"),
          py::arg("n"), py::arg("block"), py::arg("n_threads") = 0);

    m.def("parse_state", &parse_state, py::arg("buffer"), py::arg("k_chunk") = 0, py::arg("v_chunk") = 0,
          py::arg("n_threads") = 0);
    m.def("build_state", &build_state, py::arg("sections"), py::arg("seq_id"), py::arg("k_type"), py::arg("v_type"),
          py::arg("v_trans"), py::arg("k_chunk") = 0, py::arg("v_chunk") = 0, py::arg("n_threads") = 0);
    m.def("hadamard", &hadamard, py::arg("x"), py::arg("chunk"));
    m.def("ggml_row_size", &qkv::ggml_row_size, py::arg("type"), py::arg("n"));

    py::class_<qkv::AttentionProbe>(m, "AttentionProbe")
        .def(py::init(&make_probe), py::arg("functions"), py::arg("n_layer"), py::arg("n_embd_q"), py::arg("n_embd_k"),
             py::arg("window"))
        .def_property_readonly_static(
            "callback_address",
            [](const py::object&) { return reinterpret_cast<uintptr_t>(&qkv::AttentionProbe::eval_callback); })
        .def_property_readonly("address", [](qkv::AttentionProbe& p) { return reinterpret_cast<uintptr_t>(&p); })
        .def_property("enabled", &qkv::AttentionProbe::enabled, &qkv::AttentionProbe::set_enabled)
        .def_property_readonly("n_layer", &qkv::AttentionProbe::n_layer)
        .def_property_readonly("window", &qkv::AttentionProbe::window)
        .def("reset", &qkv::AttentionProbe::reset)
        .def("total", &qkv::AttentionProbe::total, py::arg("layer"), py::arg("keys") = false)
        .def("rows", &probe_rows, py::arg("layer"), py::arg("keys") = false)
        .def_property_readonly("error", &qkv::AttentionProbe::error);

    m.attr("STATE_SEQ_MAGIC") = qkv::kStateSeqMagic;
    m.attr("LLAMA_CPP_LAYOUT") = qkv::kLlamaCppVersion;
}
