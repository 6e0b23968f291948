#!/usr/bin/env bash
# make image-test: build containers/Dockerfile, unchanged but for its base image, and smoke-run the result.
#
# For machines without a Docker engine or registry access (CI here): a minimal Debian 12 root file system made
# with debootstrap (cached as a tarball) becomes the base image; buildah builds the Dockerfile with chroot
# isolation and runs the smoke job inside the image as its non-root user: `ddpm train` a few steps on the
# embedded digits into a mounted directory, then `ddpm sample` from the pipeline it wrote. Root only.
#
#   DDPM_IMAGE_TEST_CACHE   cache directory (default /var/cache/ddpm-image-test): the base root file system
#   DDPM_BUILD_CA           CA bundle handed to the build as a secret (default: the system bundle), for proxies
#                           that inspect TLS; it is never written into a layer
set -euo pipefail
cd "$(dirname "$0")/.."

CACHE=${DDPM_IMAGE_TEST_CACHE:-/var/cache/ddpm-image-test}
BASE=localhost/ddpm-test-base:bookworm
IMAGE=localhost/ddpm:image-test
ROOTFS=$CACHE/debian-bookworm-minbase.tar
CA=${DDPM_BUILD_CA-/etc/ssl/certs/ca-certificates.crt}

log() { echo "image-test: $*"; }
die() { echo "image-test: $*" >&2; exit 1; }

