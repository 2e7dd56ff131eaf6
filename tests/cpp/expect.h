// The check macro of the C++ tests: counts failures, prints the first 20 with the values
// the format arguments give, and lets the test go on (a test's main returns
// q2ext_test::exit_code("name")).
#pragma once

#include <cstdio>

namespace q2ext_test {
inline int failures = 0;

inline int exit_code(const char* name) {
  std::printf("%s: %s (%d failures)\n", name, failures ? "FAILED" : "OK", failures);
  return failures ? 1 : 0;
}
}  // namespace q2ext_test

#define EXPECT(cond, ...)                              \
  do {                                                 \
    if (!(cond) && ++q2ext_test::failures < 20) {      \
      std::printf("FAIL %s: ", #cond);                 \
      std::printf(__VA_ARGS__);                        \
      std::printf("\n");                               \
    }                                                  \
  } while (0)
