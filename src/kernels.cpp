// CPU kernels for decode steps, where a batch of a few rows meets weights and a cache that
// libtorch's general kernels handle poorly (see `src/kernels.rs` for the measurements):
//
// - panel products: a linear layer's weight packed once per sampling run into panels of 16
//   outputs ([ceil(O/16), I, 16]), so that a step streams it once, in order, and keeps a tile of
//   48 outputs × 8 rows in registers (16 × 6 with AVX2), reading the input rows as they are;
//   the result is written row-major, as the next layer reads it.
// - block attention: one query per row and head against the few keys a sparse layer may read
//   (the caption's, shared by the rows of a caption group, and the pattern's image keys), the
//   scores, softmax and weighted values in one pass, straight from the cache; a step's own
//   keys and values written into the cache from its qkv rows first.
// - epilogues and layer norm: GELU and the residual sum applied to a product's outputs while
//   they are in registers; a layer norm of a few rows on the calling thread.
//
// Every row is computed by the same instructions in the same order whatever the batch, so a
// sample does not depend on the rows beside it. Tensors cross as `at::Tensor*` (tch's handles);
// errors come back as malloc'd messages, null on success (`ffi.h`).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ffi.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

namespace {

using tessera_ffi::guarded;

constexpr int64_t LANES = 16;
// How many panel rows (of 64 bytes) ahead a panel product asks for its weights.
constexpr int64_t PREFETCH = 32;
// 16 floats; `aligned(4)`: loads and stores at any float address.
typedef float v16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t v16i __attribute__((vector_size(64), aligned(4)));

// Native vectors of the narrower builds (AVX2: 8 floats, baseline: 4): a 16-float vector
// there is split by the compiler through memory, so the panel products work in these.
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
typedef float vf4 __attribute__((vector_size(16), aligned(4)));

// Loads and stores of a vector type given as a template argument, at any float address (a
// type's alignment attribute does not survive being a template argument, so a plain
// dereference could assume the vector's full alignment).
template <typename V> inline __attribute__((always_inline)) V load(const float *p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

template <typename V> inline __attribute__((always_inline)) void store(float *p, const V &v) {
  std::memcpy(p, &v, sizeof v);
}

// e^x for x ≤ 0 (scores minus the row's largest), lane by lane, within ~2 ulp:
// x = n·ln2 + r with |r| ≤ ln2/2, e^r by its Taylor series to degree 7, 2^n from the exponent
// bits. Below −87 (e^x < 2^−125, beside the largest score's 1) it gives e^−87. V: a vector of
// floats of any width.
template <typename V> inline __attribute__((always_inline)) V exp_nonpos(const V &xin) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V)), aligned(4)));
  V x = xin;
  const V lo = V{} - 87.0f;
  x = x < lo ? lo : x;
  const V t = x * 1.44269504088896341f - 0.5f;
  const VI n = __builtin_convertvector(t, VI);  // t < 0: truncation rounds x/ln2 to nearest
  const V nf = __builtin_convertvector(n, V);
  const V r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187e-06f;
  V e = r * (1.f / 5040.f) + 1.f / 720.f;
  e = e * r + 1.f / 120.f;
  e = e * r + 1.f / 24.f;
  e = e * r + 1.f / 6.f;
  e = e * r + 0.5f;
  e = e * r + 1.f;
  e = e * r + 1.f;
  const VI bits = (n + 127) << 23;
  V scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

// GELU in its exact form, x·Φ(x), lane by lane: Φ from erfc(|x|/√2) ≈ poly(t)·e^(−x²/2) with
// t = 1/(1 + p·|x|/√2) (Abramowitz & Stegun 7.1.26, |error| ≤ 1.5e−7, the form libtorch's CPU
// GELU computes too).
template <typename V> inline __attribute__((always_inline)) V gelu(const V &x) {
  const V z = (x < 0.f ? -x : x) * 0.7071067811865476f;
  const V t = 1.f / (1.f + 0.3275911f * z);
  V p = t * 1.061405429f - 1.453152027f;
  p = p * t + 1.421413741f;
  p = p * t - 0.284496736f;
  p = p * t + 0.254829592f;
  const V half_erfc = 0.5f * (p * t) * exp_nonpos(-(z * z));
  return x * (x < 0.f ? half_erfc : 1.f - half_erfc);
}

// A panel product's operands: y [R, O] = act(x·Wᵀ + b) + res, with x row-major ([R, I]) and W
// packed in panels, either f32 (`p`: [ceil(O/16), I, 16]) or bf16 (`h`: [ceil(O/16),
// ceil(I/2), 16, 2], inputs i and i+1 of an output side by side); `b` and `res` ([R, O],
// row-major) may be null.
struct PanelArgs {
  const float *x;
  int64_t R, I;
  const float *p;
  const uint16_t *h;
  const float *b, *res;
  float *y;
  int64_t O;
  bool gelu;
};

