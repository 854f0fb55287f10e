// The fused LoRA layer (cpu_lora_fused.py) at decode sizes: one pass over each token's adapter weights, no
// per-call library dispatch. Built by cpu_lora_kernel.py (torch.utils.cpp_extension) on the machine that runs it.
#include <torch/extension.h>
#include <immintrin.h>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

namespace {

inline float bf16_to_f32(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }

inline uint16_t f32_to_bf16(float f) {  // round to nearest even, NaN kept quiet (as torch's conversion)
  uint32_t u; std::memcpy(&u, &f, 4);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x7fffffu)) return (uint16_t)((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {  // 16 bf16 -> 16 fp32, masked lanes 0
  __m256i v = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

inline __mmask16 tail_mask(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

constexpr int kBlock = 8;  // tokens of one adapter that share each weight load

// acc[k] = sum_i w[i] * v[k][i] over n: 16 fp32 lanes in a fixed order, then one fixed reduction, so a token's
// result never depends on how many tokens share the block.
inline void dots(const uint16_t* w, const float* const* v, int nt, int64_t n, float* out) {
  __m512 acc[kBlock];
  for (int k = 0; k < nt; ++k) acc[k] = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512 wv = load_bf16(w + i, m);
    for (int k = 0; k < nt; ++k) acc[k] = _mm512_fmadd_ps(wv, _mm512_maskz_loadu_ps(m, v[k] + i), acc[k]);
  }
  for (int k = 0; k < nt; ++k) out[k] = _mm512_reduce_add_ps(acc[k]);
}

}  // namespace

// y[t] += expand(round_bf16(shrink(x[t]))) with the weights of slot idx[t] (< 0: no term), per slice.
// y [T, O] bf16, x [T, D] bf16 (rows contiguous), a [slots, R, D] bf16 (S slices' rank blocks of RB = R / S
// rows), bt [slots, RB, O] bf16 (slice s's B transposed: bt[slot, j, o] = B[o, s * RB + j] for its output
// rows o), idx [T] int64, out_offsets [S + 1] (slice s owns output rows out_offsets[s]..out_offsets[s+1]),
// ranks [slots, S] int64 (the rows of a slice's block that can be nonzero; the rest are zero, so skipping them
// changes no bit). The shrink accumulates in fp32 in 16 lanes, the expand over j in order; both round to bf16
// where vLLM's CPU ops round (the shrink's result, the expand's result, the sum with y).
void fused_lora(torch::Tensor y, torch::Tensor x, torch::Tensor a, torch::Tensor bt, torch::Tensor idx,
                std::vector<int64_t> out_offsets, torch::Tensor ranks) {
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && a.dim() == 3 && bt.dim() == 3 && idx.dim() == 1, "fused_lora: ranks");
  for (const auto& t : {x, y, a, bt})
    TORCH_CHECK(t.scalar_type() == at::kBFloat16 && t.stride(-1) == 1, "fused_lora: bf16 with contiguous rows");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous() && idx.is_contiguous() && idx.scalar_type() == at::kLong,
              "fused_lora: contiguous weights and int64 indices");
  const int64_t T = x.size(0), D = x.size(1), R = a.size(1), slots = a.size(0), O = y.size(1);
  const int64_t S = (int64_t)out_offsets.size() - 1;
  TORCH_CHECK(S >= 1 && R % S == 0 && out_offsets[0] == 0 && out_offsets[S] == O && bt.size(1) == R / S &&
              bt.size(2) == O && a.size(2) == D && bt.size(0) == slots && y.size(0) == T && idx.size(0) == T,
              "fused_lora: shapes do not match");
  TORCH_CHECK(ranks.is_contiguous() && ranks.scalar_type() == at::kLong && ranks.dim() == 2 &&
              ranks.size(0) == slots && ranks.size(1) == S, "fused_lora: ranks [slots, slices] int64");
  const int64_t RB = R / S;
  const int64_t* RK = ranks.data_ptr<int64_t>();
  const auto* X = (const uint16_t*)x.data_ptr();
  const auto* A = (const uint16_t*)a.data_ptr();
  const auto* BT = (const uint16_t*)bt.data_ptr();
  auto* Y = (uint16_t*)y.data_ptr();
  const int64_t* I = idx.data_ptr<int64_t>();
  const int64_t ys = y.stride(0), xs = x.stride(0), as = a.stride(0), bts = bt.stride(0);
  std::vector<float> xf(kBlock * D), h(kBlock * RB), out(kBlock);
  alignas(64) float lanes[16];
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(I[t] < slots, "fused_lora: adapter index out of range");
  std::vector<char> done(T, 0);
  for (int64_t first = 0; first < T; ++first) {
    if (done[first] || I[first] < 0) continue;
    const int64_t s = I[first];
    int64_t tokens[kBlock];
    int nt = 0;
    for (int64_t t = first; t < T && nt < kBlock; ++t)
      if (!done[t] && I[t] == s) { tokens[nt++] = t; done[t] = 1; }
    const float* xv[kBlock];
    for (int k = 0; k < nt; ++k) {
      const uint16_t* xr = X + tokens[k] * xs;
      for (int64_t i = 0; i < D; ++i) xf[k * D + i] = bf16_to_f32(xr[i]);
      xv[k] = xf.data() + k * D;
    }
    const uint16_t* As = A + s * as;
    const uint16_t* Bs = BT + s * bts;
    for (int64_t sl = 0; sl < S; ++sl) {
      const int64_t rank = std::min<int64_t>(RK[s * S + sl], RB);
      if (rank <= 0) continue;  // a slice this adapter does not adapt
      for (int64_t j = 0; j < rank; ++j) {  // shrink: h[k][j] = round_bf16(A[sl * RB + j] . x[k])
        dots(As + (sl * RB + j) * D, xv, nt, D, out.data());
        for (int k = 0; k < nt; ++k) h[k * RB + j] = bf16_to_f32(f32_to_bf16(out[k]));
      }
      for (int64_t o = out_offsets[sl]; o < out_offsets[sl + 1]; o += 16) {  // expand, 16 output rows at a time
        const __mmask16 m = tail_mask(out_offsets[sl + 1] - o);
        __m512 acc[kBlock];
        for (int k = 0; k < nt; ++k) acc[k] = _mm512_setzero_ps();
        for (int64_t j = 0; j < rank; ++j) {
          const __m512 wv = load_bf16(Bs + j * O + o, m);
          for (int k = 0; k < nt; ++k) acc[k] = _mm512_fmadd_ps(wv, _mm512_set1_ps(h[k * RB + j]), acc[k]);
        }
        for (int k = 0; k < nt; ++k) {
          _mm512_store_ps(lanes, acc[k]);
          uint16_t* yo = Y + tokens[k] * ys + o;
          for (int64_t i = 0; i < 16 && o + i < out_offsets[sl + 1]; ++i)
            yo[i] = f32_to_bf16(bf16_to_f32(yo[i]) + bf16_to_f32(f32_to_bf16(lanes[i])));
        }
      }
    }
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("fused_lora", &fused_lora); }
