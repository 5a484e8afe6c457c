// Tensor: a shape, an element type, a device and memory that it either owns or views.
//
// Owning tensors allocate 64-byte aligned memory; views share nothing but the pointer and are
// valid only while the owner lives. Tensors are contiguous, row-major.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "common/status.h"
#include "model/dtype.h"

namespace strata::model {

enum class Device { kCpu, kCuda };

class Tensor {
 public:
  Tensor() = default;

  // Allocates zero-initialised memory on the CPU.
  static Tensor Empty(std::vector<int64_t> shape, DType dtype);
  // Wraps memory owned by someone else.
  static Tensor View(void* data, std::vector<int64_t> shape, DType dtype,
                     Device device = Device::kCpu);

  const std::vector<int64_t>& shape() const { return shape_; }
  int64_t dim(int i) const { return shape_[static_cast<size_t>(i)]; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  bool owning() const { return owner_ != nullptr; }
  int64_t numel() const;
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }

  void* raw() { return data_; }
  const void* raw() const { return data_; }
  // Typed access; CHECKs that T matches dtype().
  template <typename T>
  T* data() {
    CHECK(DTypeOf<T>::value == dtype_);
    return static_cast<T*>(data_);
  }
  template <typename T>
  const T* data() const {
    CHECK(DTypeOf<T>::value == dtype_);
    return static_cast<const T*>(data_);
  }

  // A view of elements [offset, offset + numel(shape)) reshaped to `shape`. CHECKs bounds.
  Tensor Slice(int64_t offset, std::vector<int64_t> shape) const;
  std::string ShapeString() const;  // "[4, 128]"

 private:
  std::vector<int64_t> shape_;
  DType dtype_ = DType::kF32;
  Device device_ = Device::kCpu;
  void* data_ = nullptr;
  std::shared_ptr<void> owner_;
};

int64_t NumElements(const std::vector<int64_t>& shape);

}  // namespace strata::model
