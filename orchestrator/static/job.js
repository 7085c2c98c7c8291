// Live song page: polls the JSON record about once a second and redraws status, overall progress,
// time left, tags and the stage table. Plain DOM (textContent only, never innerHTML) so recorded text
// can't inject markup. displayStatus mirrors orchestrator/song_page.py:display_status.
(function () {
  "use strict";
  var section = document.getElementById("job");
  if (!section) { return; }
  var api = section.dataset.api;
  var audioUrl = section.dataset.audio;
  var waitingApi = section.dataset.waitingApi;
  var TERMINAL = { succeeded: true, failed: true, cancelled: true };
  var NOT_STARTED = { queued: true, pending: true };
  var DONE = { succeeded: true, reused: true, skipped: true };
  var POLL_MS = 1000;

  function latestAttempts(job) {
    var latest = {};
    job.stages.forEach(function (s) { latest[s.stage] = Math.max(latest[s.stage] || 0, s.attempt); });
    return latest;
  }

  function displayStatus(stage, job, latest) {
    if (!NOT_STARTED[stage.status]) { return stage.status; }
    if (stage.attempt < (latest[stage.stage] || stage.attempt)) { return "superseded"; }
    if (TERMINAL[job.status]) { return "skipped"; }
    return stage.status;
  }

  function badge(status) {
    var span = document.createElement("span");
    span.className = "badge status-" + status;
    span.textContent = status;
    return span;
  }

  function progressCell(stage) {
    var td = document.createElement("td");
    td.className = "progress-cell";
    var p = stage.progress;
    if (p && p.total) {
      var bar = document.createElement("progress");
      bar.max = p.total;
      bar.value = p.done;
      bar.setAttribute("aria-label", stage.stage + " progress");
      td.appendChild(bar);
      td.appendChild(document.createTextNode(" " + p.done + "/" + p.total + " " + (p.unit || "")));
    }
    return td;
  }

  function row(stage, shown) {
    var tr = document.createElement("tr");
    tr.dataset.stage = stage.stage;
    tr.dataset.attempt = stage.attempt;
    var th = document.createElement("th");
    th.scope = "row";
    th.textContent = stage.stage + (stage.attempt > 1 ? " #" + stage.attempt : "");
    var queue = document.createElement("td");
    queue.textContent = stage.queue;
    var status = document.createElement("td");
    status.appendChild(badge(shown));
    if (stage.error_type) {
      var err = document.createElement("div");
      err.className = "stage-error";
      err.textContent = stage.error_type + ": " + (stage.error_message || "");
      status.appendChild(err);
    }
    var time = document.createElement("td");
    time.textContent = stage.duration_s == null ? "" : stage.duration_s.toFixed(1) + " s";
    tr.append(th, queue, status, progressCell(stage), time);
    return tr;
  }

  // Overall progress: each stage of the latest attempts counts one part; a running stage with
  // frame/window progress counts its fraction. Time left extrapolates the speed measured so far.
  function overall(job, latest) {
    var current = job.stages.filter(function (s) { return s.attempt === latest[s.stage]; });
    if (!current.length) { return { fraction: 0, left: null }; }
    var parts = 0;
    var started = null;
    current.forEach(function (s) {
      if (DONE[s.status]) { parts += 1; } else if (s.status === "running" && s.progress && s.progress.total) {
        parts += Math.min(1, s.progress.done / s.progress.total);
      }
      if (s.started_at && (started === null || s.started_at < started)) { started = s.started_at; }
    });
    var fraction = parts / current.length;
    var left = null;
    if (started && fraction > 0.05 && fraction < 1) {
      var elapsed = (Date.now() - Date.parse(started)) / 1000;
      left = Math.max(1, Math.round(elapsed * (1 - fraction) / fraction));
    }
    return { fraction: fraction, left: left };
  }

  function render(job) {
    var latest = latestAttempts(job);
    var status = document.getElementById("job-status");
    status.className = "badge status-" + job.status;
    status.textContent = job.status;
    document.getElementById("job-tags").textContent = job.tags_used || "not yet chosen";
    var body = document.getElementById("stage-rows");
    body.replaceChildren.apply(body, job.stages.map(function (s) { return row(s, displayStatus(s, job, latest)); }));
    var progress = overall(job, latest);
    document.getElementById("overall-progress").value = job.status === "succeeded" ? 100 : Math.round(progress.fraction * 100);
    document.getElementById("time-left").textContent =
      TERMINAL[job.status] ? "" : (progress.left !== null ? "about " + progress.left + " s left" : "");
    var errorBox = document.getElementById("job-error");
    if (job.error_message) {
      document.getElementById("job-error-stage").textContent = job.failed_stage || "error";
      document.getElementById("job-error-message").textContent = job.error_message;
      errorBox.hidden = false;
    }
    var cancelForm = document.getElementById("cancel-form");
    if (cancelForm && (TERMINAL[job.status] || job.cancel_requested)) { cancelForm.hidden = true; }
    document.getElementById("cancel-requested").hidden = !(job.cancel_requested && !TERMINAL[job.status]);
    if (job.audio_ready) {
      var audio = document.getElementById("audio");
      if (!audio.getAttribute("src")) { audio.src = audioUrl; }
      document.getElementById("player").hidden = false;
    }
    var notStarted = job.status === "queued" && job.stages.every(function (s) { return NOT_STARTED[s.status]; });
    var waiting = document.getElementById("job-waiting");
    if (!notStarted) { waiting.hidden = true; } else {
      fetch(waitingApi, { cache: "no-store" }).then(function (r) { return r.json(); }).then(function (body) {
        waiting.textContent = body.waiting || "";
        waiting.hidden = !body.waiting;
      }).catch(function () {});
    }
  }

  function poll() {
    fetch(api, { headers: { Accept: "application/json" }, cache: "no-store" })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (job) {
        render(job);
        if (!TERMINAL[job.status]) { setTimeout(poll, POLL_MS); }
      })
      .catch(function () { setTimeout(poll, POLL_MS * 3); });  // server restarting: keep trying, slower
  }

  poll();
})();
