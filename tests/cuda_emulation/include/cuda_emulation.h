// CPU emulation of the CUDA features that the kernels of csrc/*_kernels.cuh use, so that their
// source compiles with g++ and runs on a CPU (tests/cuda_emulation/run.py).
//
// Threads: every CUDA thread of a block is a fiber (ucontext) with its own stack; the blocks of
// a grid run one after another. A fiber runs until it reaches a barrier (__syncthreads,
// __syncwarp, or a warp-collective operation: shuffles and the WMMA calls) or returns; the
// scheduler then runs the others, and releases a barrier when every thread of its scope (the
// block, or the warp) that has not returned waits at it. A block in which no thread can move
// (threads of one warp waiting at different barriers, or some at __syncthreads while others
// wait for a warp that has returned) stops the program with an error naming the block: the
// emulation is stricter than the hardware there, and never silently wrong.
//
// Memory: __shared__ variables are static locals, one copy for the whole program; correct
// because one block runs at a time. Everything else a kernel reads is host memory.
//
// Arithmetic: the fp32 operations are the CPU's IEEE ones (sqrtf and division correctly
// rounded, as nvcc without --use_fast_math), built with -ffp-contract=fast (and -mfma on x86)
// so that a * b + c is contracted to an FMA as nvcc does by default (where g++ contracts the
// same expressions; the bits may differ from a GPU's, the accuracy class does not).
//
// Tensor cores (nvcuda::wmma, tf32 m16n16k8): a fragment holds num_elements values per lane,
// element e of lane l being entry e * 32 + l of the row-major tile (the hardware's assignment
// is unspecified, and the kernels rely on none). mma_sync reads only the top 19 bits of each
// fp32 operand (truncation, as the tensor cores do, so a kernel that forgets to round its
// operands shows the bias), multiplies exactly and accumulates each output in k order with
// fp32 FMAs (the hardware's internal accumulation order is not documented). load/store check
// the alignment rules of the API (32-byte pointers, ldm a multiple of 4 floats).
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <functional>
#include <memory>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#ifndef __CUDA_ARCH__
#define __CUDA_ARCH__ 800  // tensor-core (sm_80) code paths of the kernels are compiled
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline dim3 threadIdx, blockIdx, blockDim, gridDim;

#ifdef SNL_EMU_COUNT  // tests/cuda_emulation/count.cpp: bytes and products per launch
extern "C" void snl_count_begin(void* kernel, unsigned gx, unsigned gy, unsigned gz,
                                unsigned bx, unsigned by, unsigned bz);
extern "C" void snl_count_mma(uint64_t flops);
extern "C" uint64_t snl_count_sample_blocks();
extern "C" void snl_count_end(uint64_t blocks_run);
#endif

namespace emu {

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda emulation: %s (block %u,%u,%u thread %u,%u,%u)\n", what, blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

enum class State { kRunnable, kBlockBarrier, kWarpBarrier, kDone };

constexpr size_t kStackBytes = 256 * 1024;

// The threads of the block being run, and the scheduler that switches between them.
class Block {
 public:
  // Runs body once per thread of a block of size blockDim (blockIdx already set).
  void run(const std::function<void()>& body) {
    const unsigned n = blockDim.x * blockDim.y * blockDim.z;
    if (fibers_.size() < n) fibers_.resize(n);
    warp_scratch_.assign(static_cast<size_t>((n + 31) / 32) * kWarpScratch, 0);
    body_ = &body;
    for (unsigned i = 0; i < n; ++i) {
      Fiber& f = fibers_[i];
      if (!f.stack) f.stack.reset(new char[kStackBytes]);
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStackBytes;
      f.ctx.uc_link = &scheduler_;
      makecontext(&f.ctx, &Block::entry, 0);
      f.state = State::kRunnable;
    }
    n_ = n;
    for (;;) {
      bool any_alive = false;
      for (unsigned i = 0; i < n; ++i) {
        if (fibers_[i].state != State::kRunnable) continue;
        switch_to(i);
      }
      for (unsigned i = 0; i < n; ++i) any_alive |= fibers_[i].state != State::kDone;
      if (!any_alive) break;
      if (!release_barriers()) {
        threadIdx = dim3(0, 0, 0);
        fail("deadlock: the threads of this block wait at barriers that cannot open");
      }
    }
  }

