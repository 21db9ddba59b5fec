// The CUDA half of the shim: CUDA graph capture and replay for decoding, and the side stream
// that capture needs. build.rs compiles it into a small shared library (linked to
// libtorch_cuda) that the binary carries inside itself; `src/shim.cpp` loads it, with
// libtorch's CUDA libraries, only where an NVIDIA driver is installed, so a machine without
// one never maps the ~350 MB of CUDA libraries. Its functions are looked up by name and keep
// the shim's convention: C++ exceptions come back as a malloc'd message, null on success.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>

#include "ffi.h"

namespace {

using tessera_ffi::guarded;

// A side stream made current for as long as it lives (graph capture cannot run on the
// default stream). The device is synchronised on entry and exit, so work queued before and
// after keeps its order; this happens once per sampling run, not per step. (No stream guard
// class: its inline event code would tie the library to the CUDA runtime directly.)
struct Stream {
  c10::cuda::CUDAStream prev;
};

} // namespace

extern "C" {

char *tessera_cuda_stream_enter(int device, void **out) {
  return guarded([&] {
    auto dev = static_cast<c10::DeviceIndex>(device);
    auto prev = c10::cuda::getCurrentCUDAStream(dev);
    c10::cuda::device_synchronize();
    c10::cuda::setCurrentCUDAStream(c10::cuda::getStreamFromPool(false, dev));
    *out = new Stream{prev};
  });
}

// Waits for the side stream's work, makes the previous stream current again and frees `s`
// (also when waiting fails).
char *tessera_cuda_stream_exit(void *handle) {
  auto *s = static_cast<Stream *>(handle);
  char *err = guarded([&] { c10::cuda::device_synchronize(); });
  char *err2 = guarded([&] { c10::cuda::setCurrentCUDAStream(s->prev); });
  delete s;
  if (err == nullptr) {
    return err2;
  }
  std::free(err2);
  return err;
}

char *tessera_cuda_graph_new(void **out) {
  return guarded([&] { *out = new at::cuda::CUDAGraph(); });
}

char *tessera_cuda_graph_begin(void *g) {
  return guarded([&] {
    static_cast<at::cuda::CUDAGraph *>(g)->capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
  });
}

char *tessera_cuda_graph_end(void *g) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph *>(g)->capture_end(); });
}

char *tessera_cuda_graph_replay(void *g) {
  return guarded([&] { static_cast<at::cuda::CUDAGraph *>(g)->replay(); });
}

char *tessera_cuda_graph_free(void *g) {
  return guarded([&] { delete static_cast<at::cuda::CUDAGraph *>(g); });
}

} // extern "C"
