/* LD_PRELOAD shim for running aarch64 ONNX Runtime under qemu-user (tools/arm64/test.sh only).
 *
 * qemu-user (7.2, Debian 12) passes the host's /proc/cpuinfo through to the guest, so an aarch64
 * program reads an x86 processor's description there. ONNX Runtime's CPU detection (the cpuinfo
 * library) finds no Arm processor in it and crashes with a null dereference while the session is
 * created. This shim opens the file named by GLA_FAKE_CPUINFO whenever /proc/cpuinfo is opened;
 * every other path goes to the C library unchanged. Not for real Arm machines: they need nothing.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char* redirect(const char* path) {
  const char* fake = getenv("GLA_FAKE_CPUINFO");
  if (path && fake && *fake && strcmp(path, "/proc/cpuinfo") == 0) return fake;
  return path;
}

static mode_t mode_arg(int flags, va_list ap) {
  return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE ? (mode_t)va_arg(ap, int) : 0;
}

#define GLA_NEXT(name, type) ((type)dlsym(RTLD_NEXT, name))

typedef int (*open_fn)(const char*, int, ...);
typedef int (*openat_fn)(int, const char*, int, ...);
typedef int (*open2_fn)(const char*, int);
typedef int (*openat2_fn)(int, const char*, int);
typedef FILE* (*fopen_fn)(const char*, const char*);

#define GLA_OPEN(name)                                       \
  int name(const char* path, int flags, ...) {               \
    va_list ap;                                              \
    va_start(ap, flags);                                     \
    const mode_t mode = mode_arg(flags, ap);                 \
    va_end(ap);                                              \
    return GLA_NEXT(#name, open_fn)(redirect(path), flags, mode); \
  }
#define GLA_OPENAT(name)                                            \
  int name(int dir, const char* path, int flags, ...) {             \
    va_list ap;                                                     \
    va_start(ap, flags);                                            \
    const mode_t mode = mode_arg(flags, ap);                        \
    va_end(ap);                                                     \
    return GLA_NEXT(#name, openat_fn)(dir, redirect(path), flags, mode); \
  }

GLA_OPEN(open)
GLA_OPEN(open64)
GLA_OPENAT(openat)
GLA_OPENAT(openat64)
int __open_2(const char* path, int flags) { return GLA_NEXT("__open_2", open2_fn)(redirect(path), flags); }
int __open64_2(const char* path, int flags) { return GLA_NEXT("__open64_2", open2_fn)(redirect(path), flags); }
int __openat_2(int dir, const char* path, int flags) {
  return GLA_NEXT("__openat_2", openat2_fn)(dir, redirect(path), flags);
}
int __openat64_2(int dir, const char* path, int flags) {
  return GLA_NEXT("__openat64_2", openat2_fn)(dir, redirect(path), flags);
}
FILE* fopen(const char* path, const char* mode) { return GLA_NEXT("fopen", fopen_fn)(redirect(path), mode); }
FILE* fopen64(const char* path, const char* mode) { return GLA_NEXT("fopen64", fopen_fn)(redirect(path), mode); }