  // Called by the current thread: wait at the block (or its warp's) barrier.
  void wait(State barrier) {
    Fiber& f = fibers_[current_];
    f.state = barrier;
    swapcontext(&f.ctx, &scheduler_);
  }

  unsigned linear_thread() const { return current_; }
  unsigned lane() const { return current_ % 32; }
  unsigned warp() const { return current_ / 32; }
  // kWarpScratch 8-byte words per warp for warp-collective exchanges.
  uint64_t* warp_scratch() { return warp_scratch_.data() + static_cast<size_t>(warp()) * kWarpScratch; }
  static constexpr size_t kWarpScratch = 1024;

  static Block& current() {
    static Block block;
    return block;
  }

 private:
  struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    State state = State::kDone;
  };

  static void entry() {
    Block& b = current();
    (*b.body_)();
    b.fibers_[b.current_].state = State::kDone;  // then uc_link: back to the scheduler
  }

  void switch_to(unsigned i) {
    current_ = i;
    threadIdx = dim3(i % blockDim.x, (i / blockDim.x) % blockDim.y, i / (blockDim.x * blockDim.y));
    swapcontext(&scheduler_, &fibers_[i].ctx);
  }

  // Opens the barriers whose scope is complete; whether any thread may run again.
  bool release_barriers() {
    bool released = false;
    // Warp barriers: all live threads of the warp wait at the warp barrier.
    for (unsigned w0 = 0; w0 < n_; w0 += 32) {
      const unsigned w1 = w0 + 32 < n_ ? w0 + 32 : n_;
      bool complete = true, any = false;
      for (unsigned i = w0; i < w1; ++i) {
        const State s = fibers_[i].state;
        if (s == State::kWarpBarrier) any = true;
        else if (s != State::kDone) complete = false;
      }
      if (any && complete) {
        for (unsigned i = w0; i < w1; ++i) {
          if (fibers_[i].state == State::kWarpBarrier) fibers_[i].state = State::kRunnable;
        }
        released = true;
      }
    }
    if (released) return true;
    // Block barrier: all live threads of the block wait at it.
    bool complete = true, any = false;
    for (unsigned i = 0; i < n_; ++i) {
      const State s = fibers_[i].state;
      if (s == State::kBlockBarrier) any = true;
      else if (s != State::kDone) complete = false;
    }
    if (!(any && complete)) return false;
    for (unsigned i = 0; i < n_; ++i) {
      if (fibers_[i].state == State::kBlockBarrier) fibers_[i].state = State::kRunnable;
    }
    return true;
  }

  std::vector<Fiber> fibers_;
  std::vector<uint64_t> warp_scratch_;
  ucontext_t scheduler_;
  const std::function<void()>* body_ = nullptr;
  unsigned current_ = 0, n_ = 0;
};

// kernel<<<grid, block>>>(args...): the blocks one after another, x fastest.
template <typename... Params, typename... Args>
void launch(dim3 grid, dim3 block, void (*kernel)(Params...), Args&&... args) {
  static_assert(sizeof...(Params) == sizeof...(Args), "kernel argument count");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) fail("launch with an empty grid");
  if (block.x * block.y * block.z > 1024) fail("launch with more than 1024 threads per block");
  const std::tuple<std::decay_t<Params>...> params(std::forward<Args>(args)...);
  gridDim = grid;
  blockDim = block;
#ifdef SNL_EMU_COUNT
  snl_count_begin(reinterpret_cast<void*>(kernel), grid.x, grid.y, grid.z, block.x, block.y,
                  block.z);
