"""The playground: GET / is its page, /static/... its assets, all plain files in api/web/.

Nothing is built at install time: the page is HTML, CSS and ES modules shipped as package
data. It calls the public API like any client would, with the key the user enters.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

WEB = Path(__file__).parent / "web"


class _Revalidated(StaticFiles):
    """StaticFiles whose answers say no-cache: browsers revalidate (ETag) instead of
    running stale modules after an upgrade."""

    def file_response(self, *args, **kwargs):  # noqa: ANN002, ANN003 - Starlette's signature
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


router = APIRouter()
router.mount("/static", _Revalidated(directory=WEB), name="static")


@router.get("/", include_in_schema=False)
async def index() -> FileResponse:
    return FileResponse(WEB / "index.html", headers={"Cache-Control": "no-cache"})
