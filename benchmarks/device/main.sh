#!/usr/bin/env bash
# The Gemma-3-270m diagnose and stress runs as parallel workers on one GPU machine (16 cores, one GPU; set
# up by setup.sh): diagnose + edit on 150 known PARAREL facts (N_DIAG shards), and 200 sequential
# edits per stress variant (rome, r-rome, r-rome-spread; one worker each). Workers stop when the
# call's budget runs short (their logs keep what finished); a worker that fails on the GPU is
# rerun on the CPU for the time left. Then the diagnose shards are merged and summarised
# (--merge), and a stress run that did not finish is summarised from its log (--stop-after 0
# replays the logged edits and adds none). Results and logs are packed into $OUT/results.tgz; the
# stress logs, one gzipped file per variant, come back beside it. Outputs live in $DEVICE_HOME/work,
# outside the repository copy (each call replaces that copy) and outside $OUT (which is /root/out
# there, emptied before each call, and returns at most 8 files), so a second call on the same
# machine resumes them.
# Why worker processes by hand and not `--executor ray`: the device machine has no network and takes
# files in transfers of at most 64 MiB; Ray's wheel is 79 MB (docs/scaling.md, "The hand-made sharding").
set -u
H=${DEVICE_HOME:-/root}  # the device machine's writable home (setup.sh installs into $H/site)
export PYTHONPATH=$H/site:$PWD:$PWD/benchmarks KVMEM_CACHE=$H/kvcache OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
SUM=${SUMMARY_S:-70}; DEV=${DEVICE:-cuda}; ND=${N_DIAG:-12}
W=${WORK_S:-$(( ${CALL_T0:-$(date +%s)} + ${BUDGET_S:-585} - $(date +%s) - SUM - 20 ))}
echo "workers: $W s, summaries: $SUM s"
[ "$W" -ge 60 ] || { echo "only $W s left for the workers: rerun main.sh in a call of its own"; exit 1; }
R=$H/work; LOG=$R/logs; mkdir -p $LOG $R/stress_logs
# facts this repository's diagnose log already holds are skipped by every shard
DLOG=benchmarks/results/diagnose/diagnose_gemma-3-270m_pararel.jsonl
[ -e $R/${DLOG##*/} ] || { [ -e $DLOG ] && cp $DLOG $R/; }
T0=$(date +%s)
worker() {  # name, seconds, script args...
  local name=$1 limit=$2; shift 2
  timeout $limit python3 "$@" --device $DEV > $LOG/$name.log 2>&1; local rc=$?
  local left=$(( limit - ($(date +%s) - T0) ))
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $left -gt 30 ]; then
    echo "== $name failed on $DEV (rc $rc); rerun on cpu for ${left} s" >> $LOG/$name.log
    timeout $left python3 "$@" --device cpu >> $LOG/$name.log 2>&1
  fi
}
DG="benchmarks/bench_diagnose.py --model gemma-3-270m --source pararel --n-facts 150 --max-paraphrases 3 --stats-tokens 200000 --quiet --out $R/diagnose_gemma-3-270m_pararel"
ST="benchmarks/bench_stress.py --model gemma-3-270m --n-edits 200 --every 10 --stats-tokens 200000 --log-dir $R/stress_logs --quiet"
VARIANTS="rome r-rome r-rome-spread"
den() { [ $1 = rome ] && echo 10 || echo 0; }
PIDS=()
for v in $VARIANTS; do rm -f $R/stress_gemma-3-270m_$v.json; done  # an earlier call's summary of a cut-off run
for v in $VARIANTS; do worker stress_$v $W $ST --variants $v --denominator-sample $(den $v) --out $R/stress_gemma-3-270m_$v & PIDS+=($!); done
for i in $(seq 0 $((ND - 1))); do worker diag$i $W $DG --shard $i/$ND & PIDS+=($!); done
timeout $W python3 benchmarks/device/prepare.py 7 8 9 10 11 12 13 1 0 14 15 16 17 > $LOG/prepare_rest.log 2>&1 &
PREP=$!
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $LOG/gpu_busy.txt 2>&1
wait "${PIDS[@]}"
kill $PREP 2>/dev/null
echo "workers done after $(( $(date +%s) - T0 )) s"
timeout $SUM python3 $DG --merge $ND --device $DEV > $LOG/sum_diag.log 2>&1 &
for v in $VARIANTS; do
  [ -e $R/stress_gemma-3-270m_$v.json ] || timeout $SUM python3 $ST --variants $v --denominator-sample $(den $v) \
    --out $R/stress_gemma-3-270m_$v --stop-after 0 --device $DEV > $LOG/sum_stress_$v.log 2>&1 &
done
wait
echo "summaries done after $(( $(date +%s) - T0 )) s"
for f in $LOG/*.log; do echo "=== $f"; grep -v "it/s\]\|s/it\]" $f | tail -n 4; done
# files come back at most 16 MiB each: the stress logs (~30 kB per Gemma edit) one file per variant
tar -czf $OUT/results.tgz -C $R --exclude=./stress_logs .
for f in $R/stress_logs/*.jsonl; do [ -e "$f" ] && gzip -c "$f" > $OUT/$(basename "$f").gz; done
ls -la $OUT
