#!/usr/bin/env bash
# A minimal Debian root (`debootstrap --variant=minbase`, bookworm) in which the distribution
# test unpacks `make dist` and serves a model with chroot: a library the tarball misses cannot
# hide there. Cached in $CRESSET_CACHE (made once, about 200 MB); prints its path. Needs root
# (debootstrap and chroot), as the test does; debootstrap comes from Debian's packages, and the
# mirror is the one this machine's apt uses.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/env.sh"
dir="$CRESSET_CACHE/debian-bookworm-minbase"
if [ -f "$dir/.cresset-complete" ]; then
  echo "$dir"
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "setup-debian-root: debootstrap and the distribution test need root" >&2
  exit 1
fi
if ! command -v debootstrap >/dev/null; then
  echo "setup-debian-root: installing debootstrap from Debian's packages" >&2
  apt-get install -y -q debootstrap >&2 || { apt-get update -q >&2 && apt-get install -y -q debootstrap >&2; }
fi
# The Debian mirror apt is configured with (deb822 sources first, then sources.list).
mirror="$(sed -n 's/^URIs: *\([^ ]*\/debian\)\/\{0,1\} *$/\1/p' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -1)"
if [ -z "$mirror" ]; then
  mirror="$(sed -n 's/^deb \(\[[^]]*\] \)\{0,1\}\([^ ]*\/debian\)\/\{0,1\} .*/\2/p' /etc/apt/sources.list 2>/dev/null | head -1)"
fi
[ -n "$mirror" ] || { echo "setup-debian-root: no Debian mirror in apt's sources" >&2; exit 1; }
echo "setup-debian-root: debootstrap bookworm (minbase) into $dir" >&2
rm -rf "$dir.tmp"
debootstrap --variant=minbase bookworm "$dir.tmp" "$mirror" >&2
rm -rf "$dir"
mv "$dir.tmp" "$dir"
touch "$dir/.cresset-complete"
echo "$dir"
