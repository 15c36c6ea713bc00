// Internal: recording why a launcher failed. The message is per thread, so concurrent sessions do
// not overwrite each other's explanations; last_error_message() (kernels.h) reads it back.
#pragma once

#include "gla/kernels.h"

namespace gla {
namespace detail {

#if defined(__GNUC__)
#define GLA_PRINTF_FORMAT(fmt_index, first_arg) __attribute__((format(printf, fmt_index, first_arg)))
#else
#define GLA_PRINTF_FORMAT(fmt_index, first_arg)
#endif

// Records a printf-style message and returns `status`, so a check reads
//     if (bad) return fail(Status::kInvalidArgument, "head_dim_k must be positive, got %d", k);
Status fail(Status status, const char* fmt, ...) GLA_PRINTF_FORMAT(2, 3);

// Forgets the previous failure (called on entry by every launcher).
void clear_error();

}  // namespace detail
}  // namespace gla
