// What the optimizers and `bench` need from C++ besides the block: Muon's momentum as one fused
// kernel (or ATen's lerps), an in-place scaled add, handing autograd our own gradient buffer, and
// libtorch's (Kineto) profiler summarised as GPU time per kernel name.
#include <ATen/ATen.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <map>
#include <set>
#include <sstream>
#include <string>
#include <vector>

#include "driver.h"
#include "guarded.h"

using namespace charlm;
using at::Tensor;

namespace {

std::set<torch::profiler::impl::ActivityType> profiler_activities() {
  return {torch::profiler::impl::ActivityType::CPU, torch::profiler::impl::ActivityType::CUDA};
}

}  // namespace

extern "C" {


// Muon's momentum step for fp32 gradients g and momentum m of one shape (m updated in place;
// coef, a 0-dim fp32 clipping factor, may be NULL): returns bf16 lerp(coef·g, m, beta).
char* charlm_muon_momentum(const at::Tensor* g, at::Tensor* m, const at::Tensor* coef,
                           double beta, int fused, at::Tensor** out) {
  return guarded([&] {
    Tensor gs = coef != nullptr ? *g * *coef : *g;
    if (fused == 0) {
      m->lerp_(gs, 1.0 - beta);
      *out = new at::Tensor(gs.lerp(*m, beta).to(at::kBFloat16));
      return;
    }
    TORCH_CHECK(g->is_cuda() && g->scalar_type() == at::kFloat && m->scalar_type() == at::kFloat &&
                    g->is_contiguous() && m->is_contiguous() && g->numel() % 4 == 0 &&
                    aligned16(*g) && aligned16(*m) && g->sizes() == m->sizes(),
                "muon momentum: contiguous fp32 CUDA tensors of one shape");
    Tensor x = at::empty(g->sizes(), g->options().dtype(at::kBFloat16));
#ifdef CHARLM_WITH_CUDA
    const void* gp = g->data_ptr();
    void* mp = m->data_ptr();
    void* xp = x.data_ptr();
    Tensor c = coef != nullptr ? coef->to(at::kFloat).contiguous() : Tensor();
    const void* cp = c.defined() ? c.data_ptr() : nullptr;
    int64_t n4 = g->numel() / 4;
    float b = static_cast<float>(beta);
    void* args[] = {&gp, &mp, &xp, &cp, &n4, &b};
    launch(*g, kMuonMomentum, n4, 256, args);
#endif
    *out = new at::Tensor(std::move(x));
  });
}


// dst += alpha · src, in dst's type (the optimizers' fp32 update from a bf16 direction).
char* charlm_add_scaled(at::Tensor* dst, const at::Tensor* src, double alpha) {
  return guarded([&] { dst->add_(*src, alpha); });
}


// Makes `grad` the .grad of `param`, so autograd accumulates into it in place.
char* charlm_set_grad(at::Tensor* param, const at::Tensor* grad) {
  return guarded([&] { param->mutable_grad() = *grad; });
}


char* charlm_profiler_start() {
  return guarded([&] {
    using namespace torch::profiler::impl;
    ProfilerConfig config(ProfilerState::KINETO);
    torch::autograd::profiler::prepareProfiler(config, profiler_activities());
    torch::autograd::profiler::enableProfiler(config, profiler_activities());
  });
}


// Stops the profiler and writes a table of GPU time per kernel (the top `top` names) into a
// malloc'd string at *report.
char* charlm_profiler_stop(int top, char** report) {
  return guarded([&] {
    auto result = torch::autograd::profiler::disableProfiler();
    std::map<std::string, std::pair<double, int64_t>> by_name;
    double total_us = 0;
    uint64_t first = UINT64_MAX, last = 0;
    for (const auto& e : result->events()) {
      if (e.deviceType() != c10::DeviceType::CUDA) continue;
      const double us = e.durationNs() / 1000.0;
      auto& slot = by_name[e.name()];
      slot.first += us;
      slot.second += 1;
      total_us += us;
      first = std::min<uint64_t>(first, e.startNs());
      last = std::max<uint64_t>(last, e.endNs());
    }
    std::vector<std::pair<std::string, std::pair<double, int64_t>>> rows(by_name.begin(),
                                                                        by_name.end());
    std::sort(rows.begin(), rows.end(),
              [](const auto& a, const auto& b) { return a.second.first > b.second.first; });
    std::ostringstream os;
    const double span_us = last > first ? (last - first) / 1000.0 : 0.0;
    char line[512];
    std::snprintf(line, sizeof line, "GPU busy %.1f ms over a span of %.1f ms, %zu kernel names\n",
                  total_us / 1000.0, span_us / 1000.0, rows.size());
    os << line;
    for (size_t i = 0; i < rows.size() && static_cast<int>(i) < top; ++i) {
      std::string name = rows[i].first.substr(0, 110);
      std::snprintf(line, sizeof line, "%9.2f ms %5.1f%% %7lld  %s\n", rows[i].second.first / 1000.0,
                    100.0 * rows[i].second.first / std::max(total_us, 1e-9),
                    static_cast<long long>(rows[i].second.second), name.c_str());
      os << line;
    }
    *report = copy_message(os.str());
  });
}

}  // extern "C"
