#!/usr/bin/env bash
# fhir_sync on every PostgreSQL major this machine can have, each from that major's Debian release
# in a chroot (packaging/chroot.sh; nothing is installed into the host):
#
#   bash tests/versions.sh            # 13 (bullseye), 15 (bookworm), 17 (trixie), 18 (sid)
#   bash tests/versions.sh 17         # one of them
#
# For each major:
#   1. the in-database tests, `cargo pgrx test --release pgN`, in the build root (a release build:
#      its dependencies are the package's; 15: tests/run.sh's db tier ran them on this machine);
#   2. the Debian package, `bash packaging/deb.sh N` (a release build);
#   3. the package installed with apt into the clean root (PostgreSQL N and nothing else), and the
#      end-to-end core run against it: `pytest tests/e2e -m every_version` on the host (create,
#      update, child change, delete, dead letter and requeue, kill -9 and immediate restart, standby
#      promotion, ALTER EXTENSION UPDATE from each release, pg_dump/pg_restore, and the move of a
#      PostgreSQL 15 database to that major; on 17 also the previous release's package, built from
#      git history, upgraded in place). The chroot's servers run inside it and share this
#      machine's network, so the harness's FHIR servers (Helios, the fault server) on 127.0.0.1
#      are theirs too.
#
# Roots and builds are cached under $FHIR_SYNC_CHROOTS (default /var/cache/fhir_sync-chroots).
# Run as root after tests/setup.sh, with the extension installed into this machine's
# PostgreSQL 15 (tests/run.sh does both: the version move starts from a 15 cluster).
set -euo pipefail
cd "$(dirname "$0")/.."
. packaging/chroot.sh
lock_roots
trap unmount_all EXIT
FHIR_SYNC_CACHE=${FHIR_SYNC_CACHE:-$HOME/.cache/fhir_sync}
MAJORS=("$@")
[ ${#MAJORS[@]} -gt 0 ] || MAJORS=(13 15 17 18)
# The majors on which the previous release's package, built from git history, is upgraded in place.
UPGRADE_MAJORS=${FHIR_SYNC_UPGRADE_MAJORS-17}
PREVIOUS=$(awk -v v="$VERSION" 'NF && $1 !~ /^#/ && $1 != v { p = $1 } END { print p }' packaging/releases)

TIMES=()
for major in "${MAJORS[@]}"; do
    start=$SECONDS
    pg_config=/usr/lib/postgresql/$major/bin/pg_config
    if [ "$major" != 15 ]; then
        echo "[versions] PostgreSQL $major: cargo pgrx test --release pg$major"
        build_root "$major"
        root=$ROOT
        mount_build "$root"
        ensure_cargo_pgrx "$root"
        in_build_root "$root" "
            mkdir -p /build/pgrx /build/pgdata && chown postgres /build/pgdata
            cd /src
            [ -f /build/pgrx/config.toml ] || cargo pgrx init --pg$major $pg_config >/dev/null
            cargo pgrx test --release pg$major --no-default-features --runas postgres --pgdata /build/pgdata"
    fi
    bash packaging/deb.sh "$major"
    deb=$(deb_file "$major" "$VERSION")
    previous=$(deb_file "$major" "$PREVIOUS")
    previous_env=()
    if [[ " $UPGRADE_MAJORS " == *" $major "* ]]; then
        bash packaging/deb.sh --release "$PREVIOUS" "$major"
        previous_env=(FHIR_SYNC_PREVIOUS_DEB=/tmp/$previous FHIR_SYNC_CURRENT_DEB=/tmp/$deb)
    fi

    echo "[versions] PostgreSQL $major: $DEB_DIR/$deb into a root with only postgresql-$major"
    clean_root "$major"
    clean=$ROOT
    mount_system "$clean"
    cp "$DEB_DIR/$deb" "$clean/tmp/"
    [ ${#previous_env[@]} -eq 0 ] || cp "$RELEASES_DIR/$previous" "$clean/tmp/"
    chroot "$clean" dpkg --purge "postgresql-$major-fhir-sync" >/dev/null
    chroot "$clean" env DEBIAN_FRONTEND=noninteractive "${APT[@]}" install "/tmp/$deb" >/dev/null

    echo "[versions] PostgreSQL $major: pytest tests/e2e -m every_version"
    env FHIR_SYNC_PG_MAJOR="$major" FHIR_SYNC_PG_ROOT="$clean" "${previous_env[@]}" \
        "$FHIR_SYNC_CACHE/venv/bin/pytest" tests/e2e -q -m every_version
    unmount_all
    TIMES+=("PostgreSQL $major $((SECONDS - start)) s")
done
printf '[versions] %s\n' "${TIMES[@]}"
