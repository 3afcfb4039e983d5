// The cluster dashboard. Plain script, no build step, no dependencies.
// Everything a worker or a job wrote (arguments, errors, results) is set
// as text, never as HTML.
'use strict';

const $ = (id) => document.getElementById(id);
const KEEP = 300; // samples of history, one a second

// The token: from ?token= once (then out of the address bar), then from
// this tab's session storage.
const token = (() => {
  const url = new URL(location.href);
  const given = url.searchParams.get('token');
  if (given) {
    sessionStorage.setItem('cluster-token', given);
    url.searchParams.delete('token');
    history.replaceState(null, '', url.pathname + url.search + url.hash);
  }
  return sessionStorage.getItem('cluster-token') || '';
})();

const history_ = new Map(); // pid -> {cpu: [], rss: []}
let status = null;
let lastCounters = null;
let selectedJob = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === 'class') e.className = v;
    else if (k.startsWith('data-')) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c == null) continue;
    e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

function say(text, bad) {
  const m = $('message');
  m.textContent = text;
  m.className = bad ? 'bad' : '';
  m.hidden = !text;
  if (text && !bad) setTimeout(() => { if (m.textContent === text) m.hidden = true; }, 4000);
}

async function api(path, options) {
  const headers = Object.assign({}, (options && options.headers) || {});
  if (token) headers.Authorization = 'Bearer ' + token;
  const res = await fetch(path, Object.assign({}, options, { headers }));
  if (res.status === 401) {
    showLogin();
    throw new Error('a token is needed');
  }
  const body = await res.json().catch(() => ({}));
  if (!res.ok) {
    const e = body.error || {};
    throw new Error(e.message || res.statusText);
  }
  return body;
}

function showLogin() {
  $('login').hidden = false;
  $('app').hidden = true;
}

$('login').addEventListener('submit', (ev) => {
  ev.preventDefault();
  sessionStorage.setItem('cluster-token', $('token').value);
  location.reload();
});

// ---- formatting ----

function duration(secs) {
  secs = Math.floor(secs);
  if (secs < 60) return secs + 's';
  if (secs < 3600) return Math.floor(secs / 60) + 'm ' + (secs % 60) + 's';
  if (secs < 86400) return Math.floor(secs / 3600) + 'h ' + Math.floor((secs % 3600) / 60) + 'm';
  return Math.floor(secs / 86400) + 'd ' + Math.floor((secs % 86400) / 3600) + 'h';
}

function bytes(n) {
  if (n == null) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + units[i];
}

function pill(state) {
  return el('span', { class: 'pill state-' + state }, state);
}

const SVG = 'http://www.w3.org/2000/svg';

// A line of the last 60 values: from 0 to `max` (or the largest value) when
// `max` is given, else between the smallest and the largest (a flat line
// in the middle when they are equal).
function sparkline(values, max) {
  const w = 80, h = 20;
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('class', 'spark');
  svg.setAttribute('width', w);
  svg.setAttribute('height', h);
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  const pts = values.slice(-60);
  if (pts.length > 1) {
    const top = max ? Math.max(max, ...pts) : Math.max(...pts);
    const bottom = max ? 0 : Math.min(...pts);
    const y = (v) => top === bottom ? h / 2 : h - 1 - (v - bottom) / (top - bottom) * (h - 2);
    const line = document.createElementNS(SVG, 'polyline');
    line.setAttribute('points', pts.map((v, i) =>
      `${(i * (w - 2) / (pts.length - 1) + 1).toFixed(1)},${y(v).toFixed(1)}`).join(' '));
    svg.append(line);
  }
  return svg;
}

// ---- workers ----

function remember(workers) {
  const live = new Set();
  for (const w of workers) {
    if (!w.pid) continue;
    live.add(w.pid);
    let h = history_.get(w.pid);
    if (!h) { h = { cpu: [], rss: [] }; history_.set(w.pid, h); }
    if (w.cpu_percent != null) h.cpu.push(w.cpu_percent);
    if (w.rss_bytes != null) h.rss.push(w.rss_bytes);
    if (h.cpu.length > KEEP) h.cpu.shift();
    if (h.rss.length > KEEP) h.rss.shift();
  }
  for (const pid of history_.keys()) if (!live.has(pid)) history_.delete(pid);
}

