// A CPU emulation of the CUDA execution model, enough to run mcsc's kernels unchanged on a
// machine without a GPU (tests/test_cuda_emulated.py).
//
// Each CUDA thread of a block is a fiber (ucontext) on one OS thread; blocks run one after
// another. A fiber runs until it reaches a barrier (__syncthreads, __syncthreads_and,
// __syncwarp, __shfl_xor_sync) or exits; once every fiber waits, the scheduler releases the
// barrier. Between two barriers the threads run one at a time in a chosen order (ascending or
// descending thread index), so a missing barrier -- one thread reading shared memory that
// another writes in the same phase -- makes the two orders give different results. A barrier
// that not every thread of its block (or warp) reaches is reported as an error, as
// compute-sanitizer's synccheck would.
//
// Warp-collective instructions (mma.sync, ldmatrix: include/cuda/ptx.cuh) are warp barriers
// too: the warp's 32 lanes all offer their operands, and once all have arrived one function
// sees every lane's operands and writes every lane's results. cp.async copies are kept per
// thread, in the groups cp.async.commit_group closes, and land when a cp.async.wait_group
// that covers their group returns; a thread that exits with copies not waited for is an error.
//
// What it does not model: the memory model beyond barriers, warp-synchronous execution without
// barriers, the real register layout of WMMA fragments (include/mma.h), performance, and the
// limits of shared memory and registers (nvcc checks those when CI compiles the kernels).
#pragma once

#include <dlfcn.h>
#include <elf.h>
#include <ucontext.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <fstream>
#include <functional>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// CUDA's qualifiers. __shared__ variables become function statics: one copy per kernel
// instantiation, which is right because blocks run one at a time.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

namespace cuda_emulator {

struct Index3 {
  unsigned x = 0;
  unsigned y = 0;
  unsigned z = 0;
};

constexpr int kWarpSize = 32;

// A barrier misuse or a failed check, thrown by launch() on the host's stack.
struct KernelError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

enum class Wait { Running, Block, Warp, Exited };

// A warp-collective operation: `run` gets, for each of the 32 lanes, the operands the lane
// offered and where its results go, once every lane of the warp has arrived. It may throw
// KernelError (a misuse the operation detects).
struct Collective {
  const char* name;
  void (*run)(const void* const (&operands)[32], void* const (&results)[32]);
};

// One thread's cp.async copies: the source bytes are read when the copy is issued (so
// AddressSanitizer names the issuing line), the destination is written when a wait covers it.
struct AsyncCopy {
  void* destination;
  unsigned char bytes[16];
  int size;
};

struct AsyncCopies {
  std::vector<AsyncCopy> open;                 // issued since the last commit
  std::deque<std::vector<AsyncCopy>> committed;  // committed groups, oldest first

  bool empty() const { return open.empty() && committed.empty(); }

  // cp.async.commit_group: the open copies (possibly none) become the newest group.
  void commit() {
    committed.push_back(std::move(open));
    open.clear();
  }

  // cp.async.wait_group pending: every committed group but the newest `pending` lands.
  void wait(int pending) {
    while (static_cast<int>(committed.size()) > pending) {
      for (const AsyncCopy& copy : committed.front()) {
        std::memcpy(copy.destination, copy.bytes, copy.size);
      }
      committed.pop_front();
    }
  }
};

struct Fiber {
  ucontext_t context;
  std::unique_ptr<char[]> stack;
  Index3 thread_index;
  Wait wait = Wait::Running;
  // The value a thread offers to a barrier (its predicate, or the bits of a shuffled value and
  // the lane it reads), and what it gets back.
  uint64_t offered = 0;
  int source_lane = 0;
  uint64_t received = 0;
  // At a warp-collective operation (null at a shuffle or __syncwarp): what it is, and this
  // lane's operands and results.
  const Collective* collective = nullptr;
  const void* operands = nullptr;
  void* results = nullptr;
  AsyncCopies copies;
};

class Scheduler {
 public:
  static Scheduler& instance() {
    static Scheduler scheduler;
    return scheduler;
  }

