# Debian chroots for building and testing fhir_sync on each PostgreSQL major (sourced by
# packaging/deb.sh and tests/versions.sh; run as root).
#
# Two roots per major under $FHIR_SYNC_CHROOTS (default /var/cache/fhir_sync-chroots), made
# once with debootstrap --variant=minbase and reused:
#   <suite>        the build root: postgresql-N, its server headers, clang (what pgrx builds with)
#   <suite>-clean  what a DBA's server has: postgresql-N only, and the fhir_sync package installed
#                  into it by the tests
# PostgreSQL 15 builds on this machine (Debian 12, bookworm) and needs only the clean root.

ROOTS=${FHIR_SYNC_CHROOTS:-/var/cache/fhir_sync-chroots}
# This tree's version (Cargo.toml) and the package file of a version for a major.
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
deb_file() { echo "postgresql-$1-fhir-sync_$2-1_amd64.deb"; }   # deb_file MAJOR VERSION
DEB_DIR=target/debian        # packages of this tree
RELEASES_DIR=$ROOTS/releases # packages of earlier releases (deb.sh --release), built once per machine
# sid's index on the mirror carries an expired date.
APT=(apt-get -o Acquire::Check-Valid-Until=false -y -q --no-install-recommends)
# sudo: cargo pgrx test installs and runs its cluster through it (--runas, --sudo).
BUILD_PACKAGES=(libclang-dev clang gcc libc6-dev libssl-dev pkg-config ca-certificates make sudo)

suite_of() {
    case $1 in
        13) echo bullseye ;;
        15) echo bookworm ;;
        17) echo trixie ;;
        18) echo sid ;;
        *) echo "PostgreSQL $1 has no Debian suite on this mirror (13, 15, 17 and 18 do)" >&2; return 2 ;;
    esac
}

apt_sources() {  # apt_sources SUITE: the sources.list of a root of SUITE
    echo "deb http://deb.debian.org/debian $1 main"
    # PostgreSQL 15 is built on this machine, whose packages come from bookworm's security and
    # point updates too: its clean root takes them, or the package (built against this machine's
    # minor release) could not be installed there. The other majors' build and clean roots share
    # one suite, so their minors agree (and this mirror lacks some of their security updates).
    [ "$1" = bookworm ] || return 0
    echo "deb http://deb.debian.org/debian $1-updates main"
    echo "deb http://deb.debian.org/debian-security $1-security main"
}

# Upgraded once when the sources change (a root made before they did).
refresh_sources() {  # refresh_sources ROOT SUITE
    local root=$1 suite=$2
    cmp -s <(apt_sources "$suite") "$root/etc/apt/sources.list" && return
    apt_sources "$suite" >"$root/etc/apt/sources.list"
    local mounted=
    mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; mounted=1; }
    local rc=0
    chroot "$root" apt-get -o Acquire::Check-Valid-Until=false update -q >/dev/null &&
        chroot "$root" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" upgrade >/dev/null || rc=$?
    chroot "$root" sh -c 'pg_ctlcluster $(ls /usr/lib/postgresql) main stop' >/dev/null 2>&1 || true
    [ -z "$mounted" ] || umount "$root/proc"
    [ $rc -eq 0 ] || { echo "[chroot] apt upgrade in $root failed" >&2; return $rc; }
}

debootstrap_root() {  # debootstrap_root SUITE DIR PACKAGE...
    local suite=$1 root=$2
    shift 2
    command -v debootstrap >/dev/null ||
        { echo "[chroot] debootstrap is missing: bash tests/setup.sh installs it" >&2; return 1; }
    if [ -e "$root" ]; then
        # Never removed here: a root may have this machine's directories bind-mounted into it.
        echo "$root exists but is incomplete: unmount what is mounted below it, remove it, run again" >&2
        return 1
    fi
    echo "[chroot] debootstrap $suite into $root"
    # Only the .partial directory is ever removed, and only its /proc is ever mounted (below): a run
    # killed meanwhile may have left that mounted.
    ! mountpoint -q "$root.partial/proc" || umount "$root.partial/proc"
    rm -rf --one-file-system "$root.partial"
    debootstrap --variant=minbase "$suite" "$root.partial" http://deb.debian.org/debian >/dev/null
    cp /etc/resolv.conf "$root.partial/etc/"
    apt_sources "$suite" >"$root.partial/etc/apt/sources.list"
    # Maintainer scripts need /proc (sid's systemd-tmpfiles refuses to run without it).
    mount -t proc proc "$root.partial/proc"
    local rc=0
    chroot "$root.partial" apt-get -o Acquire::Check-Valid-Until=false update -q >/dev/null &&
        chroot "$root.partial" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install "$@" >/dev/null || rc=$?
    # Package installs start the distribution's default cluster: not used, every test makes its own.
    chroot "$root.partial" pg_ctlcluster "$(ls "$root.partial/usr/lib/postgresql")" main stop >/dev/null 2>&1 || true
    umount "$root.partial/proc"
    [ $rc -eq 0 ] || { echo "[chroot] installing $* into $root.partial failed" >&2; return $rc; }
    mv "$root.partial" "$root"   # complete or absent: an interrupted run starts it again
}

