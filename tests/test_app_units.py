"""Fast checks of the Dash app's pure parts: URL state, validation, figures, routes without an index."""

from __future__ import annotations

import numpy as np
import pytest

from dash_app.data import SearchState, default_set, set_label, validate_search, wav_bytes
from dash_app.figures import (
    LINE,
    PEAK,
    SHADING,
    clip_figure,
    histogram_figure,
    shading_colorscale,
    spectrogram_image,
    top_features_figure,
)

SETS = [
    {"set_id": "n1", "model": "tiny.en", "hook": "encoder.blocks.2.mlp.1", "kind": "neuron", "n_features": 1536,
     "sae_run_id": None, "created_at": "2026-01-01"},
    {"set_id": "s1", "model": "tiny.en", "hook": "encoder.blocks.2", "kind": "sae", "n_features": 6144,
     "sae_run_id": "abcdef123456", "created_at": "2026-01-02"},
]


def test_search_state_round_trips_through_the_url():
    state = SearchState(set_id="tiny.en/x y", index="12", n="5", min="-0.5", max="3", absolute=True)
    assert SearchState.from_search(SearchState(negative=True).to_search()).negative
    again = SearchState.from_search(state.to_search())
    assert again == state
    assert SearchState.from_search("") == SearchState()
    assert SearchState.from_search("?abs=0&index=&min=").absolute is False


def test_validation_messages_name_the_accepted_range():
    ok = validate_search(SearchState(set_id="n1", index="1535", n="20"), SETS)
    assert not ok.errors and ok.index == 1535 and ok.set_info["set_id"] == "n1"
    bad = validate_search(SearchState(set_id="n1", index="1536"), SETS)
    assert "0 to 1535" in bad.errors["index"]
    assert "whole number" in validate_search(SearchState(set_id="n1", index="1.5"), SETS).errors["index"]
    assert "1 to 200" in validate_search(SearchState(n="0"), SETS).errors["n"]
    assert "above" in validate_search(SearchState(min="2", max="1"), SETS).errors["min"]
    assert "number" in validate_search(SearchState(max="nan"), SETS).errors["max"]
    assert "Unknown feature set" in validate_search(SearchState(set_id="zzz"), SETS).errors["set"]
    assert "Choose one" in validate_search(SearchState(absolute=True, negative=True), SETS).errors["abs"]
    assert "never negative" in validate_search(SearchState(set_id="s1", negative=True), SETS).errors["abs"]


def test_default_set_prefers_the_newest_sae_and_labels_say_what_it_is():
    assert default_set(SETS)["set_id"] == "s1"
    assert default_set(SETS[:1])["set_id"] == "n1"
    assert default_set([]) is None
    assert "SAE, 6144 latents, run abcdef12" in set_label(SETS[1])
    # the architecture, where the set id names it (as every set the pipeline builds does)
    assert "SAE jumprelu, 16 latents" in set_label({"kind": "sae", "n_features": 16,
                                                    "set_id": "tiny.en/encoder.blocks.2/sae-jumprelu-0123abcd"})
    assert "neurons, 1536" in set_label(SETS[0])


def test_clip_figure_layers_and_shading():
    mel = np.random.default_rng(0).standard_normal((80, 150)).astype(np.float32)
    trace = np.sin(np.linspace(0, 6, 75)) * 3
    fig = clip_figure(mel, trace, peak_time_s=0.5, peak_value=3.0)
    # the log-mel is a layout image, never an image trace (figures.SHADING: an image trace's draw can hang
    # dcc.Graph's updates); embedded top-down (highest mel bin first) and stretched over the axes
    assert [t.type for t in fig.data] == ["heatmap", "scatter", "scatter"]
    assert [t.name for t in fig.data] == ["shading", "activation", "peak"]
    assert (SHADING, LINE, PEAK) == (0, 1, 2)
    image = fig.layout.images[0]
    assert image.source == spectrogram_image(mel).uri_top_down and image.layer == "below"
    assert (image.x, image.y, image.sizex, image.sizey) == (0, 79.5, pytest.approx(1.5), 80)
    assert fig.layout.xaxis.range == (0, 1.5) and fig.layout.shapes[0].name == "playhead"
    # the shading row: one cell per 20 ms frame over all mel bins, coloured by the trace (red < 0 < green)
    shading = fig.data[SHADING]
    assert shading.type == "heatmap" and len(shading.z[0]) == 75 and shading.dy == 80 and shading.y0 == 39.5
    assert shading.zmin == -shading.zmax == pytest.approx(-3.0, rel=1e-3)
    assert fig.data[LINE].x0 == pytest.approx(0.01) and fig.data[LINE].dx == pytest.approx(0.02)
    # a figure for a clip with a URL links the image instead of embedding it
    linked = clip_figure(mel, trace, image_url="/spectrogram/a.png?v=1")
    assert linked.layout.images[0].source == "/spectrogram/a.png?v=1" and len(linked.data) == 3
    scale = shading_colorscale()
    assert scale[0][1].startswith("rgba(235,40,40") and scale[1][1] == "rgba(0,0,0,0)"
    assert scale[2][1].startswith("rgba(0,200,70")
    # a shared scale keeps a weak clip faint
    weak = clip_figure(mel, [0.01, 0.02], shade_scale=10.0)
    assert weak.data[SHADING].zmax == 10.0
    long_mel = np.zeros((80, 3000), np.float32)  # 30 s clip: pooled for display
    spec = spectrogram_image(long_mel)
    assert spec.columns <= 1200 and spec.duration_s == pytest.approx(30.0)
    assert clip_figure(long_mel, np.zeros(1500)).layout.xaxis.range == (0, 30.0)