function drawWorkers(s) {
  const body = $('workers').tBodies[0];
  body.replaceChildren();
  const workers = (s.workers || []).slice().sort((a, b) => a.slot - b.slot || a.pid - b.pid);
  for (const w of workers) {
    const h = history_.get(w.pid) || { cpu: [], rss: [] };
    const cpu = w.cpu_percent == null ? '–' : w.cpu_percent.toFixed(1) + '%';
    body.append(el('tr', { 'data-slot': w.slot, 'data-pid': w.pid },
      el('td', { 'data-label': 'slot' }, w.slot, w.name ? el('span', { class: 'name' }, w.name) : ''),
      el('td', { 'data-label': 'pid' }, w.pid || '–'),
      el('td', { 'data-label': 'state' }, pill(w.state),
        w.reloading ? el('span', { class: 'said' }, 'reloading') : '',
        w.status ? el('span', { class: 'said', title: 'what the worker said its status is' }, w.status) : ''),
      el('td', { 'data-label': 'uptime' }, w.pid ? duration(w.uptime_secs)
        : w.next_start_secs != null ? `starts in ${duration(w.next_start_secs)}` : '–'),
      el('td', { 'data-label': 'restarts' }, w.restarts),
      el('td', { 'data-label': 'CPU' }, cpu, sparkline(h.cpu, 100)),
      el('td', { 'data-label': 'memory' }, bytes(w.rss_bytes), sparkline(h.rss)),
      el('td', { 'data-label': 'last exit', class: 'wrap' }, w.last_exit || '–'),
    ));
  }
  const running = workers.filter((w) => w.pid).length;
  $('worker-count').textContent = `${running} running, ${s.workers_wanted} wanted` + (s.degraded ? ' · degraded' : '');
  $('program').textContent = s.program ? `${s.program}${(s.addresses || []).length ? ' on ' + s.addresses.join(', ') : ''}` : '';
  $('watcher').textContent = `watcher pid ${s.pid}`;
  const to = $('scale-to');
  if (document.activeElement !== to) to.value = s.workers_wanted;
}

// ---- jobs ----

function drawJobs(j) {
  $('jobs').hidden = !j;
  if (!j) return;
  $('jobs-store').textContent = j.store;
  const counters = [
    ['claimed', j.claimed], ['done', j.done], ['failed', j.failed], ['retried', j.retried],
    ['cancelled', j.cancelled], ['lost', j.lost], ['buffered', j.buffered],
  ];
  if (lastCounters) {
    const rate = Math.max(0, j.done - lastCounters.done);
    counters.unshift(['done/s', rate]);
  }
  lastCounters = { done: j.done, failed: j.failed };
  $('counters').replaceChildren(...counters.map(([l, n]) =>
    el('div', { class: 'card', 'data-counter': l }, el('div', { class: 'n' }, n), el('div', { class: 'l' }, l))));

  const pools = $('pools').tBodies[0];
  pools.replaceChildren(...(j.pools || []).map((p) => {
    const cap = Math.max(p.capacity + p.running, 1);
    const bar = el('span', { class: 'bar' }, el('span', {}));
    bar.firstChild.style.width = Math.min(100, p.running / cap * 100) + '%';
    return el('tr', { 'data-pool': p.name },
      el('td', {}, p.name + (p.shared ? ' (shared)' : '')),
      el('td', { class: 'wrap' }, (p.queues || []).join(', ')),
      el('td', {}, p.slots),
      el('td', {}, `${p.running} of ${p.running + p.capacity}`, bar));
  }));

  const recent = (j.recent || []).slice(-10).reverse();
  $('recent').tBodies[0].replaceChildren(...recent.map((e) => {
    const tr = el('tr', { class: 'clickable', 'data-seq': e.seq },
      el('td', {}, new Date(e.at_ms).toLocaleTimeString()), el('td', {}, e.id), el('td', {}, e.queue),
      el('td', {}, e.name || '–'), el('td', {}, pill(e.outcome)), el('td', {}, `${e.attempt} of ${e.max_attempts}`),
      el('td', { class: 'wrap' }, e.error || ''));
    tr.addEventListener('click', () => showJob(e.id));
    return tr;
  }));
  $('recent-empty').hidden = recent.length > 0;

  const queues = $('queues').tBodies[0];
  const per = (j.store_counts && j.store_counts.per_queue) || {};
  queues.replaceChildren(...Object.entries(per).map(([q, c]) =>
    el('tr', { 'data-queue': q }, el('td', {}, q), el('td', {}, c.queued), el('td', {}, c.running),
      el('td', {}, c.done), el('td', {}, c.failed), el('td', {}, c.cancelled))));
  refreshNodes();
}

// ---- nodes (a shared PostgreSQL store) ----

let nodesAt = 0;