// Rows r0..r0+RB of panels ob..ob+NP of y: RB×NP accumulators of 16 outputs, each NV native
// vectors V; `cols[q]` of panel q's 16 are real (the last panel may be partial). A step over `i`
// loads NP weight vectors and broadcasts RB inputs, one from each row, for RB·NP multiply-adds.
// Each output is one chain of multiply-adds over i in order, whatever RB and NP: a row's values
// do not depend on the tile it falls in. With bf16 panels (BF) a load brings two inputs'
// weights, widened to f32 by a shift and a mask: the same values and the same chain as f32
// panels holding those weights, half the bytes.
template <typename V, int RB, int NP, bool BF>
inline __attribute__((always_inline)) void panel_rows(const PanelArgs &a, int64_t ob, int64_t r0,
                                                      const float *bias, const int64_t *cols) {
  constexpr int W = sizeof(V) / sizeof(float), NV = LANES / W;
  typedef uint32_t VU __attribute__((vector_size(sizeof(V))));
  const int64_t I = a.I, O = a.O, pairs = (I + 1) / 2;
  const float *x = a.x + r0 * I;
  V acc[RB][NP][NV];
  for (int k = 0; k < RB; ++k) {
    for (int q = 0; q < NP; ++q) {
      for (int v = 0; v < NV; ++v) {
        acc[k][q][v] = V{};
      }
    }
  }
  const auto madd = [&](int64_t i, const V (&w)[NP][NV]) {
    for (int k = 0; k < RB; ++k) {
      const float xk = x[k * I + i];
      for (int q = 0; q < NP; ++q) {
        for (int v = 0; v < NV; ++v) {
          acc[k][q][v] += xk * w[q][v];
        }
      }
    }
  };
  if constexpr (BF) {
    const uint16_t *h = a.h + ob * pairs * 2 * LANES;
    for (int64_t j = 0; j < pairs; ++j) {
      V w0[NP][NV], w1[NP][NV];
      for (int q = 0; q < NP; ++q) {
        const uint16_t *hq = h + q * pairs * 2 * LANES + j * 2 * LANES;
        if (RB >= 8 || NP > 1) {
          __builtin_prefetch(hq + PREFETCH * 2 * LANES);
        }
        for (int v = 0; v < NV; ++v) {
          VU u;
          std::memcpy(&u, hq + v * 2 * W, sizeof u);
          const VU even = u << 16, odd = u & 0xFFFF0000u;
          std::memcpy(&w0[q][v], &even, sizeof(V));
          std::memcpy(&w1[q][v], &odd, sizeof(V));
        }
      }
      madd(2 * j, w0);
      if (2 * j + 1 < I) {
        madd(2 * j + 1, w1);
      }
    }
  } else {
    const float *p = a.p + ob * I * LANES;
    for (int64_t i = 0; i < I; ++i) {
      V w[NP][NV];
      for (int q = 0; q < NP; ++q) {
        if (RB >= 8 || NP > 1) {
          // arithmetic-bound: asking for the weights early pays; with a few rows of one panel
          // the hardware's own prefetching streams them as fast
          __builtin_prefetch(p + q * I * LANES + (i + PREFETCH) * LANES);
        }
        for (int v = 0; v < NV; ++v) {
          w[q][v] = load<V>(p + q * I * LANES + i * LANES + v * W);
        }
      }
      madd(i, w);
    }
  }
  for (int q = 0; q < NP; ++q) {
    const int64_t o = (ob + q) * LANES;
    for (int k = 0; k < RB; ++k) {
      float row[LANES] = {};
      if (a.res != nullptr) {
        std::memcpy(row, a.res + (r0 + k) * O + o, sizeof(float) * cols[q]);
      }
      for (int v = 0; v < NV; ++v) {
        const V b = load<V>(bias + q * LANES + v * W);
        V r = a.gelu ? gelu(acc[k][q][v] + b) : acc[k][q][v] + b;
        // the residual added last, as `res + h` would add it
        if (a.res != nullptr) {
          r = load<V>(row + v * W) + r;
        }
        store(row + v * W, r);
      }
      std::memcpy(a.y + (r0 + k) * O + o, row, sizeof(float) * cols[q]);
    }
  }
}

// Panels ob..ob+NP of y for all R rows: RB rows at a time, then 4, 2 and 1.
template <typename V, int RB, int NP, bool BF>
inline __attribute__((always_inline)) void panel_group(const PanelArgs &a, int64_t ob) {
  float bias[NP * LANES] = {};
  int64_t cols[NP];
  for (int q = 0; q < NP; ++q) {
    cols[q] = std::min(LANES, a.O - (ob + q) * LANES);
    if (a.b != nullptr) {
      std::memcpy(bias + q * LANES, a.b + (ob + q) * LANES, sizeof(float) * cols[q]);
    }
  }
  int64_t r = 0;
  for (; r + RB <= a.R; r += RB) {
    panel_rows<V, RB, NP, BF>(a, ob, r, bias, cols);
  }
  if constexpr (RB > 4) {
    for (; r + 4 <= a.R; r += 4) {
      panel_rows<V, 4, NP, BF>(a, ob, r, bias, cols);
    }
  }
  for (; r + 2 <= a.R; r += 2) {
    panel_rows<V, 2, NP, BF>(a, ob, r, bias, cols);
  }
  for (; r < a.R; ++r) {
    panel_rows<V, 1, NP, BF>(a, ob, r, bias, cols);
  }
}

// Panels ob0..ob1 of y for all R rows, NP panels at a time (the rest one by one), in native
// vectors V.
template <typename V, int RB, int NP, bool BF>
inline __attribute__((always_inline)) void panels_of(const PanelArgs &a, int64_t ob0, int64_t ob1) {
  int64_t ob = ob0;
  if constexpr (NP > 1) {
    for (; ob + NP <= ob1; ob += NP) {
      panel_group<V, RB, NP, BF>(a, ob);
    }
  }
  for (; ob < ob1; ++ob) {
    panel_group<V, RB, 1, BF>(a, ob);
  }
}

template <typename V, int RB, int NP>
inline __attribute__((always_inline)) void panels(const PanelArgs &a, int64_t ob0, int64_t ob1) {
  if (a.h != nullptr) {
    panels_of<V, RB, NP, true>(a, ob0, ob1);
  } else {
    panels_of<V, RB, NP, false>(a, ob0, ob1);
  }
}

// One build per instruction set, chosen at run time: AVX-512 holds 3 panels × 8 rows of
// accumulators (24 of its 32 registers; a step over i loads 3 weight vectors and 8 inputs for
// 24 multiply-adds), AVX2 6 rows of a panel's two 8-float halves from f32 panels (12 of its 16
// registers: enough multiply-adds in flight to cover their latency, which 4 rows' 8 were not:
// P's 17 decode products on AVX2 at 6 rows 0.90 → 0.71 ms, 16 rows 1.71 → 1.58 ms, 128 rows
// 14.4 → 13.7 ms) and 4 rows from bf16 panels (whose widened weights take 4 more registers: 6
// rows spill, 16 rows 1.69 → 1.91 ms), the baseline (SSE2, 16 registers of 4 floats) 2 rows of
// four quarters.
__attribute__((target("arch=x86-64-v4"))) void panels_v4(const PanelArgs &a, int64_t ob0,
                                                         int64_t ob1) {
  panels<v16, 8, 3>(a, ob0, ob1);
}

