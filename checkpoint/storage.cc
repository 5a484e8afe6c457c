#include <fmt/format.h>

#include <vector>

#include "checkpoint/storage_internal.h"

namespace strata::checkpoint {

Storage::Storage(std::shared_ptr<rocksdb::FileSystem> fs)
    : fs_(std::move(fs)), env_(rocksdb::NewCompositeEnv(fs_)) {}

std::shared_ptr<Storage> StorageOn(std::shared_ptr<rocksdb::FileSystem> fs) {
  return std::make_shared<Storage>(std::move(fs));
}

std::shared_ptr<Storage> DefaultStorage() {
  static const std::shared_ptr<Storage> kDefault = StorageOn(rocksdb::FileSystem::Default());
  return kDefault;
}

Status CreateDirs(rocksdb::FileSystem* fs, const std::string& path) {
  for (size_t at = 1; at <= path.size(); ++at) {
    if (at != path.size() && path[at] != '/') continue;
    const std::string dir = path.substr(0, at);
    rocksdb::IOStatus s = fs->CreateDirIfMissing(dir, rocksdb::IOOptions(), nullptr);
    if (!s.ok()) return FromIo(s, "create " + dir);
  }
  return Status::Ok();
}

Status RemoveTree(rocksdb::FileSystem* fs, const std::string& path) {
  const rocksdb::IOOptions io;
  if (fs->FileExists(path, io, nullptr).IsNotFound()) return Status::Ok();
  bool is_dir = false;
  rocksdb::IOStatus s = fs->IsDirectory(path, io, &is_dir, nullptr);
  if (!s.ok()) return FromIo(s, path);
  if (!is_dir) return FromIo(fs->DeleteFile(path, io, nullptr), "delete " + path);
  std::vector<std::string> children;
  s = fs->GetChildren(path, io, &children, nullptr);
  if (!s.ok()) return FromIo(s, path);
  for (const std::string& c : children) {
    if (c == "." || c == "..") continue;
    RETURN_IF_ERROR(RemoveTree(fs, path + "/" + c));
  }
  return FromIo(fs->DeleteDir(path, io, nullptr), "delete " + path);
}

}  // namespace strata::checkpoint
