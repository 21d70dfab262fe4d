#!/bin/bash
# Device grid: every line of $1 (exp.py arguments) runs as its own process on the GPU, all at once.
# usage (from the repo root of a checkout that has notes/exp.py): bash notes/dev.sh notes/grid2.txt 540
git log --oneline -1; git branch --show-current 2>/dev/null; nvidia-smi -L; python3 -c "import torch; print(torch.__version__)"
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
mkdir -p $OUT
i=0
while read -r line; do
  [ -z "$line" ] && continue
  i=$((i+1))
  timeout $2 python3 notes/exp.py $line --device cuda --log $OUT/runs.jsonl > $OUT/log$i.txt 2>&1 &
done < $1
wait
tail -n 3 $OUT/log*.txt | grep -v '^{' | tail -40
cat $OUT/runs.jsonl | wc -l
