#include "casmig/migrate/store_mode.hpp"

#include "casmig/store/packages.hpp"

#include "casmig/catalog/sqlite.hpp"
#include "casmig/ingest/ingest.hpp"
#include "casmig/util/error.hpp"
#include "casmig/util/io.hpp"
#include "casmig/walk/walker.hpp"

#include <algorithm>
#include <cerrno>
#include <unistd.h>

namespace casmig::migrate {

namespace {
constexpr std::uint64_t k_sample_min = 16, k_sample_max = 16 * 1024;
constexpr size_t k_sample_files_per_package = 64;
constexpr size_t k_sample_packages = 4096;
} // namespace

std::vector<std::string> sample_small_objects(store::Store& store, size_t max_bytes) {
    std::vector<std::string> out;
    size_t total = 0;
    auto& objects = store.objects();
    std::vector<catalog::ObjectRow> small;
    std::uint64_t small_bytes = 0;
    for (auto& o : store.catalog().objects()) {
        auto size = static_cast<std::uint64_t>(o.size);
        if (size < k_sample_min || size > k_sample_max) continue;
        small_bytes += size;
        small.push_back(std::move(o));
    }
    // Spread over the whole store (the catalog lists objects in the order packages were migrated).
    const size_t stride = static_cast<size_t>(std::max<std::uint64_t>(1, small_bytes / std::max<size_t>(1, max_bytes)));
    for (size_t i = 0; i < small.size() && total < max_bytes; i += stride) {
        const auto& o = small[i];
        auto size = static_cast<std::uint64_t>(o.size);
        try {
            cas::ObjectReader r = objects.open_content(o.digest);
            std::string s(static_cast<size_t>(size), '\0');
            size_t n = 0;
            while (n < s.size()) {
                size_t got = r.read(s.data() + n, s.size() - n);
                if (got == 0) break;
                n += got;
            }
            s.resize(n);
            total += n;
            out.push_back(std::move(s));
        } catch (const util::Error&) {
            // A sample only: an unreadable object is convert's (or verify --objects') to report.
        }
    }
    return out;
}

std::vector<std::string> sample_small_files(int store_fd, const std::vector<catalog::Package>& packages,
                                            size_t max_bytes) {
    std::vector<std::string> out;
    if (packages.empty()) return out;
    size_t total = 0;
    const size_t stride = std::max<size_t>(1, packages.size() / k_sample_packages);
    for (size_t i = 0; i < packages.size() && total < max_bytes; i += stride) {
        try {
            walk::PackageWalker w(store_fd, packages[i].name);
            walk::Item it;
            size_t taken = 0;
            while (taken < k_sample_files_per_package && total < max_bytes && w.next(it)) {
                if (it.entry.type != catalog::EntryType::file) continue;
                auto size = static_cast<std::uint64_t>(it.st.st_size);
                if (size < k_sample_min || size > k_sample_max) continue;
                util::Fd fd = ingest::try_open_item(it);
                if (!fd) continue;
                std::string s(static_cast<size_t>(size), '\0');
                ssize_t n = ::pread(fd.get(), s.data(), s.size(), 0);
                if (n <= 0) continue;
                s.resize(static_cast<size_t>(n));
                total += s.size();
                out.push_back(std::move(s));
                ++taken;
            }
        } catch (const util::Error&) {
            // A package that cannot be walked is reported by the migration itself; the sample goes on.
        }
    }
    return out;
}

void check_compress_option(store::Store& store, const Options& opts) {
    if (!opts.compress) return;
    auto& cat = store.catalog();
    if (store::read_compression(cat)) return;
    if (cat.totals().objects > 0)
        throw util::RefusedError("store " + store.root() + " already holds uncompressed objects: migrate --compress "
                                 "chooses the zstd mode only on a store's first migrate: migrate without --compress, or "
                                 "run casmig convert --compress first (later migrates keep the mode); the store is "
                                 "unchanged");
}

cas::Compression choose_compression(store::Store& store, std::optional<int> level, Dictionary dictionary,
                                    const std::function<std::vector<std::string>()>& samples, const std::string& command) {
    auto& cat = store.catalog();
    auto mode = store::read_compression(cat);
    if (!mode) {
        cas::Compression c;
        c.level = level.value_or(cas::k_default_level);
        if (dictionary == Dictionary::yes) {
            std::string dict = cas::train_dictionary(samples(), c.level);
            if (!dict.empty()) c.dict = store.objects().store_dictionary(dict, command); // durable before the setting names it
        }
        catalog::Transaction tx(cat.db());
        store::write_compression(cat, c);
        cat.journal(command, "", "", "", "store mode zstd: " + c.setting());
        tx.commit();
        io::crash_point((command + ".compression-recorded").c_str());
        return c;
    }
    if (level && *level != mode->level) {
        mode->level = *level;
        catalog::Transaction tx(cat.db());
        store::write_compression(cat, *mode);
        cat.journal(command, "", "", "", "zstd level for new objects: " + mode->setting());
        tx.commit();
    }
    return *mode;
}

void use_compression(store::Store& store, const cas::Compression& c) {
    // Mirrored into packages/store for rebuild-catalog (a failure is redone by the next command's sync).
    (void)store::mirror_step([&] { store.packages().set_setting("compression", c.setting()); });
    auto& objects = store.objects();
    std::string dict = c.dict ? objects.dictionaries().load(*c.dict) : std::string();
    objects.set_compressor(std::make_shared<cas::Compressor>(c.level, dict));
}

void enable_store_mode(store::Store& store, const Options& opts, const std::vector<catalog::Package>& selected) {
    if (!opts.compress && !store::read_compression(store.catalog())) return; // a raw store stays raw
    use_compression(store, choose_compression(store, opts.compress, opts.dictionary, [&] {
                        return sample_small_files(store.root_fd(), selected, k_sample_bytes);
                    }, "migrate"));
}

} // namespace casmig::migrate
