// perception_loop: a minimal perception loop on the perceiver-edge C API, from C++17.
//
// Loads the model from memory (the file read into a buffer, as firmware would embed it), sizes
// every buffer once from the model, then for each frame (a float32 .npy file in the model's
// input shape; `--repeat N` cycles through them N times) reads it into the input buffer, runs the
// model and prints one JSON line:
//
//   {"example": "cpp", "sample": "digit_3", "frame": 3, "class": 9, "score": 6.5,
//    "latency_us": 412, "outputs": {"logits": [...]}}
//
// `class` / `score` are the arg-max and maximum of the first output. Nothing is allocated
// inside the loop on this side. A summary (frames, latency p50 / max) goes to stderr.
//
//   usage: perception_loop [--threads N] [--repeat N] MODEL.onnx FRAME.npy...

#include "npy.h"
#include "perceiver_edge.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <fstream>
#include <iterator>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

// A failed pe_* call as an exception carrying the library's one-line message.
void check(pe_status status) {
  if (status != PE_OK) throw std::runtime_error(std::string(pe_status_name(status)) + ": " + pe_last_error());
}

struct ModelFree {
  void operator()(pe_model* m) const { pe_model_free(m); }
};
using ModelPtr = std::unique_ptr<pe_model, ModelFree>;

ModelPtr load_from_memory(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  if (!file) throw std::runtime_error(path + ": cannot open");
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  pe_model* m = nullptr;
  check(pe_model_load_from_memory(bytes.data(), bytes.size(), &m));
  return ModelPtr(m);  // the bytes are not needed any more
}

// One float32 tensor of the model with its caller-owned buffer.
struct Tensor {
  std::string name;
  std::vector<size_t> shape;
  std::vector<float> data;
};

Tensor describe(const pe_model* m, size_t i, bool input) {
  const char* name = nullptr;
  pe_dtype dtype = PE_DTYPE_UNKNOWN;
  size_t rank = 0, bytes = 0;
  check(input ? pe_model_input_name(m, i, &name) : pe_model_output_name(m, i, &name));
  check(input ? pe_model_input_dtype(m, i, &dtype) : pe_model_output_dtype(m, i, &dtype));
  check(input ? pe_model_input_rank(m, i, &rank) : pe_model_output_rank(m, i, &rank));
  check(input ? pe_model_input_byte_size(m, i, &bytes) : pe_model_output_byte_size(m, i, &bytes));
  if (dtype != PE_DTYPE_F32) throw std::runtime_error(std::string(name) + ": this example handles float32 only");
  Tensor t{name, std::vector<size_t>(rank), std::vector<float>(bytes / sizeof(float))};
  check(input ? pe_model_input_shape(m, i, t.shape.data(), rank) : pe_model_output_shape(m, i, t.shape.data(), rank));
  return t;
}

std::string sample_name(const std::string& path) {
  std::string base = path.substr(path.find_last_of('/') + 1);
  if (base.size() > 4 && base.compare(base.size() - 4, 4, ".npy") == 0) base.resize(base.size() - 4);
  base.erase(std::remove_if(base.begin(), base.end(), [](char c) { return c == '"' || c == '\\'; }), base.end());
  return base;
}

int run(int argc, char** argv) {
  size_t threads = 1, repeat = 1;
  std::vector<std::string> args(argv + 1, argv + argc);
  while (args.size() >= 2 && (args[0] == "--threads" || args[0] == "--repeat")) {
    (args[0] == "--threads" ? threads : repeat) = std::stoul(args[1]);
    args.erase(args.begin(), args.begin() + 2);
  }
  if (args.size() < 2) {
    std::fprintf(stderr, "usage: perception_loop [--threads N] [--repeat N] MODEL.onnx FRAME.npy...\n");
    return 2;
  }
  check(pe_set_threads(threads));
  ModelPtr model = load_from_memory(args[0]);

  size_t n_in = 0, n_out = 0;
  check(pe_model_input_count(model.get(), &n_in));
  check(pe_model_output_count(model.get(), &n_out));
  if (n_in != 1) throw std::runtime_error("this example feeds models with one input");
  Tensor input = describe(model.get(), 0, true);
  std::vector<Tensor> outputs;
  for (size_t k = 0; k < n_out; k++) outputs.push_back(describe(model.get(), k, false));

  // The run arguments point at the buffers above, built once.
  pe_input in{input.data.data(), input.data.size() * sizeof(float), PE_DTYPE_F32};
  std::vector<pe_output> out;
  for (Tensor& t : outputs) out.push_back(pe_output{t.data.data(), t.data.size() * sizeof(float), PE_DTYPE_F32});

  const std::vector<std::string> frames(args.begin() + 1, args.end());
  std::vector<double> latencies;
  latencies.reserve(frames.size() * repeat);
  char err[512];
  size_t frame = 0;
  for (size_t r = 0; r < repeat; r++) {
    for (const std::string& path : frames) {
      npy_info info;
      if (npy_read_f32(path.c_str(), input.data.data(), input.data.size(), &info, err, sizeof err) != 0)
        throw std::runtime_error(err);
      if (!std::equal(input.shape.begin(), input.shape.end(), info.shape, info.shape + info.rank))
        throw std::runtime_error(path + ": shape differs from the model's input");

      auto t0 = std::chrono::steady_clock::now();
      check(pe_model_run(model.get(), &in, 1, out.data(), out.size()));
      double us = std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
      latencies.push_back(us);

      const std::vector<float>& first = outputs[0].data;
      size_t best = static_cast<size_t>(std::max_element(first.begin(), first.end()) - first.begin());
      std::printf("{\"example\": \"cpp\", \"sample\": \"%s\", \"frame\": %zu, \"class\": %zu, \"score\": %.9g, "
                  "\"latency_us\": %.0f, \"outputs\": {",
                  sample_name(path).c_str(), frame++, best, static_cast<double>(first[best]), us);
      for (size_t k = 0; k < outputs.size(); k++) {
        std::printf("%s\"%s\": [", k ? ", " : "", outputs[k].name.c_str());
        for (size_t i = 0; i < outputs[k].data.size(); i++) {
          float v = outputs[k].data[i];
          if (std::isfinite(v))
            std::printf(i ? ", %.9g" : "%.9g", static_cast<double>(v));
          else
            std::printf(i ? ", null" : "null");
        }
        std::printf("]");
      }
      std::printf("}}\n");
    }
  }
  if (latencies.empty()) return 0;
  std::sort(latencies.begin(), latencies.end());
  std::fprintf(stderr, "perception_loop: %zu frames, %zu thread(s), latency p50 %.0f us, max %.0f us\n",
               latencies.size(), threads, latencies[latencies.size() / 2], latencies.back());
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "perception_loop: %s\n", e.what());
    return 1;
  }
}
