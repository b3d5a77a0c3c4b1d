#!/usr/bin/env bash
# Start a central Luigi scheduler (luigid) for moe-atlas, listening on 127.0.0.1 only.
#
#   deploy/luigid.sh                      # port 8082, state in ~/.local/state/moe-atlas-luigid
#   LUIGID_PORT=8090 deploy/luigid.sh     # another port
#
# The web UI (http://127.0.0.1:8082) has no authentication; reach it from another
# machine through an SSH tunnel (ssh -L 8082:127.0.0.1:8082 host), never by binding
# it to a public interface. See deploy/luigid.md.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
port="${LUIGID_PORT:-8082}"
state_dir="${LUIGID_STATE_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/moe-atlas-luigid}"

# luigid unpickles its state file at start: only this user may write there.
mkdir -p "$state_dir"
chmod 700 "$state_dir"

export LUIGI_CONFIG_PATH="$here/luigid.cfg"
exec luigid --address 127.0.0.1 --port "$port" --state-path "$state_dir/state.pickle" "$@"