__attribute__((target("arch=x86-64-v3"))) void panels_v3(const PanelArgs &a, int64_t ob0,
                                                         int64_t ob1) {
  if (a.h != nullptr) {
    panels_of<vf8, 4, 1, true>(a, ob0, ob1);
  } else {
    panels_of<vf8, 6, 1, false>(a, ob0, ob1);
  }
}

void panels_base(const PanelArgs &a, int64_t ob0, int64_t ob1) { panels<vf4, 2, 1>(a, ob0, ob1); }

// The instruction set the kernels run with: the CPU's best, or a lower one that
// TESSERA_KERNELS_ISA names ("avx2", "baseline"), to check those builds on a newer CPU.
int isa() {
  static const int level = [] {
    const char *want = std::getenv("TESSERA_KERNELS_ISA");
    const int cap = want == nullptr                          ? 4
                    : std::strcmp(want, "avx2") == 0         ? 3
                    : std::strcmp(want, "baseline") == 0     ? 0
                                                             : 4;
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq")) {
      return std::min(cap, 4);
    }
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return std::min(cap, 3);
    }
    return 0;
  }();
  return level;
}

// Of one kernel's three builds, the one for the instruction set the kernels run with.
template <typename F> F by_isa(F v4, F v3, F base) {
  const int level = isa();
  return level == 4 ? v4 : level == 3 ? v3 : base;
}

void check_cpu_float(const at::Tensor &t, const char *what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " must be f32");
}

struct AttnArgs {
  const float *q;  // row b, head h at q + b·q_row + h·D
  int64_t q_row;
  // with a step's qkv [B, 3·H·D] as `q`: its keys and values, written into the cache at
  // write_pos before the row reads it (false: the cache holds them already)
  bool write;
  int64_t write_pos;
  float *k;  // keys [B, H, L, D] contiguous, values at `vs` after them
  int64_t vs;      // offset of the values from the keys
  int64_t B, H, L, D;
  const int64_t *pos;  // image key positions, n_pos
  int64_t n_pos;
  int64_t n_caption;  // caption keys 0..n_caption, read from row caption_src[b]
  const int64_t *caption_src;
  float scale;
  float *out;  // [B, H, D]
};

// The sum of a vector's lanes (16, 8 or 4), halving it down to 4 and adding those pairwise.
inline __attribute__((always_inline)) float hsum(const vf4 &b) { return (b[0] + b[2]) + (b[1] + b[3]); }

inline __attribute__((always_inline)) float hsum(const vf8 &a) {
  vf4 l4, h4;
  std::memcpy(&l4, &a, sizeof l4);
  std::memcpy(&h4, reinterpret_cast<const char *>(&a) + sizeof l4, sizeof h4);
  return hsum(l4 + h4);
}

inline __attribute__((always_inline)) float hsum(const v16 &t) {
  vf8 lo, hi;
  std::memcpy(&lo, &t, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char *>(&t) + sizeof lo, sizeof hi);
  return hsum(lo + hi);
}

// The lane sums of 16 vectors t[0..16], as one vector (lane k: the sum of t[k]'s lanes): three
// rounds of halving, each adding two shuffles of a pair, in a fixed order.
inline __attribute__((always_inline)) v16 hsum16(const v16 *t) {
  const v16i lo8 = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
  const v16i hi8 = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
  const v16i lo4 = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
  const v16i hi4 = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
  const v16i lo2 = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
  const v16i hi2 = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
  const v16i ev = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
  const v16i od = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
  v16 u[8], v[4], w[2];
  for (int i = 0; i < 8; ++i) {
    u[i] = __builtin_shuffle(t[2 * i], t[2 * i + 1], lo8) + __builtin_shuffle(t[2 * i], t[2 * i + 1], hi8);
  }
  for (int i = 0; i < 4; ++i) {
    v[i] = __builtin_shuffle(u[2 * i], u[2 * i + 1], lo4) + __builtin_shuffle(u[2 * i], u[2 * i + 1], hi4);
  }
  for (int i = 0; i < 2; ++i) {
    w[i] = __builtin_shuffle(v[2 * i], v[2 * i + 1], lo2) + __builtin_shuffle(v[2 * i], v[2 * i + 1], hi2);
  }
  return __builtin_shuffle(w[0], w[1], ev) + __builtin_shuffle(w[0], w[1], od);
}

// Softmax of the scores s[0..n] in place, normalised; `s` has room for n rounded up to 16
// (the room past n is zeroed). The sum runs in the lanes of V, added up in a fixed order.
template <typename V>
inline __attribute__((always_inline)) void softmax(float *s, int64_t n, float m) {
  constexpr int W = sizeof(V) / sizeof(float);
  const int64_t padded = (n + LANES - 1) / LANES * LANES;
  for (int64_t j = 0; j < padded; j += W) {
    const V x = load<V>(s + j);
    store(s + j, exp_nonpos(x - m));
  }
  std::fill(s + n, s + padded, 0.f);
  V lanes{};
  for (int64_t j = 0; j < padded; j += W) {
    lanes += load<V>(s + j);
  }
  const float inv = 1.f / hsum(lanes);
  for (int64_t j = 0; j < padded; j += W) {
    store(s + j, load<V>(s + j) * inv);
  }
}

