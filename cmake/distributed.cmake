# The stand-alone worker process (tests spawn it; --bench-leader measures the op round trip).
add_executable(kvbm_worker_proc ${CMAKE_CURRENT_SOURCE_DIR}/src/distributed/worker_main.cpp)
target_include_directories(kvbm_worker_proc PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
target_compile_options(kvbm_worker_proc PRIVATE ${KVBM_WARNINGS})
target_link_libraries(kvbm_worker_proc PRIVATE kvbm PkgConfig::ZMQ)

if(TARGET kvbm_tests)
  # Process tests exec this binary; without it they skip.
  add_dependencies(kvbm_tests kvbm_worker_proc)
  target_compile_definitions(kvbm_tests PRIVATE KVBM_WORKER_PROC="$<TARGET_FILE:kvbm_worker_proc>")
endif()

# libFuzzer target for the wire decoder: only with clang (g++ has no -fsanitize=fuzzer).
if(CMAKE_CXX_COMPILER_ID MATCHES "Clang")
  add_executable(kvbm_message_fuzz ${CMAKE_CURRENT_SOURCE_DIR}/src/distributed/message_fuzz.cpp)
  target_include_directories(kvbm_message_fuzz PRIVATE ${CMAKE_CURRENT_SOURCE_DIR}/src)
  target_compile_options(kvbm_message_fuzz PRIVATE -fsanitize=fuzzer,address)
  target_link_options(kvbm_message_fuzz PRIVATE -fsanitize=fuzzer,address)
  target_link_libraries(kvbm_message_fuzz PRIVATE kvbm)
endif()
