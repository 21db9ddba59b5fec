#include KFILE
#include <chrono>
#include <cstdio>
// P's 17 decode products (4 layers × qkv, out, fc1+GELU, fc2 + the 8,192-wide head) at R rows,
// each weight its own (cold: 21 MB streamed per step, as in a real run).
int main(int argc, char** argv) {
  at::set_num_threads(2);
  int64_t R = atoi(argv[1]);
  struct L { int64_t o, i; int act; };
  std::vector<L> ls;
  for (int l = 0; l < 4; l++) { ls.push_back({768, 256, 0}); ls.push_back({256, 256, 0}); ls.push_back({1024, 256, 1}); ls.push_back({256, 1024, 0}); }
  ls.push_back({8192, 256, 0});
  std::vector<at::Tensor> packed, bias, xs;
  for (auto& l : ls) {
    auto w = at::randn({l.o, l.i}); at::Tensor* p; tessera_pack_panels(&w, 0, &p); packed.push_back(*p); delete p;
    bias.push_back(at::randn({l.o})); xs.push_back(at::randn({R, l.i}));
  }
  std::vector<double> v;
  for (int rep = 0; rep < 30; rep++) {
    auto t0 = std::chrono::steady_clock::now();
    for (int it = 0; it < 20; it++)
      for (size_t k = 0; k < ls.size(); k++) { at::Tensor* y; tessera_panel_linear(&xs[k], &packed[k], &bias[k], ls[k].o, ls[k].act, nullptr, &y); delete y; }
    v.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / 20);
  }
  std::sort(v.begin(), v.end());
  printf("%s R=%ld: 17 products %.3f ms a step (min %.3f) = %.0f GFLOP/s\n", KNAME, R, v[15], v[0], 2.0 * R * 5242880 / (v[15] * 1e6));
}
