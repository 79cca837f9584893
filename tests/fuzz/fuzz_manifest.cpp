// libFuzzer target for the manifest decoder (src/manifest/manifest.cpp). Built and run by
// tools/fuzz-manifest (clang, -fsanitize=fuzzer,address,undefined). Properties checked on every input:
// decode() never crashes, never reads out of bounds, never over-allocates (ASan, -rss_limit_mb), and
// throws nothing but FormatError; whatever decodes re-encodes to exactly the input (canonical form).
#include "casmig/manifest/manifest.hpp"

#include <cstdint>
#include <cstdlib>
#include <string_view>

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, size_t size) {
    std::string_view in(reinterpret_cast<const char*>(data), size);
    try {
        auto entries = casmig::manifest::decode(in);
        if (casmig::manifest::encode(entries) != in) std::abort(); // decoded bytes must be canonical
        auto again = entries;
        casmig::manifest::normalize(again);
        if (casmig::manifest::encode(again) != in) std::abort(); // and already normalized
    } catch (const casmig::manifest::FormatError&) {
    }
    return 0;
}
