"""Label Studio over HTTP through ``label-studio-sdk``: the review queue's project, its labeling
config, its file uploads and its tasks.

The project's labeling config names a labeling output's categories (things and stuff, COCO names:
``BrushLabels`` over an ``Image``, and a per-region ``crowd`` choice); ``ensure_project`` creates
the project when there is none of that title. Each task carries its image's key in the labeling
output (``data.ciae_key``), which ``project_keys`` reads back.

* Images are uploaded through the API (``POST /api/projects/<id>/import?commit_to_project=false``
  with the encoded image bytes, which gives file uploads and no tasks), so that it works whatever
  the input was (a local folder, S3 URIs, or prepared shards, whose images exist only inside
  Parquet) and wherever the server runs; referencing local files would need the server to see
  the same disk (``LOCAL_FILES_SERVING_ENABLED``) and shard images written out first.
* Tasks are imported and listed as JSON through the SDK's HTTP client, not its typed models, which
  walk every number of every RLE. Over http every request gets its own connection (see
  ``connect``: the tool's development server answers ~40 ms late on a reused one); over https
  they are kept alive.

The token is a Label Studio personal access token (a JWT refresh token; the SDK trades it for
access tokens) or a legacy token where the organization allows them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from xml.sax.saxutils import quoteattr

TOKEN_ENV = "LABEL_STUDIO_API_KEY"
IMAGE = "image"             # the Image tag's name and the task data field of its URL
LABELS = "label"            # the BrushLabels tag
CROWD = "crowd"             # the per-region Choices tag (and its one choice)
KEY = "ciae_key"            # task data: the image's key in the labeling output
IMAGE_TYPES = {".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".png": "image/png", ".bmp": "image/bmp",
               ".gif": "image/gif", ".webp": "image/webp", ".tif": "image/tiff", ".tiff": "image/tiff"}


class ReviewError(ValueError):
    """A user's mistake: bad URL, refused token, not a labeling output, another project's config."""


def labeling_config(categories: list[dict]) -> str:
    """Label Studio's labeling config for the categories (COCO panoptic dicts: id, name,
    isthing, color): a brush label per category, things first, and a per-region crowd flag."""
    def label(c):
        color = c.get("color")
        bg = f' background="#{color[0]:02x}{color[1]:02x}{color[2]:02x}"' if color else ""
        kind = "thing" if c.get("isthing") else "stuff"
        return f'    <Label value={quoteattr(c["name"])}{bg} hint="{kind} {int(c["id"])}"/>'

    ordered = sorted(categories, key=lambda c: (not c.get("isthing"), int(c["id"])))
    return "\n".join([
        "<View>",
        f'  <Image name="{IMAGE}" value="${IMAGE}" zoom="true" zoomControl="true"/>',
        f'  <BrushLabels name="{LABELS}" toName="{IMAGE}">',
        *(label(c) for c in ordered),
        "  </BrushLabels>",
        f'  <Choices name="{CROWD}" toName="{IMAGE}" perRegion="true">',
        f'    <Choice value="{CROWD}"/>',
        "  </Choices>",
        "</View>",
    ])


def connect(url: str, token: str | None):
    """A ``label_studio_sdk.LabelStudio`` client whose token the server accepts; ReviewError
    (one line) for a missing token, an unreachable URL or a refused token."""
    import httpx
    from label_studio_sdk import LabelStudio
    from label_studio_sdk.core.api_error import ApiError

    if not token:
        raise ReviewError(f"no Label Studio token: set {TOKEN_ENV} (a personal access token from the "
                          "tool's Account & Settings page)")
    if not url.startswith(("http://", "https://")):
        raise ReviewError(f"{url}: not an http(s) URL of a Label Studio server")
    # Label Studio's own server (``label-studio start``: Django's development server, http only)
    # answers a request on a kept-alive connection ~40 ms late (the last segment of its reply
    # waits, by Nagle's rule, for the client's delayed ACK): over http every request gets a new
    # connection instead, which costs well under a millisecond on a local network
    keepalive = {} if url.startswith("https://") else {"limits": httpx.Limits(max_keepalive_connections=0)}
    client = LabelStudio(base_url=url.rstrip("/"), api_key=token,
                         httpx_client=httpx.Client(timeout=120, follow_redirects=True, **keepalive))
    try:
        client.users.whoami()
    except (httpx.HTTPError, OSError) as e:
        raise ReviewError(f"{url}: cannot reach Label Studio ({type(e).__name__}: {e})") from None
    except ApiError as e:
        if e.status_code in (401, 403):
            raise ReviewError(f"{url}: the token was refused ({e.status_code}: {_detail(e.body)})") from None
        raise ReviewError(f"{url}: not a Label Studio server? ({e.status_code}: {_detail(e.body)})") from None
    except Exception as e:      # a token that is not a JWT and not a legacy one, an HTML page, ...
        raise ReviewError(f"{url}: the token was refused or this is no Label Studio server "
                          f"({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    return client


def _detail(body) -> str:
    if isinstance(body, dict):
        return str(body.get("detail") or body)
    return " ".join(str(body).split())[:200]


def find_project(client, title: str):
    """The project of that title, or None."""
    for p in client.projects.list(title=title):
        if p.title == title:
            return p
    return None


def ensure_project(client, title: str, categories: list[dict]):
    """The project of that title, created with ``labeling_config(categories)`` when there is
    none; ReviewError when one exists whose config lacks some category."""
    config = labeling_config(categories)
    project = find_project(client, title)
    if project is None:
        return client.projects.create(title=title, label_config=config,
                                      description="ciae review queue: the least confident images "
                                                  "of a labeling output, with the model's segments as predictions")
    have = client.projects.get(project.id).label_config or ""
    missing = [c["name"] for c in categories if f"value={quoteattr(c['name'])}" not in have]
    if missing:
        raise ReviewError(f"project {title!r} exists with another labeling config (no label for "
                          f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}): give another --project")
    return project


def _http(client):
    """The SDK's HTTP client (its auth and base URL), for the calls that carry brush regions: the
    SDK's typed models walk every number of every RLE to encode or parse a task."""
    return client._client_wrapper.httpx_client


