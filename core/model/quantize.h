// `dsmoe quantize`: an 8-bit copy of a checkpoint in the Q8_0 layout (blocks of 32 int8 weights
// along a row, one F16 scale each, like llama.cpp's Q8_0), about half the bytes of BF16 per
// token. Every linear weight — attention projections, dense MLPs, shared and routed experts,
// the LM head — becomes an I8 tensor plus an F16 "<name>_scale" tensor [rows, cols / 32];
// embeddings, norms, biases and the routers (which decide routing) keep their dtype.
#pragma once

#include <cstdint>
#include <string>

#include "core/util/status.h"

namespace dsmoe {

struct QuantizeReport {
  int64_t quantized_tensors = 0;
  int64_t copied_tensors = 0;
  int64_t bytes_in = 0;   // tensor bytes read
  int64_t bytes_out = 0;  // tensor bytes written
};

// Reads the checkpoint in `in_dir` (any dtype) and writes the quantized one to `out_dir` as one
// model.safetensors, with config.json (plus "quantization_config"), generation_config.json and
// any tokenizer files copied over.
absl::StatusOr<QuantizeReport> QuantizeCheckpoint(const std::string& in_dir,
                                                  const std::string& out_dir);

// One row of n values (n a multiple of 32) → n int8 values and n/32 F16 scales.
void QuantizeRowQ8(const float* row, int64_t n, int8_t* values, uint16_t* scales);

}  // namespace dsmoe
