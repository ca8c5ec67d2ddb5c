// stoa's web page: lists your terminals and shows one in xterm.js over the `stoa.term.v1`
// WebSocket protocol (the table is at the top of src/terminal/protocol.rs). Plain script, no
// bundler: xterm.js and its fit addon are loaded before this file as globals (`Terminal`,
// `FitAddon.FitAddon`).
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
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function token() {
    return sessionStorage.getItem(TOKEN_KEY);
  }

  async function api(method, path, body) {
    const headers = { Authorization: `Bearer ${token()}` };
    if (body !== undefined) headers['Content-Type'] = 'application/json';
    const resp = await fetch(path, {
      method, headers, body: body === undefined ? undefined : JSON.stringify(body),
    });
    const text = await resp.text();
    let value = null;
    try { value = text ? JSON.parse(text) : null; } catch (_) { value = text; }
    if (!resp.ok) {
      const msg = (value && value.error) || (typeof value === 'string' && value) || resp.statusText;
      if (resp.status === 401) loggedOut(`token refused: ${msg}`);
      throw new HttpError(resp.status, `${method} ${path}: ${resp.status} ${msg}`);
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
      this.onEnded = () => {};
      // Counters for tests and the render benchmark.
      this.stats = { frames: 0, received: 0, written: 0, firstOutputAt: 0, lastWriteAt: 0, connects: 0 };

      const encoder = new TextEncoder();
      this.term.onData((s) => this.sendInput(encoder.encode(s)));
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
    attach(id, { readOnly = false, resume = 0 } = {}) {
      this.id = id;
      this.readOnly = readOnly;
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
      let ticket;
      try {
        ticket = (await api('POST', `/terminals/${encodeURIComponent(this.id)}/ticket`, {})).ticket;
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
      let url = `${scheme}//${location.host}/terminals/${encodeURIComponent(this.id)}/ws` +
        `?ticket=${encodeURIComponent(ticket)}`;
      if (this.readOnly) url += '&mode=view';
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
      this.container.replaceChildren();
    }
  }

  // ---- the page ---------------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  let view = null;
  let listTimer = null;

  function setTermStatus(text, bad) {
    const el = $('term-status');
    el.textContent = text;
    el.classList.toggle('bad', !!bad);
  }

  function closeView() {
    if (view) view.dispose();
    view = null;
    $('term-title').textContent = 'No terminal open';
    setTermStatus('');
    markCurrent();
  }

  function newView(title) {
    closeView();
    const v = new TermView($('term'));
    v.onState = (text, bad) => { if (v === view) setTermStatus(text, bad); };
    v.onEnded = () => refreshList();
    $('term-title').textContent = title;
    view = v;
    return v;
  }

  function open(id, readOnly) {
    if (view && view.id === id && view.readOnly === readOnly && !view.closedForGood) {
      view.term.focus();
      return;
    }
    const v = newView(`${id}${readOnly ? ' (view only)' : ''}`);
    const hash = `#/t/${id}${readOnly ? '/view' : ''}`;
    if (location.hash !== hash) history.replaceState(null, '', hash);
    markCurrent();
    v.attach(id, { readOnly });
    v.term.focus();
  }

  async function createTerminal(ev) {
    ev.preventDefault();
    $('list-error').textContent = '';
    const v = newView('new terminal');
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
      if (v === view) closeView();
      $('list-error').textContent = e.message;
      return;
    }
    if (v !== view) return;
    const id = info.terminal_id;
    $('term-title').textContent = `${id} · ${info.unix_user}`;
    history.replaceState(null, '', `#/t/${id}`);
    v.attach(id);
    v.term.focus();
    markCurrent();
    refreshList();
  }

  async function kill(id) {
    $('list-error').textContent = '';
    try {
      await api('DELETE', `/terminals/${encodeURIComponent(id)}`);
    } catch (e) {
      $('list-error').textContent = e.message;
    }
    refreshList();
  }

  function markCurrent() {
    for (const li of $('terminals').children) {
      li.classList.toggle('current', !!view && li.dataset.id === view.id);
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

  async function refreshList() {
    if (!token()) return;
    let value;
    try {
      value = await api('GET', '/terminals');
    } catch (e) {
      $('list-error').textContent = e.message;
      return;
    }
    const items = Array.isArray(value) ? value : (value && value.terminals) || [];
    const ul = $('terminals');
    ul.replaceChildren(...items.map((t) => {
      const li = document.createElement('li');
      li.dataset.id = t.terminal_id;
      li.classList.toggle('dead', !t.running);
      const line1 = document.createElement('div');
      line1.className = 'line1';
      const id = document.createElement('span');
      id.className = 'id';
      id.textContent = t.terminal_id;
      id.title = t.terminal_id;
      line1.append(id);
      line1.append(button('view', 'Watch without typing', () => open(t.terminal_id, true)));
      if (t.running) {
        line1.append(button('kill', 'End this terminal and its programs',
          () => kill(t.terminal_id), 'danger kill'));
      } else {
        line1.append(button('remove', 'Remove it from the list', () => {
          if (view && view.id === t.terminal_id) closeView();
          kill(t.terminal_id);
        }, 'remove'));
      }
      const meta = document.createElement('div');
      meta.className = 'meta';
      const cmd = Array.isArray(t.command) ? t.command.join(' ') : (t.command || 'shell');
      let status = 'running';
      if (!t.running) {
        status = t.signal != null ? `killed by signal ${t.signal}` : `exited with ${t.exit_code}`;
      }
      const viewers = t.viewers ? ` · ${t.viewers} viewer${t.viewers === 1 ? '' : 's'}` : '';
      meta.textContent = `${t.unix_user} · ${cmd} · ${status}${viewers}`;
      li.append(line1, meta);
      li.addEventListener('click', () => open(t.terminal_id, false));
      return li;
    }));
    markCurrent();
  }

  function loggedOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    closeView();
    if (listTimer) clearInterval(listTimer);
    listTimer = null;
    $('app').hidden = true;
    $('forget').hidden = true;
    $('whoami').textContent = '';
    $('login').hidden = false;
    $('login-error').textContent = message || '';
    $('token').focus();
  }

  async function loggedIn() {
    let me;
    try {
      me = await api('GET', '/users/me');
    } catch (e) {
      if (e.status !== 401) loggedOut(e.message);
      return;
    }
    $('login').hidden = true;
    $('app').hidden = false;
    $('forget').hidden = false;
    $('whoami').textContent = `${me.name} (unix user ${me.unix_user}${me.admin ? ', admin' : ''})`;
    await refreshList();
    if (!listTimer) {
      listTimer = setInterval(() => { if (!document.hidden) refreshList(); }, LIST_REFRESH_MS);
    }
    openFromHash();
  }

  function openFromHash() {
    const m = /^#\/t\/([^/]+)(\/view)?$/.exec(location.hash);
    if (m && !(view && view.id === m[1] && view.readOnly === !!m[2])) open(m[1], !!m[2]);
  }

  let resizeTimer = null;
  function scheduleFit() {
    clearTimeout(resizeTimer);
    resizeTimer = setTimeout(() => { if (view) view.fit(); }, RESIZE_DEBOUNCE_MS);
  }

  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const t = $('token').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $('token').value = '';
    loggedIn();
  });
  $('forget').addEventListener('click', () => loggedOut(''));
  $('new-terminal').addEventListener('submit', createTerminal);
  window.addEventListener('resize', scheduleFit);
  new ResizeObserver(scheduleFit).observe($('term'));
  window.addEventListener('hashchange', () => { if (token()) openFromHash(); });

  // For tests and the render benchmark.
  window.stoa = {
    get view() { return view; },
    protocol: { T, encode, decode, FROM_NOW },
    refreshList,
  };

  if (token()) loggedIn(); else loggedOut('');
})();
