# ----- run the step; pass Slurm's signals on; requeue after a clean stop or a crash -----
restarts=${SLURM_RESTART_COUNT:-0}
task=${SLURM_ARRAY_TASK_ID:+ task $SLURM_ARRAY_TASK_ID}
echo "[hpcdiff] job ${SLURM_JOB_ID}${task} starts on $(hostname) (restart $restarts, at most $MAX_RESTARTS)"
record start

# Bash runs a trap only between two commands, never while a foreground command runs. So the step runs in the
# background and this shell waits for it: a signal for this shell (the time-limit warning of --signal=B:USR1,
# preemption, `scancel --signal=USR1 --batch JOB`) is then handled at once and passed on to srun, which relays it
# to every task. The program checkpoints at its next step boundary and exits 75 ("stopped cleanly, requeue me").
forward() {
  signalled=1
  echo "[hpcdiff] got SIG$1: passing it on to the step"
  kill -s "$1" "$step_pid" 2>/dev/null
}
trap 'forward USR1' USR1
trap 'forward USR2' USR2
trap 'forward TERM' TERM

"${LAUNCH[@]}" "${STEP[@]}" &
step_pid=$!
rc=
while true; do
  signalled=0
  wait "$step_pid"
  status=$?
  # 127: the previous wait already collected the exit status (a signal came just after it): keep that one.
  if [ "$status" = 127 ] && [ -n "$rc" ]; then break; fi
  rc=$status
  # A wait cut short by a signal returns 128+n while the step still runs: wait again for its real status.
  [ "$signalled" = 1 ] || break
done

case "$rc" in
  0)
    echo "[hpcdiff] step finished"
    record exit 0
    exit 0
    ;;
  2 | 3 | 4 | 5 | 74)
    # hpcdiff.errors.NO_RETRY_EXITS (docs/guarantees.md): usage, bad data, a diverged loss, an unloadable
    # checkpoint, a full disk. A rerun fails the same way; 75 and crashes are retried below.
    echo "[hpcdiff] step refused its configuration or data, diverged, found no loadable checkpoint or ran out of disk space (exit $rc): not retrying; see the messages above"
    record exit "$rc"
    exit "$rc"
    ;;
esac
if [ "$restarts" -ge "$MAX_RESTARTS" ]; then
  echo "[hpcdiff] step exited $rc after $restarts restarts: giving up (MAX_RESTARTS=$MAX_RESTARTS)"
  record exit "$rc"
  exit "$rc"
fi
# Slurm does not requeue a job that exits non-zero by itself (unless the site sets RequeueExit=75), so ask.
# The job keeps its id and reruns this script with SLURM_RESTART_COUNT+1; the program resumes where it stopped.
echo "[hpcdiff] step exited $rc: requeueing (restart $((restarts + 1)) of at most $MAX_RESTARTS)"
record requeue "$rc"
if ! scontrol requeue "$SLURM_JOB_ID"; then
  echo "[hpcdiff] 'scontrol requeue $SLURM_JOB_ID' failed: resubmit this script by hand to resume" >&2
  record exit "$rc"
fi
exit "$rc"
