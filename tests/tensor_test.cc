// model/tensor and model/dtype basics: owning vs viewing memory, slices, alignment, dtype names.
#include "model/tensor.h"

#include <gtest/gtest.h>

#include <cstdint>

namespace strata::model {
namespace {

TEST(Tensor, EmptyOwnsZeroedAlignedMemory) {
  Tensor t = Tensor::Empty({3, 5}, DType::kF32);
  EXPECT_TRUE(t.owning());
  EXPECT_EQ(t.numel(), 15);
  EXPECT_EQ(t.nbytes(), 60u);
  EXPECT_EQ(t.ndim(), 2);
  EXPECT_EQ(t.dim(1), 5);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 64, 0u);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(t.data<float>()[i], 0.f);
  EXPECT_EQ(t.ShapeString(), "[3, 5]");
  Tensor h = Tensor::Empty({7}, DType::kBF16);
  EXPECT_EQ(h.nbytes(), 14u);
}

TEST(Tensor, ViewSharesCallerMemory) {
  float buf[6] = {1, 2, 3, 4, 5, 6};
  Tensor v = Tensor::View(buf, {2, 3}, DType::kF32);
  EXPECT_FALSE(v.owning());
  v.data<float>()[4] = 50.f;
  EXPECT_EQ(buf[4], 50.f);
}

TEST(Tensor, SliceViewsARangeAndKeepsTheOwnerAlive) {
  Tensor s;
  {
    Tensor t = Tensor::Empty({10}, DType::kF32);
    for (int i = 0; i < 10; ++i) t.data<float>()[i] = static_cast<float>(i);
    s = t.Slice(4, {2, 3});
  }  // t is gone; the slice still holds the allocation
  EXPECT_EQ(s.numel(), 6);
  EXPECT_EQ(s.data<float>()[0], 4.f);
  EXPECT_EQ(s.data<float>()[5], 9.f);
}

TEST(Tensor, TypedAccessChecksTheDtype) {
  Tensor t = Tensor::Empty({2}, DType::kF16);
  EXPECT_NE(t.data<f16>(), nullptr);
  EXPECT_DEATH((void)t.data<float>(), "CHECK failed");
}

TEST(DType, NamesAndParsing) {
  EXPECT_EQ(DTypeSize(DType::kF32), 4u);
  EXPECT_EQ(DTypeSize(DType::kBF16), 2u);
  EXPECT_STREQ(DTypeName(DType::kF16), "fp16");
  EXPECT_EQ(*ParseDType("bf16"), DType::kBF16);
  EXPECT_EQ(*ParseDType("fp32"), DType::kF32);
  auto bad = ParseDType("fp8");
  ASSERT_FALSE(bad.ok());
  EXPECT_EQ(bad.status().code(), StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("fp8"), std::string::npos);
}

TEST(Status, OkIsCheapAndErrorsCarryContext) {
  Status ok;
  EXPECT_TRUE(ok.ok());
  EXPECT_EQ(ok.ToString(), "OK");
  Status e = InvalidArgument("model.heads: bad").WithContext("job.yaml");
  EXPECT_EQ(e.code(), StatusCode::kInvalidArgument);
  EXPECT_EQ(e.ToString(), "INVALID_ARGUMENT: job.yaml: model.heads: bad");
  Result<int> r = NotFound("x");
  EXPECT_FALSE(r.ok());
  Result<int> from_ok = Status::Ok();  // a value was forgotten: an internal error, not OK
  EXPECT_FALSE(from_ok.ok());
  EXPECT_EQ(from_ok.status().code(), StatusCode::kInternal);
  Result<int> v = 3;
  ASSERT_TRUE(v.ok());
  EXPECT_EQ(*v, 3);
}

}  // namespace
}  // namespace strata::model