  Fiber& current() { return *current_; }
  const Index3& block_index() const { return block_index_; }
  // Counts the blocks run so far: state kept for the block that runs can tell a new block.
  uint64_t block_serial() const { return block_serial_; }

  // Runs body() as every thread of a block of `threads` threads (a multiple of 32), one block
  // after another over the grid; `descending` runs the threads of a phase in reverse order.
  // Each block gets `dynamic_shared_bytes` of dynamic shared memory (dynamic_shared()).
  void launch(int64_t grid_x, int64_t grid_y, int threads, bool descending,
              const std::function<void()>& body, size_t dynamic_shared_bytes = 0) {
    if (threads <= 0 || threads % kWarpSize != 0) {
      throw KernelError("cuda_emulator: block size must be a positive multiple of 32");
    }
    // Exactly the bytes asked for, so that AddressSanitizer reports an access past them.
    dynamic_shared_.reset(dynamic_shared_bytes == 0 ? nullptr
                                                    : new char[dynamic_shared_bytes]);
    dynamic_shared_bytes_ = dynamic_shared_bytes;
    fibers_.resize(threads);
    for (Fiber& fiber : fibers_) {
      if (!fiber.stack) fiber.stack.reset(new char[kStackBytes]);
    }
    body_ = &body;
    for (int64_t y = 0; y < grid_y; ++y) {
      for (int64_t x = 0; x < grid_x; ++x) {
        block_index_ = {static_cast<unsigned>(x), static_cast<unsigned>(y), 0};
        run_block(descending);
      }
    }
  }

  // Before each block, fill these byte ranges (the kernels' __shared__ variables, see
  // kernel_shared_memory) with 0xff when threads run in ascending order, 0x7f in descending.
  // The dynamic shared memory is poisoned too.
  void poison_shared_memory(std::vector<std::pair<char*, size_t>> ranges) {
    shared_ranges_ = std::move(ranges);
    poisoning_ = true;
  }

  // The block's dynamic shared memory (extern __shared__ on a GPU; null when none was asked
  // for); malloc's alignment, 16 bytes.
  char* dynamic_shared() { return dynamic_shared_.get(); }

  // Called by the fibers: wait at a barrier of `kind` offering `value`, reading lane `source`.
  uint64_t wait_at(Wait kind, uint64_t value, int source) {
    Fiber& fiber = current();
    fiber.wait = kind;
    fiber.offered = value;
    fiber.source_lane = source;
    fiber.collective = nullptr;
    swapcontext(&fiber.context, &host_);
    return fiber.received;
  }

  // Called by the fibers: take part in the warp-collective `operation`, offering `operands`;
  // returns once the whole warp has arrived and `results` is written.
  void collective(const Collective& operation, const void* operands, void* results) {
    Fiber& fiber = current();
    fiber.wait = Wait::Warp;
    fiber.collective = &operation;
    fiber.operands = operands;
    fiber.results = results;
    swapcontext(&fiber.context, &host_);
    fiber.collective = nullptr;
  }

  // A failed check inside a kernel: abandon the block and report `message` from launch().
  [[noreturn]] void fail(const std::string& message) {
    error_ = message;
    swapcontext(&current().context, &host_);
    __builtin_unreachable();
  }

 private:
  static constexpr size_t kStackBytes = 256 * 1024;

  static void fiber_main() {
    Scheduler& scheduler = instance();
    (*scheduler.body_)();
    Fiber& fiber = scheduler.current();
    if (!fiber.copies.empty()) {
      const size_t groups = fiber.copies.committed.size();
      scheduler.fail("cuda_emulator: thread " + std::to_string(fiber.thread_index.x) +
                     " exits with cp.async copies that no wait covered (" +
                     std::to_string(groups) + " committed groups not waited for, " +
                     std::to_string(fiber.copies.open.size()) +
                     " copies never committed): a missing cp_async_commit or cp_async_wait");
    }
    fiber.wait = Wait::Exited;
  }