def test_spectrogram_image_is_the_log_mel_loud_dark_low_bins_first():
    import base64
    import io

    from PIL import Image

    mel = np.zeros((80, 100), np.float32)
    mel[3, :] = 2.0  # one loud low band
    spec = spectrogram_image(mel)
    pixels = np.asarray(Image.open(io.BytesIO(base64.b64decode(spec.uri.split(",", 1)[1]))).convert("L"))
    assert pixels.shape == (80, 100) and pixels.dtype == np.uint8
    assert (pixels[3] == 0).all() and (pixels[np.arange(80) != 3] == 255).all()


def test_histogram_and_bars():
    hist = histogram_figure({"bin_edges": [0, 1, 2, 3], "counts": [5, 0, 1]}, index=3, min_value=0.5)
    assert hist["layout"]["yaxis"]["type"] == "log" and len(hist["data"][0]["x"]) == 3
    assert hist["data"][0]["y"][1] is None  # empty bins are gaps on the log axis
    assert hist["layout"]["shapes"][0]["x0"] == 0.5 and hist["layout"]["annotations"][0]["text"] == "min"
    bars = top_features_figure([{"index": 7, "value": 2.0, "peak_time_s": 0.1, "label": "sh"},
                                {"index": 2, "value": 1.0}], selected=7)
    assert list(bars.data[0].x) == ["7", "2"]


def test_wav_bytes_is_a_16_bit_wav():
    data = wav_bytes(np.zeros(1600, np.float32))
    assert data[:4] == b"RIFF" and len(data) == 44 + 3200


def test_app_without_an_index_starts_and_serves_404_audio(tmp_path, monkeypatch):
    from dash_app import create_app

    monkeypatch.setenv("FREUD_DATA_DIR", str(tmp_path))
    app = create_app(data_dir=tmp_path)
    client = app.server.test_client()
    assert client.get("/search?index=3").status_code == 200
    assert client.get("/audio/anything").status_code == 404
    from dash_app.pages import search

    summary, results, errors = search.render(app.freud_access, "?index=3")
    assert "make demo" in str(summary) and results is None and errors == {}


def test_a_fresh_worker_serves_every_script_to_concurrent_first_requests(tmp_path, monkeypatch):
    """A gunicorn worker whose first requests are a page's script fetches at once (the page came from the other
    worker) serves them all: Dash's lazy per-process setup used to let all but one of them through before the
    scripts were registered, and they were answered 404 (seen as a blank page under the cluster test)."""
    import re
    import threading

    from dash_app import create_app

    monkeypatch.setenv("FREUD_DATA_DIR", str(tmp_path))
    page = create_app(data_dir=tmp_path).server.test_client().get("/", headers={"Host": "127.0.0.1"})
    scripts = sorted(set(re.findall(r'"(/_dash-component-suites/[^"?]+)', page.get_data(as_text=True))))
    assert len(scripts) >= 5
    for _ in range(3):
        worker = create_app(data_dir=tmp_path)  # another process's app: nothing served yet
        start = threading.Barrier(len(scripts))
        codes: dict[str, int] = {}

        def fetch(url, server=worker.server):
            client = server.test_client()
            start.wait()
            codes[url] = client.get(url, headers={"Host": "127.0.0.1"}).status_code

        threads = [threading.Thread(target=fetch, args=(url,)) for url in scripts]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert codes == {url: 200 for url in scripts}


