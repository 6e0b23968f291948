#!/bin/bash
# A stand-in for `apptainer exec` on machines where Apptainer cannot run (CI here), for the container tests of the
# SLURM launcher: runs COMMAND inside the root file system ROOTFS (e.g. `buildah mount` of the image that
# `make image-test` builds) with chroot, in a private mount namespace, with each --bind mounted at its path.
# Root only. Like Apptainer it keeps the caller's environment; unlike it, it has no --nv.
#
#   chroot_runtime.sh exec [--nv] [--bind SRC[:DST]]... ROOTFS COMMAND [ARG...]
set -euo pipefail
[[ ${1:-} == exec ]] || { echo "chroot_runtime.sh: only 'exec' is supported" >&2; exit 2; }
shift
binds=()
while [[ ${1:-} == --* ]]; do
  case $1 in
    --nv) shift ;;
    --bind) binds+=("$2"); shift 2 ;;
    *) echo "chroot_runtime.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
root=$1
shift
# exec: the command's signals and exit status are the caller's, as with apptainer
exec unshare --mount --propagation private bash -c '
  set -e
  root=$1 n=$2; shift 2
  for ((i = 0; i < n; i++)); do
    b=$1; shift
    src=${b%%:*}; dst=${b#*:}
    if [[ -d $src ]]; then mkdir -p "$root$dst"; else mkdir -p "$(dirname "$root$dst")"; touch "$root$dst"; fi
    mount --bind "$src" "$root$dst"
  done
  mount --bind /dev "$root/dev"
  mount -t proc proc "$root/proc"
  exec chroot "$root" "$@"' _ "$root" "${#binds[@]}" "${binds[@]}" "$@"
