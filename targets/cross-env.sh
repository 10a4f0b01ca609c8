# Sourced by build-aarch64.sh, build-armv7.sh and test-aarch64.sh: `cross_setup aarch64|armv7`
# installs (once) Debian's rustc-web with the target's standard library, a cross gcc and
# qemu-user, then exports what cargo needs to cross-build and what qemu needs to run the result:
#   TRIPLE  the Rust target            QEMU  "qemu-aarch64 -cpu max" (static binaries) or
#                                      "qemu-arm -cpu max -L /usr/arm-linux-gnueabihf" (dynamic)
# The rustup toolchain stays the default for host builds; cross builds use RUSTC=/usr/bin/rustc
# (rustc-web 1.96; tract 0.23.9 needs >= 1.91 and edition 2024). No rustup target is downloaded.

cross_setup() {
  local arch=$1 debarch gnu qemu
  case "$arch" in
    aarch64) debarch=arm64 TRIPLE=aarch64-unknown-linux-gnu gnu=aarch64-linux-gnu qemu=qemu-aarch64 ;;
    armv7) debarch=armhf TRIPLE=armv7-unknown-linux-gnueabihf gnu=arm-linux-gnueabihf qemu=qemu-arm ;;
    *) echo "error: cross_setup: unknown arch '$arch' (aarch64 or armv7)" >&2; return 1 ;;
  esac
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo=sudo
  installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
  local missing=()
  installed rustc-web || missing+=(rustc-web)
  [ -d "/usr/lib/rustlib/$TRIPLE/lib" ] || missing+=("libstd-rust-web-dev:$debarch")
  for p in "gcc-$gnu" "libc6-dev-$debarch-cross" qemu-user; do
    installed "$p" || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== installing ${missing[*]}"
    dpkg --print-foreign-architectures | grep -qx "$debarch" || $sudo dpkg --add-architecture "$debarch"
    # An index that fails to download (a mirror mid-sync) is reported, not fatal: the install
    # below says precisely what is missing.
    $sudo apt-get update -q >/dev/null || echo "warning: apt-get update reported errors" >&2
    local want=() v
    if installed rustc-web; then
      v=$(dpkg-query -W -f='${Version}' rustc-web)
    else
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q rustc-web >/dev/null || return 1
      v=$(dpkg-query -W -f='${Version}' rustc-web)
    fi
    for p in "${missing[@]}"; do
      case "$p" in
        rustc-web) ;;
        # The target's std must be exactly rustc-web's version (Multi-Arch: same).
        libstd-rust-web-dev:*) want+=("$p=$v") ;;
        *) want+=("$p") ;;
      esac
    done
    if ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${want[@]}" >/dev/null; then
      # The mirror's bookworm-security armhf index has failed its size check here: install the
      # rest, and take the target's std (rlibs only; nothing to run) from the pool directly.
      local rest=() std=""
      for p in "${want[@]}"; do
        case "$p" in libstd-rust-web-dev:*) std=$p ;; *) rest+=("$p") ;; esac
      done
      if [ ${#rest[@]} -gt 0 ] && ! $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${rest[@]}" >/dev/null; then
        echo "error: could not install ${rest[*]} from apt" >&2
        return 1
      fi
      if [ -n "$std" ]; then
        local deb="libstd-rust-web-dev_${v#*:}_$debarch.deb" tmp
        tmp=$(mktemp -d)
        echo "== apt could not install $std; fetching $deb from the bookworm-security pool"
        if ! curl -sSfL -o "$tmp/$deb" "http://deb.debian.org/debian-security/pool/updates/main/r/rustc-web/$deb"; then
          echo "error: could not install $std (rustc-web $v needs the target's std of the same version, published in bookworm-security)" >&2
          rm -rf "$tmp"
          return 1
        fi
        dpkg -x "$tmp/$deb" "$tmp/x"
        $sudo cp -r "$tmp/x/usr/lib/rustlib/$TRIPLE" /usr/lib/rustlib/
        rm -rf "$tmp"
      fi
    fi
  fi
  if [ ! -d "/usr/lib/rustlib/$TRIPLE/lib" ]; then
    echo "error: /usr/lib/rustlib/$TRIPLE is missing: libstd-rust-web-dev:$debarch is not installed" >&2
    return 1
  fi
  local up=${TRIPLE^^}
  up=${up//-/_}
  export RUSTC=/usr/bin/rustc RUSTDOC=/usr/bin/rustdoc
  export "CARGO_TARGET_${up}_LINKER=$gnu-gcc"
  # aarch64: static glibc binaries. They run on any board's distribution (no glibc version match
  # needed), and under qemu-user dynamically linked programs hang at their first pthread_create
  # on this kind of machine (seen with qemu 7.2 and 10.0: a C program too), while static ones
  # run, threads and all (the test binaries start one per test). armv7: dynamic, since the
  # static build of the CLI segfaults at its first instruction under qemu-arm (a static Rust
  # hello-world runs; not investigated further); the single-threaded smoke run works dynamic.
  local gnu_root=""
  if [ "$arch" = aarch64 ]; then
    export "CARGO_TARGET_${up}_RUSTFLAGS=-C target-feature=+crt-static"
  else
    gnu_root=" -L /usr/$gnu"
  fi
  export "CC_${TRIPLE//-/_}=$gnu-gcc" "AR_${TRIPLE//-/_}=$gnu-ar"
  QEMU="$qemu -cpu max$gnu_root"
  export "CARGO_TARGET_${up}_RUNNER=$QEMU"
  export TRIPLE QEMU
}
