#!/usr/bin/env bash
# One device call's worth of GPU work, by name (bench/gpu_notes.md has the plan). Run from
# the repository root on the GPU machine; results go under $OUT/<step>/ (names without '=',
# which the device tool cannot bring back). Every step has its own time limit, so a slow one
# cannot eat the call.
#
#   bash bench/gpu_session.sh install                # MLX CUDA wheels from .mlxcuda1/.mlxcuda2
#   bash bench/gpu_session.sh checks 0,1,2 chained dispatch
#   bash bench/gpu_session.sh table e2e-128k
#
# Steps: install | checks RUNS | checks-fused RUNS | chained | table | dispatch | pattern | e2e-32k |
#        e2e-32k-w4 | e2e-fused | e2e-cut | e2e-rope | e2e-128k | e2e-ab N VARIANT | pack |
#        e2e-batch | sweep | trace | ab NAME=VALUE | ncu N | ncu-args N "ARGS" | ncu-full N |
#        ncu-full-args N "ARGS" | ncu-src N NAME "ARGS" |
#        step-prof N CACHES "ARGS" | step-ncu N "ARGS" | step-ab N ROUNDS "ARGS_A" "ARGS_B" |
#        step-sm N CACHE "ARGS" | step-trace N "ARGS" | trace-between |
#        e2e-tune-ab N ROUNDS "TUNE_A" "TUNE_B"
set -euo pipefail
OUT=${OUT:-/tmp/out}
export PYTHONPATH=/tmp/site:$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1

usage() { sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; }

run() {  # run SECONDS NAME CMD...: one step, its output filtered to what matters
  local limit=$1 name=$2
  shift 2
  mkdir -p "$OUT/$name"
  echo "== $name ($(date -u +%H:%M:%S))"
  # a failed or timed-out step is reported and the next one runs
  timeout "$limit" "$@" --out "$OUT/$name" 2>&1 | grep -v -i warning | tail -40 ||
    echo "== $name failed or timed out (status $?)"
}

ncu_split() {  # ncu_split SECONDS NCU-ARGS...: ncu on the split kernel alone, clocks as they run
  local limit=$1
  shift
  timeout "$limit" "$(find_ncu)" --clock-control none --profile-from-start off \
    -k regex:tq_mma_decode_split "$@"
}

ncu_model() {  # ncu_model SECONDS NCU-ARGS...: ncu on a decode step inside the model (the
  local limit=$1  # step_* steps), clocks and caches as they run, only the profiler's range
  shift
  timeout "$limit" "$(find_ncu)" --clock-control none --cache-control none --profile-from-start off "$@"
}

slug() { echo "$1" | tr -c 'A-Za-z0-9\n' _; }  # options as a file-name suffix

abba() {  # abba ROUNDS FN: FN a|b ROUND, round by round in the order a b, b a, a b, ...
  local i v order
  for i in $(seq 1 "$1"); do
    order="a b"
    [ $((i % 2)) = 0 ] && order="b a"
    for v in $order; do "$2" "$v" "$i"; done
  done
}

step_ab_process() {  # step_ab_process a|b ROUND: one process of step-ab (its n, a, bb, d)
  local v=$1 i=$2 extra=$a cache
  [ "$v" = b ] && extra=$bb
  # the profile is <cache>.csv beside step_profile's <cache>.json (ARGS may name --cache)
  cache=$(echo "--cache tq-default $extra" | grep -oE -- '--cache [^ ]+' | tail -1 | cut -d' ' -f2)
  mkdir -p "$d/$v-$i"
  # shellcheck disable=SC2086  # extra: step_profile's options, split on purpose
  ncu_model 150 --metrics gpu__time_duration.sum --csv --page raw --log-file "$d/$v-$i/$cache.csv" \
    python3 bench/step_profile.py --cache tq-default --context "$n" --no-warm $extra \
    --out "$d/$v-$i" >/dev/null 2>&1 || echo "== $v-$i failed (status $?)"
  echo "== $v-$i ($extra): $(python3 bench/step_profile.py --report "$d/$v-$i" --trim 2>&1 |
    grep -E '^\| \*\*(attention|all)' | tr '\n' ' ')"
}

