"""Bad input to the library and the `freud` command: a named error in one line, never a traceback.

Audio that cannot be read (no permission, a directory), playlists and lists that name other files (refused before
ffmpeg opens anything they name), ffmpeg's time limit, malformed run config files and unknown hooks (checked
before a Dagster run starts), and upload contents that are not clean base64.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from freud_pipeline.audio.decode import load_audio, write_wav
from freud_pipeline.errors import AudioTimeoutError, FreudError, RefusedAudioError, UnreadableAudioError

try:
    from conftest import require_extra
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra

require_extra(shutil.which("ffmpeg") is not None, "the ffmpeg command", module_level=True)

REPO = Path(__file__).resolve().parents[1]
FREUD = [sys.executable, "-c", "import sys; from freud_pipeline.cli import main; sys.exit(main())"]


def tone(seconds: float = 1.0) -> np.ndarray:
    t = np.arange(int(seconds * 16000)) / 16000
    return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


def freud(*args: str, prefix: list[str] = (), env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *FREUD, *args], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, **(env or {})})


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def without_permission_override() -> list[str]:
    """A command prefix under which file permissions apply to this process's children: none for a normal
    user; for root, setpriv dropping every capability (root would otherwise read a mode-000 file)."""
    if os.geteuid() != 0:
        return []
    prefix = ["setpriv", "--inh-caps=-all", "--bounding-set=-all", "--"]
    works = shutil.which("setpriv") is not None and subprocess.run([*prefix, "true"]).returncode == 0
    require_extra(works, "setpriv (util-linux) able to drop root's capabilities")
    return prefix


# ---------------------------------------------------------------- audio that cannot be read


def test_unreadable_audio_is_named_in_one_line(tmp_path):
    locked = write_wav(tmp_path / "locked.wav", tone())
    locked.chmod(0)
    prefix = without_permission_override()
    check = [*prefix, sys.executable, "-c",
             "import sys; from freud_pipeline.audio.decode import load_audio\n"
             "try:\n    load_audio(sys.argv[1])\n"
             "except Exception as exc:\n    print(type(exc).__name__, exc)\n", str(locked)]
    shown = subprocess.run(check, capture_output=True, text=True, cwd=REPO, timeout=120).stdout
    assert shown.startswith("UnreadableAudioError") and "permission denied" in shown, shown
    proc = freud("transcribe", str(locked), prefix=prefix)
    line = one_line(proc.stderr)
    assert proc.returncode == 2
    assert line == f"freud: error: {locked} cannot be read: permission denied."


def test_a_directory_given_as_audio_is_called_a_directory(tmp_path):
    with pytest.raises(UnreadableAudioError, match="is a directory"):
        load_audio(tmp_path)
    proc = freud("transcribe", str(tmp_path))
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(f"freud: error: {tmp_path} is a directory, not an audio file.")


# ---------------------------------------------------------------- inputs that name other files


@pytest.fixture
def playlists(tmp_path) -> dict[str, Path]:
    """A real segment of audio and an HLS playlist and an ffconcat list that point at it (and at a WAV)."""
    segment = tmp_path / "private" / "segment.aac"
    segment.parent.mkdir()
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=1", "-c:a", "aac",
                    str(segment)], check=True)
    write_wav(tmp_path / "private" / "other.wav", tone())
    hls = tmp_path / "list.m3u8"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\n{segment.as_uri()}\n#EXT-X-ENDLIST\n")
    relative = tmp_path / "relative.m3u8"
    relative.write_text("#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:1.0,\nprivate/segment.aac\n#EXT-X-ENDLIST\n")
    concat = tmp_path / "list.ffconcat"
    concat.write_text("ffconcat version 1.0\nfile private/other.wav\n")
    return {"hls": hls, "relative": relative, "concat": concat}


def test_an_hls_playlist_pointing_at_a_local_file_is_refused(playlists):
    for path in (playlists["hls"], playlists["relative"]):
        with pytest.raises(RefusedAudioError, match=r"is an HLS playlist \(\.m3u8\), which names other files"):
            load_audio(path)
        with pytest.raises(RefusedAudioError, match="bytes of input is an HLS playlist"):
            load_audio(path.read_bytes(), max_seconds=60.0)  # as the app decodes an upload


def test_a_concat_list_is_refused(playlists):
    with pytest.raises(RefusedAudioError, match="concat/ffconcat list"):
        load_audio(playlists["concat"])
    with pytest.raises(RefusedAudioError, match="concat/ffconcat list"):
        load_audio(playlists["concat"].read_bytes())
    with pytest.raises(RefusedAudioError):
        load_audio(write_wav(playlists["concat"].parent / "a.wav", tone()), fmt="hls")  # not even when asked for


def test_the_cli_refuses_a_playlist_in_one_line(playlists):
    proc = freud("transcribe", str(playlists["hls"]))
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(f"freud: error: {playlists['hls']} is an HLS playlist")


# ---------------------------------------------------------------- ffmpeg's time limit


def test_ffmpeg_runs_have_a_time_limit(tmp_path, monkeypatch):
    flac = tmp_path / "tone.flac"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "sine=duration=2", str(flac)], check=True)
    with pytest.raises(AudioTimeoutError, match=r"tone\.flac: ffprobe did not finish within 0\.001 s"):
        load_audio(flac, timeout_s=0.001)
    monkeypatch.setenv("FREUD_FFMPEG_TIMEOUT_S", "0.001")
    with pytest.raises(AudioTimeoutError, match="FREUD_FFMPEG_TIMEOUT_S"):
        load_audio(flac.read_bytes())
    monkeypatch.setenv("FREUD_FFMPEG_TIMEOUT_S", "soon")
    with pytest.raises(FreudError, match="FREUD_FFMPEG_TIMEOUT_S must be a positive number of seconds, not 'soon'"):
        load_audio(flac)
    monkeypatch.setenv("FREUD_FFMPEG_TIMEOUT_S", "60")
    assert len(load_audio(flac)) == 2 * 16000


# ---------------------------------------------------------------- `freud collect --config`


def test_collect_with_malformed_yaml_is_one_line(tmp_path):
    config = tmp_path / "broken.yaml"
    config.write_text("asset: activations\nconfig: {model: tiny.en\n  hooks: [encoder.blocks.2\n")
    proc = freud("collect", "--config", str(config), env={"FREUD_DATA_DIR": str(tmp_path / "data")})
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"freud: error: {config}: not valid YAML: ") and "at line 3, column" in line, line
    not_a_mapping = tmp_path / "list.yaml"
    not_a_mapping.write_text("- activations\n")
    proc = freud("collect", "--config", str(not_a_mapping))
    assert proc.returncode == 2 and "is a mapping" in one_line(proc.stderr)


def test_collect_with_an_unknown_hook_stops_before_the_run(tmp_path, monkeypatch, capsys):
    from freud_pipeline.cli import main

    data = tmp_path / "data"
    monkeypatch.setenv("FREUD_DATA_DIR", str(data))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    config = tmp_path / "bad_hook.yaml"
    config.write_text("asset: activations\npartition: train\n"
                      "config:\n  model: tiny.en\n  hooks: [encoder.blocks.2, encoder.blocks.9]\n")
    assert main(["collect", "--config", str(config)]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"freud: error: {config}: unknown hook point(s) 'encoder.blocks.9' for a 4-block "
                           f"encoder. Valid: encoder.blocks.0, "), line
    assert not data.exists() or not any(data.iterdir()), "nothing may be created before the run would start"
    # a single hook (SAE / neuron index configs) is checked for its form
    config.write_text("asset: topk_sae\nconfig:\n  hook: encoder.block.2\n")
    assert main(["collect", "--config", str(config)]) == 2
    assert "unknown hook point(s) 'encoder.block.2'" in one_line(capsys.readouterr().err)


# ---------------------------------------------------------------- upload contents (what the app decodes)


def test_upload_contents_must_be_clean_base64(tmp_path):
    from dash_app.data import decode_upload

    wav = write_wav(tmp_path / "a.wav", tone(0.2)).read_bytes()
    clean = base64.b64encode(wav).decode()
    assert decode_upload(f"data:audio/wav;base64,{clean}") == wav
    for bad in ("data:audio/wav;base64,@@@@!!",  # once decoded to nothing: "empty file"
                f"data:audio/wav;base64,{clean[:40]}!*{clean[40:]}",  # junk once silently dropped
                f"data:audio/wav,{clean}", 5, [1, 2], {"contents": clean}, None):
        with pytest.raises(ValueError):
            decode_upload(bad)
