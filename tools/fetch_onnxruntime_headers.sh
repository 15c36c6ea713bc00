#!/usr/bin/env bash
# Fetches the ONNX Runtime C/C++ API headers (MIT) that the custom-op library compiles against:
# Debian trixie's libonnxruntime-dev 1.21.0+dfsg-1 (API version 21; a library built against it
# loads into any later onnxruntime, 1.31 included), pinned by sha256.
#
#   tools/fetch_onnxruntime_headers.sh DEST
#
# leaves DEST/include/onnxruntime_c_api.h and friends. apt runs under a private configuration:
# its own sources list (the machine's own Debian mirror, suite trixie), its own lists, cache and
# status under DEST/apt, no lock on the system's files. So the system's apt state is untouched and
# no root is needed. Override the mirror with GLA_DEBIAN_MIRROR=http://... when the machine has none.
# Exit status 0 on success; otherwise one line on stderr says why.
set -euo pipefail

PKG=libonnxruntime-dev
VERSION=1.21.0+dfsg-1
ARCH=amd64  # the headers are the same on every architecture: one .deb, one pin
SHA256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08

die() { echo "fetch_onnxruntime_headers: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DEST"
dest=$1
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not available (a Debian-family system is needed to fetch the headers; or set ONNXRUNTIME_INCLUDE_DIR)"
done

# The machine's own Debian mirror: the first archive URI (not the security one) in its sources.
find_mirror() {
  local files=() f
  for f in /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list /etc/apt/sources.list; do
    [ -f "$f" ] && files+=("$f")
  done
  [ ${#files[@]} -gt 0 ] || return 0
  # deb822 "URIs: a b" lines and one-line "deb [opts] URI suite ..." entries
  awk '
    /^[[:space:]]*URIs:/ { for (i = 2; i <= NF; i++) print $i; next }
    /^[[:space:]]*deb[[:space:]]/ {
      for (i = 2; i <= NF; i++) { if ($i ~ /^\[/) { while ($i !~ /\]$/ && i < NF) i++; continue } print $i; break }
    }' "${files[@]}" |
    grep -E '^(https?|file)://' | grep -E '/debian/?$' | head -n 1
}

mirror=${GLA_DEBIAN_MIRROR:-$(find_mirror)}
mirror=${mirror:-http://deb.debian.org/debian}
mirror=${mirror%/}

apt_dir="$dest/apt"
mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d,etc/apt.conf.d,state}
: > "$apt_dir/state/status"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -r "$keyring" ]; then
  opts="signed-by=$keyring"
else
  # no Debian keyring here: the index cannot be verified, the .deb itself still is (sha256 below)
  opts="trusted=yes"
fi
echo "deb [$opts] $mirror trixie main" > "$apt_dir/etc/sources.list"

apt_opts=(
  -o "Dir::State=$apt_dir/state"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::status=$apt_dir/state/status"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::Etc::sourcelist=$apt_dir/etc/sources.list"
  -o "Dir::Etc::sourceparts=$apt_dir/etc/sources.list.d"
  -o "Dir::Etc::preferences=$apt_dir/etc/preferences"
  -o "Dir::Etc::preferencesparts=$apt_dir/etc/preferences.d"
  -o "Dir::Etc::parts=$apt_dir/etc/apt.conf.d"
  -o "APT::Architecture=$ARCH"
  -o "APT::Architectures=$ARCH"
  -o "APT::Sandbox::User=$(id -un)"
  -o "Debug::NoLocking=1"
  -o "Acquire::Languages=none"
  -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
)

echo "fetch_onnxruntime_headers: $PKG $VERSION from $mirror (trixie)" >&2
log="$apt_dir/apt.log"
apt-get "${apt_opts[@]}" -q update >"$log" 2>&1 || die "apt-get update failed for $mirror trixie (see $log)"
rm -f "$apt_dir"/*.deb
(cd "$apt_dir" && apt-get "${apt_opts[@]}" -q download "$PKG:$ARCH=$VERSION") >>"$log" 2>&1 ||
  die "apt-get download $PKG=$VERSION failed (see $log)"
deb=$(ls "$apt_dir"/*.deb 2>/dev/null | head -n 1)
[ -n "$deb" ] || die "apt-get download left no .deb in $apt_dir"
got=$(sha256sum "$deb" | cut -d' ' -f1)
[ "$got" = "$SHA256" ] || die "sha256 of $(basename "$deb") is $got, expected $SHA256"

rm -rf "$dest/extract" "$dest/include"
dpkg-deb -x "$deb" "$dest/extract" || die "dpkg-deb -x $deb failed"
[ -f "$dest/extract/usr/include/onnxruntime/onnxruntime_c_api.h" ] || die "the package has no onnxruntime_c_api.h"
mv "$dest/extract/usr/include/onnxruntime" "$dest/include"
mkdir -p "$dest/license"
cp "$dest/extract/usr/share/doc/$PKG/copyright" "$dest/license/" 2>/dev/null || true
rm -rf "$dest/extract" "$deb"
# the package lists (tens of MB) served their purpose; keep only the log
rm -rf "$apt_dir/lists" "$apt_dir/cache" "$apt_dir/state"
echo "$PKG $VERSION $SHA256" > "$dest/STAMP"
echo "fetch_onnxruntime_headers: headers in $dest/include" >&2
