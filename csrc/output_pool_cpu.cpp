// Large CPU outputs (the gradients a fused loss hands to autograd) from a small pool of blocks kept
// after their tensors are freed.
//
// Why: glibc maps every allocation at or above its mmap threshold (which it raises to at most
// 32 MiB) afresh and unmaps it when it is freed, so an output of that size is faulted in page by
// page at every step: a fresh 32 MiB float32 tensor filled once took 16 ms against 1.1 ms for
// refilling a kept one (2-core AMD EPYC VM), more than the whole BYOL-PNR kernel that writes two
// of them. A training step frees its gradients (zero_grad(set_to_none=True), or autograd passing
// them on) before the next step asks for the same sizes again.
//
// What: a block of kPoolMinBytes or more whose tensor is freed goes back to the pool instead of the
// system; an allocation of exactly its size takes it. At most kPoolBlocks blocks and kPoolMaxBytes
// in all are kept (the least recently freed given back first), so the pool holds at most about what
// one step's outputs take. Smaller outputs come from torch's CPU allocator, as before.
// PNR_KERNELS_CPU_POOL=0 turns the pool off; release_output_pool() empties it.
#include "output_pool_cpu.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/accumulate.h>

#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <vector>

namespace pnr_kernels {
namespace {

constexpr size_t kPoolMinBytes = size_t(32) << 20;  // glibc's largest mmap threshold
constexpr size_t kPoolBlocks = 4;
constexpr size_t kPoolMaxBytes = size_t(1) << 30;

struct Block {
  void* data;
  size_t bytes;
};

class Pool {
 public:
  // A kept block of exactly `bytes`, or nullptr.
  void* take(size_t bytes) {
    std::lock_guard<std::mutex> lock(mutex_);
    for (auto it = free_.begin(); it != free_.end(); ++it) {
      if (it->bytes == bytes) {
        void* data = it->data;
        held_ -= bytes;
        free_.erase(it);
        return data;
      }
    }
    return nullptr;
  }

  void give_back(const Block& block) {
    std::vector<void*> release;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(block);
      held_ += block.bytes;
      while (free_.size() > kPoolBlocks || held_ > kPoolMaxBytes) {
        release.push_back(free_.front().data);
        held_ -= free_.front().bytes;
        free_.pop_front();
      }
    }
    for (void* data : release) c10::free_cpu(data);
  }

  size_t release_all() {
    std::deque<Block> release;
    size_t bytes = 0;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      release.swap(free_);
      bytes = held_;
      held_ = 0;
    }
    for (const Block& block : release) c10::free_cpu(block.data);
    return bytes;
  }

 private:
  std::mutex mutex_;
  std::deque<Block> free_;  // the least recently freed first
  size_t held_ = 0;
};

// Never destroyed: tensors freed during the process's exit still give their blocks back to it.
Pool& pool() {
  static Pool* const instance = new Pool();
  return *instance;
}

void give_back(void* context) {
  Block* block = static_cast<Block*>(context);
  pool().give_back(*block);
  delete block;
}

class PoolAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t bytes) override {
    if (bytes < kPoolMinBytes) return c10::GetCPUAllocator()->allocate(bytes);  // a resize to a small size
    void* data = pool().take(bytes);
    if (data == nullptr) data = c10::alloc_cpu(bytes);
    return {data, new Block{data, bytes}, &give_back, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};

bool pool_enabled() {
  static const bool enabled = [] {
    const char* value = std::getenv("PNR_KERNELS_CPU_POOL");
    return value == nullptr || std::strcmp(value, "0") != 0;
  }();
  return enabled;
}

}  // namespace

at::Tensor pooled_empty(at::IntArrayRef sizes, at::ScalarType dtype) {
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  if (bytes < kPoolMinBytes || !pool_enabled()) return at::empty(sizes, at::TensorOptions().dtype(dtype));
  static PoolAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU), dtype,
                                   std::nullopt);
}

int64_t release_output_pool() { return static_cast<int64_t>(pool().release_all()); }

}  // namespace pnr_kernels
