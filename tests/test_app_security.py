"""The app's HTTP surface, through Flask's test client of the real Dash app: security headers, the Host
allow-list, 4xx (never 500) for malformed requests, and messages on the page for bad upload-page input.

Callbacks are driven as the browser drives them: the signed end id from the page's config, a POST to
/_dash-update-component, then polls of the background job until its response comes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import shutil
import subprocess
import time

import pytest

from freud_pipeline.audio.decode import write_wav

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra


@pytest.fixture
def app(tmp_path, monkeypatch):
    from dash_app import create_app

    monkeypatch.setenv("FREUD_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("FREUD_APP_ALLOWED_HOSTS", raising=False)
    app = create_app(data_dir=tmp_path)
    yield app
    app.freud_background.shutdown(wait=True)


class Page:
    """One page load: its end id signs the background callbacks' handles, as in the browser."""

    def __init__(self, app):
        self.app, self.client = app, app.server.test_client()
        page = self.client.get("/upload").get_data(as_text=True)
        config = re.search(r'<script id="_dash-config" type="application/json">(.*?)</script>', page, re.S)
        self.end_id = json.loads(config.group(1))["end_id"]

    def upload_callback(self, changed: str, **values) -> dict:
        """Run the upload page's `analyse` with these input values; returns {component id: {prop: value}}."""
        output = next(k for k in self.app.callback_map if "upload-error.children" in k and "upload-topn-error" in k)
        callback = self.app.callback_map[output]
        defaults = {"upload-audio.contents": None, "record-data.data": None, "upload-clip.data": None,
                    "upload-set.value": "some-set", "upload-topn.value": "20", "upload-audio.filename": "clip.wav",
                    "upload-source.data": None}
        defaults.update({k.replace("__", "-").replace("_", "."): v for k, v in values.items()})

        def entries(key):
            return [{**item, "value": defaults[f"{item['id']}.{item['property']}"]} for item in callback[key]]

        body = {"output": output, "inputs": entries("inputs"), "state": entries("state"),
                "outputs": [dict(zip(("id", "property"), o.split(".", 1))) for o in output.strip(".").split("...")],
                "changedPropIds": [changed]}
        url = f"/_dash-update-component?endId={self.end_id}"
        started = self.client.post(url, json=body)
        assert started.status_code == 200, started.get_data(as_text=True)
        handles = started.get_json()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            poll = self.client.post(f"{url}&cacheKey={handles['cacheKey']}&job={handles['job']}", json=body)
            assert poll.status_code == 200, poll.get_data(as_text=True)[:500]
            if "response" in poll.get_json():
                return poll.get_json()["response"]
            time.sleep(0.05)
        raise AssertionError("the upload callback gave no response")


def data_url(data: bytes, mime: str = "audio/wav") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


# ---------------------------------------------------------------- the upload page's input


@pytest.mark.parametrize("typed", ["inf", "1e400", "nan", "-3", "0", "2.5", "201", "lots"])
def test_top_features_that_are_not_a_whole_number_in_range_get_a_message(app, typed):
    response = Page(app).upload_callback("upload-topn.value", upload__topn_value=typed,
                                         upload__audio_contents=data_url(b"RIFF"))
    assert response["upload-topn-error"]["children"] == \
        f"Top features must be a whole number from 1 to 200, not {typed!r}."


@pytest.mark.parametrize("contents", [5, [1, 2], {"data": "AAAA"}, "data:audio/wav;base64,@@@@!!",
                                      "data:audio/wav;base64,UklG!!!RiQAAABXQVZF"])
def test_upload_contents_that_are_not_base64_file_data_get_a_message(app, contents):
    response = Page(app).upload_callback("upload-audio.contents", upload__audio_contents=contents)
    assert response["upload-error"]["children"] == "clip.wav could not be read (not base64 file data)."


def test_other_inputs_of_the_wrong_json_type_are_ignored(app):
    response = Page(app).upload_callback("record-data.data", record__data_data=[1, 2], upload__clip_data=7,
                                         upload__audio_filename={"x": 1})
    assert response["upload-error"]["children"] == "" and response["upload-topn-error"]["children"] == ""


def test_an_uploaded_hls_playlist_naming_a_local_file_is_refused_on_the_page(app, tmp_path):
    require_extra(shutil.which("ffmpeg") is not None, "the ffmpeg command")
    segment = tmp_path / "secret.aac"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
                    str(segment)], check=True)
    write_wav(tmp_path / "secret.wav", [0.0] * 1600)
    for name, text in (("list.m3u8", f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{segment.as_uri()}\n"
                                     f"#EXT-X-ENDLIST\n"),
                       ("list.ffconcat", f"ffconcat version 1.0\nfile {tmp_path / 'secret.wav'}\n")):
        response = Page(app).upload_callback("upload-audio.contents", upload__audio_filename=name,
                                             upload__audio_contents=data_url(text.encode(), "audio/x-mpegurl"))
        message = response["upload-error"]["children"]
        assert message.startswith(f"{name} is an HLS playlist (.m3u8), which names other files or URLs; such "
                                  f"input is refused." if name.endswith("m3u8") else
                                  f"{name} is a concat/ffconcat list, which names other files or URLs"), message
        assert response["upload-result"]["style"] == {"display": "none"}


