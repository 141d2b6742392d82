#!/usr/bin/env bash
# One GPU session's checks and benchmarks, in stages, each writing under OUT (the device tool's $OUT).
#
#   scripts/gpu_check.sh OUT COMMIT STAGE [STAGE ...]
#
# Stages (each bounded by `timeout`; a stage that runs out of time still leaves its log):
#   tests-files    the gpu tests of TEST_FILES (TEST_K: -k; TESTS_LIMIT: seconds)
#   tests-shard    every gpu test, shard SHARD of SHARDS (default 1 of 2; scripts/gpu_shards.py balances whole test
#                  functions by test count) under 10 xdist workers: two calls run the suite at one commit (s52 on an
#                  H100: 818 tests in 438 s at -n 10; TESTS_LIMIT, default 540 s, cuts a shard, its log says where)
#   tests-nodes    the gpu tests named one per line in NODES_FILE (node ids, spaces allowed: a re-run of the failures
#                  or the tests a cut shard did not reach; TESTS_LIMIT, default 240 s)
#   tests-s48      gpu tests of what stops 47-48 wrote without a GPU: the NA backward's strided stores and packed call,
#                  the GLA kernels (fwd accumulate, bwd strided dv / epilogue stores) and the packed bidirectional op,
#                  the packed / token-conv model switches, NAT / DiNAT / ViG / FLatten parity, the memory test  ~6 min
#   tests-s49      what the s49 run of tests-s48 did not reach: NA tile settings, the packed GLA op, the GLA
#                  tensor-core / compile tests, NAT-T with the packed call, the memory test                    ~5 min
#   tests-new      gpu tests of the kernels added or changed last (focus, conv, pooled / pure InfSA)   ~3 min
#   tests-linear   gpu tests of the linear-attention kernels                                           ~4 min
#   tests-half     the half-precision sweep (gpu copy)                                                 ~2 min
#   tests-more     gpu tests of the MALA/RALA/NaLa/Efficient, neighborhood, SLA, scan, GLA kernels, the window
#                  mixer, the hybrid / pooled-agent ops and the converter on CUDA (pytest -n 4 if xdist is there)  ~4 min
#   tests-kernels  gpu tests of SLA / sparse, neighborhood (Triton, flex), hybrid, scan, GLA and the converter   ~5 min
#   tests-rope     gpu tests of the MALA / RALA / NaLa / Efficient kernels                            ~3.5 min
#   tests-pending  the gpu tests 7a87f8a failed (the tiny CUDA convert bench) or did not reach (hybrid, scan), and
#                  the SLA shapes with 32-token blocks (new since)                                    ~3 min
#   tests-fix      gpu tests of what was fixed since bca30b2 (the convert bench, the flex neighborhood backend) ~1.5 min
#   tests-gated    gpu tests of the gated / pre-norm LayerNorm, token conv and focus kernels and the model-level
#                  parity of every model's fast backends with its references                       ~4 min
#   tests-s17      gpu tests of what stop 17 changed without a GPU (eager paths, segmented GLA, agent glue) ~5 min
#   tests-s18      gpu tests of what stop 18 changed without a GPU (patch_gemm parity, NA cache, CUDA-graph train) ~3 min
#   tests-conv     gpu tests of the token depthwise conv (kernel, layer, its benchmark script)      ~1 min
#   tests-rerun    gpu tests of the kernels / converter fixed since their last GPU run (RALA/Efficient, scan, GLA,
#                  hybrid, converter methods and tuning, the converter speed bench; the SLA fused read-out
#                  backward)                                                                           ~3.5 min
#   bench-na-tiles the NA kernels' tile settings at NAT-T / DiNAT-T's seven attention shapes, bs 128, CUDA-graph
#                  timed (neighborhood_op.py --tile-sweep; TILES_ARGS, TILES_LIMIT)                      ~4 min
#   bench-na-bias-grad the NA backward's bias-gradient reduction over its block and programs per SM at those shapes
#                  (neighborhood_op.py --bias-grad-sweep; TILES_ARGS, TILES_LIMIT)                      ~1 min
#   bench-na-bwd-block the NA backward's query block, warps and register cap at each shape's shipped key tile
#                  (neighborhood_op.py --bwd-block-sweep; TILES_ARGS, TILES_LIMIT)                     ~4 min
#   bench-hier     hierarchical small models next to swin_tiny: inference 224/1024/4096 px and training at 224  ~4 min
#   bench-hier-train-1024  the hierarchical small models' training step at 1024 px next to swin_tiny (eager, bs 8;
#                  HIER_MODELS, HIER_1024_BATCH, HIER_1024_LIMIT; HIER_1024_PREV: an earlier call's JSON to add to) ~5 min
#   ab-train       AB_OLD (an older tree's visionlin/, carried) vs this tree: training steps of AB_MODELS next to
#                  swin_tiny, old / new / old / new in one session                                     ~4.5 min
#   check-4096     every hierarchical entrypoint once at 4096 x 4096, batch 1 (benchmarks/hires_every_model.py) ~2.5 min
#   fmnist         the Fashion-MNIST results table (benchmarks/fashion_mnist_table.py; needs .data/ carried with
#                  Debian's dataset-fashion-mnist .deb)                                               ~9.5 min
#   fmnist-finish  the committed Fashion-MNIST runs reused: MambaVision's run trained, then the throughput column ~8 min
#   fmnist-validate  visionlin train (nat_tiny, 1 epoch of Fashion-MNIST), then visionlin validate on its run folder ~1.5 min
#   bench-authors  benchmarks/authors_speed.py (needs .authors carried: the authors' checkouts; AUTHORS_PAIRS: a subset;
#                  AUTHORS_ARGS: more flags, e.g. "--phases train --kernels")              ~4.5 min
#   bench-sla      benchmarks/sla_op.py                                                                ~3 min
#   bench-sla-parts  benchmarks/sla_parts.py --tiles (where the forward's time goes; settings sweep)   ~2 min
#   bench-toggle   benchmarks/toggle_speed.py: each FAST_PATHS switch off / on, side by side, inference and training
#                  (TOGGLE_ARGS="--modes graphs ...": CUDA-graph training steps, one compile per config) ~4 min
#   bench-focus    benchmarks/focus_op.py: FLatten's focusing kernels over their launch settings, the PVT-S step total ~3 min
#   bench-ln       benchmarks/layer_norm_op.py: the pre-norm LayerNorm op vs F.layer_norm + cast, host us per call ~1 min
#   host-train     benchmarks/host_overhead.py --train (HOST_MODELS, HOST_CONFIGS): host ops of a training step ~1 min
#   host-infer     benchmarks/host_overhead.py --stacks: eager vs CUDA-graph forward, launches, host ops (HOST_MODELS) ~1 min
#   bench-agent    agent models at 224 / 1024 px next to swin_tiny, and their forward profile at 1024 px   ~3 min
#   gla-bwd        the GLA backward: every gla gpu test (segmented walks, the opt-in intra kernel and fused epilogue),
#                  then the settings side by side (benchmarks/gla_backward.py: the op at ViG's training shapes, a
#                  ViG-S training step; GLA_K: a subset of the tests)                                  ~8 min
#   gla-seg        the segmented GLA forward: gpu tests, then single walk vs segmented (benchmarks/gla_segments.py) ~6 min
#   bench-train-graphs  training steps under torch.compile(mode="reduce-overhead") (CUDA graphs), ours vs the twin ~5 min
#   profile-compiled  kernel-time profile of a compiled training step (InfViT-S, InLine-S)             ~3 min
#   profile-compiled-hier  the same for hierarchical models next to swin_tiny (PROFILE_HIER_MODELS; default
#                  NaLaFormer-T, ViG-S: the kernels their CUDA-graph steps replay)                       ~4 min
#   saved-memory   benchmarks/saved_memory.py: a training step's saved tensors by module and peak (SM_MODELS) ~1 min
#   bench-pool     benchmarks/pool_op.py: agent pooling, Triton vs the torch backend at the agent models' shapes ~1 min
#   tests-pool     gpu tests of the agent pooling kernels, the agent layers and models' parity                ~2 min
#   tests-s31      the 39 gpu tests stop 30's run did not finish (hybrid / agent op, four families' parity) + memory ~4 min
#   tests-s32      stop 31's CPU-only changes: agent kernels (half bias-gradient tables), agent parity, memory ~5 min
#   tests-s33      the gated RMS mix's gpu tests, every GLA gpu test, ViG's model parity (S33_K: -k)   ~2.5 min
#   bench-s33      GLA kernels at the 4-warp rule vs 8 (w8), op and ViG-S step; benchmarks/rms_mix_op.py (the mix vs the old
#                  chain, ViG-S step with the mix on Triton)                                          ~4 min
#   tests-s34      the token conv's gpu tests (both weight-gradient kernels), its models' parity (S34_K: -k) ~3 min
#   bench-s34      benchmarks/conv_op.py --weight-grad-sweep: the one-pass weight gradient vs per tap vs cuDNN, both
#                  kernels alone over their launch settings, the whole backward with the opt-in "fused"
#                  kernel (dx in the same walk) against the others                                       ~3 min
#   tests-s35      the token conv's gpu tests after the unpadded tap groups, its models' parity (S35_K: -k)
#   bench-s35      the weight-gradient kernel vs OLD_CONV's (an older conv.py, carried), then the launch sweep
#   tests-s36      the GLA gpu tests after the gates' own strides (ViG's layouts), the tensor-core products, the factored
#                  chunk blocks, ViG's parity; the token conv's stacked-rows weight gradient (S36_K: -k)
#   bench-s36      benchmarks/gla_backward.py: IEEE vs tf32 / tf32x3 tile products vs factored chunk blocks (factor,
#                  factor_tf32) vs shipped, op and ViG-S step                                          ~3 min
#   tests-s37      what stop 36 changed without a GPU: NA's bias in the products' accumulator (every NA gpu test, NAT /
#                  DiNAT parity; S37_K: -k)                                                              ~3 min
#   tests-s37b     stop 37: NA's bias-gradient reduction kernel, its opt-in bias-in-product backward, NAT / DiNAT
#                  parity, the channels-last stems (FAST_PATHS["stem_channels_last"]) of NAT and MambaVision ~3 min
#   tests-s39      stop 39's untested: the strip kernels after bba9b3f, the strip conv users' parity, the RoPE
#                  pair                                                                                  ~6 min
#   tests-rope-pair  the fused query / key RoPE's gpu tests, then time it with PROFILE_CONFIGS=default,rope_fused
#                  PROFILE_HIER_MODELS=ravlt_tiny,nalaformer_tiny ... profile-compiled-hier              ~1.5 min
#   tests-strip    the token conv's strip kernels' gpu tests (every case, dtype and strip setting), the conv users'
#                  model parity                                                                          ~5.5 min
#   bench-strip    benchmarks/conv_op.py --strip: the strip kernels against the shipped tile kernels, forward, weight
#                  gradient and the op's forward + backward at every shape (STRIP_ARGS: more flags)   ~3 min
#   bench-scan     benchmarks/scan_op.py: the selective scan's launch settings side by side (op forward, forward +
#                  backward from CUDA graphs, errors against the reference; a MambaVision-T step; SCAN_ARGS) ~4 min
#   tests-scan     every gpu test of the selective scan, MambaVision's parity and channels-last stem   ~2 min
#   tests-s38      what stop 38 changed without a GPU: the GLA walk kernels' shared helper (every GLA gpu test, ViG's
#                  parity), the scan's bc_slices; then bench-scan with SCAN_ARGS="--configs shipped,sl4,sl16,sl_all" ~3 min
#   bench-wg       benchmarks/conv_op.py --weight-grad-sweep: the token conv's weight-gradient kernels ("tile", the
#                  opt-in "rows", per tap, cuDNN) over their launch settings, the best per shape printed ~3 min
#   profile-conv   benchmarks/conv_op.py --profile: one forward + backward's kernels, ours and cuDNN's    ~1 min
#   tests-wg       the token conv's backward at every launch setting the sweep times ("fused" included) ~1.5 min
#   tests-bias     gpu tests of the agent position-bias kernels, the token conv, the agent layers, the agent / token-conv
#                  models' parity                                                                      ~3 min
#   bench-conv     benchmarks/conv_op.py --sweep: the token depthwise conv vs ATen and the add bound ~2.5 min
#   bench-na       benchmarks/neighborhood_op.py (NA_ARGS: its flags, e.g. --bias-dot-ab)               ~1 min
#   bench-na3d     benchmarks/neighborhood_3d.py: 3-D windows + text keys at Wan2.1's shape (flex, chunked, dense) ~2 min
#   bench-convert  benchmarks/convert_speed.py: Wan2.1-1.3B (32,760 tokens) and FLUX.1 (4,096 + 512) step time,
#                  dense vs sparse / sla / hybrid / linear (full models, forward)                       ~3 min
#   dit-quality    benchmarks/dit_quality.py: a class-conditional DiT trained on Fashion-MNIST (4,000 steps), every converter
#                  method training-free and after a 500-step distillation fine-tune, FID / KID in a classifier's
#                  features, PSNR vs dense, ms per call (needs .data/ carried, as fmnist)                  ~8.5 min
#   tests-agent    gpu tests of the fused agent attention (forward, split aggregation, the opt-in backward, the
#                  eager path, a training step of Agent-DeiT-T against SDPA)                          ~1.5 min
#   tests-agent-users  gpu tests of the converter's pooled agent op / method and the agent models' parity, whose
#                  gradients take the fused agent backward since 3daa57b                              ~2 min
#   bench-agent-backends  benchmarks/agent_backends.py: SDPA vs the fused kernels at the op, in inference and (with
#                  the fused backward on) in training steps, GPU time and eager                      ~4 min
#   host-block     benchmarks/host_block.py: host time per forward / block at batch 1, Python calls per block ~1 min
#   bench-models   inference at 224-4096 px, eager, the small model of each family + twin              ~2.5 min
#   bench-compiled inference under torch.compile against the compiled twin (COMPILED_SIZES, default 224,1024;
#                  COMPILED_LIMIT seconds, default 330)                                                ~5 min
#   bench-train    training step at 224 px                                                             ~1.5 min
#   bench-op       linear-attention op level                                                           ~1.5 min
#   bench-largest  largest input at batch 1 (LARGEST_CAP seconds per model, default 40; LARGEST_LIMIT)   ~4 min
#   profile        kernel-time profile of one forward at 224 px                                        ~1 min
#   profile-train  kernel-time profile of one training step at 224 px                                  ~1 min
#   profile-hier   the same, forward and training step, for NaLaFormer-T, NAT-T, Agent-Swin-T and swin_tiny ~2 min
#   bench-linear-ab  benchmarks/linear_settings_ab.py: whole launch settings of the linear kernels, alternating rounds ~1.5 min
#   profile-patch  GPU time per forward (PATCH_TRAIN=1: training step) with the patch-GEMM stem off / on (PATCH_MODELS) ~1.5 min
#   bench-linear-grid  benchmarks/linear_settings_ab.py --grid: coordinate descent over the linear kernels' knobs,
#                  forward and backward custom ops timed from CUDA graphs                               ~5 min
#   bench-rope-grid  the same search for the MALA / RALA / NaLa kernels (--family rope; GRID_CASES: a subset) ~100 s a case
#
# PACK=1: at the end, everything under OUT is packed into OUT/all.tgz (and removed): the device tool brings back only
# the first few files of OUT. Several calls in one command add to one all.tgz.
# COMMIT: pass the local checkout's commit (`git rev-parse --short HEAD` here) in the command: the device's copy of the
# tree carries uncommitted changes but its git HEAD may lag (stop 30's files read 18e361d for 27c4459).
set -u
OUT=$1
COMMIT=$2
shift 2
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
HIER=flatten_pvt_small,agent_pvt_small,flatten_swin_tiny,agent_swin_tiny,nat_tiny,dinat_tiny,mambavision_tiny,vig_small
HIER=${HIER_MODELS:-$HIER,mavit_tiny,ravlt_tiny,nalaformer_tiny}  # HIER_MODELS: a subset
SWIN=swin_tiny_patch4_window7_224
MODELS=${ISO_MODELS:-infvit_small,inline_deit_small,agent_deit_small,flatten_deit_small,infvit_pure_small}  # ISO_MODELS: a subset
PYTEST="python3 -m pytest -q -m gpu -p no:cacheprovider -rf"
XD=$(python3 -c "import xdist" 2>/dev/null && echo "-n ${XDIST_N:-4}")

