#!/bin/bash
# 30 runs in a row of the FSDP2 resume test ([drop-False]: sharded and full checkpoints), in the background
cd /work/main
LOG=/tmp/flake/fsdp2_resume_30_runs.log
{
echo "# tests/test_fsdp2.py::test_resume_matches_uninterrupted_run [drop-False] (sharded and full checkpoints), 30 runs in a row"
echo "# commit $(git rev-parse --short HEAD), $(nproc) cores; each run: .venv/bin/python -m pytest tests/test_fsdp2.py -q -k \"resume and drop\""
echo "# run in the background beside the other jobs of this shared 2-core machine (benchmarks, other test runs,"
echo "# a soak run): the load average of each run is below (1/5/15 min); above 2 means both cores are busy"
} > $LOG
fails=0
for i in $(seq 1 30); do
  start=$(date +%s)
  out=$(.venv/bin/python -m pytest tests/test_fsdp2.py -q -k "resume and drop" -p no:cacheprovider 2>&1 | tail -1)
  rc=${PIPESTATUS[0]}
  echo "run $i $(date -u +%H:%M:%S) $(( $(date +%s) - start ))s load [$(cut -d' ' -f1-3 /proc/loadavg)] :: $out" >> $LOG
  case "$out" in *"1 passed"*) ;; *) fails=$((fails+1));; esac
done
echo "# $((30 - fails)) of 30 runs passed" >> $LOG
