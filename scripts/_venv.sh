# Sourced by scripts/run and scripts/test: make sure .venv exists and holds this project.
# CHATGLM_BOT_EXTRAS (set by the sourcing script) names the pip extras to install: scripts/test
# wants "dev" (pytest, ruff, mypy), scripts/run none, so a production install has no dev tools.
# Re-installs only when pyproject.toml changed since the last install or more extras are wanted.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "chatglm-bot needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv" >&2
    "$python" -m venv .venv
fi
extras="${CHATGLM_BOT_EXTRAS:-}"
stamp=.venv/.chatglm-bot-installed
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
have="$(cat "$stamp" 2>/dev/null || true)"
# The stamp is "<hash> <extras>"; an install with dev extras also serves a runtime-only run.
if [ "${have%% *}" != "$want" ] || { [ -n "$extras" ] && [ "${have#* }" != "$extras" ]; }; then
    # pip's own output (hundreds of lines, warnings of the machine's pip configuration) goes to a
    # log; the terminal gets one line, and on a failure the log's end.
    log=.venv/install.log
    echo "installing chatglm-bot${extras:+ with [$extras]} into .venv (first run takes a few minutes; pip's output: $log)" >&2
    # torch is pinned in pyproject.toml; see README for the CPU-only and CUDA wheels.
    if ! { .venv/bin/python -m pip install --upgrade pip \
        && .venv/bin/python -m pip install -e ".${extras:+[$extras]}"; } > "$log" 2>&1; then
        echo "installing chatglm-bot failed; the end of $log:" >&2
        tail -n 20 "$log" >&2
        exit 1
    fi
    echo "$want $extras" > "$stamp"
    # A production install (scripts/run: no extras) compiles the native int4 kernel now, once, so no
    # start does; scripts/test builds it in its own fixtures. A failure only means PyTorch's slower
    # int4 path runs, so it does not stop the run.
    if [ -z "$extras" ]; then
        .venv/bin/chatglm-bot build-kernel >&2 || echo "build-kernel failed; the bot falls back to PyTorch's int4 path" >&2
    fi
fi
