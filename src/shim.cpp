// What tch 0.24 does not bind, over libtorch's C++ API: the fused AdamW update and the
// multi-tensor ("foreach") kernels that training uses to touch every parameter in a few
// launches, and CUDA graph capture and replay for decoding (built when libtorch has CUDA).
//
// Tensors cross as tch's handles, which are `at::Tensor*`. Every function catches C++
// exceptions and returns them as a message (malloc'd; free with tessera_free_message), or
// null on success.
#include <ATen/ATen.h>

#include "ffi.h"

#include <cstdlib>
#include <cstring>
#include <optional>
#include <string>
#include <vector>

#ifdef TESSERA_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#endif

namespace {

using tessera_ffi::guarded;
using tessera_ffi::message;

std::vector<at::Tensor> list(const at::Tensor *const *ts, size_t n) {
  std::vector<at::Tensor> out;
  out.reserve(n);
  for (size_t i = 0; i < n; ++i) {
    out.push_back(*ts[i]);
  }
  return out;
}

} // namespace

extern "C" {

void tessera_free_message(char *m) { std::free(m); }

// One AdamW update of every tensor in `params` (decoupled weight decay `wd`), in place, with
// bias corrections for update number `step` (a float tensor on the parameters' device).
char *tessera_fused_adamw(const at::Tensor *const *params, const at::Tensor *const *grads,
                          const at::Tensor *const *m, const at::Tensor *const *v, size_t n,
                          const at::Tensor *step, double lr, double beta1, double beta2,
                          double wd, double eps) {
  return guarded([&] {
    auto p = list(params, n);
    auto g = list(grads, n);
    auto mm = list(m, n);
    auto vv = list(v, n);
    std::vector<at::Tensor> steps(n, *step);
    at::_fused_adamw_(p, g, mm, vv, {}, steps, lr, beta1, beta2, wd, eps, false, false);
  });
}

// The 2-norm of each tensor, as new tensors written to `out` (n handles; the caller owns them).
char *tessera_foreach_norm(const at::Tensor *const *ts, size_t n, at::Tensor **out) {
  return guarded([&] {
    auto norms = at::_foreach_norm(list(ts, n), 2);
    for (size_t i = 0; i < n; ++i) {
      out[i] = new at::Tensor(norms[i]);
    }
  });
}

// Multiplies every tensor in place by the one-element tensor `k`.
char *tessera_foreach_mul_tensor(const at::Tensor *const *ts, size_t n, const at::Tensor *k) {
  return guarded([&] { at::_foreach_mul_(list(ts, n), *k); });
}

// self[i] += w · (other[i] − self[i]), in place.
char *tessera_foreach_lerp(const at::Tensor *const *self, const at::Tensor *const *other,
                           size_t n, double w) {
  return guarded([&] { at::_foreach_lerp_(list(self, n), list(other, n), w); });
}

int tessera_cuda_graphs_built() {
#ifdef TESSERA_CUDA
  return 1;
#else
  return 0;
#endif
}

#ifdef TESSERA_CUDA

// A side stream made current for as long as it lives (graph capture cannot run on the
// default stream). The device is synchronised on entry and exit, so work queued before and
// after keeps its order; this happens once per sampling run, not per step. (No stream guard
// class: its inline event code would tie the binary to the CUDA runtime directly.)
struct TesseraStream {
  c10::cuda::CUDAStream prev;
};

char *tessera_stream_enter(int device, TesseraStream **out) {
  return guarded([&] {
    auto dev = static_cast<c10::DeviceIndex>(device);
    auto prev = c10::cuda::getCurrentCUDAStream(dev);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, dev));
    *out = new TesseraStream{prev};
  });
}

// Waits for the side stream's work, makes the previous stream current again and frees `s`
// (also when waiting fails).
char *tessera_stream_exit(TesseraStream *s) {
  char *err = guarded([&] { c10::cuda::device_synchronize(); });
  char *err2 = guarded([&] { c10::cuda::setCurrentCUDAStream(s->prev); });
  delete s;
  if (err == nullptr) {
    return err2;
  }
  std::free(err2);
  return err;
}

char *tessera_graph_new(at::cuda::CUDAGraph **out) {
  return guarded([&] { *out = new at::cuda::CUDAGraph(); });
}

char *tessera_graph_begin(at::cuda::CUDAGraph *g) {
  return guarded([&] { g->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal); });
}

char *tessera_graph_end(at::cuda::CUDAGraph *g) {
  return guarded([&] { g->capture_end(); });
}

char *tessera_graph_replay(at::cuda::CUDAGraph *g) {
  return guarded([&] { g->replay(); });
}

char *tessera_graph_free(at::cuda::CUDAGraph *g) {
  return guarded([&] { delete g; });
}

#else

struct TesseraStream;
char *tessera_stream_enter(int, TesseraStream **) { return message("built without CUDA"); }
char *tessera_stream_exit(TesseraStream *) { return nullptr; }
char *tessera_graph_new(void **) { return message("built without CUDA"); }
char *tessera_graph_begin(void *) { return message("built without CUDA"); }
char *tessera_graph_end(void *) { return message("built without CUDA"); }
char *tessera_graph_replay(void *) { return message("built without CUDA"); }
char *tessera_graph_free(void *) { return nullptr; }

#endif
}