# run_tests NAME LIMIT FILE... [pytest args]: gpu tests under xdist (when installed), each test named as it finishes
# (-vv; PYTEST has -q), the log in OUT/gpu_tests_NAME_COMMIT.log, failures and the summary on the console.
run_tests() {
  local name=$1 limit=$2
  shift 2
  # shellcheck disable=SC2086  # XD is empty or two words
  timeout "$limit" $PYTEST $XD -vv --durations=12 "$@" 2>&1 | tee "$OUT/gpu_tests_${name}_$COMMIT.log" \
    | grep -E "FAILED|ERROR| passed| failed" | cut -c1-200 | tail -40
  echo "$name: $(grep -c " PASSED" "$OUT/gpu_tests_${name}_$COMMIT.log") passed, $(grep -c " FAILED" \
    "$OUT/gpu_tests_${name}_$COMMIT.log") failed lines (a run cut by its limit has no summary line)"
}
for stage in "$@"; do
  echo "== $stage"
  case $stage in
    tests-files)  # TEST_FILES (space-separated test files), TEST_K (a -k expression), TESTS_LIMIT (s, default 240)
      # shellcheck disable=SC2086  # TEST_FILES is a list of words
      if [[ -z ${TEST_FILES:-} ]]; then echo "tests-files: TEST_FILES is not set (the test files to run); skipped"
      else run_tests files ${TESTS_LIMIT:-240} $TEST_FILES ${TEST_K:+-k "$TEST_K"} --tb=short; fi ;;
    tests-shard)  # every gpu test at one commit over several calls: shard SHARD of SHARDS (default 1 of 2), test
      # functions balanced by test count (scripts/gpu_shards.py); TESTS_LIMIT (s, default 540). 10 workers unless
      # XDIST_N says otherwise: 12 ran the card out of memory before tests/conftest.py released each test's cache (s52)
      units=$(python3 scripts/gpu_shards.py "${SHARDS:-2}" "${SHARD:-1}") && [[ -n $units ]] \
        || { echo "tests-shard: no tests in shard ${SHARD:-1} of ${SHARDS:-2} (or the collection failed)"; continue; }
      # shellcheck disable=SC2086  # XD, units: lists of words
      XD=${XD:+-n ${XDIST_N:-10}} run_tests "shard${SHARD:-1}of${SHARDS:-2}" ${TESTS_LIMIT:-540} $units --tb=short ;;
    tests-nodes)  # NODES_FILE: node ids one per line (read as lines: parametrisation ids may hold spaces)
      if [[ ! -s ${NODES_FILE:-} ]]; then echo "tests-nodes: NODES_FILE (${NODES_FILE:-unset}) is missing or empty"
      else mapfile -t nodes < "$NODES_FILE"; run_tests nodes ${TESTS_LIMIT:-240} "${nodes[@]}" --tb=short; fi ;;
    tests-s48)  # TESTS_LIMIT (s, default 400)
      run_tests s48_na ${TESTS_LIMIT:-400} tests/test_kernels_triton_neighborhood.py -k "qkv_packed or tile_settings" \
        --tb=short
      run_tests s48_gla ${TESTS_LIMIT:-400} tests/test_kernels_triton_gla.py tests/test_kernels_triton_eager.py \
        tests/test_bench_gla_backward.py --tb=short
      run_tests s48_bench ${TESTS_LIMIT:-400} tests/test_bench_neighborhood_op.py -k packed --tb=short
      run_tests s48_models ${TESTS_LIMIT:-400} tests/test_models_gpu_parity.py tests/test_models_gpu_memory.py \
        -k "nat or vig or flatten or packed_calls or memory" --tb=short ;;
    tests-s49)  # what the s49 run of tests-s48 (each group cut at 140 s, all 90 reached tests passed) did not reach
      run_tests s49_na ${TESTS_LIMIT:-300} tests/test_kernels_triton_neighborhood.py -k "tile_settings" --tb=short
      run_tests s49_gla ${TESTS_LIMIT:-300} tests/test_kernels_triton_gla.py tests/test_kernels_triton_eager.py \
        tests/test_bench_gla_backward.py -k "qkv_packed or tensor_core or compile or automatic or grid_axis or eager \
        or short_cuda" --tb=short
      run_tests s49_models ${TESTS_LIMIT:-300} tests/test_models_gpu_parity.py tests/test_models_gpu_memory.py \
        -k "packed_calls and nat or memory" --tb=short ;;
    tests-new)
      timeout 260 $PYTEST tests/test_kernels_triton_focus.py tests/test_kernels_triton_agent.py tests/test_kernels_conv.py tests/test_kernels_triton_infsa.py \
        tests/test_kernels_triton_infsa_pure.py 2>&1 | tee "$OUT/gpu_tests_new_$COMMIT.log" | tail -5 ;;
    tests-rerun)
      FILES=${RERUN_FILES:-tests/test_kernels_triton_rope_linear.py tests/test_kernels_triton_scan.py \
        tests/test_kernels_triton_gla.py tests/test_kernels_hybrid.py tests/test_convert_methods.py \
        tests/test_convert_tune.py tests/test_bench_convert.py}
      # shellcheck disable=SC2086  # FILES are separate words
      run_tests rerun ${RERUN_LIMIT:-300} $FILES
      if [[ ${READOUT:-1} == 1 ]]; then
        run_tests readout 150 tests/test_kernels_triton_sparse_linear.py -k readout
      fi ;;
    tests-kernels)  # the kernels changed last: SLA / sparse (additional keys, fused read-out), NA (flex, delta), scan, GLA
      run_tests kernels ${KERNELS_LIMIT:-330} tests/test_kernels_triton_sparse_linear.py \
        tests/test_kernels_triton_neighborhood.py tests/test_kernels_neighborhood_flex.py tests/test_kernels_hybrid.py \
        tests/test_kernels_triton_scan.py tests/test_kernels_triton_gla.py tests/test_convert_methods.py \
        tests/test_convert_tune.py tests/test_bench_convert.py ;;
    tests-pending)  # what the 7a87f8a run failed or did not reach: the tiny CUDA convert bench, 5 hybrid, 3 scan cases
      run_tests pending 240 tests/test_bench_convert.py::test_tiny_cuda_run_with_profile \
        "tests/test_kernels_hybrid.py::test_gpu_hybrid_and_agent_vs_reference" \
        "tests/test_kernels_triton_scan.py::test_gpu_scan" "tests/test_kernels_triton_sparse_linear.py::test_triton_sla_shapes" \
        tests/test_layers_token_conv.py --tb=long ;;
    tests-fix)  # the fixes since bca30b2: the tiny CUDA convert bench (flex layout under inference mode), the flex tests
      run_tests fix 150 tests/test_bench_convert.py tests/test_kernels_neighborhood_flex.py --tb=long ;;
    tests-s33)  # stop 33: the gated RMS mix (ViG), the GLA kernels at 4 warps, ViG's model parity
      run_tests s33 ${S33_LIMIT:-200} tests/test_kernels_rms_mix.py tests/test_bench_rms_mix_op.py \
        tests/test_kernels_triton_gla.py tests/test_models_gpu_parity.py --tb=short -k "${S33_K:-rms_mix or gla or vig}" ;;
    bench-s33)  # stop 33's untimed choices: every GLA kernel at 4 warps together (w4) against the rule's 8, at ViG's
      # training shapes, a long sequence and in a ViG-S training step; the RMS mix against the old chain and in ViG-S
      timeout ${GLA_LIMIT:-150} python3 benchmarks/gla_backward.py --out "$OUT" --commit "$COMMIT" --configs shipped,w8 \
        --shapes 128x196x6,32x784x6,1x65536x6 --iters 20 2>&1 | grep -vE "Warning|warn" | cut -c1-220 | tail -12
      timeout ${MIX_LIMIT:-150} python3 benchmarks/rms_mix_op.py --out "$OUT" --commit "$COMMIT" 2>&1 | grep -E "x$|train_step|rror" ;;
    tests-s34)  # stop 34: the token conv's one-pass weight gradient (and the per-tap one), its models' parity
      run_tests s34 ${S34_LIMIT:-200} tests/test_kernels_conv.py tests/test_bench_conv_op.py \
        tests/test_models_gpu_parity.py --tb=short -k "${S34_K:-conv or nala or mavit or flatten or agent or inline}" ;;
    bench-s34)  # the one-pass weight gradient against the per-tap one and cuDNN at the models' shapes, and both
      # kernels alone over their launch settings (the fastest per shape printed)
      timeout ${CONV_LIMIT:-200} python3 benchmarks/conv_op.py --out "$OUT" --commit "$COMMIT" --weight-grad-sweep 2>&1 \
        | grep -vE '^\{' | tail -16
      python3 -c "import json; rows = json.load(open('$OUT/conv_op.json'))['sweep']