// Rows b0..b0+RB of head h, which share their caption's keys (caption_src is the same for
// them): each caption key and value is loaded once for the RB rows, the image keys row by
// row. Query and output in registers: DV native vectors V (head dimension DV·W). `s` has room
// for RB rows of scores, `stride` apart. A row gets exactly the operations, in the same order,
// at any RB. With 16-float vectors the scores of 16 keys are summed together (`hsum16`); the
// narrower builds sum each key's lanes.
template <typename V, int DV, int RB>
inline __attribute__((always_inline)) void attend_rows(const AttnArgs &a, int64_t h, int64_t b0,
                                                       float *s, int64_t stride) {
  const int64_t nc = a.n_caption, n = nc + a.n_pos, D = a.D;
  const float *kc = a.k + ((a.caption_src[b0] * a.H + h) * a.L) * D;
  const float *kr[RB];
  constexpr int W = sizeof(V) / sizeof(float);
  V qv[RB][DV];
  float m[RB];
  for (int r = 0; r < RB; ++r) {
    kr[r] = a.k + (((b0 + r) * a.H + h) * a.L) * D;
    for (int c = 0; c < DV; ++c) {
      qv[r][c] = load<V>(a.q + (b0 + r) * a.q_row + h * D + c * W);
    }
    m[r] = -INFINITY;
  }
  const auto dot = [&](int r, const float *k) {
    V t = qv[r][0] * load<V>(k);
    for (int c = 1; c < DV; ++c) {
      t += qv[r][c] * load<V>(k + c * W);
    }
    return t;
  };
  // the scores of 16 keys from j (their lane sums together) or of one, for row r; `key(j)` →
  // its address. The running maxima are kept in lanes (the same maximum either way).
  v16 mv[RB];
  for (int r = 0; r < RB; ++r) {
    mv[r] = v16{} - INFINITY;
  }
  const auto sixteen = [&](int r, int64_t j, auto key) {
    if constexpr (W == LANES) {
      v16 t[LANES];
      for (int k = 0; k < LANES; ++k) {
        t[k] = dot(r, key(j + k));
      }
      const v16 v = hsum16(t) * a.scale;
      *reinterpret_cast<v16 *>(s + r * stride + j) = v;
      mv[r] = v > mv[r] ? v : mv[r];
    } else {
      for (int k = 0; k < LANES; ++k) {
        const float v = hsum(dot(r, key(j + k))) * a.scale;
        s[r * stride + j + k] = v;
        m[r] = std::max(m[r], v);
      }
    }
  };
  const auto one = [&](int r, int64_t j, auto key) {
    const float v = hsum(dot(r, key(j))) * a.scale;
    s[r * stride + j] = v;
    m[r] = std::max(m[r], v);
  };
  const auto caption_key = [&](int64_t j) { return kc + j * D; };
  // caption keys 16 at a time for every row of the group: after the first row they are read
  // from L1
  const int64_t nc16 = nc / LANES * LANES;
  for (int64_t j = 0; j < nc16; j += LANES) {
    for (int r = 0; r < RB; ++r) {
      sixteen(r, j, caption_key);
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int64_t j = nc16; j < nc; ++j) {
      one(r, j, caption_key);
    }
    const auto image_key = [&](int64_t j) { return kr[r] + a.pos[j - nc] * D; };
    int64_t j = nc;
    for (; j + LANES <= n; j += LANES) {
      sixteen(r, j, image_key);
    }
    for (; j < n; ++j) {
      one(r, j, image_key);
    }
    if constexpr (W == LANES) {
      for (int k = 0; k < LANES; ++k) {
        m[r] = std::max(m[r], mv[r][k]);
      }
    }
    softmax<V>(s + r * stride, n, m[r]);
  }
  V acc[RB][DV];
  for (int r = 0; r < RB; ++r) {
    for (int c = 0; c < DV; ++c) {
      acc[r][c] = V{};
    }
  }
  for (int64_t j = 0; j < nc; ++j) {
    const float *v = kc + a.vs + j * D;
    for (int r = 0; r < RB; ++r) {
      const float w = s[r * stride + j];
      for (int c = 0; c < DV; ++c) {
        acc[r][c] += w * load<V>(v + c * W);
      }
    }
  }
  for (int r = 0; r < RB; ++r) {
    for (int64_t j = 0; j < a.n_pos; ++j) {
      const float *v = kr[r] + a.vs + a.pos[j] * D;
      const float w = s[r * stride + nc + j];
      for (int c = 0; c < DV; ++c) {
        acc[r][c] += w * load<V>(v + c * W);
      }
    }
    for (int c = 0; c < DV; ++c) {
      store(a.out + ((b0 + r) * a.H + h) * D + c * W, acc[r][c]);
    }
  }
}

// One row of head h for any head dimension (no register build).
template <typename V>
inline __attribute__((always_inline)) void attend_row_any(const AttnArgs &a, int64_t h, int64_t b,
                                                          float *s, float *out) {
  const int64_t n = a.n_caption + a.n_pos, D = a.D;
  const float *q = a.q + b * a.q_row + h * D;
  const float *kc = a.k + ((a.caption_src[b] * a.H + h) * a.L) * D;
  const float *kr = a.k + ((b * a.H + h) * a.L) * D;
  const auto key = [&](int64_t j) {
    return j < a.n_caption ? kc + j * D : kr + a.pos[j - a.n_caption] * D;
  };
  float m = -INFINITY;
  for (int64_t j = 0; j < n; ++j) {
    const float *k = key(j);
    float t = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      t += q[d] * k[d];
    }
    s[j] = t * a.scale;
    m = std::max(m, s[j]);
  }
  softmax<V>(s, n, m);
  std::fill(out, out + D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    const float *v = key(j) + a.vs;
    for (int64_t d = 0; d < D; ++d) {
      out[d] += s[j] * v[d];
    }
  }
  std::memcpy(a.out + (b * a.H + h) * D, out, sizeof(float) * D);
}

// Rows sharing a caption taken together: at most this many (their accumulators fill the
// registers: RB · DV vectors for the output, as many for the scores).
constexpr int64_t GROUP_ROWS = 4;

