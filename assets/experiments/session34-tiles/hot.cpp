#include KFILE
#include <chrono>
#include <cstdio>
// One layer O×I at R rows, hot (repeated): panel product vs libtorch's linear, threads T.
int main(int argc, char** argv) {
  int64_t R = atoi(argv[1]), O = atoi(argv[2]), I = atoi(argv[3]); int T = atoi(argv[4]);
  at::set_num_threads(T);
  auto w = at::randn({O, I}), b = at::randn({O}), x = at::randn({R, I});
  at::Tensor* p; tessera_pack_panels(&w, 0, &p);
  int reps = std::max<int64_t>(10, int64_t(2e9 / (2.0 * R * O * I)));
  auto tm = [&](auto f) { std::vector<double> v; for (int k = 0; k < 7; k++) { auto t0 = std::chrono::steady_clock::now(); for (int r = 0; r < reps; r++) f(); v.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / reps); } std::sort(v.begin(), v.end()); return 2.0 * R * O * I / v[3] / 1e9; };
  double gp = tm([&] { at::Tensor* y; tessera_panel_linear(&x, p, &b, O, 0, nullptr, &y); delete y; });
  double gl = tm([&] { auto y = at::linear(x, w, b); });
  auto big = at::randn({2048, 2048}); auto big2 = at::randn({2048, 2048});
  double gm = 0; { auto t0 = std::chrono::steady_clock::now(); for (int r = 0; r < 5; r++) auto y = at::mm(big, big2); gm = 5 * 2.0 * 2048 * 2048 * 2048 / std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 1e9; }
  printf("%s R=%ld %ldx%ld T=%d: panels %.0f GFLOP/s, linear %.0f, mm2048 %.0f\n", KNAME, R, O, I, T, gp, gl, gm);
}
