# The CUDA backend (src/transfer/cuda/): always part of libkvbm, since it loads the driver at
# run time and needs no CUDA to build. When nvcc is found (and KVBM_BUILD_CUDA_KERNELS is on),
# the gather/scatter kernel is compiled to a fatbin (sm_80, sm_90 SASS + compute_90 PTX for
# later GPUs), embedded as a byte array, and KVBM_HAVE_CUDA_KERNELS is defined; without nvcc
# the backend copies with DMA only.

set(KVBM_CUDA_DIR ${CMAKE_CURRENT_SOURCE_DIR}/src/transfer/cuda)
file(GLOB KVBM_CUDA_SOURCES CONFIGURE_DEPENDS ${KVBM_CUDA_DIR}/*.cpp)
# Tests and the GPU check programs are not library code.
list(FILTER KVBM_CUDA_SOURCES EXCLUDE REGEX "(_test|_main|_gpu|gpu_roundtrip)\\.cpp$")
target_sources(kvbm PRIVATE ${KVBM_CUDA_SOURCES})

set(KVBM_CUDA_ARCHS "80;90" CACHE STRING "SASS architectures of the embedded CUDA kernels (PTX of the last one is added)")
set(KVBM_HAVE_CUDA_KERNELS OFF)
if(KVBM_BUILD_CUDA_KERNELS)
  find_program(KVBM_NVCC nvcc HINTS ENV CUDACXX ENV CUDA_HOME PATHS /usr/local/cuda/bin /usr/local/bin)
  if(KVBM_NVCC)
    set(gencode)
    foreach(arch IN LISTS KVBM_CUDA_ARCHS)
      list(APPEND gencode -gencode arch=compute_${arch},code=sm_${arch})
    endforeach()
    list(GET KVBM_CUDA_ARCHS -1 ptx_arch)
    list(APPEND gencode -gencode arch=compute_${ptx_arch},code=compute_${ptx_arch})
    set(fatbin ${CMAKE_CURRENT_BINARY_DIR}/kvbm_kernels.fatbin)
    set(fatbin_cpp ${CMAKE_CURRENT_BINARY_DIR}/kvbm_kernels_fatbin.cpp)
    add_custom_command(OUTPUT ${fatbin}
      COMMAND ${KVBM_NVCC} -fatbin -O3 ${gencode} -o ${fatbin} ${KVBM_CUDA_DIR}/kernels.cu
      DEPENDS ${KVBM_CUDA_DIR}/kernels.cu
      COMMENT "nvcc: CUDA copy kernels -> fatbin (sm ${KVBM_CUDA_ARCHS})" VERBATIM)
    add_custom_command(OUTPUT ${fatbin_cpp}
      COMMAND ${CMAKE_COMMAND} -DINPUT=${fatbin} -DOUTPUT=${fatbin_cpp} -DSYMBOL=kvbm_cuda_fatbin
              -P ${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_fatbin.cmake
      DEPENDS ${fatbin} ${CMAKE_CURRENT_SOURCE_DIR}/cmake/embed_fatbin.cmake
      COMMENT "embedding the CUDA kernel fatbin" VERBATIM)
    target_sources(kvbm PRIVATE ${fatbin_cpp})
    target_compile_definitions(kvbm PRIVATE KVBM_HAVE_CUDA_KERNELS=1)
    set(KVBM_HAVE_CUDA_KERNELS ON)
    message(STATUS "kvbm: CUDA kernels compiled with ${KVBM_NVCC}")
  else()
    message(STATUS "kvbm: nvcc not found; the CUDA backend copies with DMA only")
  endif()
endif()

# The GPU check program (byte-exact round trips + benchmark); scripts/gpu_check.sh builds the
# same sources standalone on machines without kvbm's Debian dependencies.
add_executable(kvbm_gpu_check ${KVBM_CUDA_DIR}/gpu_check_main.cpp ${KVBM_CUDA_DIR}/gpu_roundtrip.cpp)
target_include_directories(kvbm_gpu_check PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
target_compile_options(kvbm_gpu_check PRIVATE ${KVBM_WARNINGS})
target_link_libraries(kvbm_gpu_check PRIVATE kvbm)

# GPU tests: their own binary, labelled "gpu"; scripts/test.sh runs `ctest -LE gpu`.
if(KVBM_BUILD_TESTS AND KVBM_HAVE_CUDA_KERNELS)
  find_package(GTest REQUIRED)
  add_executable(kvbm_gpu_tests ${KVBM_CUDA_DIR}/cuda_backend_gpu.cpp ${KVBM_CUDA_DIR}/gpu_roundtrip.cpp)
  target_include_directories(kvbm_gpu_tests PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_compile_options(kvbm_gpu_tests PRIVATE ${KVBM_WARNINGS})
  target_link_libraries(kvbm_gpu_tests PRIVATE kvbm GTest::gtest GTest::gtest_main)
  enable_testing()
  add_test(NAME kvbm_gpu_tests COMMAND kvbm_gpu_tests)
  set_tests_properties(kvbm_gpu_tests PROPERTIES LABELS gpu TIMEOUT 600)
endif()

# kvbm_tests is defined after this file is included: once the directory is processed, tell it
# whether an embedded kernel image must be there.
function(kvbm_cuda_test_definitions)
  if(TARGET kvbm_tests AND KVBM_HAVE_CUDA_KERNELS)
    target_compile_definitions(kvbm_tests PRIVATE KVBM_TEST_EXPECT_CUDA_KERNELS=1)
  endif()
endfunction()
cmake_language(DEFER CALL kvbm_cuda_test_definitions)
