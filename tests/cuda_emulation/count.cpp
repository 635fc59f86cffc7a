// Global-memory traffic of the emulated kernels, per launch: the performance model's counts of
// the CUDA backend (snl_kernels/perf/cuda.py).
//
// A driver built for counting (run.py, build(op, counting=True)) compiles its own code with
// g++'s address-sanitizer instrumentation in callback mode, so that every load and store of a
// kernel calls __asan_{load,store}N_noabort(address) below; this file is compiled without it.
// Global memory is every heap block the driver allocates outside a launch (its inputs, outputs
// and intermediate buffers, as the extension allocates them with torch before launching);
// what the emulation allocates inside a launch (the fibers' stacks, the warps' scratch) and
// static storage (__shared__ variables) are not global memory and are not counted.
//
// Per launch, one line to the file named by $SNL_EMU_COUNT, tab-separated: the kernel (its
// offset in the executable), grid x y z, block x y z, the blocks run ($SNL_EMU_BLOCKS: that
// many, spread over the grid, where the grid has at least twice as many; else all), read and
// written bytes requested
// (every access of every thread), tensor-core FLOPs (WMMA mma_sync), then per heap block
// touched "size:read distinct:written distinct" (bytes touched at least once).
#include <dlfcn.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <new>

namespace {

struct Region {
  uintptr_t begin, end;
  uint8_t* read_bits;   // one bit per byte, allocated at the first access in a launch
  uint8_t* write_bits;
  bool touched;
};

constexpr int kMaxRegions = 1 << 14;
Region regions[kMaxRegions];  // sorted by begin
int n_regions = 0;
bool in_launch = false;
Region* last = nullptr;
uint64_t read_requested = 0, write_requested = 0, mma_flops = 0;
char kernel_name[512];
unsigned grid[3], block[3];

int find_index(uintptr_t p) {  // first region with begin > p
  int lo = 0, hi = n_regions;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (regions[mid].begin <= p) lo = mid + 1; else hi = mid;
  }
  return lo;
}

void add_region(void* p, size_t n) {
  if (in_launch || p == nullptr || n == 0) return;
  if (n_regions == kMaxRegions) {
    std::fprintf(stderr, "count: more than %d live heap blocks\n", kMaxRegions);
    std::abort();
  }
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  const int i = find_index(b);
  std::memmove(&regions[i + 1], &regions[i], sizeof(Region) * (n_regions - i));
  regions[i] = Region{b, b + n, nullptr, nullptr, false};
  ++n_regions;
  last = nullptr;
}

void drop_region(void* p) {
  if (p == nullptr) return;
  const uintptr_t b = reinterpret_cast<uintptr_t>(p);
  const int i = find_index(b) - 1;
  if (i < 0 || regions[i].begin != b) return;  // allocated inside a launch: never tracked
  std::free(regions[i].read_bits);
  std::free(regions[i].write_bits);
  std::memmove(&regions[i], &regions[i + 1], sizeof(Region) * (n_regions - i - 1));
  --n_regions;
  last = nullptr;
}

Region* lookup(uintptr_t p) {
  if (last != nullptr && p >= last->begin && p < last->end) return last;
  const int i = find_index(p) - 1;
  if (i < 0 || p >= regions[i].end) return nullptr;
  return last = &regions[i];
}

void mark(uint8_t*& bits, const Region& r, uintptr_t p, size_t n) {
  if (bits == nullptr) {
    bits = static_cast<uint8_t*>(std::calloc((r.end - r.begin + 7) / 8, 1));
    if (bits == nullptr) std::abort();
  }
  size_t off = p - r.begin;
  const size_t stop = std::min<size_t>(off + n, r.end - r.begin);
  for (; off < stop; ++off) bits[off >> 3] |= static_cast<uint8_t>(1u << (off & 7));
}

void access(void* addr, size_t n, bool write) {
  if (!in_launch) return;
  const uintptr_t p = reinterpret_cast<uintptr_t>(addr);
  Region* r = lookup(p);
  if (r == nullptr) return;  // stack, static (__shared__) or the emulation's own heap
  r->touched = true;
  if (write) {
    write_requested += n;
    mark(r->write_bits, *r, p, n);
  } else {
    read_requested += n;
    mark(r->read_bits, *r, p, n);
  }
}

