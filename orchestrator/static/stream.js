// Listen while the song is made (docs/streaming.md). "Listen" fetches /api/jobs/<id>/stream (a WAV
// header, then 16-bit little-endian stereo PCM at 48 kHz as windows become final), reads it with a
// ReadableStream reader, turns each chunk into a Float32 planar AudioBuffer and schedules the buffers
// back to back on one AudioContext (AudioBufferSourceNode.start(t)), so playback is gapless while
// data keeps ahead and resumes by itself after a wait for the next window. The stream is a view of
// the record: closing the tab loses nothing, and a dropped connection resumes with ?start=<sample>.
// State for people and tests: data-stream-state (idle|buffering|playing|ended), data-played-seconds,
// data-received-bytes (PCM bytes, headers not counted) on #stream-player.
(function () {
  "use strict";
  var box = document.getElementById("stream-player");
  var section = document.getElementById("job");
  if (!box || !section) { return; }
  var button = document.getElementById("stream-listen");
  var message = document.getElementById("stream-message");
  var RATE = 48000;
  var HEADER_BYTES = 44;
  var FRAME_BYTES = 4;  // one stereo sample: two int16
  var LEAD_S = 0.25;  // how far ahead the first buffer (and the first after a wait) is scheduled
  var TICK_MS = 200;
  var RETRY_MS = 1000;
  var MAX_QUIET_RETRIES = 5;  // reconnects in a row that bring nothing end the stream
  var TERMINAL = { succeeded: true, failed: true, cancelled: true };

  var ctx = null;
  var reader = null;
  var session = 0;  // bumps on Stop, so callbacks of an old listen do nothing
  var nextTime = 0;  // where the next buffer starts, in AudioContext time
  var segments = [];  // scheduled buffers not yet fully played: {start, end}
  var playedDone = 0;  // seconds of buffers already fully played
  var samplesReceived = 0;
  var streamDone = false;
  var quietRetries = 0;
  var ticker = null;
  var lastJob = null;
  var rate = null;  // {at, generated}: the first poll seen, to measure generation speed

  function setState(state) {
    if (box.dataset.streamState !== state) { box.dataset.streamState = state; }
  }

  function say(text) {
    if (message.textContent !== text) { message.textContent = text; }
  }

  function played() {
    if (!ctx) { return playedDone; }
    var now = ctx.currentTime;
    while (segments.length && segments[0].end <= now) {
      playedDone += segments[0].end - segments[0].start;
      segments.shift();
    }
    return playedDone + (segments.length && now > segments[0].start ? now - segments[0].start : 0);
  }

  function schedule(bytes) {
    var frames = bytes.length / FRAME_BYTES;
    var buffer = ctx.createBuffer(2, frames, RATE);  // the context resamples if it runs at another rate
    var left = buffer.getChannelData(0);
    var right = buffer.getChannelData(1);
    var view = new DataView(bytes.buffer, bytes.byteOffset, bytes.length);
    for (var i = 0, o = 0; i < frames; i += 1, o += FRAME_BYTES) {
      left[i] = view.getInt16(o, true) / 32768;
      right[i] = view.getInt16(o + 2, true) / 32768;
    }
    var source = ctx.createBufferSource();
    source.buffer = buffer;
    source.connect(ctx.destination);
    if (nextTime < ctx.currentTime + 0.02) { nextTime = ctx.currentTime + LEAD_S; }  // first, or after a wait
    source.start(nextTime);
    segments.push({ start: nextTime, end: nextTime + frames / RATE });
    nextTime += frames / RATE;
  }

  function fmt(seconds) { return (Math.round(seconds * 10) / 10).toFixed(1); }

  function render() {
    var seconds = played();
    box.dataset.playedSeconds = seconds.toFixed(2);
    box.dataset.receivedBytes = String(samplesReceived * FRAME_BYTES);
    document.getElementById("stream-played").textContent = fmt(seconds);
    var ahead = ctx ? nextTime - ctx.currentTime : 0;
    if (!ctx) { return; }
    if (ahead > 0) {
      setState("playing");
      say("Playing: " + fmt(ahead) + " s ready ahead.");
    } else if (streamDone) {
      setState("ended");
      say(samplesReceived ? "Played everything that was made." :
        "Nothing to play: the song ended before any part was final.");
      stopTicker();
      button.textContent = "Listen again";
    } else {
      setState("buffering");
      say(samplesReceived ? "Waiting for the next part to be decoded…" : "Waiting for the first part…");
    }
  }

  function stopTicker() { if (ticker !== null) { clearInterval(ticker); ticker = null; } }

  // Generated / decoded seconds and the time left, from what job.js already polls.
  section.addEventListener("songpipe:job", function (event) {
    var job = event.detail;
    lastJob = job;
    var stream = job.stream;
    if (!stream) { return; }
    document.getElementById("stream-generated").textContent = fmt(stream.seconds_generated);
    document.getElementById("stream-decoded").textContent = fmt(stream.seconds_final);
    var total = stream.seconds_total || ((job.request || {}).max_audio_length_ms || 0) / 1000;
    var now = Date.now() / 1000;
    if (rate === null || stream.seconds_generated < rate.generated) { rate = { at: now, generated: stream.seconds_generated }; }
    var speed = now > rate.at + 2 ? (stream.seconds_generated - rate.generated) / (now - rate.at) : 0;
    var eta = "";
    if (stream.status !== "finished" && !TERMINAL[job.status] && total && speed > 0) {
      var left = Math.max(0, total - stream.seconds_generated) / speed;
      eta = " · about " + Math.max(1, Math.round(left)) + " s until it is all generated (" +
        (speed >= 1 ? "faster than it plays" : "slower than it plays: playback will wait for the next part") + ")";
    }
    document.getElementById("stream-eta").textContent = eta;
    // a finished job that nobody is listening to: the page's own player (or error) takes over, as on a reload
    if (box.dataset.streamState === "idle" && TERMINAL[job.status]) { box.hidden = true; }
  });

  function finish(mine) {
    if (mine !== session) { return; }
    streamDone = true;
    render();
  }

  function read(mine) {
    var url = box.dataset.streamUrl + (samplesReceived ? "?start=" + samplesReceived : "");
    var headerLeft = HEADER_BYTES;
    var carry = new Uint8Array(0);
    var gotData = false;
    fetch(url, { cache: "no-store" }).then(function (response) {
      if (mine !== session) { return null; }
      if (response.status === 503) {  // the server streams to as many listeners as it can
        var wait = parseInt(response.headers.get("Retry-After") || "5", 10) * 1000;
        say("The server is busy; trying again in " + Math.round(wait / 1000) + " s.");
        setTimeout(function () { if (mine === session) { read(mine); } }, wait);
        return null;
      }
      if (!response.ok || !response.body) { throw new Error("HTTP " + response.status); }
      reader = response.body.getReader();
      var pump = function () {
        return reader.read().then(function (chunk) {
          if (mine !== session) { return; }
          if (chunk.done) { return ended(mine, gotData); }
          var bytes = chunk.value;
          if (headerLeft > 0) {
            var skip = Math.min(headerLeft, bytes.length);
            headerLeft -= skip;
            bytes = bytes.subarray(skip);
          }
          if (carry.length) {  // a stereo sample split across two chunks
            var joined = new Uint8Array(carry.length + bytes.length);
            joined.set(carry);
            joined.set(bytes, carry.length);
            bytes = joined;
          }
          var whole = bytes.length - (bytes.length % FRAME_BYTES);
          carry = bytes.slice(whole);
          if (whole > 0) {
            gotData = true;
            quietRetries = 0;
            schedule(bytes.subarray(0, whole));
            samplesReceived += whole / FRAME_BYTES;
            render();
          }
          return pump();
        });
      };
      return pump();
    }).catch(function () {
      if (mine === session) { retry(mine, gotData); }
    });
  }

  // The server ends a stream when the song is complete or the job ended; any other end (a restart,
  // a dropped connection, the server's wait limit) reconnects at the sample reached.
  function ended(mine, gotData) {
    var job = lastJob;
    var complete = job && job.stream && (TERMINAL[job.status] || job.stream.status === "finished");
    if (complete && samplesReceived >= Math.floor(job.stream.seconds_final * RATE + 0.5)) { return finish(mine); }
    return retry(mine, gotData);  // more is (or will be) final than this connection brought
  }

  function retry(mine, gotData) {
    quietRetries = gotData ? 0 : quietRetries + 1;
    if (quietRetries > MAX_QUIET_RETRIES) { return finish(mine); }
    setTimeout(function () { if (mine === session) { read(mine); } }, RETRY_MS);
  }

  function start() {
    var Context = window.AudioContext || window.webkitAudioContext;
    if (!Context || !window.ReadableStream) {
      say("This browser cannot play the stream; the song appears below when it is finished.");
      return;
    }
    try {
      ctx = new Context({ sampleRate: RATE });  // no resampling between the buffers and the context
    } catch (e) {
      ctx = new Context();  // a browser without the option: the context resamples the 48 kHz buffers
    }
    if (ctx.state === "suspended") { ctx.resume(); }
    session += 1;
    nextTime = 0;
    segments = [];
    playedDone = 0;
    samplesReceived = 0;
    streamDone = false;
    quietRetries = 0;
    setState("buffering");
    say("Waiting for the first part…");
    button.textContent = "Stop";
    ticker = setInterval(render, TICK_MS);
    read(session);
  }

  function stop() {
    session += 1;
    stopTicker();
    if (reader) { reader.cancel().catch(function () {}); reader = null; }
    if (ctx) { ctx.close(); ctx = null; }
    segments = [];
    setState("idle");
    button.textContent = "Listen";
    say("Stopped.");
  }

  button.addEventListener("click", function () {
    var state = box.dataset.streamState;
    if (state === "buffering" || state === "playing") { stop(); } else { if (ctx) { ctx.close(); ctx = null; } start(); }
  });
})();
