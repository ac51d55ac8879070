#!/bin/sh
# The issue-20 validation runs in order (each resumable: rerun this script to continue).
# Run from the repository root: nice -n 10 sh benchmarks/interference_validation_all.sh
set -e
cd benchmarks
python interference_validation.py --model factworld --source diagnose --n-records 40 --threads 1
python interference_validation.py --model gemma-3-270m --source counterfact --n-records 250 --threads 1
python interference_validation.py --model gemma-3-270m --source diagnose --diagnose-layers fixed --n-records 100 --threads 1
python interference_validation.py --model smollm2-135m --source counterfact --n-records 100 --threads 1
python interference_validation.py --model gemma-3-270m --source diagnose --diagnose-layers diagnosed --n-records 100 --threads 1
python interference_summary.py
