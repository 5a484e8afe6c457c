#include "comm/store.h"

#include <fcntl.h>
#include <sys/file.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cerrno>
#include <condition_variable>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <thread>

#include "comm/backend_util.h"
#include "comm/store_util.h"

namespace strata::comm {

Status StoreKeyTimeout(const std::vector<std::string>& missing, std::chrono::milliseconds timeout) {
  std::string keys;
  for (size_t i = 0; i < missing.size() && i < 8; ++i) {
    keys += i ? ", '" : "'";
    keys += missing[i];
    keys += '\'';
  }
  if (missing.size() > 8) keys += ", ... (" + std::to_string(missing.size()) + " keys)";
  return Status(StatusCode::kDeadlineExceeded,
                "store: key" + std::string(missing.size() > 1 ? "s " : " ") + keys +
                    " not set after " + std::to_string(timeout.count()) + " ms");
}

Result<int64_t> ParseStoreCounter(const std::string& key, const std::string& v) {
  if (v.empty()) return int64_t{0};
  try {
    size_t used = 0;
    const long long x = std::stoll(v, &used);
    if (used == v.size()) return static_cast<int64_t>(x);
  } catch (const std::exception&) {
  }
  return InvalidArgument("store: Add on key '" + key + "' whose value is not an integer");
}

namespace {

class HashStore final : public Store {
 public:
  Status Set(const std::string& key, const std::string& value) override {
    std::lock_guard<std::mutex> lock(mu_);
    map_[key] = value;
    cv_.notify_all();
    return Status();
  }

  Result<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    if (!cv_.wait_until(lock, internal::DeadlineAfter(timeout),
                        [&] { return map_.count(key) > 0; })) {
      return StoreKeyTimeout({key}, timeout);
    }
    return map_[key];
  }

  Status Wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    std::unique_lock<std::mutex> lock(mu_);
    auto all = [&] {
      for (const auto& k : keys) {
        if (!map_.count(k)) return false;
      }
      return true;
    };
    if (cv_.wait_until(lock, internal::DeadlineAfter(timeout), all)) return Status();
    std::vector<std::string> missing;
    for (const auto& k : keys) {
      if (!map_.count(k)) missing.push_back(k);
    }
    return StoreKeyTimeout(missing, timeout);
  }

  Result<int64_t> Add(const std::string& key, int64_t delta) override {
    std::lock_guard<std::mutex> lock(mu_);
    ASSIGN_OR_RETURN(int64_t v, ParseStoreCounter(key, map_[key]));
    v += delta;
    map_[key] = std::to_string(v);
    cv_.notify_all();
    return v;
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  std::map<std::string, std::string> map_;  // GUARDED_BY(mu_)
};

// Keys become file names: [A-Za-z0-9._-] stay, every other byte is %XX (so '/' nests nothing).
std::string EncodeKey(const std::string& key) {
  static const char* kHex = "0123456789ABCDEF";
  std::string out;
  for (unsigned char c : key) {
    if (std::isalnum(c) || c == '.' || c == '_' || c == '-') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  // A leading '.' would collide with our temporary and lock files.
  if (!out.empty() && out[0] == '.') out = "%2E" + out.substr(1);
  return out;
}

class FileStore final : public Store {
 public:
  explicit FileStore(std::string dir) : dir_(std::move(dir)) {}

  Status Set(const std::string& key, const std::string& value) override {
    return WriteAtomically(Path(key), value);
  }

  Result<std::string> Get(const std::string& key, std::chrono::milliseconds timeout) override {
    RETURN_IF_ERROR(Wait({key}, timeout));
    std::string v;
    if (!Read(Path(key), &v)) return IoError("store: cannot read key '" + key + "' in " + dir_);
    return v;
  }

  Status Wait(const std::vector<std::string>& keys, std::chrono::milliseconds timeout) override {
    const auto deadline = internal::DeadlineAfter(timeout);
    while (true) {
      std::vector<std::string> missing;
      for (const auto& k : keys) {
        std::error_code ec;
        if (!std::filesystem::exists(Path(k), ec)) missing.push_back(k);
      }
      if (missing.empty()) return Status();
      if (std::chrono::steady_clock::now() >= deadline) return StoreKeyTimeout(missing, timeout);
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
    }
  }

  Result<int64_t> Add(const std::string& key, int64_t delta) override {
    const std::string lock_path = dir_ + "/.lock";
    const int fd = ::open(lock_path.c_str(), O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return IoError("store: cannot open " + lock_path + ": " + std::strerror(errno));
    // flock serialises processes; the mutex serialises threads of this process, which may
    // share nothing but still each open their own descriptor.
    std::lock_guard<std::mutex> thread_lock(add_mu_);
    if (::flock(fd, LOCK_EX) != 0) {
      const std::string err = std::strerror(errno);
      ::close(fd);
      return IoError("store: cannot lock " + lock_path + ": " + err);
    }
    std::string old;
    Read(Path(key), &old);
    Result<int64_t> v = ParseStoreCounter(key, old);
    Status s = v.ok() ? WriteAtomically(Path(key), std::to_string(*v + delta)) : v.status();
    ::flock(fd, LOCK_UN);
    ::close(fd);
    RETURN_IF_ERROR(s);
    return *v + delta;
  }

 private:
  std::string Path(const std::string& key) const { return dir_ + "/" + EncodeKey(key); }

  static bool Read(const std::string& path, std::string* out) {
    std::ifstream f(path, std::ios::binary);
    if (!f) return false;
    std::ostringstream ss;
    ss << f.rdbuf();
    *out = ss.str();
    return true;
  }

  Status WriteAtomically(const std::string& path, const std::string& value) {
    static std::atomic<uint64_t> counter{0};
    const std::string tmp =
        dir_ + "/.tmp." + std::to_string(::getpid()) + "." + std::to_string(counter.fetch_add(1));
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(value.data(), static_cast<std::streamsize>(value.size()));
      f.flush();
      if (!f) return IoError("store: cannot write " + tmp);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) {
      const std::string err = std::strerror(errno);
      std::remove(tmp.c_str());
      return IoError("store: cannot rename " + tmp + " to " + path + ": " + err);
    }
    return Status();
  }

  const std::string dir_;
  std::mutex add_mu_;
};

}  // namespace

std::shared_ptr<Store> MakeHashStore() { return std::make_shared<HashStore>(); }

Result<std::shared_ptr<Store>> MakeFileStore(const std::string& dir) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec || !std::filesystem::is_directory(dir)) {
    return IoError("store: cannot create directory " + dir + ": " + ec.message());
  }
  return std::shared_ptr<Store>(std::make_shared<FileStore>(dir));
}

}  // namespace strata::comm
