#!/usr/bin/env bash
# Create the virtual environment and install nbtrain with everything its tests need.
#
# torch: a torch that is already importable is kept (a CUDA build you installed, say). If
# the system python has one, the venv is created with --system-site-packages to see it.
# Otherwise TORCH is installed, by default torch==2.13.0, which on these machines is a CPU
# wheel on local disk; elsewhere set TORCH to the CPU or CUDA wheel you want, for example
# TORCH="torch==2.13.0 --index-url <PyTorch's CPU wheel index>".
set -euo pipefail
venv=${1:-.venv}
python=${PYTHON:-python3}

if [ ! -x "$venv/bin/python" ]; then
    if "$python" -c "import torch" 2>/dev/null; then
        echo "setup: keeping the system's torch ($("$python" -c 'import torch; print(torch.__version__)'))"
        "$python" -m venv --system-site-packages "$venv"
    else
        "$python" -m venv "$venv"
    fi
fi
if "$venv/bin/python" -c "import torch" 2>/dev/null; then
    echo "setup: torch $("$venv/bin/python" -c 'import torch; print(torch.__version__)') kept"
else
    # shellcheck disable=SC2086  # TORCH may carry pip options
    "$venv/bin/pip" install --quiet ${TORCH:-torch==2.13.0}
fi
# torch is a range in pyproject.toml, so this keeps whichever torch is there.
# lightning: notebook 05 and the Lightning tests use it (an optional extra for users).
"$venv/bin/pip" install --quiet -e ".[test,lecture,lightning]"
"$venv/bin/python" -c "import torch, nbtrain; print('setup: nbtrain', nbtrain.__version__, 'with torch', torch.__version__)"
