// casmig::util — error types. Exceptions are for failures; normal outcomes (a file vanished, an object
// already exists) are return values. util depends on nothing specific to casmig.
#pragma once
#include <stdexcept>
#include <optional>
#include <string>
#include <string_view>

namespace casmig::util {

/// Base of every casmig failure. what() is one line: what, where, what to do.
class Error : public std::runtime_error {
public:
    explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

/// A failed system call; records errno. Message: "<what>: <path>: <strerror>".
class SystemError : public Error {
public:
    SystemError(const std::string& what, const std::string& path, int err);
    int code() const noexcept { return m_errno; }

private:
    int m_errno;
};

/// Bad input from the user (unknown package, bad option value, missing store): exit code 2.
class UsageError : public Error {
public:
    using Error::Error;
};

/// A precondition of the command does not hold; the store is unchanged: exit code 3.
class RefusedError : public Error {
public:
    using Error::Error;
};

/// Another casmig holds the store lock: exit code 4.
class BusyError : public Error {
public:
    using Error::Error;
};

/// Throws SystemError(what, path, errno) — the one place a failed syscall becomes an exception.
[[noreturn]] void throw_errno(const std::string& what, const std::string& path);

/// Printable form of a byte path: non-printable and non-UTF-8 bytes as \xNN, so one error stays one line.
std::string printable(std::string_view bytes);
/// The bytes a printable() form stands for: each \xNN (two hex digits, either case) is one byte, every
/// other character itself. nullopt if a backslash starts anything else (then the text is not such a
/// form). printable() escapes the backslash itself (\x5c), so unprintable(printable(b)) == b for any b.
std::optional<std::string> unprintable(std::string_view text);


} // namespace casmig::util
