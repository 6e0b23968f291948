#!/bin/sh
# The host side of a containerised SLURM task: `container_task.sh <runtime> exec ... <image> python <args>`.
#
# Images carry no SLURM client, so rank 0 inside cannot run `scontrol requeue` when the time limit nears. It
# writes its checkpoint and exits with status 75 instead, and this wrapper, outside the container where the
# site's SLURM client, config and munge socket are, requeues the job. (Binding the client into the image
# instead would tie the image to the site's SLURM version, plugins and munge.)
# SLURM's warning signal reaches this wrapper as the task's process: it is forwarded to the container.
REQUEUE_STATUS=75
export DDPM_REQUEUE_BY_HOST=$REQUEUE_STATUS

"$@" &
child=$!
for sig in USR1 USR2 TERM; do
    trap "kill -s $sig $child 2>/dev/null" "$sig"
done
while :; do
    wait "$child"
    status=$?
    kill -0 "$child" 2>/dev/null || break # wait returned for a forwarded signal: the task still runs
done

if [ "$status" -eq "$REQUEUE_STATUS" ] && [ "${SLURM_PROCID:-0}" = 0 ]; then
    if scontrol requeue "$SLURM_JOB_ID"; then
        echo "requeue of job $SLURM_JOB_ID (attempt $((${SLURM_RESTART_COUNT:-0} + 1))): accepted (from the host side)"
        sleep 900 # SLURM ends this attempt (SIGTERM, then SIGKILL) and starts the next
    else
        echo "scontrol requeue $SLURM_JOB_ID failed: submit again to resume from the checkpoint" >&2
    fi
fi
exit "$status"
