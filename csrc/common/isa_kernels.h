// Compiles the kernel header named by KX_ISA_KERNELS once per ISA level (see common/isa.h).
// Include it once per op translation unit, after every external header that op needs:
//
//   #include <ATen/Parallel.h>            // ... every system / torch header first
//   #include "common/isa.h"
//   #define KX_ISA_KERNELS "cpu/linear_attention_kernels.h"
//   #include "common/isa_kernels.h"
//   ... KX_ISA_CALL(chunk_forward<scalar_t>, ...) in the host code ...
//
// The kernel header has no include guard and includes nothing itself; it sees KX_ISA_LEVEL
// (0 baseline, 1 avx2, 2 avx512) and the vector helpers of common/simd.h at that level's width.
// Each copy sits in an anonymous namespace, so two ops may use the same kernel names.
#ifndef KX_ISA_KERNELS
#error "define KX_ISA_KERNELS to the kernel header before including common/isa_kernels.h"
#endif
#include <immintrin.h>
#include <cstdint>
#include <cstring>
#include <cmath>
#include <limits>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include "common/isa.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define KX_ISA_LEVEL 2
namespace kx { namespace isa_avx512 { namespace {
#include "common/simd.h"
#include KX_ISA_KERNELS
}}}  // namespace kx::isa_avx512::
#undef KX_ISA_LEVEL
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define KX_ISA_LEVEL 1
namespace kx { namespace isa_avx2 { namespace {
#include "common/simd.h"
#include KX_ISA_KERNELS
}}}  // namespace kx::isa_avx2::
#undef KX_ISA_LEVEL
#pragma GCC pop_options

#define KX_ISA_LEVEL 0
namespace kx { namespace isa_baseline { namespace {
#include "common/simd.h"
#include KX_ISA_KERNELS
}}}  // namespace kx::isa_baseline::
#undef KX_ISA_LEVEL
#undef KX_ISA_KERNELS
