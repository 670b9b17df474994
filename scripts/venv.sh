# Sourced by the scripts: make .venv (Python 3.11+) with the project and its test tools,
# reinstalling only when the packaging files change.
VENV="${PULSAR_REST_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "pulsar-rest needs Python 3.11 or newer as \$PYTHON (now: $PYTHON)" >&2
  exit 1
fi
stamp="$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$VENV/.installed" 2>/dev/null)" != "$stamp" ]; then
  echo "setting up $VENV ..." >&2
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --upgrade pip
  "$VENV/bin/python" -m pip install --quiet -e '.[test]'
  echo "$stamp" > "$VENV/.installed"
fi
export PATH="$PWD/$VENV/bin:$PATH"
