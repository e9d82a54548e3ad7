// What the fuzz targets share: an invariant check that aborts (libFuzzer and the corpus replay
// both report an abort as a crash, with the message), whatever the build's NDEBUG.
#pragma once

#include <cstdio>
#include <cstdlib>

#define DSMOE_FUZZ_CHECK(cond)                                                          \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "%s:%d: invariant failed: %s\n", __FILE__, __LINE__, #cond); \
      std::abort();                                                                     \
    }                                                                                   \
  } while (0)