for r in rows: print(r['shape'], round(r.get('ms', -1), 4), r['config'])" 2>&1 | head -100 ;;
    tests-s35)  # stop 35: the one-pass weight gradient in unpadded tap groups (int32 offsets, stepped grid positions)
      run_tests s35 ${S35_LIMIT:-200} tests/test_kernels_conv.py tests/test_bench_conv_op.py \
        tests/test_models_gpu_parity.py --tb=short -k "${S35_K:-conv or nala or mavit or flatten or agent or inline}" ;;
    bench-s35)  # the weight-gradient kernel against an older tree's (OLD_CONV: its conv.py, carried), alternating in
      # one process, then the launch sweep (the fastest settings per shape printed)
      timeout ${CONV_LIMIT:-200} python3 benchmarks/conv_op.py --out "$OUT" --commit "$COMMIT" --weight-grad-sweep \
        --old-conv "${OLD_CONV:?OLD_CONV names an older conv.py}" 2>&1 | grep -E "old / new|x$|rror" | tail -20
      python3 -c "import json, itertools; rows = json.load(open('$OUT/conv_op.json'))['sweep']
key = lambda r: (r['shape'], r['method'])
for k, g in itertools.groupby(sorted(rows, key=key), key=key):
    g = sorted(g, key=lambda r: r.get('ms', 1e9)); print(k, [(round(r.get('ms', -1), 4), r.get('config')) for r in g[:4]])
