# Sourced by benchmarks/gpu_kernels.sh and benchmarks/bench_prefill_gpu.sh (not run on its own):
# the start both share. `kernels_setup BUILD_DIR` records the GPU in $OUT/gpu.txt, installs the fla
# peer wheels of .whl/fla/ (if any) to /tmp/site, puts the tree on PYTHONPATH, takes a carried
# GLA_EXPORT_LIB_DIR holding libgla_kernels_capi.so or (when the caller's step "build" is on)
# builds it in BUILD_DIR for this GPU (GLA_CUDA_ARCHITECTURES overrides), and checks that the library
# has CUDA kernels. Needs the caller's $OUT, note() and step(); returns non-zero on failure.
kernels_setup() {
  local build_dir=$1 t_setup=$SECONDS arch
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  if ls .whl/fla/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/fla/*.whl \
      && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

  if [ -n "${GLA_EXPORT_LIB_DIR:-}" ] && [ -f "$GLA_EXPORT_LIB_DIR/libgla_kernels_capi.so" ]; then
    note "library: carried $GLA_EXPORT_LIB_DIR/libgla_kernels_capi.so"
  elif step build; then
    arch=${GLA_CUDA_ARCHITECTURES:-$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1 | tr -d .)}
    note "building libgla_kernels_capi for sm_$arch"
    { cmake -S . -B "$build_dir" -DGLA_CUDA_ARCHITECTURES="$arch" -DGLA_WITH_ORT=OFF -DGLA_WITH_TRT=OFF \
        -DGLA_WITH_RUNNER=OFF -DCMAKE_BUILD_TYPE=Release \
      && cmake --build "$build_dir" --target gla_kernels_capi -j"$(nproc)"; } > "$OUT/build.log" 2>&1 \
      || { note "build FAILED (see build.log)"; tail -30 "$OUT/build.log"; return 1; }
    export GLA_EXPORT_LIB_DIR=$PWD/$build_dir/plugins/kernels
    note "built in $((SECONDS - t_setup)) s"
  fi
  python3 -c "from gla_export.ops.native import cuda_compiled; assert cuda_compiled(), 'no CUDA kernels in the library'" \
    || { note "library has no CUDA kernels"; return 1; }
}