// At most every 2 s: the node list is a query on the store.
async function refreshNodes() {
  if (Date.now() - nodesAt < 2000) return;
  nodesAt = Date.now();
  let nodes;
  try { nodes = await api('/api/nodes'); } catch (e) { return; }
  $('nodes-box').hidden = !nodes.length;
  $('nodes').tBodies[0].replaceChildren(...nodes.map((n) => {
    const age = (Date.now() - Date.parse(n.heartbeat_at)) / 1000;
    const bar = el('span', { class: 'bar' }, el('span', {}));
    bar.firstChild.style.width = Math.min(100, n.running / Math.max(n.capacity, 1) * 100) + '%';
    return el('tr', { 'data-node': n.name },
      el('td', { class: 'wrap' }, n.name),
      el('td', {}, `${n.host} (pid ${n.pid})`),
      el('td', {}, pill(n.state)),
      el('td', {}, n.state === 'alive' ? `${duration(Math.max(0, age))} ago` : '–'),
      el('td', {}, `${n.running} of ${n.capacity}`, bar),
      el('td', { class: 'wrap' }, (n.pools || []).map((p) => `${p.name} ×${p.slots}`).join(', ')));
  }));
}

function drawRates(rates) {
  const box = $('rate-chart');
  box.replaceChildren();
  const done = (rates && rates.done_per_minute) || [];
  const failed = (rates && rates.failed_per_minute) || [];
  if (!done.length) { box.append(el('span', { class: 'muted' }, 'No full minute yet.')); return; }
  const n = Math.min(done.length, 60), slots = Math.max(15, n);
  const w = 600, h = 100;
  const d = done.slice(-n), f = failed.slice(-n);
  const top = Math.max(1, ...d.map((v, i) => v + (f[i] || 0)));
  const svg = document.createElementNS(SVG, 'svg');
  svg.setAttribute('viewBox', `0 0 ${w} ${h}`);
  svg.setAttribute('preserveAspectRatio', 'none');
  const bw = w / slots;
  d.forEach((v, i) => {
    const x = (slots - n + i) * bw;
    const fv = f[i] || 0;
    const hd = v / top * (h - 2), hf = fv / top * (h - 2);
    for (const [cls, y, hh, val] of [['done', h - hd, hd, v], ['failed', h - hd - hf, hf, fv]]) {
      if (!hh) continue;
      const r = document.createElementNS(SVG, 'rect');
      r.setAttribute('class', cls);
      r.setAttribute('x', x + 1); r.setAttribute('width', Math.max(1, bw - 2));
      r.setAttribute('y', y); r.setAttribute('height', hh);
      const t = document.createElementNS(SVG, 'title');
      t.textContent = `${val} ${cls}`;
      r.append(t);
      svg.append(r);
    }
  });
  const last = d.length ? `${d[d.length - 1]} done, ${f[f.length - 1] || 0} failed in the last minute` : '';
  box.append(el('div', { class: 'legend' },
    el('span', { class: 'key done' }), 'done ', el('span', { class: 'key failed' }), 'failed ',
    el('span', { class: 'muted' }, ` · peak ${top}/min over ${n} min · ${last}`)));
  box.append(svg);
}

async function loadJobList() {
  if ($('jobs').hidden) return;
  const params = new URLSearchParams({ limit: '25' });
  if ($('filter-state').value) params.set('state', $('filter-state').value);
  if ($('filter-queue').value.trim()) params.set('queue', $('filter-queue').value.trim());
  let jobs;
  try { jobs = await api('/api/jobs?' + params); } catch (e) { say(e.message, true); return; }
  const body = $('job-list').tBodies[0];
  body.replaceChildren(...jobs.map((job) => {
    const last = job.errors && job.errors.length ? job.errors[job.errors.length - 1].error : '';
    const tr = el('tr', { class: 'clickable', 'data-job': job.id },
      el('td', {}, job.id), el('td', {}, job.queue), el('td', {}, job.name || '–'),
      el('td', {}, pill(job.state)), el('td', {}, `${job.attempt} of ${job.max_attempts}`),
      el('td', { class: 'wrap' }, last));
    tr.addEventListener('click', () => showJob(job.id));
    return tr;
  }));
  $('job-list-empty').hidden = jobs.length > 0;
}

