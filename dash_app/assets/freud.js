/* FREUD feature browser: browser-side helpers (no server round trips).
 *
 * - playheads(): called by a clientside callback on an interval. For every <audio class="freud-audio"
 *   data-graph="ID" data-readout="ID">, moves shape 0 (the playhead line) of the Plotly figure in #ID to the
 *   player's currentTime, and writes "time / duration · activation under the playhead" into the readout.
 *   A click on a figure seeks its player.
 * - record(n, storeId, doneText): start/stop a MediaRecorder recording; the webm is put (base64 data URL) into
 *   the dcc.Store storeId ("record-data" by default) with dash_clientside.set_props, where a server callback
 *   decodes it with ffmpeg. The upload and edit pages use it with their own stores.
 * - upload size check: the file input of #upload-wrap is checked against data-max-bytes before dcc.Upload
 *   reads it, so a file over the limit gets a message next to the control instead of silence.
 */
(function () {
    "use strict";

    function plotOf(graphId) {
        var el = document.getElementById(graphId);
        if (!el) { return null; }
        var gd = el.classList.contains("js-plotly-plot") ? el : el.querySelector(".js-plotly-plot");
        return gd && gd._fullLayout ? gd : null;
    }

    function traceValueAt(gd, t) {
        // The activation line is the first scatter trace on the secondary y axis.
        var data = gd.data || [];
        for (var i = 0; i < data.length; i++) {
            var d = data[i];
            if (d.type === "scatter" && d.yaxis === "y2" && d.mode === "lines" && d.y && d.y.length && d.dx > 0) {
                // one value per encoder frame, centred at x0 + j * dx (figures.trace_parts)
                var j = Math.min(d.y.length - 1, Math.max(0, Math.floor((t - (Number(d.x0) || 0)) / d.dx + 0.5)));
                return {name: d.name || "activation", value: Number(d.y[j])};
            }
        }
        return null;
    }

    function attachSeek(gd, audio) {
        if (gd.__freudSeek === audio) { return; }
        gd.__freudSeek = audio;
        if (typeof gd.on !== "function") { return; }
        gd.on("plotly_click", function (ev) {
            var player = gd.__freudSeek;
            if (!player || !ev || !ev.points || !ev.points.length) { return; }
            var x = Number(ev.points[0].x);
            if (isFinite(x)) {
                try { player.currentTime = Math.max(0, x); } catch (e) { /* not seekable yet */ }
            }
        });
    }

    function playheads() {
        var players = document.querySelectorAll("audio.freud-audio[data-graph]");
        for (var i = 0; i < players.length; i++) {
            var audio = players[i];
            var gd = plotOf(audio.getAttribute("data-graph"));
            if (!gd) { continue; }
            attachSeek(gd, audio);
            var t = audio.currentTime || 0;
            if (gd.__freudT !== t && window.Plotly && gd.layout && gd.layout.shapes && gd.layout.shapes.length) {
                gd.__freudT = t;
                window.Plotly.relayout(gd, {"shapes[0].x0": t, "shapes[0].x1": t});
            }
            var readout = document.getElementById(audio.getAttribute("data-readout"));
            if (readout) {
                var duration = isFinite(audio.duration) ? audio.duration : null;
                var hit = traceValueAt(gd, t);
                var text = t.toFixed(2) + (duration !== null ? " / " + duration.toFixed(2) : "") + " s";
                if (hit) { text += " · " + hit.name + " " + hit.value.toFixed(3); }
                if (readout.textContent !== text) { readout.textContent = text; }
            }
        }
        return window.dash_clientside.no_update;
    }

    // One recorder per target store (the upload and edit pages each have one).
    var recorders = {};

    function record(n, storeId, doneText) {
        storeId = storeId || "record-data";
        var st = recorders[storeId] || (recorders[storeId] = {recorder: null, chunks: []});
        if (st.recorder && st.recorder.state === "recording") {
            st.recorder.stop();
            return ["● Record", "Processing the recording…"];
        }
        if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia || typeof MediaRecorder === "undefined") {
            return ["● Record", "Recording needs a browser with MediaRecorder and a secure page (https or localhost)."];
        }
        return navigator.mediaDevices.getUserMedia({audio: true}).then(function (stream) {
            var mime = ["audio/webm;codecs=opus", "audio/webm", "audio/ogg;codecs=opus"].find(function (m) {
                return MediaRecorder.isTypeSupported(m);
            }) || "";
            var recorder = mime ? new MediaRecorder(stream, {mimeType: mime}) : new MediaRecorder(stream);
            st.recorder = recorder;
            st.chunks = [];
            recorder.ondataavailable = function (ev) { if (ev.data && ev.data.size) { st.chunks.push(ev.data); } };
            recorder.onstop = function () {
                stream.getTracks().forEach(function (track) { track.stop(); });
                var type = recorder.mimeType || mime || "audio/webm";
                var reader = new FileReader();
                reader.onload = function () {
                    window.dash_clientside.set_props(storeId, {data: {
                        contents: reader.result, recorded_at: Date.now(),
                        filename: "recording." + (type.indexOf("ogg") >= 0 ? "ogg" : "webm")}});
                };
                reader.readAsDataURL(new Blob(st.chunks, {type: type}));
            };
            recorder.start();
            return ["■ Stop", doneText || "Recording… press Stop to analyse it."];
        }).catch(function (err) {
            return ["● Record", "The microphone cannot be used: " + (err && err.message ? err.message : err)];
        });
    }

    // Reject over-size files with a message (dcc.Upload's max_size alone drops them silently).
    function checkUploadSize(ev) {
        var target = ev.target;
        var wrap = target && target.closest ? target.closest("#upload-wrap") : null;
        if (!wrap) { return; }
        var files = (ev.dataTransfer && ev.dataTransfer.files) || target.files;
        var limit = Number(wrap.getAttribute("data-max-bytes"));
        if (!files || !files.length || !limit) { return; }
        var file = files[0];
        if (file.size > limit) {
            var mb = (file.size / 1048576).toFixed(1);
            window.dash_clientside.set_props("upload-error", {
                children: file.name + " is " + mb + " MB; the limit is " + wrap.getAttribute("data-max-mb") + " MB."
            });
        } else {
            window.dash_clientside.set_props("upload-error", {children: ""});
        }
    }
    document.addEventListener("change", checkUploadSize, true);
    document.addEventListener("drop", checkUploadSize, true);

    window.freud = {playheads: playheads, record: record};
})();
