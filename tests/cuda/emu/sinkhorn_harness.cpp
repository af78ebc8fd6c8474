// Runs the kernels of csrc/cuda/sinkhorn_kernel.cuh under the host emulator (cuda_emu.h), with the
// launch policy of csrc/cuda/sinkhorn.cu, on tensors exchanged as files:
//
//   sinkhorn_harness OP DTYPE DIR
//
// OP: sinkhorn_fwd | sinkhorn_bwd | wrd_fwd | wrd_bwd, or plan (prints the layout of an M x N
// problem: threads, floats per matrix, shared memory bytes, tier, workspace floats); DTYPE:
// float32 | float16 | bfloat16. The forward ops and wrd_bwd run every group of sk::plan_batch (the
// glue's policy) as the glue does, in launches of sk::blocks_per_launch blocks (`ws_blocks` in
// meta caps it, to exercise several launches); the groups are printed to stdout, one
// "threads tier mc nc count" line each.
// DIR/meta.txt holds "key value" lines (sizes, settings -- `relative` 0/1 for relative_eps --,
// element strides of each input, and optionally `threads` to override the block size, `seed` for
// the thread order, `smem_limit`); DIR/<name>.bin the raw storage of each input (the backward ops'
// per-problem eps as eps.bin, float64 (B,)). Outputs go to DIR/out_<name>.bin, poisoned (all
// bits set: NaN, -1) before the launch so an element the kernel does not write shows.
#include "cuda_emu.h"
#include "sinkhorn_kernel.cuh"

#include <algorithm>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

namespace sk = kx::sinkhorn_cuda;

