#!/bin/sh
# The images' entrypoint (installed as /usr/local/bin/strata-entrypoint).
#
#   coordinator [FLAGS]     strata-coordinator on this container's address, API :8470, control
#                           plane :8471, state and checkpoints in /var/lib/strata (the shared
#                           volume), the API token from the compose secret
#   worker [FLAGS]          strata-worker --coordinator $STRATA_CONTROL (default coordinator:8471)
#                           --host <this container's address> --worker-id <container hostname>
#   health-coordinator      exit 0 when /healthz answers (the Docker health check)
#   health-worker           exit 0 when the coordinator lists this worker as idle or busy
#   anything else           the strata CLI: `strata "$@"` (submit, jobs, status, logs, workers)
#
# The token: /run/secrets/strata_token (a compose secret) unless STRATA_TOKEN is set. It is the
# API's bearer token and the control plane's secret. Both daemons bind the container's own
# address (`hostname -i`), not 0.0.0.0: the coordinator tells workers to reach its rendezvous
# store at its --listen host, and Gloo binds the --host a worker gives.
set -eu
SECRET=${STRATA_TOKEN_FILE:-/run/secrets/strata_token}
if [ -z "${STRATA_TOKEN:-}" ] && [ -r "$SECRET" ]; then
  STRATA_TOKEN=$(cat "$SECRET")
  export STRATA_TOKEN
fi
export STRATA_COORDINATOR="${STRATA_COORDINATOR:-coordinator:8470}"
ip=$(hostname -i | awk '{ print $1 }')

case "${1:-}" in
  coordinator)
    shift
    exec strata-coordinator --data-dir /var/lib/strata --listen "$ip:8470" \
      --control-listen "$ip:8471" --token-file "$SECRET" "$@"
    ;;
  worker)
    shift
    exec strata-worker --coordinator "${STRATA_CONTROL:-coordinator:8471}" --host "$ip" \
      --worker-id "${STRATA_WORKER_ID:-$(hostname)}" --secret-file "$SECRET" "$@"
    ;;
  health-coordinator)
    exec curl -fsS -o /dev/null -H "Authorization: Bearer $STRATA_TOKEN" "http://$ip:8470/healthz"
    ;;
  health-worker)
    id=${STRATA_WORKER_ID:-$(hostname)}
    strata workers --json | grep -Eq "\"id\":\"$id\",[^}]*\"state\":\"(idle|busy)\""
    ;;
  *)
    exec strata "$@"
    ;;
esac
