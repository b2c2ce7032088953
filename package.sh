#!/usr/bin/env bash
# Makes <ModuleId>-<Version>.zip of the module's runtime files in the module folder:
#
#   bash package.sh <ModuleId> <Version> [--dest DIR]
#
# CodeProject.AI Server's devops/build/create_packages.sh calls it so, from the module folder. The work is done by
# package_module.py (which files ship, and a real zip from Python's zipfile), shared with package.bat.
module_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
for python in "$module_dir/.venv/bin/python" python3 python; do
    if command -v "$python" >/dev/null 2>&1 && "$python" -c 'import sys; sys.exit(sys.version_info < (3, 8))' 2>/dev/null
    then
        exec "$python" "$module_dir/package_module.py" "$@"
    fi
done
echo "package.sh: ERROR: packaging needs Python 3.8 or later (python3 on PATH)" >&2
exit 1
