#include KFILE
#include <chrono>
#include <cstdio>
// P-like decode attention: 4 layers (row, column, row, conv), B rows one caption, cache [2,B,4,1280,64];
// between layers read FLUSH MB of another buffer (the weights a step streams).
int main(int argc, char** argv) {
  at::set_num_threads(atoi(argv[2]));
  int64_t B = atoi(argv[1]), H = 4, L = 1280, D = 64, T = 256;
  double flush_mb = atof(argv[3]);
  std::vector<at::Tensor> kv; for (int l = 0; l < 4; l++) kv.push_back(at::randn({2, B, H, L, D}));
  auto w = at::randn({int64_t(flush_mb * (1 << 18)) + 1});
  auto q = at::randn({B, H, D});
  std::vector<int64_t> src(B, 0);
  at::Tensor* out;
  std::vector<double> v;
  volatile float sink = 0;
  int64_t p = 512;  // image position (row 16, col 0..)
  for (int r = 0; r < 15; r++) {
    double tot = 0;
    for (int i = 0; i < 100; i++) {
      int64_t pi = 300 + (i * 7) % 700, row = pi / 32, col = pi % 32;
      std::vector<std::vector<int64_t>> pos(4);
      for (int64_t c = 0; c < col; c++) pos[0].push_back(T + row * 32 + c);
      for (int64_t rr = 0; rr < row; rr++) pos[1].push_back(T + rr * 32 + col);
      pos[2] = pos[0];
      for (int64_t rr = std::max<int64_t>(0, row - 5); rr <= row; rr++)
        for (int64_t c = std::max<int64_t>(0, col - 5); c <= std::min<int64_t>(31, col + 5); c++)
          if (rr < row || c < col) pos[3].push_back(T + rr * 32 + c);
      for (int l = 0; l < 4; l++) {
        if (flush_mb > 0) sink = sink + w.sum().item<float>();
        auto t0 = std::chrono::steady_clock::now();
        if (pos[l].empty()) pos[l].push_back(T);
        char* e = tessera_block_attention(&q, &kv[l], 0, 0, pos[l].data(), pos[l].size(), T, src.data(), 0.125, &out);
        if (e) { printf("%s\n", e); return 1; }
        delete out;
        tot += std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
      }
    }
    v.push_back(tot / 100);
  }
  std::sort(v.begin(), v.end());
  printf("B=%ld threads %s flush %.0f MB: 4-layer attention %.4f ms (min %.4f)\n", B, argv[2], flush_mb, v[7], v[0]);
}
