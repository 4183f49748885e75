# libFuzzer targets (fuzz/): -DKVBM_BUILD_FUZZERS=ON with clang 16 or newer (scripts/fuzz.sh
# configures build-fuzz/ that way). Each target links only the decoder it fuzzes, compiled with
# the fuzzer's coverage instrumentation and ASan + UBSan.
if(NOT CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  message(FATAL_ERROR "KVBM_BUILD_FUZZERS needs clang (CMAKE_CXX_COMPILER=clang++-16): "
                      "g++ has no -fsanitize=fuzzer")
endif()
if(CMAKE_CXX_COMPILER_VERSION VERSION_LESS 16)
  message(FATAL_ERROR "KVBM_BUILD_FUZZERS needs clang >= 16 (std::expected with libstdc++ 12)")
endif()

# libstdc++ 12 offers std::expected only when __cpp_concepts >= 202002L; clang 16 implements
# what that needs (conditionally trivial special members, P0848) but still reports 201907L.
set(KVBM_FUZZ_COMPILE_OPTIONS -U__cpp_concepts -D__cpp_concepts=202002L -Wno-builtin-macro-redefined
    -fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined
    -fno-omit-frame-pointer -g)
set(KVBM_FUZZ_SANITIZERS -fsanitize=fuzzer,address,undefined)

add_library(kvbm_fuzz_core STATIC
  ${CMAKE_CURRENT_SOURCE_DIR}/src/common/config.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/src/common/error.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/src/common/log.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/src/connector/connector_ops.cpp
  ${CMAKE_CURRENT_SOURCE_DIR}/src/tools/trace.cpp)
target_include_directories(kvbm_fuzz_core PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include
                                          PRIVATE ${MSGPACK_INCLUDE_DIR})
target_compile_definitions(kvbm_fuzz_core PRIVATE MSGPACK_NO_BOOST)
target_compile_options(kvbm_fuzz_core PUBLIC ${KVBM_FUZZ_COMPILE_OPTIONS})
target_link_libraries(kvbm_fuzz_core PUBLIC fmt::fmt)

set(KVBM_FUZZ_TARGETS step_metadata trace_parser config)
foreach(name IN LISTS KVBM_FUZZ_TARGETS)
  add_executable(${name}_fuzz ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/${name}_fuzz.cpp)
  target_link_options(${name}_fuzz PRIVATE ${KVBM_FUZZ_SANITIZERS})
  target_link_libraries(${name}_fuzz PRIVATE kvbm_fuzz_core)
endforeach()

# Regenerates fuzz/corpus/step_metadata from real encoded messages.
add_executable(kvbm_fuzz_seeds ${CMAKE_CURRENT_SOURCE_DIR}/fuzz/make_seeds.cpp)
target_link_options(kvbm_fuzz_seeds PRIVATE -fsanitize=address,undefined)
target_link_libraries(kvbm_fuzz_seeds PRIVATE kvbm_fuzz_core)
list(TRANSFORM KVBM_FUZZ_TARGETS APPEND _fuzz OUTPUT_VARIABLE kvbm_fuzz_executables)
add_custom_target(kvbm_fuzzers DEPENDS ${kvbm_fuzz_executables} kvbm_fuzz_seeds)
