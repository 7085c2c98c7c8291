// songpipe admin: confirmation prompts and live progress of a running job (polls a JSON route).
(function () {
  "use strict";

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  // compare: play A, then B when A ends (one at a time, so the two can be told apart)
  var playBoth = document.getElementById("play-both");
  if (playBoth) {
    playBoth.addEventListener("click", function () {
      var a = document.getElementById(playBoth.getAttribute("data-a"));
      var b = document.getElementById(playBoth.getAttribute("data-b"));
      b.pause();
      a.currentTime = 0;
      a.onended = function () { b.currentTime = 0; b.play(); a.onended = null; };
      a.play();
    });
  }

  // the job list refreshes itself every 5 s while jobs are queued or running: it fetches the same
  // page and swaps in the table and the status tabs (no navigation, so nothing races a click)
  var refresh = document.getElementById("auto-refresh");
  if (refresh) {
    var refreshSoon = function () {
      window.setTimeout(function () {
        if (document.querySelector("form.filters :focus")) { refreshSoon(); return; }
        fetch(window.location.href, { cache: "no-store", credentials: "same-origin" })
          .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
          .then(function (html) {
            var fresh = new DOMParser().parseFromString(html, "text/html");
            ["table.jobs tbody", "nav.tabs", "#auto-refresh"].forEach(function (selector) {
              var now = document.querySelector(selector), next = fresh.querySelector(selector);
              if (now && next) { now.replaceWith(document.importNode(next, true)); }
            });
            refresh = document.getElementById("auto-refresh");
            if (refresh && Number(refresh.getAttribute("data-active")) > 0) { refreshSoon(); }
          })
          .catch(function () { refreshSoon(); });
      }, 5000);
    };
    if (Number(refresh.getAttribute("data-active")) > 0) { refreshSoon(); }
  }

  var body = document.body;
  var url = body.getAttribute("data-progress-url");
  var initial = body.getAttribute("data-job-status");
  if (!url || (initial !== "queued" && initial !== "running")) { return; }

  function formatRate(p) {
    return p.done + " / " + p.total + " " + p.unit + " · " + p.rate_per_s + " " + p.unit + "/s";
  }

  function update(snapshot) {
    var jobStatus = document.getElementById("job-status");
    if (jobStatus) {
      jobStatus.textContent = snapshot.status;
      jobStatus.className = "status status-" + snapshot.status;
    }
    var known = true;
    snapshot.runs.forEach(function (run) {
      var article = document.querySelector('[data-run-id="' + run.id + '"]');
      if (!article) { known = false; return; }
      var status = article.querySelector('[data-role="status"]');
      if (status) { status.textContent = run.status; status.className = "status status-" + run.status; }
      var progress = article.querySelector("progress");
      var text = article.querySelector('[data-role="progress-text"]');
      if (run.progress && progress) {
        progress.max = run.progress.total;
        progress.value = run.progress.done;
        if (text) { text.textContent = formatRate(run.progress); }
      }
    });
    return known;
  }

  function poll() {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (response) {
        if (!response.ok) { throw new Error("HTTP " + response.status); }
        return response.json();
      })
      .then(function (snapshot) {
        var known = update(snapshot);
        if (snapshot.status !== "queued" && snapshot.status !== "running") {
          window.location.reload();  // the finished record (outputs, artifacts) is rendered server-side
        } else if (!known) {
          window.location.reload();
        } else {
          window.setTimeout(poll, 1000);
        }
      })
      .catch(function () { window.setTimeout(poll, 3000); });
  }

  window.setTimeout(poll, 1000);
})();
