// stoa's web page: log in (password or API token), your agent sessions (create, prompt, a
// live transcript, stop, history) and your terminals in xterm.js over the `stoa.term.v1`
// WebSocket protocol (the table is at the top of src/terminal/protocol.rs). Plain script, no
// bundler: xterm.js and its fit addon are loaded before this file as globals (`Terminal`,
// `FitAddon.FitAddon`). Built into the stoa binary (src/daemon/web_page.rs).
'use strict';

(() => {
  const TOKEN_KEY = 'stoa.token';
  const SUBPROTOCOL = 'stoa.term.v1';
  /** HELLO's resume offset meaning "no replay, from what is current". */
  const FROM_NOW = 0xffffffffffffffffn;
  /** Acknowledge at least this often (bytes), and whenever xterm's write queue drains. */
  const ACK_EVERY = 256 * 1024;
  /** Largest INPUT frame body; a big paste goes out in several frames. */
  const INPUT_CHUNK = 64 * 1024;
  const RESIZE_DEBOUNCE_MS = 75;
  const PING_EVERY_MS = 20000;
  const LIST_REFRESH_MS = 5000;
  /** Reconnect delay of a session's event stream after it ended unexpectedly. */
  const EVENTS_RETRY_MS = 2000;

  // ---- protocol ---------------------------------------------------------------------

  const T = {
    HELLO: 0x01, INPUT: 0x02, RESIZE: 0x03, ACK: 0x04, SIGNAL: 0x05, PING: 0x06,
    WELCOME: 0x81, OUTPUT: 0x82, SNAPSHOT: 0x83, SIZE: 0x84, EXIT: 0x85, PONG: 0x86, ERROR: 0x87,
  };

  function frame(type, bodyLen) {
    const buf = new ArrayBuffer(1 + bodyLen);
    const v = new DataView(buf);
    v.setUint8(0, type);
    return [buf, v];
  }

  /** Offsets are Numbers here (exact below 2^53 bytes); `null` resume means FROM_NOW. */
  const encode = {
    hello(resume, cols, rows, wantWrite) {
      const [buf, v] = frame(T.HELLO, 8 + 2 + 2 + 1);
      v.setBigUint64(1, resume == null ? FROM_NOW : BigInt(resume), true);
      v.setUint16(9, cols, true);
      v.setUint16(11, rows, true);
      v.setUint8(13, wantWrite ? 1 : 0);
      return buf;
    },
    input(bytes) {
      const out = new Uint8Array(1 + bytes.length);
      out[0] = T.INPUT;
      out.set(bytes, 1);
      return out.buffer;
    },
    resize(cols, rows) {
      const [buf, v] = frame(T.RESIZE, 4);
      v.setUint16(1, cols, true);
      v.setUint16(3, rows, true);
      return buf;
    },
    ack(consumed) {
      const [buf, v] = frame(T.ACK, 8);
      v.setBigUint64(1, BigInt(consumed), true);
      return buf;
    },
    signal(sig) {
      const [buf, v] = frame(T.SIGNAL, 1);
      v.setUint8(1, sig);
      return buf;
    },
    ping(t) {
      const [buf, v] = frame(T.PING, 8);
      v.setBigUint64(1, BigInt(t), true);
      return buf;
    },
  };

  function decodeExit(v, at) {
    return { kind: v.getUint8(at) === 0 ? 'exited' : 'signaled', code: v.getInt32(at + 1, true) };
  }

  /** One server frame (an ArrayBuffer) as an object; throws on a malformed frame. */
  function decode(buf) {
    const v = new DataView(buf);
    const need = (n) => {
      if (buf.byteLength < n) throw new Error(`frame 0x${v.getUint8(0).toString(16)} too short`);
    };
    need(1);
    const type = v.getUint8(0);
    switch (type) {
      case T.WELCOME: {
        need(26);
        const f = {
          type, canWrite: v.getUint8(1) !== 0, window: v.getUint32(2, true),
          oldest: Number(v.getBigUint64(6, true)), current: Number(v.getBigUint64(14, true)),
          cols: v.getUint16(22, true), rows: v.getUint16(24, true), exit: null,
        };
        if (buf.byteLength >= 31) f.exit = decodeExit(v, 26);
        return f;
      }
      case T.OUTPUT:
        need(9);
        return { type, offset: Number(v.getBigUint64(1, true)), data: new Uint8Array(buf, 9) };
      case T.SNAPSHOT:
        need(13);
        return {
          type, offset: Number(v.getBigUint64(1, true)), cols: v.getUint16(9, true),
          rows: v.getUint16(11, true), data: new Uint8Array(buf, 13),
        };
      case T.SIZE:
        need(5);
        return { type, cols: v.getUint16(1, true), rows: v.getUint16(3, true) };
      case T.EXIT:
        need(6);
        return { type, exit: decodeExit(v, 1) };
      case T.PONG:
        need(9);
        return { type, t: Number(v.getBigUint64(1, true)) };
      case T.ERROR:
        need(3);
        return {
          type, code: v.getUint16(1, true),
          message: new TextDecoder().decode(new Uint8Array(buf, 3)),
        };
      default:
        throw new Error(`unknown frame type 0x${type.toString(16)}`);
    }
  }

  function exitText(exit) {
    return exit.kind === 'exited' ? `exited with ${exit.code}` : `killed by signal ${exit.code}`;
  }

  // ---- REST -------------------------------------------------------------------------

  class HttpError extends Error {
    constructor(status, message, rule) {
      super(message);
      this.status = status;
      this.rule = rule || null;
    }
  }

  /** How this tab is logged in: `{ kind: 'token' }` (Authorization: Bearer, kept in
   * sessionStorage) or `{ kind: 'cookie', csrf }` (the HttpOnly session cookie of POST
   * /login; every state-changing request carries X-CSRF-Token). `null`: logged out. */
  let auth = null;

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  function authHeaders(method) {
    const h = {};
    if (auth && auth.kind === 'token') h.Authorization = `Bearer ${token()}`;
    if (auth && auth.kind === 'cookie' && method !== 'GET' && method !== 'HEAD') {
      h['X-CSRF-Token'] = auth.csrf;
    }
    return h;
  }

  /** The server's words for a failed response. */
  function errorText(status, value, statusText) {
    let msg = (value && value.error) || (typeof value === 'string' && value.trim()) || statusText;
    if (value && value.rule) msg += ` (rule: ${value.rule})`;
    if (status === 429 && !/try|wait/i.test(msg)) msg += '; wait a little and try again';
    if (status === 503 && !msg) msg = 'stoa is not ready (the broker is not connected)';
    return msg || `HTTP ${status}`;
  }

  async function api(method, path, body) {
    const headers = authHeaders(method);
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    let resp;
    try {
      resp = await fetch(path, {
        method, headers, credentials: 'same-origin',
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (e) {
      throw new HttpError(0, `cannot reach stoa (${e.message}); is it running?`);
    }
    const text = await resp.text();
    let value = null;
    try { value = text ? JSON.parse(text) : null; } catch (_) { value = text; }
    if (!resp.ok) {
      const msg = errorText(resp.status, value, resp.statusText);
      if (resp.status === 401 && auth) {
        loggedOut(auth.kind === 'token' ? `The token was refused: ${msg}` :
          `You are logged out: ${msg}. Log in again.`);
      }
      throw new HttpError(resp.status, msg, value && value.rule);
    }
    return value;
  }

  // ---- one terminal in xterm.js -----------------------------------------------------

  class TermView {
    constructor(container) {
      this.container = container;
      this.term = new Terminal({
        cursorBlink: true,
        scrollback: 5000,
        fontFamily: 'ui-monospace, "DejaVu Sans Mono", Menlo, Consolas, monospace',
        fontSize: 14,
        theme: { background: '#000000' },
      });
      this.fitAddon = new FitAddon.FitAddon();
      this.term.loadAddon(this.fitAddon);
      this.term.open(container);
      this.fitAddon.fit();

      this.id = null;
      this.readOnly = false;
      this.ws = null;
      this.disposed = false;
      this.exit = null;       // from WELCOME (already dead) or EXIT
      this.exitShown = false;
      this.closedForGood = false;
      this.canWrite = false;
      this.welcomed = false;
      this.ackEvery = ACK_EVERY;
      this.next = null;       // offset after the last byte received (resume point)
      this.consumed = 0;      // offset after the last byte xterm has processed
      this.epoch = 0;         // bumped when the server's offsets start again
      this.acked = 0;         // last offset acknowledged on the current socket
      this.pendingWrites = 0;
      this.applyingServerSize = false;
      this.lastSize = null;   // last size sent to the server
      this.attempts = 0;
      this.retryTimer = null;
      this.pingTimer = null;
      this.onState = () => {};
      this.inputFilter = null; // the key bar's sticky Ctrl
      this.onEnded = () => {};
      // Counters for tests and the render benchmark.
      this.stats = { frames: 0, received: 0, written: 0, firstOutputAt: 0, lastWriteAt: 0, connects: 0 };

      const encoder = new TextEncoder();
      this.term.onData((s) => this.sendInput(encoder.encode(this.inputFilter ? this.inputFilter(s) : s)));
      this.term.onBinary((s) => {
        const bytes = new Uint8Array(s.length);
        for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i) & 0xff;
        this.sendInput(bytes);
      });
      this.term.onResize(({ cols, rows }) => {
        if (!this.applyingServerSize) this.sendSize(cols, rows);
      });
    }

    size() {
      return { cols: this.term.cols, rows: this.term.rows };
    }

    fit() {
      if (!this.disposed) this.fitAddon.fit();
    }

    /**
     * Attaches to terminal `id` (and reattaches after unexpected closes, from where it was).
     * `resume`: 0 replays all the server still keeps (a fresh terminal's prompt, an old
     * one's recent screen); `null` starts from what is current.
     */
    attach(id, { readOnly = false, resume = 0, shared = false } = {}) {
      this.id = id;
      this.readOnly = readOnly;
      // Another user's terminal, shared with this one: its socket is opened with the
      // log-in cookie (a ticket comes from one's own terminals only).
      this.shared = shared;
      this.next = resume;
      this.term.options.disableStdin = readOnly;
      this.connect();
    }

    state(text, bad = false) {
      this.onState(text, bad);
    }

    async connect() {
      this.retryTimer = null;
      if (this.disposed) return;
      this.state(this.stats.connects ? 'reconnecting…' : 'connecting…');
      let ticket = null;
      try {
        if (!this.shared) {
          ticket = (await api('POST', `/terminals/${encodeURIComponent(this.id)}/ticket`, {})).ticket;
        }
      } catch (e) {
        if (this.disposed) return;
        if (e.status === 404 || e.status === 403 || e.status === 401) {
          this.giveUp(e.status === 404 ? 'terminal is gone' : e.message);
        } else {
          this.retry(e.message);
        }
        return;
      }
      if (this.disposed) return;
      const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
      const query = [];
      if (ticket) query.push(`ticket=${encodeURIComponent(ticket)}`);
      if (this.readOnly) query.push('mode=view');
      const url = `${scheme}//${location.host}/terminals/${encodeURIComponent(this.id)}/ws` +
        (query.length ? `?${query.join('&')}` : '');
      const ws = new WebSocket(url, SUBPROTOCOL);
      ws.binaryType = 'arraybuffer';
      this.ws = ws;
      this.welcomed = false;
      ws.onopen = () => {
        if (ws !== this.ws) return;
        this.stats.connects++;
        const { cols, rows } = this.size();
        this.lastSize = { cols, rows };
        // Data still queued in xterm from an earlier socket will be acknowledged on this
        // one; the server counts from the resume point.
        this.acked = this.next == null ? this.consumed : this.next;
        ws.send(encode.hello(this.next, cols, rows, !this.readOnly));
      };
      ws.onmessage = (ev) => {
        if (ws !== this.ws) return;
        let f;
        try {
          f = decode(ev.data);
        } catch (e) {
          this.state(`bad frame from server: ${e.message}`, true);
          return;
        }
        this.handle(f);
      };
      ws.onclose = (ev) => {
        if (ws !== this.ws) return;
        this.ws = null;
        this.stopPing();
        if (this.disposed) return;
        if (this.exit) {
          this.showExit();
          return;
        }
        // A share that ended (revoked or expired) is not retried.
        if (this.shared && ev.code === 1008) {
          this.giveUp(`no longer shared with you (${ev.reason || 'the share ended'})`);
          refreshList();
          return;
        }
        // Not an exit: the daemon restarted, the network dropped, … The terminal may well
        // still be running: reattach from where we were.
        this.retry(`connection closed (${ev.code}${ev.reason ? ' ' + ev.reason : ''})`);
      };
    }

    retry(why) {
      if (this.disposed || this.closedForGood) return;
      this.attempts++;
      if (this.attempts > 12) {
        this.giveUp(`${why}; gave up reconnecting`);
        return;
      }
      const delay = Math.min(250 * 2 ** (this.attempts - 1), 5000);
      this.state(`${why}; reconnecting in ${(delay / 1000).toFixed(1)} s`, true);
      this.retryTimer = setTimeout(() => this.connect(), delay);
    }

    giveUp(why) {
      this.closedForGood = true;
      this.state(why, true);
      this.onEnded();
    }

    handle(f) {
      switch (f.type) {
        case T.WELCOME:
          this.welcomed = true;
          this.attempts = 0;
          this.canWrite = f.canWrite;
          this.term.options.disableStdin = !f.canWrite;
          this.ackEvery = Math.max(1024, Math.min(ACK_EVERY, Math.floor(f.window / 4)));
          if (this.next == null || f.current < this.next) {
            // From now; or the server counts from 0 again (a restarted daemon took the
            // terminal back): keep the screen, continue from the server's offset. Writes
            // still queued from before must not acknowledge old offsets.
            this.epoch++;
            this.next = f.current;
            this.acked = f.current;
            this.consumed = f.current;
          }
          if (f.exit) this.exit = f.exit;
          if (this.canWrite) {
            // The server keeps the terminal's size until a writer resizes: make it ours.
            const want = this.fitAddon.proposeDimensions();
            if (want && (want.cols !== f.cols || want.rows !== f.rows)) {
              this.lastSize = null;
              this.term.resize(want.cols, want.rows);
              this.sendSize(want.cols, want.rows);
            } else {
              this.applyServerSize(f.cols, f.rows);
            }
          } else {
            this.applyServerSize(f.cols, f.rows);
          }
          this.state(this.describe());
          this.startPing();
          break;
        case T.OUTPUT:
          this.output(f.offset, f.data);
          break;
        case T.SNAPSHOT:
          // The server no longer has what we missed: a redraw of the screen, then OUTPUT
          // continues from its offset.
          this.term.reset();
          this.applyServerSize(f.cols, f.rows);
          this.next = f.offset;
          this.write(f.data, f.offset);
          break;
        case T.SIZE:
          this.applyServerSize(f.cols, f.rows);
          break;
        case T.EXIT:
          this.exit = f.exit;
          this.showExit();
          // The server closes (1000) next and waits for our close: the browser answers it.
          break;
        case T.PONG:
          this.rtt = Math.max(0, Math.round((performance.now() * 1000 - f.t) / 100) / 10);
          if (!this.exit) this.state(this.describe());
          break;
        case T.ERROR:
          this.state(`server: ${f.message} (error ${f.code})`, true);
          break;
      }
    }

    describe() {
      let s = this.canWrite ? 'connected' : 'connected, read-only';
      if (this.rtt != null) s += ` · ${this.rtt} ms`;
      return s;
    }

    output(offset, data) {
      this.stats.frames++;
      if (!this.stats.firstOutputAt) this.stats.firstOutputAt = performance.now();
      let end = offset + data.length;
      if (this.next != null) {
        if (end <= this.next) return; // already have it (a replay after reconnecting)
        if (offset < this.next) {
          data = data.subarray(this.next - offset);
          offset = this.next;
        }
      }
      this.next = end;
      this.stats.received += data.length;
      this.write(data, end);
    }

    /** Writes to xterm; once parsed, `end` counts as consumed and may be acknowledged. */
    write(data, end) {
      this.pendingWrites++;
      const n = data.length;
      const epoch = this.epoch;
      this.term.write(data, () => {
        this.pendingWrites--;
        this.stats.written += n;
        this.stats.lastWriteAt = performance.now();
        if (epoch !== this.epoch) return;
        if (end > this.consumed) this.consumed = end;
        if (this.consumed > this.acked &&
            (this.consumed - this.acked >= this.ackEvery || this.pendingWrites === 0)) {
          this.acked = this.consumed;
          this.send(encode.ack(this.consumed));
        }
      });
    }

    showExit() {
      if (this.exitShown || this.disposed) return;
      this.exitShown = true;
      this.closedForGood = true;
      this.term.write(`\r\n\x1b[2m[${exitText(this.exit)}]\x1b[0m\r\n`);
      this.state(exitText(this.exit));
      this.onEnded();
    }

    applyServerSize(cols, rows) {
      if (!cols || !rows || (cols === this.term.cols && rows === this.term.rows)) return;
      this.applyingServerSize = true;
      try {
        this.term.resize(cols, rows);
      } finally {
        this.applyingServerSize = false;
      }
      this.lastSize = { cols, rows };
    }

    send(buf) {
      if (this.ws && this.ws.readyState === WebSocket.OPEN) this.ws.send(buf);
    }

    sendInput(bytes) {
      if (!this.canWrite || this.exit) return;
      for (let at = 0; at < bytes.length; at += INPUT_CHUNK) {
        this.send(encode.input(bytes.subarray(at, at + INPUT_CHUNK)));
      }
    }

    sendSize(cols, rows) {
      if (!this.welcomed || !this.canWrite || this.exit) return;
      if (this.lastSize && this.lastSize.cols === cols && this.lastSize.rows === rows) return;
      this.lastSize = { cols, rows };
      this.send(encode.resize(cols, rows));
    }

    signal(sig) {
      this.send(encode.signal(sig));
    }

    startPing() {
      this.stopPing();
      this.pingTimer = setInterval(() => {
        this.send(encode.ping(Math.round(performance.now() * 1000)));
      }, PING_EVERY_MS);
    }

    stopPing() {
      if (this.pingTimer) clearInterval(this.pingTimer);
      this.pingTimer = null;
    }

    dispose() {
      this.disposed = true;
      this.stopPing();
      if (this.retryTimer) clearTimeout(this.retryTimer);
      if (this.ws) {
        const ws = this.ws;
        this.ws = null;
        ws.close(1000, 'closed by the user');
      }
      this.term.dispose();
      this.container.remove();
    }
  }

  // ---- the page ---------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const encoder = new TextEncoder();
  /** Open terminals, by `<id>` or `<id>/view`; one of them (`view`) shows. */
  const views = new Map();
  let view = null;
  let newCount = 0;
  let listTimer = null;
  let me = null;

  function setText(id, text, bad) {
    const el = $(id);
    el.textContent = text;
    el.classList.toggle('bad', !!bad);
  }

  function closeMenu() {
    document.body.classList.remove('menu-open');
    $('menu').setAttribute('aria-expanded', 'false');
  }

  /** Shows the terminals or the open session in the main area. */
  function showPane(kind) {
    $('viewer').hidden = kind !== 'terminal';
    $('session-view').hidden = kind !== 'session';
    if (kind === 'terminal' && view) scheduleFit();
    closeMenu();
  }

  // ---- terminals ----

  function renderTabs() {
    const bar = $('term-tabs');
    bar.replaceChildren(...[...views.values()].map((v) => {
      const tab = document.createElement('div');
      tab.className = 'tab';
      tab.setAttribute('role', 'tab');
      tab.dataset.key = v.key;
      tab.classList.toggle('current', v === view);
      tab.setAttribute('aria-selected', v === view ? 'true' : 'false');
      const name = document.createElement('span');
      name.textContent = v.id ? `${v.id.replace(/^u\d+-/, '').slice(0, 8)}${v.readOnly ? ' (view)' : ''}` : v.title;
      tab.title = v.title;
      const close = document.createElement('button');
      close.type = 'button';
      close.className = 'close';
      close.textContent = '×';
      close.title = 'Close this tab (the terminal keeps running)';
      close.addEventListener('click', (ev) => { ev.stopPropagation(); closeTab(v); });
      tab.append(name, close);
      tab.addEventListener('click', () => selectView(v));
      return tab;
    }));
  }

  function selectView(v) {
    view = v;
    for (const other of views.values()) other.container.hidden = other !== v;
    if (v) {
      $('term-title').textContent = v.title;
      setText('term-status', v.lastState[0], v.lastState[1]);
      const hash = v.id ? `#/t/${v.id}${v.readOnly ? '/view' : ''}` : '';
      if (hash && location.hash !== hash) history.replaceState(null, '', hash);
      showPane('terminal');
      v.fit();
      v.term.focus();
    } else {
      $('term-title').textContent = 'No terminal open';
      setText('term-status', '');
    }
    renderTabs();
    markCurrent();
  }

  function newView(title) {
    const pane = document.createElement('div');
    pane.className = 'pane';
    $('term').append(pane);
    const v = new TermView(pane);
    v.key = `new-${++newCount}`;
    v.title = title;
    v.lastState = ['', false];
    v.onState = (text, bad) => {
      v.lastState = [text, bad];
      if (v === view) setText('term-status', text, bad);
    };
    v.onEnded = () => refreshList();
    v.inputFilter = ctrlFilter;
    views.set(v.key, v);
    return v;
  }

  function rekey(v, key) {
    views.delete(v.key);
    v.key = key;
    views.set(key, v);
  }

  /** Closes one tab; another open one shows in its place. */
  function closeTab(v) {
    v.dispose();
    views.delete(v.key);
    if (v === view) {
      const rest = [...views.values()];
      selectView(rest.length ? rest[rest.length - 1] : null);
    } else {
      renderTabs();
    }
  }

  function closeAllTabs() {
    for (const v of [...views.values()]) v.dispose();
    views.clear();
    selectView(null);
  }

  function open(id, readOnly, shared = false) {
    const key = `${id}${readOnly ? '/view' : ''}`;
    const had = views.get(key);
    if (had && !had.closedForGood) {
      selectView(had);
      return;
    }
    if (had) closeTab(had);
    const v = newView(`${id}${readOnly ? ' (view only)' : ''}`);
    rekey(v, key);
    selectView(v);
    v.attach(id, { readOnly, shared });
  }

  // ---- sharing ----

  /** Asks whom to share terminal `id` with, and how; the server records it. */
  async function share(id) {
    const user = (window.prompt(`Share ${id} with which Unix user?`) || '').trim();
    if (!user) return;
    const minutes = (window.prompt(
      'Let them type for how many minutes? (leave empty: they only watch)') || '').trim();
    const body = { unix_user: user };
    if (minutes) {
      body.input = true;
      body.minutes = Number(minutes);
    }
    $('list-error').textContent = '';
    try {
      await api('POST', `/terminals/${encodeURIComponent(id)}/shares`, body);
    } catch (e) {
      $('list-error').textContent = `Could not share ${id} with ${user}: ${e.message}`;
    }
    refreshList();
  }

  async function unshare(id, user) {
    $('list-error').textContent = '';
    try {
      await api('DELETE', `/terminals/${encodeURIComponent(id)}/shares/${encodeURIComponent(user)}`);
    } catch (e) {
      $('list-error').textContent = `Could not stop sharing ${id} with ${user}: ${e.message}`;
    }
    refreshList();
  }

  function until(expires) {
    return expires ? ` until ${new Date(expires * 1000).toLocaleTimeString()}` : '';
  }

  /** A new terminal in a new tab. If the server refuses it, the tab goes and the terminal
   * that was showing stays as it was. */
  async function createTerminal(ev) {
    ev.preventDefault();
    $('list-error').textContent = '';
    const before = view;
    const v = newView('new terminal');
    selectView(v);
    const { cols, rows } = v.size();
    const body = { cols, rows };
    const user = $('new-unix-user').value.trim();
    const cwd = $('new-cwd').value.trim();
    if (user) body.unix_user = user;
    if (cwd) body.cwd = cwd;
    let info;
    try {
      info = await api('POST', '/terminals', body);
    } catch (e) {
      if (views.get(v.key) === v) {
        v.dispose();
        views.delete(v.key);
        selectView(before && views.get(before.key) === before ? before : null);
      }
      $('list-error').textContent = `Could not open a terminal: ${e.message}`;
      return;
    }
    if (views.get(v.key) !== v) return; // closed while it was being created
    const id = info.terminal_id;
    rekey(v, id);
    v.title = `${id} · ${info.unix_user}`;
    v.attach(id);
    if (v === view) selectView(v);
    refreshList();
  }

  async function kill(id) {
    $('list-error').textContent = '';
    try {
      await api('DELETE', `/terminals/${encodeURIComponent(id)}`);
    } catch (e) {
      $('list-error').textContent = `Could not end ${id}: ${e.message}`;
    }
    refreshList();
  }

  function markCurrent() {
    for (const li of $('terminals').children) {
      li.classList.toggle('current', !!view && li.dataset.id === view.id);
    }
    for (const li of $('sessions').children) {
      li.classList.toggle('current', !!current && li.dataset.id === current.id);
    }
  }

  function button(text, title, onClick, cls) {
    const b = document.createElement('button');
    b.type = 'button';
    b.textContent = text;
    b.title = title;
    if (cls) b.className = cls;
    b.addEventListener('click', (ev) => { ev.stopPropagation(); onClick(); });
    return b;
  }

  function itemLine(idText, ...buttons) {
    const line1 = document.createElement('div');
    line1.className = 'line1';
    const id = document.createElement('span');
    id.className = 'id';
    id.textContent = idText;
    id.title = idText;
    line1.append(id, ...buttons);
    return line1;
  }

  function meta(text) {
    const m = document.createElement('div');
    m.className = 'meta';
    m.textContent = text;
    return m;
  }

  async function refreshList() {
    if (!auth) return;
    let value;
    try {
      value = await api('GET', '/terminals');
    } catch (e) {
      $('list-error').textContent = `Could not list your terminals: ${e.message}`;
      return;
    }
    const items = Array.isArray(value) ? value : (value && value.terminals) || [];
    let shares = [];
    try {
      shares = await api('GET', '/shares');
    } catch (_) { /* an older server: no sharing */ }
    const mine = me && me.unix_user;
    const given = (id) => shares.filter((s) => s.object === id && s.owner === mine);
    const received = shares.filter((s) => s.grantee === mine);
    $('terminals').replaceChildren(...items.map((t) => {
      const li = document.createElement('li');
      li.dataset.id = t.terminal_id;
      li.classList.toggle('dead', !t.running);
      const buttons = [button('view', 'Watch without typing', () => open(t.terminal_id, true))];
      if (t.running && t.unix_user === mine) {
        buttons.push(button('share', 'Let another user watch (or type)', () => share(t.terminal_id), 'share'));
      }
      if (t.running) {
        buttons.push(button('kill', 'End this terminal and its programs',
          () => kill(t.terminal_id), 'danger kill'));
      } else {
        buttons.push(button('remove', 'Remove it from the list', () => {
          for (const v of [...views.values()]) if (v.id === t.terminal_id) closeTab(v);
          kill(t.terminal_id);
        }, 'remove'));
      }
      const cmd = Array.isArray(t.command) ? t.command.join(' ') : (t.command || 'shell');
      let status = 'running';
      if (!t.running) {
        status = t.signal != null ? `killed by signal ${t.signal}` : `exited with ${t.exit_code}`;
      }
      const viewers = t.viewers ? ` · ${t.viewers} viewer${t.viewers === 1 ? '' : 's'}` : '';
      li.append(itemLine(t.terminal_id, ...buttons),
        meta(`${t.unix_user} · ${cmd} · ${status}${viewers}`));
      for (const s of given(t.terminal_id)) {
        const line = meta(`shared with ${s.grantee}${s.input ? ', who may type' : ', to watch'}${until(s.expires_at)} `);
        line.classList.add('share');
        line.append(button('unshare', `Stop sharing with ${s.grantee}`,
          () => unshare(t.terminal_id, s.grantee), 'danger unshare'));
        li.append(line);
      }
      li.addEventListener('click', () => open(t.terminal_id, false));
      return li;
    }));
    $('shared-heading').hidden = received.length === 0;
    $('shared').replaceChildren(...received.map((s) => {
      const li = document.createElement('li');
      li.dataset.id = s.object;
      const buttons = [button('watch', 'Watch it', () => open(s.object, true, true), 'watch')];
      if (s.input) buttons.push(button('type', 'Use it (you may type)', () => open(s.object, false, true), 'type'));
      li.append(itemLine(s.object, ...buttons),
        meta(`${s.owner}'s terminal${s.input ? ', you may type' : ', to watch'}${until(s.expires_at)}`));
      li.addEventListener('click', () => open(s.object, !s.input, true));
      return li;
    }));
    markCurrent();
  }

  // ---- the key bar: keys a phone keyboard lacks ----

  let ctrlArmed = false;

  function armCtrl(on) {
    ctrlArmed = on;
    document.querySelector('#keybar [data-key="ctrl"]').setAttribute('aria-pressed', on ? 'true' : 'false');
  }

  /** With Ctrl armed, the next key typed goes out as its control character. */
  function ctrlFilter(s) {
    if (!ctrlArmed || s.length !== 1) return s;
    armCtrl(false);
    const c = s.toUpperCase().charCodeAt(0);
    if (c >= 0x40 && c <= 0x5f) return String.fromCharCode(c & 0x1f);
    if (s === ' ') return '\x00';
    if (s === '?') return '\x7f';
    return s;
  }

  function pressKey(key) {
    if (!view) return;
    if (key === 'ctrl') {
      armCtrl(!ctrlArmed);
    } else {
      const app = view.term.modes && view.term.modes.applicationCursorKeysMode;
      const arrow = (c) => (app ? `\x1bO${c}` : `\x1b[${c}`);
      const bytes = {
        esc: '\x1b', tab: '\t', 'ctrl-c': '\x03',
        up: arrow('A'), down: arrow('B'), right: arrow('C'), left: arrow('D'),
      }[key];
      if (bytes) {
        armCtrl(false);
        view.sendInput(encoder.encode(bytes));
      }
    }
    view.term.focus();
  }

  // ---- sessions ----

  /** The open session: `{ id, info, lastSeq, abort, tasks: Map, lastText }`. */
  let current = null;

  async function refreshSessions() {
    if (!auth) return;
    let value;
    try {
      value = await api('GET', '/sessions');
    } catch (e) {
      $('sessions-error').textContent = `Could not list your sessions: ${e.message}`;
      return;
    }
    const items = Array.isArray(value) ? value : (value && value.sessions) || [];
    items.sort((a, b) => String(b.updated_at).localeCompare(String(a.updated_at)));
    $('sessions').replaceChildren(...items.map((s) => {
      const li = document.createElement('li');
      li.dataset.id = s.session_id;
      li.append(itemLine(`${s.agentic_tool} · ${s.session_id}`),
        meta(`${s.worktree} · ${s.status}`));
      li.addEventListener('click', () => openSession(s.session_id));
      return li;
    }));
    markCurrent();
  }

  async function createSession(ev) {
    ev.preventDefault();
    $('sessions-error').textContent = '';
    const body = { agentic_tool: $('new-tool').value, worktree: $('new-worktree').value.trim() };
    let s;
    try {
      s = await api('POST', '/sessions', body);
    } catch (e) {
      $('sessions-error').textContent = `Could not create the session: ${e.message}`;
      return;
    }
    await refreshSessions();
    openSession(s.session_id);
  }

  function closeSession() {
    if (!current) return;
    current.closed = true;
    current.abort.abort();
    current = null;
  }

  async function openSession(id) {
    closeSession();
    const s = {
      id, info: null, lastSeq: 0, abort: new AbortController(), tasks: new Map(),
      shownTasks: new Set(), endShown: new Set(), lastText: null, closed: false,
      approvals: new Map(),
    };
    current = s;
    $('transcript').replaceChildren();
    $('approvals').replaceChildren();
    $('session-error').textContent = '';
    $('session-title').textContent = id;
    setText('session-status', 'loading…');
    showPane('session');
    markCurrent();
    history.replaceState(null, '', `#/s/${id}`);
    try {
      s.info = await api('GET', `/sessions/${encodeURIComponent(id)}`);
      for (const t of await api('GET', `/sessions/${encodeURIComponent(id)}/tasks`)) {
        s.tasks.set(t.task_id, t);
      }
    } catch (e) {
      if (s !== current) return;
      setText('session-status', `Could not open the session: ${e.message}`, true);
      return;
    }
    if (s !== current) return;
    $('session-title').textContent = `${s.info.agentic_tool} · ${s.info.worktree} · ${id}`;
    updateSessionStatus();
    streamEvents(s);
    loadApprovals(s);
    $('prompt').focus();
  }

  /** The session's requests already waiting when it is opened (later ones come as events). */
  async function loadApprovals(s) {
    try {
      for (const a of await api('GET', '/approvals')) {
        if (a.session_id === s.id && s === current) approvalChanged(s, a);
      }
    } catch (e) {
      if (s === current) $('session-error').textContent = `Could not load permission requests: ${e.message}`;
    }
  }

  /** A permission request made or settled: waiting ones are shown above the prompt with
   * their answers; a settled one goes (the transcript records the decision). */
  function approvalChanged(s, a) {
    const had = s.approvals.get(a.approval_id);
    if (had && had.status !== 'pending') return; // settled stays settled
    s.approvals.set(a.approval_id, a);
    renderApprovals(s);
  }

  function renderApprovals(s) {
    const box = $('approvals');
    box.replaceChildren();
    for (const a of s.approvals.values()) {
      if (a.status !== 'pending') continue;
      const card = document.createElement('div');
      card.className = 'approval';
      card.dataset.approval = a.approval_id;
      const label = document.createElement('span');
      label.className = 'label';
      const left = Math.max(0, a.expires_at - Math.floor(Date.now() / 1000));
      label.textContent = `the agent asks to use ${a.tool} (denied in ${Math.ceil(left / 60)} min without an answer)`;
      // All of what allowing lets the agent do: the command first, then every other field.
      const input = document.createElement('pre');
      const rest = a.input && typeof a.input === 'object' && !Array.isArray(a.input)
        ? Object.fromEntries(Object.entries(a.input).filter(([k]) => k !== 'command' && k !== 'description'))
        : null;
      const command = a.input && typeof a.input.command === 'string' ? `$ ${a.input.command}` : null;
      if (command && rest && Object.keys(rest).length === 0) input.textContent = command;
      else if (command) input.textContent = `${command}\n${JSON.stringify(rest, null, 2)}`;
      else input.textContent = JSON.stringify(a.input, null, 2);
      const actions = document.createElement('div');
      actions.className = 'actions';
      const answers = [
        ['Allow', { decision: 'allow' }, ''],
        [`Allow ${a.tool} for this session`, { decision: 'allow', for_session: true }, ''],
        ['Deny', { decision: 'deny' }, 'danger'],
      ];
      for (const [text, body, cls] of answers) {
        const b = document.createElement('button');
        b.type = 'button';
        b.textContent = text;
        if (cls) b.className = cls;
        b.addEventListener('click', () => answerApproval(s, a.approval_id, body, card));
        actions.append(b);
      }
      card.append(label, input, actions);
      box.append(card);
    }
  }

  async function answerApproval(s, id, body, card) {
    for (const b of card.querySelectorAll('button')) b.disabled = true;
    try {
      approvalChanged(s, await api('POST', `/approvals/${encodeURIComponent(id)}`, body));
    } catch (e) {
      $('session-error').textContent = `Could not answer: ${e.message}`;
      // Answered elsewhere meanwhile (409): what it became comes as an event.
      for (const b of card.querySelectorAll('button')) b.disabled = false;
    }
  }

  function runningTask(s) {
    return [...s.tasks.values()].find((t) => ['running', 'waiting', 'queued'].includes(t.status));
  }

  function updateSessionStatus() {
    const s = current;
    if (!s) return;
    const run = runningTask(s);
    $('stop').disabled = !run;
    if (run) {
      setText('session-status', run.status === 'waiting'
        ? 'waiting for your answer to a permission request…' : `${run.status}…`);
    } else {
      const last = [...s.tasks.values()].pop();
      if (!last) setText('session-status', 'idle: send a prompt');
      else {
        const why = last.error ? `: ${last.error}` : '';
        setText('session-status', `last task ${last.status}${why}`, last.status === 'failed');
      }
    }
  }

  function turn(cls, label, text, pre) {
    const div = document.createElement('div');
    div.className = `turn ${cls}`;
    if (label) {
      const l = document.createElement('span');
      l.className = 'label';
      l.textContent = label;
      div.append(l);
    }
    const body = document.createElement(pre ? 'pre' : 'div');
    body.className = 'body';
    body.textContent = text;
    div.append(body);
    const box = $('transcript');
    const atEnd = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    box.append(div);
    if (atEnd) box.scrollTop = box.scrollHeight;
    return div;
  }

  /** The prompt of a task, once, before its first event. */
  function showPrompt(s, taskId) {
    if (s.shownTasks.has(taskId)) return;
    s.shownTasks.add(taskId);
    const t = s.tasks.get(taskId);
    s.lastText = null;
    const div = turn('prompt', 'you', t ? t.prompt : '(a prompt)');
    div.dataset.task = taskId;
    labelPrompt(s, taskId);
  }

  /** A prompt's label says how its task went. */
  function labelPrompt(s, taskId) {
    const t = s.tasks.get(taskId);
    const el = [...$('transcript').querySelectorAll('.turn.prompt')].find((d) => d.dataset.task === taskId);
    if (!t || !el) return;
    const why = t.error ? `: ${t.error}` : '';
    el.querySelector('.label').textContent = `you · ${t.status}${t.status === 'failed' ? why : ''}`;
  }

  function toolInput(name, input) {
    if (input && typeof input === 'object') {
      if (typeof input.command === 'string') return `$ ${input.command}`;
      if (typeof input.file_path === 'string' && Object.keys(input).length === 1) return input.file_path;
    }
    return JSON.stringify(input, null, 2);
  }

  function showMessage(s, m) {
    showPrompt(s, m.task_id);
    const e = m.event || {};
    switch (e.kind) {
      case 'assistant_text':
        if (e.delta && s.lastText && s.lastText.task === m.task_id) {
          s.lastText.el.querySelector('.body').textContent += e.text;
        } else {
          s.lastText = { task: m.task_id, el: turn('text', 'agent', e.text) };
          return;
        }
        break;
      case 'tool_use':
        turn('tool', `tool call: ${e.name}`, toolInput(e.name, e.input), true);
        break;
      case 'tool_result':
        turn(`tool-result${e.is_error ? ' is-error' : ''}`,
          e.is_error ? 'tool result (error)' : 'tool result', e.content || '(no output)', true);
        break;
      case 'result': {
        const bits = [e.is_error ? 'failed' : 'done'];
        if (e.num_turns != null) bits.push(`${e.num_turns} turn${e.num_turns === 1 ? '' : 's'}`);
        if (e.cost_usd != null) bits.push(`$${Number(e.cost_usd).toFixed(4)}`);
        const text = e.is_error && e.text ? `${bits.join(' · ')}: ${e.text}` : bits.join(' · ');
        turn(`result${e.is_error ? ' is-error' : ''}`, null, text);
        break;
      }
      case 'notice':
        turn('notice', 'notice', e.message);
        break;
      case 'session_started':
      case 'permission_request':
        break; // says nothing a person needs; a request is shown above the prompt
      case 'permission_decision': {
        const by = e.by ? ` by ${e.by}` : '';
        const why = e.reason ? `: ${e.reason}` : '';
        turn(`decision ${e.decision === 'allowed' ? '' : 'denied'}`, null,
          `${e.tool} ${e.decision}${e.for_session ? ' for the session' : ''}${by}${e.decision === 'allowed' ? '' : why}`);
        break;
      }
      default:
        turn('raw', e.kind || 'event', JSON.stringify(e.value !== undefined ? e.value : e, null, 2), true);
    }
    s.lastText = null;
  }

  /** How far a task has got: a late or replayed event never moves it back. */
  const STAGE = { queued: 0, running: 1, waiting: 1, completed: 2, failed: 2, stopped: 2 };

  function taskChanged(s, t) {
    const had = s.tasks.get(t.task_id);
    if (had && (STAGE[t.status] ?? 0) < (STAGE[had.status] ?? 0)) {
      t = { ...t, status: had.status };
    }
    s.tasks.set(t.task_id, { ...(had || {}), ...t });
    if (['running', 'waiting', 'queued'].includes(t.status)) showPrompt(s, t.task_id);
    if ((t.status === 'failed' || t.status === 'stopped') && !s.endShown.has(t.task_id)) {
      s.endShown.add(t.task_id);
      showPrompt(s, t.task_id);
      const why = t.error ? `: ${t.error}` : '';
      turn('result is-error', null, `task ${t.status}${why}`);
    }
    labelPrompt(s, t.task_id);
    updateSessionStatus();
    refreshSessions();
  }

  /** The session's Server-Sent Events, read with fetch (EventSource cannot send a token),
   * resumed from the last message after a drop. */
  async function streamEvents(s) {
    const url = `/sessions/${encodeURIComponent(s.id)}/events`;
    while (!s.closed) {
      try {
        const resp = await fetch(url, {
          headers: { ...authHeaders('GET'), 'Last-Event-ID': String(s.lastSeq), Accept: 'text/event-stream' },
          credentials: 'same-origin', signal: s.abort.signal,
        });
        if (!resp.ok) {
          const text = await resp.text();
          let value = text;
          try { value = JSON.parse(text); } catch (_) { /* words as they are */ }
          const msg = errorText(resp.status, value, resp.statusText);
          if (resp.status === 401 || resp.status === 404) {
            if (resp.status === 401 && auth) loggedOut(`You are logged out: ${msg}`);
            else $('session-error').textContent = `The session's events stopped: ${msg}`;
            return;
          }
          throw new Error(msg);
        }
        $('session-error').textContent = '';
        const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
        let buf = '';
        let ev = { event: 'message', data: [] };
        for (;;) {
          const { value, done } = await reader.read();
          if (done) break;
          buf += value;
          let nl;
          while ((nl = buf.indexOf('\n')) >= 0) {
            let line = buf.slice(0, nl);
            buf = buf.slice(nl + 1);
            if (line.endsWith('\r')) line = line.slice(0, -1);
            if (line === '') {
              if (ev.data.length && s === current) dispatchEvent(s, ev.event, ev.data.join('\n'));
              ev = { event: 'message', data: [] };
            } else if (!line.startsWith(':')) {
              const colon = line.indexOf(':');
              const field = colon < 0 ? line : line.slice(0, colon);
              let v = colon < 0 ? '' : line.slice(colon + 1);
              if (v.startsWith(' ')) v = v.slice(1);
              if (field === 'event') ev.event = v;
              else if (field === 'data') ev.data.push(v);
            }
          }
        }
      } catch (e) {
        if (s.closed) return;
        $('session-error').textContent = `The session's live events dropped (${e.message}); reconnecting…`;
      }
      if (s.closed) return;
      await new Promise((r) => setTimeout(r, EVENTS_RETRY_MS));
    }
  }

  function dispatchEvent(s, kind, data) {
    let value;
    try { value = JSON.parse(data); } catch (_) { return; }
    if (kind === 'message') {
      if (value.seq <= s.lastSeq) return;
      s.lastSeq = value.seq;
      showMessage(s, value);
    } else if (kind === 'task') {
      taskChanged(s, value);
    } else if (kind === 'approval') {
      approvalChanged(s, value);
    }
  }

  async function sendPrompt(ev) {
    ev.preventDefault();
    const s = current;
    if (!s) return;
    const text = $('prompt').value.trim();
    if (!text) return;
    $('session-error').textContent = '';
    $('send-prompt').disabled = true;
    try {
      const t = await api('POST', `/sessions/${encodeURIComponent(s.id)}/prompt`, { prompt: text });
      $('prompt').value = '';
      if (t && t.task_id) taskChanged(s, { ...t, prompt: t.prompt || text });
    } catch (e) {
      $('session-error').textContent = e.status === 409
        ? `The agent is still working on the last prompt: wait for it, or stop it. (${e.message})`
        : `Could not send the prompt: ${e.message}`;
    } finally {
      $('send-prompt').disabled = false;
    }
  }

  async function stopTask() {
    const s = current;
    if (!s) return;
    try {
      await api('POST', `/sessions/${encodeURIComponent(s.id)}/stop`, {});
      setText('session-status', 'stopping…');
    } catch (e) {
      $('session-error').textContent = `Could not stop the agent: ${e.message}`;
    }
  }

  // ---- logging in and out ----

  function loggedOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    auth = null;
    me = null;
    closeAllTabs();
    closeSession();
    if (listTimer) clearInterval(listTimer);
    listTimer = null;
    $('app').hidden = true;
    $('forget').hidden = true;
    $('menu').hidden = true;
    $('whoami').textContent = '';
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('password').value = '';
    $('username').focus();
  }

  /** Checks the credential with `GET /users/me`, then shows the app. */
  async function loggedIn() {
    try {
      me = await api('GET', '/users/me');
    } catch (e) {
      if (e.status !== 401) loggedOut(`Could not log in: ${e.message}`);
      return;
    }
    if (auth.kind === 'cookie' && me.csrf_token) auth.csrf = me.csrf_token;
    $('login').hidden = true;
    $('login-error').textContent = '';
    $('app').hidden = false;
    $('forget').hidden = false;
    $('forget').textContent = auth.kind === 'cookie' ? 'Log out' : 'Forget token';
    $('menu').hidden = false;
    const name = me.name && me.name !== me.unix_user ? `${me.name}, ` : '';
    $('whoami').textContent = `${name}unix user ${me.unix_user}${me.admin ? ', admin' : ''}`;
    // On a phone, nothing open yet: start on the lists.
    if (!/^#\/[ts]\//.test(location.hash)) document.body.classList.add('menu-open');
    await Promise.all([refreshList(), refreshSessions()]);
    if (!listTimer) {
      listTimer = setInterval(() => { if (!document.hidden) refreshList(); }, LIST_REFRESH_MS);
    }
    openFromHash();
  }

  /** `POST /login` with a Unix user's name and password; the cookie it sets is HttpOnly. */
  async function passwordLogin(ev) {
    ev.preventDefault();
    const username = $('username').value.trim();
    const password = $('password').value;
    $('login-error').textContent = '';
    $('login-submit').disabled = true;
    try {
      let resp;
      try {
        resp = await fetch('/login', {
          method: 'POST', credentials: 'same-origin',
          headers: { 'Content-Type': 'application/json' },
          body: JSON.stringify({ username, password }),
        });
      } catch (e) {
        $('login-error').textContent = `Cannot reach stoa (${e.message}); is it running?`;
        return;
      }
      const text = await resp.text();
      let value = text;
      try { value = text ? JSON.parse(text) : null; } catch (_) { /* words as they are */ }
      if (resp.ok) {
        $('password').value = '';
        auth = { kind: 'cookie', csrf: value && value.csrf_token };
        await loggedIn();
        return;
      }
      const msg = errorText(resp.status, value, resp.statusText);
      $('login-error').textContent = {
        401: `Wrong user name or password. (${msg})`,
        403: `stoa does not let ${username} log in: ${msg}`,
        429: `Too many attempts: ${msg}`,
        404: 'This stoa has no password login (no /login); use an API token below.',
        405: 'This stoa has no password login (no /login); use an API token below.',
      }[resp.status] || `Could not log in: ${msg}`;
      $('password').select();
    } finally {
      $('login-submit').disabled = false;
    }
  }

  async function logOut() {
    if (auth && auth.kind === 'cookie') {
      try {
        await fetch('/logout', { method: 'POST', credentials: 'same-origin', headers: authHeaders('POST') });
      } catch (_) { /* logged out here either way */ }
    }
    loggedOut('');
  }

  function openFromHash() {
    let m = /^#\/t\/([^/]+)(\/view)?$/.exec(location.hash);
    if (m) {
      const had = views.get(`${m[1]}${m[2] ? '/view' : ''}`);
      if (had !== view || !view) open(m[1], !!m[2]);
      return;
    }
    m = /^#\/s\/([^/]+)$/.exec(location.hash);
    if (m && !(current && current.id === m[1])) openSession(m[1]);
  }

  let resizeTimer = null;
  function scheduleFit() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (view) view.fit(); }, RESIZE_DEBOUNCE_MS);
  }

  $('password-login').addEventListener('submit', passwordLogin);
  $('token-login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    auth = { kind: 'token' };
    $('token').value = '';
    loggedIn();
  });
  $('forget').addEventListener('click', logOut);
  $('menu').addEventListener('click', () => {
    const open = document.body.classList.toggle('menu-open');
    $('menu').setAttribute('aria-expanded', open ? 'true' : 'false');
  });
  $('new-terminal').addEventListener('submit', createTerminal);
  $('new-session').addEventListener('submit', createSession);
  $('prompt-form').addEventListener('submit', sendPrompt);
  $('prompt').addEventListener('keydown', (ev) => {
    if (ev.key === 'Enter' && (ev.ctrlKey || ev.metaKey)) sendPrompt(ev);
  });
  $('stop').addEventListener('click', stopTask);
  for (const b of document.querySelectorAll('#keybar button')) {
    // Keep the focus (and a phone's keyboard) on the terminal.
    b.addEventListener('pointerdown', (ev) => ev.preventDefault());
    b.addEventListener('mousedown', (ev) => ev.preventDefault());
    b.addEventListener('click', () => pressKey(b.dataset.key));
  }
  window.addEventListener('resize', scheduleFit);
  new ResizeObserver(scheduleFit).observe($('term'));
  window.addEventListener('hashchange', () => { if (auth) openFromHash(); });

  // For tests and the render benchmark.
  window.stoa = {
    get view() { return view; },
    get views() { return [...views.values()]; },
    get session() { return current; },
    get auth() { return auth && auth.kind; },
    protocol: { T, encode, decode, FROM_NOW },
    refreshList,
  };

  /** A token in this tab, else the session cookie if there is one, else the login form. */
  async function start() {
    if (token()) {
      auth = { kind: 'token' };
      loggedIn();
      return;
    }
    let resp = null;
    try {
      resp = await fetch('/users/me', { credentials: 'same-origin' });
    } catch (_) { /* shown as logged out */ }
    if (resp && resp.ok) {
      const value = await resp.json();
      auth = { kind: 'cookie', csrf: value.csrf_token };
      loggedIn();
    } else {
      loggedOut('');
    }
  }
  start();
})();
