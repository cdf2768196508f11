// kiln's web page: a small hash-routed app over the /v1 API, no framework.
// Routes: #/ (generators), #/generators/NAME (editor, revisions, builds),
// #/builds/ID (one build: targets, timings, errors, live logs).
// Until a session exists, every route shows the login form: an API token is
// exchanged for an HttpOnly session cookie, and every change carries the
// session's CSRF token in X-Kiln-Csrf.
'use strict';

const $ = (sel) => document.querySelector(sel);
const enc = encodeURIComponent;
const main = $('#main');
const TERMINAL = ['successful', 'failed', 'cancelled'];
const ICONS = { submitted: '…', running: '⟳', successful: '✓', failed: '✗', cancelled: '–' };

// Names added with "Add image generator" but not saved yet (the API needs a script first).
const drafts = new Set();
// A message to show once after the next render (e.g. "Saved revision 2").
let flash = '';
// The current view's clean-up (timers, event sources) and a counter to drop stale renders.
let cleanup = () => {};
let routeSeq = 0;
// The session: who is logged in and the CSRF token its changes carry (null: not yet known).
let session = null;

// ---- small helpers ----

/** Creates an element: attributes (on* are listeners, `text` the text), then children. */
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v == null || v === false) continue;
    if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else if (k === 'text') el.textContent = v;
    else el.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) if (c != null) el.append(c);
  return el;
}

/** Calls the API; throws an Error whose message is the API's sentence. */
async function api(method, path, body) {
  const init = { method, headers: {}, credentials: 'same-origin' };
  if (method !== 'GET' && session && session.csrf) init.headers['x-kiln-csrf'] = session.csrf;
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (e) {
    throw new Error(`Could not reach the coordinator: ${e.message}`);
  }
  const text = await resp.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: shown below */ }
  if (!resp.ok) {
    const err = new Error(data && data.message ? `${data.message} (${data.code})` : `HTTP ${resp.status}: ${text}`);
    err.status = resp.status;
    throw err;
  }
  return data;
}

/** An initially hidden place for errors, next to the control that caused them. */
const alertBox = () => h('p', { role: 'alert', class: 'error', hidden: true });
function showError(box, err) {
  box.textContent = err ? `Error: ${err.message || err}` : '';
  box.hidden = !err;
}