uint64_t take(uint8_t* bits, const Region& r) {  // set bits, then cleared
  if (bits == nullptr) return 0;
  const size_t bytes = (r.end - r.begin + 7) / 8;
  uint64_t set = 0;
  for (size_t i = 0; i < bytes; ++i) set += static_cast<uint64_t>(__builtin_popcount(bits[i]));
  std::memset(bits, 0, bytes);
  return set;
}

}  // namespace

// The allocation functions the drivers' std::vector and new[] use.
void* operator new(size_t n) {
  void* p = std::malloc(n ? n : 1);
  if (p == nullptr) throw std::bad_alloc();
  add_region(p, n);
  return p;
}
void* operator new[](size_t n) { return operator new(n); }
void operator delete(void* p) noexcept {
  drop_region(p);
  std::free(p);
}
void operator delete[](void* p) noexcept { operator delete(p); }
void operator delete(void* p, size_t) noexcept { operator delete(p); }
void operator delete[](void* p, size_t) noexcept { operator delete(p); }

extern "C" {

#define SNL_COUNT_HOOKS(n)                                                          \
  void __asan_load##n##_noabort(void* p) { access(p, n, false); }                  \
  void __asan_store##n##_noabort(void* p) { access(p, n, true); }
SNL_COUNT_HOOKS(1)
SNL_COUNT_HOOKS(2)
SNL_COUNT_HOOKS(4)
SNL_COUNT_HOOKS(8)
SNL_COUNT_HOOKS(16)
#undef SNL_COUNT_HOOKS
void __asan_loadN_noabort(void* p, size_t n) { access(p, n, false); }
void __asan_storeN_noabort(void* p, size_t n) { access(p, n, true); }
void __asan_handle_no_return() {}

void snl_count_begin(void* kernel, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                     unsigned by, unsigned bz) {
  // The kernels are local symbols (anonymous namespaces): written as their offset in the
  // executable, which run.py resolves with nm.
  Dl_info info{};
  uintptr_t offset = reinterpret_cast<uintptr_t>(kernel);
  if (dladdr(kernel, &info) != 0) offset -= reinterpret_cast<uintptr_t>(info.dli_fbase);
  std::snprintf(kernel_name, sizeof kernel_name, "0x%llx",
                static_cast<unsigned long long>(offset));
  grid[0] = gx; grid[1] = gy; grid[2] = gz;
  block[0] = bx; block[1] = by; block[2] = bz;
  read_requested = write_requested = mma_flops = 0;
  in_launch = true;
}

void snl_count_mma(uint64_t flops) {
  if (in_launch) mma_flops += flops;
}

uint64_t snl_count_sample_blocks() {
  const char* v = std::getenv("SNL_EMU_BLOCKS");
  const long long n = v != nullptr ? std::atoll(v) : 0;
  return n > 0 ? static_cast<uint64_t>(n) : UINT64_MAX;
}

void snl_count_end(uint64_t blocks_run) {
  in_launch = false;
  const char* path = std::getenv("SNL_EMU_COUNT");
  FILE* f = path != nullptr ? std::fopen(path, "a") : nullptr;
  if (path != nullptr && f == nullptr) {
    std::fprintf(stderr, "count: cannot open %s\n", path);
    std::abort();
  }
  if (f != nullptr) {
    std::fprintf(f, "%s\t%u %u %u\t%u %u %u\t%llu\t%llu\t%llu\t%llu\t", kernel_name, grid[0],
                 grid[1], grid[2], block[0], block[1], block[2],
                 static_cast<unsigned long long>(blocks_run),
                 static_cast<unsigned long long>(read_requested),
                 static_cast<unsigned long long>(write_requested),
                 static_cast<unsigned long long>(mma_flops));
  }
  for (int i = 0; i < n_regions; ++i) {  // size:read distinct:write distinct, per region
    Region& r = regions[i];
    if (!r.touched) continue;
    const uint64_t rd = take(r.read_bits, r), wd = take(r.write_bits, r);
    if (f != nullptr) {
      std::fprintf(f, "%llu:%llu:%llu ", static_cast<unsigned long long>(r.end - r.begin),
                   static_cast<unsigned long long>(rd), static_cast<unsigned long long>(wd));
    }
    r.touched = false;
  }
  if (f != nullptr) {
    std::fputc('\n', f);
    std::fclose(f);
  }
}

}  // extern "C"
