// What tch 0.24 does not bind, over libtorch's C++ API: the fused AdamW update and the
// multi-tensor ("foreach") kernels that training uses to touch every parameter in a few
// launches; and the loading of libtorch's CUDA libraries, which the binary does not link: they
// are opened at start only where an NVIDIA driver is installed (a machine without one never
// maps their ~350 MB), with the CUDA half of this shim (`src/shim_cuda.cpp`: CUDA graph
// capture and replay for decoding), a small shared library carried inside the binary.
//
// Tensors cross as tch's handles, which are `at::Tensor*`. Every function catches C++
// exceptions and returns them as a message (malloc'd; free with tessera_free_message), or
// null on success.
#include <ATen/ATen.h>
#include <ATen/record_function.h>

#include "ffi.h"

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include <dlfcn.h>
#include <mutex>
#include <sys/mman.h>
#include <unistd.h>

#ifdef TESSERA_CUDA_SHIM
// `libtessera_cuda.so`, built by build.rs from src/shim_cuda.cpp; the generated header holds
// the assembler directive that includes its bytes (`.incbin "PATH"`), so the path needs no
// escaping here.
#include "tessera_cuda_shim.h"
asm(".pushsection .rodata\n"
    ".balign 64\n"
    ".hidden tessera_cuda_shim_start\n"
    ".global tessera_cuda_shim_start\n"
    "tessera_cuda_shim_start:\n" TESSERA_CUDA_SHIM_INCBIN
    ".hidden tessera_cuda_shim_end\n"
    ".global tessera_cuda_shim_end\n"
    "tessera_cuda_shim_end:\n"
    ".popsection\n");
extern "C" const unsigned char tessera_cuda_shim_start[];
extern "C" const unsigned char tessera_cuda_shim_end[];
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

// ---- libtorch's CUDA libraries, opened at start where they can work ----

using Fn1 = char *(*)(void *);
using FnOut = char *(*)(void **);
using FnEnter = char *(*)(int, void **);

struct Cuda {
  std::string note = "not loaded yet";
  // found once loading is over: libtorch_cuda in the process, its backend registered
  bool loaded = false;
  bool registered = false;
  FnEnter stream_enter = nullptr;
  Fn1 stream_exit = nullptr;
  FnOut graph_new = nullptr;
  Fn1 graph_begin = nullptr;
  Fn1 graph_end = nullptr;
  Fn1 graph_replay = nullptr;
  Fn1 graph_free = nullptr;
};

Cuda &cuda() {
  static Cuda state;
  return state;
}

std::string dl_error(const char *fallback) {
  const char *e = dlerror();
  return e != nullptr ? e : fallback;
}

// The folder libtorch_cpu was loaded from (with its trailing slash): its CUDA library lies
// beside it, whether found through the binary's rpath or LD_LIBRARY_PATH.
std::string torch_lib_dir() {
  Dl_info info{};
  if (dladdr(reinterpret_cast<void *>(&at::globalContext), &info) != 0 && info.dli_fname != nullptr) {
    std::string f = info.dli_fname;
    auto slash = f.rfind('/');
    if (slash != std::string::npos) {
      return f.substr(0, slash + 1);
    }
  }
  return "";
}

