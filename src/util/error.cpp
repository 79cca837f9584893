#include "casmig/util/error.hpp"

#include <cerrno>
#include <cstring>

namespace casmig::util {

std::string printable(std::string_view bytes) {
    static const char* hex = "0123456789abcdef";
    std::string out;
    out.reserve(bytes.size());
    size_t i = 0;
    while (i < bytes.size()) {
        auto c = static_cast<unsigned char>(bytes[i]);
        // keep valid UTF-8 multi-byte sequences as they are
        int len = c >= 0xF0 && c < 0xF5 ? 4 : c >= 0xE0 ? 3 : c >= 0xC2 && c < 0xE0 ? 2 : 1;
        if (c >= 0x80 && len > 1 && i + len <= bytes.size()) {
            bool ok = true;
            for (int k = 1; k < len; ++k)
                if ((static_cast<unsigned char>(bytes[i + k]) & 0xC0) != 0x80) ok = false;
            if (ok) {
                out.append(bytes.substr(i, len));
                i += len;
                continue;
            }
        }
        if (c < 0x20 || c == 0x7f || c >= 0x80 || c == '\\') {
            out += "\\x";
            out += hex[c >> 4];
            out += hex[c & 15];
        } else {
            out += static_cast<char>(c);
        }
        ++i;
    }
    return out;
}

SystemError::SystemError(const std::string& what, const std::string& path, int err)
    : Error(what + (path.empty() ? "" : ": " + path) + ": " + std::strerror(err)), m_errno(err) {}

void throw_errno(const std::string& what, const std::string& path) {
    throw SystemError(what, path, errno);
}

} // namespace casmig::util
