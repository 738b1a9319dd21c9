// How the C++ shims report failures to Rust: a strdup'd message in `*error`, freed by the
// Rust side through the shim's free function.
#pragma once

#include <cstdlib>
#include <cstring>
#include <exception>

#include <c10/util/Exception.h>

namespace cresset {
inline void set_error(char** error, const char* what) {
  if (error) *error = strdup(what);
}

// `body()`, or `failed` with `*error` set when it throws (libtorch's c10::Error without its
// backtrace; other exceptions by their what()).
template <typename R, typename F>
R guarded(char** error, R failed, F&& body) {
  try {
    return body();
  } catch (const c10::Error& e) {
    set_error(error, e.what_without_backtrace());
  } catch (const std::exception& e) {
    set_error(error, e.what());
  } catch (...) {
    set_error(error, "unknown C++ exception");
  }
  return failed;
}
}  // namespace cresset
