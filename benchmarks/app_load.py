"""Load benchmark of the Dash app: concurrent feature searches against a real server on loopback.

    .venv/bin/python benchmarks/app_load.py [--data-dir DIR] [--clients 20] [--requests 200] [--edit-clients 0]

1. An index: --data-dir (a FREUD data directory holding lancedb/), else the repo's data/ if it has one (unless
   --build), else a small one built in a temporary directory the way tests/test_app.py builds it (8 Asterisk
   prompts, tiny.en encoder.blocks.2.mlp.1 neuron set) plus, as tests/test_app_edit_runs.py does, a briefly trained TopK SAE on
   encoder.blocks.2 indexed as an SAE set (so --edit-clients has something to edit).
2. The app as users get it: `python -m dash_app --host 127.0.0.1 --port <free port> --data-dir DIR --workers N`
   in a subprocess (gunicorn with N worker processes, 2 by default; --workers 1: Flask's threaded server).
3. --clients threads, each with its own keep-alive HTTP connection, make --requests feature searches each: the
   exact request the search page makes, POST /_dash-update-component for the callback whose inputs are
   url.search and search-page.id (its output string and ids read from /_dash-dependencies), for a random
   feature of the set with the default 20 results, then (as a browser with its cache) GETs the spectrogram
   images of the results it has not fetched before. --edit-clients threads meanwhile post feature edits
   (the /edit page's "Apply edit" callback), to show that slow work does not hold up searches.
4. Prints p50/p95/p99 latency of the searches, throughput and errors (target: p95 <= 300 ms, no errors), the
   p50/p95 of a whole page (search + new images), and the CPU per search of the server and of this generator. Only 127.0.0.1 is
   contacted; every loop is bounded by its count and by --max-seconds.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASTERISK = Path("/usr/share/asterisk/sounds/en_US_f_Allison")
TRANSCRIPTS = Path("/usr/share/doc/asterisk-core-sounds-en/core-sounds-en.txt.gz")
PROMPTS = (
    "agent-pass", "all-circuits-busy-now", "auth-thankyou", "cannot-complete-as-dialed",
    "check-number-dial-again", "conf-getpin", "conf-onlyperson", "hello-world",
)
NEURON_HOOK = "encoder.blocks.2.mlp.1"
SAE_HOOK = "encoder.blocks.2"
TARGET_P95_MS = 300.0
# search results link their spectrogram PNGs (/spectrogram/<clip>.png?v=<hash>; "/" may arrive JSON-escaped)
IMAGE_URL = re.compile(rb'"source":\s*"((?:\\u002f|/)spectrogram(?:\\u002f|/)[^"]+)"')


# ----------------------------------------------------------------------------------------------------------------
# A small real index (as the tests build it)
# ----------------------------------------------------------------------------------------------------------------


def build_small_index(out: Path, with_sae: bool = True) -> Path:
    import pandas as pd
    import torch

    from freud_pipeline.audio.datasets.asterisk import spoken_transcript
    from freud_pipeline.audio.decode import load_audio
    from freud_pipeline.features.build import build_feature_set, decoder_directions
    from freud_pipeline.features.mining import encoded_clips
    from freud_pipeline.frames import SAMPLE_RATE
    from freud_pipeline.whisper.hooks import EncoderCapture, log_mel, n_real_frames
    from freud_pipeline.whisper.models import load_model

    if not (shutil.which("ffmpeg") and ASTERISK.is_dir()):
        raise SystemExit("building the default index needs ffmpeg and asterisk-core-sounds-en-g722; "
                         "or pass --data-dir")
    (out / "clips").mkdir(parents=True, exist_ok=True)
    texts = {}
    if TRANSCRIPTS.exists():
        for line in gzip.open(TRANSCRIPTS, "rt", errors="replace"):
            name, sep, text = line.partition(":")
            if sep:
                texts[name.strip()] = text.strip()
    model = load_model("tiny.en", device="cpu")
    capture = EncoderCapture(model, [NEURON_HOOK, SAE_HOOK])
    rows, neurons, residual = [], {}, {}
    for name in PROMPTS:
        wav = out / "clips" / f"{name}.wav"
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "g722", "-i", str(ASTERISK / f"{name}.g722"),
                        "-ar", str(SAMPLE_RATE), "-ac", "1", str(wav)], check=True)
        audio = load_audio(wav)
        acts = capture.capture(log_mel(audio))
        frames = n_real_frames(len(audio))
        clip_id = f"asterisk-{name}"
        neurons[clip_id] = acts[NEURON_HOOK][0, :frames].float().numpy()
        residual[clip_id] = acts[SAE_HOOK][0, :frames].float().clone()
        rows.append({"clip_id": clip_id, "path": f"clips/{name}.wav", "duration_s": len(audio) / SAMPLE_RATE,
                     "sample_rate": SAMPLE_RATE, "transcript": spoken_transcript(texts.get(name, "")),
                     "speaker": "allison", "source": "asterisk", "split": "test"})
    manifest = pd.DataFrame(rows)
    uri = str(out / "lancedb")
    build_feature_set(iter(neurons.items()), set_id=f"tiny.en:{NEURON_HOOK}", model="tiny.en", hook=NEURON_HOOK,
                      kind="neuron", manifest_df=manifest, index_uri=uri)
    if with_sae:
        from freud_pipeline.sae import TrainConfig, train_sae

        cfg = TrainConfig(hook=SAE_HOOK, model_name="tiny.en", expansion_factor=4, k=32, lr=3e-3, warmup_steps=10,
                          steps=120, batch_size=256, log_every=40, eval_every=0, eval_batches=2,
                          dead_after_frames=50_000, device="cpu")
        result = train_sae(torch.cat(list(residual.values())), cfg, out_dir=out / "sae",
                           mlflow_tracking_uri=f"sqlite:///{out / 'mlflow.db'}", experiment="freud-sae")

        def encode(acts):
            with torch.inference_mode():
                return result.sae.encode(acts).numpy()

        build_feature_set(encoded_clips(iter(residual.items()), encode),
                          set_id=f"tiny.en/{SAE_HOOK}/sae-topk-{result.run_id[:8]}", model="tiny.en", hook=SAE_HOOK,
                          kind="sae", manifest_df=manifest, index_uri=uri, sae_run_id=result.run_id,
                          sae_checkpoint=str(result.checkpoint_dir), decoder=decoder_directions(result.sae))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Dash callback requests
# ----------------------------------------------------------------------------------------------------------------


def find_callback(deps: list[dict], output_part: str, input_id: str) -> dict:
    for dep in deps:
        if output_part in dep["output"] and any(i["id"] == input_id for i in dep["inputs"]):
            return dep
    raise SystemExit(f"no callback with output {output_part!r} and input {input_id!r} in /_dash-dependencies")


def callback_body(dep: dict, values: dict[str, object]) -> bytes:
    """The JSON the Dash renderer posts for `dep`; `values` maps 'id.property' to the value sent."""
    def items(specs):
        return [{"id": s["id"], "property": s["property"], "value": values.get(f"{s['id']}.{s['property']}")}
                for s in specs]

    outputs = []
    for part in dep["output"].strip(".").split("..."):
        component, _, prop = part.partition(".")
        outputs.append({"id": component, "property": prop.split("@")[0]})
    first = dep["inputs"][0]
    return json.dumps({
        "output": dep["output"],
        "outputs": outputs if len(outputs) > 1 or dep["output"].startswith("..") else outputs[0],
        "inputs": items(dep["inputs"]),
        "state": items(dep.get("state", [])),
        "changedPropIds": [f"{first['id']}.{first['property']}"],
    }).encode()


class Client:
    """One keep-alive connection to 127.0.0.1 (reconnects after an error)."""

    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout
        self.conn: http.client.HTTPConnection | None = None

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.conn is None:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            try:
                headers = {"Content-Type": "application/json"} if body is not None else {}
                self.conn.request(method, path, body=body, headers=headers)
                response = self.conn.getresponse()
                return response.status, response.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if attempt:
                    raise
        raise RuntimeError("unreachable")

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None


def page_end_id(client: Client) -> str:
    """The signed page-load token Dash puts in a page's config; background-callback requests carry it."""
    status, page = client.request("GET", "/edit")
    found = re.search(rb'<script id="_dash-config" type="application/json">(.*?)</script>', page, re.S)
    if status != 200 or not found:
        raise RuntimeError(f"GET /edit: HTTP {status}, no Dash config in the page")
    return json.loads(found.group(1))["end_id"]


