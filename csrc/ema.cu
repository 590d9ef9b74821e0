// Multi-tensor momentum (EMA) update:  ema <- m * ema + (1 - m) * online
//
// Plain CUDA (only the CUDA runtime and its fp16/bf16 headers), so that it compiles where
// torch ships no CUDA headers. The torch binding (ema.cpp) passes raw pointers, sizes and
// the stream. One launch covers up to kMaxBlocks chunks of kChunk elements drawn from up to
// kMaxTensors tensors; the tensor list travels in the kernel's parameter space (no host to
// device copy), so the update can be captured in a CUDA graph. Arithmetic is fp32; loads
// and stores are 16-byte vectors where both pointers allow it. The momentum is either a
// value or a pointer to one fp32 on the device (read by every thread: no host sync).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

constexpr int kMaxTensors = 48;
constexpr int kMaxBlocks = 320;
constexpr int64_t kChunk = 1 << 16;
constexpr int kThreads = 512;

struct Meta {
  void* ema[kMaxTensors];
  const void* online[kMaxTensors];
  int64_t numel[kMaxTensors];
  int32_t tensor_of_block[kMaxBlocks];
  int32_t chunk_of_block[kMaxBlocks];
};

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename TE, typename TO>
__global__ void __launch_bounds__(kThreads) ema_kernel(Meta meta, float m_value, const float* m_ptr) {
  constexpr int kVec = 16 / (sizeof(TE) > sizeof(TO) ? sizeof(TE) : sizeof(TO));
  const float m = m_ptr != nullptr ? *m_ptr : m_value;
  const float w = 1.0f - m;
  const int t = meta.tensor_of_block[blockIdx.x];
  const int64_t start = static_cast<int64_t>(meta.chunk_of_block[blockIdx.x]) * kChunk;
  const int64_t n = meta.numel[t];
  const int64_t end = start + kChunk < n ? start + kChunk : n;
  TE* e = static_cast<TE*>(meta.ema[t]) + start;
  const TO* o = static_cast<const TO*>(meta.online[t]) + start;
  const int64_t len = end - start;
  int64_t done = 0;
  const bool aligned = reinterpret_cast<uintptr_t>(e) % (sizeof(TE) * kVec) == 0 &&
                       reinterpret_cast<uintptr_t>(o) % (sizeof(TO) * kVec) == 0;
  if (aligned) {
    const int64_t nvec = len / kVec;
    for (int64_t i = threadIdx.x; i < nvec; i += blockDim.x) {
      Vec<TE, kVec> ev = reinterpret_cast<const Vec<TE, kVec>*>(e)[i];
      const Vec<TO, kVec> ov = reinterpret_cast<const Vec<TO, kVec>*>(o)[i];
#pragma unroll
      for (int j = 0; j < kVec; ++j) {
        ev.v[j] = from_float<TE>(fmaf(m, to_float(ev.v[j]), w * to_float(ov.v[j])));
      }
      reinterpret_cast<Vec<TE, kVec>*>(e)[i] = ev;
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    e[i] = from_float<TE>(fmaf(m, to_float(e[i]), w * to_float(o[i])));
  }
}

template <typename TE, typename TO>
int launch_all(int n, void* const* ema, const void* const* online, const int64_t* numel,
               float m_value, const float* m_ptr, cudaStream_t stream) {
  Meta meta;
  int tensors = 0, blocks = 0;
  for (int t = 0; t < n; ++t) {
    if (numel[t] == 0) continue;
    const int64_t chunks = (numel[t] + kChunk - 1) / kChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      if (c == 0 || blocks == 0) {
        // A tensor enters the current list when it starts, or again after a launch.
        if (tensors == kMaxTensors) {
          ema_kernel<TE, TO><<<blocks, kThreads, 0, stream>>>(meta, m_value, m_ptr);
          tensors = 0;
          blocks = 0;
        }
        meta.ema[tensors] = ema[t];
        meta.online[tensors] = online[t];
        meta.numel[tensors] = numel[t];
        ++tensors;
      }
      meta.tensor_of_block[blocks] = tensors - 1;
      meta.chunk_of_block[blocks] = static_cast<int32_t>(c);
      ++blocks;
      if (blocks == kMaxBlocks) {
        ema_kernel<TE, TO><<<blocks, kThreads, 0, stream>>>(meta, m_value, m_ptr);
        blocks = 0;
        tensors = 0;
      }
    }
  }
  if (blocks > 0) {
    ema_kernel<TE, TO><<<blocks, kThreads, 0, stream>>>(meta, m_value, m_ptr);
  }
  return static_cast<int>(cudaGetLastError());
}

template <typename TE>
int dispatch_online(int online_dtype, int n, void* const* ema, const void* const* online,
                    const int64_t* numel, float m_value, const float* m_ptr, cudaStream_t s) {
  switch (online_dtype) {
    case 0: return launch_all<TE, float>(n, ema, online, numel, m_value, m_ptr, s);
    case 1: return launch_all<TE, __half>(n, ema, online, numel, m_value, m_ptr, s);
    case 2: return launch_all<TE, __nv_bfloat16>(n, ema, online, numel, m_value, m_ptr, s);
    default: return -1;
  }
}

}  // namespace

// dtype codes: 0 float32, 1 float16, 2 bfloat16. Returns 0 or a cudaError_t (-1: bad dtype).
extern "C" int fastssl_ema_update(int ema_dtype, int online_dtype, int n, void* const* ema,
                                  const void* const* online, const int64_t* numel,
                                  float m_value, const float* m_ptr, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (ema_dtype) {
    case 0: return dispatch_online<float>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    case 1: return dispatch_online<__half>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    case 2:
      return dispatch_online<__nv_bfloat16>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    default: return -1;
  }
}
