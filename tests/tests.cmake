# Test registration. Labels: unit (cmocka), integration (real processes: mpirun, sockets, Slurm),
# reference (PyTorch / h5py comparisons run with Debian's /usr/bin/python3; tests/reference/ref_*.py run with
# scripts/pyref: PyPI's transformers / tokenizers / gguf in the cached venv that scripts/setup.sh makes).
set(ST_PYTHON /usr/bin/python3 CACHE FILEPATH "python with Debian's torch, numpy, h5py")

if(CMOCKA_FOUND)
  file(GLOB ST_UNIT_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/unit/test_*.c)
  foreach(src ${ST_UNIT_TESTS})
    get_filename_component(name ${src} NAME_WE)
    add_executable(${name} ${src})
    target_link_libraries(${name} PRIVATE shardtune_lib PkgConfig::CMOCKA)
    add_test(NAME unit.${name} COMMAND ${name})
    set_tests_properties(unit.${name} PROPERTIES LABELS unit TIMEOUT 300
      ENVIRONMENT "OMP_NUM_THREADS=2;SHARDTUNE_BIN=$<TARGET_FILE:shardtune>;ST_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
  endforeach()
endif()

# Helper programs used by integration/reference tests (tests/tools/*.c).
file(GLOB ST_TEST_TOOLS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/tools/*.c)
foreach(src ${ST_TEST_TOOLS})
  get_filename_component(name ${src} NAME_WE)
  add_executable(${name} ${src})
  target_link_libraries(${name} PRIVATE shardtune_lib)
endforeach()

# Shell and python tests: tests/integration/*.sh and tests/reference/test_*.py
set(ST_PYREF ${CMAKE_SOURCE_DIR}/scripts/pyref)
set(ST_TEST_ENV "SHARDTUNE_BIN=$<TARGET_FILE:shardtune>;ST_PYREF=${ST_PYREF};TRANSFORMERS_VERBOSITY=error;HF_HUB_OFFLINE=1;ST_BUILD_DIR=${CMAKE_BINARY_DIR};ST_SOURCE_DIR=${CMAKE_SOURCE_DIR};ST_PYTHON=${ST_PYTHON};OMPI_ALLOW_RUN_AS_ROOT=1;OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1;OMPI_MCA_rmaps_base_oversubscribe=1")
file(GLOB ST_INTEGRATION_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/integration/test_*.sh)
foreach(src ${ST_INTEGRATION_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_test(NAME integration.${name} COMMAND bash ${src})
  set_tests_properties(integration.${name} PROPERTIES LABELS integration TIMEOUT 600 ENVIRONMENT "${ST_TEST_ENV}")
endforeach()
file(GLOB ST_REFERENCE_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/reference/test_*.py)
foreach(src ${ST_REFERENCE_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_test(NAME reference.${name} COMMAND ${ST_PYTHON} ${src})
  set_tests_properties(reference.${name} PROPERTIES LABELS reference TIMEOUT 900 ENVIRONMENT "${ST_TEST_ENV}")
endforeach()

file(GLOB ST_PYREF_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/reference/ref_*.py)
foreach(src ${ST_PYREF_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_test(NAME reference.${name} COMMAND bash ${ST_PYREF} ${src})
  set_tests_properties(reference.${name} PROPERTIES LABELS reference TIMEOUT 900 ENVIRONMENT "${ST_TEST_ENV}")
endforeach()

# worker/comm.c's NCCL path (no #ifdef: it runs in every build), on the CPU against a fake NCCL that checks
# stream order (tests/tools/nccl_fake.c), for each ZeRO stage, and on one rank through the one-rank NCCL
# switch (SHARDTUNE_NCCL_ONE_RANK=1); the checker must also catch an injected race.
set(ST_MPIRUN mpirun --oversubscribe -np 3)
foreach(stage 0 1 2)
  add_test(NAME cuda.nccl_path_zero${stage} COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage ${stage})
  set_tests_properties(cuda.nccl_path_zero${stage} PROPERTIES LABELS cuda TIMEOUT 300 ENVIRONMENT "${ST_TEST_ENV}")
  add_test(NAME cuda.nccl_path_one_rank_zero${stage} COMMAND mpirun -np 1 $<TARGET_FILE:nccl_fake> --stage ${stage})
  set_tests_properties(cuda.nccl_path_one_rank_zero${stage} PROPERTIES LABELS cuda TIMEOUT 300
    ENVIRONMENT "${ST_TEST_ENV};SHARDTUNE_NCCL_ONE_RANK=1")
endforeach()
add_test(NAME cuda.nccl_path_zero2_blocking COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 2 --no-overlap)
set_tests_properties(cuda.nccl_path_zero2_blocking PROPERTIES LABELS cuda TIMEOUT 300 ENVIRONMENT "${ST_TEST_ENV}")
add_test(NAME cuda.nccl_path_catches_race COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 2 --inject-race)
set_tests_properties(cuda.nccl_path_catches_race PROPERTIES LABELS cuda TIMEOUT 300 WILL_FAIL TRUE
  ENVIRONMENT "${ST_TEST_ENV}")
