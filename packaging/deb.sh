#!/usr/bin/env bash
# Debian packages of fhir_sync, one per PostgreSQL major, each built on that major's Debian
# release (packaging/chroot.sh; PostgreSQL 15 on this machine, Debian 12):
#
#   bash packaging/deb.sh            # 13 (bullseye), 15 (bookworm), 17 (trixie), 18 (sid)
#   bash packaging/deb.sh 17         # one of them
#   bash packaging/deb.sh --release 0.3.0 17   # an earlier release, from git history (packaging/releases)
#
# Writes target/debian/postgresql-N-fhir-sync_<version>-1_amd64.deb from `cargo pgrx package`
# (a release build). Install on a server that runs that PostgreSQL (see README, "Install"):
#   apt install ./postgresql-17-fhir-sync_<version>-1_amd64.deb
# Run as root after tests/setup.sh (cargo-pgrx on the host).
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/chroot.sh
lock_roots
trap unmount_all EXIT
RELEASE=
if [ "${1-}" = --release ]; then
    RELEASE=$2
    shift 2
fi
MAJORS=("$@")
[ ${#MAJORS[@]} -gt 0 ] || MAJORS=(13 15 17 18)
OUT=$DEB_DIR
SRC=/src    # the source tree as the build root sees it
if [ -n "$RELEASE" ]; then
    commit=$(awk -v v="$RELEASE" '$1 == v { print $2 }' packaging/releases)
    [ -n "$commit" ] || { echo "no release $RELEASE in packaging/releases" >&2; exit 2; }
    VERSION=$RELEASE
    # Built once per machine: a released version's package never changes.
    OUT=$RELEASES_DIR
fi

# Not run in $(...): the mounts it makes must be seen by unmount_all.
package_tree() {  # package_tree MAJOR: builds; sets TREE to the host path of `cargo pgrx package`'s
    # tree and PG_ROOT to the root it was built in ("" for this machine)
    local major=$1 root pg_config=/usr/lib/postgresql/$1/bin/pg_config
    # cargo pgrx package adds to its output directory and never empties it: a tree left by another
    # version's build would end up in this package.
    if [ "$major" = 15 ] && [ -z "$RELEASE" ]; then
        PG_ROOT=
        TREE=$PWD/target/release/fhir_sync-pg15
        rm -rf "$TREE"
        cargo pgrx package --pg-config "$pg_config"
        return
    fi
    build_root "$major"
    root=$ROOT
    PG_ROOT=$root
    mount_build "$root"
    ensure_cargo_pgrx "$root"
    local target=/build/target
    if [ -n "$RELEASE" ]; then
        # The release's tree as committed, beside the current one, with a target directory of its
        # own: sharing the current tree's, cargo pgrx package generated the current tree's SQL
        # under the release's name (found in session 9; the check in make_deb catches it).
        SRC=/build/src-$RELEASE
        target=/build/target-$RELEASE
        rm -rf "$root$SRC"
        mkdir -p "$root$SRC"
        git archive "$commit" | tar -x -C "$root$SRC"
    fi
    TREE=$root$target/release/fhir_sync-pg$major
    rm -rf "$TREE"
    in_build_root "$root" "
        export CARGO_TARGET_DIR=$target
        cd $SRC
        [ -f /build/pgrx/config.toml ] || cargo pgrx init --pg$major $pg_config >/dev/null
        cargo pgrx package --no-default-features --pg-config $pg_config"
}

# Not run in $(...) either: a failure there would not stop the script.
make_deb() {  # make_deb MAJOR TREE MINOR: sets DEB to the package built from TREE
    local major=$1 tree=$2 minor=$3 name=postgresql-$1-fhir-sync
    local stage=$OUT/$name
    DEB=$OUT/$(deb_file "$major" "$VERSION")
    rm -rf "$stage" "$DEB"
    mkdir -p "$stage/DEBIAN" "$stage/usr/share/doc/$name"
    cp -a "$tree/usr" "$stage/"
    cp packaging/copyright "$stage/usr/share/doc/$name/copyright"
    # Exactly this version's files: its install script, the upgrade scripts, the library.
    local ext=$stage/usr/share/postgresql/$major/extension so=$stage/usr/lib/postgresql/$major/lib/fhir_sync.so f
    grep -qx "default_version = '$VERSION'" "$ext/fhir_sync.control"
    for f in "$ext"/fhir_sync--*.sql; do
        case $(basename "$f") in
            "fhir_sync--$VERSION.sql" | fhir_sync--*--*.sql) ;;
            *) echo "[deb] $f is not version $VERSION's: a stale build tree" >&2; return 1 ;;
        esac
    done
    [ -f "$ext/fhir_sync--$VERSION.sql" ] && [ -f "$so" ]
    # A released version's install script is the one frozen when it was released.
    local frozen=tests/fixtures/fhir_sync--$VERSION.sql
    if [ -n "$RELEASE" ] && [ -f "$frozen" ] \
        && ! cmp -s <(sort "$frozen") <(sort "$ext/fhir_sync--$VERSION.sql"); then
        echo "[deb] the install script built for release $VERSION is not $frozen: not the release's SQL" >&2
        return 1
    fi
    strip --strip-unneeded "$so"
    local glibc
    # The newest glibc symbol version the library needs: what dpkg-shlibdeps would derive.
    glibc=$(objdump -T "$so" | grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1 | cut -d_ -f2)
    [ -n "$glibc" ]
    # The server's structs are laid out as the headers of the minor release built against say
    # (minor releases have changed them): no older minor.
    cat >"$stage/DEBIAN/control" <<CONTROL
Package: $name
Version: $VERSION-1
Architecture: amd64
Maintainer: fhir_sync maintainers <maintainers@fhir-sync.invalid>
Installed-Size: $(du -sk --exclude=DEBIAN "$stage" | cut -f1)
Depends: postgresql-$major (>= $minor), libc6 (>= $glibc), libgcc-s1
Section: database
Priority: optional
Description: keeps a FHIR server in sync with clinical tables, for PostgreSQL $major
 fhir_sync is a PostgreSQL extension that captures every committed change of
 the tables it tracks in the writer's transaction and delivers it to a FHIR R4
 server from a background worker, with retries, a dead-letter table and
 metrics. Add fhir_sync to shared_preload_libraries, restart PostgreSQL and
 run CREATE EXTENSION fhir_sync in the database to sync.
CONTROL
    dpkg-deb --root-owner-group -Zxz --build "$stage" "$DEB" >/dev/null
    rm -rf "$stage"
}

mkdir -p "$OUT"
for major in "${MAJORS[@]}"; do
    suite_of "$major" >/dev/null
    deb=$OUT/$(deb_file "$major" "$VERSION")
    if [ -n "$RELEASE" ] && [ -f "$deb" ]; then
        echo "[deb] $deb (built before)"
        continue
    fi
    echo "[deb] PostgreSQL $major: cargo pgrx package${RELEASE:+ of release $RELEASE}"
    package_tree "$major"
    # The minor release of the headers built against, e.g. 17.12.
    minor=$(sed -n 's/^#define PG_VERSION "\([0-9.]*\).*/\1/p' "$PG_ROOT/usr/include/postgresql/$major/server/pg_config.h")
    [ -n "$minor" ]
    make_deb "$major" "$TREE" "$minor"
    echo "[deb] $DEB"
    unmount_all
done
