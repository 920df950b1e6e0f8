# Test registration. Labels: unit (cmocka), integration (real processes: mpirun, sockets, Slurm),
# reference (PyTorch / h5py comparisons run with Debian's /usr/bin/python3; tests/reference/ref_*.py run with
# scripts/pyref: PyPI's transformers / tokenizers / gguf in the cached venv that scripts/setup.sh makes;
# tests/reference/peft_*.py with scripts/pyref --torch: PyPI torch 2.x + transformers + peft, a second venv),
# cuda (CUDA builds only), and fast: every test not named in ST_SLOW_TESTS, for the edit-test loop
# (`./run test -L fast`; README). A test that cannot run exits 77 and ctest reports it as skipped
# (SKIP_RETURN_CODE), never as passed.
set(ST_PYTHON /usr/bin/python3 CACHE FILEPATH "python with Debian's torch, numpy, h5py")

# Tests that take over ~8 s in `./run test` on 2 idle cores (measured 2026-12-06; README has the numbers):
# not `fast`, which keeps the fast label near 1.5 min. A new test that takes that long belongs here.
set(ST_SLOW_TESTS
  unit.test_kernels_cpu unit.test_gguf_kquant integration.test_ckpt_resume integration.test_ckpt_async integration.test_faults integration.test_slurm_cancel
  integration.test_slurm_requeue integration.test_slurm_resize reference.test_curve
  reference.test_dp_equivalence reference.test_dp_errors reference.test_dp_memory
  reference.test_monitor_train reference.test_telemetry_client reference.test_act_ckpt reference.test_zero3
  integration.test_bf16_train integration.test_device_failure integration.test_peft_device integration.test_distill_train integration.test_distill_int8 reference.test_distill_int8 integration.test_distill_zero3 integration.test_distill_zero3_device integration.test_zero3_device integration.test_zero3_device_peft integration.test_zero3_device_qlora integration.test_zero3_device_qload integration.test_zero3_device_edges integration.test_zero2_device integration.test_divergence
  integration.test_zero3_qload integration.test_first_hour integration.test_gpu_smoke_selftest integration.test_packing_train
  integration.test_pack_text_stream integration.test_resume_safety integration.test_train_epochs
  integration.test_watchdog reference.test_generate_torch reference.test_lora_train
  reference.test_prompt_train reference.test_qlora_train reference.test_peft_bf16 reference.ref_rope_models
  integration.test_qlora_readers
  reference.test_train_samples reference.llamacpp_gguf integration.test_zero3_kill reference.ref_stream_io
  reference.peft_adapters reference.test_peft_modes_bf16 reference.peft_generate_prompt
  reference.test_bf16_torch reference.llamacpp_lora reference.ref_prompt_text_init
  reference.test_frozen_bf16 reference.test_frozen_bf16_peft reference.test_frozen_bf16_device reference.test_generate_bf16 reference.test_generate_bf16_device
  reference.test_frozen_bf16_zero3 reference.test_frozen_bf16_zero3_resume reference.test_zero3_reshard reference.test_zero3_reshard_device
  reference.test_frozen_bf16_device_zero3
  integration.test_norm_in_reduction)