#endif
  const std::function<void()> body = [&] {
    std::tuple<std::decay_t<Params>...> copy = params;  // each thread gets the arguments
    std::apply(kernel, copy);
  };
#ifdef SNL_EMU_COUNT
  // A counting run may run a sample of the blocks (all of a grid under twice the sample):
  // block floor(frac((i + 1/2) phi) blocks) for i < sample, a golden-ratio sequence, spread
  // evenly over the grid's linear index and over its rows and columns alike (a grid of
  // tiles whose lower triangle returns at once is sampled without bias); the counts say how
  // many ran.
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  const uint64_t sample = snl_count_sample_blocks();
  const bool all = blocks < 2 * std::min<uint64_t>(sample, blocks);
  const uint64_t run = all ? blocks : sample;
  for (uint64_t i = 0; i < run; ++i) {
    const double golden = 0.6180339887498949;
    const double at = (static_cast<double>(i) + 0.5) * golden;
    const uint64_t b = all ? i : static_cast<uint64_t>((at - std::floor(at)) * blocks);
    blockIdx = dim3(static_cast<unsigned>(b % grid.x),
                    static_cast<unsigned>(b / grid.x % grid.y),
                    static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y)));
    Block::current().run(body);
  }
  snl_count_end(run);
#else
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = dim3(x, y, z);
        Block::current().run(body);
      }
    }
  }
#endif
}

}  // namespace emu

inline void __syncthreads() { emu::Block::current().wait(emu::State::kBlockBarrier); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) emu::fail("__syncwarp: only the full mask is emulated");
  emu::Block::current().wait(emu::State::kWarpBarrier);
}
[[noreturn]] inline void __trap() { emu::fail("__trap"); }

// Butterfly shuffle: every lane of the warp takes part (full mask only).
template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  if (mask != 0xffffffffu || width != 32) emu::fail("__shfl_xor_sync: only full warps emulated");
  emu::Block& b = emu::Block::current();
  uint64_t* slot = b.warp_scratch();
  std::memcpy(&slot[b.lane()], &value, sizeof(T));
  __syncwarp();
  T out;
  std::memcpy(&out, &slot[b.lane() ^ static_cast<unsigned>(lane_mask)], sizeof(T));
  __syncwarp();
  return out;
}

// CUDA's integer min and max (device functions in the global namespace).
template <typename T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <typename T>
inline T max(T a, T b) {
  return a < b ? b : a;
}

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

// Bit casts between float and unsigned int.
inline unsigned __float_as_uint(float x) {
  unsigned bits;
  std::memcpy(&bits, &x, 4);
  return bits;
}
inline float __uint_as_float(unsigned bits) {
  float x;
  std::memcpy(&x, &bits, 4);
  return x;
}

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K>
struct fragment_shape;
template <int M, int N, int K>
struct fragment_shape<matrix_a, M, N, K> {
  static constexpr int rows = M, cols = K;
};
template <int M, int N, int K>
struct fragment_shape<matrix_b, M, N, K> {
  static constexpr int rows = K, cols = N;
};
template <int M, int N, int K>
struct fragment_shape<accumulator, M, N, K> {
  static constexpr int rows = M, cols = N;
};

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 8, "only the tf32 m16n16k8 shape is emulated");
  static constexpr int rows = fragment_shape<Use, M, N, K>::rows;
  static constexpr int cols = fragment_shape<Use, M, N, K>::cols;
  static constexpr int num_elements = rows * cols / 32;
  using layout = Layout;
  float x[num_elements];
  // (row, column) of this lane's element e.
  static int row_of(int e, unsigned lane) { return (e * 32 + static_cast<int>(lane)) / cols; }
  static int col_of(int e, unsigned lane) { return (e * 32 + static_cast<int>(lane)) % cols; }
};

// cvt.rna.tf32.f32: to the nearest tf32 value, ties away from zero.
inline float __float_to_tf32(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}

