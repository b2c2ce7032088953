"""The Explorer: the module's UI cut from its explore.html (docs/protocol.md §5.1) and the page at `/` that hosts it.

The host page (static/) loads the UI the way the real explorer does: it reads
`uiElements.explorerUI` from `GET /v1/module/list/running`, replaces `_MID_` with `<ModuleId>_`, inserts
the markup as HTML (so `<script src>` tags inside it do not run, as in the real explorer), and runs the
script and style as elements of their own. Its helper functions (submitRequest, setResultsHtml,
showLogOutput, delay...) are our own, with the real helpers' signatures and behaviour (docs/protocol.md §5.2).
"""

from __future__ import annotations

import re
from pathlib import Path

from aiohttp import web

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


async def host_page(request: web.Request) -> web.FileResponse:
    return web.FileResponse(STATIC_DIR / "explorer.html", headers={"Cache-Control": "no-cache"})


_ASSETS = frozenset(path.name for path in STATIC_DIR.iterdir() if path.is_file())


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
