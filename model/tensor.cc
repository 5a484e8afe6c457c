#include "model/tensor.h"

#include <cstdlib>
#include <cstring>

namespace strata::model {

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

int64_t Tensor::numel() const { return NumElements(shape_); }

Tensor Tensor::Empty(std::vector<int64_t> shape, DType dtype) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  size_t bytes = t.nbytes();
  size_t rounded = (bytes + 63) / 64 * 64;
  if (rounded == 0) rounded = 64;
  void* p = std::aligned_alloc(64, rounded);
  CHECK_MSG(p != nullptr, "out of host memory");
  std::memset(p, 0, rounded);
  t.data_ = p;
  t.owner_ = std::shared_ptr<void>(p, [](void* q) { std::free(q); });
  return t;
}

Tensor Tensor::View(void* data, std::vector<int64_t> shape, DType dtype, Device device) {
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  t.data_ = data;
  return t;
}

Tensor Tensor::Slice(int64_t offset, std::vector<int64_t> shape) const {
  CHECK(offset >= 0 && offset + NumElements(shape) <= numel());
  Tensor t;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype_;
  t.device_ = device_;
  t.data_ = static_cast<char*>(data_) + static_cast<size_t>(offset) * DTypeSize(dtype_);
  t.owner_ = owner_;
  return t;
}

std::string Tensor::ShapeString() const {
  std::string s = "[";
  for (size_t i = 0; i < shape_.size(); ++i) {
    if (i) s += ", ";
    s += std::to_string(shape_[i]);
  }
  return s + "]";
}

}  // namespace strata::model