namespace {

std::string g_dir;
std::map<std::string, double> g_meta;

double meta(const std::string& k, double dflt = NAN) {
  auto it = g_meta.find(k);
  if (it != g_meta.end()) return it->second;
  if (std::isnan(dflt)) {
    std::fprintf(stderr, "meta.txt lacks %s\n", k.c_str());
    std::exit(2);
  }
  return dflt;
}
int64_t imeta(const std::string& k, double dflt = NAN) { return int64_t(meta(k, dflt)); }

template <typename T>
std::vector<T> load(const std::string& name) {
  std::ifstream f(g_dir + "/" + name + ".bin", std::ios::binary);
  if (!f) {
    std::fprintf(stderr, "missing %s.bin\n", name.c_str());
    std::exit(2);
  }
  std::vector<char> raw((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
  std::vector<T> v(raw.size() / sizeof(T));
  std::memcpy(v.data(), raw.data(), v.size() * sizeof(T));
  return v;
}

template <typename T>
std::vector<T> poisoned(int64_t n) {
  std::vector<T> v(size_t(std::max<int64_t>(n, 1)));
  std::memset(v.data(), 0xff, v.size() * sizeof(T));
  return v;
}

template <typename T>
void save(const std::string& name, const std::vector<T>& v, int64_t n) {
  std::ofstream f(g_dir + "/out_" + name + ".bin", std::ios::binary);
  f.write(reinterpret_cast<const char*>(v.data()), std::streamsize(n * int64_t(sizeof(T))));
}

template <typename T>
sk::Tokens<T> tokens(const char* side, const std::vector<T>& x, const std::vector<uint8_t>& mask, int64_t L) {
  const std::string s = side;
  sk::Tokens<T> t{x.data(), nullptr, L, imeta("D"), imeta(s + "s0"), imeta(s + "s1"), imeta(s + "s2"), 0, 0};
  if (imeta(s + "_mask", 0)) {
    t.mask = reinterpret_cast<const bool*>(mask.data());
    t.ms0 = imeta(s + "ms0");
    t.ms1 = imeta(s + "ms1");
  }
  return t;
}

int report(const std::string& err) {
  if (!err.empty()) {
    std::fprintf(stderr, "emulated launch failed: %s\n", err.c_str());
    return 1;
  }
  return 0;
}

// Runs every group of the glue's batch plan: `launch_one(layout, index, ws, blocks)` launches a
// kernel; returns "" or the first error.
template <typename F>
std::string run_groups(const std::vector<int64_t>& m, const std::vector<int64_t>& n, int64_t B, int64_t M,
                       int64_t N, bool tokens, size_t limit, F launch_one) {
  const int threads = int(imeta("threads", 0));
  const int64_t cap = imeta("ws_blocks", 0);
  for (const sk::Bucket& bk : sk::plan_batch(m.data(), n.data(), B, M, N, tokens, limit, threads)) {
    std::printf("%d %d %lld %lld %zu\n", bk.L.threads, bk.L.tier, static_cast<long long>(bk.L.mc),
                static_cast<long long>(bk.L.nc), bk.problems.size());
    if (bk.L.smem > limit) return "layout past the shared memory limit";
    const int64_t count = int64_t(bk.problems.size());
    int64_t per = sk::blocks_per_launch(bk.L, count);
    if (cap > 0 && bk.L.ws_floats > 0) per = std::min(per, cap);
    std::vector<float> ws(size_t(bk.L.ws_floats * per + 1));
    for (int64_t s0 = 0; s0 < count; s0 += per) {
      const int64_t nb = std::min(per, count - s0);
      std::memset(ws.data(), 0xff, ws.size() * sizeof(float));  // poisoned like shared memory
      const std::string e = launch_one(bk.L, bk.problems.data() + s0, bk.L.ws_floats ? ws.data() : nullptr, nb);
      if (!e.empty()) return e;
    }
  }
  return "";
}

// Real lengths the glue counts: masses > 0, or mask entries (all L without a mask).
template <typename T>
std::vector<int64_t> count_positive(const std::vector<T>& v, int64_t B, int64_t L, int64_t s0, int64_t s1) {
  std::vector<int64_t> c(size_t(B), 0);
  for (int64_t p = 0; p < B; ++p)
    for (int64_t i = 0; i < L; ++i) c[size_t(p)] += sk::to_float(v[size_t(p * s0 + i * s1)]) > 0.0f;
  return c;
}
std::vector<int64_t> count_mask(const std::vector<uint8_t>& mk, int64_t B, int64_t L, int64_t s0, int64_t s1) {
  std::vector<int64_t> c(size_t(B), 0);
  for (int64_t p = 0; p < B; ++p)
    for (int64_t i = 0; i < L; ++i) c[size_t(p)] += mk.empty() ? 1 : mk[size_t(p * s0 + i * s1)] != 0;
  return c;
}

template <typename T>
int run(const std::string& op) {
  const int64_t B = imeta("B"), M = imeta("M"), N = imeta("N");
  const size_t limit = size_t(imeta("smem_limit", 232448));  // sm_90 opt-in
  const uint32_t seed = uint32_t(imeta("seed", 1));
  if (op == "plan") {  // the layout of one M x N problem: "threads mat smem tier ws_floats"
    const sk::Layout L = sk::plan_layout(M, N, M, N, imeta("tokens", 0) != 0, limit);
    std::printf("%d %lld %zu %d %lld\n", L.threads, static_cast<long long>(L.mat), L.smem, L.tier,
                static_cast<long long>(L.ws_floats));
    return 0;
  }
  if (op == "sinkhorn_fwd") {
    const auto cost = load<T>("cost"), a = load<T>("a"), b = load<T>("b");
    auto value = poisoned<float>(B), dual = poisoned<float>(B), err = poisoned<float>(B);
    auto f = poisoned<float>(B * M), g = poisoned<float>(B * N);
    auto n_iter = poisoned<int64_t>(B);
    auto eps_out = poisoned<double>(B);
    const bool want_plan = imeta("return_plan", 0) != 0;
    auto plan = poisoned<T>(want_plan ? B * M * N : 0);
    const auto m = count_positive(a, B, M, imeta("as0"), imeta("as1"));
    const auto n = count_positive(b, B, N, imeta("bs0"), imeta("bs1"));
    const int rc = report(run_groups(m, n, B, M, N, false, limit,
        [&](const sk::Layout& L, const int* index, float* ws, int64_t blocks) {
          sk::SinkhornFwdArgs<T> P{cost.data(), a.data(), b.data(), M, N, imeta("cs0"), imeta("cs1"),
                                   imeta("cs2"), imeta("as0"), imeta("as1"), imeta("bs0"), imeta("bs1"),
                                   meta("eps"), meta("tol"), imeta("max_iter"), imeta("relative", 0) != 0, L,
                                   index, ws, value.data(), dual.data(), f.data(), g.data(), err.data(),
                                   n_iter.data(), eps_out.data(), want_plan ? plan.data() : nullptr};
          return emu::launch(blocks, L.threads, L.smem, seed, sk::sinkhorn_fwd_kernel<T>, P);
        }));
    save("value", value, B); save("dual", dual, B); save("err", err, B);
    save("f", f, B * M); save("g", g, B * N); save("n_iter", n_iter, B); save("eps_reached", eps_out, B);
    if (want_plan) save("plan", plan, B * M * N);
    return rc;
  }
  if (op == "sinkhorn_bwd") {
    const auto cost = load<T>("cost"), a = load<T>("a"), b = load<T>("b");
    const auto grad = load<float>("grad"), f = load<float>("f"), g = load<float>("g");
    const auto eps = load<double>("eps");
    const int threads = int(imeta("threads", sk::kBwdThreads));
    auto gc = poisoned<T>(B * M * N), ga = poisoned<T>(B * M), gb = poisoned<T>(B * N);
    // the glue's rule: vectors in shared memory when they fit, else a workspace slice per block
    const size_t vec = sk::bwd_smem(M, N, nullptr, nullptr, nullptr, nullptr, nullptr, 0);
    const bool global = vec > limit;
    const int64_t ws_floats = global ? int64_t(sk::bwd_smem(M, N, nullptr, nullptr, nullptr, nullptr, nullptr, 0, 16) / 4) : 0;
    const size_t smem = global ? 64 * sizeof(double) : vec;
    const int64_t per = global ? std::max<int64_t>(1, std::min<int64_t>(B, imeta("ws_blocks", B))) : B;
    std::vector<float> ws(size_t(ws_floats * per + 1));
    int rc = 0;
    for (int64_t s0 = 0; s0 < B && rc == 0; s0 += per) {
      sk::SinkhornBwdArgs<T> P{grad.data(), f.data(), g.data(), cost.data(), a.data(), b.data(), M, N,
                               imeta("cs0"), imeta("cs1"), imeta("cs2"), imeta("as0"), imeta("as1"),
                               imeta("bs0"), imeta("bs1"), eps.data(), gc.data(), ga.data(), gb.data(), s0,
                               global ? ws.data() : nullptr, ws_floats};
      rc = report(emu::launch(std::min(per, B - s0), threads, smem, seed, sk::sinkhorn_bwd_kernel<T>, P));
    }
    save("grad_cost", gc, B * M * N); save("grad_a", ga, B * M); save("grad_b", gb, B * N);
    return rc;
  }
  const auto x = load<T>("x"), y = load<T>("y");
  const auto xm = imeta("x_mask", 0) ? load<uint8_t>("x_mask") : std::vector<uint8_t>();
  const auto ym = imeta("y_mask", 0) ? load<uint8_t>("y_mask") : std::vector<uint8_t>();
  const sk::Tokens<T> X = tokens("x", x, xm, M), Y = tokens("y", y, ym, N);
  const auto m = count_mask(xm, B, M, imeta("xms0", 0), imeta("xms1", 0));
  const auto n = count_mask(ym, B, N, imeta("yms0", 0), imeta("yms1", 0));
  if (op == "wrd_fwd") {
    auto value = poisoned<float>(B), dual = poisoned<float>(B), err = poisoned<float>(B);
    auto f = poisoned<float>(B * M), g = poisoned<float>(B * N);
    auto n_iter = poisoned<int64_t>(B);
    auto eps_out = poisoned<double>(B);
    const int rc = report(run_groups(m, n, B, M, N, true, limit,
        [&](const sk::Layout& L, const int* index, float* ws, int64_t blocks) {
          sk::WrdFwdArgs<T> P{X, Y, meta("eps"), meta("tol"), imeta("max_iter"), imeta("relative", 0) != 0, L,
                              index, ws, value.data(), dual.data(), f.data(), g.data(), err.data(), n_iter.data(),
                              eps_out.data()};
          return emu::launch(blocks, L.threads, L.smem, seed, sk::wrd_fwd_kernel<T>, P);
        }));
    save("value", value, B); save("dual", dual, B); save("err", err, B);
    save("f", f, B * M); save("g", g, B * N); save("n_iter", n_iter, B); save("eps_reached", eps_out, B);
    return rc;
  }
  if (op == "wrd_bwd") {
    const int64_t D = imeta("D");
    const auto grad = load<float>("grad"), f = load<float>("f"), g = load<float>("g");
    const auto eps = load<double>("eps");
    auto gx = poisoned<T>(B * M * D), gy = poisoned<T>(B * N * D);
    const int rc = report(run_groups(m, n, B, M, N, true, limit,
        [&](const sk::Layout& L, const int* index, float* ws, int64_t blocks) {
          sk::WrdBwdArgs<T> P{X, Y, grad.data(), f.data(), g.data(), eps.data(), L, index, ws, gx.data(),
                              gy.data()};
          return emu::launch(blocks, L.threads, L.smem, seed, sk::wrd_bwd_kernel<T>, P);
        }));
    save("grad_x", gx, B * M * D); save("grad_y", gy, B * N * D);
    return rc;
  }
  std::fprintf(stderr, "unknown op %s\n", op.c_str());
  return 2;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) {
    std::fprintf(stderr, "usage: %s OP DTYPE DIR\n", argv[0]);
    return 2;
  }
  const std::string op = argv[1], dtype = argv[2];
  g_dir = argv[3];
  std::ifstream mf(g_dir + "/meta.txt");
  std::string k;
  double v;
  while (mf >> k >> v) g_meta[k] = v;
  if (dtype == "float32") return run<float>(op);
  if (dtype == "float16") return run<__half>(op);
  if (dtype == "bfloat16") return run<__nv_bfloat16>(op);
  std::fprintf(stderr, "unknown dtype %s\n", dtype.c_str());
  return 2;
}
