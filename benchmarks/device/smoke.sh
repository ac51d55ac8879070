#!/usr/bin/env bash
# Every batch script of the Gemma runs, a few items each on the small fact-world model, on DEVICE
# (cuda or cpu), in parallel; prints each one's last lines. Usage: bash benchmarks/device/smoke.sh cuda
D=${1:-cuda}; S=$(mktemp -d)
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
python3 benchmarks/trace_known_facts.py --model factworld --n-facts 2 --samples 3 --device $D --out-dir $S > $S/trace.log 2>&1 &
(for i in 0 1; do python3 benchmarks/trace_known_facts.py --model factworld --n-facts 4 --samples 3 --device $D --out-dir $S --tag sh --shard $i/2; done
 python3 benchmarks/trace_known_facts.py --model factworld --n-facts 4 --samples 3 --device $D --out-dir $S --tag sh --merge 2) > $S/shard.log 2>&1 &
python3 benchmarks/bench_editing.py --models factworld --n-records 2 --gen-tokens 8 --throughput-tokens 500 --stats-tokens 3000 --device $D --out $S/ed --quiet > $S/edit.log 2>&1 &
python3 benchmarks/bench_diagnose.py --model factworld --n-facts 2 --n-unrelated 4 --samples 3 --ig-steps 4 --bootstrap 10 --stats-tokens 3000 --device $D --out $S/dg --quiet > $S/diag.log 2>&1 &
python3 benchmarks/bench_stress.py --model factworld --n-edits 4 --every 2 --n-eval 8 --gen-tokens 8 --stats-tokens 3000 --denominator-sample 2 --variants rome r-rome-spread --device $D --out $S/st --log-dir $S/logs --quiet > $S/stress.log 2>&1 &
wait
for f in trace shard edit diag stress; do echo "=== $f"; tail -n 6 $S/$f.log; done
grep -l "Traceback" $S/*.log && echo "SMOKE: FAILURES ABOVE" || echo "SMOKE: all ran"
