// Multi-tensor momentum (EMA) update:  ema <- m * ema + (1 - m) * online
//
// Plain CUDA (only the CUDA runtime and its fp16/bf16 headers), so that it compiles where
// torch ships no CUDA headers. The torch binding (ema.cpp) passes raw pointers, sizes and
// the stream. One launch covers up to kMaxBlocks chunks of kChunk elements drawn from up to
// kMaxTensors tensors; the tensor list travels in the kernel's parameter space (no host to
// device copy), so the update can be captured in a CUDA graph. Arithmetic is in the wider
// of the two dtypes and at least fp32 (Acc<TE, TO>: fp64 where either tensor is fp64, fp32
// otherwise), with one rounding to the teacher's dtype; loads and stores are 16-byte
// vectors where both pointers allow it. The momentum is either a value or a pointer to one
// fp64 on the device (read by every thread: no host sync).
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

// The arithmetic type of a (teacher, student) pair: double if either is double, else float.
template <typename TE, typename TO> struct Acc { using type = float; };
template <typename TO> struct Acc<double, TO> { using type = double; };
template <typename TE> struct Acc<TE, double> { using type = double; };
template <> struct Acc<double, double> { using type = double; };

// Widening is exact (every fp16/bf16/fp32 value is a float and a double).
template <typename A> __device__ __forceinline__ A widen(float x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A widen(double x) { return static_cast<A>(x); }
template <typename A> __device__ __forceinline__ A widen(__half x) {
  return static_cast<A>(__half2float(x));
}
template <typename A> __device__ __forceinline__ A widen(__nv_bfloat16 x) {
  return static_cast<A>(__bfloat162float(x));
}

// Narrowing rounds once, to nearest even (a double goes straight to fp16/bf16: rounding it
// through float first could round twice).
template <typename T> __device__ __forceinline__ T narrow(float x);
template <> __device__ __forceinline__ float narrow<float>(float x) { return x; }
template <> __device__ __forceinline__ __half narrow<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}
template <typename T> __device__ __forceinline__ T narrow(double x);
template <> __device__ __forceinline__ double narrow<double>(double x) { return x; }
template <> __device__ __forceinline__ float narrow<float>(double x) { return __double2float_rn(x); }
template <> __device__ __forceinline__ __half narrow<__half>(double x) { return __double2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 narrow<__nv_bfloat16>(double x) {
  return __double2bfloat16(x);
}

__device__ __forceinline__ float fma_acc(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double fma_acc(double a, double b, double c) { return fma(a, b, c); }

template <typename T, int N> struct alignas(sizeof(T) * N) Vec { T v[N]; };

template <typename TE, typename TO>
__global__ void __launch_bounds__(kThreads) ema_kernel(Meta meta, double m_value, const double* m_ptr) {
  using A = typename Acc<TE, TO>::type;
  constexpr int kVec = 16 / (sizeof(TE) > sizeof(TO) ? sizeof(TE) : sizeof(TO));
  // m in the arithmetic type (an fp32 pair rounds it to float once), w = 1 - m in it too.
  const A m = static_cast<A>(m_ptr != nullptr ? *m_ptr : m_value);
  const A w = static_cast<A>(1) - m;
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
        ev.v[j] = narrow<TE>(fma_acc(m, widen<A>(ev.v[j]), w * widen<A>(ov.v[j])));
      }
      reinterpret_cast<Vec<TE, kVec>*>(e)[i] = ev;
    }
    done = nvec * kVec;
  }
  for (int64_t i = done + threadIdx.x; i < len; i += blockDim.x) {
    e[i] = narrow<TE>(fma_acc(m, widen<A>(e[i]), w * widen<A>(o[i])));
  }
}

template <typename TE, typename TO>
int launch_all(int n, void* const* ema, const void* const* online, const int64_t* numel,
               double m_value, const double* m_ptr, cudaStream_t stream) {
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
                    const int64_t* numel, double m_value, const double* m_ptr, cudaStream_t s) {
  switch (online_dtype) {
    case 0: return launch_all<TE, float>(n, ema, online, numel, m_value, m_ptr, s);
    case 1: return launch_all<TE, __half>(n, ema, online, numel, m_value, m_ptr, s);
    case 2: return launch_all<TE, __nv_bfloat16>(n, ema, online, numel, m_value, m_ptr, s);
    case 3: return launch_all<TE, double>(n, ema, online, numel, m_value, m_ptr, s);
    default: return -1;
  }
}

}  // namespace

// dtype codes: 0 float32, 1 float16, 2 bfloat16, 3 float64. Returns 0 or a cudaError_t (-1: bad dtype).
extern "C" int fastssl_ema_update(int ema_dtype, int online_dtype, int n, void* const* ema,
                                  const void* const* online, const int64_t* numel,
                                  double m_value, const double* m_ptr, void* stream) {
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (ema_dtype) {
    case 0: return dispatch_online<float>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    case 1: return dispatch_online<__half>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    case 2:
      return dispatch_online<__nv_bfloat16>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    case 3: return dispatch_online<double>(online_dtype, n, ema, online, numel, m_value, m_ptr, s);
    default: return -1;
  }
}
