// CPU runner of the fused optimizer ops: every tensor's elements are cut into fixed-size chunks
// (a multiple of 8 elements, so every chunk starts on an 8-byte boundary of each role's
// bytes); chunks are spread over threads with at::parallel_for. Within a chunk the shared
// per-element functor updates all roles, then, while the chunk is still in cache, the msfp1
// partial sums of each role's bytes are accumulated. Chunking and threading never change a
// result: the element math is independent per element and the sums are integers mod 2^64.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "../optim_ops.h"
#include "../optim_plan.h"
#include "kernels.h"
#include "memstate/msfp1.h"
#include "memstate/optim_math.h"

namespace memstate {
namespace cpu {

namespace {

int64_t g_optim_chunk_elems = 16384;

// Updates elements [begin, end) of one tensor's roles: one flat loop over independent elements
// so that the compiler vectorises it; `ivdep` states that the roles never alias.
template <class Op>
__attribute__((always_inline)) inline void update_range(const Op& op, typename Op::storage_t* const* ptr,
                                                        const optim::TensorScalars<typename Op::M>& ts,
                                                        int64_t begin, int64_t end) {
  using T = typename Op::storage_t;
  using M = typename Op::M;
  constexpr int R = Op::kRoles;
  // Local copies of the scalars: they provably do not alias the arrays written below, so the
  // compiler keeps them in registers and vectorises every variant (amsgrad included).
  const Op o = op;
  const optim::TensorScalars<M> t = ts;
  T* p[R];
  for (int r = 0; r < R; ++r) p[r] = ptr[r];
#pragma GCC ivdep
  for (int64_t i = begin; i < end; ++i) {
    M x[R];
#pragma GCC unroll 5
    for (int r = 0; r < R; ++r) x[r] = to_math(p[r][i]);
    o(x, t);
#pragma GCC unroll 5
    for (int r = 0; r < R; ++r) {
      if (r != optim::kGrad) p[r][i] = to_storage<T>(x[r]);
    }
  }
}

template <class Op>
void update_range_default(const Op& op, typename Op::storage_t* const* ptr,
                          const optim::TensorScalars<typename Op::M>& ts, int64_t begin, int64_t end) {
  update_range(op, ptr, ts, begin, end);
}

#if defined(__x86_64__)
// The same loop compiled for AVX2. No FMA: contraction is off and "fma" is not enabled, and IEEE
// add/mul/div/sqrt round identically at every vector width, so results equal the default path.
template <class Op>
__attribute__((target("avx2"))) void update_range_avx2(const Op& op, typename Op::storage_t* const* ptr,
                                                       const optim::TensorScalars<typename Op::M>& ts,
                                                       int64_t begin, int64_t end) {
  update_range(op, ptr, ts, begin, end);
}
#endif

template <class Op>
using UpdateFn = void (*)(const Op&, typename Op::storage_t* const*, const optim::TensorScalars<typename Op::M>&,
                          int64_t, int64_t);

// The update loop for the active ISA (chosen once per pass, not per chunk).
template <class Op>
UpdateFn<Op> update_fn() {
#if defined(__x86_64__)
  if (active_isa() == Isa::kAvx2) return &update_range_avx2<Op>;
#endif
  return &update_range_default<Op>;
}

struct CpuRunner {
  template <class Op>
  static at::Tensor run(const Op& op, const OptimArgs& a,
                        const std::vector<optim::TensorScalars<typename Op::M>>& ts, bool fingerprint) {
    constexpr int64_t kAhead = 2;            // chunks
    constexpr int64_t kPrefetchBytes = 512;  // per role
    using T = typename Op::storage_t;
    constexpr int R = Op::kRoles;
    constexpr int64_t kElem = sizeof(T);
    const int64_t n = a.n;
    const int64_t chunk = g_optim_chunk_elems;
    const UpdateFn<Op> update = update_fn<Op>();
    std::vector<int64_t> chunk_begin(n + 1, 0);
    int64_t total_elems = 0;
    for (int64_t i = 0; i < n; ++i) {
      total_elems += a.numel[i];
      chunk_begin[i + 1] = chunk_begin[i] + (a.numel[i] + chunk - 1) / chunk;
    }
    const int64_t nchunks = chunk_begin[n];
    // every chunk sets its own partial sums: no zero fill
    std::unique_ptr<uint64_t[]> partial(fingerprint ? new uint64_t[static_cast<size_t>(nchunks * R * 2)] : nullptr);
    const auto prefetch_chunk = [&](int64_t c, int64_t t) {
      const int64_t b = (c - chunk_begin[t]) * chunk;
      const int64_t bytes = std::min<int64_t>((std::min(b + chunk, a.numel[t]) - b) * kElem, kPrefetchBytes);
      for (int r = 0; r < R; ++r) {
        const char* q = static_cast<const char*>(a.ptr(r, t)) + b * kElem;
        for (int64_t o = 0; o < bytes; o += 64) __builtin_prefetch(q + o);
      }
    };
    at::parallel_for(0, nchunks, chunk_grain(nchunks, total_elems * kElem * R), [&](int64_t cb, int64_t ce) {
      int64_t t = std::upper_bound(chunk_begin.begin(), chunk_begin.end(), cb) - chunk_begin.begin() - 1;
      int64_t tp = t;  // the tensor of chunk c + kAhead, prefetched
      // Many small tensors are scattered in memory: fetch a later chunk's first cache lines of
      // every role while this one computes (no effect on results).
      for (int64_t c = cb; c < std::min(ce, cb + kAhead); ++c) {
        while (chunk_begin[tp + 1] <= c) ++tp;
        prefetch_chunk(c, tp);
      }
      for (int64_t c = cb; c < ce; ++c) {
        while (chunk_begin[t + 1] <= c) ++t;
        if (c + kAhead < ce) {
          while (chunk_begin[tp + 1] <= c + kAhead) ++tp;
          prefetch_chunk(c + kAhead, tp);
        }
        T* ptr[R];
        for (int r = 0; r < R; ++r) ptr[r] = static_cast<T*>(a.ptr(r, t));
        const int64_t begin = (c - chunk_begin[t]) * chunk;
        const int64_t end = std::min(begin + chunk, a.numel[t]);
        update(op, ptr, ts[t], begin, end);
        if (fingerprint) {
          // The chunk was just written: hashing it now reads cache, not memory.
          for (int r = 0; r < R; ++r) {
            uint64_t& s0 = partial[(c * R + r) * 2];
            uint64_t& s1 = partial[(c * R + r) * 2 + 1];
            s0 = s1 = 0;
            msfp1_accumulate(reinterpret_cast<const unsigned char*>(ptr[r] + begin),
                             static_cast<uint64_t>((end - begin) * kElem),
                             static_cast<uint64_t>(begin * kElem / msfp1::kPairBytes), s0, s1);
          }
        }
      }
    });
    if (!fingerprint) return no_fingerprints();
    at::Tensor out = at::empty({n, R, 2}, at::kLong);
    auto* o = reinterpret_cast<uint64_t*>(out.data_ptr<int64_t>());
    for (int64_t i = 0; i < n; ++i) {
      const auto nbytes = static_cast<uint64_t>(a.numel[i] * kElem);
      for (int r = 0; r < R; ++r) {
        uint64_t s0 = 0, s1 = 0;
        for (int64_t c = chunk_begin[i]; c < chunk_begin[i + 1]; ++c) {
          s0 += partial[(c * R + r) * 2];
          s1 += partial[(c * R + r) * 2 + 1];
        }
        o[(i * R + r) * 2] = msfp1::finalize_lane0(s0, nbytes);
        o[(i * R + r) * 2 + 1] = msfp1::finalize_lane1(s1, nbytes);
      }
    }
    return out;
  }
};

// Cached step plans (optim_plan.h) run on the same runner; nothing to prepare on the CPU. The
// non-finite scan of skip_if_nonfinite reads the checked gradient pointers of the bucket.
const PlanDevice kCpuPlanDevice = {
    [](PlanBucket&) {},
    [](PlanKind kind, PlanBucket& b, const double* s, bool fingerprint) {
      return run_plan_bucket(CpuRunner{}, kind, b, s, fingerprint);
    },
    [](const PlanBucket& b) {
      const OptimArgs& a = b.args;
      bool bad = false;
      dispatch_storage(a.dtype, [&](auto tag) {
        using T = decltype(tag);
        for (int64_t i = 0; i < a.n && !bad; ++i) bad = any_nonfinite(static_cast<const T*>(a.ptr(optim::kGrad, i)), 0, a.numel[i]);
      });
      return bad;
    }};
const bool kCpuPlanRegistered = (g_plan_devices[0] = &kCpuPlanDevice, true);

// Whether any element of any tensor is NaN or +-Inf (floating dtypes only). 0-d bool tensor.
at::Tensor nonfinite_any_cpu(at::TensorList tensors) {
  c10::Device device(c10::kCPU);
  common_device("nonfinite_any", {{"tensors", tensors}}, device);
  check_nonfinite_dtypes(tensors);  // every tensor, before any is scanned: as on CUDA
  std::atomic<bool> found{false};
  for (size_t i = 0; i < tensors.size() && !found.load(); ++i) {
    const at::Tensor& t = tensors[i];
    if (!at::isFloatingType(t.scalar_type()) && !at::isComplexType(t.scalar_type())) continue;
    const at::Tensor c = t.contiguous();
    const int64_t chunk = g_optim_chunk_elems;
    const int64_t nchunks = (c.numel() + chunk - 1) / chunk;
    at::parallel_for(0, nchunks, chunk_grain(nchunks, c.nbytes()), [&](int64_t cb, int64_t ce) {
      if (found.load(std::memory_order_relaxed)) return;
      const int64_t begin = cb * chunk, end = std::min(ce * chunk, c.numel());
      bool bad = false;
      dispatch_storage(c.scalar_type() == at::kComplexFloat ? at::kFloat
                       : c.scalar_type() == at::kComplexDouble ? at::kDouble : c.scalar_type(),
                       [&](auto tag) {
        using T = decltype(tag);
        using M = math_t<T>;
        const int64_t k = at::isComplexType(c.scalar_type()) ? 2 : 1;
        bad = any_nonfinite(static_cast<const T*>(c.const_data_ptr()), begin * k, end * k);
      });
      if (bad) found.store(true, std::memory_order_relaxed);
    });
  }
  return at::scalar_tensor(found.load(), at::TensorOptions().dtype(at::kBool));
}

std::vector<double> increment_steps_cpu(at::TensorList steps) {
  c10::Device device(c10::kCPU);
  common_device("increment_steps", {{"steps", steps}}, device);
  std::vector<double> out(steps.size());
  std::vector<ByteRange> ranges;
  for (size_t i = 0; i < steps.size(); ++i) {
    check_step_counter(steps[i], "increment_steps", i);
    ranges.push_back(byte_range(steps[i], "steps", i, true));
  }
  check_no_overlap(std::move(ranges), "increment_steps");  // a counter listed twice
  for (size_t i = 0; i < steps.size(); ++i) out[i] = increment_step(steps[i]);
  return out;
}

}  // namespace

int64_t optim_chunk_elems() { return g_optim_chunk_elems; }

void set_optim_chunk_elems(int64_t elems) {
  TORCH_CHECK(elems >= 8 && elems % 8 == 0,
              "memstate: optimizer chunk size must be a positive multiple of 8 elements, got ", elems);
  g_optim_chunk_elems = elems;
}

}  // namespace cpu
}  // namespace memstate

TORCH_LIBRARY_IMPL(memstate, CPU, m) {
  m.impl("sgd_step", &memstate::sgd_step_impl<memstate::cpu::CpuRunner>);
  m.impl("adam_step", &memstate::adam_step_impl<memstate::cpu::CpuRunner>);
  m.impl("rmsprop_step", &memstate::rmsprop_step_impl<memstate::cpu::CpuRunner>);
  m.impl("adagrad_step", &memstate::adagrad_step_impl<memstate::cpu::CpuRunner>);
  m.impl("lion_step", &memstate::lion_step_impl<memstate::cpu::CpuRunner>);
  m.impl("lamb_step", &memstate::lamb_step_impl<memstate::cpu::CpuRunner>);
  m.impl("nonfinite_any", &memstate::cpu::nonfinite_any_cpu);
  m.impl("increment_steps", &memstate::cpu::increment_steps_cpu);
}
