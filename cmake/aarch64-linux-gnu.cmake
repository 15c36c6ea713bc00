# CMake toolchain file: cross-compile for 64-bit Arm Linux (aarch64: Jetson, Raspberry Pi 4/5,
# Graviton, Ampere) with Debian's cross toolchain (apt-get install g++-aarch64-linux-gnu).
# Used by tools/arm64/build.sh; by hand:
#   cmake -S . -B build/arm64 -DCMAKE_TOOLCHAIN_FILE=cmake/aarch64-linux-gnu.cmake -DGLA_WITH_CUDA=OFF
#
# GLA_AARCH64_TRIPLE (cache or environment) names another cross toolchain prefix.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)

if(NOT GLA_AARCH64_TRIPLE)
  if(DEFINED ENV{GLA_AARCH64_TRIPLE})
    set(GLA_AARCH64_TRIPLE "$ENV{GLA_AARCH64_TRIPLE}")
  else()
    set(GLA_AARCH64_TRIPLE aarch64-linux-gnu)
  endif()
endif()
# try_compile projects re-read this file: hand the triple on to them
list(APPEND CMAKE_TRY_COMPILE_PLATFORM_VARIABLES GLA_AARCH64_TRIPLE)

set(CMAKE_C_COMPILER ${GLA_AARCH64_TRIPLE}-gcc)
set(CMAKE_CXX_COMPILER ${GLA_AARCH64_TRIPLE}-g++)
# nvcc compiles host code with the cross g++ (CUDA builds only)
set(CMAKE_CUDA_HOST_COMPILER ${GLA_AARCH64_TRIPLE}-g++)

# Debian's multiarch-free cross sysroot: headers and libraries under /usr/<triple>
set(CMAKE_FIND_ROOT_PATH /usr/${GLA_AARCH64_TRIPLE})
set(CMAKE_FIND_ROOT_PATH_MODE_PROGRAM NEVER)
set(CMAKE_FIND_ROOT_PATH_MODE_LIBRARY ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_INCLUDE ONLY)
set(CMAKE_FIND_ROOT_PATH_MODE_PACKAGE ONLY)
