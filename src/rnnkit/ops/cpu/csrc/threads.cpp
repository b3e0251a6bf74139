// The per-step barrier's waiting (threads.h, StepBarrier): a bounded spin, then a futex sleep.
#include "threads.h"

#include <chrono>
#include <thread>

#if defined(__linux__)
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

namespace rnnkit_cpu {
namespace {

// How long a thread spins before it sleeps. Longer than the threads' usual difference in
// arrival at a step's end (a few microseconds: the split is even), far shorter than the
// scheduler's time slice (about 3 ms) that a spinning thread would wait out when its partner
// lost its core to another process.
constexpr auto kSpinFor = std::chrono::microseconds(50);

// When the last region whose threads slept in more than one step of 16 ended, on the steady
// clock (nanoseconds; 0: never). Shared by all calls of the process.
std::atomic<int64_t> contended_at{0};
constexpr auto kContendedFor = std::chrono::seconds(1);

// A sleep this long means the thread that others waited for had lost its core (the scheduler
// gives it back after a time slice of milliseconds). Shorter sleeps come from an uneven split
// of a large step (tens to hundreds of microseconds at H=1024) and say nothing about a
// competing load: counting them sent the next second's small calls to one thread on a quiet
// machine (LSTM B=1, H=128 after GRU at H=1024 in `rnnkit bench`: 2.9 ms instead of 1.4).
constexpr int64_t kDescheduledNs = 1000000;

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

static_assert(sizeof(std::atomic<uint32_t>) == sizeof(uint32_t), "the futex word is 32 bits");

inline void relax() {
#if defined(__x86_64__) || defined(__i386__)
  _mm_pause();
#elif defined(__aarch64__)
  asm volatile("yield");
#endif
}

}  // namespace

bool contended_recently() {
  const int64_t at = contended_at.load(std::memory_order_relaxed);
  return at != 0 && now_ns() - at < std::chrono::nanoseconds(kContendedFor).count();
}

void StepBarrier::report() const {
  const int64_t rounds = phase_.load(std::memory_order_relaxed);
  if (slept_.load(std::memory_order_relaxed) * 16 > rounds && rounds >= 16) {
    contended_at.store(now_ns(), std::memory_order_relaxed);
  }
}

StepBarrier*& current_barrier() {
  thread_local StepBarrier* barrier = nullptr;
  return barrier;
}

bool StepBarrier::spin(uint32_t phase) const {
  const auto until = std::chrono::steady_clock::now() + kSpinFor;
  while (true) {
    for (int i = 0; i < 64; ++i) {  // the clock read costs more than a round: one per 64
      if (phase_.load(std::memory_order_acquire) != phase) return true;
      relax();
    }
    if (std::chrono::steady_clock::now() >= until) return false;
  }
}

void StepBarrier::sleep(uint32_t phase) {
  // Announced before the last check: the last thread stores the phase, then reads sleepers_;
  // this thread counts itself, then reads the phase (both sequentially consistent), so either
  // it sees the new phase or the last thread sees it and wakes it.
  const int64_t start = now_ns();
  sleepers_.fetch_add(1, std::memory_order_seq_cst);
  while (phase_.load(std::memory_order_seq_cst) == phase) {
#if defined(__linux__)
    // Returns at once if the word is no longer `phase`; spurious wake-ups loop.
    syscall(SYS_futex, reinterpret_cast<uint32_t*>(&phase_), FUTEX_WAIT_PRIVATE, phase,
            nullptr, nullptr, 0);
#else
    std::this_thread::yield();
#endif
  }
  sleepers_.fetch_sub(1, std::memory_order_seq_cst);
  if (now_ns() - start >= kDescheduledNs) slept_.fetch_add(1, std::memory_order_relaxed);
}

void StepBarrier::wake() {
#if defined(__linux__)
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(&phase_), FUTEX_WAKE_PRIVATE, INT32_MAX,
          nullptr, nullptr, 0);
#endif
}

}  // namespace rnnkit_cpu