// Opens the CUDA half of the shim from the bytes carried in the binary: an anonymous in-memory
// file where the kernel has them, else a temporary file removed once opened. Its symbols stay
// local; it finds libtorch_cuda and the CUDA runtime already loaded.
void *open_cuda_shim(std::string &err) {
#ifdef TESSERA_CUDA_SHIM
  const size_t size = static_cast<size_t>(tessera_cuda_shim_end - tessera_cuda_shim_start);
  auto write_all = [&](int fd) {
    size_t done = 0;
    while (done < size) {
      ssize_t n = write(fd, tessera_cuda_shim_start + done, size - done);
      if (n <= 0) {
        return false;
      }
      done += static_cast<size_t>(n);
    }
    return true;
  };
  // executable memory files must say so where the kernel restricts them (vm.memfd_noexec);
  // kernels before 6.3 do not know the flag and refuse it
#ifndef MFD_EXEC
#define MFD_EXEC 0x0010U
#endif
  int fd = memfd_create("tessera-cuda-shim", MFD_CLOEXEC | MFD_EXEC);
  if (fd < 0 && errno == EINVAL) {
    fd = memfd_create("tessera-cuda-shim", MFD_CLOEXEC);
  }
  if (fd < 0) {
    err = std::string("no in-memory file (") + std::strerror(errno) + ")";
  } else {
    void *h = nullptr;
    if (write_all(fd)) {
      h = dlopen(("/proc/self/fd/" + std::to_string(fd)).c_str(), RTLD_NOW | RTLD_LOCAL);
      if (h == nullptr) {
        err = dl_error("cannot open the CUDA shim");
      }
    } else {
      err = "cannot write the CUDA shim to memory";
    }
    close(fd);
    if (h != nullptr) {
      return h;
    }
  }
  const char *tmp = std::getenv("TMPDIR");
  std::string path = std::string(tmp != nullptr && *tmp != '\0' ? tmp : "/tmp") + "/tessera-cuda-XXXXXX";
  std::vector<char> name(path.begin(), path.end());
  name.push_back('\0');
  fd = mkstemp(name.data());
  if (fd < 0) {
    err += err.empty() ? "" : "; ";
    err += "cannot create a temporary file for the CUDA shim in " + path.substr(0, path.rfind('/')) +
           " (" + std::strerror(errno) + ")";
    return nullptr;
  }
  bool ok = write_all(fd);
  close(fd);
  void *h = ok ? dlopen(name.data(), RTLD_NOW | RTLD_LOCAL) : nullptr;
  if (h == nullptr) {
    err += err.empty() ? "" : "; ";
    err += ok ? dl_error("cannot open the CUDA shim") : "cannot write the CUDA shim";
  }
  unlink(name.data());
  return h;
#else
  err = "built without it (CUDA runtime headers not found, or its compilation failed: see the build's warnings)";
  return nullptr;
#endif
}

// TESSERA_CUDA=0 (or off) keeps CUDA unloaded; TESSERA_CUDA=force loads it without a driver
// (the tests check the loading on machines without a GPU that way).
void load_cuda() {
  auto &s = cuda();
  const char *env = std::getenv("TESSERA_CUDA");
  const std::string mode = env != nullptr ? env : "";
  if (mode == "0" || mode == "off") {
    s.note = "not loaded (TESSERA_CUDA=" + mode + ")";
    return;
  }
  if (dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD) == nullptr) {
    // without the driver's library the CUDA runtime cannot start, so nothing is lost
    if (mode != "force" && dlopen("libcuda.so.1", RTLD_NOW | RTLD_GLOBAL) == nullptr) {
      s.note = "not loaded: no NVIDIA driver (libcuda.so.1 not found)";
      return;
    }
    // beside libtorch_cpu first, then by name (LD_LIBRARY_PATH, the binary's rpath); both
    // errors are kept (the first names a missing dependency, say)
    const std::string dir = torch_lib_dir();
    std::string first;
    void *h = nullptr;
    if (!dir.empty()) {
      h = dlopen((dir + "libtorch_cuda.so").c_str(), RTLD_NOW | RTLD_GLOBAL);
      if (h == nullptr) {
        first = dl_error("libtorch_cuda.so not found beside libtorch_cpu.so");
      }
    }
    if (h == nullptr) {
      h = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_GLOBAL);
    }
    if (h == nullptr) {
      const std::string second = dl_error("libtorch_cuda.so not found");
      s.note = "not loaded: " + (first.empty() || first == second ? second : first + "; " + second);
      return;
    }
  }
  std::string err;
  void *shim = open_cuda_shim(err);
  if (shim == nullptr) {
    s.note = "loaded; CUDA graphs unavailable: " + err;
    return;
  }
  auto sym = [&](const char *name) { return dlsym(shim, name); };
  s.stream_enter = reinterpret_cast<FnEnter>(sym("tessera_cuda_stream_enter"));
  s.stream_exit = reinterpret_cast<Fn1>(sym("tessera_cuda_stream_exit"));
  s.graph_new = reinterpret_cast<FnOut>(sym("tessera_cuda_graph_new"));
  s.graph_begin = reinterpret_cast<Fn1>(sym("tessera_cuda_graph_begin"));
  s.graph_end = reinterpret_cast<Fn1>(sym("tessera_cuda_graph_end"));
  s.graph_replay = reinterpret_cast<Fn1>(sym("tessera_cuda_graph_replay"));
  s.graph_free = reinterpret_cast<Fn1>(sym("tessera_cuda_graph_free"));
  if (s.stream_enter == nullptr || s.stream_exit == nullptr || s.graph_new == nullptr ||
      s.graph_begin == nullptr || s.graph_end == nullptr || s.graph_replay == nullptr ||
      s.graph_free == nullptr) {
    s = Cuda{};
    s.note = "loaded; CUDA graphs unavailable: the CUDA shim lacks a function";
    return;
  }
  s.note = "loaded, with CUDA graphs";
}

