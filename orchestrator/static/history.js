// "My songs": the ids of the songs made in this browser, kept in localStorage (no accounts).
// The song page adds itself; every page lists them, newest first. textContent only, never innerHTML.
(function () {
  "use strict";
  var KEY = "songpipe.my-songs";
  var MAX = 50;

  function load() {
    try { return JSON.parse(localStorage.getItem(KEY) || "[]"); } catch (e) { return []; }
  }

  function remember(song) {
    var songs = load().filter(function (s) { return s.id !== song.id; });
    songs.unshift(song);
    localStorage.setItem(KEY, JSON.stringify(songs.slice(0, MAX)));
  }

  function render() {
    var section = document.getElementById("my-songs");
    if (!section) { return; }
    var list = document.getElementById("my-songs-list");
    var songs = load();
    list.replaceChildren();
    songs.forEach(function (song) {
      var li = document.createElement("li");
      li.dataset.jobId = song.id;
      var a = document.createElement("a");
      a.href = "/jobs/" + song.id;
      a.textContent = song.title || song.id;
      var when = document.createElement("span");
      when.className = "muted";
      when.textContent = " " + (song.created || "").slice(0, 16).replace("T", " ");
      li.append(a, when);
      list.appendChild(li);
    });
    section.hidden = songs.length === 0;
  }

  var job = document.getElementById("job");
  if (job) {
    remember({ id: job.dataset.jobId, title: job.dataset.title, created: job.dataset.created });
  }
  render();
  window.songpipeHistory = { load: load };
})();