# The only tests that run a second time after a failure (tests/retry_once.sh, ctest's --repeat
# until-pass:2 for one test): each starts a throw-away local Slurm cluster (munged, slurmctld, two slurmd),
# an external source of flakiness on a loaded machine; a second failure fails. Nothing else is retried.
set(ST_RETRY_TESTS
  integration.test_slurm_cancel integration.test_slurm_requeue integration.test_slurm_resize
  integration.test_slurm_srun)

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
  if(ST_HAVE_DNNL) # the default sgemm depends on the CPU (oneDNN on AVX-512, else OpenBLAS): both libraries run
    # the matmul tests against the same float64 bounds, and QLoRA's fused-vs-unfused bits under oneDNN whatever the CPU
    foreach(lib onednn openblas)
      add_test(NAME unit.test_kernels_cpu_${lib} COMMAND test_kernels_cpu)
      set_tests_properties(unit.test_kernels_cpu_${lib} PROPERTIES LABELS unit TIMEOUT 300
        ENVIRONMENT "OMP_NUM_THREADS=2;SHARDTUNE_SGEMM=${lib};ST_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
    endforeach()
    add_test(NAME unit.test_qlora_onednn COMMAND test_qlora)
    set_tests_properties(unit.test_qlora_onednn PROPERTIES LABELS unit TIMEOUT 300
      ENVIRONMENT "OMP_NUM_THREADS=2;SHARDTUNE_SGEMM=onednn;SHARDTUNE_BIN=$<TARGET_FILE:shardtune>;ST_SOURCE_DIR=${CMAKE_SOURCE_DIR}")
  endif()
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
  if(integration.${name} IN_LIST ST_RETRY_TESTS)
    add_test(NAME integration.${name} COMMAND bash ${CMAKE_SOURCE_DIR}/tests/retry_once.sh bash ${src})
  else()
    add_test(NAME integration.${name} COMMAND bash ${src})
  endif()
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

# llama.cpp itself (tests/reference/llamacpp_*.py, run with `scripts/pyref --llama`: libllama built from PyPI's
# llama-cpp-python by scripts/build_llama.sh)
file(GLOB ST_LLAMA_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/reference/llamacpp_*.py)
foreach(src ${ST_LLAMA_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_test(NAME reference.${name} COMMAND bash ${ST_PYREF} --llama ${src})
  set_tests_properties(reference.${name} PROPERTIES LABELS reference TIMEOUT 900 ENVIRONMENT "${ST_TEST_ENV}")
endforeach()
# llamacpp_gguf fine-tunes four models with `shardtune train` too (~2 CPU-minutes, 8+ wall minutes under load)
set_tests_properties(reference.llamacpp_gguf PROPERTIES TIMEOUT 1800)

# the real transformers models and peft (tests/reference/peft_*.py, run with `scripts/pyref --torch`)
file(GLOB ST_PYREF_TORCH_TESTS CONFIGURE_DEPENDS ${CMAKE_SOURCE_DIR}/tests/reference/peft_*.py)
foreach(src ${ST_PYREF_TORCH_TESTS})
  get_filename_component(name ${src} NAME_WE)
  add_test(NAME reference.${name} COMMAND bash ${ST_PYREF} --torch ${src})
  set_tests_properties(reference.${name} PROPERTIES LABELS reference TIMEOUT 900 ENVIRONMENT "${ST_TEST_ENV}")
endforeach()

# peft_adapters runs each gradient check's float64 model 3 more times under fp32_error.py's error model (every
# aten op through a Python dispatch mode): 830 s at load 18 on 2 cores (167 s before at load 14), past 900
set_tests_properties(reference.peft_adapters PROPERTIES TIMEOUT 1800)

# worker/comm.c's NCCL path (no #ifdef: it runs in every build), on the CPU against a fake NCCL that checks
# stream order (tests/tools/nccl_fake.c), for each ZeRO stage, and on one rank through the one-rank NCCL
# switch (SHARDTUNE_NCCL_ONE_RANK=1); the checker must also catch an injected race.
set(ST_MPIRUN mpirun --oversubscribe -np 3)
foreach(stage 0 1 2 3)
  add_test(NAME cuda.nccl_path_zero${stage} COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage ${stage})
  set_tests_properties(cuda.nccl_path_zero${stage} PROPERTIES LABELS cuda TIMEOUT 300 ENVIRONMENT "${ST_TEST_ENV}")
  add_test(NAME cuda.nccl_path_one_rank_zero${stage} COMMAND mpirun -np 1 $<TARGET_FILE:nccl_fake> --stage ${stage})
  set_tests_properties(cuda.nccl_path_one_rank_zero${stage} PROPERTIES LABELS cuda TIMEOUT 300
    ENVIRONMENT "${ST_TEST_ENV};SHARDTUNE_NCCL_ONE_RANK=1")
endforeach()
# ZeRO-3 on a device (worker/comm_zero3_dev.c) against the CPU ranks' ZeRO-3: also 2 ranks, bf16, accumulation
add_test(NAME cuda.nccl_path_zero3_two_ranks COMMAND mpirun --oversubscribe -np 2 $<TARGET_FILE:nccl_fake> --stage 3)
add_test(NAME cuda.nccl_path_zero3_bf16 COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 3 --bf16 --accum 3)
set_tests_properties(cuda.nccl_path_zero3_two_ranks cuda.nccl_path_zero3_bf16 PROPERTIES LABELS cuda TIMEOUT 300
  ENVIRONMENT "${ST_TEST_ENV}")
add_test(NAME cuda.nccl_path_zero3_blocking COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 3 --no-overlap)
set_tests_properties(cuda.nccl_path_zero3_blocking PROPERTIES LABELS cuda TIMEOUT 300 ENVIRONMENT "${ST_TEST_ENV}")
# device ZeRO-3's overlapped reduce-scatter: with one of its waits removed (SHARDTUNE_ZERO3_DEV_FAULT) the
# stream-order checker must report the race (exit 1 and its message), on fp32 and bf16
foreach(fault rs-wait one-grad-buffer gather-wait)
  foreach(prec fp32 bf16)
    set(flag "")
    if(prec STREQUAL "bf16")
      set(flag "--bf16")
    endif()
    add_test(NAME cuda.nccl_path_zero3_catches_${fault}_${prec} COMMAND bash
      ${CMAKE_SOURCE_DIR}/tests/tools/expect_race.sh 3 $<TARGET_FILE:nccl_fake> --stage 3 --accum 2 ${flag})
    set_tests_properties(cuda.nccl_path_zero3_catches_${fault}_${prec} PROPERTIES LABELS cuda TIMEOUT 300
      ENVIRONMENT "${ST_TEST_ENV};SHARDTUNE_ZERO3_DEV_FAULT=${fault}")
  endforeach()
endforeach()
add_test(NAME cuda.nccl_path_zero2_blocking COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 2 --no-overlap)
set_tests_properties(cuda.nccl_path_zero2_blocking PROPERTIES LABELS cuda TIMEOUT 300 ENVIRONMENT "${ST_TEST_ENV}")
# device ZeRO-2's overlapped reductions (two buckets, comm-stream marks): each wait for a mark it makes dropped
# in turn (the fake's drop_event) must be reported, on 3 ranks fp32, 2 ranks bf16 and one rank through NCCL
add_test(NAME cuda.nccl_path_zero2_drop_each_wait COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 2 --drop-each-wait)
add_test(NAME cuda.nccl_path_zero2_drop_each_wait_bf16 COMMAND mpirun --oversubscribe -np 2 $<TARGET_FILE:nccl_fake>
  --stage 2 --bf16 --accum 3 --steps 2 --drop-each-wait)
set_tests_properties(cuda.nccl_path_zero2_drop_each_wait cuda.nccl_path_zero2_drop_each_wait_bf16 PROPERTIES LABELS cuda
  TIMEOUT 300 ENVIRONMENT "${ST_TEST_ENV}")
add_test(NAME cuda.nccl_path_zero2_drop_each_wait_one_rank COMMAND mpirun -np 1 $<TARGET_FILE:nccl_fake> --stage 2
  --drop-each-wait)
set_tests_properties(cuda.nccl_path_zero2_drop_each_wait_one_rank PROPERTIES LABELS cuda TIMEOUT 300
  ENVIRONMENT "${ST_TEST_ENV};SHARDTUNE_NCCL_ONE_RANK=1")
# the fake NCCL's point to point itself (device ZeRO-3's stage change moves pieces owner to owner with it)
foreach(np 1 2 3)
  add_test(NAME cuda.nccl_fake_p2p_${np} COMMAND mpirun --oversubscribe -np ${np} $<TARGET_FILE:nccl_fake> --p2p-self-test)
  set_tests_properties(cuda.nccl_fake_p2p_${np} PROPERTIES LABELS cuda TIMEOUT 120 ENVIRONMENT "${ST_TEST_ENV}")
endforeach()
add_test(NAME cuda.nccl_path_catches_race COMMAND ${ST_MPIRUN} $<TARGET_FILE:nccl_fake> --stage 2 --inject-race)
set_tests_properties(cuda.nccl_path_catches_race PROPERTIES LABELS cuda TIMEOUT 300 WILL_FAIL TRUE
  ENVIRONMENT "${ST_TEST_ENV}")

# Every test: exit 77 = skipped; `fast` unless named slow.
get_property(ST_ALL_TESTS DIRECTORY PROPERTY TESTS)
foreach(t ${ST_ALL_TESTS})
  set_tests_properties(${t} PROPERTIES SKIP_RETURN_CODE 77)
  if(NOT t IN_LIST ST_SLOW_TESTS)
    set_property(TEST ${t} APPEND PROPERTY LABELS fast)
  endif()
endforeach()
foreach(t ${ST_SLOW_TESTS} ${ST_RETRY_TESTS})
  if(NOT t IN_LIST ST_ALL_TESTS)
    message(FATAL_ERROR "tests/tests.cmake names ${t}, which is not a registered test")
  endif()
endforeach()
