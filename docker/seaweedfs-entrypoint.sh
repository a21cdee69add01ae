#!/bin/sh
# SeaweedFS for the compose stack (image chrislusf/seaweedfs, alpine /bin/sh).
# One S3 identity whose keys come from the environment (docker/.env), never from a file in git;
# the dataset bucket is created on start (`weed mini -bucket`, idempotent). Extra arguments are
# passed to `weed mini` (e.g. ports when run outside a container).
set -eu

: "${AWS_ACCESS_KEY_ID:?set AWS_ACCESS_KEY_ID in docker/.env}"
: "${AWS_SECRET_ACCESS_KEY:?set AWS_SECRET_ACCESS_KEY in docker/.env}"
BUCKET="${SPEECHPAIRS_S3_BUCKET:-speechpairs}"
DATA_DIR="${SEAWEEDFS_DATA_DIR:-/data}"
CONF_DIR="${SEAWEEDFS_CONF_DIR:-/tmp/seaweedfs}"

# The keys are written into JSON below: refuse characters that would need escaping.
for value in "$AWS_ACCESS_KEY_ID" "$AWS_SECRET_ACCESS_KEY"; do
  case "$value" in
    *[!A-Za-z0-9._~+/=-]*)
      echo "seaweedfs-entrypoint: S3 keys may only use letters, digits and . _ ~ + / = -" >&2
      exit 2 ;;
  esac
done

mkdir -p "$DATA_DIR" "$CONF_DIR"
umask 077
cat > "$CONF_DIR/s3.json" <<JSON
{"identities": [{"name": "speechpairs",
  "credentials": [{"accessKey": "$AWS_ACCESS_KEY_ID", "secretKey": "$AWS_SECRET_ACCESS_KEY"}],
  "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
JSON

exec weed mini \
  -dir="$DATA_DIR" \
  -s3.config="$CONF_DIR/s3.json" \
  -s3.port=8333 \
  -bucket="$BUCKET" \
  -master.telemetry=false \
  -admin.ui=false \
  -webdav=false \
  -s3.port.iceberg=0 \
  -s3.port.lance=0 \
  "$@"