# ---------------------------------------------------------------- malformed requests


@pytest.mark.parametrize("body", [b"garbage", b"{}", b"[]", b'{"output": 5}',
                                  b'{"output": "nope.children", "outputs": {}, "inputs": [], "changedPropIds": []}'])
def test_malformed_callback_requests_are_400(app, body):
    response = app.server.test_client().post("/_dash-update-component", data=body, content_type="application/json")
    assert response.status_code == 400 and "Malformed callback request" in response.get_data(as_text=True)


def test_a_callback_request_with_the_wrong_inputs_is_400(app):
    output = next(k for k in app.callback_map if "upload-error.children" in k and "upload-topn-error" in k)
    body = {"output": output, "outputs": [], "inputs": [{"id": "upload-audio", "property": "contents"}],
            "changedPropIds": []}
    response = app.server.test_client().post("/_dash-update-component", json=body)
    assert response.status_code == 400 and "'inputs' does not match" in response.get_data(as_text=True)


@pytest.mark.parametrize("path", ["/_dash-component-suites/../../app.py", "/_dash-component-suites/dash/../../x.py",
                                  "/_dash-component-suites/dash/nothing.js", "/_dash-component-suites/nopkg/x.js"])
def test_component_files_outside_the_registered_ones_are_404(app, path):
    assert app.server.test_client().get(path).status_code == 404


# ---------------------------------------------------------------- headers and hosts


def test_every_response_carries_the_security_headers(app):
    client = app.server.test_client()
    page = client.get("/search")
    html = page.get_data(as_text=True)
    policy = dict(part.strip().split(" ", 1) for part in page.headers["Content-Security-Policy"].split(";"))
    assert policy["default-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert policy["object-src"] == "'none'" and "'unsafe-eval'" not in policy["script-src"]
    inline = re.findall(r"<script(?![^>]*\bsrc=)[^>]*>(.*?)</script>", html, re.S)
    assert len(inline) >= 2  # Dash's renderer start-up and the clientside callbacks
    for script in inline:  # each inline script is allowed by its hash, and nothing else inline is
        digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy["script-src"].split()
    assert "'unsafe-inline'" not in policy["script-src"]
    for response in (page, client.get("/_dash-layout"), client.get("/audio/nothing"), client.get("/nowhere")):
        assert response.headers["X-Frame-Options"] == "DENY"
        assert response.headers["X-Content-Type-Options"] == "nosniff"
        assert response.headers["Referrer-Policy"] == "same-origin"
        assert "Content-Security-Policy" in response.headers


@pytest.mark.parametrize("host, status", [("localhost:8050", 200), ("127.0.0.1:8050", 200), ("[::1]:8050", 200),
                                          ("LOCALHOST.", 200), ("192.168.1.20:8050", 200),
                                          ("evil.example", 400), ("evil.example:8050", 400),
                                          ("localhost.evil.example", 400)])
def test_only_allowed_hosts_are_answered(app, host, status):
    response = app.server.test_client().get("/search", headers={"Host": host})
    assert response.status_code == status
    if status == 400:
        assert "is not allowed here; add it with --allowed-hosts or FREUD_APP_ALLOWED_HOSTS" in \
            response.get_data(as_text=True)


def test_allowed_hosts_follow_the_bound_host_the_flag_and_the_environment(tmp_path, monkeypatch):
    from dash_app import create_app
    from dash_app.security import allowed_hosts_for

    monkeypatch.setenv("FREUD_APP_ALLOWED_HOSTS", "freud.example, Other.Example")
    assert {"127.0.0.1", "localhost", "::1", "freud.example", "other.example"} <= set(allowed_hosts_for())
    bound = allowed_hosts_for("box.lan", "proxy.example")
    assert "box.lan" in bound and "proxy.example" in bound and "freud.example" not in bound
    app = create_app(data_dir=tmp_path, allowed_hosts=bound)
    client = app.server.test_client()
    assert client.get("/search", headers={"Host": "box.lan:8050"}).status_code == 200
    assert client.get("/search", headers={"Host": "freud.example"}).status_code == 400
    anyone = create_app(data_dir=tmp_path, allowed_hosts=allowed_hosts_for(None, "*"))
    assert anyone.server.test_client().get("/search", headers={"Host": "evil.example"}).status_code == 200


def test_main_allows_the_host_it_binds(monkeypatch):
    import dash_app

    served = {}
    monkeypatch.setattr(dash_app, "serve_with_gunicorn", lambda make, **kw: served.update(kw, app=make()))
    monkeypatch.setattr(dash_app, "tune_gc", lambda: None)
    monkeypatch.delenv("FREUD_APP_ALLOWED_HOSTS", raising=False)
    assert dash_app.main(["--host", "box.lan", "--allowed-hosts", "proxy.example"]) == 0
    client = served["app"].test_client()
    for host, status in (("box.lan", 200), ("proxy.example", 200), ("localhost", 200), ("evil.example", 400)):
        assert client.get("/search", headers={"Host": host}).status_code == status
