// The part of libtorch's distributed engine (c10d) that the trainer uses, behind a C ABI for Rust:
// the TCPStore (rendezvous, and the key-value transport of the CPU collective in src/dist/store.rs)
// and ProcessGroupNCCL (GPU collectives). Every function catches C++ exceptions and returns them as
// a malloc'd message (NULL on success) that Rust frees with charlm_free, so no exception ever
// unwinds into Rust.

#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>

#ifdef CHARLM_WITH_NCCL
#include <c10/cuda/CUDAFunctions.h>
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>
#include <vector>

#include "guarded.h"

namespace {

using charlm::copy_message;
using charlm::guarded;

struct Store {
  c10::intrusive_ptr<c10d::Store> inner;
};

std::vector<at::Tensor> tensors_from(void* const* ptrs, size_t n) {
  // Each pointer is a tch `C_tensor`, which is an `at::Tensor*`; the copies share storage, so
  // in-place collectives write into the caller's tensors.
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*static_cast<const at::Tensor*>(ptrs[i]));
  }
  return out;
}

#ifdef CHARLM_WITH_NCCL
struct Nccl {
  c10::intrusive_ptr<c10d::ProcessGroupNCCL> pg;
};

struct Work {
  c10::intrusive_ptr<c10d::Work> inner;
};
#endif

}  // namespace

extern "C" {

void charlm_free(void* p) { std::free(p); }

int charlm_have_nccl() {
#ifdef CHARLM_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// ---- TCPStore ----

// A non-empty `prefix` puts every key of this handle under `prefix/` (a c10d PrefixStore): the
// workers of one restart round of `launch` never see another round's keys.
char* charlm_store_connect(const char* host, uint16_t port, int is_server, int64_t timeout_ms,
                           const char* prefix, void** out) {
  return guarded([&] {
    c10d::TCPStoreOptions opts;
    opts.port = port;
    opts.isServer = is_server != 0;
    // Rust runs its own arrival count (dist/mod.rs) so that a missing rank is named in the error.
    opts.numWorkers = std::nullopt;
    opts.waitWorkers = false;
    opts.timeout = std::chrono::milliseconds(timeout_ms);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::TCPStore>(std::string(host), opts);
    if (prefix != nullptr && prefix[0] != '\0') {
      store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), store);
    }
    *out = new Store{store};
  });
}

void charlm_store_free(void* store) { delete static_cast<Store*>(store); }

char* charlm_store_set_timeout(void* store, int64_t timeout_ms) {
  return guarded(
      [&] { static_cast<Store*>(store)->inner->setTimeout(std::chrono::milliseconds(timeout_ms)); });
}

char* charlm_store_set(void* store, const char* key, const uint8_t* data, size_t len) {
  return guarded([&] {
    std::vector<uint8_t> value(data, data + len);
    static_cast<Store*>(store)->inner->set(std::string(key), value);
  });
}

// Blocks until `key` exists (or the store's timeout passes), then returns its value in a malloc'd
// buffer that Rust frees with charlm_free.
char* charlm_store_get(void* store, const char* key, uint8_t** data, size_t* len) {
  return guarded([&] {
    std::vector<uint8_t> value = static_cast<Store*>(store)->inner->get(std::string(key));
    *len = value.size();
    *data = static_cast<uint8_t*>(std::malloc(value.empty() ? 1 : value.size()));
    if (*data == nullptr) {
      throw std::bad_alloc();
    }
    if (!value.empty()) {
      std::memcpy(*data, value.data(), value.size());
    }
  });
}

char* charlm_store_add(void* store, const char* key, int64_t delta, int64_t* out) {
  return guarded([&] { *out = static_cast<Store*>(store)->inner->add(std::string(key), delta); });
}

char* charlm_store_wait(void* store, const char* const* keys, size_t n, int64_t timeout_ms) {
  return guarded([&] {
    std::vector<std::string> names(keys, keys + n);
    static_cast<Store*>(store)->inner->wait(names, std::chrono::milliseconds(timeout_ms));
  });
}