" 2>&1 | cut -c1-600 ;;
    tests-s36)  # what stop 35 changed without a GPU: the GLA kernels reading the gates through their own strides
      # (ViG's layouts, no copies), ViG's model parity
      run_tests s36 ${S36_LIMIT:-300} tests/test_kernels_triton_gla.py tests/test_models_gpu_parity.py \
        tests/test_kernels_conv.py --tb=short -k "${S36_K:-gla or vig or rows}" ;;
    bench-s36)  # the GLA tile products on the tensor cores (tf32 / tf32x3), the factored chunk blocks, op and ViG-S step
      timeout ${GLA_LIMIT:-200} python3 benchmarks/gla_backward.py --out "$OUT" --commit "$COMMIT" \
        --configs shipped,ieee,tf32,tf32x3,factor,factor_tf32 --iters 20 2>&1 | grep -vE "Warning|warn" | cut -c1-220 \
        | tail -14 ;;
    tests-s37)  # what stop 36 changed without a GPU: NAT's bias in the score products' accumulator (half inputs)
      run_tests s37 ${S37_LIMIT:-240} tests/test_kernels_triton_neighborhood.py tests/test_models_gpu_parity.py \
        --tb=short -k "${S37_K:-na or nat}" ;;
    tests-s37b)  # stop 37: the bias gradient's reduction kernel, the backward's opt-in bias-in-product form, NAT /
      # DiNAT parity, the channels-last convolutional stems (NAT, MambaVision) against the switch off
      run_tests s37b ${S37_LIMIT:-240} tests/test_kernels_triton_neighborhood.py tests/test_models_gpu_parity.py \
        tests/test_kernels_layer_norm.py --tb=short -k "${S37_K:-na or nat or stem_channels_last}" ;;
    bench-scan)  # the selective scan's launch settings side by side (benchmarks/scan_op.py; SCAN_ARGS: its flags)
      timeout ${SCAN_LIMIT:-330} python3 benchmarks/scan_op.py --out "$OUT" --commit "$COMMIT" ${SCAN_ARGS:-} 2>&1 \
        | grep -vE "^\s*$|Warning|warn" | cut -c1-230 | tail -${SCAN_TAIL:-60} ;;
    tests-scan)  # every gpu test of the selective scan, MambaVision's parity and channels-last stem
      run_tests scan ${TESTS_LIMIT:-200} tests/test_kernels_triton_scan.py tests/test_models_gpu_parity.py \
        tests/test_kernels_layer_norm.py tests/test_bench_scan_op.py --tb=short -k "${SCAN_K:-scan or mambavision or short}" ;;
    tests-strip)  # the token conv's strip kernels (forward, input and weight gradients) against float64, and the parity
      # of the models that use the conv (STRIP_K: -k; ~330 s for the default selection on one H200)
      run_tests strip ${STRIP_LIMIT:-330} tests/test_kernels_conv.py tests/test_models_gpu_parity.py --tb=short \
        -k "${STRIP_K:-strip or (gpu_fast and (flatten or ravlt or nala or agent or inline or mavit) and (tiny or small))}" ;;
    bench-strip)  # the strip kernels against the shipped ones at every shape (benchmarks/conv_op.py --strip)
      timeout ${CONV_LIMIT:-240} python3 benchmarks/conv_op.py --out "$OUT" --commit "$COMMIT" --strip --no-methods \
        --iters 10 ${STRIP_ARGS:-} 2>&1 | grep -E "strip [0-9.]* ms|rror" | cut -c1-260 ;;
    tests-s39)  # what stop 39 could not GPU-run: the strip kernels after bba9b3f (their I64 form), the parity of the
      # strip conv's other users (FLatten, InLine, MAViT, RAVLT, NaLaFormer), the fused query / key RoPE's tests
      run_tests s39 ${S39_LIMIT:-400} tests/test_kernels_conv.py tests/test_kernels_rope_pair.py \
        tests/test_models_gpu_parity.py --tb=short \
        -k "${S39_K:-strip or rope_pair or (gpu_fast and (flatten or inline or mavit or ravlt or nala) and (tiny or small))}" ;;
    tests-rope-pair)  # the softmax stages' fused query / key RoPE (apply_rope_2d_pair): op against float64, compile, the
      # MAViT / RAVLT / NaLaFormer steps with FAST_PATHS["rope_fused"] on against off
      run_tests rope_pair ${ROPE_LIMIT:-150} tests/test_kernels_rope_pair.py --tb=short ;;
    tests-s38)  # stop 38's CPU-only changes: the GLA kernels' _head_bases helper, the scan's bc_slices (S38_K: -k)
      run_tests s38 ${S38_LIMIT:-200} tests/test_kernels_triton_gla.py tests/test_kernels_triton_scan.py \
        tests/test_models_gpu_parity.py --tb=short -k "${S38_K:-gla or vig or slices}" ;;
    bench-wg)  # the token conv's weight-gradient kernels over their launch settings ("rows" among them), per shape
      timeout ${CONV_LIMIT:-200} python3 benchmarks/conv_op.py --out "$OUT" --commit "$COMMIT" --weight-grad-sweep \
        2>&1 | grep -E "x$|rror" | tail -16
      python3 -c "import json, itertools; rows = json.load(open('$OUT/conv_op.json'))['sweep']
key = lambda r: (r['shape'], r['method'], r['config'].get('weight_grad'))
for k, g in itertools.groupby(sorted(rows, key=lambda r: str(key(r))), key=key):
    g = sorted(g, key=lambda r: r.get('ms', 1e9)); print(k, [(round(r.get('ms', -1), 4), r.get('config')) for r in g[:2]])