  std::string block_name() const {
    return "block (" + std::to_string(block_index_.x) + ", " + std::to_string(block_index_.y) +
           ")";
  }

  void run_block(bool descending) {
    ++block_serial_;
    for (const auto& [begin, size] : shared_ranges_) {
      std::memset(begin, descending ? 0x7f : 0xff, size);
    }
    if (poisoning_ && dynamic_shared_) {
      std::memset(dynamic_shared_.get(), descending ? 0x7f : 0xff, dynamic_shared_bytes_);
    }
    const int threads = static_cast<int>(fibers_.size());
    for (int t = 0; t < threads; ++t) {
      Fiber& fiber = fibers_[t];
      fiber.thread_index = {static_cast<unsigned>(t), 0, 0};
      fiber.wait = Wait::Running;
      fiber.collective = nullptr;
      fiber.copies = AsyncCopies{};
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = fiber.stack.get();
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &host_;
      makecontext(&fiber.context, &Scheduler::fiber_main, 0);
    }
    error_.clear();
    while (true) {
      for (int step = 0; step < threads; ++step) {
        const int t = descending ? threads - 1 - step : step;
        if (fibers_[t].wait != Wait::Running) continue;
        current_ = &fibers_[t];
        swapcontext(&host_, &fibers_[t].context);
        if (!error_.empty()) throw KernelError(error_ + " (" + block_name() + ")");
      }
      if (release_warps()) continue;
      if (release_block()) continue;
      return;
    }
  }

  // Releases every warp whose 32 lanes all wait at a warp barrier; throws if some lanes of a
  // warp wait there while others went elsewhere, or at another warp operation.
  bool release_warps() {
    bool released = false;
    for (size_t first = 0; first < fibers_.size(); first += kWarpSize) {
      int waiting = 0;
      const Fiber* waiter = nullptr;
      for (int lane = 0; lane < kWarpSize; ++lane) {
        if (fibers_[first + lane].wait != Wait::Warp) continue;
        ++waiting;
        waiter = &fibers_[first + lane];
      }
      if (waiting == 0) continue;
      if (waiting != kWarpSize) {
        throw KernelError("cuda_emulator: divergent warp barrier in " + block_name() + ": " +
                          std::to_string(waiting) + " of the 32 lanes of warp " +
                          std::to_string(first / kWarpSize) + " wait at " +
                          warp_operation(*waiter) + ", the others do not");
      }
      const Collective* collective = fibers_[first].collective;
      for (int lane = 1; lane < kWarpSize; ++lane) {
        if (fibers_[first + lane].collective != collective) {
          throw KernelError("cuda_emulator: divergent warp in " + block_name() + ": lane 0 of " +
                            "warp " + std::to_string(first / kWarpSize) + " waits at " +
                            warp_operation(fibers_[first]) + ", lane " + std::to_string(lane) +
                            " at " + warp_operation(fibers_[first + lane]));
        }
      }
      if (collective != nullptr) {
        const void* operands[kWarpSize];
        void* results[kWarpSize];
        for (int lane = 0; lane < kWarpSize; ++lane) {
          operands[lane] = fibers_[first + lane].operands;
          results[lane] = fibers_[first + lane].results;
        }
        try {
          collective->run(operands, results);
        } catch (const KernelError& error) {
          throw KernelError(std::string(error.what()) + " (warp " +
                            std::to_string(first / kWarpSize) + " of " + block_name() + ")");
        }
      }
      for (int lane = 0; lane < kWarpSize; ++lane) {
        Fiber& fiber = fibers_[first + lane];
        fiber.received = fibers_[first + (fiber.source_lane & (kWarpSize - 1))].offered;
      }
      for (int lane = 0; lane < kWarpSize; ++lane) fibers_[first + lane].wait = Wait::Running;
      released = true;
    }
    return released;
  }

