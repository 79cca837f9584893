#include "casmig/store/packages.hpp"

#include "casmig/cas/object_store.hpp"
#include "casmig/store/store.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"

#include <algorithm>
#include <ctime>
#include <cerrno>
#include <fcntl.h>
#include <sstream>
#include <sys/stat.h>
#include <unistd.h>

namespace casmig::store {

namespace {

constexpr const char* k_settings_magic = "casmig-store 1";
constexpr std::uint64_t k_max_manifest = std::uint64_t(1) << 32; // 4 GiB: a damaged size is not a read

util::Fd open_or_make_dir(int parent, const char* name, const std::string& display) {
    if (io::mkdirat(parent, name, 0755) != 0 && errno != EEXIST) util::throw_errno("cannot create directory", display);
    return util::open_dir_at(parent, name, display);
}

/// Reads a whole regular file (not followed if a symlink), at most `max` bytes. nullopt if absent.
std::optional<std::string> read_file_at(int dirfd, const std::string& name, std::uint64_t max, const std::string& display) {
    int fd = ::openat(dirfd, name.c_str(), O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        if (errno == ENOENT) return std::nullopt;
        if (errno == ELOOP) throw util::Error(display + " is a symlink, not a casmig file: move it away and run casmig rebuild-catalog");
        util::throw_errno("cannot open", display);
    }
    util::Fd owned(fd);
    struct stat st {};
    if (::fstat(fd, &st) != 0) util::throw_errno("cannot stat", display);
    if (!S_ISREG(st.st_mode)) throw util::Error(display + " is not a regular file: move it away and run casmig rebuild-catalog");
    if (static_cast<std::uint64_t>(st.st_size) > max)
        throw util::Error(display + " is " + std::to_string(st.st_size) + " bytes, more than any casmig file of its kind: it is damaged");
    std::string out(static_cast<size_t>(st.st_size), '\0');
    size_t got = 0;
    while (got < out.size()) {
        ssize_t n = ::read(fd, out.data() + got, out.size() - got);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) util::throw_errno("cannot read", display);
        if (n == 0) break;
        got += static_cast<size_t>(n);
    }
    out.resize(got);
    return out;
}

} // namespace

std::string PackageIndex::manifest_relpath(const hash::Digest& d) {
    return std::string("packages/") + k_manifests_dir + "/" + cas::object_relpath(d);
}

PackageIndex::PackageIndex(Store& store) : m_store(store) {
    const std::string root = store.root() + "/packages";
    m_dir = open_or_make_dir(store.root_fd(), "packages", root);
    m_manifests = open_or_make_dir(m_dir.get(), k_manifests_dir, root + "/" + k_manifests_dir);
    m_refs = open_or_make_dir(m_dir.get(), k_refs_dir, root + "/" + k_refs_dir);
}

PackageIndex::~PackageIndex() { discard_staged(); }

std::string PackageIndex::write_temp(const std::string& bytes, mode_t mode) {
    int dirfd = m_store.objects().own_temp_dirfd();
    std::string name = std::string(cas::k_temp_marker) + "pkg-" + std::to_string(++m_temp_counter);
    const std::string display = m_store.temp_dir() + "/" + m_store.objects().own_temp_name() + "/" + name;
    int fd = io::openat_create(dirfd, name.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, mode);
    if (fd < 0) util::throw_errno("cannot create temp file", display);
    util::Fd owned(fd);
    try {
        util::write_all(fd, bytes.data(), bytes.size(), display);
    } catch (...) {
        owned.reset();
        ::unlinkat(dirfd, name.c_str(), 0);
        throw;
    }
    return name;
}

void PackageIndex::stage(const std::string& package, const std::string& encoded, const hash::Digest& d) {
    // A manifest already in place is the same bytes (its name is their hash): publish() checks it.
    bool staged = std::any_of(m_manifests_staged.begin(), m_manifests_staged.end(),
                              [&](const StagedManifest& m) { return m.digest == d; });
    if (!staged) m_manifests_staged.push_back({d, write_temp(encoded, 0444)});
    m_refs_staged.push_back({package, write_temp(d.hex() + "\n", 0644)});
}