async function showJob(id, scroll = true) {
  let job;
  try { job = await api('/api/jobs/' + encodeURIComponent(id)); } catch (e) { say(e.message, true); return; }
  selectedJob = job.id;
  $('job-detail').hidden = false;
  $('detail-id').textContent = job.id;
  const st = $('detail-state');
  st.textContent = job.state;
  st.className = 'pill state-' + job.state;
  const fields = [
    ['queue', job.queue], ['name', job.name], ['key', job.key], ['attempt', `${job.attempt} of ${job.max_attempts}`],
    ['priority', job.priority], ['pool', job.pool], ['node', job.node], ['worker', job.worker],
    ['created', job.created_at], ['run at', job.run_at], ['started', job.started_at], ['finished', job.finished_at],
  ];
  $('detail-fields').replaceChildren(...fields.flatMap(([k, v]) => [el('dt', {}, k), el('dd', {}, v == null ? '–' : v)]));
  $('detail-args').textContent = JSON.stringify(job.args, null, 2);
  $('detail-result').textContent = job.result == null ? '–' : JSON.stringify(job.result, null, 2);
  $('detail-errors').replaceChildren(...(job.errors || []).map((e) =>
    el('li', {}, el('span', { class: 'muted' }, `attempt ${e.attempt}, ${e.at}: `), e.error)));
  $('detail-retry').disabled = !(job.state === 'failed' || job.state === 'cancelled');
  $('detail-cancel').disabled = !(job.state === 'queued' || job.state === 'running');
  if (scroll) $('job-detail').scrollIntoView({ behavior: 'smooth', block: 'start' });
}

async function jobAction(action) {
  if (selectedJob == null) return;
  try {
    const r = await api(`/api/jobs/${selectedJob}/${action}`, { method: 'POST' });
    say(action === 'retry' ? `job ${selectedJob} queued again` : `job ${selectedJob}: ${r.outcome.replace('_', ' ')}`);
  } catch (e) { say(e.message, true); }
  showJob(selectedJob);
  loadJobList();
}

$('detail-retry').addEventListener('click', () => jobAction('retry'));
$('detail-cancel').addEventListener('click', () => jobAction('cancel'));
$('detail-close').addEventListener('click', () => { $('job-detail').hidden = true; selectedJob = null; });
$('filter').addEventListener('submit', (ev) => { ev.preventDefault(); loadJobList(); });

// ---- actions ----

async function post(path, body, done) {
  try {
    const r = await api(path, {
      method: 'POST',
      headers: { 'Content-Type': 'application/json' },
      body: body ? JSON.stringify(body) : undefined,
    });
    say(done(r));
  } catch (e) { say(e.message, true); }
}

$('reload').addEventListener('click', async () => {
  const b = $('reload');
  b.disabled = true;
  say('reloading…');
  await post('/api/reload', null, () => 'reloaded: every worker was replaced');
  b.disabled = false;
});

function scaleTo(n) {
  if (!Number.isInteger(n) || n < 0) { say('the number of workers must be a whole number', true); return; }
  post('/api/scale', { workers: n }, (r) => `scaled to ${r.workers_wanted} workers`);
}
$('scale-set').addEventListener('click', () => scaleTo(Number($('scale-to').value)));
$('scale-up').addEventListener('click', () => status && scaleTo(status.workers_wanted + 1));
$('scale-down').addEventListener('click', () => status && scaleTo(Math.max(0, status.workers_wanted - 1)));

// ---- live updates ----

function onStatus(s) {
  status = s;
  remember(s.workers || []);
  drawWorkers(s);
  drawJobs(s.jobs);
}

// The history once (the status events extend it), the job rates each time.
async function loadSamples(withHistory) {
  try {
    const s = await api('/api/samples');
    for (const w of withHistory ? Object.values(s.workers || {}) : []) {
      history_.set(w.pid, { cpu: w.cpu_history.slice(0, -1), rss: w.rss_history.slice(0, -1) });
    }
    drawRates(s.jobs);
  } catch (e) { /* the status below says why */ }
}

function connect() {
  const live = $('live');
  const url = '/api/events' + (token ? '?token=' + encodeURIComponent(token) : '');
  const events = new EventSource(url);
  events.addEventListener('status', (ev) => {
    live.textContent = 'live';
    live.className = 'pill on';
    onStatus(JSON.parse(ev.data));
  });
  // A failure refreshes the job list (at most once a second).
  let pending = null;
  events.addEventListener('job', (ev) => {
    const e = JSON.parse(ev.data);
    if (e.id === selectedJob) showJob(selectedJob, false);
    if (e.outcome !== 'done' && !pending) {
      pending = setTimeout(() => { pending = null; loadJobList(); }, 1000);
    }
  });
  events.onerror = () => {
    live.textContent = 'disconnected';
    live.className = 'pill off';
    // EventSource retries by itself; check whether the token is the problem.
    api('/api/status').catch(() => {});
  };
}

async function start() {
  try {
    onStatus(await api('/api/status'));
  } catch (e) {
    say(e.message, true);
    if ($('login').hidden === false) return;
  }
  await loadSamples(true);
  loadJobList();
  connect();
  setInterval(() => loadSamples(false), 30000);
  setInterval(() => {
    loadJobList();
    if (selectedJob != null && !$('job-detail').hidden) showJob(selectedJob, false);
  }, 5000);
}

start();