// A head's rows b0..b0+rows of one caption group, as many at a time as the registers hold
// (with 16-float vectors; the narrower builds' 16 registers hold one row's query).
template <typename V, int DV>
inline __attribute__((always_inline)) void attend_group(const AttnArgs &a, int64_t h, int64_t b0,
                                                        int64_t rows, float *s, int64_t stride) {
  constexpr bool wide = sizeof(V) == sizeof(v16);
  constexpr int MAX = !wide ? 1 : DV > 4 ? 2 : GROUP_ROWS;
  int64_t r = 0;
  for (; r + MAX <= rows; r += MAX) {
    attend_rows<V, DV, MAX>(a, h, b0 + r, s, stride);
  }
  if constexpr (MAX > 2) {
    for (; r + 2 <= rows; r += 2) {
      attend_rows<V, DV, 2>(a, h, b0 + r, s, stride);
    }
  }
  for (; r < rows; ++r) {
    attend_rows<V, DV, 1>(a, h, b0 + r, s, stride);
  }
}

// Asks for the image keys and values of task t's rows ahead of their use: they sit in rows
// of the cache written many steps ago (a column's keys a grid row apart), so each is a
// separate trip to memory, and the task before gives the time for it.
inline __attribute__((always_inline)) void prefetch_task(const AttnArgs &a,
                                                         const std::vector<int64_t> &groups,
                                                         int64_t t) {
  const int64_t ng = static_cast<int64_t>(groups.size()) - 1, h = t / ng, g = t % ng;
  const int64_t bytes = a.D * static_cast<int64_t>(sizeof(float));
  for (int64_t b = groups[g]; b < groups[g + 1]; ++b) {
    const char *kr = reinterpret_cast<const char *>(a.k + ((b * a.H + h) * a.L) * a.D);
    const int64_t vs = a.vs * static_cast<int64_t>(sizeof(float));
    for (int64_t j = 0; j < a.n_pos; ++j) {
      const char *k = kr + a.pos[j] * bytes;
      for (int64_t o = 0; o < bytes; o += 64) {
        __builtin_prefetch(k + o, 0, 2);
        __builtin_prefetch(k + vs + o, 0, 2);
      }
    }
  }
}

// Tasks t0..t1 of (head, group of rows that share a caption): t = h · groups + g, in native
// vectors V.
template <typename V>
inline __attribute__((always_inline)) void attend_tasks(const AttnArgs &a,
                                                        const std::vector<int64_t> &groups,
                                                        int64_t t0, int64_t t1) {
  const int64_t n = a.n_caption + a.n_pos, ng = static_cast<int64_t>(groups.size()) - 1;
  const int64_t stride = (n + LANES - 1) / LANES * LANES;
  std::vector<float> scores(static_cast<size_t>(stride * GROUP_ROWS));
  std::vector<float> out(static_cast<size_t>(a.D));
  if (t0 < t1) {
    prefetch_task(a, groups, t0);
  }
  for (int64_t t = t0; t < t1; ++t) {
    if (t + 1 < t1) {
      prefetch_task(a, groups, t + 1);
    }
    const int64_t h = t / ng, g = t % ng;
    const int64_t b0 = groups[g], rows = groups[g + 1] - b0;
    if (a.write) {
      // the task's own rows and head: no other task writes or reads these keys
      const int64_t HD = a.H * a.D;
      for (int64_t b = b0; b < b0 + rows; ++b) {
        float *k = a.k + ((b * a.H + h) * a.L + a.write_pos) * a.D;
        const float *src = a.q + b * a.q_row + h * a.D;
        std::memcpy(k, src + HD, sizeof(float) * a.D);
        std::memcpy(k + a.vs, src + 2 * HD, sizeof(float) * a.D);
      }
    }
    constexpr int W = sizeof(V) / sizeof(float);
    switch (a.D) {
    case 16:
      attend_group<V, 16 / W>(a, h, b0, rows, scores.data(), stride);
      break;
    case 32:
      attend_group<V, 32 / W>(a, h, b0, rows, scores.data(), stride);
      break;
    case 64:
      attend_group<V, 64 / W>(a, h, b0, rows, scores.data(), stride);
      break;
    case 128:
      attend_group<V, 128 / W>(a, h, b0, rows, scores.data(), stride);
      break;
    default:
      for (int64_t b = b0; b < b0 + rows; ++b) {
        attend_row_any<V>(a, h, b, scores.data(), out.data());
      }
    }
  }
}

__attribute__((target("arch=x86-64-v4"))) void attend_v4(const AttnArgs &a,
                                                         const std::vector<int64_t> &groups,
                                                         int64_t t0, int64_t t1) {
  attend_tasks<v16>(a, groups, t0, t1);
}

__attribute__((target("arch=x86-64-v3"))) void attend_v3(const AttnArgs &a,
                                                         const std::vector<int64_t> &groups,
                                                         int64_t t0, int64_t t1) {
  attend_tasks<vf8>(a, groups, t0, t1);
}

void attend_base(const AttnArgs &a, const std::vector<int64_t> &groups, int64_t t0, int64_t t1) {
  attend_tasks<vf4>(a, groups, t0, t1);
}

typedef double v8d __attribute__((vector_size(64), aligned(8)));

// The sum of 16 floats in double precision, in a fixed order: the pairs l and l + 8, then a
// tree over the eight pair sums (in lanes of 8 doubles with AVX-512; the same additions one by
// one in the narrower builds).
template <typename F> inline __attribute__((always_inline)) double dsum16(const float *e) {
  if constexpr (sizeof(F) == sizeof(v16)) {
    v8d lo, hi;
    for (int l = 0; l < 8; ++l) {
      lo[l] = e[l];
      hi[l] = e[l + 8];
    }
    const v8d a = lo + hi;
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
  } else {
    double a[8];
    for (int l = 0; l < 8; ++l) {
      a[l] = static_cast<double>(e[l]) + static_cast<double>(e[l + 8]);
    }
    return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
  }
}

