// Two ATen operators that tch 0.24 does not bind, called through libtorch's dispatcher (so autograd, device
// dispatch and the caching allocator behave exactly as they do under PyTorch):
//
//   * at::_flash_attention_forward with cumulative sequence lengths ("varlen" flash attention): packed documents as
//     one (total_tokens, heads, head_dim) tensor, causal inside each document, GQA native. Its autograd formula
//     (FlashAttentionBackward0 → _flash_attention_backward) is registered by libtorch, so gradients flow as for SDPA.
//     CUDA, bf16/fp16 only.
//   * at::_fused_adamw_: the kernel behind torch.optim.AdamW(fused=True), CPU and CUDA.
//   * libtorch's Kineto profiler (what torch.profiler drives from Python): start, then stop and save a Chrome trace
//     with the CPU operators and, on CUDA, every kernel with its duration.
//
// Tensors cross the boundary as tch's handles (`at::Tensor*`). Every function returns 0 on success; on failure it
// writes libtorch's message into `err` (NUL-terminated, truncated to `err_len`) and returns 1. No C++ exception
// crosses into Rust.
#include <ATen/core/Tensor.h>
#include <ATen/ops/_flash_attention_forward.h>
#include <ATen/ops/_fused_adamw.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstring>
#include <exception>
#include <optional>
#include <set>
#include <stdexcept>
#include <string>
#include <tuple>
#include <vector>

namespace {

void write_err(char* err, size_t err_len, const std::string& msg) {
  if (err == nullptr || err_len == 0) return;
  size_t n = msg.size() < err_len - 1 ? msg.size() : err_len - 1;
  std::memcpy(err, msg.data(), n);
  err[n] = '\0';
}

template <typename F>
int guarded(char* err, size_t err_len, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    write_err(err, err_len, e.what());
  } catch (...) {
    write_err(err, err_len, "unknown C++ exception");
  }
  return 1;
}

}  // namespace

extern "C" {

// q: (total, H, hd), k/v: (total, H_kv, hd), cu_seqlens: int32 (n_docs + 1) on the same device, cumulative document
// lengths starting at 0 and ending at total; max_len: the longest document. scale <= 0 means 1/sqrt(hd).
// *out receives a new handle to the (total, H, hd) output (owned by the caller).
int lexflow_flash_varlen(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, const at::Tensor* cu_seqlens,
                         int64_t max_len, double scale, at::Tensor** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    std::optional<double> s = scale > 0 ? std::optional<double>(scale) : std::nullopt;
    auto r = at::_flash_attention_forward(*q, *k, *v, *cu_seqlens, *cu_seqlens, max_len, max_len,
                                          /*dropout_p=*/0.0, /*is_causal=*/true, /*return_debug_mask=*/false, s);
    *out = new at::Tensor(std::get<0>(r));
  });
}

// One fused AdamW step over n parameter tensors (flat buffers: typically the weight-decayed prefix and the rest, in
// two calls with their own weight decay). steps: the step counter tensors (fp32 scalars, already holding the step
// being taken); grad_scale (nullable): the kernel divides every gradient by it first (global-norm clipping folded
// in). Same arithmetic as torch.optim.AdamW(fused=True).
int lexflow_fused_adamw(const at::Tensor** params, const at::Tensor** grads, const at::Tensor** exp_avgs,
                        const at::Tensor** exp_avg_sqs, const at::Tensor** steps, int64_t n, double lr, double beta1,
                        double beta2, double weight_decay, double eps, const at::Tensor* grad_scale, char* err,
                        size_t err_len) {
  return guarded(err, err_len, [&] {
    std::vector<at::Tensor> p, g, m, v, s;
    for (int64_t i = 0; i < n; ++i) {
      p.push_back(*params[i]);
      g.push_back(*grads[i]);
      m.push_back(*exp_avgs[i]);
      v.push_back(*exp_avg_sqs[i]);
      s.push_back(*steps[i]);
    }
    std::optional<at::Tensor> gs = grad_scale ? std::optional<at::Tensor>(*grad_scale) : std::nullopt;
    at::_fused_adamw_(p, g, m, v, /*max_exp_avg_sqs=*/{}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false, gs, /*found_inf=*/std::nullopt);
  });
}

// Page-locked copy of a CPU tensor (Tensor::pin_memory() without the deprecated device argument that tch's binding
// always passes, which warns on every call).
int lexflow_pin_memory(const at::Tensor* t, at::Tensor** out, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { *out = new at::Tensor(t->pin_memory()); });
}

// Backward from a non-scalar tensor with a given gradient (torch.autograd.backward(t, grad)): the gradients of
// the graph's leaves accumulate into their .grad as with loss.backward().
int lexflow_backward_with_grad(const at::Tensor* t, const at::Tensor* grad, char* err, size_t err_len) {
  return guarded(err, err_len, [&] { torch::autograd::backward({*t}, {*grad}); });
}

// Starts the Kineto profiler on the calling thread (ops of threads it spawns, such as autograd's device threads, are
// recorded too; CUDA kernels are recorded device-wide when `cuda` is non-zero).
int lexflow_profiler_start(int cuda, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    namespace prof = torch::profiler::impl;
    prof::ProfilerConfig cfg(prof::ProfilerState::KINETO, /*report_input_shapes=*/true);
    std::set<prof::ActivityType> acts{prof::ActivityType::CPU};
    if (cuda) acts.insert(prof::ActivityType::CUDA);
    torch::autograd::profiler::prepareProfiler(cfg, acts);
    torch::autograd::profiler::enableProfiler(cfg, acts);
  });
}

// Stops the profiler started by lexflow_profiler_start on this thread and writes its Chrome trace to `path`.
int lexflow_profiler_stop(const char* path, char* err, size_t err_len) {
  return guarded(err, err_len, [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    if (!result) throw std::runtime_error("the profiler was not running on this thread");
    result->save(path);
  });
}

}  // extern "C"