namespace detail {
inline float tensor_core_operand(float x) {  // the top 19 bits: truncation
  uint32_t bits;
  std::memcpy(&bits, &x, 4);
  bits &= 0xffffe000u;
  std::memcpy(&x, &bits, 4);
  return x;
}
inline void check_access(const void* ptr, unsigned ldm, const char* what) {
  if (reinterpret_cast<uintptr_t>(ptr) % 32 != 0) emu::fail(what);
  if (ldm % 4 != 0) emu::fail(what);
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout>
void fill_fragment(fragment<Use, M, N, K, T, Layout>& f, float v) {
  for (float& e : f.x) e = v;
}

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  detail::check_access(p, ldm, "load_matrix_sync: pointer not 32-byte aligned or ldm % 4 != 0");
  const unsigned lane = emu::Block::current().lane();
  for (int e = 0; e < F::num_elements; ++e) {
    const int r = F::row_of(e, lane), c = F::col_of(e, lane);
    f.x[e] = std::is_same_v<Layout, col_major> ? p[static_cast<size_t>(c) * ldm + r]
                                                : p[static_cast<size_t>(r) * ldm + c];
  }
  __syncwarp();  // warp-collective, as on the hardware
}

template <int M, int N, int K, typename T>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, T>& f, unsigned ldm,
                       layout_t layout) {
  using F = fragment<accumulator, M, N, K, T>;
  detail::check_access(p, ldm, "store_matrix_sync: pointer not 32-byte aligned or ldm % 4 != 0");
  const unsigned lane = emu::Block::current().lane();
  for (int e = 0; e < F::num_elements; ++e) {
    const int r = F::row_of(e, lane), c = F::col_of(e, lane);
    if (layout == mem_row_major) {
      p[static_cast<size_t>(r) * ldm + c] = f.x[e];
    } else {
      p[static_cast<size_t>(c) * ldm + r] = f.x[e];
    }
  }
  __syncwarp();
}

// d = a b + c for the warp: the lanes' elements meet in the warp's scratch.
template <int M, int N, int K, typename LA, typename LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d,
              const fragment<matrix_a, M, N, K, precision::tf32, LA>& a,
              const fragment<matrix_b, M, N, K, precision::tf32, LB>& b,
              const fragment<accumulator, M, N, K, float>& c) {
  using FA = fragment<matrix_a, M, N, K, precision::tf32, LA>;
  using FB = fragment<matrix_b, M, N, K, precision::tf32, LB>;
  using FC = fragment<accumulator, M, N, K, float>;
  emu::Block& blk = emu::Block::current();
  const unsigned lane = blk.lane();
  float* s = reinterpret_cast<float*>(blk.warp_scratch());
  float* sa = s;              // M x K
  float* sb = sa + M * K;     // K x N
  float* sc = sb + K * N;     // M x N
  for (int e = 0; e < FA::num_elements; ++e) {
    sa[FA::row_of(e, lane) * K + FA::col_of(e, lane)] = detail::tensor_core_operand(a.x[e]);
  }
  for (int e = 0; e < FB::num_elements; ++e) {
    sb[FB::row_of(e, lane) * N + FB::col_of(e, lane)] = detail::tensor_core_operand(b.x[e]);
  }
  for (int e = 0; e < FC::num_elements; ++e) {
    sc[FC::row_of(e, lane) * N + FC::col_of(e, lane)] = c.x[e];
  }
  __syncwarp();
#ifdef SNL_EMU_COUNT
  if (lane == 0) snl_count_mma(2ull * M * N * K);
#endif
  float out[FC::num_elements];
  for (int e = 0; e < FC::num_elements; ++e) {
    const int r = FC::row_of(e, lane), col = FC::col_of(e, lane);
    float acc = sc[r * N + col];
    for (int k = 0; k < K; ++k) acc = std::fma(sa[r * K + k], sb[k * N + col], acc);
    out[e] = acc;
  }
  __syncwarp();  // the scratch is reused by the next call
  for (int e = 0; e < FC::num_elements; ++e) d.x[e] = out[e];
}

}  // namespace wmma
}  // namespace nvcuda