/** A status shown with text and a symbol, coloured by CSS (never colour alone). */
const badge = (status) => h('span', { class: `status status-${status}` }, `${ICONS[status] || ''} ${status}`);
const fmtTime = (ts) => (ts ? new Date(ts).toLocaleString() : '—');
function fmtDuration(from, to) {
  if (!from) return '—';
  if (!to) return 'in progress';
  const s = (Date.parse(to) - Date.parse(from)) / 1000;
  return s < 60 ? `${s.toFixed(1)} s` : `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}
function fmtOutcome(o) {
  if (!o) return null;
  switch (o.kind) {
    case 'exited': return `exited with code ${o.code}`;
    case 'signaled': return `killed by signal ${o.signal}`;
    case 'timed_out': return `timed out after ${o.after_secs} s`;
    default: return `could not start: ${o.message || o.kind}`;
  }
}
/** A definition list from [term, value] pairs, skipping empty values. */
const dl = (rows) => h('dl', {}, rows.filter(([, v]) => v != null && v !== '').map(([k, v]) => [h('dt', { text: k }), h('dd', {}, v)]));

// ---- routing ----

async function route() {
  cleanup();
  cleanup = () => {};
  const seq = ++routeSeq;
  const parts = (location.hash.replace(/^#\/?/, '') || '').split('/').filter(Boolean).map(decodeURIComponent);
  // Each view returns its nodes; they are shown only if no newer navigation happened meanwhile.
  const show = (...nodes) => {
    if (seq !== routeSeq) return false;
    main.replaceChildren(...nodes);
    main.querySelector('h1')?.focus();
    return true;
  };
  try {
    if (!session) {
      try {
        session = await api('GET', '/v1/session');
      } catch (e) {
        if (e.status === 401) return loginView(show);
        throw e;
      }
      showWho();
    }
    if (parts[0] === 'generators' && parts[1]) await generatorView(parts[1], show);
    else if (parts[0] === 'builds' && parts[1]) await buildView(parts[1], show);
    else await listView(show);
  } catch (e) {
    if (e.status === 401) { // the session ended (expired, revoked, restart)
      session = null;
      showWho();
      return loginView(show);
    }
    show(h('h1', { tabindex: -1, text: 'Could not load this page' }), h('p', { role: 'alert', class: 'error', text: e.message }),
      h('p', {}, h('a', { href: '#/', text: 'Back to the generators' })));
  }
}

// ---- login ----

/** The login form: an API token in, a session cookie out. */
function loginView(show) {
  const box = alertBox();
  const input = h('input', { id: 'login-token', name: 'token', type: 'password', required: true, autocomplete: 'off' });
  const form = h('form', { id: 'login-form', onsubmit: async (ev) => {
    ev.preventDefault();
    showError(box, null);
    try {
      session = await api('POST', '/v1/session', { token: input.value.trim() });
      input.value = '';
      showWho();
      route();
    } catch (e) { showError(box, e); }
  } },
  h('label', { for: 'login-token', text: 'API token' }), input,
  h('p', { class: 'hint', text: 'kiln serve wrote an admin token to admin-token in its data directory; `kiln token create` makes more.' }),
  h('div', { class: 'actions' }, h('button', { type: 'submit', text: 'Log in' })), box);
  show(h('h1', { tabindex: -1, text: 'Log in to kiln' }), form);
}

/** Shows who is logged in, with a way out, in the header. */
function showWho() {
  const who = $('#who');
  if (!session) { who.replaceChildren(); return; }
  who.replaceChildren(h('span', { text: `${session.name} (${session.role}) ` }),
    h('button', { type: 'button', id: 'logout', class: 'secondary', onclick: async () => {
      try { await api('DELETE', '/v1/session'); } catch { /* the cookie is cleared anyway */ }
      session = null;
      showWho();
      route();
    } }, 'Log out'));
}

// ---- #/ : the generator list ----

async function listView(show) {
  const gens = await api('GET', '/v1/generators');
  const list = gens.length
    ? h('ul', { class: 'cards' }, gens.map((g) => h('li', {},
      h('a', { href: `#/generators/${enc(g.name)}`, text: g.name }),
      h('span', { class: 'meta', text: ` revision ${g.latest_revision} · ${g.clouds.join(', ') || 'no clouds'} · ${fmtTime(g.updated_at)}` }))))
    : h('p', { text: 'No image generators yet.' });
  show(h('h1', { tabindex: -1, text: 'Image generators' }),
    h('button', { type: 'button', id: 'add-generator', onclick: openNewDialog }, 'Add image generator'), list);
}

function openNewDialog() {
  $('#new-name').value = '';
  $('#new-dialog').showModal();
}
$('#new-form').addEventListener('submit', () => {
  const name = $('#new-name').value.trim();
  if (!name) return;
  drafts.add(name);
  location.hash = `#/generators/${enc(name)}`;
});
for (const b of document.querySelectorAll('[data-close]')) b.addEventListener('click', () => b.closest('dialog').close('cancel'));

// ---- #/generators/NAME : editor, revisions, builds ----

