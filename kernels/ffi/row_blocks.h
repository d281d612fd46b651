// ForRowBlocks: a few query rows at a time, the count a compile-time constant so accumulators stay in registers.

#ifndef PANGU_KERNELS_FFI_ROW_BLOCKS_H_
#define PANGU_KERNELS_FFI_ROW_BLOCKS_H_

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace pangu_kernels {

// Calls body(r0, rows) for each block of up to 4 rows from r0, rows a std::integral_constant<int, R>.
template <class Body>
void ForRowBlocks(int64_t rows, Body body) {
  for (int64_t r0 = 0; r0 < rows; r0 += 4) {
    switch (std::min<int64_t>(4, rows - r0)) {
      case 1: body(r0, std::integral_constant<int, 1>{}); break;
      case 2: body(r0, std::integral_constant<int, 2>{}); break;
      case 3: body(r0, std::integral_constant<int, 3>{}); break;
      default: body(r0, std::integral_constant<int, 4>{}); break;
    }
  }
}

}  // namespace pangu_kernels

#endif  // PANGU_KERNELS_FFI_ROW_BLOCKS_H_
