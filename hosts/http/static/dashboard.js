// Treadle dashboard: the only hand-written script. It asks for a confirmation before
// any form (or button) marked data-confirm is submitted, and sends the CSRF token with
// htmx requests. No inline scripts, no eval: the page works under a strict CSP.
(function () {
  "use strict";
  document.addEventListener("submit", function (event) {
    var submitter = event.submitter;
    var message = (submitter && submitter.getAttribute("data-confirm")) ||
      event.target.getAttribute("data-confirm");
    if (message && !window.confirm(message)) {
      event.preventDefault();
    }
  });
  document.addEventListener("htmx:configRequest", function (event) {
    var token = document.body.getAttribute("data-csrf");
    if (token) {
      event.detail.headers["X-CSRF-Token"] = token;
    }
  });
})();
