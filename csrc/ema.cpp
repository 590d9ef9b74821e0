// torch binding for csrc/ema.cu: checks, data pointers, and the stream handle passed in
// from Python (torch.cuda.current_stream().cuda_stream), so no CUDA header is needed here.
#include <torch/extension.h>

#include <cstdint>
#include <optional>
#include <vector>

extern "C" int fastssl_ema_update(int ema_dtype, int online_dtype, int n, void* const* ema,
                                  const void* const* online, const int64_t* numel,
                                  double m_value, const double* m_ptr, void* stream);

namespace {

int dtype_code(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat: return 0;
    case at::kHalf: return 1;
    case at::kBFloat16: return 2;
    case at::kDouble: return 3;
    default: TORCH_CHECK(false, "fastssl EMA: unsupported dtype ", t.scalar_type());
  }
  return -1;
}

// ema <- m * ema + (1 - m) * online for one group of tensors sharing (ema dtype, online dtype),
// computed in the wider of the two (float64 where either is float64, else float32).
void ema_update(std::vector<at::Tensor> ema, std::vector<at::Tensor> online, double momentum,
                std::optional<at::Tensor> momentum_tensor, int64_t stream) {
  TORCH_CHECK(ema.size() == online.size(), "fastssl EMA: ", ema.size(), " teacher tensors but ",
              online.size(), " student tensors");
  if (ema.empty()) return;
  const int e_code = dtype_code(ema[0]);
  const int o_code = dtype_code(online[0]);
  std::vector<void*> e_ptr;
  std::vector<const void*> o_ptr;
  std::vector<int64_t> numel;
  for (size_t i = 0; i < ema.size(); ++i) {
    const at::Tensor& e = ema[i];
    const at::Tensor& o = online[i];
    TORCH_CHECK(e.is_cuda() && o.is_cuda() && e.device() == o.device(),
                "fastssl EMA: tensor ", i, " must be on one CUDA device");
    TORCH_CHECK(e.is_contiguous() && o.is_contiguous(), "fastssl EMA: tensor ", i,
                " must be contiguous");
    TORCH_CHECK(e.numel() == o.numel(), "fastssl EMA: tensor ", i, " sizes differ");
    TORCH_CHECK(dtype_code(e) == e_code && dtype_code(o) == o_code,
                "fastssl EMA: one call takes one (teacher, student) dtype pair");
    e_ptr.push_back(e.data_ptr());
    o_ptr.push_back(o.data_ptr());
    numel.push_back(e.numel());
  }
  const double* m_ptr = nullptr;
  if (momentum_tensor.has_value()) {
    const at::Tensor& m = *momentum_tensor;
    TORCH_CHECK(m.is_cuda() && m.device() == ema[0].device() && m.scalar_type() == at::kDouble &&
                    m.numel() == 1,
                "fastssl EMA: the momentum tensor must be one float64 on the tensors' GPU");
    m_ptr = m.data_ptr<double>();
  }
  const int err = fastssl_ema_update(e_code, o_code, static_cast<int>(e_ptr.size()), e_ptr.data(),
                                     o_ptr.data(), numel.data(), momentum, m_ptr,
                                     reinterpret_cast<void*>(stream));
  TORCH_CHECK(err == 0, "fastssl EMA: CUDA launch failed with error ", err);
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("ema_update", &ema_update, "multi-tensor EMA update (fastssl)");
}
