#!/usr/bin/env bash
# fhir_sync's in-database tests on other PostgreSQL majors, each in a Debian chroot with that
# version's packages (never installed into the host):
#
#   bash tests/versions.sh            # 17 (trixie) and 18 (sid)
#   bash tests/versions.sh 17         # one of them
#
# Chroots are made once with debootstrap (--variant=minbase) under $FHIR_SYNC_CHROOTS
# (default /var/cache/fhir_sync-chroots) and reused; this machine's Rust toolchain and cargo
# registry are bind-mounted in, the source tree at /src, and each chroot builds into its own
# /build. Run as root after tests/setup.sh (it needs cargo-pgrx on the host: the binary runs in
# trixie and sid, whose glibc is newer than bookworm's).
#
# Not yet part of tests/run.sh: PostgreSQL 13 (bullseye) does not build (issue 15), and the
# end-to-end core on each version is still to come.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOTS=${FHIR_SYNC_CHROOTS:-/var/cache/fhir_sync-chroots}
MAJORS=("$@")
[ ${#MAJORS[@]} -gt 0 ] || MAJORS=(17 18)

suite_of() {
    case $1 in
        13) echo bullseye ;;
        17) echo trixie ;;
        18) echo sid ;;
        *) echo "PostgreSQL $1 has no Debian suite on this mirror (13, 17 and 18 do)" >&2; exit 2 ;;
    esac
}

# sid's index on the mirror carries an expired date.
APT=(apt-get -o Acquire::Check-Valid-Until=false -y -q --no-install-recommends)

make_root() {  # make_root MAJOR DIR
    local major=$1 root=$2
    [ -x "$root/usr/lib/postgresql/$major/bin/pg_config" ] && return
    command -v debootstrap >/dev/null || apt-get install -y -q debootstrap >/dev/null
    echo "[versions] debootstrap $(suite_of "$major") into $root"
    debootstrap --variant=minbase "$(suite_of "$major")" "$root" http://deb.debian.org/debian >/dev/null
    cp /etc/resolv.conf "$root/etc/"
    chroot "$root" apt-get -o Acquire::Check-Valid-Until=false update -q >/dev/null
    chroot "$root" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install \
        "postgresql-$major" "postgresql-server-dev-$major" libclang-dev clang gcc libc6-dev \
        pkg-config ca-certificates make sudo >/dev/null
}

mounts=()
bind() {  # bind HOST_PATH CHROOT_PATH
    mkdir -p "$2"
    mountpoint -q "$2" || { mount --bind "$1" "$2"; mounts+=("$2"); }
}
cleanup() {
    local i
    for ((i = ${#mounts[@]} - 1; i >= 0; i--)); do umount "${mounts[i]}" || true; done
}
trap cleanup EXIT

for major in "${MAJORS[@]}"; do
    root=$ROOTS/$(suite_of "$major")
    make_root "$major" "$root"
    mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; mounts+=("$root/proc"); }
    bind /dev "$root/dev"
    bind "$HOME/.rustup" "$root/root/.rustup"
    bind "$HOME/.cargo" "$root/root/.cargo"
    bind "$PWD" "$root/src"
    echo "[versions] PostgreSQL $major: cargo pgrx test pg$major"
    chroot "$root" env PATH="/root/.cargo/bin:/usr/bin:/bin" HOME=/root USER=root \
        CARGO_TARGET_DIR=/build/target PGRX_HOME=/build/pgrx RUST_TEST_THREADS=1 bash -euc "
            mkdir -p /build/pgrx /build/pgdata && chown postgres /build/pgdata
            cd /src
            [ -f /build/pgrx/config.toml ] || cargo pgrx init --pg$major /usr/lib/postgresql/$major/bin/pg_config >/dev/null
            cargo pgrx test pg$major --no-default-features --runas postgres --pgdata /build/pgdata"
done
