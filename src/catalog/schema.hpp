// Internal: the catalog's named schema migrations, applied in order, each in its own transaction.
#pragma once
#include <vector>

namespace casmig::catalog::detail {

struct Migration {
    const char* name;
    const char* sql;
};

/// Migration i brings the schema from user_version i to i+1. Never edit a released migration:
/// append a new one.
const std::vector<Migration>& migrations();

} // namespace casmig::catalog::detail