# build_root and clean_root set ROOT (not printed: a failure inside $(...) would not stop the script).
build_root() {  # build_root MAJOR: sets ROOT to the build root, made if missing
    local major=$1 root suite
    suite=$(suite_of "$major")
    root=$ROOTS/$suite
    [ -x "$root/usr/lib/postgresql/$major/bin/pg_config" ] ||
        debootstrap_root "$suite" "$root" "postgresql-$major" "postgresql-server-dev-$major" \
            "${BUILD_PACKAGES[@]}"
    refresh_sources "$root" "$suite"
    # A root made by an earlier version of these scripts may lack a package added since.
    local p missing=()
    for p in "${BUILD_PACKAGES[@]}"; do
        chroot "$root" dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] ||
        chroot "$root" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install "${missing[@]}" >/dev/null
    # The host's CA bundle: crates.io may be reached through a proxy this machine trusts.
    cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/fhir_sync-host-ca.crt"
    ROOT=$root
}

clean_root() {  # clean_root MAJOR: sets ROOT to the clean root, made if missing
    local major=$1 root suite
    suite=$(suite_of "$major")
    root=$ROOTS/$suite-clean
    [ -x "$root/usr/lib/postgresql/$major/bin/postgres" ] ||
        debootstrap_root "$suite" "$root" "postgresql-$major"
    refresh_sources "$root" "$suite"
    ROOT=$root
}

MOUNTS=()
bind() {  # bind HOST_PATH CHROOT_PATH
    mkdir -p "$2"
    mountpoint -q "$2" || { mount --bind "$1" "$2"; MOUNTS+=("$2"); }
}
mount_system() {  # mount_system ROOT: /proc and /dev, as PostgreSQL needs them (shared memory)
    mkdir -p "$1/proc"
    mountpoint -q "$1/proc" || { mount -t proc proc "$1/proc"; MOUNTS+=("$1/proc"); }
    bind /dev "$1/dev"
}
mount_build() {  # mount_build ROOT: the system, this machine's Rust toolchain and the source tree
    mount_system "$1"
    bind "$HOME/.rustup" "$1/root/.rustup"
    bind "$HOME/.cargo" "$1/root/.cargo"
    bind "$PWD" "$1/src"
}
unmount_all() {
    local i failed=0
    for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
        umount "${MOUNTS[i]}" || {
            echo "[chroot] could not unmount ${MOUNTS[i]} (busy?): unmount it before removing anything under $ROOTS" >&2
            failed=1
        }
    done
    MOUNTS=()
    return $failed
}

# One run at a time: two would share, and unmount under each other, the same roots' mounts.
lock_roots() {
    [ -z "${FHIR_SYNC_ROOTS_LOCKED-}" ] || return 0   # a caller holds it (versions.sh → deb.sh)
    mkdir -p "$ROOTS"
    exec 9>"$ROOTS/.lock"
    flock -n 9 || { echo "[chroot] another run is using $ROOTS ($ROOTS/.lock): wait for it" >&2; exit 1; }
    export FHIR_SYNC_ROOTS_LOCKED=1
}

in_build_root() {  # in_build_root ROOT SCRIPT: bash -c SCRIPT inside ROOT, with cargo and cargo-pgrx
    chroot "$1" env PATH="/build/tools/bin:/root/.cargo/bin:/usr/bin:/bin" HOME=/root USER=root \
        CARGO_HTTP_CAINFO=/etc/ssl/certs/fhir_sync-host-ca.crt \
        CARGO_TARGET_DIR=/build/target PGRX_HOME=/build/pgrx RUST_TEST_THREADS=1 bash -euc "$2"
}

ensure_cargo_pgrx() {  # ensure_cargo_pgrx ROOT: the host's cargo-pgrx, or one built for this root
    local root=$1 version
    chroot "$root" env PATH="/build/tools/bin:/root/.cargo/bin:/usr/bin:/bin" cargo-pgrx --version \
        >/dev/null 2>&1 && return
    # The host's binary needs a newer glibc than this root has (bullseye): build one here, once.
    version=$(sed -n 's/^pgrx = "=\(.*\)"/\1/p' Cargo.toml)
    echo "[chroot] building cargo-pgrx $version in $root" >&2
    in_build_root "$root" "CARGO_TARGET_DIR=/build/tools-target cargo install cargo-pgrx \
        --version $version --locked --root /build/tools >/dev/null"
}
