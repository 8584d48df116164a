"""Dataset builders on real audio: Festival speech, Asterisk prompts, and tiny trees laid out like the public
corpora (LibriSpeech, ESC-50, AudioSet) made with ffmpeg; downloads against closed ports and a local server."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import subprocess
import tarfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from freud_pipeline.audio.datasets import (
    ALIGNMENT_SCHEMA,
    MANIFEST_SCHEMA,
    assign_split,
    audioset,
    build_asterisk_prompts,
    build_audio_folder,
    build_audioset,
    build_esc50,
    build_festival_speech,
    build_librispeech,
    combine,
    download_audioset,
    download_esc50,
    download_librispeech,
    esc50,
    librispeech,
    load_alignments,
    load_manifest,
    write_manifest,
)
from freud_pipeline.audio.datasets import _download
from freud_pipeline.audio.datasets.festival import load_sentences, select_sentences
from freud_pipeline.audio.decode import SAMPLE_RATE, load_audio
from freud_pipeline.audio.phones import ARPABET
from freud_pipeline.errors import DatasetUnavailableError

try:
    from conftest import require_extra, requires
except ImportError:  # tests collected as a package
    from tests.conftest import require_extra, requires

HAVE_FESTIVAL = shutil.which("festival") is not None
FESTIVAL = "Debian festival + festvox-us-slt-hts"
needs_asterisk = requires(Path("/usr/share/asterisk/sounds/en_US_f_Allison").is_dir(),
                          "Debian asterisk-core-sounds-en(-g722)")
CLOSED_PORT = "http://127.0.0.1:9/"  # discard port: nothing listens, the connection is refused at once


def tone(path: Path, seconds: float, rate: int, channels: int = 1, freq: int = 440) -> Path:
    """A 16-bit sine tone file (format from the suffix), made with ffmpeg's lavfi sine source."""
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i",
                    f"sine=frequency={freq}:sample_rate={rate}:duration={seconds}", "-af", "volume=0.3",
                    "-ac", str(channels), "-sample_fmt", "s16", str(path)], check=True)
    return path


def check_manifest_schema(path: Path) -> pd.DataFrame:
    schema = pq.read_schema(path)
    assert schema.names[: len(MANIFEST_SCHEMA)] == MANIFEST_SCHEMA.names
    assert [schema.field(n).type for n in MANIFEST_SCHEMA.names] == MANIFEST_SCHEMA.types
    return load_manifest(path)


@pytest.fixture(scope="module")
def festival_build(tmp_path_factory):
    require_extra(HAVE_FESTIVAL, FESTIVAL)
    root = tmp_path_factory.mktemp("data")
    return root, build_festival_speech(root / "datasets" / "festival", n_sentences=3, seed=1, data_root=root)


def test_festival_speech_has_exact_phone_timings(festival_build):
    root, build = festival_build
    manifest = check_manifest_schema(build.manifest_path)
    assert build.n_clips == 3 == len(manifest) and set(manifest.source) == {"festival_speech"}
    assert set(manifest.speaker) == {"slt"} and set(manifest.sample_rate) == {SAMPLE_RATE}
    alignments = load_alignments(build.alignments_path)
    assert pq.read_schema(build.alignments_path).names == ALIGNMENT_SCHEMA.names
    for clip in manifest.itertuples():
        audio = load_audio(root / clip.path)
        assert len(audio) / SAMPLE_RATE == pytest.approx(clip.duration_s, abs=1e-3)
        phones = alignments[(alignments.clip_id == clip.clip_id) & (alignments.tier == "phone")]
        words = alignments[(alignments.clip_id == clip.clip_id) & (alignments.tier == "word")]
        assert set(phones.label) <= ARPABET
        assert " ".join(words.label) == clip.transcript
        # Festival ends every utterance with a short pause; the last phone ends just before the clip does.
        assert clip.duration_s - 0.5 < phones.end_s.max() <= clip.duration_s + 0.01
        assert (phones.end_s > phones.start_s).all()


def test_festival_selection_is_deterministic():
    sentences = load_sentences()
    assert len(sentences) >= 100
    assert select_sentences(5, 7, sentences) == select_sentences(5, 7, sentences)
    assert select_sentences(5, 7, sentences) != select_sentences(5, 8, sentences)
    with pytest.raises(ValueError):
        select_sentences(len(sentences) + 1, 0, sentences)


