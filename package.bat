@echo off
rem Makes <ModuleId>-<Version>.zip of the module's runtime files in the module folder:
rem
rem   package.bat <ModuleId> <Version> [--dest DIR]
rem
rem CodeProject.AI Server's devops\build\create_packages.bat calls it so, from the module folder, with "call": so
rem this script ends with "exit /b", never "exit". The work is done by package_module.py (which files ship, and a
rem real zip from Python's zipfile), shared with package.sh. The module's own .venv first, else the py launcher,
rem else python on PATH.
setlocal
set "packager=%~dp0package_module.py"
set "venvPython=%~dp0.venv\Scripts\python.exe"
if exist "%venvPython%" goto :venv
where py >nul 2>nul && goto :launcher
where python >nul 2>nul && goto :onpath
echo package.bat: ERROR: packaging needs Python 3.8 or later: install it so that py or python is on PATH 1>&2
exit /b 1

:venv
"%venvPython%" "%packager%" %*
exit /b %errorlevel%

:launcher
py -3 "%packager%" %*
exit /b %errorlevel%

:onpath
python "%packager%" %*
exit /b %errorlevel%