def run_background(client: Client, body: bytes, end_id: str, deadline: float,
                   poll_s: float = 0.25) -> tuple[bool, bytes]:
    """Start a background callback and poll it as Dash's renderer does: (ok, final payload)."""
    from urllib.parse import quote as q

    status, payload = client.request("POST", f"/_dash-update-component?endId={q(end_id)}", body)
    if status != 200:
        return False, payload
    handle = json.loads(payload)
    if "cacheKey" not in handle:  # answered at once (e.g. a validation message)
        return True, payload
    poll = f"/_dash-update-component?endId={q(end_id)}&cacheKey={q(handle['cacheKey'])}&job={q(handle['job'])}"
    while time.monotonic() < deadline:
        time.sleep(poll_s)
        status, payload = client.request("POST", poll, body)
        if status == 204:  # no update this time
            continue
        if status != 200:
            return False, payload
        reply = json.loads(payload)
        if "response" in reply:
            text = json.dumps(reply["response"])
            return ("edit-graph" in text or "edit-transcripts" in text), payload
    return False, b"timed out waiting for the background job"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_up(port: int, proc: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the app exited with code {proc.returncode} before answering")
        try:
            status, _ = Client(port, 5).request("GET", "/_dash-dependencies")
            if status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the app did not answer on 127.0.0.1:{port} within {seconds:.0f} s")


def process_tree_cpu(pid: int) -> float:
    """User + system CPU seconds of a process and its children (gunicorn's workers)."""
    import psutil

    try:
        root = psutil.Process(pid)
        total = 0.0
        for p in [root, *root.children(recursive=True)]:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
        return total
    except psutil.NoSuchProcess:
        return 0.0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = min(len(ordered) - 1, max(0, int(round(q / 100 * (len(ordered) - 1)))))
    return ordered[rank]


# ----------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", help="FREUD data directory with lancedb/ (default: data/ if it has one, "
                                           "else a small index built in a temporary directory)")
    parser.add_argument("--build", action="store_true",
                        help="always build the small index in a temporary directory (ignore data/)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=200, help="searches per client")
    parser.add_argument("--results", type=int, default=20, help="results per search (the page's default)")
    parser.add_argument("--set", dest="set_id", help="feature set to search (default: the first neuron set)")
    parser.add_argument("--edit-clients", type=int, default=0, help="clients posting feature edits meanwhile")
    parser.add_argument("--warmup", type=int, default=16, help="searches before timing (caches clip audio)")
    parser.add_argument("--max-seconds", type=float, default=600, help="stop the load after this long")
    parser.add_argument("--timeout", type=float, default=60, help="per-request timeout (s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="app worker processes (python -m dash_app --workers; 1 = Flask's threaded server)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-images", action="store_true",
                        help="do not fetch the result images (by default each client fetches those it has not "
                             "fetched before, as a browser with its cache does)")
    parser.add_argument("--threads", type=int, default=None, help="request threads per gunicorn worker "
                        "(default: the app's own default)")
    parser.add_argument("--json", help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if not (1 <= args.clients <= 256 and 1 <= args.requests <= 10_000 and 0 <= args.edit_clients <= 8):
        parser.error("--clients 1..256, --requests 1..10000, --edit-clients 0..8")

    os.environ.setdefault("FREUD_MODEL_DIR", str(REPO / "data" / "models"))
    os.environ.setdefault("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")
    temp = None
    if args.data_dir:
        data = Path(args.data_dir).expanduser().resolve()
        if not (data / "lancedb").is_dir():
            parser.error(f"{data} has no lancedb/ index")
        origin = f"--data-dir {data}"
    elif (REPO / "data" / "lancedb").is_dir() and not args.build:
        data, origin = REPO / "data", "the repo's data/"
    else:
        temp = Path(tempfile.mkdtemp(prefix="freud-app-load-"))
        started = time.perf_counter()
        print(f"building a small index in {temp} ...", flush=True)
        os.environ["FREUD_DATA_DIR"] = str(temp)
        data = build_small_index(temp)
        origin = f"small index built in {time.perf_counter() - started:.0f} s (8 Asterisk prompts)"

    from freud_pipeline.features import FeatureIndex

    sets = FeatureIndex(str(data / "lancedb")).sets()
    if not sets:
        raise SystemExit(f"{data / 'lancedb'} holds no feature set")
    chosen = (next((s for s in sets if s["set_id"] == args.set_id), None) if args.set_id else
              next((s for s in sets if s["kind"] == "neuron"), sets[0]))
    if chosen is None:
        raise SystemExit(f"no feature set {args.set_id!r}; sets: {', '.join(s['set_id'] for s in sets)}")
    sae_set = next((s for s in sets if s["kind"] == "sae"), None)
    if args.edit_clients and sae_set is None:
        raise SystemExit("--edit-clients needs an SAE feature set in the index")

    port = free_port()
    log_path = Path(tempfile.gettempdir()) / f"freud-app-load-{port}.log"
    env = {**os.environ, "FREUD_DATA_DIR": str(data)}
    command = [sys.executable, "-m", "dash_app", "--host", "127.0.0.1", "--port", str(port), "--data-dir", str(data),
               "--workers", str(args.workers)] + (["--threads", str(args.threads)] if args.threads else [])
    print(f"server: python -m dash_app --workers {args.workers}"
          + (f" (gunicorn, {args.threads or 'default'} threads each)" if args.workers > 1 else " (Flask's threaded server)"), flush=True)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        wait_until_up(port, proc, 180)
        setup = Client(port, args.timeout)
        deps = json.loads(setup.request("GET", "/_dash-dependencies")[1])
        search = find_callback(deps, "search-results.children", "search-page")
        rng = random.Random(args.seed)
        n_features = int(chosen["n_features"])

        def search_body(feature: int) -> bytes:
            return callback_body(search, {
                "url.search": f"?set={chosen['set_id']}&index={feature}&n={args.results}&abs=0",
                "search-page.id": "search-page", "url.pathname": "/search"})

        for _ in range(args.warmup):
            status, payload = setup.request("POST", "/_dash-update-component", search_body(rng.randrange(n_features)))
            if status != 200:
                raise SystemExit(f"warm-up search failed: HTTP {status}: {payload[:300]!r}")
        setup.close()

        deadline = time.monotonic() + args.max_seconds
        stop = threading.Event()
        latencies: list[float] = []
        errors: list[str] = []
        not_sent = [0]
        sizes: list[int] = []
        page_latencies: list[float] = []  # the search plus the images of its results not yet in the client's cache
        images_fetched = [0]
        lock = threading.Lock()
        plans = [[rng.randrange(n_features) for _ in range(args.requests)] for _ in range(args.clients)]

        def searcher(plan: list[int]) -> None:
            client = Client(port, args.timeout)
            cached: set[bytes] = set()  # this client's browser cache of spectrogram images
            try:
                for feature in plan:
                    if time.monotonic() > deadline:
                        with lock:
                            not_sent[0] += 1
                        continue
                    started = time.perf_counter()
                    fetched = 0
                    try:
                        status, payload = client.request("POST", "/_dash-update-component", search_body(feature))
                        ok = status == 200 and b'"search-results"' in payload
                        problem = None if ok else f"HTTP {status}: {payload[:120]!r}"
                        answered = time.perf_counter()
                        # then, as a browser does, the result images it has not cached yet
                        for url in ([] if problem or args.no_images else IMAGE_URL.findall(payload)):
                            if url not in cached:
                                image_status, image = client.request("GET", json.loads(b'"' + url + b'"'))
                                if image_status != 200 or not image.startswith(b"\x89PNG"):
                                    problem = f"image HTTP {image_status}: {url[:80]!r}"
                                    break
                                cached.add(url)
                                fetched += 1
                    except Exception as exc:  # noqa: BLE001 - counted as an error
                        problem, payload = f"{type(exc).__name__}: {exc}", b""
                        client.close()
                        answered = time.perf_counter()
                    finished = time.perf_counter()
                    with lock:
                        if problem:
                            errors.append(problem)
                        else:
                            latencies.append(answered - started)
                            page_latencies.append(finished - started)
                            sizes.append(len(payload))
                            images_fetched[0] += fetched
            finally:
                client.close()

        edit_latencies: list[float] = []
        edit_errors: list[str] = []
        if args.edit_clients:
            edit = find_callback(deps, "edit-results.children", "edit-go")
            clip = FeatureIndex(str(data / "lancedb")).search_clips("")[0]["clip_id"]

        def editor(seed: int) -> None:
            """Post edits as the /edit page does: the edit is a background callback, so the first request returns
            a job handle and the page polls (the same request with the signed cacheKey and job) until the result
            comes; its latency is from the click to the result."""
            client = Client(port, 300)
            local = random.Random(seed)
            try:
                end_id = page_end_id(client)
                while not stop.is_set() and time.monotonic() < deadline:
                    body = callback_body(edit, {
                        "edit-go.n_clicks": 1,
                        "edit-source.data": {"kind": "clip", "clip_id": clip, "label": clip},
                        "edit-set.value": sae_set["set_id"],
                        "edit-features.value": f"{local.randrange(int(sae_set['n_features']))}:0",
                        "edit-factor.value": "0", "edit-keep-error.value": ["keep"]})
                    started = time.perf_counter()
                    try:
                        ok, payload = run_background(client, body, end_id, time.monotonic() + 300)
                    except Exception as exc:  # noqa: BLE001
                        ok, payload = False, str(exc).encode()
                        client.close()
                    with lock:
                        (edit_latencies.append(time.perf_counter() - started) if ok
                         else edit_errors.append(payload[:200].decode(errors="replace")))
            finally:
                client.close()

        editors = [threading.Thread(target=editor, args=(i,), daemon=True) for i in range(args.edit_clients)]
        for thread in editors:
            thread.start()
        if editors:
            time.sleep(1.0)  # let the first edit start before the searches
        try:
            load_before = [round(x, 2) for x in os.getloadavg()]
        except OSError:
            load_before = None
        server_cpu_before = process_tree_cpu(proc.pid)
        client_cpu_before = time.process_time()
        started = time.perf_counter()
        threads = [threading.Thread(target=searcher, args=(plan,), daemon=True) for plan in plans]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(1.0, deadline - time.monotonic() + args.timeout))
        wall = time.perf_counter() - started
        server_cpu = process_tree_cpu(proc.pid) - server_cpu_before
        client_cpu = time.process_time() - client_cpu_before
        stop.set()
        for thread in editors:
            thread.join(300)
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)

    ms = [v * 1000 for v in latencies]
    result = {
        "index": origin,
        "set": chosen["set_id"],
        "clients": args.clients,
        "requests_per_client": args.requests,
        "results_per_search": args.results,
        "searches_ok": len(ms),
        "errors": len(errors),
        "not_sent_time_limit": not_sent[0],
        "wall_s": round(wall, 1),
        "throughput_rps": round(len(ms) / wall, 1) if wall else None,
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "p99_ms": round(percentile(ms, 99), 1),
        "max_ms": round(max(ms), 1) if ms else None,
        # what a browser waits for: the search, then the spectrogram images it has not cached yet
        "page_p50_ms": round(percentile([v * 1000 for v in page_latencies], 50), 1),
        "page_p95_ms": round(percentile([v * 1000 for v in page_latencies], 95), 1),
        "images_fetched": images_fetched[0],
        "mean_ms": round(statistics.fmean(ms), 1) if ms else None,
        # CPU seconds per search: the server (all worker processes) and this load generator
        "server_cpu_ms_per_search": round(server_cpu * 1000 / len(ms), 1) if ms else None,
        "client_cpu_ms_per_search": round(client_cpu * 1000 / len(ms), 1) if ms else None,
        "response_kb_mean": round(statistics.fmean(sizes) / 1024, 1) if sizes else None,
        "edit_clients": args.edit_clients,
        "edits_ok": len(edit_latencies),
        "edit_errors": len(edit_errors),
        "edit_p50_s": round(percentile(edit_latencies, 50), 2) if edit_latencies else None,
        "cpu_count": os.cpu_count(),
        "load_average_before": load_before,
    }
    print(json.dumps(result, indent=2))
    if errors:
        print("first errors:", *sorted(set(errors))[:5], sep="\n  ")
    if edit_errors:
        print("first edit errors:", *edit_errors[:3], sep="\n  ")
    met = not errors and result["p95_ms"] <= TARGET_P95_MS
    print(f"target p95 <= {TARGET_P95_MS:g} ms and no errors: {'MET' if met else 'MISSED'} "
          f"(p50 {result['p50_ms']} ms, p95 {result['p95_ms']} ms, {len(errors)} errors"
          + (f", {not_sent[0]} searches not sent: --max-seconds {args.max_seconds:g} reached" if not_sent[0] else "")
          + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
