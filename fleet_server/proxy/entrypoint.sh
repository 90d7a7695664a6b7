#!/bin/sh
# Start nginx in front of the API. Without a certificate in /var/lib/fleet-proxy/tls
# (cert.pem and key.pem, e.g. mounted from the host), make a self-signed one for
# FLEET_TLS_HOSTNAME first; the body cap follows FLEET_MAX_REQUEST_BYTES, as the API's does.
set -eu

TLS_DIR=/var/lib/fleet-proxy/tls
FLEET_TLS_HOSTNAME="${FLEET_TLS_HOSTNAME:-localhost}"
FLEET_MAX_REQUEST_BYTES="${FLEET_MAX_REQUEST_BYTES:-1048576}"
FLEET_API_UPSTREAM="${FLEET_API_UPSTREAM:-api:8000}"

case "$FLEET_MAX_REQUEST_BYTES" in
    ''|*[!0-9]*) echo "FLEET_MAX_REQUEST_BYTES=$FLEET_MAX_REQUEST_BYTES: expected a whole number of bytes" >&2; exit 2 ;;
esac
case "$FLEET_TLS_HOSTNAME$FLEET_API_UPSTREAM" in
    *[!A-Za-z0-9.:-]*) echo "FLEET_TLS_HOSTNAME and FLEET_API_UPSTREAM: letters, digits and . : - only" >&2; exit 2 ;;
esac

if [ ! -s "$TLS_DIR/cert.pem" ] || [ ! -s "$TLS_DIR/key.pem" ]; then
    echo "no certificate in $TLS_DIR: making a self-signed one for $FLEET_TLS_HOSTNAME" >&2
    umask 077
    openssl req -x509 -newkey rsa:2048 -nodes -days 825 -subj "/CN=$FLEET_TLS_HOSTNAME" \
        -addext "subjectAltName=DNS:$FLEET_TLS_HOSTNAME,DNS:localhost,IP:127.0.0.1" \
        -keyout "$TLS_DIR/key.pem" -out "$TLS_DIR/cert.pem" 2>/dev/null
fi

sed -e "s/@FLEET_MAX_REQUEST_BYTES@/$FLEET_MAX_REQUEST_BYTES/g" \
    -e "s/@FLEET_API_UPSTREAM@/$FLEET_API_UPSTREAM/g" \
    /etc/fleet-proxy/nginx.conf.in > /etc/nginx/nginx.conf
exec nginx -g 'daemon off;'