e2e_tune_process() {  # e2e_tune_process a|b ROUND: one process of e2e-tune-ab (its n, a, bb, d)
  local v=$1 i=$2 tune=$a
  [ "$v" = b ] && tune=$bb
  mkdir -p "$d/$v-$i"
  timeout 150 python3 bench/e2e_decode_gpu.py --models llama-3.1-8b --contexts "$n" \
    --caches fp16,tq-default --repeats 6 ${tune:+--tune "$tune"} --out "$d/$v-$i" \
    >"$d/$v-$i/log.txt" 2>&1 || echo "== $v-$i failed (status $?)"
  echo "== $v-$i ($tune): $(python3 -c 'import json, sys
rows = json.load(open(sys.argv[1]))["rows"]
print(" ".join("%s %.1f tok/s %.3fx" % (r["cache"], r["tok_s"], r["vs_first"]) for r in rows))' \
    "$d/$v-$i/e2e_decode_gpu.json" 2>&1 | tail -1)"
}

find_ncu() {  # ncu on PATH, else the CUDA toolkit's
  local f
  command -v ncu && return
  for f in /usr/local/cuda*/bin/ncu; do
    [ -x "$f" ] && { echo "$f"; return; }
  done
}

[ $# -gt 0 ] || { usage; exit 2; }
while [ $# -gt 0 ]; do
  step=$1
  shift
  case $step in
    install)  # second half of the carry (bench/gpu_notes.md: device workflow)
      if [ ! -d /tmp/site/mlx ]; then
        w=$HOME/mlxw
        cat "$w/cuda.part.aa" .mlxcuda2/cuda.part.ab >"$w/$(cat "$w/WHEEL_NAME")" &&
          rm "$w/cuda.part.aa" &&
          python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$w"/*.whl
      fi
      # bench/gpu_wheels.sh: pydantic & co. for the CUDA tests that import the sidecar
      if [ -d .gpuwheels ] && [ ! -d /tmp/site/pydantic ]; then
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpuwheels/*.whl
      fi
      python3 -c "import mlx.core as mx; print('mlx', mx.__version__, mx.default_device())"
      ;;
    checks)
      runs=$1
      shift
      run 590 "checks-${runs//,/-}" python3 bench/attention_gpu.py --checks-only --check-runs "$runs"
      ;;
    checks-fused)  # the same checks with one launch a layer (mma_decode.FUSED_JOIN)
      runs=$1
      shift
      run 590 "checks-fused-${runs//,/-}" python3 bench/attention_gpu.py --checks-only --fused-join \
        --check-runs "$runs"
      ;;
    chained)
      v="fp16,ours default layout,ours default layout (fused join),ours default layout (two launches)"
      v="$v,ours affine 4b,fp16 (pipelined),ours default layout (pipelined)"
      v="$v,ours default layout (fused join) (pipelined),ours default layout (two launches) (pipelined)"
      run 240 chained-d128 python3 bench/attention_gpu.py --skip-checks --shapes 32/8/128 \
        --contexts 4096,16384,32768,65536,131072 --variants "$v"
      run 90 chained-d256 python3 bench/attention_gpu.py --skip-checks --shapes 16/2/256 \
        --contexts 4096,131072 --variants "fp16,ours default layout,ours affine 4b"
      ;;
    table)  # the issue's full table, 4K-256K, both shapes: every variant but the tuning ones
      v="fp16,mlx-lm affine 8b,mlx-lm affine 4b,ours default layout,ours default layout (kernel only)"
      v="$v,ours default layout (fused join),ours default layout (two launches),ours affine 4b"
      v="$v,ours affine 4b (kernel only),ours codebook 4b,ours codebook 3b,fp16 (pipelined)"
      v="$v,ours default layout (pipelined),ours default layout (fused join) (pipelined)"
      v="$v,ours default layout (two launches) (pipelined)"
      run 520 table python3 bench/attention_gpu.py --skip-checks --variants "$v"
      ;;
    dispatch)
      run 120 dispatch python3 bench/dispatch_cost.py
      ;;
    trace)  # every block's timeline in one fused launch (bench/kernel_trace.py)
      run 300 trace python3 bench/kernel_trace.py --contexts 4033,16321,32705,131009 --splits 16
      ;;
    trace-between)  # the 32K launch alone after each kind of traffic (kernel_trace --between):
      for m in none kernel l2 tlb both; do  # which reproduces the model's stage times
        run 120 "trace-between-$m" python3 bench/kernel_trace.py --contexts 32705 --between "$m"
      done
      ;;
    ab)  # ab NAME=VALUE[,...]: the split kernel with and without a tunable, interleaved (3 rounds)
      t=$1
      shift
      for i in 1 2 3; do
        run 60 "ab-$i-default" python3 bench/split_sweep.py --contexts 4033,32705,131009
        run 60 "ab-$i-tuned" python3 bench/split_sweep.py --contexts 4033,32705,131009 --tune "$t"
      done
      ;;
    sweep)  # the split kernel's grid: block order and split count (bench/split_sweep.py)
      run 240 sweep python3 bench/split_sweep.py
      ;;
    pattern)  # read bandwidth of the split kernel's load order, key layout as stored vs tiled
      run 60 pattern python3 bench/read_pattern.py
      ;;
    e2e-batch)  # Llama at 32K with the GPU busy enough to matter (batch 1 is host-bound there)
      for bsz in 4 16; do
        run 240 "e2e-32k-b$bsz" python3 bench/e2e_decode_gpu.py --models llama-3.1-8b \
          --contexts 32768 --batch "$bsz" --caches fp16,tq-default --repeats 3
      done
      ;;
    e2e-32k)
      run 200 e2e-32k-b1 python3 bench/e2e_decode_gpu.py --models llama-3.1-8b,qwen3.5-35b-a3b \
        --contexts 32768 --caches fp16,tq-default --repeats 4
      ;;
    e2e-32k-w4)  # the same with 4-bit weights (as MLX users run them): KV is more of a step
      run 240 e2e-32k-b1-w4 python3 bench/e2e_decode_gpu.py --models llama-3.1-8b,qwen3.5-35b-a3b \
        --contexts 32768 --caches fp16,tq-default --repeats 4 --weight-bits 4
      ;;
    e2e-fused)  # Llama at 32K, batch 1: the kernel's join in the split launch vs a second one
      run 300 e2e-32k-fused python3 bench/e2e_decode_gpu.py --models llama-3.1-8b \
        --contexts 32768 --caches fp16,tq-unfused,tq-fused --repeats 4
      ;;
    e2e-cut)  # Llama at 32K, batch 1: the tail buffer to the kernel (default) vs views cut a step
      run 300 e2e-32k-cut python3 bench/e2e_decode_gpu.py --models llama-3.1-8b \
        --contexts 32768 --caches fp16,tq-default,tq-cut --repeats 6
      ;;
    e2e-rope)  # Llama at 32K, batch 1: RoPE in the layer kernel (default) vs by MLX ops
      run 300 e2e-32k-rope python3 bench/e2e_decode_gpu.py --models llama-3.1-8b \
        --contexts 32768 --caches fp16,tq-default,tq-mlxrope --repeats 6
      ;;
    e2e-ab)  # e2e-ab N VARIANT: Llama 32K batch 1, N rounds of one process a build, the root
      n=$1 variant=$2  # and .variants/VARIANT alternated (ABBA), until ~520 s; bench/e2e_ab.py
      shift 2
      d="$OUT/e2e-ab" root=$PWD t0=$(date +%s)
      mkdir -p "$d"
      echo "== e2e-ab ($(date -u +%H:%M:%S)): new = $(git rev-parse --short HEAD 2>/dev/null || echo root), old = .variants/$variant"
      for i in $(seq 1 "$n"); do
        order="new old"
        [ $((i % 2)) = 0 ] && order="old new"
        for b in $order; do
          [ $(($(date +%s) - t0)) -gt 520 ] && break 2
          src=$root
          [ "$b" = old ] && src=$root/.variants/$variant
          # each build runs from its own tree (its bench, its services)
          (cd "$src" && PYTHONPATH=/tmp/site:$src timeout 90 python3 bench/e2e_decode_gpu.py \
            --models llama-3.1-8b --contexts 32768 --caches fp16,tq-default --repeats 6 --calls 32 \
            --out "$d/$b-$i" >"$d/$b-$i.log" 2>&1) || echo "== $b-$i failed (status $?)"
          echo "$b-$i" >>"$d/order.txt"
        done
      done
      python3 bench/e2e_ab.py "$d"
      ;;
    step-prof)  # step-prof N CACHES "ARGS": every kernel of 4 Llama decode steps at context N
      n=$1 caches=$2 extra=$3  # under ncu, each cache of CACHES (fp16,tq-default) in its own
      shift 3                  # process (bench/step_profile.py; ARGS: its options)
      d="$OUT/step-prof-$n$(slug "$extra")"
      mkdir -p "$d"
      for cache in ${caches//,/ }; do
        echo "== step-prof $n $cache $extra ($(date -u +%H:%M:%S))"
        # shellcheck disable=SC2086  # extra: step_profile's options, split on purpose
        ncu_model 240 --metrics gpu__time_duration.sum --csv --page raw --log-file "$d/$cache.csv" \
          python3 bench/step_profile.py --cache "$cache" --context "$n" $extra --out "$d" 2>&1 |
          grep -v -i warning | tail -5 || echo "== step-prof $cache failed or timed out"
      done
      python3 bench/step_profile.py --report "$d" --trim || true
      ;;
    step-sm)  # step-sm N CACHE "ARGS": each attention launch of a Llama decode step at context N,
      n=$1 cache=$2 extra=$3  # its SMs' active cycles (min / mean / max) against its elapsed
      shift 3                 # ones: a late SM, or all of them late?
      mkdir -p "$OUT/ncu"
      f="$OUT/ncu/step_sm_${n}_$cache$(slug "$extra").csv"
      echo "== step-sm $n $cache $extra ($(date -u +%H:%M:%S))"
      # shellcheck disable=SC2086  # extra: step_profile's options, split on purpose
      ncu_model 240 -k regex:'tq_mma|sdpa' -c 6 --csv --page raw --log-file "$f" --metrics \
        gpu__time_duration.sum,sm__cycles_elapsed.max,sm__cycles_active.min,sm__cycles_active.avg,sm__cycles_active.max \
        python3 bench/step_profile.py --cache "$cache" --context "$n" --steps 1 --no-warm $extra \
        --out /tmp/step-sm >/dev/null 2>&1 || echo "== step-sm failed or timed out"
      python3 bench/step_profile.py --metrics-report "$f" || true
      ;;
    step-trace)  # step-trace N "ARGS": our kernel's block timelines inside Llama decode steps at
      n=$1 extra=$2  # context N (kernel_trace's marks, every layer's last launch; no ncu)
      shift 2
      # shellcheck disable=SC2086  # extra: step_profile's options, split on purpose
      run 200 "step-trace-$n" python3 bench/step_profile.py --cache tq-default --context "$n" \
        --steps 2 --no-warm --trace $extra
      ;;
    step-ab)  # step-ab N ROUNDS "ARGS_A" "ARGS_B": our step's kernels at context N under ncu,
      n=$1 rounds=$2 a=$3 bb=$4  # ABBA processes of step_profile's ARGS_A / ARGS_B (--no-warm;
      shift 4                    # e.g. --tune ...): our attention's us a step, process by process
      d="$OUT/step-ab-$n"
      abba "$rounds" step_ab_process
      ;;
    e2e-tune-ab)  # e2e-tune-ab N ROUNDS "TUNE_A" "TUNE_B": Llama decode at context N, batch 1,
      n=$1 rounds=$2 a=$3 bb=$4  # fp16 and ours in each process (rounds paired), ABBA processes
      shift 4                    # of mma_decode settings A / B (e.g. "SHORT_BODY=0" ""): each
      d="$OUT/e2e-tune-ab-$n"    # process's fp16 tok/s and ours' paired ratio (vs_first)
      abba "$rounds" e2e_tune_process
      ;;
    step-ncu)  # step-ncu N "ARGS": ncu's sections for the split kernel inside Llama decode steps
      n=$1 extra=$2  # at context N (ours; caches as the model leaves them); ARGS: step_profile's
      shift 2
      mkdir -p "$OUT/ncu"
      f="$OUT/ncu/step_ncu_${n}$(slug "$extra").txt"
      echo "== step-ncu $n $extra ($(date -u +%H:%M:%S))"
      # shellcheck disable=SC2086  # extra: step_profile's options, split on purpose
      ncu_model 240 -k regex:tq_mma_decode_split -c 2 --section SpeedOfLight --section Occupancy \
        --section WarpStateStats --section MemoryWorkloadAnalysis --section SchedulerStats \
        --section LaunchStats --print-details all python3 bench/step_profile.py --cache tq-default --context "$n" \
        --steps 1 --no-warm $extra --out /tmp/step-ncu >"$f" 2>&1 || echo "== step-ncu failed or timed out"
      grep -E "Duration|DRAM Through|Memory Through|L2 Hit|L1/TEX Hit|Issued Warp|Achieved Occ|Stall|Grid Size|Registers Per" \
        "$f" | head -40 || true
      ;;
    pack)  # everything under $OUT as one tarball (the device tool brings back only a few files)
      (cd "$OUT" && tar czf /tmp/results.tgz --exclude=results.tgz . && rm -rf ./* &&
        mv /tmp/results.tgz results.tgz)
      ;;
    e2e-128k)
      run 200 e2e-128k-b4 python3 bench/e2e_decode_gpu.py --models llama-3.1-8b \
        --contexts 131072 --batch 4 --caches fp16,tq-default --repeats 3
      ;;
    ncu | ncu-args)  # one decode layer's kernels at context N; ncu-args N "ARGS": kernel_profile's
      n=$1
      shift
      extra=""
      if [ "$step" = ncu-args ]; then
        extra=$1
        shift
      fi
      ncu_bin=$(find_ncu)
      echo "== ncu $n $extra"
      # shellcheck disable=SC2086  # extra: kernel_profile's options, split on purpose
      timeout 300 "$ncu_bin" --clock-control none --profile-from-start off --section SpeedOfLight \
        --section Occupancy python3 bench/kernel_profile.py --n "$n" $extra 2>&1 |
        grep -E "^  [a-zA-Z]|Duration|SM Active Cycles|Achieved Occupancy" |
        sed -E 's/\([^()]*\) \(/ (/; s/, Context .*//' | cut -c1-150 | head -40 ||
        echo "== ncu failed or timed out"  # (kernel signatures cut: a call returns 12,000 chars)
      ;;
    ncu-full | ncu-full-args)  # every section (stall details too) of the split kernel at N;
      n=$1                       # ncu-full-args N "ARGS": kernel_profile's options
      shift
      extra=""
      if [ "$step" = ncu-full-args ]; then
        extra=$1
        shift
      fi
      mkdir -p "$OUT/ncu"
      f="$OUT/ncu/ncu_full_${n}$(slug "$extra").txt"
      echo "== ncu-full $n $extra"
      # shellcheck disable=SC2086  # extra: kernel_profile's options, split on purpose
      ncu_split 400 --section SpeedOfLight --section Occupancy --section WarpStateStats --section LaunchStats \
        --section MemoryWorkloadAnalysis --section SchedulerStats --section ComputeWorkloadAnalysis \
        --section SourceCounters --print-details all \
        python3 bench/kernel_profile.py --n "$n" $extra >"$f" 2>&1 ||
        echo "== ncu-full failed or timed out"
      grep -E "Duration|SM Active|DRAM Through|Stall|Issued Warp|Achieved Occ|L1/TEX Cache|L2 Cache Th|Pipe" \
        "$f" | head -60 || true  # (nothing matched: ncu failed, said above; the next step runs)
      ;;
    ncu-src)  # ncu-src N NAME "ARGS": per-instruction stall samples of the split kernel at N
      n=$1 name=$2 extra=$3  # (kernel_profile's options), as CSV ($OUT/ncu/src_NAME.csv)
      shift 3
      ncu_bin=$(find_ncu)
      mkdir -p "$OUT/ncu"
      echo "== ncu-src $n $name $extra"
      # shellcheck disable=SC2086  # extra: kernel_profile's options, split on purpose
      ncu_split 300 --section SourceCounters --section WarpStateStats --section SpeedOfLight -f \
        -o "/tmp/src_$name" python3 bench/kernel_profile.py --n "$n" $extra >/dev/null 2>&1 ||
        echo "== ncu-src failed or timed out"
      "$ncu_bin" -i "/tmp/src_$name.ncu-rep" --page source --csv --print-source sass \
        >"$OUT/ncu/src_$name.csv" 2>&1 || echo "== ncu-src: no source page"
      "$ncu_bin" -i "/tmp/src_$name.ncu-rep" --page details --section WarpStateStats --section SpeedOfLight \
        2>&1 | grep -E "Duration|Stall No|Stall Wait|Stall Long|Stall Short|Stall IMC|Issued Warp" | head -12 ||
        true
      head -c 600 "$OUT/ncu/src_$name.csv"; echo; wc -l "$OUT/ncu/src_$name.csv"
      ;;
    -h | --help) usage ;;
    *)
      echo "unknown step: $step" >&2
      usage
      exit 2
      ;;
  esac
done