// Row draws r0..r1 of `draw_rows`: the token where the running sum of e^(x − max) first
// exceeds u · the total (sums in double; e^x in f32, ~2 ulp); −∞ logits weigh exactly 0.
// F: the native float vector, blocks of 16 in 16 / its width.
template <typename F>
inline __attribute__((always_inline)) void draw_range(const float *logits, int64_t V,
                                                      const double *u, int64_t *out, int64_t r0,
                                                      int64_t r1) {
  constexpr int W = sizeof(F) / sizeof(float);
  const int64_t padded = (V + LANES - 1) / LANES * LANES;
  std::vector<float> e(static_cast<size_t>(padded));
  std::vector<double> block(static_cast<size_t>(padded / LANES));
  for (int64_t r = r0; r < r1; ++r) {
    std::fill(e.begin() + V, e.end(), -INFINITY);
    std::memcpy(e.data(), logits + r * V, sizeof(float) * V);
    F mv = F{} - INFINITY;
    for (int64_t j = 0; j < padded; j += W) {
      const F xv = load<F>(e.data() + j);
      mv = xv > mv ? xv : mv;
    }
    float m = -INFINITY;
    for (int l = 0; l < W; ++l) {
      m = std::max(m, mv[l]);
    }
    double total = 0.0;
    for (int64_t b = 0; b < padded / LANES; ++b) {
      for (int64_t j = b * LANES; j < (b + 1) * LANES; j += W) {
        const F xv = load<F>(e.data() + j);
        store(e.data() + j, xv == -INFINITY ? F{} : exp_nonpos(xv - m));
      }
      block[b] = dsum16<F>(e.data() + b * LANES);
      total += block[b];
    }
    const double target = u[r] * total;
    int64_t pick = -1;
    double c = 0.0;
    for (int64_t b = 0; b < padded / LANES && pick < 0; ++b) {
      if (c + block[b] <= target) {
        c += block[b];
        continue;
      }
      for (int64_t j = b * LANES; j < (b + 1) * LANES; ++j) {
        c += e[j];
        if (c > target && e[j] > 0.f) {
          pick = j;
          break;
        }
      }
    }
    // rounding left the target past the end: the last token that has any weight
    for (int64_t j = V - 1; pick < 0 && j > 0; --j) {
      if (e[j] > 0.f) {
        pick = j;
      }
    }
    out[r] = std::max<int64_t>(pick, 0);
  }
}

__attribute__((target("arch=x86-64-v4"))) void draw_v4(const float *l, int64_t V, const double *u,
                                                       int64_t *o, int64_t r0, int64_t r1) {
  draw_range<v16>(l, V, u, o, r0, r1);
}

__attribute__((target("arch=x86-64-v3"))) void draw_v3(const float *l, int64_t V, const double *u,
                                                       int64_t *o, int64_t r0, int64_t r1) {
  draw_range<vf8>(l, V, u, o, r0, r1);
}

void draw_base(const float *l, int64_t V, const double *u, int64_t *o, int64_t r0, int64_t r1) {
  draw_range<vf4>(l, V, u, o, r0, r1);
}

// Layer norm of rows 0..R of x [R, C]: see tessera_layer_norm; in native vectors V.
template <typename V>
inline __attribute__((always_inline)) void norm_rows(const float *x, int64_t R, int64_t C,
                                                     const float *w, const float *b, float eps,
                                                     float *y) {
  constexpr int W = sizeof(V) / sizeof(float);
  const int64_t full = C / W * W;
  for (int64_t r = 0; r < R; ++r) {
    const float *xr = x + r * C;
    float *yr = y + r * C;
    V lanes{};
    for (int64_t c = 0; c < full; c += W) {
      lanes += load<V>(xr + c);
    }
    float sum = hsum(lanes);
    for (int64_t c = full; c < C; ++c) {
      sum += xr[c];
    }
    const float mean = sum / static_cast<float>(C);
    lanes = V{};
    for (int64_t c = 0; c < full; c += W) {
      const V d = load<V>(xr + c) - mean;
      lanes += d * d;
    }
    float sq = hsum(lanes);
    for (int64_t c = full; c < C; ++c) {
      sq += (xr[c] - mean) * (xr[c] - mean);
    }
    const float inv = 1.f / std::sqrt(sq / static_cast<float>(C) + eps);
    for (int64_t c = 0; c < full; c += W) {
      const V d = load<V>(xr + c) - mean;
      store(yr + c, d * inv * load<V>(w + c) + load<V>(b + c));
    }
    for (int64_t c = full; c < C; ++c) {
      yr[c] = (xr[c] - mean) * inv * w[c] + b[c];
    }
  }
}

__attribute__((target("arch=x86-64-v4"))) void norm_v4(const float *x, int64_t R, int64_t C,
                                                       const float *w, const float *b, float eps,
                                                       float *y) {
  norm_rows<v16>(x, R, C, w, b, eps, y);
}

__attribute__((target("arch=x86-64-v3"))) void norm_v3(const float *x, int64_t R, int64_t C,
                                                       const float *w, const float *b, float eps,
                                                       float *y) {
  norm_rows<vf8>(x, R, C, w, b, eps, y);
}

void norm_base(const float *x, int64_t R, int64_t C, const float *w, const float *b, float eps,
               float *y) {
  norm_rows<vf4>(x, R, C, w, b, eps, y);
}

} // namespace

