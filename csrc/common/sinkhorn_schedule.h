// The eps-scaling schedule of batched Sinkhorn, in one place: the CPU kernel
// (csrc/cpu/sinkhorn.cpp), the CUDA kernel (csrc/cuda/sinkhorn_kernel.cuh) and, through
// kxkernels._C.sinkhorn_schedule(), the eager reference (kxkernels/ops/sinkhorn/reference.py)
// all read these numbers. Plain constexpr scalars, no includes: the CUDA kernel header is
// compiled standalone (nvcc, and g++ under tests/cuda/emu) with it.
//
// Each problem starts at eps_0 = max(max C - min C, eps) and multiplies eps by kEpsRatio after
// kStageSweeps sweeps, or earlier once its marginal error is below kStageTol, until it reaches
// the target eps; the sweeps at the target eps are over-relaxed by kOmega (Thibault et al. 2017;
// Lehmann et al. 2021).
#pragma once

namespace kx {
namespace sinkhorn_schedule {

constexpr double kEpsRatio = 0.25;  // eps_{k+1} = max(kEpsRatio * eps_k, eps)
constexpr int kStageSweeps = 2;     // sweeps per intermediate eps at most ...
constexpr double kStageTol = 0.1;   // ... fewer once the marginal error is below this
constexpr double kOmega = 1.8;      // over-relaxation at the final eps

}  // namespace sinkhorn_schedule
}  // namespace kx
