// How the C++ in csrc/ hands errors to Rust: every exported function runs its body through
// `guarded`, which catches any C++ exception (none may unwind into Rust) and returns its message
// malloc'd (NULL on success); Rust frees it with charlm_free.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

namespace charlm {

inline char* copy_message(const std::string& message) {
  char* out = static_cast<char*>(std::malloc(message.size() + 1));
  if (out != nullptr) std::memcpy(out, message.c_str(), message.size() + 1);
  return out;
}

// c10::Error's what() carries a C++ backtrace; what_without_backtrace() is the part a user can
// act on.
template <typename F>
char* guarded(F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message("unknown C++ exception");
  }
}

}  // namespace charlm
