#!/bin/sh
# A per-job program for tests/jobs.rs: `job.sh MODE [ARG]` (the job's
# arguments, appended by the watcher). Appends a `start` and an `end` line
# to $JOBS_TRACE: `start JOB ATTEMPT POOL QUEUE PID UNIX_MS`.
now() { date +%s%3N; }
echo "start $CLUSTER_JOB_ID $CLUSTER_JOB_ATTEMPT $CLUSTER_POOL $CLUSTER_QUEUE $$ $(now)" >> "$JOBS_TRACE"
case "$1" in
  sleep) sleep "$2" ;;
  fail-once)
    if [ "$CLUSTER_JOB_ATTEMPT" = 1 ]; then
      echo "boom on attempt 1" >&2
      exit 1
    fi ;;
  fail)
    echo "always fails (attempt $CLUSTER_JOB_ATTEMPT)" >&2
    exit 3 ;;
  slow-first)
    if [ "$CLUSTER_JOB_ATTEMPT" = 1 ]; then sleep 30; fi ;;
  stdin)
    cat > /dev/null ;;
  done-row)
    # A row of a job source: taking it removes it from the pending list.
    rm -f "$2"
    sleep 0.2 ;;
esac
echo "end $CLUSTER_JOB_ID $CLUSTER_JOB_ATTEMPT $CLUSTER_POOL $CLUSTER_QUEUE $$ $(now)" >> "$JOBS_TRACE"
echo "{\"mode\": \"$1\", \"attempt\": $CLUSTER_JOB_ATTEMPT}"