// Like charlm_store_wait, but a timeout is an answer (`*ready` = 0), not an error: for waits cut
// into short slices, between which the caller looks for a reason to stop waiting. The client
// cancels its wait on the server before it returns, so the connection stays usable.
char* charlm_store_wait_ready(void* store, const char* const* keys, size_t n, int64_t timeout_ms,
                              int* ready) {
  return guarded([&] {
    std::vector<std::string> names(keys, keys + n);
    try {
      static_cast<Store*>(store)->inner->wait(names, std::chrono::milliseconds(timeout_ms));
      *ready = 1;
    } catch (const c10::DistStoreError&) {
      *ready = 0;
    }
  });
}

char* charlm_store_check(void* store, const char* key, int* exists) {
  return guarded([&] { *exists = static_cast<Store*>(store)->inner->check({std::string(key)}); });
}

// Sets `key` to `desired` only if it does not exist yet, and returns (malloc'd) what it holds
// afterwards: `desired` for the first caller, the first caller's value for everyone else.
char* charlm_store_set_if_absent(void* store, const char* key, const uint8_t* data, size_t len,
                                 uint8_t** out, size_t* out_len) {
  return guarded([&] {
    std::vector<uint8_t> desired(data, data + len);
    std::vector<uint8_t> now =
        static_cast<Store*>(store)->inner->compareSet(std::string(key), {}, desired);
    *out_len = now.size();
    *out = static_cast<uint8_t*>(std::malloc(now.empty() ? 1 : now.size()));
    if (*out == nullptr) {
      throw std::bad_alloc();
    }
    if (!now.empty()) {
      std::memcpy(*out, now.data(), now.size());
    }
  });
}

// Every key in the store, NUL-separated in one malloc'd buffer.
char* charlm_store_list_keys(void* store, uint8_t** out, size_t* out_len) {
  return guarded([&] {
    std::string all;
    for (const auto& key : static_cast<Store*>(store)->inner->listKeys()) {
      all += key;
      all.push_back('\0');
    }
    *out_len = all.size();
    *out = static_cast<uint8_t*>(std::malloc(all.empty() ? 1 : all.size()));
    if (*out == nullptr) {
      throw std::bad_alloc();
    }
    if (!all.empty()) {
      std::memcpy(*out, all.data(), all.size());
    }
  });
}

char* charlm_store_delete(void* store, const char* key, int* existed) {
  return guarded([&] { *existed = static_cast<Store*>(store)->inner->deleteKey(std::string(key)); });
}

char* charlm_store_num_keys(void* store, int64_t* out) {
  return guarded([&] { *out = static_cast<Store*>(store)->inner->getNumKeys(); });
}

// ---- ProcessGroupNCCL ----

#ifdef CHARLM_WITH_NCCL

// Creates the group on `device` and connects its communicator now, so that a failure shows up at
// start-up rather than in the first gradient all-reduce. Its keys live under `prefix` in the store.
char* charlm_nccl_new(void* store, const char* prefix, int rank, int size, int device,
                      int64_t timeout_ms, void** out) {
  return guarded([&] {
    c10::cuda::set_device(static_cast<c10::DeviceIndex>(device));
    auto prefixed =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), static_cast<Store*>(store)->inner);
    auto opts = c10d::ProcessGroupNCCL::Options::create();
    // The watchdog aborts a collective that runs longer than this (TORCH_NCCL_ASYNC_ERROR_HANDLING,
    // default 3: tear the process down), so a dead or hung peer never blocks a rank forever.
    opts->timeout = std::chrono::milliseconds(timeout_ms);
    auto pg = c10::make_intrusive<c10d::ProcessGroupNCCL>(prefixed, rank, size, opts);
    pg->eagerConnectSingleDevice(at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(device)));
    *out = new Nccl{pg};
  });
}

void charlm_nccl_free(void* nccl) {
  auto* group = static_cast<Nccl*>(nccl);
  try {
    group->pg->shutdown();
  } catch (...) {
    // Shutting down after an error: the communicator may already be aborted.
  }
  delete group;
}

