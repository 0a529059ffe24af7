// edgetk TVM runner: loads a TVM library exported by `edgetk export --format tvm`, runs its Relax VM
// "main" on tensors read from files and writes the outputs to files. Cross-compiled for the device
// (aarch64-linux-gnu-g++ ... -Wl,--no-as-needed -ltvm_runtime -ltvm_ffi) by edgetk.devices.tvm_aarch64.
//
//   tvm_runner LIB IN_DIR OUT_DIR [REPEAT]
//
// IN_DIR/inputs.txt : one line per input "DTYPE NDIM D0 .. Dn-1 FILE" (FILE: raw little-endian bytes in IN_DIR)
// OUT_DIR/outputs.txt: the same format for every output (tuples flattened), files out_<i>.bin in OUT_DIR.
// stdout: one JSON line {"load_ms": .., "run_ms": [..], "outputs": N}; REPEAT (default 1) runs of main.
#include <dlpack/dlpack.h>
#include <tvm/ffi/any.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/dtype.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;
using ffi::Tensor;

// Host memory for input tensors (64-byte aligned, as TVM's kernels assume).
struct CPUAlloc {
  void AllocData(DLTensor* t) {
    size_t n = std::max<size_t>(ffi::GetDataSize(*t), 1);
    t->data = std::aligned_alloc(64, (n + 63) / 64 * 64);
  }
  void FreeData(DLTensor* t) { std::free(t->data); }
};

static size_t NumBytes(const Tensor& t) { return ffi::GetDataSize(*t.GetDLTensorPtr()); }

static std::vector<Tensor> ReadInputs(const std::string& dir) {
  std::ifstream spec(dir + "/inputs.txt");
  if (!spec) throw std::runtime_error("cannot open " + dir + "/inputs.txt");
  std::vector<Tensor> out;
  std::string line;
  DLDevice cpu{kDLCPU, 0};
  while (std::getline(spec, line)) {
    if (line.empty()) continue;
    std::istringstream ls(line);
    std::string dtype, file;
    int ndim = 0;
    ls >> dtype >> ndim;
    std::vector<int64_t> shape(ndim);
    for (int i = 0; i < ndim; ++i) ls >> shape[i];
    ls >> file;
    Tensor t = Tensor::FromNDAlloc(CPUAlloc(), ffi::Shape(shape), ffi::StringToDLDataType(dtype), cpu);
    std::ifstream f(dir + "/" + file, std::ios::binary);
    std::vector<char> buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (buf.size() != NumBytes(t)) throw std::runtime_error("input " + file + ": wrong byte count");
    std::memcpy(t.data_ptr(), buf.data(), buf.size());
    out.push_back(t);
  }
  return out;
}

static void Flatten(const ffi::Any& v, std::vector<Tensor>* out) {
  if (auto t = v.as<Tensor>()) {
    out->push_back(*t);
  } else if (auto arr = v.as<ffi::Array<ffi::Any>>()) {
    for (const ffi::Any& e : *arr) Flatten(e, out);
  } else {
    throw std::runtime_error("main returned something that is not a tensor or a tuple of tensors");
  }
}

static void WriteOutputs(const std::string& dir, const std::vector<Tensor>& outs) {
  std::ofstream spec(dir + "/outputs.txt");
  for (size_t i = 0; i < outs.size(); ++i) {
    const DLTensor* t = outs[i].GetDLTensorPtr();
    std::string file = "out_" + std::to_string(i) + ".bin";
    if (t->device.device_type != kDLCPU) throw std::runtime_error("output is not on the CPU");
    std::ofstream f(dir + "/" + file, std::ios::binary);
    f.write(static_cast<const char*>(t->data) + t->byte_offset, static_cast<std::streamsize>(ffi::GetDataSize(*t)));
    spec << std::string(ffi::DLDataTypeToString(t->dtype)) << " " << t->ndim;
    for (int d = 0; d < t->ndim; ++d) spec << " " << t->shape[d];
    spec << " " << file << "\n";
  }
}

static double Ms(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double, std::milli>(b - a).count();
}

int main(int argc, char** argv) {
  if (argc < 4) {
    std::cerr << "usage: " << argv[0] << " LIB IN_DIR OUT_DIR [REPEAT]\n";
    return 2;
  }
  int repeat = argc > 4 ? std::max(1, std::atoi(argv[4])) : 1;
  try {
    auto t0 = std::chrono::steady_clock::now();
    ffi::Module lib = ffi::Module::LoadFromFile(argv[1]);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    const int kPooled = 2;  // VirtualMachine.POOLED_ALLOCATOR
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooled);
    ffi::Function main_fn = vm->GetFunction("main").value();
    std::vector<Tensor> inputs = ReadInputs(argv[2]);
    auto t1 = std::chrono::steady_clock::now();
    std::vector<ffi::AnyView> args(inputs.begin(), inputs.end());
    ffi::Any ret;
    std::vector<double> run_ms;
    for (int r = 0; r < repeat; ++r) {
      auto a = std::chrono::steady_clock::now();
      main_fn.CallPacked(args.data(), static_cast<int32_t>(args.size()), &ret);
      run_ms.push_back(Ms(a, std::chrono::steady_clock::now()));
    }
    std::vector<Tensor> outs;
    Flatten(ret, &outs);
    WriteOutputs(argv[3], outs);
    std::cout << "{\"load_ms\": " << Ms(t0, t1) << ", \"run_ms\": [";
    for (size_t i = 0; i < run_ms.size(); ++i) std::cout << (i ? ", " : "") << run_ms[i];
    std::cout << "], \"outputs\": " << outs.size() << "}" << std::endl;
  } catch (const std::exception& e) {
    std::cerr << "tvm_runner: " << e.what() << std::endl;
    return 1;
  }
  return 0;
}
