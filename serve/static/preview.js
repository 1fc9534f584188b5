// shopreel merchant preview page: brief form, streaming player (Media Source Extensions over the
// fragmented MP4 of POST /v1/product-videos with "stream": true) and the job list (GET /v1/videos).
// Plain browser JavaScript, no build step, no third-party code.
"use strict";

(function () {
  const KEY_STORAGE = "shopreel.apiKey";
  const META_STORAGE = "shopreel.videoMeta"; // id -> {title, mode} for videos made from this page
  const REFRESH_MS = 1000;

  const $ = (id) => document.getElementById(id);

  // What the page did and when (performance.now() ms, Date.now() for wall clock): shown to tests.
  const state = {
    streaming: false,
    videoId: null,
    numFrames: null,
    codecs: null,
    mime: null,
    bytes: 0,
    chunks: 0,
    requestAt: null,
    firstChunkAt: null,
    playingAt: null,
    playingWallMs: null,
    advancedAt: null,
    advancedWallMs: null,
    streamDoneAt: null,
    streamDoneWallMs: null,
    currentTimeAtStreamDone: null,
    endedOfStream: false,
    errors: [],
  };
  window.shopreelPreview = state;

  // --- errors --------------------------------------------------------------------------------------

  function showError(message) {
    state.errors.push(message);
    const box = $("errors");
    const line = document.createElement("p");
    line.textContent = message;
    box.appendChild(line);
    box.hidden = false;
  }

  function clearErrors() {
    state.errors.length = 0;
    const box = $("errors");
    box.replaceChildren();
    box.hidden = true;
  }

  // --- API calls -----------------------------------------------------------------------------------

  function authHeaders() {
    const key = $("api-key").value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  class ApiError extends Error {}

  // fetch() with the key; a non-2xx answer becomes an ApiError with OpenAI's error message.
  async function api(path, options = {}) {
    const headers = Object.assign({}, authHeaders(), options.headers || {});
    const response = await fetch(path, Object.assign({}, options, { headers }));
    if (!response.ok) {
      let message = response.status + " " + response.statusText;
      try {
        const body = await response.json();
        if (body && body.error && body.error.message) message = body.error.message + " (" + response.status + ")";
      } catch (_) {
        // not JSON: keep the status line
      }
      if (response.status === 401) message += " — enter an API key above";
      throw new ApiError(message);
    }
    return response;
  }

  async function loadModels() {
    try {
      const models = await (await api("/v1/models")).json();
      const model = models.data[0];
      $("model-info").textContent =
        "model: " + model.id + " (preset " + model.preset + ", default " + model.default_size +
        " at " + model.default_fps + " fps)";
      $("size").placeholder = model.default_size;
      $("fps").placeholder = String(model.default_fps);
      $("tiny-notice").hidden = model.preset !== "tiny";
    } catch (error) {
      showError("GET /v1/models: " + error.message);
    }
  }

  // --- the brief -----------------------------------------------------------------------------------

  const lines = (text) => text.split("\n").map((line) => line.trim()).filter((line) => line);
  const value = (id) => $(id).value.trim();

  function readFile(file) {
    return new Promise((resolve, reject) => {
      const reader = new FileReader();
      reader.onload = () => resolve(reader.result); // a data:image/...;base64,... URL, as the API takes it
      reader.onerror = () => reject(new Error("could not read " + file.name));
      reader.readAsDataURL(file);
    });
  }

  // The JSON body of POST /v1/product-videos (serve/protocol.py ProductVideoRequest).
  async function buildRequest() {
    const brief = { title: value("title"), mode: $("mode").value, language: $("language").value };
    if (value("category")) brief.category = value("category");
    const points = lines($("selling-points").value);
    if (points.length) brief.selling_points = points;
    if (brief.mode !== "showcase") brief.steps = lines($("steps").value);
    if (value("price")) {
      brief.price = value("price"); // a string: the server's Decimal keeps it exact
      brief.currency = value("currency").toUpperCase();
    }
    if (value("duration")) brief.duration_s = Number(value("duration"));
    if (value("size")) brief.size = value("size");
    if (value("fps")) brief.fps = Number(value("fps"));
    if (value("style")) brief.style = value("style");
    if (value("seed")) brief.seed = Number(value("seed"));
    const files = Array.from($("images").files);
    if (files.length) brief.images = await Promise.all(files.map(async (file) => ({ data: await readFile(file) })));

    const body = { brief, stream: true };
    if (value("inference-steps")) body.num_inference_steps = Number(value("inference-steps"));
    if (value("campaign-name")) {
      body.campaign = { name: value("campaign-name") };
      if (value("campaign-badge")) body.campaign.badge = value("campaign-badge");
      if (value("campaign-discount")) body.campaign.discount_text = value("campaign-discount");
    }
    const interests = value("profile-interests").split(/[,\n]/).map((s) => s.trim()).filter((s) => s);
    if (value("profile-segment") || interests.length || $("profile-language").value) {
      body.profile = {};
      if (value("profile-segment")) body.profile.segment = value("profile-segment");
      if (interests.length) body.profile.interests = interests;
      if ($("profile-language").value) body.profile.language = $("profile-language").value;
    }
    return body;
  }

  // --- fragmented MP4: the codecs string from the init segment --------------------------------------

  function boxes(bytes, start, end) {
    const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
    const found = [];
    let at = start;
    while (at + 8 <= end) {
      let size = view.getUint32(at);
      const type = String.fromCharCode(bytes[at + 4], bytes[at + 5], bytes[at + 6], bytes[at + 7]);
      let header = 8;
      if (size === 1) {
        if (at + 16 > end) break;
        size = Number(view.getBigUint64(at + 8));
        header = 16;
      } else if (size === 0) {
        size = end - at;
      }
      if (size < header) break;
      found.push({ type, start: at, body: at + header, end: at + size });
      at += size;
    }
    return found;
  }

  // Byte length of ftyp + moov once the whole moov has arrived; null while it has not.
  function initSegmentLength(bytes) {
    for (const box of boxes(bytes, 0, bytes.length)) {
      if (box.end > bytes.length) return null;
      if (box.type === "moov") return box.end;
    }
    return null;
  }

  function hex2(n) {
    return n.toString(16).padStart(2, "0");
  }

  // ISO 14496-1 descriptor: tag, then a size in up to four 7-bit bytes.
  function descriptor(bytes, at) {
    const tag = bytes[at];
    let size = 0;
    let i = at + 1;
    for (let n = 0; n < 4; n++) {
      const b = bytes[i++];
      size = (size << 7) | (b & 0x7f);
      if (!(b & 0x80)) break;
    }
    return { tag, body: i, end: i + size };
  }

  function audioCodec(bytes, esds) {
    try {
      let es = descriptor(bytes, esds.body + 4); // after the full-box version and flags
      if (es.tag !== 0x03) throw new Error("no ES descriptor");
      const flags = bytes[es.body + 2];
      let at = es.body + 3;
      if (flags & 0x80) at += 2;
      if (flags & 0x40) at += 1 + bytes[at];
      if (flags & 0x20) at += 2;
      const config = descriptor(bytes, at);
      if (config.tag !== 0x04) throw new Error("no decoder config");
      const objectType = bytes[config.body];
      const specific = descriptor(bytes, config.body + 13);
      if (specific.tag !== 0x05) return "mp4a." + hex2(objectType);
      let audioObjectType = bytes[specific.body] >> 3;
      if (audioObjectType === 31) audioObjectType = 32 + (((bytes[specific.body] & 0x07) << 3) | (bytes[specific.body + 1] >> 5));
      return "mp4a." + hex2(objectType) + "." + audioObjectType;
    } catch (_) {
      return "mp4a.40.2";
    }
  }

  // The RFC 6381 codecs of every track in the init segment: avc1.PPCCLL from avcC, mp4a.OO.A from esds.
  function parseCodecs(bytes, length) {
    const codecs = [];
    const walk = (start, end) => {
      for (const box of boxes(bytes, start, end)) {
        if (["moov", "trak", "mdia", "minf", "stbl"].includes(box.type)) {
          walk(box.body, box.end);
        } else if (box.type === "stsd") {
          for (const entry of boxes(bytes, box.body + 8, box.end)) {
            if (entry.type === "avc1" || entry.type === "avc3") {
              const avcC = boxes(bytes, entry.body + 78, entry.end).find((b) => b.type === "avcC");
              if (!avcC) throw new Error("the video track has no avcC box");
              codecs.push(entry.type + "." + hex2(bytes[avcC.body + 1]) + hex2(bytes[avcC.body + 2]) +
                hex2(bytes[avcC.body + 3]));
            } else if (entry.type === "mp4a") {
              const esds = boxes(bytes, entry.body + 28, entry.end).find((b) => b.type === "esds");
              codecs.push(esds ? audioCodec(bytes, esds) : "mp4a.40.2");
            } else {
              throw new Error("the stream has a track this page cannot play: " + entry.type);
            }
          }
        }
      }
    };
    walk(0, length);
    if (!codecs.length) throw new Error("no tracks in the stream's init segment");
    return codecs;
  }

  function concat(a, b) {
    const joined = new Uint8Array(a.length + b.length);
    joined.set(a, 0);
    joined.set(b, a.length);
    return joined;
  }

  // --- the streaming player ------------------------------------------------------------------------

  let mediaUrl = null;

  function openMediaSource(video) {
    if (mediaUrl) URL.revokeObjectURL(mediaUrl);
    const mediaSource = new MediaSource();
    mediaUrl = URL.createObjectURL(mediaSource);
    video.src = mediaUrl;
    return new Promise((resolve) => mediaSource.addEventListener("sourceopen", () => resolve(mediaSource), { once: true }));
  }

  // Appends in order; appendBuffer is refused while the SourceBuffer is updating, so chunks queue.
  function appender(mediaSource, sourceBuffer) {
    const queue = [];
    let finished = false;
    let settle;
    const drained = new Promise((resolve, reject) => {
      settle = { resolve, reject };
    });
    const pump = () => {
      if (sourceBuffer.updating) return;
      if (queue.length) {
        try {
          sourceBuffer.appendBuffer(queue.shift());
        } catch (error) {
          settle.reject(error);
        }
      } else if (finished) {
        if (mediaSource.readyState === "open") mediaSource.endOfStream();
        settle.resolve();
      }
    };
    sourceBuffer.addEventListener("updateend", pump);
    sourceBuffer.addEventListener("error", () => settle.reject(new Error("the browser could not decode the stream")));
    return {
      push(bytes) {
        queue.push(bytes);
        pump();
      },
      finish() {
        finished = true;
        pump();
        return drained;
      },
    };
  }

  const video = $("player");
  video.addEventListener("playing", () => {
    if (state.streaming && state.playingAt === null) {
      state.playingAt = performance.now();
      state.playingWallMs = Date.now();
    }
  });
  video.addEventListener("timeupdate", () => {
    if (state.streaming && state.advancedAt === null && video.currentTime > 0) {
      state.advancedAt = performance.now();
      state.advancedWallMs = Date.now();
    }
  });

  function setStatus(text) {
    $("stream-status").textContent = text;
  }

  async function streamVideo(body) {
    Object.assign(state, {
      streaming: true, videoId: null, numFrames: null, codecs: null, mime: null, bytes: 0, chunks: 0,
      requestAt: performance.now(), firstChunkAt: null, playingAt: null, playingWallMs: null,
      advancedAt: null, advancedWallMs: null, streamDoneAt: null, streamDoneWallMs: null,
      currentTimeAtStreamDone: null, endedOfStream: false,
    });
    setStatus("Planning the storyboard…");
    scheduleRefresh(0);
    const mediaSourceReady = openMediaSource(video);
    const response = await api("/v1/product-videos", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    state.videoId = response.headers.get("x-shopreel-video-id");
    state.numFrames = Number(response.headers.get("x-shopreel-num-frames")) || null;
    rememberVideo(state.videoId, body.brief);
    scheduleRefresh(0);
    setStatus("Streaming " + state.videoId + " (" + state.numFrames + " frames)…");

    const mediaSource = await mediaSourceReady;
    const reader = response.body.getReader();
    let pending = new Uint8Array(0); // bytes before the whole init segment is in
    let append = null;
    for (;;) {
      const { done, value: chunk } = await reader.read();
      if (done) break;
      state.chunks += 1;
      state.bytes += chunk.length;
      if (state.firstChunkAt === null) state.firstChunkAt = performance.now();
      if (append) {
        append.push(chunk);
        continue;
      }
      pending = concat(pending, chunk);
      const initLength = initSegmentLength(pending);
      if (initLength === null) continue;
      state.codecs = parseCodecs(pending, initLength);
      state.mime = 'video/mp4; codecs="' + state.codecs.join(", ") + '"';
      if (!MediaSource.isTypeSupported(state.mime)) throw new Error("this browser cannot play " + state.mime);
      append = appender(mediaSource, mediaSource.addSourceBuffer(state.mime));
      append.push(pending);
      pending = null;
      video.play().catch((error) => {
        if (error.name !== "AbortError") showError("the video did not start: " + error.message);
      });
    }
    state.streamDoneAt = performance.now();
    state.streamDoneWallMs = Date.now();
    state.currentTimeAtStreamDone = video.currentTime;
    if (!append) throw new Error("the stream ended before its first fragment");
    await append.finish();
    state.endedOfStream = true;
    const record = await (await api("/v1/videos/" + encodeURIComponent(state.videoId))).json();
    if (record.status === "completed") {
      setStatus("Done: " + state.videoId + " (" + state.bytes + " bytes, " + state.mime + ").");
    } else {
      showError("the stream of " + state.videoId + " broke off; the video is " + record.status +
        " and will be made again by id");
    }
  }

  $("mode").addEventListener("change", () => {
    $("steps-label").hidden = $("mode").value === "showcase";
  });

  $("api-key").value = localStorage.getItem(KEY_STORAGE) || "";
  $("api-key").addEventListener("change", () => {
    localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
    clearErrors();
    loadModels();
    refreshJobs();
  });

  $("brief-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors();
    $("submit").disabled = true;
    try {
      await streamVideo(await buildRequest());
    } catch (error) {
      setStatus("No video.");
      showError(error.message);
    } finally {
      state.streaming = false;
      $("submit").disabled = false;
      scheduleRefresh(0);
    }
  });

  // --- the job list --------------------------------------------------------------------------------

  const details = new Map(); // id -> GET /v1/videos/{id} of a finished video (it does not change)
  const thumbnails = new Map(); // id -> object URL of its JPEG
  let refreshTimer = null;

  function videoMeta() {
    try {
      return JSON.parse(localStorage.getItem(META_STORAGE) || "{}");
    } catch (_) {
      return {};
    }
  }

  function rememberVideo(id, brief) {
    if (!id) return;
    const meta = videoMeta();
    meta[id] = { title: brief.title, mode: brief.mode };
    localStorage.setItem(META_STORAGE, JSON.stringify(meta));
  }

  function scheduleRefresh(delay) {
    clearTimeout(refreshTimer);
    refreshTimer = setTimeout(refreshJobs, delay);
  }

  function qualityText(quality) {
    if (!quality) return "not scored";
    const parts = [];
    if (quality.ssim_mean !== null && quality.ssim_mean !== undefined) parts.push("SSIM " + quality.ssim_mean.toFixed(3));
    parts.push("flicker " + quality.flicker.toFixed(3));
    if (quality.loudness_lufs !== null && quality.loudness_lufs !== undefined) {
      parts.push(quality.loudness_lufs.toFixed(1) + " LUFS");
    }
    parts.push(quality.flags.length ? "flags: " + quality.flags.join(", ") : "passed");
    return parts.join(" · ");
  }

  async function blobUrl(path) {
    return URL.createObjectURL(await (await api(path)).blob());
  }

  async function download(id) {
    try {
      const url = await blobUrl("/v1/videos/" + encodeURIComponent(id) + "/content");
      const link = document.createElement("a");
      link.href = url;
      link.download = id + ".mp4";
      document.body.appendChild(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
    } catch (error) {
      showError("download " + id + ": " + error.message);
    }
  }

  async function remove(id) {
    try {
      await api("/v1/videos/" + encodeURIComponent(id), { method: "DELETE" });
      details.delete(id);
      if (thumbnails.has(id)) URL.revokeObjectURL(thumbnails.get(id));
      thumbnails.delete(id);
    } catch (error) {
      showError("delete " + id + ": " + error.message);
    }
    scheduleRefresh(0);
  }

  function button(label, action) {
    const element = document.createElement("button");
    element.type = "button";
    element.textContent = label;
    element.addEventListener("click", action);
    return element;
  }

  function cell(row, content, className) {
    const td = row.insertCell();
    if (className) td.className = className;
    if (content instanceof Node) td.appendChild(content);
    else td.textContent = content;
    return td;
  }

  async function jobRow(video, meta) {
    const id = video.id;
    if (video.status === "completed" && !details.has(id)) {
      details.set(id, await (await api("/v1/videos/" + encodeURIComponent(id))).json());
    }
    if (video.status === "completed" && !thumbnails.has(id)) {
      thumbnails.set(id, await blobUrl("/v1/videos/" + encodeURIComponent(id) + "/content?variant=thumbnail"));
    }
    const row = document.createElement("tr");
    row.dataset.videoId = id;
    row.dataset.status = video.status;
    const thumb = document.createElement("img");
    thumb.alt = "";
    thumb.className = "thumb";
    if (thumbnails.has(id)) thumb.src = thumbnails.get(id);
    cell(row, thumb);
    const known = meta[id] || {};
    const name = document.createElement("div");
    name.innerHTML = "<code></code><br><span class='muted'></span>";
    name.querySelector("code").textContent = id;
    name.querySelector("span").textContent = [
      known.title || video.prompt || "",
      known.mode ? "mode: " + known.mode : "",
      video.size + ", " + video.seconds + " s",
      new Date(video.created_at * 1000).toLocaleTimeString(),
    ].filter((s) => s).join(" · ");
    cell(row, name);
    let status = video.status;
    if (video.status === "in_progress" || video.status === "queued") status += " " + video.progress + "%";
    if (video.status === "failed" && video.error) status += ": " + video.error.message;
    cell(row, status, "status");
    const record = details.get(id);
    cell(row, record ? qualityText(record.shopreel && record.shopreel.quality) : "", "quality");
    const actions = document.createElement("div");
    if (video.status === "completed") actions.appendChild(button("Download", () => download(id)));
    actions.appendChild(button("Delete", () => remove(id)));
    cell(row, actions, "actions");
    return row;
  }

  let refreshing = null; // the refresh in flight; a call during it waits for it, then runs again

  async function refreshJobs() {
    clearTimeout(refreshTimer);
    while (refreshing) await refreshing;
    refreshing = refreshOnce();
    try {
      await refreshing;
    } finally {
      refreshing = null;
    }
  }

  async function refreshOnce() {
    let busy = state.streaming;
    try {
      const page = await (await api("/v1/videos?limit=20")).json();
      const meta = videoMeta();
      const rows = [];
      for (const item of page.data) rows.push(await jobRow(item, meta));
      $("jobs").tBodies[0].replaceChildren(...rows);
      busy = busy || page.data.some((item) => item.status === "queued" || item.status === "in_progress");
    } catch (error) {
      showError("GET /v1/videos: " + error.message);
      busy = false; // do not repeat an error every second; the Refresh button tries again
    }
    if (busy) scheduleRefresh(REFRESH_MS);
  }

  $("refresh").addEventListener("click", () => {
    clearErrors();
    refreshJobs();
  });

  loadModels();
  refreshJobs();
})();
