// lifecycle::write_metrics — the store's numbers and the last run's outcome in the Prometheus text
// exposition format, for node_exporter's textfile collector (issue 10, item 6). The file is replaced
// atomically (a temporary file beside it, fsync, rename, fsync of the directory), so the collector
// never reads half of one; it is written at the end of every command, failed ones included.
#include "casmig/lifecycle/lifecycle.hpp"

#include "casmig/util/error.hpp"
#include "casmig/util/fd.hpp"

#include <cerrno>
#include <chrono>
#include <cstdio>
#include <fcntl.h>
#include <fstream>
#include <map>
#include <sstream>
#include <unistd.h>

namespace casmig::lifecycle {

namespace {

std::string escape_label(const std::string& v) {
    std::string out;
    for (char c : v) {
        if (c == '\\' || c == '"') out += '\\';
        if (c == '\n') {
            out += "\\n";
            continue;
        }
        out += c;
    }
    return out;
}

/// metric -> command -> value of every casmig_last_*{command="…"} sample in the file an earlier run
/// wrote: each command's last run is kept when another command rewrites the file.
std::map<std::string, std::map<std::string, std::string>> previous_runs(const std::string& path) {
    std::map<std::string, std::map<std::string, std::string>> out;
    std::ifstream in(path);
    std::string line;
    while (std::getline(in, line)) {
        if (line.rfind("casmig_last_", 0) != 0) continue;
        auto brace = line.find("{command=\"");
        if (brace == std::string::npos) continue;
        auto end = line.find("\"}", brace);
        if (end == std::string::npos) continue;
        std::string name = line.substr(0, brace);
        std::string cmd = line.substr(brace + 10, end - brace - 10);
        std::string value = line.substr(end + 2);
        while (!value.empty() && value.front() == ' ') value.erase(0, 1);
        if (cmd.empty() || cmd.find_first_of("\\\"") != std::string::npos || value.empty()) continue;
        out[name][cmd] = value;
    }
    return out;
}

} // namespace

void write_metrics(store::Store& s, const std::string& path, const RunInfo& run) {
    std::ostringstream o;
    auto metric = [&](const std::string& name, const char* type, const std::string& help) {
        o << "# HELP " << name << ' ' << help << "\n# TYPE " << name << ' ' << type << '\n';
    };
    const auto now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
    std::optional<StatusReport> st;
    try {
        st = status(s, 0);
    } catch (const util::Error&) {
        // No usable catalog (a new store, a refused one): the run's own metrics are still written.
    }
    if (st) {
        metric("casmig_packages", "gauge", "Packages of the store by state.");
        for (const auto& [state, n] : st->states) o << "casmig_packages{state=\"" << state << "\"} " << n << '\n';
        metric("casmig_legacy_trees", "gauge", "Legacy package trees by state.");
        for (const auto& [state, n] : st->trees) o << "casmig_legacy_trees{state=\"" << state << "\"} " << n << '\n';
        metric("casmig_packages_verify_failed", "gauge",
               "Verified packages whose last verify after cutover failed (casmig list --verify-failed).");
        o << "casmig_packages_verify_failed " << st->verify_failures.size() << '\n';
        metric("casmig_store_mode", "gauge", "1 for the store's current mode.");
        for (const char* m : {"legacy", "dual", "file-level"})
            o << "casmig_store_mode{mode=\"" << m << "\"} " << (st->mode == m ? 1 : 0) << '\n';
        metric("casmig_files", "gauge", "Files in the manifests.");
        o << "casmig_files " << st->totals.files << '\n';
        metric("casmig_objects", "gauge", "Objects (distinct contents) in the CAS.");
        o << "casmig_objects " << st->totals.objects << '\n';
        metric("casmig_logical_bytes", "gauge", "Sum of the file sizes over all packages.");
        o << "casmig_logical_bytes " << st->totals.logical_bytes << '\n';
        metric("casmig_stored_bytes", "gauge", "Bytes under objects/.");
        o << "casmig_stored_bytes " << st->totals.stored_bytes << '\n';
        metric("casmig_saved_bytes", "gauge", "Logical bytes minus stored bytes.");
        o << "casmig_saved_bytes "
          << (st->totals.logical_bytes > st->totals.stored_bytes ? st->totals.logical_bytes - st->totals.stored_bytes : 0)
          << '\n';
    }
    // Each command's last run: this one's, the others carried over from the file being replaced.
    const std::string cmd = escape_label(run.command);
    auto runs = previous_runs(path);
    auto num = [](double v, bool fixed = false) {
        std::ostringstream t;
        if (fixed) t << std::fixed;
        t << v;
        return t.str();
    };
    runs["casmig_last_run_timestamp_seconds"][cmd] = num(now, true);
    runs["casmig_last_run_duration_seconds"][cmd] = num(run.seconds);
    runs["casmig_last_run_exit_code"][cmd] = std::to_string(run.exit_code);
    runs["casmig_last_run_failures"][cmd] = std::to_string(run.failures);
    if (run.exit_code == 0) runs["casmig_last_success_timestamp_seconds"][cmd] = num(now, true);
    const std::pair<const char*, const char*> described[] = {
        {"casmig_last_run_timestamp_seconds", "When the last run of each command ended (Unix time)."},
        {"casmig_last_run_duration_seconds", "How long the last run of each command took."},
        {"casmig_last_run_exit_code", "Exit code of each command's last run (0 ok, 1 failures, 2 usage, 3 refused, 4 busy)."},
        {"casmig_last_run_failures", "Problems each command's last run reported (failed packages, mismatches)."},
        {"casmig_last_success_timestamp_seconds", "When each command last exited 0 (Unix time)."}};
    for (const auto& [name, help] : described) {
        auto it = runs.find(name);
        if (it == runs.end() || it->second.empty()) continue;
        metric(name, "gauge", help);
        for (const auto& [c, v] : it->second) o << name << "{command=\"" << c << "\"} " << v << '\n';
    }
    // Atomically: a temp file in the same directory, durable, renamed over the old one.
    const std::string text = o.str();
    auto slash = path.rfind('/');
    const std::string dir = slash == std::string::npos ? "." : slash == 0 ? "/" : path.substr(0, slash);
    const std::string tmp = path + ".tmp." + std::to_string(::getpid());
    util::Fd fd(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0644));
    if (!fd) util::throw_errno("cannot write metrics file", tmp);
    try {
        util::write_all(fd.get(), text.data(), text.size(), tmp);
        util::fsync_fd(fd.get(), tmp);
        fd.reset();
        if (::rename(tmp.c_str(), path.c_str()) != 0) util::throw_errno("cannot replace metrics file", path);
    } catch (...) {
        ::unlink(tmp.c_str());
        throw;
    }
    util::Fd d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (d) ::fsync(d.get());
}

} // namespace casmig::lifecycle