[[ $(id -u) == 0 ]] || die "needs root (debootstrap, buildah storage)"
missing=()
for cmd in buildah:buildah debootstrap:debootstrap; do command -v "${cmd%%:*}" >/dev/null || missing+=("${cmd##*:}"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get -o DPkg::Lock::Timeout=300 update -qq
  apt-get -o DPkg::Lock::Timeout=300 install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
mkdir -p "$CACHE"
start=$SECONDS

# 1. The base image: Debian 12 minbase with python3, made once and cached as a tarball.
if ! buildah inspect --type image "$BASE" >/dev/null 2>&1; then
  if [[ ! -s $ROOTFS ]]; then
    log "debootstrap bookworm (minbase, python3) -> $ROOTFS"
    tmp=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$tmp/root" http://deb.debian.org/debian >"$tmp/log" 2>&1 \
      || { tail -20 "$tmp/log" >&2; rm -rf "$tmp"; die "debootstrap failed"; }
    tar -C "$tmp/root" -cf "$ROOTFS.part" . && mv "$ROOTFS.part" "$ROOTFS"
    rm -rf "$tmp"
  fi
  log "importing the base image $BASE"
  ctr=$(buildah from scratch)
  buildah add --quiet "$ctr" "$ROOTFS" / >/dev/null
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --cmd /bin/bash "$ctr"
  buildah commit --quiet --rm "$ctr" "$BASE" >/dev/null
fi

# 2. The Dockerfile, as users build it, on that base. The FID weights need GitHub, unreachable here.
git_sha=$(git rev-parse HEAD 2>/dev/null || echo unknown)
lock_sha=$(sha256sum uv.lock | cut -d' ' -f1)
secret=()
[[ -n $CA && -s $CA ]] && secret=(--secret "id=ca,src=$CA")
log "building containers/Dockerfile (base $BASE)"
buildah bud --isolation chroot --layers --quiet -f containers/Dockerfile -t "$IMAGE" \
  --build-arg "BASE_IMAGE=$BASE" --build-arg INCEPTION_WEIGHTS=none \
  --build-arg "GIT_SHA=$git_sha" --build-arg "LOCK_SHA256=$lock_sha" "${secret[@]}" \
  --label "org.opencontainers.image.revision=$git_sha" . >/dev/null  # as make image: see BUILD_ARGS in the Makefile
log "built in $((SECONDS - start)) s"

# 3. What the image promises: a non-root user, the labels, the entrypoint.
config=$(buildah inspect --type image "$IMAGE" | python3 -c 'import json, sys; c = json.load(sys.stdin)["OCIv1"]["config"]
print(c.get("User", "")); print(json.dumps(c.get("Entrypoint"))); print(c["Labels"].get("org.opencontainers.image.revision"))
print(c["Labels"].get("ddpm.uv-lock.sha256")); print(c["Labels"].get("ddpm.cuda"))')
{ read -r user; read -r entry; read -r label_sha; read -r label_lock; read -r label_cuda; } <<<"$config"
[[ $user == ddpm ]] || die "the image's user is '$user', not ddpm"
[[ $entry == '["ddpm-entrypoint"]' ]] || die "entrypoint is $entry"
[[ $label_sha == "$git_sha" && $label_lock == "$lock_sha" ]] || die "labels: revision $label_sha, lock $label_lock"
[[ $label_cuda == 12 ]] || die "label ddpm.cuda is '$label_cuda': the default build argument CUDA is 12"

# 3b. A code change (and a new commit) must not reinstall the dependencies: rebuild from a copy of the context
# with one edited source file and a new GIT_SHA; the dependency layer has to come from the cache.
probe=$(mktemp -d /tmp/ddpm-image-probe.XXXXXX)
cp -a pyproject.toml uv.lock README.md .dockerignore ddpm jobs slurm configs containers "$probe/"
echo "# layer-cache probe" >>"$probe/ddpm/__init__.py"
probe_log=$(buildah bud --isolation chroot --layers --quiet -f containers/Dockerfile -t localhost/ddpm:layer-probe \
  --build-arg "BASE_IMAGE=$BASE" --build-arg INCEPTION_WEIGHTS=none --build-arg GIT_SHA=probe \
  --build-arg "LOCK_SHA256=$lock_sha" "${secret[@]}" "$probe" 2>&1 >/dev/null)
rm -rf "$probe"
buildah rmi localhost/ddpm:layer-probe >/dev/null 2>&1 || true
if grep -qE "Installed [0-9]{2,} packages" <<<"$probe_log"; then
  die "a code change reinstalled the dependencies (the dependency layer was not reused)"
fi
log "a code change rebuilds only the project layers"

# 4. The smoke job, as the image's user, with runs and the cache mounted from here.
work=$(mktemp -d /tmp/ddpm-image-test.XXXXXX)
ctr=$(buildah from --quiet "$IMAGE")
cleanup() { buildah rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/runs" "$work/cache"
chmod 0777 "$work/runs" "$work/cache"
run() { buildah run --isolation chroot -v "$work/runs:/workspace/runs" -v "$work/cache:/cache" "$ctr" -- "$@"; }
uid=$(run id -u)
[[ $uid != 0 ]] || die "the smoke job runs as root"
[[ ! -e $CA ]] || run sh -c '! test -e /run/secrets/ca' || die "the build's CA secret is in the image"
run ddpm-entrypoint --help >/dev/null
run sh -c 'installed=$(python -c "import ddpm, os; print(os.path.dirname(ddpm.__file__))");
  diff -r -x __pycache__ /opt/ddpm/ddpm "$installed" >/dev/null' \
  || die "the installed ddpm package is not the code copied into the image (a stale cached build)"
run python -c 'import torch; assert torch.version.cuda.startswith("12."), torch.version.cuda' \
  || die "the default image's torch is not the CUDA 12 build"
tiny=(name=smoke data.resolution=8 "model.block_out_channels=[16,32]" "model.down_block_types=[DownBlock2D,AttnDownBlock2D]"
      "model.up_block_types=[AttnUpBlock2D,UpBlock2D]" model.layers_per_block=1 model.norm_num_groups=8
      model.attention_head_dim=8 train.batch_size=16 train.max_steps=4 train.checkpoint_every=2 train.sample_images=4
      train.sample_steps=2 train.mixed_precision=fp32 optim.warmup_steps=1 tracking.wandb=false
      train.eval_images=16 train.eval_reference_images=64)
log "smoke: ddpm train (4 steps) as uid $uid"
run env HF_HUB_OFFLINE=1 ddpm-entrypoint ddpm train "${tiny[@]}"
[[ -s $work/runs/smoke/pipeline/model_index.json && -s $work/runs/smoke/pipeline/unet/diffusion_pytorch_model.safetensors ]] \
  || die "training wrote no pipeline into the mounted runs directory"
[[ $(stat -c %u "$work/runs/smoke/pipeline/model_index.json") == "$uid" ]] || die "the pipeline is not owned by the image's user"
# In-training evaluation at the last step: this test image has no Inception weights (INCEPTION_WEIGHTS=none), so
# "auto" scores with the offline metric.
grep -q '"metric": "digitsnet"' "$work/runs/smoke/scores.jsonl" || die "training in the image wrote no score"
log "smoke: ddpm sample from it"
run env HF_HUB_OFFLINE=1 ddpm sample --pipeline runs/smoke/pipeline --steps 2 --num-images 4 --out runs/smoke/samples-image-test
[[ $(ls "$work/runs/smoke/samples-image-test/images" | wc -l) == 4 && -s $work/runs/smoke/samples-image-test/grid.png ]] \
  || die "sampling wrote no images"
log "ok: built and smoke-run $IMAGE as $user (uid $uid) in $((SECONDS - start)) s"
buildah rmi --prune >/dev/null 2>&1 || true  # earlier builds' dangling layers (several GB each)
