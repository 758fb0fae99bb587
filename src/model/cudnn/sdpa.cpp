// cuDNN's fused attention forward (SDPA) on esmbed's packed layout, through the cuDNN frontend's
// graph API. The backend is loaded at run time (NV_CUDNN_FRONTEND_USE_DYNAMIC_LOADING): nothing
// here links libcudnn, so a machine without it still runs esmbed, on FlashAttention.
//
// The packed layout as cuDNN sees it: Q, K, V, O are [b, h, s, d] with ragged offsets, one
// element offset per sequence start (cu_seqlens times the tensor's token stride), a padding mask
// from each sequence's length, and `s` an upper bound on the lengths. A graph is built once per
// (device, b, s, h, d, strides, dtype) on each calling thread and reused; building one that
// cuDNN does not support is remembered, so the caller's fallback costs nothing the second time.
//
// Every graph of one head layout (device, h, d, strides, dtype, scale) runs one engine with one
// set of knobs: the heuristic's first choice for a fixed shape (PIN_B sequences of at most
// PIN_S), whatever shape comes first. Left to the heuristic per shape, the engine changes with
// the pack's sequence count and a sequence's numbers with the pack it is in (measured: 3e-3
// apart); pinned, they are bitwise the same, and the same in every process on the same GPU and
// cuDNN.

#include <dlfcn.h>

#include <cudnn_frontend.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <unordered_map>

namespace cudnn_frontend {
// The frontend's dynamic-loading shim resolves every backend call through this handle.
void *cudnn_dlhandle = nullptr;
}  // namespace cudnn_frontend

namespace fe = cudnn_frontend;

extern "C" {
// One attention call. Strides and offsets are in elements; `seq_len` is int32 [b], the offsets
// int32 [b + 1]. `workspace` holds `workspace_bytes` bytes of device memory.
struct EsmbedSdpa {
    int32_t device;
    void *stream;
    const void *q;
    const void *k;
    const void *v;
    void *o;
    const int32_t *seq_len;
    const int32_t *q_offsets;
    const int32_t *k_offsets;
    const int32_t *v_offsets;
    const int32_t *o_offsets;
    int64_t b, h, s, d;
    // [token stride, head stride] of Q, K, V, O.
    int64_t strides[4][2];
    int32_t bf16;
    float scale;
    void *workspace;
    int64_t workspace_bytes;
};
}

