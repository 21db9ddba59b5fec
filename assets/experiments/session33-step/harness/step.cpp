#include KFILE
#include <chrono>
#include <cstdio>
#include <cstring>
// P's 17 decode products (4 layers × qkv, out, fc1+GELU, fc2 + the 8,192-wide head) at R rows,
// each weight its own (cold: 21 MB streamed per step, as in a real run). `step R bf16`: the
// weights rounded to bf16 values, timed in f32 panels and in bf16 panels (outputs compared bit
// for bit first).
int main(int argc, char** argv) {
  at::set_num_threads(2);
  int64_t R = atoi(argv[1]);
  const bool bf16 = argc > 2 && std::strcmp(argv[2], "bf16") == 0;
  struct L { int64_t o, i; int act; };
  std::vector<L> ls;
  for (int l = 0; l < 4; l++) { ls.push_back({768, 256, 0}); ls.push_back({256, 256, 0}); ls.push_back({1024, 256, 1}); ls.push_back({256, 1024, 0}); }
  ls.push_back({8192, 256, 0});
  std::vector<at::Tensor> pf, ph, bias, xs;
  for (auto& l : ls) {
    auto w = at::randn({l.o, l.i});
    if (bf16) w = w.to(at::kBFloat16).to(at::kFloat);
    at::Tensor* p;
    tessera_pack_panels(&w, 0, &p); pf.push_back(*p); delete p;
    if (bf16) { tessera_pack_panels(&w, 1, &p); ph.push_back(*p); delete p; }
    bias.push_back(at::randn({l.o})); xs.push_back(at::randn({R, l.i}));
  }
  for (size_t k = 0; bf16 && k < ls.size(); k++) {
    at::Tensor *y1, *y2;
    tessera_panel_linear(&xs[k], &pf[k], &bias[k], ls[k].o, ls[k].act, nullptr, &y1);
    char* e = tessera_panel_linear(&xs[k], &ph[k], &bias[k], ls[k].o, ls[k].act, nullptr, &y2);
    if (e) { printf("%s\n", e); return 1; }
    if (!y1->equal(*y2)) { printf("layer %zu differs\n", k); return 1; }
    delete y1; delete y2;
  }
  for (int which = 0; which < (bf16 ? 2 : 1); which++) {
    auto& P = which ? ph : pf;
    std::vector<double> v;
    for (int rep = 0; rep < 30; rep++) {
      auto t0 = std::chrono::steady_clock::now();
      for (int it = 0; it < 20; it++)
        for (size_t k = 0; k < ls.size(); k++) { at::Tensor* y; tessera_panel_linear(&xs[k], &P[k], &bias[k], ls[k].o, ls[k].act, nullptr, &y); delete y; }
      v.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20);
    }
    std::sort(v.begin(), v.end());
    printf("%s R=%ld%s: 17 products %.3f ms a step (min %.3f) = %.0f GFLOP/s\n", KNAME, R,
           !bf16 ? "" : which ? ", bf16 panels" : ", f32 panels", v[15], v[0], 2.0 * R * 5242880 / (v[15] * 1e6));
  }
}
