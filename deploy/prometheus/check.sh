#!/usr/bin/env bash
# Validates the Prometheus configuration, the rules and their unit tests for siteflow.
# Needs promtool (Debian/Ubuntu: apt-get install prometheus). Exits non-zero on any failure.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

if ! command -v promtool >/dev/null 2>&1; then
    echo "promtool not found on PATH (Debian/Ubuntu: apt-get install prometheus)" >&2
    exit 1
fi
promtool --version 2>&1 | head -n 1

echo "==> promtool check config prometheus.yml"
promtool check config prometheus.yml

echo "==> promtool check rules rules/*.yml"
promtool check rules rules/*.yml

echo "==> promtool test rules tests/*.yml"
promtool test rules tests/*.yml

echo "==> all Prometheus checks passed"
