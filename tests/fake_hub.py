"""A stand-in for the Hugging Face Hub's HTTP API, plugged in as huggingface_hub's transport.

``huggingface_hub.set_client_factory`` is its public way to choose the HTTP client; the client
here gets an ``httpx`` mock transport, so ``HfApi.create_repo``/``create_branch``/``create_commit``
and ``hf_hub_download`` run all their own code (preupload, NDJSON commit payload, download
headers) and nothing leaves the process. The fake records what each call sent.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re

import huggingface_hub
import yaml
from huggingface_hub.utils import _http

# the HTTP library huggingface_hub (>= 1.0) sends requests with: httpx, or its fork httpx2 in 2.x
httpx = getattr(_http, "httpx2", None) or _http.httpx

COMMIT_SHA = "c" * 40


class FakeHub:
    def __init__(self):
        self.created_repos: list[dict] = []  # JSON bodies of /api/repos/create
        self.branches: list[tuple[str, str]] = []  # (repo_id, branch)
        self.commits: list[dict] = []  # {"repo_id", "revision", "create_pr", "header", "files": {path: bytes}}
        self.remote_files: dict[tuple[str, str], bytes] = {}  # (repo_id, path) -> bytes, served by downloads
        self.authorizations: set[str] = set()
        self.validated_metadata: list[dict] = []  # README front matter the commit validated

    def handle(self, request) -> httpx.Response:
        url = request.url
        path = url.path
        if "authorization" in request.headers:
            self.authorizations.add(request.headers["authorization"])
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            self.created_repos.append(body)
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            return httpx.Response(200, json={"url": f"{url.scheme}://{url.host}/{repo_id}"})
        if request.method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(json.loads(request.content)["content"])
        if m := re.fullmatch(r"/api/models/(.+?/.+?)/branch/(.+)", path):
            self.branches.append((m.group(1), m.group(2)))
            return httpx.Response(200, json={})
        if m := re.fullmatch(r"/api/models/(.+?/.+?)/preupload/(.+)", path):
            files = json.loads(request.content)["files"]
            return httpx.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        if m := re.fullmatch(r"/api/models/(.+?/.+?)/commit/(.+)", path):
            return self._commit(m.group(1), m.group(2), request)
        if m := re.fullmatch(r"/(.+?/.+?)/resolve/(.+?)/(.+)", path):
            return self._download(m.group(1), m.group(3), request)
        raise AssertionError(f"the fake Hub has no route for {request.method} {url}")

    def _validate_yaml(self, content: str) -> httpx.Response:
        """The Hub checks a README's front matter before a commit; here: it must be a YAML mapping."""
        match = re.match(r"---\n(.*?)\n---\n", content, re.S)
        try:
            metadata = yaml.safe_load(match.group(1)) if match else None
        except yaml.YAMLError as exc:
            return httpx.Response(400, json={"errors": [{"message": str(exc)}]})
        if not isinstance(metadata, dict):
            return httpx.Response(400, json={"errors": [{"message": "no YAML metadata mapping"}]})
        self.validated_metadata.append(metadata)
        return httpx.Response(200, json={})

    def _commit(self, repo_id: str, revision: str, request) -> httpx.Response:
        header, files = None, {}
        for line in request.read().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                header = item["value"]
            elif item["key"] == "file":
                assert item["value"]["encoding"] == "base64"
                files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:
                raise AssertionError(f"unexpected commit operation {item['key']}")
        from urllib.parse import unquote

        self.commits.append({"repo_id": repo_id, "revision": unquote(revision), "header": header, "files": files,
                             "create_pr": request.url.params.get("create_pr")})
        reply = {"commitOid": COMMIT_SHA, "commitUrl": f"https://huggingface.co/{repo_id}/commit/{COMMIT_SHA}"}
        if request.url.params.get("create_pr"):
            reply["pullRequestUrl"] = f"https://huggingface.co/{repo_id}/discussions/1"
        return httpx.Response(200, json=reply)

    def _download(self, repo_id: str, filename: str, request) -> httpx.Response:
        data = self.remote_files.get((repo_id, filename))
        if data is None:
            return httpx.Response(404, headers={"X-Error-Code": "EntryNotFound"}, json={"error": "not found"})
        headers = {"X-Repo-Commit": COMMIT_SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                   "Content-Length": str(len(data))}
        return httpx.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)


def install(monkeypatch, cache_dir) -> FakeHub:
    """Route huggingface_hub through a new FakeHub; downloads go to ``cache_dir``. Undo with :func:`uninstall`."""
    fake = FakeHub()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # requests reach the fake only
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache_dir))
    huggingface_hub.set_client_factory(lambda: httpx.Client(transport=httpx.MockTransport(fake.handle)))
    return fake


def uninstall() -> None:
    huggingface_hub.set_client_factory(_http.default_client_factory)
