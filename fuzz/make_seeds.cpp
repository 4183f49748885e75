// Writes the seed corpus of step_metadata_fuzz (fuzz/corpus/step_metadata/): real encoded
// StepMetadata values, from empty to every operation kind. Run by scripts/fuzz.sh --seeds;
// the output is committed, so a fuzz run starts from valid messages.
#include <cstdio>
#include <fstream>
#include <string>

#include "kvbm/connector_ops.h"

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s OUT_DIR\n", argv[0]);
    return 2;
  }
  using namespace kvbm;
  auto write = [&](const std::string& name, const StepMetadata& m) {
    std::ofstream(std::string(argv[1]) + "/" + name, std::ios::binary) << EncodeStepMetadata(m);
  };
  write("empty.bin", StepMetadata{});
  StepMetadata sized{.step = 7, .host_blocks = 1000, .disk_blocks = 50000};
  write("sized.bin", sized);
  StepMetadata all = sized;
  for (uint8_t k = 0; k <= kMaxOpKind; ++k) {
    TransferOp op{
        .id = 100u + k, .kind = static_cast<OpKind>(k), .request_id = "req-" + std::to_string(k)};
    for (uint32_t b = 0; b < 3; ++b)
      op.blocks.push_back({b, 10 + b, 0x9E3779B97F4A7C15ull * (b + 1)});
    write("op_kind_" + std::to_string(k) + ".bin",
          StepMetadata{.step = 1, .host_blocks = 8, .disk_blocks = 8, .ops = {op}});
    all.ops.push_back(op);
  }
  all.ops[3].blocks[1].src = kNoBlock;  // a load that cannot be served
  all.finished_while_loading = {"req-3", "aborted"};
  write("all_ops.bin", all);
  return 0;
}
