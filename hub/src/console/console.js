// The hub console's one script: live updates and form checks. Pages work
// without it (reload to update); with it, each page follows the event log
// over Server-Sent Events (/live) and refreshes its live sections
// (elements with data-live and an id) in place when events arrive. When
// the connection drops it says so and reconnects, resuming after the last
// event it saw.
'use strict';
(() => {
  const status = document.getElementById('live');
  let last = Number(document.body.dataset.after || 0);
  let source = null;
  let retry = null;

  function show(text, state) {
    if (!status) return;
    status.textContent = text;
    status.className = state;
  }

  // One refresh at a time; events arriving meanwhile ask for one more.
  let refreshing = false;
  let again = false;
  async function refresh() {
    if (refreshing) { again = true; return; }
    refreshing = true;
    try {
      do {
        again = false;
        const response = await fetch(location.href, { credentials: 'same-origin', cache: 'no-store' });
        if (!response.ok) break;
        const fresh = new DOMParser().parseFromString(await response.text(), 'text/html');
        for (const section of document.querySelectorAll('[data-live][id]')) {
          const next = fresh.getElementById(section.id);
          // Leave a section alone while someone types in it.
          if (next && !section.contains(document.activeElement)) section.replaceWith(next);
        }
      } while (again);
    } catch (e) {
      // The next event or reconnect tries again.
    } finally {
      refreshing = false;
    }
  }

  function connect() {
    retry = null;
    source = new EventSource('/live?after=' + last);
    source.onopen = () => show('Live: updates as the event log grows.', 'on');
    source.onmessage = (message) => {
      const seq = Number(message.lastEventId);
      if (seq > last) last = seq;
      document.body.dataset.after = String(last);
      refresh();
    };
    source.onerror = () => {
      show('Disconnected from the hub: reconnecting…', 'off');
      source.close();
      if (!retry) retry = setTimeout(() => { connect(); refresh(); }, 2000);
    };
  }

  // A payload field must hold a JSON object (the hub checks it too).
  for (const field of document.querySelectorAll('textarea[data-json-object]')) {
    const check = () => {
      let message = '';
      try {
        const value = JSON.parse(field.value);
        if (value === null || typeof value !== 'object' || Array.isArray(value)) {
          message = 'The payload must be a JSON object, like {"key": "value"}.';
        }
      } catch (e) {
        message = 'Not valid JSON: ' + e.message;
      }
      field.setCustomValidity(message);
    };
    field.addEventListener('input', check);
    check();
  }

  if (status && 'EventSource' in window) connect();
})();