void PackageIndex::stage_ref(const std::string& package, const hash::Digest& d) {
    m_refs_staged.push_back({package, write_temp(d.hex() + "\n", 0644)});
}

void PackageIndex::discard_staged() noexcept {
    if (m_manifests_staged.empty() && m_refs_staged.empty()) return;
    try {
        int dirfd = m_store.objects().own_temp_dirfd();
        for (auto& m : m_manifests_staged)
            if (!m.temp.empty()) ::unlinkat(dirfd, m.temp.c_str(), 0);
        for (auto& r : m_refs_staged)
            if (!r.temp.empty()) ::unlinkat(dirfd, r.temp.c_str(), 0);
    } catch (...) {
        // The staging directory goes with its ObjectStore, or the next locked run removes it.
    }
    m_manifests_staged.clear();
    m_refs_staged.clear();
}

size_t PackageIndex::publish(std::vector<std::string>* quarantined, bool staged_durable) {
    if (m_manifests_staged.empty() && m_refs_staged.empty()) return 0;
    size_t placed = 0;
    try {
        int tfd = m_store.objects().own_temp_dirfd();
        // 1. The staged bytes are durable before any name points at them (one syncfs covers the whole
        //    filesystem: skipped when the caller's own one came after the staging).
        if (!staged_durable) cas::sync_filesystem(tfd, m_store.temp_dir());
        io::crash_point("packages.staged-durable");
        // 2. Manifests, never replacing a file at their name unchecked.
        for (auto& m : m_manifests_staged) {
            std::string rel = cas::object_relpath(m.digest);
            std::string fan = rel.substr(0, 2), leaf = rel.substr(3);
            const std::string display = m_store.root() + "/" + manifest_relpath(m.digest);
            util::Fd fanfd = open_or_make_dir(m_manifests.get(), fan.c_str(), m_store.root() + "/packages/manifests/" + fan);
            for (int attempt = 0;; ++attempt) {
                if (io::renameat2(tfd, m.temp.c_str(), fanfd.get(), leaf.c_str(), RENAME_NOREPLACE) == 0) {
                    m.temp.clear();
                    ++placed;
                    break;
                }
                if (errno != EEXIST || attempt > 0) util::throw_errno("cannot place manifest", display);
                try {
                    read_manifest(m.digest);
                    ::unlinkat(tfd, m.temp.c_str(), 0); // the same manifest is already there
                    m.temp.clear();
                    break;
                } catch (const util::SystemError&) {
                    throw;
                } catch (const util::Error&) {
                    std::string moved = quarantine_manifest(m.digest);
                    if (quarantined) quarantined->push_back(manifest_relpath(m.digest) + " was not the manifest its name says: moved to " + moved);
                }
            }
        }
        io::crash_point("packages.manifests-placed");
        // 3. Refs: each replaces the package's previous one atomically.
        for (auto& r : m_refs_staged) {
            if (io::renameat2(tfd, r.temp.c_str(), m_refs.get(), r.package.c_str(), 0) != 0)
                util::throw_errno("cannot place package reference", m_store.root() + "/packages/refs/" + util::printable(r.package));
            r.temp.clear();
        }
        io::crash_point("packages.refs-placed");
        // 4. The names are durable before the catalog records anything that relies on them.
        cas::sync_filesystem(m_refs.get(), m_store.root() + "/packages");
        io::crash_point("packages.durable");
    } catch (...) {
        discard_staged();
        throw;
    }
    m_manifests_staged.clear();
    m_refs_staged.clear();
    return placed;
}

