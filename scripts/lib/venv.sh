# Sourced by the Python-tool scripts: make (or refresh when the pins change)
# a virtualenv with pinned requirements.
#   ensure_venv DIR REQUIREMENTS TAG [PYTHON]
# TAG prefixes messages; PYTHON overrides the interpreter (>= 3.11).

ensure_venv() {
  local venv=$1 requirements=$2 tag=$3 chosen=${4:-}
  local stamp="$venv/.requirements.sha256" want python candidate
  want=$(sha256sum "$requirements" | cut -d' ' -f1)
  if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
    python=
    for candidate in "$chosen" python3.11 python3; do
      [ -n "$candidate" ] || continue
      if command -v "$candidate" >/dev/null 2>&1 &&
        "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] < (3, 11))' 2>/dev/null; then
        python=$candidate
        break
      fi
    done
    if [ -z "$python" ]; then
      printf '[%s] needs Python >= 3.11 (python3.11 or python3)\n' "$tag" >&2
      return 1
    fi
    printf '[%s] creating %s with %s\n' "$tag" "$venv" "$($python --version)" >&2
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
  if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    printf '[%s] installing pinned packages from %s\n' "$tag" "$requirements" >&2
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-input -r "$requirements"
    echo "$want" >"$stamp"
  fi
}