namespace {

enum Status : int32_t { OK = 0, UNSUPPORTED = 1, WORKSPACE = 2, FAILED = -1 };

enum Uid : int64_t { Q = 1, K, V, O, SEQ_LEN_Q, SEQ_LEN_KV, Q_OFF, K_OFF, V_OFF, O_OFF };

void write_error(char *out, size_t len, const std::string &message) {
    if (out && len > 0) {
        std::strncpy(out, message.c_str(), len - 1);
        out[len - 1] = '\0';
    }
}

using Key = std::tuple<int32_t, int64_t, int64_t, int64_t, int64_t, std::string, int32_t, uint32_t>;

Key key_of(const EsmbedSdpa &a) {
    std::string strides(reinterpret_cast<const char *>(a.strides), sizeof(a.strides));
    uint32_t scale_bits;
    std::memcpy(&scale_bits, &a.scale, sizeof(scale_bits));
    return Key{a.device, a.b, a.s, a.h, a.d, strides, a.bf16, scale_bits};
}

// The shape whose engine every graph of a head layout runs.
constexpr int64_t PIN_B = 64;
constexpr int64_t PIN_S = 1024;

// A head layout: the key without the shape.
Key layout_of(const EsmbedSdpa &a) {
    Key key = key_of(a);
    std::get<1>(key) = PIN_B;
    std::get<2>(key) = PIN_S;
    return key;
}

// The engine and knobs of a head layout, or why its fixed shape has none.
struct Pin {
    bool ok = false;
    int64_t engine = 0;
    std::unordered_map<fe::KnobType_t, int64_t> knobs;
    std::string why;
};

// A built graph, or the reason cuDNN gave for not supporting the shape (graph == nullptr).
struct Entry {
    std::shared_ptr<fe::graph::Graph> graph;
    int64_t workspace = 0;
    std::string unsupported;
    std::string plan;  // the engine and knobs cuDNN chose, for logs
};

// One thread's cuDNN handles (one per device) and graphs. Per thread, because a handle carries a
// stream and graphs are executed through it; esmbed drives each device from its own worker.
struct Device {
    cudnnHandle_t handle = nullptr;
    // ESMBED_CUDNN_DYNAMIC=1: graphs of other shapes reuse the kernels compiled for the first (a
    // new pack shape costs a plan, not a compilation).
    std::shared_ptr<fe::KernelCache> kernels = std::make_shared<fe::KernelCache>();
};

struct ThreadState {
    std::map<int32_t, Device> devices;
    std::map<Key, Pin> pins;
    std::map<Key, Entry> graphs;
    ~ThreadState() {
        graphs.clear();  // plans before the handles they were built with
        for (auto &[id, device] : devices) fe::detail::destroy_handle(device.handle);
    }
};

thread_local ThreadState state;

std::shared_ptr<fe::graph::Tensor_attributes> index_tensor(fe::graph::Graph &g, const char *name, int64_t uid,
                                                           int64_t n, fe::DataType_t type) {
    return g.tensor(fe::graph::Tensor_attributes()
                        .set_name(name)
                        .set_uid(uid)
                        .set_dim({n, 1, 1, 1})
                        .set_stride({1, 1, 1, 1})
                        .set_data_type(type));
}

// [b, h, s, d] with the given token and head strides; the batch stride is never used (the
// ragged offsets place each sequence): a placeholder as large as an int32 allows (PyTorch's
// varlen convention), a multiple of 8 elements because cuDNN wants 16-byte aligned strides.
std::vector<int64_t> bhsd_stride(const EsmbedSdpa &a, int i) {
    return {INT32_MAX / 8 * 8, a.strides[i][1], a.strides[i][0], 1};
}

// ESMBED_CUDNN_DYNAMIC=1 shares one kernel cache across shapes (cuDNN's dynamic shapes);
// otherwise every graph is built on its own.
bool knob(const char *name);

bool dynamic_shapes() {
    static const bool on = knob("ESMBED_CUDNN_DYNAMIC");
    return on;
}

bool knob(const char *name) {
    const char *v = std::getenv(name);
    return v && std::strcmp(v, "1") == 0;
}

// The plan of `pin`'s engine and knobs, or (no pin: the fixed shape's own graph) heuristic
// mode A's first.
fe::error_t plan(fe::graph::Graph &g, Device &device, const Pin *pin) {
    auto status = g.validate();
    if (status.is_good()) status = g.build_operation_graph(device.handle);
    if (status.is_bad()) return status;
    if (pin) {
        status = g.create_execution_plan(pin->engine, pin->knobs);
    } else {
        status = g.create_execution_plans({fe::HeurMode_t::A});
    }
    if (status.is_good()) status = g.check_support(device.handle);
    if (status.is_good()) status = g.build_plans(device.handle);
    return status;
}

std::shared_ptr<fe::graph::Graph> graph_of(Device &device, const EsmbedSdpa &a);

// The engine and knobs of the plan `build_plans` kept: the first configuration that built, not
// necessarily the heuristic's first.
fe::error_t chosen_engine(fe::graph::Graph &g, Pin &pin) {
    std::string chosen;
    auto status = g.get_plan_name(chosen);
    if (status.is_bad()) return status;
    for (int64_t i = 0; i < g.get_execution_plan_count(); ++i) {
        std::string name;
        if (g.get_plan_name_at_index(i, name).is_good() && name == chosen) {
            return g.get_engine_and_knobs_at_index(i, pin.engine, pin.knobs);
        }
    }
    return {fe::error_code_t::INVALID_VALUE, "the built plan " + chosen + " is not among the configurations"};
}

// The pin of `a`'s head layout, made from its fixed shape on first use.
const Pin &pin_for(Device &device, const EsmbedSdpa &a) {
    auto key = layout_of(a);
    auto found = state.pins.find(key);
    if (found != state.pins.end()) return found->second;
    Pin pin;
    EsmbedSdpa fixed = a;
    fixed.b = PIN_B;
    fixed.s = PIN_S;
    auto g = graph_of(device, fixed);
    auto status = plan(*g, device, nullptr);
    if (status.is_good()) status = chosen_engine(*g, pin);
    pin.ok = status.is_good();
    if (!pin.ok) pin.why = "no engine for the pinned shape: " + status.get_message();
    return state.pins.emplace(key, pin).first->second;
}

Entry build(Device &device, const EsmbedSdpa &a) {
    Entry entry;
    const Pin &pin = pin_for(device, a);
    if (!pin.ok) {
        entry.unsupported = pin.why;
        return entry;
    }
    auto g = graph_of(device, a);
    auto status = plan(*g, device, &pin);
    if (status.is_bad()) {
        entry.unsupported = "the pinned engine " + std::to_string(pin.engine) + ": " + status.get_message();
        return entry;
    }
    if (g->get_plan_name(entry.plan).is_bad()) entry.plan = "(unnamed)";
    if (g->get_workspace_size(entry.workspace).is_bad()) {
        entry.unsupported = "no workspace size";
        return entry;
    }
    entry.graph = g;
    return entry;
}

// The SDPA graph of `a`'s shape, not yet planned.
std::shared_ptr<fe::graph::Graph> graph_of(Device &device, const EsmbedSdpa &a) {
    auto g = std::make_shared<fe::graph::Graph>();
    g->set_io_data_type(a.bf16 ? fe::DataType_t::BFLOAT16 : fe::DataType_t::HALF)
        .set_intermediate_data_type(fe::DataType_t::FLOAT)
        .set_compute_data_type(fe::DataType_t::FLOAT);
    if (dynamic_shapes()) g->set_dynamic_shape_enabled(true).set_kernel_cache(device.kernels);
    std::vector<int64_t> dims = {a.b, a.h, a.s, a.d};
    auto ragged = [&](const char *name, int64_t uid, const char *off, int64_t off_uid, int i) {
        return g->tensor(fe::graph::Tensor_attributes()
                             .set_name(name)
                             .set_uid(uid)
                             .set_dim(dims)
                             .set_stride(bhsd_stride(a, i))
                             .set_ragged_offset(index_tensor(*g, off, off_uid, a.b + 1, fe::DataType_t::INT32)));
    };
    auto q = ragged("q", Q, "q_offsets", Q_OFF, 0);
    auto k = ragged("k", K, "k_offsets", K_OFF, 1);
    auto v = ragged("v", V, "v_offsets", V_OFF, 2);
    // Queries and keys share one length tensor on the device, bound under two uids.
    auto seq_len_q = index_tensor(*g, "seq_len_q", SEQ_LEN_Q, a.b, fe::DataType_t::INT32);
    auto seq_len_kv = index_tensor(*g, "seq_len_kv", SEQ_LEN_KV, a.b, fe::DataType_t::INT32);
    auto options = fe::graph::SDPA_attributes()
                       .set_name("esmbed_sdpa")
                       .set_generate_stats(false)
                       .set_attn_scale(a.scale)
                       .set_padding_mask(true)
                       .set_seq_len_q(seq_len_q)
                       .set_seq_len_kv(seq_len_kv);
    auto [o, stats] = g->sdpa(q, k, v, options);
    (void)stats;
    o->set_output(true)
        .set_uid(O)
        .set_dim(dims)
        .set_stride(bhsd_stride(a, 3))
        .set_ragged_offset(index_tensor(*g, "o_offsets", O_OFF, a.b + 1, fe::DataType_t::INT32));
    return g;
}

// This thread's handle for `id` (created on first use, on the calling thread's current device).
Device *device_for(int32_t id, std::string &error) {
    auto found = state.devices.find(id);
    if (found != state.devices.end()) return &found->second;
    Device device;
    auto status = fe::detail::create_handle(&device.handle);
    if (status != CUDNN_STATUS_SUCCESS) {
        error = std::string("cudnnCreate: ") + fe::detail::get_error_string(status);
        return nullptr;
    }
    return &state.devices.emplace(id, device).first->second;
}

}  // namespace

