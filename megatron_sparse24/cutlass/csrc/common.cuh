// What every kernel of the library shares on the host side: the persistent tile scheduler's
// run-time options and the launch sequence with its return codes.
#pragma once

#include <cuda_runtime.h>

#include "cutlass/cutlass.h"

namespace sp24 {

// sched: bits 0-1 log2 of the swizzle width (1, 2, 4, 8 tiles), bits 2-3 the raster order
// (0 CUTLASS's heuristic, 1 along M, 2 along N); chosen per shape by the dispatchers.
template <class Kernel>
typename Kernel::TileSchedulerArguments scheduler_arguments(int sched) {
  using Raster = cutlass::gemm::kernel::detail::RasterOrderOptions;
  typename Kernel::TileSchedulerArguments args;
  args.max_swizzle_size = 1 << (sched & 3);
  int raster = (sched >> 2) & 3;
  args.raster_order = raster == 1 ? Raster::AlongM : raster == 2 ? Raster::AlongN : Raster::Heuristic;
  return args;
}

// Check, initialize and launch a CUTLASS device operator (a GEMM or a transform adapter).
// Return codes: 0 ok, 1 cannot implement (shape/alignment, or too little workspace), 2 initialize
// failed, 3 launch failed.
template <class Operator>
int launch(typename Operator::Arguments const& args, void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  Operator op;
  if (op.can_implement(args) != cutlass::Status::kSuccess) return 1;
  if (Operator::get_workspace_size(args) > workspace_bytes) return 1;
  if (op.initialize(args, workspace, stream) != cutlass::Status::kSuccess) return 2;
  if (op.run(stream) != cutlass::Status::kSuccess) return 3;
  return 0;
}
}  // namespace sp24
