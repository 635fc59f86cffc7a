// The drivers' I/O: a run reads records from stdin and writes one record per input record to
// stdout. A record is an int64 count n, n int64 values (the case: op and sizes), an int64 count
// m and m float32 values (the inputs, each tensor's storage in turn); an output record is an
// int64 count and that many float32 values. tests/cuda_emulation/run.py writes and reads them.
#pragma once

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <vector>

namespace emu {

struct Record {
  std::vector<int64_t> ints;
  std::vector<float> floats;
};

inline bool read_record(Record& r) {
  int64_t n = 0;
  if (std::fread(&n, sizeof n, 1, stdin) != 1) return false;
  r.ints.resize(static_cast<size_t>(n));
  if (std::fread(r.ints.data(), sizeof(int64_t), r.ints.size(), stdin) != r.ints.size()) {
    std::abort();
  }
  int64_t m = 0;
  if (std::fread(&m, sizeof m, 1, stdin) != 1) std::abort();
  r.floats.resize(static_cast<size_t>(m));
  if (std::fread(r.floats.data(), sizeof(float), r.floats.size(), stdin) != r.floats.size()) {
    std::abort();
  }
  return true;
}

inline void write_record(const std::vector<float>& out) {
  const int64_t n = static_cast<int64_t>(out.size());
  std::fwrite(&n, sizeof n, 1, stdout);
  std::fwrite(out.data(), sizeof(float), out.size(), stdout);
  std::fflush(stdout);
}

// Reads ints in order.
struct IntReader {
  const std::vector<int64_t>& v;
  size_t i = 0;
  int64_t next() {
    if (i >= v.size()) {
      std::fprintf(stderr, "driver: record too short\n");
      std::abort();
    }
    return v[i++];
  }
};

// Hands out consecutive float arrays of the input record. A counting build (count.cpp) copies
// each into a heap block of its own, so that each input counts as one tensor.
struct FloatReader {
  const std::vector<float>& v;
  size_t i = 0;
#ifdef SNL_EMU_COUNT
  std::vector<std::vector<float>> copies{};
#endif
  const float* next(int64_t count) {
    if (i + static_cast<size_t>(count) > v.size()) {
      std::fprintf(stderr, "driver: record has too few floats\n");
      std::abort();
    }
    const float* p = v.data() + i;
    i += static_cast<size_t>(count);
#ifdef SNL_EMU_COUNT
    copies.reserve(64);  // no reallocation: the copies' data stay put
    if (copies.size() == copies.capacity()) std::abort();
    copies.emplace_back(p, p + count);
    p = copies.back().data();
#endif
    return p;
  }
};

// The main loop of a driver: handle(ints, floats) for each record until the end of stdin,
// its output written back; a handler returns false for a case it does not know (exit 2).
template <typename Handler>
int serve(Handler handle) {
  Record record;
  while (read_record(record)) {
    IntReader in{record.ints};
    FloatReader data{record.floats};
    std::vector<float> out;
    if (!handle(in, data, out)) {
      std::fprintf(stderr, "driver: unknown case\n");
      return 2;
    }
    write_record(out);
  }
  return 0;
}

// The outputs of a case, one after another.
inline std::vector<float> concat(std::initializer_list<const std::vector<float>*> parts) {
  std::vector<float> out;
  for (const auto* v : parts) out.insert(out.end(), v->begin(), v->end());
  return out;
}

// serve() for a driver with one kind of case: out = run(ints, floats).
template <typename Run>
int serve_all(Run run) {
  return serve([&](IntReader& in, FloatReader& data, std::vector<float>& out) {
    out = run(in, data);
    return true;
  });
}

}  // namespace emu
