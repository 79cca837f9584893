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
// zstd advises about 100 times the dictionary's size of samples; more costs training time for little.
constexpr size_t k_sample_bytes = 100 * cas::k_dict_size;
} // namespace

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
        throw util::RefusedError("store " + store.root() + " already holds uncompressed objects: the zstd mode (--compress) "
                                 "is chosen on a store's first migrate and converting a store is not available yet; "
                                 "migrate without --compress; the store is unchanged");
}

void enable_store_mode(store::Store& store, const Options& opts, const std::vector<catalog::Package>& selected) {
    auto& cat = store.catalog();
    auto mode = store::read_compression(cat);
    auto& objects = store.objects();
    if (!mode && opts.compress) {
        cas::Compression c;
        c.level = *opts.compress;
        if (opts.dictionary == Dictionary::yes) {
            std::string dict = cas::train_dictionary(sample_small_files(store.root_fd(), selected, k_sample_bytes));
            if (!dict.empty()) c.dict = objects.store_dictionary(dict); // durable before the setting names it
        }
        catalog::Transaction tx(cat.db());
        store::write_compression(cat, c);
        cat.journal("migrate", "", "", "", "store mode zstd: " + c.setting());
        tx.commit();
        io::crash_point("migrate.compression-recorded");
        mode = c;
    } else if (mode && opts.compress && *opts.compress != mode->level) {
        mode->level = *opts.compress;
        catalog::Transaction tx(cat.db());
        store::write_compression(cat, *mode);
        cat.journal("migrate", "", "", "", "zstd level for new objects: " + mode->setting());
        tx.commit();
    }
    if (!mode) return;
    // Mirrored into packages/store for rebuild-catalog (a failure is redone by the next command's sync).
    (void)store::mirror_step([&] { store.packages().set_setting("compression", mode->setting()); });
    std::string dict = mode->dict ? objects.dictionaries().load(*mode->dict) : std::string();
    objects.set_compressor(std::make_shared<cas::Compressor>(mode->level, dict));
}

} // namespace casmig::migrate