async function generatorView(name, show) {
  const clouds = await api('GET', '/v1/clouds');
  let rev = null;
  let revisions = [];
  try {
    rev = await api('GET', `/v1/generators/${enc(name)}`);
    revisions = await api('GET', `/v1/generators/${enc(name)}/revisions`);
  } catch (e) {
    if (!(e.status === 404 && drafts.has(name))) throw e;
  }
  const spec = rev ? rev.spec : { name, description: '', script: '#!/bin/sh\n', targets: {} };
  const notice = rev && drafts.delete(name) ? `A generator named ${name} already exists; it is opened here.` : flash;
  flash = '';

  // The editor: script on one side, per cloud where to start on the other.
  const script = h('textarea', { id: 'script', name: 'script', rows: 18, spellcheck: 'false' });
  script.value = spec.script;
  const description = h('input', { id: 'description', name: 'description', value: spec.description || '' });
  const cloudFields = clouds.map((c, i) => {
    const t = spec.targets[c.name] || {};
    const field = (key, label, value) => [h('label', { for: `c${i}-${key}`, text: label }),
      h('input', { id: `c${i}-${key}`, name: key, value: value || '', autocomplete: 'off' })];
    const asks = c.options && c.options.ask_password === 'true';
    return h('fieldset', { 'data-cloud': c.name },
      h('legend', { text: `${c.name} (${c.kind})` }),
      asks ? h('p', { class: 'hint', text: 'Asks for its password at every build.' }) : null,
      field('base_image', 'Base image', t.base_image),
      field('instance_type', c.kind === 'openstack' ? 'Flavor' : 'Instance type', t.instance_type),
      field('network', c.kind === 'ec2' ? 'Subnet' : 'Network', t.network));
  });
  const saveError = alertBox();
  const saveStatus = h('p', { class: 'saved', 'aria-live': 'polite', text: notice });
  const buildError = alertBox();
  const buildBtn = h('button', { type: 'button', id: 'build', disabled: !rev },
    rev ? `Build revision ${rev.number}` : 'Build (save first)');
  const form = h('form', { id: 'editor', class: 'editor' },
    h('section', { class: 'script-pane' }, h('label', { for: 'script', text: 'Customization script' }), script,
      h('label', { for: 'description', text: 'Description' }), description),
    h('section', { class: 'clouds-pane', 'aria-labelledby': 'clouds-title' },
      h('h2', { id: 'clouds-title', text: 'Clouds' }),
      h('p', { class: 'hint', text: 'Leave the base image empty to skip a cloud.' }),
      clouds.length ? cloudFields : h('p', { text: 'No clouds are configured (kiln cloud add).' })),
    h('div', { class: 'actions' }, h('button', { type: 'submit', id: 'save' }, 'Save'), buildBtn),
    saveError, saveStatus, buildError);

  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    showError(saveError, null);
    // Keep the fields the page does not edit (timeout, env, options) and clouds no longer listed.
    const targets = Object.fromEntries(Object.entries(spec.targets).filter(([c]) => !clouds.some((x) => x.name === c)));
    for (const fs of form.querySelectorAll('fieldset[data-cloud]')) {
      const val = (n) => fs.querySelector(`[name=${n}]`).value.trim() || undefined;
      const cloud = fs.dataset.cloud;
      if (val('base_image')) {
        targets[cloud] = { ...(spec.targets[cloud] || {}), base_image: val('base_image'), instance_type: val('instance_type'), network: val('network') };
      }
    }
    const body = { ...spec, name, description: description.value, script: script.value, targets };
    try {
      const saved = rev ? await api('PUT', `/v1/generators/${enc(name)}`, body) : await api('POST', '/v1/generators', body);
      drafts.delete(name);
      flash = `Saved revision ${saved.number}.`;
      route();
    } catch (e) {
      showError(saveError, e);
    }
  });

  // The builds of this generator, polled every second while one is unfinished.
  const buildsBox = h('div', { id: 'builds', 'aria-live': 'polite' }, h('p', { text: 'No builds yet.' }));
  const buildsError = alertBox();
  let timer = null;
  let last = '';
  const refresh = async () => {
    clearTimeout(timer);
    try {
      const builds = await api('GET', `/v1/builds?generator=${enc(name)}`);
      showError(buildsError, null);
      const json = JSON.stringify(builds);
      if (json !== last && builds.length) buildsBox.replaceChildren(buildList(builds));
      last = json;
      if (builds.some((b) => !TERMINAL.includes(b.status))) timer = setTimeout(refresh, 1000);
    } catch (e) {
      showError(buildsError, e);
      timer = setTimeout(refresh, 3000);
    }
  };
  cleanup = () => clearTimeout(timer);

  buildBtn.addEventListener('click', async () => {
    showError(buildError, null);
    try {
      const build = await startBuild(rev, clouds);
      if (!build) return;
      saveStatus.textContent = `Build ${build.id} started.`;
      refresh();
    } catch (e) {
      showError(buildError, e);
    }
  });

  if (!show(h('h1', { tabindex: -1, text: name }),
    h('p', { class: 'meta', text: rev ? `Revision ${rev.number} of ${fmtTime(rev.created_at)} · script sha256 ${rev.script_sha256.slice(0, 12)}` : 'New generator, not saved yet.' }),
    form,
    h('section', { 'aria-labelledby': 'builds-title' }, h('h2', { id: 'builds-title', text: 'Builds' }), buildsError, buildsBox),
    revisionsSection(revisions))) return;
  if (rev) refresh();
}

