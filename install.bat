@echo off
rem Installs LlamaChat on Windows; the twin of install.sh. Two ways in:
rem
rem   install.bat [--small]
rem       On its own: makes the virtual environment .venv in the module folder (py -3.11, else python 3.11+),
rem       installs requirements.txt into it (llama.cpp for the CPU, a prebuilt wheel), then gets the model with
rem       fetch_model.py. For an NVIDIA GPU, install requirements.windows.cuda<major>.txt into .venv with pip -r.
rem   call install.bat install
rem       From the CodeProject.AI server's setup.bat, which has made the venv (venvPythonCmdPath) and installs
rem       requirements.txt itself afterwards: only gets the model, keeping a copy in the server's download cache,
rem       and reports a failure in moduleInstallErrors.
rem
rem Re-running skips what is already there. --small, or LLAMACHAT_MODEL=small, installs the small SmolLM2-135M
rem model rather than the default one. What to download, and the fallback when the Hugging Face Hub cannot be
rem reached, live in fetch_model.py, shared with install.sh.

if /i "%~1" == "install" goto :server_install

rem ---- On its own -------------------------------------------------------------------------------------------
setlocal EnableExtensions
set "moduleDir=%~dp0"
set "moduleDir=%moduleDir:~0,-1%"
set "venv=%moduleDir%\.venv"
set "python=%venv%\Scripts\python.exe"
set "small="

:parse_args
if "%~1" == "" goto :args_done
if /i "%~1" == "--small" (
    set "small=--small"
    shift
    goto :parse_args
)
if /i "%~1" == "--help" goto :usage
if /i "%~1" == "-h" goto :usage
echo LlamaChat install: ERROR: unknown option '%~1'. Usage: install.bat [--small]
exit /b 2

:usage
echo Usage: install.bat [--small]   (LLAMACHAT_MODEL=small works like --small)
exit /b 0

:args_done
if exist "%python%" goto :have_venv

set "basePython="
py -3.11 -c "import sys" >nul 2>&1
if not errorlevel 1 set "basePython=py -3.11"
if defined basePython goto :make_venv
python -c "import sys; sys.exit(sys.version_info < (3, 11))" >nul 2>&1
if not errorlevel 1 set "basePython=python"
if defined basePython goto :make_venv
echo LlamaChat install: ERROR: no Python 3.11 (nor python 3.11+) found. Install Python 3.11 from
echo   https://www.python.org/downloads/windows/ and run this script again.
exit /b 1

:make_venv
echo LlamaChat install: creating the virtual environment %venv% with %basePython%
%basePython% -m venv "%venv%"
if not errorlevel 1 goto :requirements
echo LlamaChat install: ERROR: could not create %venv%.
exit /b 1

:have_venv
echo LlamaChat install: using the existing virtual environment %venv%

:requirements
"%python%" -c "import llama_cpp" >nul 2>&1
if not errorlevel 1 goto :pip_install
rem PyPI has only llama-cpp-python's source, which needs Visual Studio's C++ compiler; requirements.txt names
rem llama-cpp-python's own index, which has a prebuilt Windows x64 wheel.
echo LlamaChat install: installing requirements.txt, llama-cpp-python as the prebuilt CPU wheel from its own index
echo   (https://abetlen.github.io/llama-cpp-python/whl/cpu). Should that index be out of reach, pip compiles PyPI's
echo   source instead, which needs Visual Studio Build Tools with "Desktop development with C++", and CMake.

:pip_install
"%python%" -m pip install --disable-pip-version-check -r "%moduleDir%\requirements.txt"
if not errorlevel 1 goto :fetch
echo LlamaChat install: ERROR: pip could not install requirements.txt; see its messages above. If llama-cpp-python
echo   failed to compile, https://abetlen.github.io/llama-cpp-python/whl/cpu could not be reached: allow it, or install
echo   Visual Studio Build Tools with "Desktop development with C++" and CMake.
exit /b 1

:fetch
"%python%" "%moduleDir%\fetch_model.py" %small%
set "status=%errorlevel%"
if "%status%" == "3" echo LlamaChat install: the Hugging Face Hub could not be reached: LlamaChat will chat with the small SmolLM2-135M model until the install is run again with the Hub in reach.
if "%status%" == "3" set "status=0"
if "%status%" == "0" goto :standalone_done
echo LlamaChat install: ERROR: no model could be installed; see the messages above.
exit /b 1

:standalone_done
echo LlamaChat install: done. Python environment: %venv%; models: %moduleDir%\models
exit /b 0


rem ---- Called by the server's setup.bat ------------------------------------------------------------------------
rem Our own names stay inside setlocal; only moduleInstallErrors goes back to the server, and only on failure.
:server_install
setlocal EnableExtensions
set "llamachat_error="
if not defined venvPythonCmdPath goto :server_variables_missing
if not defined moduleDirPath goto :server_variables_missing

rem The server installs requirements.txt only after this script, but fetch_model.py needs two of its packages now:
rem huggingface_hub downloads the model, commentjson reads modulesettings.json as the server does.
call :server_require huggingface_hub "huggingface_hub huggingface-hub"
if defined llamachat_error goto :server_done
call :server_require commentjson "commentjson"
if defined llamachat_error goto :server_done

rem The server's download cache outlives the module folder, so a reinstall need not download 4 GB again.
set "cacheArg="
set "modulesName=modules"
set "assetsName=assets"
if defined modulesDir set "modulesName=%modulesDir%"
if defined assetsDir set "assetsName=%assetsDir%"
for %%d in ("%moduleDirPath%") do set "moduleName=%%~nxd"
if defined moduleDirName set "moduleName=%moduleDirName%"
if defined downloadDirPath set cacheArg=--cache-dir "%downloadDirPath%\%modulesName%\%assetsName%\%moduleName%"
if /i "%verbosity%" == "quiet" set "HF_HUB_DISABLE_PROGRESS_BARS=1"
"%venvPythonCmdPath%" "%moduleDirPath%\fetch_model.py" %cacheArg%
set "status=%errorlevel%"
if "%status%" == "3" echo LlamaChat install: the Hugging Face Hub could not be reached: LlamaChat will chat with the small SmolLM2-135M model until the install is run again with the Hub in reach.
if "%status%" == "3" set "status=0"
if not "%status%" == "0" set "llamachat_error=Unable to install the LlamaChat model, see the messages above"
goto :server_done

rem Installs package %1 (its line in requirements.txt, found by the names in %2) unless it is there already.
:server_require
"%venvPythonCmdPath%" -c "import %~1" >nul 2>&1
if not errorlevel 1 exit /b 0
set "requirement=%~1"
for /f "usebackq tokens=1 delims=# " %%r in (`findstr /i /b "%~2" "%moduleDirPath%\requirements.txt"`) do set "requirement=%%r"
echo LlamaChat install: installing "%requirement%" to download the model
"%venvPythonCmdPath%" -m pip install --disable-pip-version-check "%requirement%"
if errorlevel 1 set "llamachat_error=Unable to install %~1, which the LlamaChat model download needs"
exit /b 0

:server_variables_missing
set "llamachat_error=install.bat install is for the CodeProject.AI server's setup, moduleDirPath and venvPythonCmdPath are not set; run install.bat on its own instead"

:server_done
endlocal & set "llamachat_error=%llamachat_error%"
if not defined llamachat_error exit /b 0
echo LlamaChat install: ERROR: %llamachat_error%
set "moduleInstallErrors=%llamachat_error%"
set "llamachat_error="
exit /b 1
