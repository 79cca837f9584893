#include "casmig/util/error.hpp"

#include <cerrno>
#include <cstring>

namespace casmig::util {

namespace {

/// Length of the well-formed UTF-8 sequence of a printable character at bytes[i] (RFC 3629: no overlong
/// form, no surrogate, nothing above U+10FFFF; not a C1 control, which some terminals take for a line
/// break), or 0. Anything else is escaped: the result must be valid UTF-8 (JSON output needs it).
size_t printable_utf8(std::string_view bytes, size_t i) {
    auto at = [&](size_t k) { return static_cast<unsigned char>(bytes[i + k]); };
    const unsigned char c = at(0);
    size_t len = 0;
    unsigned char lo = 0x80, hi = 0xBF; // the second byte's range
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        if (c == 0xC2) lo = 0xA0; // U+0080..U+009F: C1 controls
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0; // overlong
        if (c == 0xED) hi = 0x9F; // surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90; // overlong
        if (c == 0xF4) hi = 0x8F; // above U+10FFFF
    } else {
        return 0;
    }
    if (i + len > bytes.size() || at(1) < lo || at(1) > hi) return 0;
    for (size_t k = 2; k < len; ++k)
        if ((at(k) & 0xC0) != 0x80) return 0;
    return len;
}

} // namespace

std::string printable(std::string_view bytes) {
    static const char* hex = "0123456789abcdef";
    std::string out;
    out.reserve(bytes.size());
    size_t i = 0;
    while (i < bytes.size()) {
        auto c = static_cast<unsigned char>(bytes[i]);
        if (c >= 0x80) {
            // keep well-formed UTF-8 multi-byte sequences as they are
            if (size_t len = printable_utf8(bytes, i)) {
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

std::optional<std::string> unprintable(std::string_view text) {
    auto nibble = [](char c) -> int {
        if (c >= '0' && c <= '9') return c - '0';
        if (c >= 'a' && c <= 'f') return c - 'a' + 10;
        if (c >= 'A' && c <= 'F') return c - 'A' + 10;
        return -1;
    };
    std::string out;
    out.reserve(text.size());
    for (size_t i = 0; i < text.size(); ++i) {
        if (text[i] != '\\') {
            out += text[i];
            continue;
        }
        if (i + 3 >= text.size()) return std::nullopt; // \xNN needs three more characters
        if (text[i + 1] != 'x') return std::nullopt;
        int hi = nibble(text[i + 2]), lo = nibble(text[i + 3]);
        if (hi < 0 || lo < 0) return std::nullopt;
        out += static_cast<char>(hi << 4 | lo);
        i += 3;
    }
    return out;
}

SystemError::SystemError(const std::string& what, const std::string& path, int err)
    : Error(what + (path.empty() ? "" : ": " + path) + ": " + std::strerror(err)), m_errno(err) {}

void throw_errno(const std::string& what, const std::string& path) {
    throw SystemError(what, path, errno);
}

} // namespace casmig::util