/** Starts a build of `rev`, asking first for the passwords of clouds that want them. */
async function startBuild(rev, clouds) {
  const asking = Object.keys(rev.spec.targets).filter((n) => {
    const c = clouds.find((x) => x.name === n);
    return c && c.options && c.options.ask_password === 'true';
  });
  const passwords = asking.length ? await askPasswords(asking) : {};
  if (!passwords) return null;
  return api('POST', '/v1/builds', { generator: rev.generator, revision: rev.number, passwords });
}

/** Shows the password dialog; resolves with {cloud: password}, or null when cancelled. Keeps nothing. */
function askPasswords(names) {
  const dlg = $('#password-dialog');
  const fields = $('#password-fields');
  fields.replaceChildren(...names.map((n, i) => h('div', {},
    h('label', { for: `pw${i}`, text: `Password for cloud ${n}` }),
    h('input', { id: `pw${i}`, type: 'password', required: true, autocomplete: 'off', 'data-cloud': n }))));
  dlg.returnValue = '';
  dlg.showModal();
  return new Promise((resolve) => {
    dlg.addEventListener('close', () => {
      const out = {};
      for (const input of fields.querySelectorAll('input')) {
        out[input.dataset.cloud] = input.value;
        input.value = '';
      }
      fields.replaceChildren(); // the inputs (and their values) are gone from the page
      resolve(dlg.returnValue === 'ok' ? out : null);
    }, { once: true });
  });
}

function buildList(builds) {
  return h('ul', { class: 'builds' }, builds.map((b) => h('li', { 'data-build': b.id },
    h('a', { href: `#/builds/${enc(b.id)}`, text: `Build ${b.id}` }), ' ', badge(b.status),
    h('span', { class: 'meta', text: ` revision ${b.revision} · ${fmtTime(b.created_at)}` }),
    h('ul', { class: 'per-cloud' }, b.targets.map((t) => h('li', {}, `${t.cloud}: `, badge(t.status), ` (${t.step})`))))));
}