void PackageIndex::drop_ref(const std::string& package) {
    if (io::unlinkat(m_refs.get(), package.c_str(), 0) != 0) {
        if (errno == ENOENT) return;
        if (errno != EISDIR && errno != EPERM)
            util::throw_errno("cannot remove package reference", m_store.root() + "/packages/refs/" + util::printable(package));
        // Not a file casmig wrote (a directory, say): moved aside, never deleted.
        move_aside(m_refs.get(), package, "ref-");
        return;
    }
    util::fsync_fd(m_refs.get(), m_store.root() + "/packages/refs");
    io::crash_point("packages.ref-dropped");
}

std::optional<hash::Digest> PackageIndex::ref(const std::string& package) const {
    const std::string display = m_store.root() + "/packages/refs/" + util::printable(package);
    auto text = read_file_at(m_refs.get(), package, 65, display);
    if (!text) return std::nullopt;
    std::optional<hash::Digest> d;
    if (text->size() == 65 && text->back() == '\n') d = hash::Digest::from_hex(text->substr(0, 64));
    if (!d || d->hex() != text->substr(0, 64))
        throw util::Error("package reference " + display + " is damaged (it must hold 64 lowercase hex digits and a newline)");
    return d;
}

std::vector<std::string> PackageIndex::ref_names() const {
    auto names = util::list_dir(m_refs.get(), m_store.root() + "/packages/refs");
    std::sort(names.begin(), names.end());
    return names;
}

std::string PackageIndex::read_manifest(const hash::Digest& d) const {
    const std::string display = m_store.root() + "/" + manifest_relpath(d);
    auto bytes = read_file_at(m_manifests.get(), cas::object_relpath(d), k_max_manifest, display);
    if (!bytes) throw util::Error("manifest object " + display + " is missing");
    auto got = hash::hash_bytes(*bytes);
    if (got != d) throw util::Error("manifest object " + display + " is damaged: its content hashes to " + got.hex());
    return std::move(*bytes);
}

std::vector<hash::Digest> PackageIndex::manifest_objects() const {
    std::vector<hash::Digest> out;
    const std::string base = m_store.root() + "/packages/manifests";
    for (const auto& fan : util::list_dir(m_manifests.get(), base)) {
        if (fan.size() != 2) continue;
        struct stat st {};
        if (::fstatat(m_manifests.get(), fan.c_str(), &st, AT_SYMLINK_NOFOLLOW) != 0 || !S_ISDIR(st.st_mode)) continue;
        util::Fd f = util::open_dir_at(m_manifests.get(), fan, base + "/" + fan);
        for (const auto& leaf : util::list_dir(f.get(), base + "/" + fan)) {
            auto d = hash::Digest::from_hex(fan + leaf);
            if (d && d->hex() == fan + leaf) out.push_back(*d);
        }
    }
    std::sort(out.begin(), out.end());
    return out;
}

void PackageIndex::delete_manifest(const hash::Digest& d) {
    std::string rel = cas::object_relpath(d);
    util::Fd fan = util::open_dir_at(m_manifests.get(), rel.substr(0, 2), m_store.root() + "/packages/manifests/" + rel.substr(0, 2));
    if (io::unlinkat(fan.get(), rel.substr(3).c_str(), 0) != 0 && errno != ENOENT)
        util::throw_errno("cannot delete manifest object", m_store.root() + "/" + manifest_relpath(d));
    util::fsync_fd(fan.get(), m_store.root() + "/packages/manifests/" + rel.substr(0, 2));
}