extern "C" {

// Loads libcudnn once per process. Returns the backend's version (e.g. 91900), or 0 with the
// reason in `error`.
int64_t esmbed_cudnn_open(char *error, size_t error_len) {
    static std::once_flag once;
    static int64_t version = 0;
    static std::string why;
    std::call_once(once, [] {
        for (const char *name : {"libcudnn.so.9", "libcudnn.so"}) {
            fe::cudnn_dlhandle = dlopen(name, RTLD_NOW | RTLD_GLOBAL);
            if (fe::cudnn_dlhandle) break;
        }
        if (!fe::cudnn_dlhandle) {
            const char *e = dlerror();
            why = std::string("libcudnn.so.9 not found: ") + (e ? e : "dlopen failed");
            return;
        }
        try {
            version = static_cast<int64_t>(fe::detail::get_backend_version());
        } catch (const std::exception &e) {
            why = e.what();
        }
    });
    if (version == 0) write_error(error, error_len, why);
    return version;
}

// Runs one attention. OK; UNSUPPORTED (this shape, the reason in `error`; use another kernel);
// WORKSPACE (`*needed` bytes are needed: call again with that much); FAILED (`error`).
int32_t esmbed_cudnn_sdpa(const EsmbedSdpa *a, int64_t *needed, char *error, size_t error_len) {
    try {
        std::string why;
        Device *device = device_for(a->device, why);
        if (!device) {
            write_error(error, error_len, why);
            return FAILED;
        }
        auto status = fe::detail::set_stream(device->handle, static_cast<cudaStream_t>(a->stream));
        if (status != CUDNN_STATUS_SUCCESS) {
            write_error(error, error_len, std::string("cudnnSetStream: ") + fe::detail::get_error_string(status));
            return FAILED;
        }
        auto key = key_of(*a);
        auto found = state.graphs.find(key);
        bool built = found == state.graphs.end();
        if (built) found = state.graphs.emplace(key, build(*device, *a)).first;
        const Entry &entry = found->second;
        // A new graph's plan name comes back in `error` (status OK), for the caller's log.
        if (built) write_error(error, error_len, entry.plan);
        if (!entry.graph) {
            write_error(error, error_len, entry.unsupported);
            return UNSUPPORTED;
        }
        if (entry.workspace > a->workspace_bytes) {
            *needed = entry.workspace;
            return WORKSPACE;
        }
        std::unordered_map<int64_t, void *> pack = {
            {Q, const_cast<void *>(a->q)},
            {K, const_cast<void *>(a->k)},
            {V, const_cast<void *>(a->v)},
            {O, a->o},
            {SEQ_LEN_Q, const_cast<int32_t *>(a->seq_len)},
            {SEQ_LEN_KV, const_cast<int32_t *>(a->seq_len)},
            {Q_OFF, const_cast<int32_t *>(a->q_offsets)},
            {K_OFF, const_cast<int32_t *>(a->k_offsets)},
            {V_OFF, const_cast<int32_t *>(a->v_offsets)},
            {O_OFF, const_cast<int32_t *>(a->o_offsets)},
        };
        auto run = entry.graph->execute(device->handle, pack, a->workspace);
        if (run.is_bad()) {
            write_error(error, error_len, "cuDNN SDPA execute: " + run.get_message());
            return FAILED;
        }
        return OK;
    } catch (const std::exception &e) {
        write_error(error, error_len, std::string("cuDNN SDPA: ") + e.what());
        return FAILED;
    }
}

// How many graphs this thread holds (built or unsupported), for tests and logs.
int64_t esmbed_cudnn_graphs(void) { return static_cast<int64_t>(state.graphs.size()); }

}  // extern "C"
