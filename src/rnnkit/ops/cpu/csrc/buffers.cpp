// The per-call buffers (call_buffer, threads.h): large ones come from a small cache of blocks
// that earlier calls freed. A training loop asks for the same few sizes every step (gates_x,
// the saved gates, their gradient), and glibc returns freed large blocks to the system, so each
// step faulted the same memory in afresh: at LSTM 512->128, T=128, forward+backward, a B=8
// step took ~820 page faults and 1.8 ms of system time, a B=64 step ~2000 faults and 19 ms
// (measured here, the two threads together). Kept blocks are already mapped.
#include "threads.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>

#if defined(__linux__)
#include <sys/mman.h>
#endif
#include <pthread.h>

#include <cstdlib>
#include <deque>
#include <mutex>

namespace rnnkit_cpu {
namespace {

constexpr size_t kHugePage = size_t{2} << 20;
// Buffers from this size on go through the cache; malloc keeps smaller ones mapped itself.
constexpr size_t kSmallest = size_t{1} << 20;
// Freed blocks kept for reuse, at most; beyond it the oldest go back to the system.
constexpr size_t kKept = size_t{256} << 20;

struct Block {
  void* data;
  size_t capacity;  // a whole number of huge pages
};

// A c10::Allocator, so the tensors it backs are ordinary (resizable) CPU tensors. It reports
// to torch's memory profiler as torch's CPU allocator does: a block counts while a tensor
// holds it, not while it is kept.
class BlockCache final : public c10::Allocator {
 public:
  static BlockCache& instance();

  c10::DataPtr allocate(size_t bytes) override {
    const size_t capacity = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    void* data = reuse(capacity);
    if (data == nullptr) data = fresh(capacity);
    c10::profiledCPUMemoryReporter().New(data, bytes);
    return {data, new Block{data, capacity}, &give_back, c10::Device(c10::kCPU)};
  }

  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  // The most recently kept block of exactly this capacity (the likeliest still in cache),
  // or nullptr.
  void* reuse(size_t capacity) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = kept_.rbegin(); it != kept_.rend(); ++it) {
      if (it->capacity != capacity) continue;
      void* data = it->data;
      kept_.erase(std::next(it).base());
      kept_bytes_ -= capacity;
      return data;
    }
    return nullptr;
  }

  // A new block, 2 MiB-aligned; from 16 MiB on advised as transparent huge pages: under a
  // hypervisor each first touch of a 4 KiB page faults at about 1 us (a (100, 64, 2048) float
  // buffer took 13 ms to fill fresh, 2.4 ms advised). Where huge pages are off, nothing changes.
  static void* fresh(size_t capacity) {
    void* data = std::aligned_alloc(kHugePage, capacity);
    TORCH_CHECK(data != nullptr, "rnnkit: out of memory allocating ", capacity, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (capacity >= 8 * kHugePage) madvise(data, capacity, MADV_HUGEPAGE);
#endif
    return data;
  }

  static void give_back(void* context) {
    const Block* block = static_cast<const Block*>(context);
    c10::profiledCPUMemoryReporter().Delete(block->data);
    instance().keep(*block);
    delete block;
  }

  // Keeps the block, handing the oldest kept ones back to the system past kKept, so a
  // workload whose sizes changed does not hold on to the old ones.
  void keep(const Block& block) {
    std::deque<Block> released;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      kept_.push_back(block);
      kept_bytes_ += block.capacity;
      while (kept_bytes_ > kKept) {
        released.push_back(kept_.front());
        kept_bytes_ -= kept_.front().capacity;
        kept_.pop_front();
      }
    }
    for (const Block& old : released) std::free(old.data);
  }

  std::mutex mutex_;
  std::deque<Block> kept_;  // oldest first
  size_t kept_bytes_ = 0;
};

// Never destroyed: tensors may be freed during the interpreter's shutdown, after statics. A
// fork waits for the lock, so the child never inherits it held.
BlockCache& BlockCache::instance() {
  static BlockCache* const cache = [] {
    auto* made = new BlockCache();
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
    return made;
  }();
  return *cache;
}

}  // namespace

Tensor call_buffer(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  size_t elements = 1;
  for (const int64_t size : sizes) elements *= static_cast<size_t>(size);
  if (elements * opts.dtype().itemsize() < kSmallest) return at::empty(sizes, opts);
  return at::detail::empty_generic(sizes, &BlockCache::instance(),
                                   c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   opts.dtype().toScalarType(), std::nullopt);
}

}  // namespace rnnkit_cpu
