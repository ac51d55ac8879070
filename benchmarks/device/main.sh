#!/usr/bin/env bash
# The Gemma-3-270m batch runs of issues 3, 5 and 8 as parallel workers on one GPU machine
# (16 cores, one GPU; set up by setup.sh): AIE over every known fact (5 shards), the ROME
# CounterFact table over 250 records with the preset's norm clamp (1) and ROME's (4) (3 shards
# each), diagnose on 150 known PARAREL facts (3 shards), 200 sequential edits per stress variant (one worker
# each, own results file). Workers stop after WORK_S seconds (their logs keep what finished; the
# stress workers get SUMMARY_S more); a worker that fails on the GPU is rerun on the CPU for the
# time left. Then each sharded run's logs are merged and summarised by the same scripts
# (--merge), and the results are packed into $OUT/results.tgz. Outputs and logs live in /root/out,
# outside the repository copy (each call replaces that copy), so a second call on the same warm
# machine resumes them.
set -u
export PYTHONPATH=/root/site:$PWD KVMEM_CACHE=/root/kvcache OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1
# workers get what is left of the call's BUDGET_S (the device's 600 s per call) after the summaries
SUM=${SUMMARY_S:-75}; DEV=${DEVICE:-cuda}
W=${WORK_S:-$(( ${CALL_T0:-$(date +%s)} + ${BUDGET_S:-585} - $(date +%s) - SUM - 25 ))}
echo "workers: $W s, summaries: $SUM s"
[ "$W" -ge 60 ] || { echo "only $W s left for the workers: rerun main.sh in a call of its own"; exit 1; }
# every AIE worker and the merge use the noise prepare.py computed once (a CPU fallback would
# otherwise compute it in other last bits, and its log could not be merged)
R=/root/out; LOG=/root/out/logs; mkdir -p $LOG $R/stress_logs
NOISE=$(cat $R/aie_noise.txt) || exit 1
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
AIE="benchmarks/trace_known_facts.py --model gemma-3-270m --n-facts 100000 --tag all --out-dir $R --noise $NOISE"
ED="benchmarks/bench_editing.py --models gemma-3-270m --n-records 250 --stats-tokens 200000 --gen-prompts 2 --quiet"
DG="benchmarks/bench_diagnose.py --model gemma-3-270m --source pararel --n-facts 150 --stats-tokens 200000 --quiet --out $R/diagnose_gemma-3-270m_pararel"
ST="benchmarks/bench_stress.py --model gemma-3-270m --n-edits 200 --every 10 --log-dir $R/stress_logs --quiet"
STRESS=()
for v in rome r-rome r-rome-spread; do
  den=0; [ $v = rome ] && den=10
  worker stress_$v $((W + SUM)) $ST --variants $v --denominator-sample $den --out $R/stress_gemma-3-270m_$v &
  STRESS+=($!)
done
PIDS=()
for i in 0 1 2 3 4; do worker aie$i $W $AIE --shard $i/5 & PIDS+=($!); done
for i in 0 1 2; do
  worker rome$i $W $ED --out $R/editing_gemma250 --shard $i/3 & PIDS+=($!)
  worker clamp$i $W $ED --clamp-norm-factor 4 --out $R/editing_gemma250_clamp4 --shard $i/3 & PIDS+=($!)
  worker diag$i $W $DG --shard $i/3 & PIDS+=($!)
done
sleep 60; nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv > $LOG/gpu_busy.txt 2>&1
wait "${PIDS[@]}"
echo "workers done after $(( $(date +%s) - T0 )) s"
timeout $SUM python3 $AIE --merge 5 --device $DEV > $LOG/sum_aie.log 2>&1 &
timeout $SUM python3 $ED --out $R/editing_gemma250 --merge 3 --throughput-tokens 20000 --device $DEV > $LOG/sum_rome.log 2>&1 &
timeout $SUM python3 $ED --out $R/editing_gemma250_clamp4 --clamp-norm-factor 4 --merge 3 --throughput-tokens 20000 --device $DEV > $LOG/sum_clamp.log 2>&1 &
timeout $SUM python3 $DG --merge 3 --device $DEV > $LOG/sum_diag.log 2>&1 &
wait
echo "summaries done after $(( $(date +%s) - T0 )) s"
for f in $LOG/*.log; do echo "=== $f"; grep -v "it/s\]\|s/it\]" $f | tail -n 4; done
tar -czf $OUT/results.tgz -C $R .
ls -la $OUT
