#!/usr/bin/env bash
# Fetches the ONNX Runtime C/C++ API headers (MIT) that the custom-op library compiles against:
# Debian trixie's libonnxruntime-dev 1.21.0+dfsg-1 (API version 21; a library built against it
# loads into any later onnxruntime, 1.31 included), pinned by sha256.
#
#   tools/fetch_onnxruntime_headers.sh DEST
#
# leaves DEST/include/onnxruntime_c_api.h and friends. Only what apt is configured with is used:
# the Debian archive mirrors among apt's own sources (as apt itself lists them, `apt-get
# indextargets`), with the suite swapped for trixie; apt's configuration (proxies, credentials)
# applies as it does to any apt-get. No host name is written here. apt runs with a private sources
# list, lists, cache and status under DEST/apt and no lock on the system's files, so the system's
# apt state is untouched and no root is needed. Exit status 0 on success; otherwise one line on
# stderr says why (and, when apt has no Debian source, to set ONNXRUNTIME_INCLUDE_DIR instead).
set -euo pipefail

PKG=libonnxruntime-dev
VERSION=1.21.0+dfsg-1
SUITE=trixie
ARCH=amd64  # the headers are the same on every architecture: one .deb, one pin
SHA256=14f7d959d5deacbcf1504830d4189f91fc67382b399ed9ae9d3aa9c4050ced08
INSTEAD="set ONNXRUNTIME_INCLUDE_DIR to a folder with onnxruntime_c_api.h instead"

die() { echo "fetch_onnxruntime_headers: $*" >&2; exit 1; }

[ $# -eq 1 ] || die "usage: $0 DEST"
dest=$1
mkdir -p "$dest"
dest=$(cd "$dest" && pwd)

for tool in apt-get dpkg-deb sha256sum; do
  command -v "$tool" >/dev/null 2>&1 || die "$tool is not available (the headers come from apt's Debian sources): $INSTEAD"
done

# The archive URIs among apt's configured sources, Debian's first. apt parses its sources itself
# (one-line and deb822, options, sources.list.d, APT_CONFIG); ORIGIN is known only for sources
# whose lists were fetched. Security repositories carry no plain suite: skipped. Repositories of
# another origin (Ubuntu, vendors) are skipped; an unknown origin is tried after Debian's.
candidates() {
  local origins
  origins=$(apt-get indextargets --format '$(TARGET_OF) $(REPO_URI) $(ORIGIN) $(LABEL)' 2>/dev/null || true)
  apt-get indextargets --no-release-info --format '$(TARGET_OF) $(REPO_URI) $(RELEASE)' 2>/dev/null |
    awk -v origins="$origins" '
      BEGIN {
        n = split(origins, lines, "\n")
        for (i = 1; i <= n; i++) { split(lines[i], f, " "); if (f[1] == "deb" && f[2] != "") { origin[f[2]] = f[3]; label[f[2]] = f[4] } }
      }
      $1 == "deb" && $2 ~ /^(https?|file|ftp|mirror[+a-z]*):\/\// && $3 !~ /\// && $3 !~ /-security$/ && !seen[$2]++ {
        o = ($2 in origin) ? origin[$2] : ""
        if (o == "Debian" && label[$2] == "Debian") debian[++nd] = $2
        else if (o == "" || o == "$(ORIGIN)") other[++no] = $2
      }
      END { for (i = 1; i <= nd; i++) print debian[i]; for (i = 1; i <= no; i++) print other[i] }'
}

mapfile -t mirrors < <(candidates)
[ ${#mirrors[@]} -gt 0 ] || die "apt has no Debian archive among its sources to fetch $PKG $VERSION from: $INSTEAD"

apt_dir="$dest/apt"
keyring=/usr/share/keyrings/debian-archive-keyring.gpg
if [ -r "$keyring" ]; then
  opts="signed-by=$keyring"
else
  # no Debian keyring here: the index cannot be verified, the .deb itself still is (sha256 below)
  opts="trusted=yes"
fi

apt_opts=(
  -o "Dir::State=$apt_dir/state"
  -o "Dir::State::Lists=$apt_dir/lists"
  -o "Dir::State::status=$apt_dir/state/status"
  -o "Dir::Cache=$apt_dir/cache"
  -o "Dir::Etc::sourcelist=$apt_dir/etc/sources.list"
  -o "Dir::Etc::sourceparts=$apt_dir/etc/sources.list.d"
  -o "Dir::Etc::preferences=$apt_dir/etc/preferences"
  -o "Dir::Etc::preferencesparts=$apt_dir/etc/preferences.d"
  -o "APT::Architecture=$ARCH"
  -o "APT::Architectures=$ARCH"
  -o "APT::Sandbox::User=$(id -un)"
  -o "Debug::NoLocking=1"
  -o "Acquire::Languages=none"
  -o "Acquire::IndexTargets::deb::Contents-deb::DefaultEnabled=false"
)

log="$apt_dir/apt.log"
deb=""
tried=()
for mirror in "${mirrors[@]}"; do
  mirror=${mirror%/}
  rm -rf "$apt_dir"
  mkdir -p "$apt_dir"/{lists/partial,cache/archives/partial,etc/sources.list.d,etc/preferences.d,state}
  : > "$apt_dir/state/status"
  echo "deb [$opts] $mirror $SUITE main" > "$apt_dir/etc/sources.list"
  echo "fetch_onnxruntime_headers: $PKG $VERSION from $mirror ($SUITE)" >&2
  tried+=("$mirror")
  if apt-get "${apt_opts[@]}" -q update >"$log" 2>&1 &&
     (cd "$apt_dir" && apt-get "${apt_opts[@]}" -q download "$PKG:$ARCH=$VERSION") >>"$log" 2>&1; then
    deb=$(ls "$apt_dir"/*.deb 2>/dev/null | head -n 1)
    [ -n "$deb" ] && break
  fi
done
[ -n "$deb" ] || die "apt could not download $PKG $VERSION ($SUITE) from ${tried[*]} (see $log): $INSTEAD"
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