def _checked(r, doing: str):
    if r.status_code >= 300:
        raise RuntimeError(f"{doing}: {r.status_code} {r.text[:300]}")
    return r


def project_tasks(client, project_id: int, **params) -> Iterator[dict]:
    """The project's tasks as the API gives them (JSON objects), a page of 1000 at a time."""
    page, seen = 1, 0
    while True:
        r = _http(client).request("api/tasks/", method="GET", params={
            "project": project_id, "page": page, "page_size": 1000, "resolve_uri": "false", **params})
        if r.status_code == 404:        # past the last page
            return
        body = _checked(r, f"listing the tasks of project {project_id}").json()
        yield from body["tasks"]
        seen, page = seen + len(body["tasks"]), page + 1
        if not body["tasks"] or seen >= body.get("total", 0):
            return


def project_keys(client, project_id: int) -> dict[str, int]:
    """{data.ciae_key: task id} of the project's tasks."""
    return {t["data"][KEY]: t["id"] for t in project_tasks(client, project_id, include="id,data")
            if KEY in (t.get("data") or {})}


def upload(client, project_id: int, files: list[tuple[str, bytes]]) -> list[str]:
    """Upload images (name, bytes) as file uploads of the project, no tasks made; returns their
    URLs in the order given."""
    # one form field per file: the server reads one file per field name
    parts = {f"file{i}": (name, data, IMAGE_TYPES.get(os.path.splitext(name)[1].lower(), "application/octet-stream"))
             for i, (name, data) in enumerate(files)}
    r = _checked(_http(client).request(f"api/projects/{project_id}/import", method="POST",
                                       params={"commit_to_project": "false"}, files=parts),
                 f"uploading {len(files)} images")
    ids = r.json().get("file_upload_ids") or []
    uploads = client.files.list(project_id, ids=json.dumps(ids))
    by_name: dict[str, str] = {}
    for u in uploads:
        # the API gives the stored name ("upload/<project>/<uuid>-<name>"); the tool serves it
        # under its MEDIA_URL, /data/ (FileUpload.url), as it does for images imported directly
        url = u.file if u.file.startswith(("/", "http://", "https://")) else "/data/" + u.file
        by_name[url.rsplit("/", 1)[-1].split("-", 1)[-1]] = url  # stored as <uuid>-<name>
    missing = [name for name, _ in files if name not in by_name]
    if missing:
        raise RuntimeError(f"uploaded images missing from the project's file uploads: {missing[:3]}")
    return [by_name[name] for name, _ in files]


def import_tasks(client, project_id: int, tasks: list[dict]) -> None:
    """Create tasks (with their predictions) in the project: one request, the JSON encoded here."""
    _checked(_http(client).request(f"api/projects/{project_id}/import", method="POST",
                                   content=json.dumps(tasks).encode(), headers={"Content-Type": "application/json"}),
             f"importing {len(tasks)} tasks")