  static std::string warp_operation(const Fiber& fiber) {
    return fiber.collective != nullptr ? fiber.collective->name : "__syncwarp/__shfl_xor_sync";
  }

  // Releases a __syncthreads that every thread reached (the AND of the offered predicates goes
  // back to each); false when all threads exited; throws when only some threads wait.
  bool release_block() {
    int waiting = 0;
    int exited = 0;
    uint64_t all = 1;
    for (const Fiber& fiber : fibers_) {
      waiting += fiber.wait == Wait::Block;
      exited += fiber.wait == Wait::Exited;
      all &= fiber.offered != 0 ? 1 : 0;
    }
    if (exited == static_cast<int>(fibers_.size())) return false;
    if (waiting != static_cast<int>(fibers_.size())) {
      throw KernelError("cuda_emulator: divergent __syncthreads in " + block_name() + ": " +
                        std::to_string(waiting) + " threads wait at it, " +
                        std::to_string(exited) + " have exited");
    }
    for (Fiber& fiber : fibers_) {
      fiber.received = all;
      fiber.wait = Wait::Running;
    }
    return true;
  }

  std::vector<Fiber> fibers_;
  Fiber* current_ = nullptr;
  ucontext_t host_;
  Index3 block_index_;
  uint64_t block_serial_ = 0;
  std::vector<std::pair<char*, size_t>> shared_ranges_;
  bool poisoning_ = false;
  std::unique_ptr<char[]> dynamic_shared_;
  size_t dynamic_shared_bytes_ = 0;
  const std::function<void()>* body_ = nullptr;
  std::string error_;
};

// The __shared__ variables of the kernels in the shared library that holds `anchor`: the
// writable function-local statics whose mangled names start with `prefix` (a namespace, e.g.
// "_ZZN4mcsc4cuda") and contain "_kernel", read from the library's ELF symbol table.
inline std::vector<std::pair<char*, size_t>> kernel_shared_memory(const void* anchor,
                                                                  const std::string& prefix) {
  Dl_info library;
  if (dladdr(anchor, &library) == 0 || library.dli_fname == nullptr) {
    throw KernelError("cuda_emulator: cannot find the library that holds the kernels");
  }
  std::ifstream file(library.dli_fname, std::ios::binary);
  const std::vector<char> bytes((std::istreambuf_iterator<char>(file)),
                                std::istreambuf_iterator<char>());
  if (bytes.size() < sizeof(Elf64_Ehdr) || std::memcmp(bytes.data(), ELFMAG, SELFMAG) != 0) {
    throw KernelError(std::string("cuda_emulator: not an ELF file: ") + library.dli_fname);
  }
  const auto* header = reinterpret_cast<const Elf64_Ehdr*>(bytes.data());
  const auto* sections = reinterpret_cast<const Elf64_Shdr*>(bytes.data() + header->e_shoff);
  std::vector<std::pair<char*, size_t>> ranges;
  for (int index = 0; index < header->e_shnum; ++index) {
    const Elf64_Shdr& table = sections[index];
    if (table.sh_type != SHT_SYMTAB) continue;
    const char* names = bytes.data() + sections[table.sh_link].sh_offset;
    const auto* symbols = reinterpret_cast<const Elf64_Sym*>(bytes.data() + table.sh_offset);
    for (size_t i = 0; i < table.sh_size / sizeof(Elf64_Sym); ++i) {
      const Elf64_Sym& symbol = symbols[i];
      if (ELF64_ST_TYPE(symbol.st_info) != STT_OBJECT || symbol.st_size == 0) continue;
      if (symbol.st_shndx == SHN_UNDEF || symbol.st_shndx >= header->e_shnum) continue;
      if ((sections[symbol.st_shndx].sh_flags & SHF_WRITE) == 0) continue;
      const std::string name = names + symbol.st_name;
      if (name.rfind(prefix, 0) != 0 || name.find("_kernel") == std::string::npos) continue;
      ranges.emplace_back(static_cast<char*>(library.dli_fbase) + symbol.st_value,
                          symbol.st_size);
    }
  }
  return ranges;
}

// Fills the __shared__ variables kernel_shared_memory(anchor, prefix) finds before each block
// from now on; returns how many bytes that covers (0 would mean the symbol table was stripped
// and nothing is poisoned).
inline int64_t poison_kernel_shared_memory(const void* anchor, const std::string& prefix) {
  auto ranges = kernel_shared_memory(anchor, prefix);
  int64_t bytes = 0;
  for (const auto& range : ranges) bytes += static_cast<int64_t>(range.second);
  Scheduler::instance().poison_shared_memory(std::move(ranges));
  return bytes;
}

// Runs kernel(args...) over a grid_x x grid_y grid of blocks of `threads` threads.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t grid_x, int64_t grid_y, int threads,
            bool descending, Args&&... args) {
  const std::function<void()> body = [&] { kernel(static_cast<Params>(args)...); };
  Scheduler::instance().launch(grid_x, grid_y, threads, descending, body);
}