extern "C" {

// The instruction set the kernels run with here: 4 (AVX-512), 3 (AVX2 + FMA) or 0 (baseline).
int tessera_kernels_isa() { return isa(); }

// Packs a linear layer's weight W [O, I] (f32, CPU) into panels: f32 [ceil(O/16), I, 16] (panel
// `ob` holds outputs 16·ob.. in its lanes, zero past O), or, with `narrow` 1 and every value of
// W a bf16 (its low 16 bits zero, as weights stored in bf16 and widened are), bf16 panels
// [ceil(O/16), ceil(I/2), 16, 2] (Int16; pair j holds inputs 2j and 2j+1 of each output side by
// side, zero past O and I): half the bytes a step reads, the same products.
char *tessera_pack_panels(const at::Tensor *w, int32_t narrow, at::Tensor **out) {
  return guarded([&] {
    check_cpu_float(*w, "weight");
    TORCH_CHECK(w->dim() == 2, "weight must be [out, in]");
    const auto wc = w->contiguous();
    const int64_t O = wc.size(0), I = wc.size(1), nb = (O + LANES - 1) / LANES;
    const float *src = wc.data_ptr<float>();
    uint32_t low = 0;  // the low 16 bits of every value, or-ed: 0 when all are bf16
    if (narrow == 1) {
      for (int64_t e = 0; e < O * I; ++e) {
        uint32_t bits;
        std::memcpy(&bits, src + e, sizeof bits);
        low |= bits & 0xFFFFu;
      }
    }
    if (narrow == 1 && low == 0) {
      const int64_t pairs = (I + 1) / 2;
      auto p = at::zeros({nb, pairs, LANES, 2}, wc.options().dtype(at::kShort));
      int16_t *dst = p.data_ptr<int16_t>();
      at::parallel_for(0, nb, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t ob = b0; ob < b1; ++ob) {
          for (int64_t l = 0; l < LANES && ob * LANES + l < O; ++l) {
            const float *row = src + (ob * LANES + l) * I;
            int16_t *col = dst + ob * pairs * 2 * LANES + l * 2;
            for (int64_t i = 0; i < I; ++i) {
              uint32_t bits;
              std::memcpy(&bits, row + i, sizeof bits);
              const uint16_t hi = static_cast<uint16_t>(bits >> 16);
              std::memcpy(col + (i / 2) * 2 * LANES + i % 2, &hi, sizeof hi);
            }
          }
        }
      });
      *out = new at::Tensor(p);
      return;
    }
    auto p = at::zeros({nb, I, LANES}, wc.options());
    float *dst = p.data_ptr<float>();
    at::parallel_for(0, nb, 16, [&](int64_t b0, int64_t b1) {
      for (int64_t ob = b0; ob < b1; ++ob) {
        for (int64_t l = 0; l < LANES && ob * LANES + l < O; ++l) {
          const float *row = src + (ob * LANES + l) * I;
          float *col = dst + ob * I * LANES + l;
          for (int64_t i = 0; i < I; ++i) {
            col[i * LANES] = row[i];
          }
        }
      }
    });
    *out = new at::Tensor(p);
  });
}

// y = x·Wᵀ + b for x [R, I] and W packed by tessera_pack_panels (f32 or bf16 panels, as the
// packed tensor's dtype says) for `out_features` outputs;
// `bias` [O] may be null; `act` 1: GELU of it (exact form); `residual` [R, O], when not null,
// added last. Returns y [R, O] (f32, row-major).
char *tessera_panel_linear(const at::Tensor *x, const at::Tensor *packed, const at::Tensor *bias,
                           int64_t out_features, int32_t act, const at::Tensor *residual,
                           at::Tensor **out) {
  return guarded([&] {
    check_cpu_float(*x, "input");
    TORCH_CHECK(x->dim() == 2, "input must be [rows, in]");
    const int64_t R = x->size(0), I = x->size(1), O = out_features;
    const int64_t nb = (O + LANES - 1) / LANES;
    TORCH_CHECK(packed->device().is_cpu(), "packed weight must be on the CPU");
    const bool bf = packed->scalar_type() == at::kShort;
    if (bf) {
      TORCH_CHECK(packed->dim() == 4 && packed->size(0) == nb && packed->size(1) == (I + 1) / 2 &&
                      packed->size(2) == LANES && packed->size(3) == 2 && packed->is_contiguous(),
                  "packed weight does not match the input and output sizes");
    } else {
      check_cpu_float(*packed, "packed weight");
      TORCH_CHECK(packed->dim() == 3 && packed->size(0) == nb && packed->size(1) == I &&
                      packed->size(2) == LANES && packed->is_contiguous(),
                  "packed weight does not match the input and output sizes");
    }
    at::Tensor bc, rc;
    if (bias != nullptr) {
      check_cpu_float(*bias, "bias");
      TORCH_CHECK(bias->numel() == O, "bias must have one value per output");
      bc = bias->contiguous();
    }
    if (residual != nullptr) {
      check_cpu_float(*residual, "residual");
      TORCH_CHECK(residual->dim() == 2 && residual->size(0) == R && residual->size(1) == O,
                  "residual must be [rows, out]");
      rc = residual->contiguous();
    }
    const auto xc = x->contiguous();
    auto y = at::empty({R, O}, xc.options());
    const PanelArgs a{xc.data_ptr<float>(),
                      R,
                      I,
                      bf ? nullptr : packed->data_ptr<float>(),
                      bf ? reinterpret_cast<const uint16_t *>(packed->data_ptr<int16_t>()) : nullptr,
                      bias != nullptr ? bc.data_ptr<float>() : nullptr,
                      residual != nullptr ? rc.data_ptr<float>() : nullptr,
                      y.data_ptr<float>(),
                      O,
                      act == 1};
    // a task of at least ~256 K multiply-adds, a panel counted as 8 rows at least: at fewer
    // rows its cost is the weights' reads, which two threads share too (a 1-row step on one
    // thread took 1.4x as long); small layers stay on one thread
    const int64_t rows = std::max<int64_t>(R, 8);
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / std::max<int64_t>(1, LANES * I * rows));
    const auto kernel = by_isa(panels_v4, panels_v3, panels_base);
    at::parallel_for(0, nb, grain, [&](int64_t b0, int64_t b1) { kernel(a, b0, b1); });
    *out = new at::Tensor(y);
  });
}

