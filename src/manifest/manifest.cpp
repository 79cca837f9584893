#include "casmig/manifest/manifest.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <unordered_map>
#include <unordered_set>

// The encoding is specified in docs/format.md; keep the two in step.
namespace casmig::manifest {

namespace {

constexpr std::string_view k_magic{"casmig manifest\n", 16};
constexpr std::uint8_t k_flag_link = 1, k_flag_xattrs = 2, k_flag_xlink = 4,
                       k_known_flags = k_flag_link | k_flag_xattrs | k_flag_xlink;

void put_varint(std::string& out, std::uint64_t v) {
    while (v >= 0x80) {
        out.push_back(static_cast<char>((v & 0x7f) | 0x80));
        v >>= 7;
    }
    out.push_back(static_cast<char>(v));
}

void put_bytes(std::string& out, std::string_view b) {
    put_varint(out, b.size());
    out.append(b);
}

std::uint64_t zigzag(std::int64_t v) {
    return (static_cast<std::uint64_t>(v) << 1) ^ static_cast<std::uint64_t>(v >> 63);
}
std::int64_t unzigzag(std::uint64_t v) {
    return static_cast<std::int64_t>(v >> 1) ^ -static_cast<std::int64_t>(v & 1);
}

size_t common_prefix(std::string_view a, std::string_view b) {
    size_t n = std::min(a.size(), b.size()), i = 0;
    while (i < n && a[i] == b[i]) ++i;
    return i;
}

class Reader {
public:
    explicit Reader(std::string_view in) : m_in(in) {}
    [[noreturn]] void fail(const std::string& what) const {
        throw FormatError("damaged manifest: " + what + " at byte " + std::to_string(m_pos));
    }
    std::uint64_t varint(const char* what) {
        std::uint64_t v = 0;
        for (int shift = 0; shift < 64; shift += 7) {
            if (m_pos >= m_in.size()) fail(std::string("truncated ") + what);
            auto b = static_cast<std::uint8_t>(m_in[m_pos++]);
            if (shift == 63 && b > 1) fail(std::string(what) + " overflows 64 bits");
            v |= static_cast<std::uint64_t>(b & 0x7f) << shift;
            if (!(b & 0x80)) {
                if (b == 0 && shift > 0) fail(std::string(what) + " is not minimally encoded");
                return v;
            }
        }
        fail(std::string(what) + " is too long");
    }
    std::uint8_t byte(const char* what) {
        if (m_pos >= m_in.size()) fail(std::string("truncated ") + what);
        return static_cast<std::uint8_t>(m_in[m_pos++]);
    }
    std::string_view take(std::uint64_t n, const char* what) {
        if (n > m_in.size() - m_pos) fail(std::string("truncated ") + what);
        auto v = m_in.substr(m_pos, n);
        m_pos += n;
        return v;
    }
    std::string_view bytes(std::uint64_t max, const char* what) {
        std::uint64_t n = varint(what);
        if (n > max) fail(std::string(what) + " is too long");
        return take(n, what);
    }
    bool done() const { return m_pos == m_in.size(); }
    size_t left() const { return m_in.size() - m_pos; }

private:
    std::string_view m_in;
    size_t m_pos = 0;
};

std::uint32_t get_u32le(std::string_view s) {
    std::uint32_t v = 0;
    for (int i = 0; i < 4; ++i) v |= static_cast<std::uint32_t>(static_cast<unsigned char>(s[i])) << (8 * i);
    return v;
}

/// The util/xattr.hpp record: (u32 name length, name, u32 value length, value)*, names strictly increasing,
/// not empty, no NUL. Returns false if it is not one.
bool well_formed_xattrs(std::string_view x) {
    std::string_view prev;
    bool first = true;
    size_t pos = 0;
    while (pos < x.size()) {
        if (x.size() - pos < 4) return false;
        std::uint32_t nl = get_u32le(x.substr(pos, 4));
        pos += 4;
        if (nl == 0 || nl > x.size() - pos) return false;
        std::string_view name = x.substr(pos, nl);
        pos += nl;
        if (name.find('\0') != std::string_view::npos) return false;
        if (!first && !(prev < name)) return false;
        prev = name;
        first = false;
        if (x.size() - pos < 4) return false;
        std::uint32_t vl = get_u32le(x.substr(pos, 4));
        pos += 4;
        if (vl > x.size() - pos) return false;
        pos += vl;
    }
    return true;
}

/// Path rules shared by normalize-time checks and decode(): components not empty, not "." or "..", no NUL.
bool valid_path(std::string_view p) {
    if (p.empty()) return true; // the root
    if (p.find('\0') != std::string_view::npos) return false;
    size_t start = 0;
    for (;;) {
        size_t slash = p.find('/', start);
        std::string_view c = p.substr(start, slash == std::string_view::npos ? std::string_view::npos : slash - start);
        if (c.empty() || c == "." || c == "..") return false;
        if (slash == std::string_view::npos) return true;
        start = slash + 1;
    }
}

std::string_view parent_of(std::string_view p) {
    size_t slash = p.rfind('/');
    return slash == std::string_view::npos ? std::string_view{} : p.substr(0, slash);
}

} // namespace

bool path_less(std::string_view a, std::string_view b) { return a < b; } // char_traits<char>::compare is memcmp

void normalize(std::vector<Entry>& entries) {
    std::sort(entries.begin(), entries.end(), [](const Entry& a, const Entry& b) { return path_less(a.path, b.path); });
    for (size_t i = 1; i < entries.size(); ++i)
        if (entries[i].path == entries[i - 1].path)
            throw FormatError("manifest lists path '" + util::printable(entries[i].path) + "' twice");
    // Group by the path each entry names as its inode's (a walk names the first path it saw).
    std::unordered_map<std::string, std::string> leader; // any member's original anchor -> first path in byte order
    std::unordered_map<std::string, size_t> index;
    for (size_t i = 0; i < entries.size(); ++i)
        if (entries[i].type == EntryType::file) index.emplace(entries[i].path, i);
    for (auto& e : entries) {
        if (!e.link_to) continue;
        if (!index.count(*e.link_to))
            throw FormatError("manifest entry '" + util::printable(e.path) + "' is a hard link of '" + util::printable(*e.link_to) + "', which is not a file of it");
    }
    // The anchor of a group is the path its members name (the anchor names none). The entries are sorted,
    // so the first member met in this loop is the group's first path in byte order.
    for (auto& e : entries) {
        if (e.type != EntryType::file) continue;
        const std::string& anchor = e.link_to ? *e.link_to : e.path;
        auto it = leader.find(anchor);
        if (it == leader.end()) {
            // Only groups with members get a leader; an unlinked file stays as it is.
            leader.emplace(anchor, e.path);
            e.link_to.reset();
        } else {
            e.link_to = it->second;
        }
    }
}

std::unordered_map<std::string, std::string> link_leaders(const std::vector<std::pair<std::string, std::string>>& members) {
    std::unordered_map<std::string, std::string> first; // anchor -> first path of its group
    for (const auto& [path, anchor] : members) {
        auto [it, fresh] = first.emplace(anchor, anchor);
        if (path_less(path, it->second)) it->second = path;
    }
    std::unordered_map<std::string, std::string> out;
    for (const auto& [path, anchor] : members) {
        const std::string& lead = first.at(anchor);
        out.emplace(path, lead);
        out.emplace(anchor, lead);
    }
    return out;
}

std::unordered_map<std::string, std::string> link_leaders(const std::vector<Entry>& entries) {
    std::vector<std::pair<std::string, std::string>> members;
    for (const auto& e : entries)
        if (e.type == EntryType::file && e.link_to) members.emplace_back(e.path, *e.link_to);
    return link_leaders(members);
}

std::string encode(const std::vector<Entry>& entries) {
    std::string out;
    out.reserve(64 + entries.size() * 72);
    out.append(k_magic);
    put_varint(out, k_format_version);
    put_varint(out, entries.size());
    std::string_view prev;
    for (size_t i = 0; i < entries.size(); ++i) {
        const Entry& e = entries[i];
        if (i > 0 && !path_less(prev, e.path))
            throw FormatError("manifest is not in canonical order at '" + util::printable(e.path) + "' (normalize it first)");
        size_t common = i == 0 ? 0 : common_prefix(prev, e.path);
        put_varint(out, common);
        put_bytes(out, std::string_view(e.path).substr(common));
        prev = e.path;
        out.push_back(static_cast<char>(e.type));
        std::uint8_t flags = 0;
        if (e.type == EntryType::file && e.link_to) flags |= k_flag_link;
        if (!e.xattrs.empty()) flags |= k_flag_xattrs;
        if (e.type == EntryType::file && e.xlink) {
            if (*e.xlink < 0) throw FormatError("manifest file entry '" + util::printable(e.path) + "' has a negative link group");
            flags |= k_flag_xlink;
        }
        out.push_back(static_cast<char>(flags));
        put_varint(out, e.mode & 07777);
        put_varint(out, e.uid);
        put_varint(out, e.gid);
        put_varint(out, zigzag(e.mtime_ns));
        switch (e.type) {
        case EntryType::file:
            if (!e.digest) throw FormatError("manifest file entry '" + util::printable(e.path) + "' has no digest");
            put_varint(out, e.size);
            out.append(e.digest->raw());
            if (e.link_to) put_bytes(out, *e.link_to);
            if (flags & k_flag_xlink) put_varint(out, static_cast<std::uint64_t>(*e.xlink));
            break;
        case EntryType::symlink: put_bytes(out, e.target); break;
        case EntryType::dir: break;
        }
        if (flags & k_flag_xattrs) put_bytes(out, e.xattrs);
    }
    return out;
}

std::vector<Entry> decode(std::string_view bytes) {
    try {
        return decode_checked(bytes);
    } catch (const std::bad_alloc&) {
        throw FormatError("damaged manifest: too large to decode (" + std::to_string(bytes.size()) + " bytes)");
    }
}

std::vector<Entry> decode_checked(std::string_view bytes) {
    Reader r(bytes);
    // Prefix compression lets a few bytes stand for a long path: the decoded paths together may not
    // exceed this (a deep tree's manifest stays far below; a crafted one cannot cost gigabytes).
    const std::uint64_t path_budget = k_max_decoded_paths_min + k_max_decoded_paths_factor * bytes.size();
    std::uint64_t path_bytes = 0;
    if (bytes.substr(0, k_magic.size()) != k_magic) throw FormatError("not a casmig manifest (no header)");
    r.take(k_magic.size(), "header");
    std::uint64_t version = r.varint("version");
    if (version != k_format_version)
        throw VersionError("manifest format version " + std::to_string(version) + " is not one this casmig reads (" +
                           std::to_string(k_format_version) + "): upgrade casmig");
    std::uint64_t count = r.varint("entry count");
    // Each entry takes at least 8 bytes: a count above that is damage, not a reason to allocate.
    if (count == 0) r.fail("a manifest without its root entry");
    if (count > r.left() / 8 + 1) r.fail("entry count larger than the manifest");
    std::vector<Entry> out;
    out.reserve(std::min<std::uint64_t>(count, 1u << 16));
    std::unordered_set<std::string> dirs;
    std::unordered_map<std::string, bool> files; // path -> is a link group member (not its first path)
    for (std::uint64_t i = 0; i < count; ++i) {
        Entry e;
        std::uint64_t common = r.varint("path prefix");
        if (i == 0 ? common != 0 : common > out.back().path.size()) r.fail("path prefix longer than the previous path");
        std::string_view suffix = r.bytes(k_max_path, "path");
        if (common + suffix.size() > k_max_path) r.fail("path is too long");
        path_bytes += common + suffix.size();
        if (path_bytes > path_budget) r.fail("decoded paths exceed " + std::to_string(path_budget) + " bytes");
        e.path.reserve(common + suffix.size());
        if (i > 0) e.path.assign(out.back().path, 0, common);
        e.path.append(suffix);
        if (i == 0 && !e.path.empty()) r.fail("first entry is not the package root");
        if (i > 0 && !path_less(out.back().path, e.path)) r.fail("paths out of order at '" + util::printable(e.path) + "'");
        // Canonical: the prefix is the longest one shared (else two encodings of one manifest exist).
        if (i > 0 && common_prefix(out.back().path, e.path) != common) r.fail("path prefix is not the longest shared one");
        if (!valid_path(e.path)) r.fail("invalid path '" + util::printable(e.path) + "'");
        if (i > 0 && !dirs.count(std::string(parent_of(e.path)))) r.fail("'" + util::printable(e.path) + "' has no directory entry for its parent");
        std::uint8_t type = r.byte("type");
        if (type < 1 || type > 3) r.fail("unknown entry type " + std::to_string(type));
        e.type = static_cast<EntryType>(type);
        if (i == 0 && e.type != EntryType::dir) r.fail("package root is not a directory");
        std::uint8_t flags = r.byte("flags");
        if (flags & ~k_known_flags) r.fail("unknown entry flags");
        if ((flags & (k_flag_link | k_flag_xlink)) && e.type != EntryType::file) r.fail("hard link flag on a non-file");
        std::uint64_t mode = r.varint("mode");
        if (mode > 07777) r.fail("mode out of range");
        e.mode = static_cast<std::uint32_t>(mode);
        std::uint64_t uid = r.varint("uid"), gid = r.varint("gid");
        if (uid > 0xffffffffu || gid > 0xffffffffu) r.fail("owner out of range");
        e.uid = static_cast<std::uint32_t>(uid);
        e.gid = static_cast<std::uint32_t>(gid);
        e.mtime_ns = unzigzag(r.varint("mtime"));
        switch (e.type) {
        case EntryType::file: {
            e.size = r.varint("size");
            e.digest = hash::Digest::from_raw(r.take(32, "digest"));
            if (flags & k_flag_link) {
                std::string_view to = r.bytes(k_max_path, "hard link");
                auto it = files.find(std::string(to));
                if (it == files.end()) r.fail("'" + util::printable(e.path) + "' is a hard link of '" + util::printable(to) + "', not an earlier file");
                if (it->second) r.fail("'" + util::printable(e.path) + "' is a hard link of a link group member, not its first path");
                e.link_to = std::string(to);
            }
            if (flags & k_flag_xlink) {
                std::uint64_t g = r.varint("link group");
                if (g > static_cast<std::uint64_t>(INT64_MAX)) r.fail("link group out of range");
                e.xlink = static_cast<std::int64_t>(g);
            }
            break;
        }
        case EntryType::symlink: {
            std::string_view t = r.bytes(k_max_path, "symlink target");
            if (t.empty() || t.find('\0') != std::string_view::npos) r.fail("invalid symlink target at '" + util::printable(e.path) + "'");
            e.target = std::string(t);
            e.size = t.size();
            break;
        }
        case EntryType::dir: break;
        }
        if (flags & k_flag_xattrs) {
            if (e.type == EntryType::symlink) r.fail("extended attributes on a symlink");
            std::string_view x = r.bytes(k_max_xattrs, "extended attributes");
            if (x.empty() || !well_formed_xattrs(x)) r.fail("malformed extended attributes at '" + util::printable(e.path) + "'");
            e.xattrs = std::string(x);
        }
        out.push_back(std::move(e));
        const Entry& added = out.back();
        if (added.type == EntryType::dir) dirs.insert(added.path);
        if (added.type == EntryType::file) files.emplace(added.path, added.link_to.has_value());
    }
    if (!r.done()) r.fail("trailing bytes after the last entry");
    return out;
}

} // namespace casmig::manifest