/** The revision history, and a line diff between any two revisions. */
function revisionsSection(revisions) {
  if (!revisions.length) return null;
  const newest = [...revisions].reverse();
  const option = (r) => h('option', { value: r.number, text: `Revision ${r.number}` });
  const from = h('select', { id: 'diff-from' }, newest.map(option));
  const to = h('select', { id: 'diff-to' }, newest.map(option));
  if (newest.length > 1) from.value = newest[1].number;
  const out = h('pre', { class: 'diff', 'aria-live': 'polite' });
  const text = (spec) => [...spec.script.replace(/\n$/, '').split('\n'), '', '# clouds',
    ...Object.entries(spec.targets).map(([c, t]) => `${c}: base image ${t.base_image}${t.instance_type ? `, instance type ${t.instance_type}` : ''}${t.network ? `, network ${t.network}` : ''}`)];
  const compare = () => {
    const a = revisions.find((r) => r.number === +from.value);
    const b = revisions.find((r) => r.number === +to.value);
    out.replaceChildren(...diffLines(text(a.spec), text(b.spec)).map(([op, line]) =>
      h('span', { class: { '+': 'add', '-': 'del', ' ': 'same' }[op] }, `${op} ${line}\n`)));
  };
  return h('section', { 'aria-labelledby': 'revisions-title' },
    h('h2', { id: 'revisions-title', text: 'Revisions' }),
    h('ol', { class: 'revisions', reversed: true }, newest.map((r) => h('li', { value: r.number },
      `Revision ${r.number} · ${fmtTime(r.created_at)} · sha256 ${r.script_sha256.slice(0, 12)}`))),
    h('div', { class: 'compare' }, h('label', { for: 'diff-from', text: 'Compare revision' }), from,
      h('label', { for: 'diff-to', text: 'with revision' }), to,
      h('button', { type: 'button', id: 'compare', onclick: compare }, 'Compare')),
    out);
}

/** A line diff by longest common subsequence: [[' '|'-'|'+', line], …]. */
function diffLines(a, b) {
  const dp = Array.from({ length: a.length + 1 }, () => new Uint32Array(b.length + 1));
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) dp[i][j] = a[i] === b[j] ? dp[i + 1][j + 1] + 1 : Math.max(dp[i + 1][j], dp[i][j + 1]);
  }
  const out = [];
  let i = 0;
  let j = 0;
  while (i < a.length && j < b.length) {
    if (a[i] === b[j]) { out.push([' ', a[i]]); i++; j++; } else if (dp[i + 1][j] >= dp[i][j + 1]) out.push(['-', a[i++]]);
    else out.push(['+', b[j++]]);
  }
  while (i < a.length) out.push(['-', a[i++]]);
  while (j < b.length) out.push(['+', b[j++]]);
  return out;
}

// ---- #/builds/ID : one build ----

async function buildView(id, show) {
  let build = await api('GET', `/v1/builds/${enc(id)}`);
  const status = h('p', { class: 'build-status', 'aria-live': 'polite' });
  const cancelError = alertBox();
  const cancelBtn = h('button', { type: 'button', id: 'cancel', class: 'danger' }, 'Cancel build');
  const stops = [];
  let timer = null;
  // One section per target; its details are redrawn on each poll, its log is appended to.
  const sections = build.targets.map((t) => {
    const details = h('div', { class: 'details' });
    const log = h('pre', { class: 'log', tabindex: 0, 'aria-label': `Log of cloud ${t.cloud}` });
    const note = h('p', { class: 'log-note', text: 'Loading the log…' });
    stops.push(followLog(t.id, log, note));
    return { id: t.id, details, node: h('section', { class: 'target', 'data-cloud': t.cloud },
      h('h2', { text: `Cloud ${t.cloud}` }), details, h('h3', { text: 'Log' }), log, note) };
  });
  const draw = () => {
    status.replaceChildren('Status: ', badge(build.status), build.cancel_requested && !TERMINAL.includes(build.status) ? ' (cancelling)' : '');
    cancelBtn.disabled = TERMINAL.includes(build.status);
    for (const s of sections) s.details.replaceChildren(targetDetails(build.targets.find((t) => t.id === s.id)));
  };
  const poll = async () => {
    try {
      build = await api('GET', `/v1/builds/${enc(id)}`);
      showError(cancelError, null);
      draw();
    } catch (e) {
      showError(cancelError, e);
    }
    if (!TERMINAL.includes(build.status)) timer = setTimeout(poll, 1000);
  };
  cancelBtn.addEventListener('click', async () => {
    showError(cancelError, null);
    try {
      build = await api('POST', `/v1/builds/${enc(id)}/cancel`);
      draw();
    } catch (e) {
      showError(cancelError, e);
    }
  });
  cleanup = () => { clearTimeout(timer); stops.forEach((stop) => stop()); };
  draw();
  if (!show(h('h1', { tabindex: -1, text: `Build ${build.id}` }),
    h('p', { class: 'meta' }, h('a', { href: `#/generators/${enc(build.generator)}`, text: build.generator }),
      ` · revision ${build.revision} · started ${fmtTime(build.created_at)}`),
    status, h('div', { class: 'actions' }, cancelBtn), cancelError,
    h('div', { class: 'targets' }, sections.map((s) => s.node)))) return;
  if (!TERMINAL.includes(build.status)) timer = setTimeout(poll, 1000);
}

