// Device queries of the CUDA launch code, cached per device (and per kernel and block size
// for the occupancy): cudaDeviceGetAttribute and the occupancy calculator cost microseconds
// per call, about what the small kernels they size run for, and their answers never change
// for a device.  Shared by every family's CUDA code; host only.
#pragma once

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <map>
#include <mutex>
#include <tuple>

namespace q2ext {

namespace device_cache_detail {
// One map for every query; an uncontended lock is tens of nanoseconds.
inline std::mutex& mutex() {
  static std::mutex m;
  return m;
}
using Key = std::tuple<const void*, int, int>;  // (kernel or nullptr, attribute or block, device)
inline std::map<Key, int>& values() {
  static std::map<Key, int> v;
  return v;
}
template <typename Query>
int cached(const Key& key, Query&& query) {
  {
    std::lock_guard<std::mutex> lock(mutex());
    const auto it = values().find(key);
    if (it != values().end()) return it->second;
  }
  const int v = query();  // outside the lock: a failing query throws without holding it
  std::lock_guard<std::mutex> lock(mutex());
  values().emplace(key, v);
  return v;
}
}  // namespace device_cache_detail

inline int device_attribute(cudaDeviceAttr attr, int device) {
  return device_cache_detail::cached({nullptr, static_cast<int>(attr), device}, [&] {
    int v = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&v, attr, device));
    return v;
  });
}

inline int device_sm_count(int device) {
  return device_attribute(cudaDevAttrMultiProcessorCount, device);
}

inline int device_cc_major(int device) {
  return device_attribute(cudaDevAttrComputeCapabilityMajor, device);
}

// Resident blocks per SM of `kernel` launched with `block` threads and no dynamic shared
// memory, on `device` (the current device: callers hold a CUDAGuard for it); at least 1.
template <typename Kernel>
int kernel_blocks_per_sm(Kernel kernel, int block, int device) {
  const void* k = reinterpret_cast<const void*>(kernel);
  return device_cache_detail::cached({k, block, device}, [&] {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, block, 0));
    return per_sm > 1 ? per_sm : 1;
  });
}

}  // namespace q2ext