std::string PackageIndex::quarantine_manifest(const hash::Digest& d) {
    const std::string qdir = m_store.root() + "/" + cas::k_quarantine_dir;
    if (io::mkdirat(AT_FDCWD, qdir.c_str(), 0700) != 0 && errno != EEXIST) util::throw_errno("cannot create quarantine directory", qdir);
    util::Fd q = util::open_dir(qdir);
    std::string rel = cas::object_relpath(d);
    for (int n = 0;; ++n) {
        std::string name = "manifest-" + d.hex() + "." + std::to_string(n);
        if (io::renameat2(m_manifests.get(), rel.c_str(), q.get(), name.c_str(), RENAME_NOREPLACE) == 0) {
            util::fsync_fd(q.get(), qdir);
            return std::string(cas::k_quarantine_dir) + "/" + name;
        }
        if (errno != EEXIST || n > 10000) util::throw_errno("cannot move damaged manifest aside", m_store.root() + "/" + manifest_relpath(d));
    }
}

std::string PackageIndex::move_aside(int dirfd, const std::string& name, const std::string& prefix) {
    const std::string aside = m_store.migration_dir() + "/aside";
    util::ensure_dir(aside, 0700);
    util::Fd a = util::open_dir(aside);
    for (int n = 0;; ++n) {
        std::string to = prefix + name + "." + std::to_string(::time(nullptr)) + (n ? "-" + std::to_string(n) : "");
        if (io::renameat2(dirfd, name.c_str(), a.get(), to.c_str(), RENAME_NOREPLACE) == 0) {
            util::fsync_fd(a.get(), aside);
            util::fsync_fd(dirfd, m_store.root() + "/packages");
            return aside + "/" + to;
        }
        if (errno != EEXIST || n > 1000) util::throw_errno("cannot move aside", m_store.root() + "/packages/.../" + util::printable(name));
    }
}

std::map<std::string, std::string> PackageIndex::settings() const {
    const std::string display = m_store.root() + "/packages/" + k_settings_file;
    auto text = read_file_at(m_dir.get(), k_settings_file, 1 << 20, display);
    std::map<std::string, std::string> out;
    if (!text) return out;
    std::istringstream in(*text);
    std::string line;
    if (!std::getline(in, line) || line != k_settings_magic)
        throw util::Error(display + " is damaged (no '" + std::string(k_settings_magic) + "' header)");
    while (std::getline(in, line)) {
        auto sp = line.find(' ');
        if (sp == std::string::npos || sp == 0) throw util::Error(display + " is damaged (line '" + util::printable(line) + "')");
        out[line.substr(0, sp)] = line.substr(sp + 1);
    }
    return out;
}

void PackageIndex::set_setting(const std::string& key, const std::string& value) { change_setting(key, value); }

void PackageIndex::erase_setting(const std::string& key) { change_setting(key, std::nullopt); }

void PackageIndex::change_setting(const std::string& key, const std::optional<std::string>& value) {
    std::map<std::string, std::string> all;
    try {
        all = settings();
    } catch (const util::SystemError&) {
        throw;
    } catch (const util::Error&) {
        // Damaged (or not a file): kept aside, and written anew from what the catalog says.
        move_aside(m_dir.get(), k_settings_file, "");
    }
    auto it = all.find(key);
    if (value ? it != all.end() && it->second == *value : it == all.end()) return;
    if (value) all[key] = *value;
    else all.erase(it);
    std::string text = std::string(k_settings_magic) + "\n";
    for (const auto& [k, v] : all) text += k + " " + v + "\n";
    const std::string base = m_store.root() + "/packages/";
    const std::string tmp = std::string(k_settings_file) + ".new";
    int fd = io::openat_create(m_dir.get(), tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) util::throw_errno("cannot create", base + tmp);
    {
        util::Fd owned(fd);
        util::write_all(fd, text.data(), text.size(), base + tmp);
        util::fsync_fd(fd, base + tmp);
    }
    if (io::renameat2(m_dir.get(), tmp.c_str(), m_dir.get(), k_settings_file, 0) != 0)
        util::throw_errno("cannot replace", base + k_settings_file);
    util::fsync_fd(m_dir.get(), m_store.root() + "/packages");
    io::crash_point("packages.settings-written");
}

void record_mode(PackageIndex& index, const std::string& mode) { index.set_setting("mode", mode); }

} // namespace casmig::store