@needs_asterisk
def test_asterisk_prompts_are_real_aligned_speech(tmp_path):
    out = tmp_path / "datasets" / "asterisk"
    build = build_asterisk_prompts(out, limit=8, data_root=tmp_path)
    manifest = check_manifest_schema(build.manifest_path)
    assert build.n_clips == 8 and set(manifest.speaker) == {"allison"} and set(manifest.source) == {"asterisk_prompts"}
    assert all(not Path(p).is_absolute() and (tmp_path / p).exists() for p in manifest.path)
    assert "please enter your password followed by the pound key" in set(manifest.transcript)
    reasons = {reason.split(":")[0] for _, reason in build.skipped}
    assert {"silence", "non-speech"} <= reasons  # found in the whole set even with a limit
    alignments = load_alignments(build.alignments_path)
    assert set(alignments.clip_id) | {c for c, _ in build.unaligned} == set(manifest.clip_id)
    assert len(build.unaligned) <= 1
    assert set(alignments[alignments.tier == "phone"].label) <= ARPABET
    # Idempotent: a second run converts nothing and reuses the alignments.
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "audio").iterdir()}
    again = build_asterisk_prompts(out, limit=8, data_root=tmp_path)
    assert {p: p.stat().st_mtime_ns for p in (out / "audio").iterdir()} == mtimes
    pd.testing.assert_frame_equal(load_manifest(again.manifest_path), manifest)
    pd.testing.assert_frame_equal(load_alignments(again.alignments_path).sort_values(["clip_id", "tier", "start_s"]).reset_index(drop=True),
                                  alignments.sort_values(["clip_id", "tier", "start_s"]).reset_index(drop=True))


def test_split_assignment_is_stable_and_about_80_10_10():
    ids = [f"clip-{i}" for i in range(10_000)]
    counts = pd.Series([assign_split(i) for i in ids]).value_counts(normalize=True)
    assert counts["train"] == pytest.approx(0.8, abs=0.02)
    assert counts["dev"] == pytest.approx(0.1, abs=0.02) and counts["test"] == pytest.approx(0.1, abs=0.02)
    assert [assign_split(i) for i in ids[:50]] == [assign_split(i) for i in ids[:50]]


def test_write_manifest_validates_and_is_atomic(tmp_path):
    row = {"clip_id": "a", "path": "x/a.wav", "duration_s": 1.0, "sample_rate": 16000, "transcript": "",
           "speaker": "s", "source": "t", "split": "train", "labels": "dog"}
    path = write_manifest([row], tmp_path / "m.parquet")
    assert list(load_manifest(path).columns) == MANIFEST_SCHEMA.names + ["labels"]
    assert [p.name for p in tmp_path.iterdir()] == ["m.parquet"]  # no temporary file left behind
    with pytest.raises(ValueError, match="duplicate"):
        write_manifest([row, row], tmp_path / "m.parquet")
    with pytest.raises(ValueError, match="split"):
        write_manifest([{**row, "split": "validation"}], tmp_path / "m.parquet")


