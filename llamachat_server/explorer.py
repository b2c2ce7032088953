"""The Explorer: the module's UI cut from its explore.html (docs/protocol.md §5.1) and the page at `/` that hosts it.

The host page (static/) loads the UI the way the real explorer does: it reads
`uiElements.explorerUI` from `GET /v1/module/list/running`, replaces `_MID_` with `<ModuleId>_`, inserts
the markup as HTML (so `<script src>` tags inside it do not run, as in the real explorer), and runs the
script and style as elements of their own. Its helper functions (submitRequest, setResultsHtml,
showLogOutput, delay...) are our own, with the real helpers' signatures and behaviour (docs/protocol.md §5.2).
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

from aiohttp import web

from .api_keys import keyless
from .server_state import STATE

EXPLORE_FILENAME = "explore.html"
STATIC_DIR = Path(__file__).parent / "static"

# Greedy, like the real server: from the first start marker to the last end marker.
_PARTS = {
    "html": re.compile(r"<!--\s*START EXPLORER MARKUP\s*-->(.*)<!--\s*END EXPLORER MARKUP\s*-->", re.S),
    "css": re.compile(r"/\*\s*START EXPLORER STYLE\s*\*/(.*)/\*\s*END EXPLORER STYLE\s*\*/", re.S),
    "script": re.compile(r"//\s*START EXPLORER SCRIPT(.*)//\s*END EXPLORER SCRIPT", re.S),
}


def extract_explorer_ui(explore_html: str) -> dict[str, str]:
    """{html, css, script} between explore.html's START/END EXPLORER markers; "" for a missing part."""
    found = {name: pattern.search(explore_html) for name, pattern in _PARTS.items()}
    return {name: match.group(1).strip() if match else "" for name, match in found.items()}


def read_explorer_ui(module_dir: Path) -> dict[str, str]:
    """The module's UI, read afresh each time so an edited explore.html shows on the next page load."""
    path = Path(module_dir) / EXPLORE_FILENAME
    try:
        return extract_explorer_ui(path.read_text(encoding="utf-8"))
    except OSError:
        return extract_explorer_ui("")


def module_script(explorer_ui: dict[str, str], module_id: str) -> str:
    """The module's script as the host page runs it: `_MID_` replaced as static/explorer.js replaces it."""
    return explorer_ui["script"].replace("_MID_", re.sub(r"[^a-zA-Z0-9]+", "", module_id) + "_")


def page_policy(scripts: list[str]) -> str:
    """The page's Content-Security-Policy: scripts only from this server's files and the module scripts given (by
    hash: the host page runs each as an inline script, as the real Explorer does), no inline handlers, no plugins,
    and no framing (a page that frames the Explorer could trick clicks on it)."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in scripts)
    return (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self' 'unsafe-inline'; "
        f"img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )


@keyless
async def host_page(request: web.Request) -> web.FileResponse:
    settings = request.app[STATE].settings
    script = module_script(read_explorer_ui(settings.module_dir), settings.module_id)
    headers = {"Cache-Control": "no-cache", "X-Frame-Options": "DENY", "Content-Security-Policy": page_policy([script])}
    return web.FileResponse(STATIC_DIR / "explorer.html", headers=headers)


_ASSETS = frozenset(path.name for path in STATIC_DIR.iterdir() if path.is_file())


@keyless
async def asset(request: web.Request) -> web.FileResponse:
    """One of the host page's own files, by exact name: anything else, a traversal attempt included, is a 404."""
    name = request.match_info["name"]
    if name not in _ASSETS:
        raise web.HTTPNotFound()
    return web.FileResponse(STATIC_DIR / name, headers={"Cache-Control": "no-cache"})


def add_explorer_routes(app: web.Application) -> None:
    app.router.add_get("/", host_page)
    app.router.add_get("/explorer.html", host_page)
    app.router.add_get("/assets/{name}", asset)