// op: 0 = sum, 1 = average. Several tensors go in one coalesced group (a single grouped NCCL
// launch); unlike allreduce_coalesced, a group may mix dtypes.
char* charlm_nccl_all_reduce(void* nccl, void* const* tensors, size_t n, int op, void** work) {
  return guarded([&] {
    auto group = static_cast<Nccl*>(nccl)->pg;
    std::vector<at::Tensor> ts = tensors_from(tensors, n);
    c10d::AllreduceOptions opts;
    opts.reduceOp = op == 1 ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
    c10::intrusive_ptr<c10d::Work> w;
    if (ts.size() == 1) {
      w = group->allreduce(ts, opts);
    } else {
      group->startCoalescing();
      for (auto& t : ts) {
        std::vector<at::Tensor> one{t};
        group->allreduce(one, opts);
      }
      w = group->endCoalescing();
    }
    *work = new Work{w};
  });
}

char* charlm_nccl_broadcast(void* nccl, void* const* tensors, size_t n, int root, void** work) {
  return guarded([&] {
    auto group = static_cast<Nccl*>(nccl)->pg;
    std::vector<at::Tensor> ts = tensors_from(tensors, n);
    c10d::BroadcastOptions opts;
    opts.rootRank = root;
    c10::intrusive_ptr<c10d::Work> w;
    if (ts.size() == 1) {
      w = group->broadcast(ts, opts);
    } else {
      group->startCoalescing();
      for (auto& t : ts) {
        std::vector<at::Tensor> one{t};
        group->broadcast(one, opts);
      }
      w = group->endCoalescing();
    }
    *work = new Work{w};
  });
}

// `input` is `size` equal slices along dim 0; rank r receives the sum (op 1: average) of every
// rank's slice r in `output`. The sharded optimizer's gradient reduction.
char* charlm_nccl_reduce_scatter(void* nccl, void* input, void* output, int op, void** work) {
  return guarded([&] {
    auto group = static_cast<Nccl*>(nccl)->pg;
    at::Tensor in = *static_cast<const at::Tensor*>(input);
    at::Tensor out = *static_cast<const at::Tensor*>(output);
    c10d::ReduceScatterOptions opts;
    opts.reduceOp = op == 1 ? c10d::ReduceOp::AVG : c10d::ReduceOp::SUM;
    *work = new Work{group->_reduce_scatter_base(out, in, opts)};
  });
}

// Every rank's `input` lands, in rank order, as the slices along dim 0 of `output`. The sharded
// optimizer's parameter exchange after each rank updated its shard.
char* charlm_nccl_all_gather(void* nccl, void* input, void* output, void** work) {
  return guarded([&] {
    auto group = static_cast<Nccl*>(nccl)->pg;
    at::Tensor in = *static_cast<const at::Tensor*>(input);
    at::Tensor out = *static_cast<const at::Tensor*>(output);
    *work = new Work{group->_allgather_base(out, in, c10d::AllgatherOptions())};
  });
}

// Makes the current CUDA stream wait for the collective (the host does not block); errors the
// watchdog recorded surface here.
char* charlm_work_wait(void* work) {
  return guarded([&] { static_cast<Work*>(work)->inner->wait(); });
}

void charlm_work_free(void* work) { delete static_cast<Work*>(work); }

#else  // built against a libtorch without CUDA: the Rust side checks charlm_have_nccl() first.

char* charlm_nccl_new(void*, const char*, int, int, int, int64_t, void**) {
  return copy_message("this charlm-trainer was built against a libtorch without CUDA/NCCL");
}
void charlm_nccl_free(void*) {}
char* charlm_nccl_all_reduce(void*, void* const*, size_t, int, void**) {
  return copy_message("built without NCCL");
}
char* charlm_nccl_broadcast(void*, void* const*, size_t, int, void**) {
  return copy_message("built without NCCL");
}
char* charlm_nccl_reduce_scatter(void*, void*, void*, int, void**) {
  return copy_message("built without NCCL");
}
char* charlm_nccl_all_gather(void*, void*, void*, void**) {
  return copy_message("built without NCCL");
}
char* charlm_work_wait(void*) { return copy_message("built without NCCL"); }
void charlm_work_free(void*) {}

#endif

}  // extern "C"
