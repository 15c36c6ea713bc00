# gla_onnxruntime_headers(<out-include-dir> <out-why>)
#
# Where the ONNX Runtime C/C++ API headers are (DESIGN.md §4), never vendored in the repository:
#   1. ONNXRUNTIME_INCLUDE_DIR (CMake variable or environment): a folder holding
#      onnxruntime_c_api.h, directly or in an onnxruntime/ subfolder;
#   2. else tools/fetch_onnxruntime_headers.sh fetches Debian trixie's libonnxruntime-dev
#      1.21.0+dfsg-1 (sha256-pinned) into the build folder, once, through apt and only from the
#      Debian mirrors apt is configured with; later configures reuse it. Without such a source the
#      script fails with one line saying to set ONNXRUNTIME_INCLUDE_DIR.
# On failure <out-include-dir> is empty and <out-why> says why, so the caller can build everything
# else and report it.
set(GLA_ORT_HEADERS_PIN "libonnxruntime-dev 1.21.0+dfsg-1 14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08")
set(GLA_ORT_MIN_API_VERSION 16)  # Lite custom-op API, KernelContext_ParallelFor, GetGPUComputeStream

function(_gla_ort_api_version dir out)
  file(STRINGS "${dir}/onnxruntime_c_api.h" line REGEX "^#define ORT_API_VERSION [0-9]+")
  string(REGEX REPLACE "^#define ORT_API_VERSION ([0-9]+).*" "\\1" version "${line}")
  set(${out} "${version}" PARENT_SCOPE)
endfunction()

function(gla_onnxruntime_headers out_dir out_why)
  set(${out_dir} "" PARENT_SCOPE)
  set(given "${ONNXRUNTIME_INCLUDE_DIR}")
  if(NOT given AND DEFINED ENV{ONNXRUNTIME_INCLUDE_DIR})
    set(given "$ENV{ONNXRUNTIME_INCLUDE_DIR}")
  endif()

  if(given)
    set(dir "")
    foreach(candidate "${given}" "${given}/onnxruntime" "${given}/onnxruntime/core/session")
      if(EXISTS "${candidate}/onnxruntime_c_api.h")
        set(dir "${candidate}")
        break()
      endif()
    endforeach()
    if(NOT dir)
      set(${out_why} "ONNXRUNTIME_INCLUDE_DIR=${given} has no onnxruntime_c_api.h" PARENT_SCOPE)
      return()
    endif()
  else()
    set(cache "${CMAKE_BINARY_DIR}/_deps/onnxruntime-headers")
    set(stamp "")
    if(EXISTS "${cache}/STAMP")
      file(READ "${cache}/STAMP" stamp)
      string(STRIP "${stamp}" stamp)
    endif()
    if(NOT stamp STREQUAL GLA_ORT_HEADERS_PIN OR NOT EXISTS "${cache}/include/onnxruntime_c_api.h")
      message(STATUS "gla-export: fetching the ONNX Runtime headers (${GLA_ORT_HEADERS_PIN})")
      execute_process(
        COMMAND bash "${PROJECT_SOURCE_DIR}/tools/fetch_onnxruntime_headers.sh" "${cache}"
        RESULT_VARIABLE rc
        OUTPUT_VARIABLE out
        ERROR_VARIABLE err
        TIMEOUT 300)
      if(NOT rc EQUAL 0)
        # the script's last line says why (and to set ONNXRUNTIME_INCLUDE_DIR); earlier ones are progress
        string(STRIP "${err}" err)
        string(REGEX MATCH "[^\n]*$" last "${err}")
        if(NOT last)
          set(last "fetch_onnxruntime_headers.sh failed (${rc}); set ONNXRUNTIME_INCLUDE_DIR to a folder with onnxruntime_c_api.h")
        endif()
        set(${out_why} "${last}" PARENT_SCOPE)
        return()
      endif()
    endif()
    set(dir "${cache}/include")
  endif()

  _gla_ort_api_version("${dir}" api)
  if(NOT api OR api LESS GLA_ORT_MIN_API_VERSION)
    set(${out_why} "the ONNX Runtime headers in ${dir} have API version '${api}', at least ${GLA_ORT_MIN_API_VERSION} is needed" PARENT_SCOPE)
    return()
  endif()
  message(STATUS "gla-export: ONNX Runtime headers ${dir} (API version ${api})")
  set(${out_dir} "${dir}" PARENT_SCOPE)
  set(${out_why} "" PARENT_SCOPE)
endfunction()
