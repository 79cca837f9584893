#include "casmig/util/xattr.hpp"

#include "casmig/util/error.hpp"

#include <cerrno>
#include <cstdint>
#include <map>
#include <sys/xattr.h>
#include <unistd.h>
#include <vector>

namespace casmig::util {

static void put_u32(std::string& out, std::uint32_t v) {
    for (int i = 0; i < 4; ++i) out.push_back(static_cast<char>((v >> (8 * i)) & 0xff));
}

static std::uint32_t get_u32(const std::string& in, size_t& pos) {
    if (pos + 4 > in.size()) throw Error("damaged extended attribute record in the catalog: run casmig verify");
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(static_cast<unsigned char>(in[pos + i])) << (8 * i);
    pos += 4;
    return v;
}

std::string read_xattrs(int fd, const std::string& display) {
    std::vector<char> names(1024);
    ssize_t n;
    for (;;) {
        n = ::flistxattr(fd, names.data(), names.size());
        if (n >= 0) break;
        if (errno == ENOTSUP) return {};
        if (errno != ERANGE) throw_errno("cannot list extended attributes", display);
        names.resize(names.size() * 4);
    }
    if (n == 0) return {};
    std::map<std::string, std::string> attrs;
    for (ssize_t i = 0; i < n;) {
        std::string name(names.data() + i);
        i += static_cast<ssize_t>(name.size()) + 1;
        std::vector<char> value(256);
        ssize_t v;
        for (;;) {
            v = ::fgetxattr(fd, name.c_str(), value.data(), value.size());
            if (v >= 0) break;
            if (errno == ENODATA) break; // removed meanwhile
            if (errno != ERANGE) throw_errno("cannot read extended attribute " + name, display);
            value.resize(value.size() * 4);
        }
        if (v >= 0) attrs[name] = std::string(value.data(), static_cast<size_t>(v));
    }
    std::string out;
    for (auto& [k, val] : attrs) {
        put_u32(out, static_cast<std::uint32_t>(k.size()));
        out += k;
        put_u32(out, static_cast<std::uint32_t>(val.size()));
        out += val;
    }
    return out;
}

void write_xattrs(int fd, const std::string& encoded, const std::string& display) {
    size_t pos = 0;
    while (pos < encoded.size()) {
        std::uint32_t nl = get_u32(encoded, pos);
        std::string name = encoded.substr(pos, nl);
        pos += nl;
        std::uint32_t vl = get_u32(encoded, pos);
        std::string value = encoded.substr(pos, vl);
        pos += vl;
        if (::fsetxattr(fd, name.c_str(), value.data(), value.size(), 0) != 0) {
            if (errno == ENOTSUP) continue; // the destination filesystem cannot hold it
            if (errno == EPERM && ::geteuid() != 0) continue; // security.* needs root; documented
            throw_errno("cannot set extended attribute " + name, display);
        }
    }
}

} // namespace casmig::util