// The same with `dynamic_shared_bytes` of dynamic shared memory per block (the third launch
// parameter of kernel<<<grid, block, bytes>>>), which the kernel declares with
// MCSC_DYNAMIC_SHARED_MEMORY (include/cuda/ptx.cuh).
template <typename... Params, typename... Args>
void launch_with_dynamic_shared(void (*kernel)(Params...), int64_t grid_x, int64_t grid_y,
                                int threads, size_t dynamic_shared_bytes, bool descending,
                                Args&&... args) {
  const std::function<void()> body = [&] { kernel(static_cast<Params>(args)...); };
  Scheduler::instance().launch(grid_x, grid_y, threads, descending, body, dynamic_shared_bytes);
}

template <typename T>
uint64_t to_bits(T value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(T));
  return value;
}

// What the tensor cores read of a TF32 operand: the upper 19 bits of its float32 pattern.
inline float tf32_operand(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  bits &= 0xffffe000u;
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

// Round to TF32 (10 explicit significand bits), to nearest with ties away from zero, as
// cvt.rna.tf32.f32 does; inf and NaN pass through.
inline float round_to_tf32(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7f800000u) == 0x7f800000u) return value;
  bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&value, &bits, sizeof(bits));
  return value;
}

inline void require_full_warp(unsigned mask, const char* function) {
  if (mask != 0xffffffffu) {
    Scheduler::instance().fail(std::string("cuda_emulator: ") + function +
                               " is only emulated for the full-warp mask 0xffffffff");
  }
}

}  // namespace cuda_emulator

#define threadIdx (::cuda_emulator::Scheduler::instance().current().thread_index)
#define blockIdx (::cuda_emulator::Scheduler::instance().block_index())

inline void __syncthreads() {
  ::cuda_emulator::Scheduler::instance().wait_at(::cuda_emulator::Wait::Block, 1, 0);
}

inline int __syncthreads_and(int predicate) {
  return static_cast<int>(::cuda_emulator::Scheduler::instance().wait_at(
      ::cuda_emulator::Wait::Block, predicate != 0, 0));
}

inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::cuda_emulator::require_full_warp(mask, "__syncwarp");
  ::cuda_emulator::Scheduler::instance().wait_at(::cuda_emulator::Wait::Warp, 0, 0);
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  ::cuda_emulator::require_full_warp(mask, "__shfl_xor_sync");
  const int lane = static_cast<int>(threadIdx.x) % ::cuda_emulator::kWarpSize;
  return ::cuda_emulator::from_bits<T>(::cuda_emulator::Scheduler::instance().wait_at(
      ::cuda_emulator::Wait::Warp, ::cuda_emulator::to_bits(value), lane ^ lane_mask));
}

// CUDA's min and max of two values of one type.
template <typename T>
T min(T a, T b) {
  return b < a ? b : a;
}

template <typename T>
T max(T a, T b) {
  return a < b ? b : a;
}
