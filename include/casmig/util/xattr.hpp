// casmig::util — extended attributes (file capabilities, ACLs, SELinux labels) as one byte string.
//
// Encoding (stored in the catalog's entries.xattrs): for each attribute, sorted by name:
//   u32 name length (little endian) | name bytes | u32 value length (little endian) | value bytes
// The empty string means "no extended attributes".
#pragma once
#include <string>

namespace casmig::util {

/// Every extended attribute of the open file fd, encoded as above. Throws SystemError naming
/// `display` on failure other than "not supported".
std::string read_xattrs(int fd, const std::string& display);
/// Sets every encoded attribute on fd (after data, owner and mode: a write or chown clears
/// security.capability). Attributes the filesystem does not support are skipped; EPERM is an error
/// only for root. Throws SystemError naming `display`.
void write_xattrs(int fd, const std::string& encoded, const std::string& display);

} // namespace casmig::util
