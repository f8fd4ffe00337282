// sqllm/error.hpp -- the single error type of the library and its check macro.
//
// Every check on user input throws sqllm::Error with a message naming the
// argument and the offending value; nothing in the library asserts or aborts
// on bad input.  The pybind11 module maps sqllm::Error to Python's ValueError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>
#include <utility>

namespace sqllm {

class Error : public std::invalid_argument {
 public:
  explicit Error(const std::string& what) : std::invalid_argument(what) {}
};

/// A failure of the machine rather than of the arguments (a CUDA launch or
/// runtime error).  Python sees RuntimeError.
class RuntimeFailure : public std::runtime_error {
 public:
  explicit RuntimeFailure(const std::string& what) : std::runtime_error(what) {}
};

namespace detail {
inline void append_all(std::ostringstream&) {}
template <class T, class... Rest>
void append_all(std::ostringstream& os, const T& first, const Rest&... rest) {
  os << first;
  append_all(os, rest...);
}
template <class... Args>
std::string concat(const Args&... args) {
  std::ostringstream os;
  append_all(os, args...);
  return os.str();
}
}  // namespace detail

}  // namespace sqllm

/// Throw sqllm::Error built from the remaining arguments when `cond` is false.
/// Usage: SQLLM_CHECK(bits >= 1 && bits <= 8, "bits must be in 1..8, got ", bits);
#define SQLLM_CHECK(cond, ...)                                   \
  do {                                                           \
    if (!(cond)) {                                               \
      throw ::sqllm::Error(::sqllm::detail::concat(__VA_ARGS__)); \
    }                                                            \
  } while (0)