std::once_flag cuda_once;

void load_cuda_once() {
  std::call_once(cuda_once, [] {
    auto &s = cuda();
    try {
      load_cuda();
    } catch (...) {
      s.note = "not loaded: unexpected error";
    }
    s.loaded = dlopen("libtorch_cuda.so", RTLD_NOW | RTLD_NOLOAD) != nullptr;
    if (s.loaded) {
      // (asked only once the libraries are in: libtorch settles its CUDA hooks at the first query)
      try {
        s.registered = at::detail::getCUDAHooks().hasCUDART();
      } catch (...) {
      }
    }
  });
}

// Before main: libtorch decides once, at its first CUDA query, whether it has CUDA, so the
// libraries must be in the process before any code asks.
[[maybe_unused]] const bool cuda_loaded_at_start = (load_cuda_once(), true);

char *unavailable() { return message("CUDA graphs unavailable: " + cuda().note); }

// ---- the ATen operations a piece of work calls (how many kernels a step launches) ----

// One recording on one thread: each operation's name and how deep it was called (0: by us;
// 1: by an operation of depth 0, as `linear` calls `addmm`).
struct OpRecording {
  at::CallbackHandle handle = 0;
  std::string lines;
  int depth = 0;
};

thread_local OpRecording *recording = nullptr;

std::unique_ptr<at::ObserverContext> op_enter(const at::RecordFunction &fn) {
  if (recording != nullptr) {
    recording->lines += std::to_string(recording->depth) + " " + fn.name() + "\n";
    recording->depth += 1;
  }
  return nullptr;
}

void op_leave(const at::RecordFunction &, at::ObserverContext *) {
  if (recording != nullptr && recording->depth > 0) {
    recording->depth -= 1;
  }
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

// What loading CUDA found: `*loaded` = libtorch_cuda is in the process, `*registered` = its
// backend answers libtorch's queries, `*graphs` = the graph functions were found. Returns a
// line for people (static storage). Loads on the first call if the start-up hook did not.
const char *tessera_cuda_status(int *loaded, int *registered, int *graphs) {
  load_cuda_once();
  const auto &s = cuda();
  *loaded = s.loaded ? 1 : 0;
  *registered = s.registered ? 1 : 0;
  *graphs = s.graph_replay != nullptr ? 1 : 0;
  return s.note.c_str();
}

char *tessera_stream_enter(int device, void **out) {
  const auto &s = cuda();
  return s.stream_enter != nullptr ? s.stream_enter(device, out) : unavailable();
}

char *tessera_stream_exit(void *st) {
  const auto &s = cuda();
  return s.stream_exit != nullptr ? s.stream_exit(st) : nullptr;
}

char *tessera_graph_new(void **out) {
  const auto &s = cuda();
  return s.graph_new != nullptr ? s.graph_new(out) : unavailable();
}

char *tessera_graph_begin(void *g) {
  const auto &s = cuda();
  return s.graph_begin != nullptr ? s.graph_begin(g) : unavailable();
}

char *tessera_graph_end(void *g) {
  const auto &s = cuda();
  return s.graph_end != nullptr ? s.graph_end(g) : unavailable();
}

char *tessera_graph_replay(void *g) {
  const auto &s = cuda();
  return s.graph_replay != nullptr ? s.graph_replay(g) : unavailable();
}

char *tessera_graph_free(void *g) {
  const auto &s = cuda();
  return s.graph_free != nullptr ? s.graph_free(g) : nullptr;
}

// Starts recording the ATen operations this thread calls (one recording at a time per thread).
char *tessera_ops_begin() {
  return guarded([&] {
    if (recording != nullptr) {
      throw std::runtime_error("operations are already being recorded on this thread");
    }
    auto r = std::make_unique<OpRecording>();
    r->handle = at::addThreadLocalCallback(
        at::RecordFunctionCallback(op_enter, op_leave).scopes({at::RecordScope::FUNCTION}));
    recording = r.release();
  });
}

// Ends this thread's recording; `*out` receives its lines ("DEPTH NAME\n" per operation,
// malloc'd; free with tessera_free_message).
char *tessera_ops_end(char **out) {
  return guarded([&] {
    if (recording == nullptr) {
      throw std::runtime_error("no recording of operations on this thread");
    }
    std::unique_ptr<OpRecording> r(recording);
    recording = nullptr;
    at::removeCallback(r->handle);
    *out = message(r->lines);
  });
}

} // extern "C"