def test_wsgi_module_exposes_a_server(monkeypatch, tmp_path):
    import importlib
    import sys

    monkeypatch.setenv("FREUD_DATA_DIR", str(tmp_path))
    sys.modules.pop("dash_app.wsgi", None)
    wsgi = importlib.import_module("dash_app.wsgi")
    assert callable(wsgi.server)


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "70000"]])
def test_main_rejects_bad_ports(argv):
    import dash_app

    with pytest.raises(SystemExit):
        dash_app.main(argv)


def test_clip_spectrograms_are_cached_on_disk_per_audio_file(tmp_path):
    """A second app process (another gunicorn worker, a restart) reads the image instead of decoding again."""
    from dash_app.data import IndexAccess
    from freud_pipeline.audio.decode import write_wav

    audio = (0.1 * np.sin(np.linspace(0, 800, 16000))).astype(np.float32)
    write_wav(tmp_path / "a.wav", audio)

    class Index:  # the one call IndexAccess makes for a clip: its manifest row
        def clip(self, clip_id):
            if clip_id != "a":
                raise KeyError(clip_id)
            return {"clip_id": "a", "path": "a.wav"}

    first = IndexAccess(Index(), tmp_path).clip_spectrogram("a")
    files = list((tmp_path / "cache" / "spectrograms").glob("*.json"))
    assert len(files) == 1 and first.columns == 100 and first.duration_s == pytest.approx(1.0)
    second = IndexAccess(Index(), tmp_path)
    second.clip_audio = None  # a fresh access must not decode the clip again
    assert second.clip_spectrogram("a") == first
    write_wav(tmp_path / "a.wav", audio[:8000])  # the file changed: a new image
    assert IndexAccess(Index(), tmp_path).clip_spectrogram("a").duration_s == pytest.approx(0.5)
    with pytest.raises(KeyError):
        IndexAccess(Index(), tmp_path).clip_spectrogram("b")


def test_uploads_are_shared_by_worker_processes_of_one_data_dir(tmp_path):
    """The upload page hands a clip to the edit page by token, and the next request may reach another gunicorn
    worker: each worker has its own IndexAccess, so the store lives in the data directory."""
    from dash_app.data import IndexAccess

    audio = np.sin(np.linspace(0, 2000, 16000)).astype(np.float32)
    first, second = IndexAccess(data_dir=tmp_path), IndexAccess(data_dir=tmp_path)
    token = first.uploads.put(audio)
    got = second.uploads.get(token)
    assert got is not None and got.dtype == np.float32 and np.array_equal(got, audio)
    assert (tmp_path / "cache" / "uploads").is_dir()
    assert second.uploads.get("0" * 32) is None and second.uploads.get("../../etc") is None
    other = IndexAccess(data_dir=tmp_path / "elsewhere")
    assert other.uploads.get(token) is None


def test_spectrogram_png_is_served_top_down():
    """Clip figures draw the spectrogram as a layout image (row 0 at the top): the served PNG is flipped."""
    import base64
    import io

    from PIL import Image

    mel = np.zeros((80, 50), np.float32)
    mel[:10] = 5.0  # loud low bins: dark at the bottom of the picture
    spec = spectrogram_image(mel)
    picture = np.asarray(Image.open(io.BytesIO(spec.png_top_down)))
    assert picture.shape == (80, 50)
    assert picture[-1].mean() < picture[0].mean()  # dark (loud) row last, i.e. at the bottom
    # figures of clips without a URL (uploads, edits) embed the same picture
    assert base64.b64decode(spec.uri_top_down.removeprefix("data:image/png;base64,")) == spec.png_top_down
    assert len(spec.version) == 12 and spec.version == spectrogram_image(mel).version


def test_page_links_and_upload_decoding_shared_by_the_pages():
    import base64
    import io
    import wave

    from dash_app.data import decode_upload, edit_href, wav_data_uri

    assert (edit_href("asterisk/vm intro", "tiny.en:sae", "12:0")
            == "/edit?clip=asterisk%2Fvm%20intro&set=tiny.en%3Asae&features=12%3A0")
    assert edit_href(upload="tok", set_id="s") == "/edit?upload=tok&set=s" and edit_href() == "/edit"
    assert decode_upload("data:audio/wav;base64," + base64.b64encode(b"RIFF1234").decode()) == b"RIFF1234"
    with pytest.raises(ValueError):
        decode_upload("data:text/plain,hello")
    uri = wav_data_uri(np.zeros(1600, np.float32))
    assert uri.startswith("data:audio/wav;base64,")
    with wave.open(io.BytesIO(decode_upload(uri))) as wav:
        assert (wav.getframerate(), wav.getnframes()) == (16000, 1600)
