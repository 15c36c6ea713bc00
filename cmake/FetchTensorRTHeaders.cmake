# gla_find_tensorrt_headers(<out-include-dir> <out-reason>)
#
# Finds the TensorRT C++ headers (10.x: IPluginV3) for the plugin, which links no TensorRT library:
#   1. TENSORRT_INCLUDE_DIR (CMake or environment variable), when it holds NvInferRuntime.h;
#   2. a TensorRT install: TENSORRT_ROOT / TensorRT_ROOT, the Debian/JetPack packages
#      (/usr/include/<triplet>), /usr/local/tensorrt, /opt/tensorrt;
#   3. else the headers of the wheel kernel-lens==2.0.1 (TensorRT 10.14, Apache-2.0), fetched at
#      configure time into the build folder by plugins/tensorrt/tools/fetch_tensorrt_headers.py
#      with `pip download` (pip's configured index, mirrors and proxies; sha256-pinned;
#      GLA_TENSORRT_HEADERS_WHEEL=<wheel on disk> works offline). Never committed.
# On failure <out-include-dir> is empty and <out-reason> says why.

function(_gla_tensorrt_major dir out)
  set(major "")
  if(EXISTS "${dir}/NvInferVersion.h")
    file(STRINGS "${dir}/NvInferVersion.h" lines REGEX "#define (NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE) ")
    foreach(line IN LISTS lines)
      if(line MATCHES "#define (NV_TENSORRT_MAJOR|TRT_MAJOR_ENTERPRISE) +([0-9]+)")
        set(major "${CMAKE_MATCH_2}")
      endif()
    endforeach()
  endif()
  set(${out} "${major}" PARENT_SCOPE)
endfunction()

function(_gla_tensorrt_usable dir out)
  set(ok OFF)
  if(dir AND EXISTS "${dir}/NvInferRuntime.h")
    _gla_tensorrt_major("${dir}" major)
    if(major AND major GREATER_EQUAL 10)
      set(ok ON)
    elseif(major)
      message(STATUS "gla-export: TensorRT headers in ${dir} are version ${major}; the plugin needs 10 or later")
    endif()
  endif()
  set(${out} ${ok} PARENT_SCOPE)
endfunction()

function(gla_find_tensorrt_headers out_dir out_reason)
  set(${out_dir} "" PARENT_SCOPE)
  set(candidates "")
  if(TENSORRT_INCLUDE_DIR)
    list(APPEND candidates "${TENSORRT_INCLUDE_DIR}")
  endif()
  if(DEFINED ENV{TENSORRT_INCLUDE_DIR})
    list(APPEND candidates "$ENV{TENSORRT_INCLUDE_DIR}")
  endif()
  foreach(root IN ITEMS "${TENSORRT_ROOT}" "${TensorRT_ROOT}" "$ENV{TENSORRT_ROOT}" "$ENV{TensorRT_ROOT}")
    if(root)
      list(APPEND candidates "${root}/include")
    endif()
  endforeach()
  if(CMAKE_LIBRARY_ARCHITECTURE)
    list(APPEND candidates "/usr/include/${CMAKE_LIBRARY_ARCHITECTURE}")
  endif()
  list(APPEND candidates /usr/include/x86_64-linux-gnu /usr/include/aarch64-linux-gnu /usr/include
       /usr/local/tensorrt/include /usr/local/TensorRT/include /opt/tensorrt/include)
  foreach(dir IN LISTS candidates)
    _gla_tensorrt_usable("${dir}" ok)
    if(ok)
      _gla_tensorrt_major("${dir}" major)
      message(STATUS "gla-export: TensorRT ${major} headers from ${dir}")
      set(${out_dir} "${dir}" PARENT_SCOPE)
      return()
    endif()
  endforeach()

  # No install: the headers of the kernel-lens wheel, once per build folder.
  set(dest "${CMAKE_BINARY_DIR}/_deps/tensorrt-headers")
  set(script "${PROJECT_SOURCE_DIR}/plugins/tensorrt/tools/fetch_tensorrt_headers.py")
  if(NOT Python_EXECUTABLE AND NOT Python3_EXECUTABLE)
    find_package(Python3 COMPONENTS Interpreter QUIET)
  endif()
  set(python "${Python_EXECUTABLE}")
  if(NOT python)
    set(python "${Python3_EXECUTABLE}")
  endif()
  if(NOT python)
    set(${out_reason} "no TensorRT headers found (set TENSORRT_INCLUDE_DIR) and no Python to fetch them" PARENT_SCOPE)
    return()
  endif()
  execute_process(COMMAND "${python}" "${script}" "${dest}"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_STRIP_TRAILING_WHITESPACE)
  if(NOT rc EQUAL 0)
    # the script's last line says why and to set TENSORRT_INCLUDE_DIR
    string(REGEX MATCH "[^\n]*$" last "${err}")
    set(${out_reason} "no TensorRT headers found, and fetching them failed: ${last}" PARENT_SCOPE)
    return()
  endif()
  message(STATUS "gla-export: ${out}")
  _gla_tensorrt_usable("${dest}" ok)
  if(NOT ok)
    set(${out_reason} "the fetched TensorRT headers in ${dest} are not usable" PARENT_SCOPE)
    return()
  endif()
  set(${out_dir} "${dest}" PARENT_SCOPE)
endfunction()