def test_librispeech_tree(tmp_path):
    root = tmp_path / "corpora" / "librispeech"
    layout = {"dev-clean": {("84", "121123"): ["GO DO YOU HEAR", "BUT IN LESS THAN FIVE MINUTES THE STAIRCASE GROANED"]},
              "test-clean": {("1089", "134686"): ["HE HOPED THERE WOULD BE STEW FOR DINNER"]}}
    for split, chapters in layout.items():
        for (speaker, chapter), texts in chapters.items():
            folder = root / "LibriSpeech" / split / speaker / chapter
            lines = []
            for i, text in enumerate(texts):
                utt = f"{speaker}-{chapter}-{i:04d}"
                tone(folder / f"{utt}.flac", 1.0 + i, SAMPLE_RATE)
                lines.append(f"{utt} {text}")
            (folder / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")
    build = build_librispeech(tmp_path / "datasets" / "libri", ["dev-clean", "test-clean"], root=root, data_root=tmp_path)
    manifest = check_manifest_schema(build.manifest_path).set_index("clip_id")
    assert list(manifest.index) == ["libri-1089-134686-0000", "libri-84-121123-0000", "libri-84-121123-0001"]
    assert manifest.loc["libri-84-121123-0001", "transcript"] == "but in less than five minutes the staircase groaned"
    assert manifest.loc["libri-84-121123-0001", "duration_s"] == pytest.approx(2.0)
    assert list(manifest.split) == ["test", "dev", "dev"] and list(manifest.speaker) == ["1089", "84", "84"]
    # 16 kHz mono FLAC inside the data root is used where it lies, not copied.
    assert manifest.loc["libri-84-121123-0000", "path"] == "corpora/librispeech/LibriSpeech/dev-clean/84/121123/84-121123-0000.flac"
    # Outside the data root, clips are converted into the dataset folder.
    elsewhere = build_librispeech(tmp_path / "other" / "libri", "test-clean", root=root, data_root=tmp_path / "other")
    assert load_manifest(elsewhere.manifest_path).path.tolist() == ["libri/audio/test-clean/1089-134686-0000.wav"]
    with pytest.raises(DatasetUnavailableError, match="openslr"):
        build_librispeech(tmp_path / "datasets" / "none", "dev-other", root=root, download=False, data_root=tmp_path)


def test_esc50_tree(tmp_path):
    corpus = tmp_path / "ESC-50-master"
    meta = [("1-100032-A-0.wav", 1, 0, "dog", "True", "100032", "A"),
            ("1-100032-B-0.wav", 1, 0, "dog", "True", "100032", "B"),
            ("2-109505-A-21.wav", 2, 21, "sneezing", "False", "109505", "A")]
    for i, entry in enumerate(meta):
        tone(corpus / "audio" / entry[0], 5.0, 44100, freq=300 + 200 * i)
    (corpus / "meta").mkdir()
    with open(corpus / "meta" / "esc50.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["filename", "fold", "target", "category", "esc10", "src_file", "take"])
        writer.writerows(meta)
    build = build_esc50(tmp_path / "datasets" / "esc50", root=tmp_path, data_root=tmp_path)
    manifest = check_manifest_schema(build.manifest_path).set_index("clip_id")
    assert list(manifest.labels) == ["dog", "dog", "sneezing"] and list(manifest.fold) == [1, 1, 2]
    assert set(manifest.transcript) == {""} and (manifest.duration_s == 5.0).all()
    assert manifest.loc["esc50-1-100032-A-0", "split"] == manifest.loc["esc50-1-100032-B-0", "split"]  # same recording


def test_audioset_tree(tmp_path):
    root = tmp_path / "audioset"
    tone(root / "audio" / "bal_train" / "--PJHxphWEs.flac", 10.0, 48000, channels=2)
    tone(root / "audio" / "eval" / "-0RWZT-miFs.flac", 10.0, 48000, channels=2)
    tone(root / "audio" / "eval" / "unlisted0000.flac", 1.0, 48000)
    header = "# Segments csv created Sun Mar  5 10:54:31 2017\n# num_ytids=1\n# YTID, start_seconds, end_seconds, positive_labels\n"
    (root / "balanced_train_segments.csv").write_text(header + '--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/t/dd00088"\n')
    (root / "eval_segments.csv").write_text(header + '-0RWZT-miFs, 420.000, 430.000, "/m/03v3yw"\n')
    (root / "ontology.json").write_text(json.dumps([{"id": "/m/09x0r", "name": "Speech"},
                                                    {"id": "/t/dd00088", "name": "Gush"}]))
    build = build_audioset(tmp_path / "datasets" / "audioset", ["balanced_train", "eval"], root=root, data_root=tmp_path)
    manifest = check_manifest_schema(build.manifest_path).set_index("clip_id")
    assert manifest.loc["audioset-bal_train---PJHxphWEs", "labels"] == "Speech; Gush"
    assert manifest.loc["audioset-eval--0RWZT-miFs", "labels"] == "/m/03v3yw"  # not in the ontology: the id stays
    assert manifest.loc["audioset-eval--0RWZT-miFs", "split"] == "test"
    assert manifest.loc["audioset-bal_train---PJHxphWEs", "split"] in {"train", "dev"}
    assert [Path(f).name for f, _ in build.skipped] == ["unlisted0000.flac"]


def test_audio_folder_with_sidecars_and_junk(festival_build, tmp_path):
    data_root, festival = festival_build
    clip = load_manifest(festival.manifest_path).iloc[0]
    folder = tmp_path / "recordings"
    (folder / "day1").mkdir(parents=True)
    shutil.copy(data_root / clip.path, folder / "day1" / "take1.wav")
    (folder / "day1" / "take1.txt").write_text(clip.transcript.capitalize() + ".")
    shutil.copy(data_root / clip.path, folder / "take1.wav")  # same name elsewhere: still a separate clip
    (folder / "broken.wav").write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    (folder / "photo.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(300))
    (folder / "notes.txt").write_text("not a transcript of anything")
    build = build_audio_folder(folder, tmp_path / "datasets" / "mine", source="mine", speaker="me", data_root=tmp_path)
    manifest = check_manifest_schema(build.manifest_path).set_index("clip_id")
    assert sorted(manifest.index) == ["mine-day1-take1.wav", "mine-take1.wav"]
    assert manifest.loc["mine-day1-take1.wav", "transcript"] == clip.transcript
    assert manifest.loc["mine-take1.wav", "transcript"] == ""
    assert sorted(Path(f).name for f, _ in build.skipped) == ["broken.wav", "photo.jpg"]
    alignments = load_alignments(build.alignments_path)
    assert set(alignments.clip_id) == {"mine-day1-take1.wav"}
    assert " ".join(alignments[alignments.tier == "word"].label) == clip.transcript


def test_combine(festival_build, tmp_path):
    data_root, festival = festival_build
    folder = tmp_path / "more"
    folder.mkdir()
    shutil.copy(data_root / load_manifest(festival.manifest_path).path.iloc[0], folder / "x.wav")
    other = build_audio_folder(folder, data_root / "datasets" / "more", align=False, data_root=data_root)
    both = combine([festival, other], data_root / "datasets" / "both", name="both")
    manifest = check_manifest_schema(both.manifest_path)
    assert both.n_clips == 4 and both.total_seconds == pytest.approx(festival.total_seconds + other.total_seconds)
    assert len(load_alignments(both.alignments_path)) == len(load_alignments(festival.alignments_path))
    assert set(manifest.source) == {"festival_speech", "audio_folder"}
    with pytest.raises(ValueError, match="duplicate"):
        combine([festival, festival], tmp_path / "dup")


@pytest.mark.parametrize(
    ("module", "attribute", "fetch"),
    [
        (librispeech, "BASE_URL", lambda dest: download_librispeech(["dev-clean"], dest)),
        (esc50, "URL", lambda dest: download_esc50(dest)),
        (audioset, "BASE_URL", lambda dest: download_audioset(dest, shards=1)),
        (librispeech, "BASE_URL", lambda dest: build_librispeech(dest / "out", "test-clean", root=dest, data_root=dest)),
        (esc50, "URL", lambda dest: build_esc50(dest / "out", root=dest, data_root=dest)),
        (audioset, "BASE_URL", lambda dest: build_audioset(dest / "out", "eval", root=dest, data_root=dest)),
    ],
)
def test_downloads_fail_fast_offline(monkeypatch, tmp_path, module, attribute, fetch):
    monkeypatch.setattr(module, attribute, CLOSED_PORT + ("ESC-50.zip" if attribute == "URL" else ""))
    started = time.monotonic()
    with pytest.raises(DatasetUnavailableError, match="by hand") as info:
        fetch(tmp_path)
    assert time.monotonic() - started < 5
    assert str(tmp_path) in str(info.value)  # says where to put the file


class _RangeServer(BaseHTTPRequestHandler):
    payload = b""
    ranges: list[str] = []

    def do_GET(self):  # noqa: N802 (http.server's naming)
        start = 0
        if header := self.headers.get("Range"):
            self.ranges.append(header)
            start = int(header.split("=")[1].rstrip("-"))
        self.send_response(206 if start else 200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


@pytest.fixture
def range_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _RangeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/", _RangeServer
    server.shutdown()


def test_download_resumes_and_verifies(range_server, tmp_path):
    url, handler = range_server
    handler.payload, handler.ranges = bytes(range(256)) * 4000, []
    digest = hashlib.sha256(handler.payload).hexdigest()
    dest = tmp_path / "archive.bin"
    (tmp_path / "archive.bin.partial").write_bytes(handler.payload[:100_000])  # an interrupted earlier run
    assert _download.download(url + "archive.bin", dest, sha256=digest).read_bytes() == handler.payload
    assert handler.ranges == ["bytes=100000-"]
    with pytest.raises(DatasetUnavailableError, match="sha256"):
        _download.download(url + "archive.bin", tmp_path / "bad.bin", sha256="0" * 64)
    assert not (tmp_path / "bad.bin.partial").exists() and not (tmp_path / "bad.bin").exists()


def test_damaged_archive_is_reported(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_bytes(bytes(range(256)) * 2000)
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        tf.add(source / "a.txt", arcname="a.txt")
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetUnavailableError, match="damaged"):
        _download.extract(archive, tmp_path / "out")
