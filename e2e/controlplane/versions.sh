# shellcheck shell=bash
# Sourced by the control plane's scripts: reads pinned versions from the wrapper modules in tools/.
# module_version <tool dir> <module path> prints the version its go.mod requires (tidy may have
# moved the line into a `require (...)` block).
module_version() {
  awk -v m="$2" '($1 == "require" && $2 == m) { print $3; exit } ($1 == m && $2 ~ /^v/) { print $2; exit }' \
    "$(dirname "${BASH_SOURCE[0]}")/tools/$1/go.mod"
}