function targetDetails(t) {
  const T = t.timings;
  const img = t.image;
  return h('div', {},
    h('p', {}, 'Status: ', badge(t.status), ` · step ${t.step}`),
    dl([['Base image', t.base_image], ['Instance', t.instance], ['Image name', img && img.name], ['Image id', img && img.id],
      ['Script', fmtOutcome(t.outcome)]]),
    t.error ? h('div', { class: 'target-error', role: 'alert' },
      h('strong', { text: `Failed at step ${t.error.step} (${t.error.reason.replace(/_/g, ' ')}): ` }),
      h('span', { class: 'message', text: t.error.message })) : null,
    t.cleanup_pending ? h('div', { class: 'cleanup-pending', role: 'status' },
      h('strong', { text: 'Cleanup pending (retrying): ' }),
      h('span', { class: 'message', text: t.cleanup_pending })) : null,
    h('h3', { text: 'Timings' }),
    dl([['Boot to agent', fmtDuration(T.launched_at, T.agent_contact_at)],
      ['Script', fmtDuration(T.script_started_at, T.script_finished_at)],
      ['Seal', fmtDuration(T.script_finished_at, T.sealed_at)],
      ['Snapshot', fmtDuration(T.sealed_at, T.image_ready_at)],
      ['Total', fmtDuration(T.created_at, T.finished_at)]]));
}

/** Follows a target's log over server-sent events into `pre`; returns a stop function. */
function followLog(targetId, pre, note) {
  const decoder = new TextDecoder();
  let received = 0;
  let done = false;
  let es = null;
  let retry = null;
  const open = () => {
    es = new EventSource(`/v1/targets/${enc(targetId)}/log/follow?offset=${received}`);
    es.addEventListener('open', () => { note.textContent = 'Following the log live…'; });
    es.addEventListener('log', (ev) => {
      const chunk = JSON.parse(ev.data);
      if (chunk.offset !== received) return; // already have these bytes
      const bytes = Uint8Array.from(atob(chunk.data), (c) => c.charCodeAt(0));
      received += bytes.length;
      const atEnd = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(decoder.decode(bytes, { stream: true }));
      if (atEnd) pre.scrollTop = pre.scrollHeight; // keep the tail in view
    });
    es.addEventListener('end', (ev) => {
      const end = JSON.parse(ev.data);
      done = true;
      es.close();
      pre.append(decoder.decode());
      pre.scrollTop = pre.scrollHeight;
      note.textContent = end.total ? `Log complete (${end.total} bytes).` : 'The script printed nothing.';
    });
    es.addEventListener('error', (ev) => {
      es.close();
      if (done) return;
      if (ev.data) { // an error event sent by the coordinator
        note.setAttribute('role', 'alert');
        note.textContent = `Error: could not follow the log: ${JSON.parse(ev.data).message}`;
      } else { // the connection dropped: resume from the bytes already shown
        note.textContent = 'Lost the log connection; reconnecting…';
        retry = setTimeout(open, 2000);
      }
    });
  };
  open();
  return () => { done = true; clearTimeout(retry); if (es) es.close(); };
}

window.addEventListener('hashchange', route);
route();
