#!/usr/bin/env bash
# Pod preStop hook for Ray pods running stagetrain (deploy/kuberay/*.yaml):
#
#   lifecycle: {preStop: {exec: {command: [/app/deploy/prestop.sh, "75"]}}}
#
# Kubernetes runs it before it sends SIGTERM to the container, within the pod's
# terminationGracePeriodSeconds. Without it a spot reclaim or a node drain loses every step since the
# last checkpoint: the container's main process is bash running `ray start --block`, which does not pass
# SIGTERM on, and the raylet's own shutdown does not wait for running tasks.
#
# What it does: SIGTERM to the training workers (Ray Train's RayTrainWorker actors) and to a stagetrain
# driver on this pod, if any. A driver answers by asking all workers to stop; a worker finishes its
# current step, commits a checkpoint, and exits within the job's preemption.grace_seconds. The driver
# then exits 75 (preempted), and `stagetrain resume` continues from that checkpoint. The hook waits up
# to $1 seconds (default 75) for those processes to be gone; choose preemption.grace_seconds < $1 <
# terminationGracePeriodSeconds, so that Kubernetes does not kill the pod while they are still saving.
set -u
wait_s=${1:-75}
# Process titles: Ray names an actor's process ray::<class>; the driver runs as python .../bin/stagetrain.
workers='^ray::RayTrainWorker'
driver='/stagetrain (run|resume) '

pkill -TERM -f "$workers"
pkill -TERM -f "$driver"
for ((i = 0; i < wait_s; i++)); do
  pgrep -f "$workers" >/dev/null || pgrep -f "$driver" >/dev/null || exit 0
  sleep 1
done
echo "prestop: training processes still running after ${wait_s}s" >&2
