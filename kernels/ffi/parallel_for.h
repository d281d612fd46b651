// ParallelFor: work items [0, count) shared by the calling thread and helpers on XLA:CPU's intra-op pool.
//
// Items are claimed one at a time. The caller never waits for a helper that has not started (the pool may be
// busy, or be this very thread): it runs every unclaimed item itself and then waits only for items in
// progress. Late helpers find nothing left and return; the shared state outlives them.

#ifndef PANGU_KERNELS_FFI_PARALLEL_FOR_H_
#define PANGU_KERNELS_FFI_PARALLEL_FOR_H_

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>

#include "xla/ffi/api/ffi.h"

namespace pangu_kernels {

struct ParallelForState {
  std::function<void(int64_t)> body;
  int64_t count;
  std::atomic<int64_t> next{0};
  int64_t running = 0;
  std::mutex mutex;
  std::condition_variable idle;

  void Work() {
    while (true) {
      {
        std::lock_guard<std::mutex> lock(mutex);
        ++running;
      }
      const int64_t item = next.fetch_add(1);
      if (item < count) body(item);
      std::lock_guard<std::mutex> lock(mutex);
      if (--running == 0) idle.notify_all();
      if (item >= count) return;
    }
  }
};

// Runs body(i) for every i in [0, count), on at most `threads` threads (the caller included).
inline void ParallelFor(xla::ffi::ThreadPool& pool, int64_t count, int64_t threads,
                        std::function<void(int64_t)> body) {
  threads = std::min<int64_t>({threads, pool.num_threads(), count});
  if (threads <= 1) {
    for (int64_t i = 0; i < count; ++i) body(i);
    return;
  }
  auto state = std::make_shared<ParallelForState>();
  state->body = std::move(body);
  state->count = count;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([state] { state->Work(); });
  state->Work();
  std::unique_lock<std::mutex> lock(state->mutex);
  state->idle.wait(lock, [&] { return state->running == 0; });
}

// Threads worth using for work of size `work` (bytes per item, entries per call...): one below `min_work`,
// where scheduling costs more than it saves, else the pool (ParallelFor caps it at the item count).
inline int64_t ThreadsWorth(xla::ffi::ThreadPool& pool, int64_t work, int64_t min_work) {
  return work < min_work ? 1 : pool.num_threads();
}

}  // namespace pangu_kernels

#endif  // PANGU_KERNELS_FFI_PARALLEL_FOR_H_