" 2>&1 | cut -c1-400 ;;
    profile-conv)  # the kernels of one forward + backward of the token conv, ours and cuDNN's, at every shape
      timeout ${CONV_LIMIT:-150} python3 benchmarks/conv_op.py --out "$OUT" --commit "$COMMIT" --profile --iters 5 \
        --repeats 1 2>&1 | grep -E "ms of kernels|rror" | cut -c1-400 ;;
    tests-wg)  # the weight gradient over every launch setting the sweep times
      run_tests wg ${WG_LIMIT:-150} tests/test_kernels_conv.py --tb=short -k launch_settings ;;
    tests-gated)  # the gated LayerNorm kernels (NaLaFormer, MAViT), the conv kernel after b8a44eb, the focus kernels
      run_tests gated ${GATED_LIMIT:-240} tests/test_kernels_gated_norm.py tests/test_kernels_layer_norm.py \
        tests/test_kernels_conv.py tests/test_kernels_triton_focus.py tests/test_models_gpu_parity.py --tb=short ;;
    tests-s17)  # what stop 17 changed without a GPU: the eager path of the RoPE-linear / scan / GLA ops, the segmented
      # GLA forward, NA's cached bias index, the agent layers' pooling / resampling (model parity)
      run_tests s17 ${S17_LIMIT:-330} tests/test_kernels_triton_rope_linear.py tests/test_kernels_triton_scan.py \
        tests/test_kernels_triton_gla.py tests/test_kernels_triton_neighborhood.py tests/test_models_gpu_parity.py \
        tests/test_bench_gla_segments.py --tb=short ;;
    tests-s18)  # what stop 18 changed without a GPU: patch_gemm model parity, NA's eager-only cached bias index
      run_tests s18 ${S18_LIMIT:-200} tests/test_kernels_layer_norm.py tests/test_kernels_triton_neighborhood.py \
        tests/test_layers_patch.py tests/test_train.py -k "fast_path or neighborhood or patch or cuda_graph" --tb=short ;;
    tests-train-graphs)  # visionlin train --torchcompile-mode reduce-overhead against eager
      run_tests train_graphs 240 tests/test_train.py -k cuda_graph --tb=long ;;
    tests-conv)  # the token depthwise conv kernel and its layer
      run_tests conv 150 tests/test_kernels_conv.py tests/test_layers_token_conv.py tests/test_bench_conv_op.py ;;
    tests-rope)
      run_tests rope ${ROPE_LIMIT:-240} tests/test_kernels_triton_rope_linear.py ;;
    bench-hier)
      timeout ${HIER_LIMIT:-170} python3 -m visionlin.cli bench models --quick --modes eager --sizes ${HIER_SIZES:-224,1024,4096} \
        --models $HIER --twin $SWIN --time-budget $((${HIER_LIMIT:-170} - 20)) --name bench_hier --out "$OUT" --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror|skip"
      [[ -n ${HIER_NO_TRAIN:-} ]] || timeout 100 python3 -m visionlin.cli bench train --quick --models $HIER --twin $SWIN \
        --time-budget 85 --name bench_hier_train --out "$OUT" --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror|skip" ;;
    bench-hier-train-1024)  # issue 7 part 9's training step at 1024 px: HIER (HIER_MODELS) next to swin_tiny, eager,
      # batch HIER_1024_BATCH (default 8). OUT starts empty on each device call: to split the suite over calls, carry
      # the earlier call's JSON and name it in HIER_1024_PREV (copied into OUT, then --append adds to it)
      if [[ -n ${HIER_1024_PREV:-} ]]; then
        cp "$HIER_1024_PREV" "$OUT/bench_hier_train_1024.json" || { echo "bench-hier-train-1024: no $HIER_1024_PREV"; continue; }
      fi
      timeout ${HIER_1024_LIMIT:-300} python3 -m visionlin.cli bench train --quick --modes eager --size 1024 \
        --batch ${HIER_1024_BATCH:-8} --models $HIER --twin $SWIN --time-budget $((${HIER_1024_LIMIT:-300} - 20)) \
        --name bench_hier_train_1024 --append --out "$OUT" --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror|skip" ;;
    ab-train)  # an older tree (AB_OLD: a folder holding its visionlin/, e.g. `git archive C visionlin | tar -x -C
      # .old/C`, carried) against this one, in one session: training steps of AB_MODELS next to swin_tiny (AB_TWIN), old,
      # new, old, new; AB_MODES=cudagraphs times them under CUDA graphs (GPU time, no host time per kernel)
      if [[ ! -f ${AB_OLD:-}/visionlin/__init__.py ]]; then
        echo "ab-train: AB_OLD=${AB_OLD:-} must name a folder holding an older tree's visionlin/ (carried)"; continue
      fi
      for i in 1 2 3 4; do
        if ((i % 2)); then tree=$AB_OLD tag=old; else tree=$PWD tag=new; fi
        # -P: no current directory on sys.path (python -m puts it first, and this tree's visionlin would win)
        PYTHONPATH=$tree${PYTHONPATH:+:$PYTHONPATH} timeout ${AB_LIMIT:-70} python3 -P -m visionlin.cli bench train --quick \
          --modes ${AB_MODES:-eager} \
          --models ${AB_MODELS:-flatten_swin_tiny,agent_swin_tiny,agent_pvt_small} --twin ${AB_TWIN:-$SWIN} --time-budget $((${AB_LIMIT:-70} - 15)) \
          --name "ab_train_${i}_${tag}_$COMMIT" --out "$OUT" --commit "$tag:$(basename "$tree")" 2>&1 | grep -E "img/s|oom|rror|skip"
      done ;;
    ab-op)  # the linear-attention op (visionlin bench op) from an older tree (AB_OLD, as ab-train) and this one: old,
      # new, old, new
      if [[ ! -f ${AB_OLD:-}/visionlin/__init__.py ]]; then
        echo "ab-op: AB_OLD=${AB_OLD:-} must name a folder holding an older tree's visionlin/ (carried)"; continue
      fi
      for i in 1 2 3 4; do
        if ((i % 2)); then tree=$AB_OLD tag=old; else tree=$PWD tag=new; fi
        PYTHONPATH=$tree${PYTHONPATH:+:$PYTHONPATH} timeout ${AB_OP_LIMIT:-90} python3 -P -m visionlin.cli bench op \
          --name "ab_op_${i}_${tag}_$COMMIT" --out "$OUT" --commit "$tag:$(basename "$tree")" 2>&1 | tail -6
      done ;;
    check-4096)
      timeout 220 python3 benchmarks/hires_every_model.py --size 4096 --out "$OUT" --commit "$COMMIT" 2>&1 \
        | grep -vE "^\s*$|Warning|warn" | cut -c1-240 ;;
    fmnist)
      mkdir -p /tmp/fmdeb && dpkg -x .data/dataset-fashion-mnist_*.deb /tmp/fmdeb
      timeout ${FM_LIMIT:-575} python3 benchmarks/fashion_mnist_table.py --out "$OUT/fm" --epochs ${FM_EPOCHS:-3} \
        --parallel ${FM_PARALLEL:-5} --workers ${FM_WORKERS:-5} --time-budget ${FM_BUDGET:-330} --hard-limit \
        ${FM_HARD:-450} --speed-budget 60 --commit "$COMMIT" \
        --train-args "--data-dir /tmp/fmdeb/usr/share/datasets/fashion-mnist" 2>&1 | grep -vE "^\s*$" | tail -40
      ;;
    fmnist-finish)  # the committed table's runs reused; what is incomplete (MambaVision) trained, then throughput
      mkdir -p /tmp/fmdeb && dpkg -x .data/dataset-fashion-mnist_*.deb /tmp/fmdeb
      rm -rf "$OUT/fm" && mkdir -p "$OUT/fm" && cp -r benchmarks/results/h200/fashion_mnist/runs "$OUT/fm/runs"
      timeout ${FM_LIMIT:-560} python3 benchmarks/fashion_mnist_table.py --out "$OUT/fm" --reuse --epochs 3 --parallel 1 \
        --workers 12 --hard-limit 380 --speed-budget 150 --commit "$COMMIT" \
        --train-args "--data-dir /tmp/fmdeb/usr/share/datasets/fashion-mnist" 2>&1 | grep -vE "^\s*$" | tail -30
      ;;
    fmnist-validate)  # visionlin train (1 epoch), then visionlin validate on its run folder: the same test top-1
      mkdir -p /tmp/fmdeb && dpkg -x .data/dataset-fashion-mnist_*.deb /tmp/fmdeb
      FM=/tmp/fmdeb/usr/share/datasets/fashion-mnist
      timeout 150 python3 -m visionlin.cli train --model nat_tiny -c fashion_mnist --epochs 1 --img-size 64 \
        --batch-size 256 --workers 8 --seed 0 --output /tmp/fmv --experiment nat_tiny --data-dir $FM \
        > "$OUT/fmnist_validate_train_$COMMIT.log" 2>&1
      tail -3 "$OUT/fmnist_validate_train_$COMMIT.log"; cp /tmp/fmv/nat_tiny/log.jsonl "$OUT/fmnist_validate_train_log.jsonl"
      timeout 90 python3 -m visionlin.cli validate --model nat_tiny --checkpoint /tmp/fmv/nat_tiny --dataset fashion_mnist \
        --data-dir $FM --split test --img-size 64 --amp -b 256 -j 8 --results-file "$OUT/fmnist_validate_$COMMIT.json" 2>&1 \
        | tail -3 ;;
    tests-linear)
      timeout 280 $PYTEST tests/test_kernels_triton.py 2>&1 | tee "$OUT/gpu_tests_linear_$COMMIT.log" | tail -5 ;;
    tests-more)
      timeout 250 $PYTEST $XD --durations=12 tests/test_kernels_triton_rope_linear.py tests/test_kernels_triton_neighborhood.py \
        tests/test_kernels_triton_sparse_linear.py tests/test_kernels_triton_scan.py tests/test_kernels_triton_gla.py \
        tests/test_layers_window.py tests/test_kernels_hybrid.py tests/test_convert_methods.py tests/test_convert_tune.py \
        2>&1 | tee "$OUT/gpu_tests_more_$COMMIT.log" | grep -E "passed|failed|FAILED|ERROR|error" | tail -40 ;;
    bench-authors)
      timeout ${AUTHORS_LIMIT:-300} python3 benchmarks/authors_speed.py --authors-dir .authors --out "$OUT" --commit "$COMMIT" --train ${AUTHORS_PAIRS:+--pairs $AUTHORS_PAIRS} \
        ${AUTHORS_ARGS:-} --repeats 2 --iters 10 --warmup 3 2>&1 | grep -E "img/s|rror" ;;
    bench-sla)
      timeout 240 python3 benchmarks/sla_op.py --out "$OUT" --commit "$COMMIT" 2>&1 | tail -25 ;;
    bench-sla-parts)
      timeout 180 python3 benchmarks/sla_parts.py --tiles --out "$OUT" --commit "$COMMIT" 2>&1 | tail -40 ;;
    bench-convert)
      timeout 200 python3 benchmarks/convert_speed.py --models wan,flux --time-budget 150 --out "$OUT" \
        --commit "$COMMIT" 2>&1 | tail -30 ;;
    dit-quality)
      mkdir -p /tmp/fmdeb && dpkg -x .data/dataset-fashion-mnist_*.deb /tmp/fmdeb
      timeout ${DQ_LIMIT:-560} python3 benchmarks/dit_quality.py --data-dir /tmp/fmdeb/usr/share/datasets/fashion-mnist \
        --time-budget ${DQ_BUDGET:-500} --out "$OUT/dit_quality" --commit "$COMMIT" 2>&1 | grep -vE "^\s*$|Warning|warn" \
        | tail -45 ;;
    bench-na3d)
      timeout 150 python3 benchmarks/neighborhood_3d.py --out "$OUT" --commit "$COMMIT" 2>&1 | tail -12 ;;
    bench-agent)  # the agent models' pooling and bias resampling (6458fbd, ac0d718): 224 / 1024 px and the 1024 px profile
      timeout 150 python3 -m visionlin.cli bench models --quick --modes eager --sizes 224,1024 \
        --models agent_pvt_small,agent_swin_tiny,agent_deit_small --twin $SWIN --time-budget 120 --name bench_agent \
        --out "$OUT" --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror|skip"
      timeout 100 python3 benchmarks/profile_models.py --out "$OUT" --twin $SWIN --models agent_swin_tiny,agent_pvt_small \
        --sizes 1024:16 --name "profile_agent_1024_$COMMIT" --commit "$COMMIT" > "$OUT/profile_agent_1024_$COMMIT.log" 2>&1
      grep -A8 "^==" "$OUT/profile_agent_1024_$COMMIT.log" | grep -v "^     " ;;
    gla-bwd)
      run_tests gla_bwd ${TESTS_LIMIT:-300} tests/test_kernels_triton_gla.py tests/test_bench_gla_backward.py --tb=short \
        ${GLA_K:+-k "$GLA_K"}  # GLA_K: a subset
      timeout ${GLA_LIMIT:-200} python3 benchmarks/gla_backward.py --out "$OUT" --commit "$COMMIT" $GLA_ARGS 2>&1 \
        | grep -vE "Warning|warn" | cut -c1-220 | tail -40 ;;
    gla-seg)  # the segmented GLA forward: its gpu tests, then ViG-S at 1024-4096 px and the op, single walk vs segmented
      run_tests gla_seg 200 tests/test_kernels_triton_gla.py tests/test_bench_gla_segments.py -k "segmented or short" --tb=short
      timeout ${GLA_LIMIT:-200} python3 benchmarks/gla_segments.py --out "$OUT" --commit "$COMMIT" 2>&1 | tail -8 ;;
    bench-train-graphs)  # training steps under torch.compile(mode="reduce-overhead"): CUDA graphs, no host time per kernel
      timeout ${GRAPHS_LIMIT:-330} python3 -m visionlin.cli bench train --quick --modes cudagraphs --models $MODELS \
        --time-budget $((${GRAPHS_LIMIT:-330} - 30)) --name bench_train_cudagraphs --out "$OUT" --commit "$COMMIT" 2>&1 \
        | grep -E "img/s|oom|rror|skip" ;;
    bench-hier-train-graphs)  # the hierarchical training steps under CUDA graphs next to swin_tiny under CUDA graphs
      # (rows print when the whole block ends, and each model compiles for ~1-1.5 min: at most two HIER_MODELS per
      # 330 s; s39 got nothing from 2 models in 120 s or 4 in 330 s; s51 nothing from 1 model in 170 s, while 2 models
      # took 235 s in a warm process)
      timeout ${GRAPHS_LIMIT:-330} python3 -m visionlin.cli bench train --quick --modes cudagraphs --models $HIER \
        --twin $SWIN --time-budget $((${GRAPHS_LIMIT:-330} - 30)) --name bench_hier_train_cudagraphs --out "$OUT" \
        --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror|skip" ;;
    profile-compiled)  # where a compiled training step's time goes (compiled ours trained slower than eager at abf7aa9)
      timeout 200 python3 benchmarks/profile_models.py --train --compile --out "$OUT" --models infvit_small,inline_deit_small \
        --sizes 224:128 --name "profile_compiled_train_$COMMIT" --commit "$COMMIT" \
        > "$OUT/profile_compiled_train_$COMMIT.log" 2>&1; grep -A10 "^==" "$OUT/profile_compiled_train_$COMMIT.log" ;;
    profile-compiled-hier)  # the kernels of compiled hierarchical training steps (what CUDA graphs replay) and swin_tiny's
      # PROFILE_MODE=reduce-overhead: CUDA-graph replay (wall vs kernel time, launches, dynamo graphs / breaks)
      timeout ${PROFILE_LIMIT:-300} python3 benchmarks/profile_models.py --train --compile --out "$OUT" --twin $SWIN \
        --compile-mode ${PROFILE_MODE:-default} \
        --models ${PROFILE_HIER_MODELS:-nalaformer_tiny,vig_small} --sizes 224:128 --configs ${PROFILE_CONFIGS:-default} \
        --name "profile_compiled_hier_train_$COMMIT" --commit "$COMMIT" > "$OUT/profile_compiled_hier_train_$COMMIT.log" 2>&1
      grep -A16 "^==" "$OUT/profile_compiled_hier_train_$COMMIT.log" | cut -c1-160 ;;
    host-stacks)  # where a training step's host time goes, Python functions included: eager, then compiled
      timeout ${STACKS_LIMIT:-120} python3 benchmarks/host_overhead.py --train --stacks --batch 128 --out "$OUT/eager" \
        --commit "$COMMIT" --models ${STACKS_MODELS:-inline_deit_small,agent_deit_small} 2>&1 | grep -v "^\s*$" \
        | tee "$OUT/host_stacks_train_$COMMIT.log" | grep -E "^==|Python \(cProfile"
      timeout ${STACKS_COMPILED_LIMIT:-200} python3 benchmarks/host_overhead.py --train --compile --stacks --batch 128 \
        --out "$OUT/compiled" --commit "$COMMIT" --models ${STACKS_COMPILED_MODELS:-infvit_small,deit_small_patch16_224} \
        2>&1 | grep -v "^\s*$" | tee "$OUT/host_stacks_compiled_$COMMIT.log" | grep -E "^==|Python \(cProfile" ;;
    bench-toggle)  # each FAST_PATHS switch off and on (benchmarks/toggle_speed.py)
      # (TOGGLE_ARGS: more flags, e.g. "--modes graphs --configs baseline,rope_fused": CUDA-graph steps, ~1 min a config)
      timeout ${TOGGLE_LIMIT:-240} python3 benchmarks/toggle_speed.py --out "$OUT" --commit "$COMMIT" \
        ${TOGGLE_MODELS:+--models $TOGGLE_MODELS} ${TOGGLE_ARGS:-} 2>&1 | grep -vE "^\s*$|Warning|warn" | tail -30 ;;
    bench-focus)  # benchmarks/focus_op.py: FLatten's focusing kernels over their launch settings (FOCUS_ARGS: more flags)
      timeout ${FOCUS_LIMIT:-240} python3 benchmarks/focus_op.py --out "$OUT" --commit "$COMMIT" ${FOCUS_ARGS:-} 2>&1 \
        | grep -E "flatten_pvt_small|rror" | tail -30 ;;
    bench-ln)  # the pre-norm LayerNorm op: Triton against F.layer_norm + cast, the backward launch sweep, host us per call
      timeout ${LN_LIMIT:-150} python3 benchmarks/layer_norm_op.py --out "$OUT" --commit "$COMMIT" 2>&1 \
        | grep -vE '^\{' | tail -16 ;;
    host-train)  # host vs GPU time of a training step per opt-in config (HOST_MODELS, HOST_CONFIGS)
      timeout ${HOST_LIMIT:-150} python3 benchmarks/host_overhead.py --train --batch 128 --out "$OUT" --commit "$COMMIT" \
        --models ${HOST_MODELS:-infvit_small} --configs ${HOST_CONFIGS:-default,baseline} 2>&1 | grep -v "^\s*$" \
        | tee "$OUT/host_overhead_train_$COMMIT.log" | head -60 ;;
    host-infer)  # eager forward vs CUDA-graph replay vs kernel time, launches and host ops per forward (224 px, bs 256)
      timeout ${HOST_LIMIT:-150} python3 benchmarks/host_overhead.py --out "$OUT" --commit "$COMMIT" --stacks \
        --models ${HOST_MODELS:-deit_small_patch16_224,infvit_small,agent_deit_small,flatten_deit_small} 2>&1 \
        | grep -v "^\s*$" > "$OUT/host_overhead_infer_$COMMIT.log"; grep "^==" "$OUT/host_overhead_infer_$COMMIT.log" ;;
    bench-conv)
      timeout ${CONV_LIMIT:-200} python3 benchmarks/conv_op.py --out "$OUT" --commit "$COMMIT" --sweep 2>&1 \
        | grep -vE '^\{' | tail -14; grep -c '"sweep"' "$OUT/conv_op.json" 2>/dev/null ;;
    saved-memory)  # a training step's saved tensors by module and its peak, ours next to the twins (SM_MODELS)
      timeout ${SM_LIMIT:-150} python3 benchmarks/saved_memory.py --out "$OUT" --commit "$COMMIT" --name "saved_memory_$COMMIT" \
        --batch ${SM_BATCH:-128} \
        --models ${SM_MODELS:-deit_small_patch16_224,agent_deit_small,flatten_deit_small,infvit_small,swin_tiny_patch4_window7_224,agent_pvt_small} \
        2>&1 | tee "$OUT/saved_memory_$COMMIT.log" | grep -E "^==|MiB  [A-Z(]" | head -60 ;;
    bench-pool)
      timeout ${POOL_LIMIT:-150} python3 benchmarks/pool_op.py --out "$OUT" --commit "$COMMIT" 2>&1 | grep -vE '^\{' | tail -16 ;;
    tests-focus)  # the one-op focused linear attention, the linear backward without the saved output, FLatten's and
      # the linear models' parity
      run_tests focus ${TESTS_LIMIT:-240} tests/test_kernels_triton.py tests/test_kernels_triton_focus.py \
        tests/test_kernels_triton_eager.py tests/test_models_gpu_parity.py tests/test_kernels_half_precision.py ;;
    tests-s30)  # stop 30: the agent op's recomputing backward, the one-op focused attention, the linear backward
      # without the saved output, and the parity of the models on them
      # (the whole set took more than 190 s under 4 workers; the training-step memory against the twin last)
      run_tests s30 ${TESTS_LIMIT:-420} tests/test_kernels_triton_agent.py tests/test_kernels_triton_eager.py \
        tests/test_kernels_triton.py tests/test_kernels_triton_focus.py tests/test_kernels_hybrid.py \
        tests/test_models_gpu_parity.py -k "not test_gpu_fast_backends_match_reference or agent or flatten or infvit or inline"
      run_tests memory 150 tests/test_models_gpu_memory.py ;;
    tests-s31)  # what the stop-30 run did not finish: the hybrid / agent kernel test against its reference and the
      # fast-backend parity of the agent, FLatten, InfViT and InLine models (39 tests), then the training-step memory
      run_tests s31 ${TESTS_LIMIT:-300} tests/test_kernels_hybrid.py tests/test_models_gpu_parity.py \
        -k "test_gpu_hybrid_and_agent_vs_reference or (test_gpu_fast_backends_match_reference and (agent or flatten or infvit or inline))"
      run_tests memory 150 tests/test_models_gpu_memory.py ;;
    tests-s31b)  # the fused agent backward's tile limit: the boundary shapes, 128 agents at head dim 128 on SDPA, the
      # hybrid / agent test at that shape (it had compiled for minutes, then failed on shared memory), then the memory
      run_tests s31b ${TESTS_LIMIT:-240} tests/test_kernels_triton_agent.py tests/test_kernels_hybrid.py \
        -k "case6 or case7 or above_the_limit or tile_limit or grid3"
      run_tests memory 150 tests/test_models_gpu_memory.py ;;
    tests-s32)  # what stop 31 changed without a GPU: the agent backward's half-precision bias-gradient tables (every
      # agent kernel test), the pooled agents recomputed in the backward (the agent layers and models' parity), then the
      # training-step memory against the twin (Agent-DeiT-S failed it at 2518b7b / bf7f002 by 32 MiB)
      run_tests s32 ${TESTS_LIMIT:-300} tests/test_kernels_triton_agent.py tests/test_kernels_hybrid.py \
        tests/test_layers_agent_inline.py tests/test_models_gpu_parity.py -k "agent or hybrid"
      run_tests memory 150 tests/test_models_gpu_memory.py ;;
    tests-bias)  # the agent position-bias kernels (forward, backward), the token conv after its wrapper's changes, the
      # agent layers and every agent / token-conv model's parity with its references
      run_tests bias 240 tests/test_kernels_agent_bias.py tests/test_kernels_conv.py tests/test_layers_agent_inline.py \
        tests/test_layers_token_conv.py tests/test_models_gpu_parity.py -k "agent or conv or flatten or bias" ;;
    tests-pool)
      run_tests pool 200 tests/test_kernels_pool.py tests/test_bench_pool_op.py tests/test_layers_agent_inline.py \
        tests/test_models_gpu_parity.py -k "pool or agent" ;;
    bench-na)
      timeout 100 python3 benchmarks/neighborhood_op.py --out "$OUT" --commit "$COMMIT" ${NA_ARGS:-} 2>&1 | tail -15 ;;
    bench-na-tiles)  # the NA kernels' tiles at NAT-T / DiNAT-T's shapes, bs 128 (TILES_ARGS: e.g. --tile-shapes ...);
      # every row goes to the log as it comes and the JSON is rewritten after each shape (a run cut by the limit keeps both)
      # shellcheck disable=SC2086  # TILES_ARGS are separate words
      timeout ${TILES_LIMIT:-300} python3 benchmarks/neighborhood_op.py --out "$OUT" --commit "$COMMIT" --tile-sweep \
        --batch 128 ${TILES_ARGS:-} > "$OUT/neighborhood_op_tiles_$COMMIT.log" 2>&1
      grep "^sweep " "$OUT/neighborhood_op_tiles_$COMMIT.log" | tail -16 ;;
    bench-na-bias-grad)  # the bias gradient's reduction over its block and programs per SM at the same shapes, bs 128
      # shellcheck disable=SC2086  # TILES_ARGS are separate words
      timeout ${TILES_LIMIT:-300} python3 benchmarks/neighborhood_op.py --out "$OUT" --commit "$COMMIT" \
        --bias-grad-sweep --batch 128 ${TILES_ARGS:-} > "$OUT/neighborhood_op_bias_grad_$COMMIT.log" 2>&1
      grep "^sweep " "$OUT/neighborhood_op_bias_grad_$COMMIT.log" | tail -8 ;;
    bench-na-bwd-block)  # the backward's query blocks / warps / register cap at the shipped key tiles, bs 128
      # shellcheck disable=SC2086  # TILES_ARGS are separate words
      timeout ${TILES_LIMIT:-300} python3 benchmarks/neighborhood_op.py --out "$OUT" --commit "$COMMIT" \
        --bwd-block-sweep --batch 128 ${TILES_ARGS:-} > "$OUT/neighborhood_op_bwd_block_$COMMIT.log" 2>&1
      grep "^sweep " "$OUT/neighborhood_op_bwd_block_$COMMIT.log" | tail -8 ;;
    tests-half)
      timeout 150 $PYTEST tests/test_kernels_half_precision.py 2>&1 | tee "$OUT/gpu_tests_half_$COMMIT.log" | tail -5 ;;
    bench-build-default)  # FLatten's memory with its positional tables resampled per forward instead of stored
      timeout 150 python3 -m visionlin.cli bench models --quick --modes eager --sizes 224,2048,4096 --build-size default \
        --models flatten_deit_small,infvit_small --time-budget 130 --name bench_models_build_default --out "$OUT" \
        --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror" ;;
    tests-agent)
      run_tests agent 150 tests/test_kernels_triton_agent.py tests/test_kernels_triton_eager.py tests/test_kernels_agent.py ;;
    tests-agent-users)  # the other users of agent attention with gradients (the converter's pooled agent op and
      # method, the agent models' parity), on the fused backward since 3daa57b
      run_tests agent_users 200 tests/test_kernels_hybrid.py tests/test_convert_methods.py tests/test_models_gpu_parity.py \
        -k agent ;;
    bench-agent-backends)
      timeout ${AGENT_LIMIT:-300} python3 benchmarks/agent_backends.py --train ${AGENT_ARGS:-} --out "$OUT" --commit "$COMMIT" 2>&1 \
        | grep -vE "Warn|warn_once" | tail -14 ;;
    host-block)  # HOST_BLOCK_ARGS: e.g. "--train --models agent_deit_small,deit_small_patch16_224"
      log="$OUT/host_block$([[ ${HOST_BLOCK_ARGS:-} == *--train* ]] && echo _train)_$COMMIT.log"
      timeout ${HOST_LIMIT:-120} python3 benchmarks/host_block.py --stacks ${HOST_BLOCK_ARGS:-} --out "$OUT" \
        --commit "$COMMIT" > "$log" 2>&1; grep "^==" "$log" ;;
    bench-models)
      timeout 180 python3 -m visionlin.cli bench models --quick --modes eager --models $MODELS --out "$OUT" \
        --commit "$COMMIT" 2>&1 | grep -E "img/s|oom|rror" ;;
    bench-compiled)
      timeout ${COMPILED_LIMIT:-330} python3 -m visionlin.cli bench models --quick --modes compiled \
        --sizes ${COMPILED_SIZES:-224,1024} --compile-sizes ${COMPILED_SIZES:-224,1024} --models $MODELS \
        --time-budget $(( ${COMPILED_LIMIT:-330} - 30 )) --name bench_models_compiled --out "$OUT" --commit "$COMMIT" \
        2>&1 | grep -E "img/s|oom|rror|skip" ;;
    bench-train)
      timeout 120 python3 -m visionlin.cli bench train --quick --models $MODELS --out "$OUT" --commit "$COMMIT" 2>&1 \
        | grep -E "img/s|oom|rror" ;;
    bench-op)  # OP_ARGS: more flags, e.g. --profile (each case's Triton kernels per step: the forward's state vs
      # read-out split that s24 could not state)
      # shellcheck disable=SC2086  # OP_ARGS are separate words
      timeout ${OP_LIMIT:-120} python3 -m visionlin.cli bench op --out "$OUT" --commit "$COMMIT" ${OP_ARGS:-} 2>&1 \
        | tail -${OP_TAIL:-8} ;;
    bench-largest)
      timeout ${LARGEST_LIMIT:-280} python3 -m visionlin.cli bench largest --quick --models $MODELS \
        --time-cap ${LARGEST_CAP:-40} --out "$OUT" --commit "$COMMIT" 2>&1 | grep -E "largest|rror" ;;
    profile)
      timeout 100 python3 benchmarks/profile_models.py --out "$OUT" --models ${PROFILE_MODELS:-${MODELS%,infvit_pure_small}} \
        --sizes ${PROFILE_SIZES:-224:256} --commit "$COMMIT" > "$OUT/profile_$COMMIT.log" 2>&1; grep -A8 "^==" "$OUT/profile_$COMMIT.log" | grep -v "^     " ;;
    profile-hier)  # where the hierarchical models below swin_tiny spend their forward and training step
      for m in ${PROFILE_MODES:-fwd ${PROFILE_TRAIN:+train}}; do  # PROFILE_MODES=train: the training step alone
        mode=$([[ $m == train ]] && echo --train)
        timeout ${PROFILE_LIMIT:-120} python3 benchmarks/profile_models.py $mode --out "$OUT" --twin $SWIN \
          --models ${PROFILE_HIER_MODELS:-nalaformer_tiny,nat_tiny,agent_swin_tiny} --sizes 224:128 --configs ${PROFILE_CONFIGS:-default} --name "profile_hier${mode:+_train}_$COMMIT" \
          --commit "$COMMIT" > "$OUT/profile_hier${mode:+_train}_$COMMIT.log" 2>&1
        grep -A6 "^==" "$OUT/profile_hier${mode:+_train}_$COMMIT.log" | grep -v "^     "
      done ;;
    profile-train)
      timeout 100 python3 benchmarks/profile_models.py --train --out "$OUT" --models ${MODELS%,infvit_pure_small} \
        --sizes 224:128 --commit "$COMMIT" > "$OUT/profile_train_$COMMIT.log" 2>&1; grep -A8 "^==" "$OUT/profile_train_$COMMIT.log" | grep -v "^     " ;;
    bench-linear-ab)
      timeout 170 python3 benchmarks/linear_settings_ab.py --out "$OUT" --commit "$COMMIT" --rounds ${AB_ROUNDS:-3} 2>&1 \
        | grep -v '^{"round"' | tail -20 ;;
    profile-patch)  # the non-overlapping conv stems as one GEMM (FAST_PATHS["patch_gemm"]) off / on: GPU time per
      # forward at 224 px (abf7aa9's profile: cuDNN's implicit_convolve_sgemm took 1.65 of the twin's 13 ms)
      # PATCH_TRAIN=1: the training step instead (224 px, bs 128)
      mode=${PATCH_TRAIN:+--train}
      timeout 150 python3 benchmarks/profile_models.py $mode --out "$OUT" --sizes 224:$([[ -n $mode ]] && echo 128 || echo 256) \
        --configs baseline,patch_gemm --models ${PATCH_MODELS:-infvit_small,agent_deit_small,flatten_deit_small} \
        --name "profile_patch${mode:+_train}_$COMMIT" --commit "$COMMIT" > "$OUT/profile_patch${mode:+_train}_$COMMIT.log" 2>&1
      grep -E "^==|convolve|patch" "$OUT/profile_patch${mode:+_train}_$COMMIT.log" | cut -c1-160 ;;
    bench-linear-grid)
      timeout ${GRID_LIMIT:-500} python3 benchmarks/linear_settings_ab.py --out "$OUT" --commit "$COMMIT" --grid 2>&1 \
        | grep -v '^{"case"' | tail -20 ;;
    bench-rope-grid)
      timeout ${GRID_LIMIT:-500} python3 benchmarks/linear_settings_ab.py --out "$OUT" --commit "$COMMIT" --grid \
        --family rope ${GRID_CASES:+--cases $GRID_CASES} 2>&1 | grep -v '^{"case"' | tail -20 ;;
    *) echo "unknown stage $stage" ;;
  esac
done
if [[ -n ${PACK:-} ]]; then
  # an all.tgz of an earlier call in the same command is unpacked first and packed again with the new files
  # (--skip-old-files: a file this call wrote again keeps its new content)
  (cd "$OUT" && { [[ ! -f all.tgz ]] || { tar xzf all.tgz --skip-old-files && rm all.tgz; }; } \
    && files=$(find . -type f ! -name all.tgz) \
    && [[ -n $files ]] && tar czf all.tgz $files && rm -f $files \
    && find . -mindepth 1 -type d -empty -delete && echo "packed into $OUT/all.tgz")
fi
