// Live job page: polls the JSON record about once a second and redraws the stage table.
// Plain DOM (textContent only, never innerHTML) so recorded text can't inject markup.
(function () {
  "use strict";
  var section = document.getElementById("job");
  if (!section) { return; }
  var api = section.dataset.api;
  var audioUrl = section.dataset.audio;
  var TERMINAL = { succeeded: true, failed: true, cancelled: true };
  var POLL_MS = 1000;

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

  function row(stage) {
    var tr = document.createElement("tr");
    tr.dataset.stage = stage.stage;
    tr.dataset.attempt = stage.attempt;
    var th = document.createElement("th");
    th.scope = "row";
    th.textContent = stage.stage + (stage.attempt > 1 ? " #" + stage.attempt : "");
    var queue = document.createElement("td");
    queue.textContent = stage.queue;
    var status = document.createElement("td");
    status.appendChild(badge(stage.status));
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

  function render(job) {
    var status = document.getElementById("job-status");
    status.className = "badge status-" + job.status;
    status.textContent = job.status;
    document.getElementById("job-tags").textContent = job.tags_used || "not yet chosen";
    var body = document.getElementById("stage-rows");
    body.replaceChildren.apply(body, job.stages.map(row));
    var errorBox = document.getElementById("job-error");
    if (job.error_message) {
      document.getElementById("job-error-stage").textContent = job.failed_stage || "error";
      document.getElementById("job-error-message").textContent = job.error_message;
      errorBox.hidden = false;
    }
    if (job.audio_ready) {
      var audio = document.getElementById("audio");
      if (!audio.getAttribute("src")) { audio.src = audioUrl; }
      document.getElementById("player").hidden = false;
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
