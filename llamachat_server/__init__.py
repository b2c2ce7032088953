"""A small stand-in for CodeProject.AI Server that hosts one module folder (LlamaChat) exactly as the real
server does: the same routes, request queue protocol, module environment and Explorer helpers.

Run it with ``python -m llamachat_server``; see docs/api.md, "The standalone server".
"""

# The real server version whose wire protocol this server speaks; modules check it against
# their ModuleReleases' ServerVersionRange, so report the version we are compatible with.
COMPATIBLE_SERVER_VERSION = "2.9.6"
