"""llama.cpp's own log, written to the server's log at its real level.

llama-cpp-python sends llama.cpp's log to stderr, and CodeProject.AI Server logs everything a module writes to stderr
as an error. This callback prints each line to stdout with the level prefix the server reads instead ("warning: ..."),
keeps debug and info lines out unless the log is loud, and reports as debug the warnings and errors llama.cpp logs
while it stops a computation that a cancel aborted ("decode: removing memory module entries ..."): those are routine.
"""

import ctypes

import llama_cpp

# enum ggml_log_level in the llama.cpp this llama-cpp-python bundles (include/ggml.h): NONE 0, DEBUG 1, INFO 2, WARN 3,
# ERROR 4, CONT 5 (continues the previous message). llama-cpp-python's own callback still uses an older order, which
# is why it printed warnings as errors and dropped the errors.
_LEVELS = {0: "info", 1: "debug", 2: "info", 3: "warning", 4: "error"}
_CONTINUE = 5
_QUIET_LEVELS = ("debug", "info")


class LlamaLog:
    def __init__(self) -> None:
        self.loud = False
        # Set while llama.cpp stops an aborted computation (see LlamaChat._watch).
        self.aborting = False
        self._level = "info"
        self._partial = ""  # llama.cpp may write a line in pieces
        self._callback = llama_cpp.llama_log_callback(self._receive)

    def install(self, loud: bool) -> None:
        """Routes llama.cpp's log (for the whole process) through this object from now on."""
        self.loud = loud
        llama_cpp.llama_log_set(self._callback, ctypes.c_void_p(0))

    def _receive(self, level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
        try:
            if level != _CONTINUE:
                self._level = _LEVELS.get(level, "info")
            self._partial += text.decode("utf-8", errors="replace")
            *lines, self._partial = self._partial.split("\n")
            for line in lines:
                self._write(line)
        except Exception:  # an exception cannot cross back into llama.cpp; losing one log line is the lesser harm
            self._partial = ""

    def _write(self, line: str) -> None:
        level = "debug" if self.aborting and self._level in ("warning", "error") else self._level
        if line.strip() and (self.loud or level not in _QUIET_LEVELS):
            print(f"{level}: llama.cpp: {line.rstrip()}", flush=True)


LLAMA_LOG = LlamaLog()
