#include "casmig/util/error.hpp"

#include <cerrno>
#include <cstring>

namespace casmig::util {

SystemError::SystemError(const std::string& what, const std::string& path, int err)
    : Error(what + (path.empty() ? "" : ": " + path) + ": " + std::strerror(err)), m_errno(err) {}

void throw_errno(const std::string& what, const std::string& path) {
    throw SystemError(what, path, errno);
}

} // namespace casmig::util
