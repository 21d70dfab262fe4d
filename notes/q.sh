#!/bin/bash
# queue: run experiment command lines from notes/queue.txt one at a time (one heavy process at a time)
cd "$(dirname "$0")/.."
while true; do
  line=$(head -n1 notes/queue.txt 2>/dev/null)
  if [ -z "$line" ]; then sleep 5; continue; fi
  sed -i '1d' notes/queue.txt
  echo "=== $(date +%T) $line" >> notes/queue.log
  PYTHONPATH=$PWD/src timeout 900 .venv/bin/python notes/exp.py $line >> notes/queue.log 2>&1
done