// Layer norm of each row of x [R, C] (f32, CPU): (x − mean)·(1/√(var + eps))·w + b, the mean
// and the (biased) variance by two passes in f32 lanes, w and b [C]. One thread: a decode
// step's few rows cost less than waking another. Returns [R, C].
char *tessera_layer_norm(const at::Tensor *x, const at::Tensor *w, const at::Tensor *b, double eps,
                         at::Tensor **out) {
  return guarded([&] {
    check_cpu_float(*x, "input");
    check_cpu_float(*w, "weight");
    check_cpu_float(*b, "bias");
    TORCH_CHECK(x->dim() == 2 && x->size(1) > 0, "input must be [rows, features]");
    const int64_t R = x->size(0), C = x->size(1);
    TORCH_CHECK(w->numel() == C && b->numel() == C, "weight and bias must have one value per feature");
    const auto xc = x->contiguous(), wc = w->contiguous(), bc = b->contiguous();
    auto y = at::empty({R, C}, xc.options());
    const auto kernel = by_isa(norm_v4, norm_v3, norm_base);
    kernel(xc.data_ptr<float>(), R, C, wc.data_ptr<float>(), bc.data_ptr<float>(),
           static_cast<float>(eps), y.data_ptr<float>());
    *out = new at::Tensor(y);
  });
}

} // extern "C"

namespace {

// The work of both block attention entry points: `write` with q a step's qkv [B, 3·H·D].
void block_attention(const at::Tensor &q, bool write, int64_t write_pos, const at::Tensor &kv,
                     const int64_t *pos, int64_t n_pos, int64_t n_caption,
                     const int64_t *caption_src, double scale, at::Tensor **out) {
  check_cpu_float(q, write ? "qkv" : "queries");
  check_cpu_float(kv, "cache");
  TORCH_CHECK(kv.dim() == 5 && kv.size(0) == 2 && kv.is_contiguous(),
              "cache must be contiguous [2, B, H, L, D]");
  const int64_t B = kv.size(1), H = kv.size(2), L = kv.size(3), D = kv.size(4);
  if (write) {
    TORCH_CHECK(q.dim() == 2 && q.size(0) == B && q.size(1) == 3 * H * D,
                "qkv must be [B, 3·H·D] of the cache's sizes");
    TORCH_CHECK(write_pos >= n_caption && write_pos < L,
                "the step's position must be in the cache, past the caption");
  } else {
    TORCH_CHECK(q.dim() == 3 && q.size(0) == B && q.size(1) == H && q.size(2) == D,
                "queries must be [B, H, D] of the cache's sizes");
  }
  TORCH_CHECK(n_caption >= 0 && n_caption <= L && n_pos >= 0 && n_caption + n_pos > 0,
              "no keys to attend to");
  for (int64_t j = 0; j < n_pos; ++j) {
    TORCH_CHECK(pos[j] >= 0 && pos[j] < L, "key position out of the cache");
  }
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(caption_src[b] >= 0 && caption_src[b] < B, "caption row out of the batch");
  }
  const auto qc = q.contiguous();
  auto y = at::empty({B, H, D}, qc.options());
  AttnArgs a{qc.data_ptr<float>(), write ? 3 * H * D : H * D, write, write_pos,
             kv.data_ptr<float>(), B * H * L * D, B, H, L, D, pos, n_pos, n_caption,
             caption_src, static_cast<float>(scale), y.data_ptr<float>()};
  // runs of consecutive rows with one caption source, at most GROUP_ROWS long: groups[g] is
  // the first row of run g, groups.back() == B
  std::vector<int64_t> groups{0};
  for (int64_t b = 1; b < B; ++b) {
    if (caption_src[b] != caption_src[b - 1] || b - groups.back() == GROUP_ROWS) {
      groups.push_back(b);
    }
  }
  groups.push_back(B);
  const int64_t tasks = H * (static_cast<int64_t>(groups.size()) - 1);
  const int64_t per_task = (n_caption + n_pos) * D * GROUP_ROWS;
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 16) / std::max<int64_t>(1, per_task));
  const auto kernel = by_isa(attend_v4, attend_v3, attend_base);
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) { kernel(a, groups, t0, t1); });
  *out = new at::Tensor(y);
}

} // namespace

extern "C" {

// Attention of one query per row and head over keys and values of the cache kv [2, B, H, L, D]
// (f32, CPU, contiguous): the caption's keys 0..n_caption of row caption_src[b] (a row of b's
// caption group), then the row's own keys at positions pos[0..n_pos]; one softmax over all of
// them. `write` 0: q is the queries [B, H, D]; 1: q is a decode step's qkv [B, 3·H·D] (each row:
// queries, keys, values, head by head), whose keys and values are written into the cache at
// write_pos first. Returns [B, H, D].
char *tessera_block_attention(const at::Tensor *q, const at::Tensor *kv, int32_t write,
                              int64_t write_pos, const int64_t *pos, int64_t n_pos,
                              int64_t n_caption, const int64_t *caption_src, double scale,
                              at::Tensor **out) {
  return guarded([&] {
    block_attention(*q, write == 1, write_pos, *kv, pos, n_pos, n_caption, caption_src, scale, out);
  });
}

// One token per row of logits [B, V] (f32, CPU; removed tokens −∞) by inverting the CDF of
// their softmax at uniforms [B] (f64): the first token whose running probability exceeds u.
// Returns Int64 [B].
char *tessera_draw_rows(const at::Tensor *logits, const at::Tensor *uniforms, at::Tensor **out) {
  return guarded([&] {
    check_cpu_float(*logits, "logits");
    TORCH_CHECK(logits->dim() == 2 && logits->size(1) > 0, "logits must be [rows, vocabulary]");
    const int64_t B = logits->size(0), V = logits->size(1);
    TORCH_CHECK(uniforms->device().is_cpu() && uniforms->numel() == B,
                "one uniform per row, on the CPU");
    const auto lc = logits->contiguous();
    const auto uc = uniforms->to(at::kDouble).contiguous();
    auto y = at::empty({B}, lc.options().dtype(at::kLong));
    const float *lp = lc.data_ptr<float>();
    const double *up = uc.data_ptr<double>();
    int64_t *yp = y.data_ptr<int64_t>();
    const auto kernel = by_isa(draw_v4, draw_v3, draw_base);
    at::parallel_for(0, B, std::max<int64_t>(1, 16384 / V), [&](int64_t r0, int64_t r1) {
      kernel(lp, V, up, yp, r0, r1);
    });
    *out = new at::Tensor(y);
  });
}

} // extern "C"
