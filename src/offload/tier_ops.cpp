#include "kvbm/tier_ops.h"

namespace kvbm {

const char* OpKindName(OpKind kind) {
  switch (kind) {
    case OpKind::kStoreHost: return "store_host";
    case OpKind::kStoreDisk: return "store_disk";
    case OpKind::kOffloadDisk: return "offload_disk";
    case OpKind::kLoadHost: return "load_host";
    case OpKind::kLoadDisk: return "load_disk";
    case OpKind::kPromoteHost: return "promote_host";
    case OpKind::kFetchRemote: return "fetch_remote";
    case OpKind::kOffloadRemote: return "offload_remote";
  }
  return "unknown";
}

}  // namespace kvbm
