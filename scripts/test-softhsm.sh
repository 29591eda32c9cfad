#!/usr/bin/env bash
# A SoftHSM2 token for the PKCS#11 tests (docs/KEYS.md). Installs SoftHSM2
# and OpenSC from Debian when missing (as root), then creates, under
# target/softhsm/, a token directory, a softhsm2.conf pointing at it, a
# token labelled `phylax-test` and a random user PIN in a 0600 file. The
# token is made afresh on every run. Prints the shell lines to export:
#   SOFTHSM2_CONF, PHYLAX_TEST_HSM_MODULE, PHYLAX_TEST_HSM_TOKEN,
#   PHYLAX_TEST_HSM_PIN_FILE
set -euo pipefail
cd "$(dirname "$0")/.."

module=/usr/lib/softhsm/libsofthsm2.so
if ! command -v softhsm2-util >/dev/null || [ ! -f "$module" ] || ! command -v pkcs11-tool >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "test-softhsm: installing softhsm2 and opensc" >&2
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 opensc) >&2
  else
    echo "test-softhsm: SoftHSM2 is missing; install the Debian packages softhsm2 and opensc" >&2
    exit 1
  fi
fi

dir="$PWD/target/softhsm"
rm -rf "$dir"
mkdir -p "$dir/tokens"
chmod 700 "$dir"
cat > "$dir/softhsm2.conf" <<CONF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
umask 077
# Test-only PINs, random per run; nothing here protects real data.
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/pin"
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$dir/so-pin"
SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label phylax-test \
  --pin "$(cat "$dir/pin")" --so-pin "$(cat "$dir/so-pin")" >&2

echo "export SOFTHSM2_CONF=$dir/softhsm2.conf"
echo "export PHYLAX_TEST_HSM_MODULE=$module"
echo "export PHYLAX_TEST_HSM_TOKEN=phylax-test"
echo "export PHYLAX_TEST_HSM_PIN_FILE=$dir/pin"
