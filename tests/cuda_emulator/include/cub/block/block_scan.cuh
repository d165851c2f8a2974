// Stands in for CUB's BlockScan with the part of its contract the kernels use: every
// thread of the block calls ExclusiveSum, and the temporary storage may be reused only
// after a __syncthreads (the emulator therefore adds none at the end, as CUB adds none).
#pragma once

#include "../../emulator.h"

namespace cub {

template <typename T, int BLOCK_DIM_X>
class BlockScan {
 public:
  struct TempStorage {
    T items[BLOCK_DIM_X];
  };

  explicit BlockScan(TempStorage& storage) : storage_(storage) {}

  void ExclusiveSum(T input, T& output, T& block_aggregate) {
    const int tid = static_cast<int>(threadIdx.x);
    storage_.items[tid] = input;
    __syncthreads();
    T sum{};
    for (int i = 0; i < tid; ++i) sum += storage_.items[i];
    output = sum;
    for (int i = tid; i < BLOCK_DIM_X; ++i) sum += storage_.items[i];
    block_aggregate = sum;
  }

 private:
  TempStorage& storage_;
};

}  // namespace cub
