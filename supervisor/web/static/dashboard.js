// shiftchange dashboard: live blocks and confirmations. No framework, no build.
"use strict";

(function () {
  // Live pages: fetch this same URL asking for its live_* blocks as JSON,
  // and swap them in place; no page reload.
  function startLive() {
    var every = parseInt(document.body.dataset.live || "0", 10);
    if (!every) return;
    var badge = document.getElementById("live");
    var busy = false;
    function refresh() {
      if (busy || document.hidden) return;
      busy = true;
      fetch(window.location.href, { headers: { "X-Shiftchange-Live": "1" }, credentials: "same-origin" })
        .then(function (response) {
          if (!response.ok) throw new Error("HTTP " + response.status);
          return response.json();
        })
        .then(function (data) {
          Object.keys(data.blocks).forEach(function (name) {
            var holder = document.querySelector('[data-live-block="' + name + '"]');
            if (holder && holder.innerHTML !== data.blocks[name]) holder.innerHTML = data.blocks[name];
          });
          if (badge) { badge.classList.remove("lost"); badge.title = "updated " + new Date().toLocaleTimeString(); }
        })
        .catch(function () {
          if (badge) { badge.classList.add("lost"); badge.title = "cannot reach the dashboard; retrying"; }
        })
        .finally(function () { busy = false; });
    }
    window.setInterval(refresh, every);
  }

  // Forms with data-confirm ask first (delete, hand off).
  function confirmForms() {
    document.addEventListener("submit", function (event) {
      var question = event.target.dataset ? event.target.dataset.confirm : null;
      if (question && !window.confirm(question)) event.preventDefault();
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    startLive();
    confirmForms();
  });
})();
