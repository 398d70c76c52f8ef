// The page's main thread: it only orchestrates. Preprocessing, key generation, encryption and
// decryption run in Web Workers (worker.js, wasm); this thread moves messages and bytes, talks
// to the evaluator API (evaluator/API.md) and draws. What goes to the network: the
// relinearization key, the job request {model, key_id, batch}, and ciphertexts. Never pixels,
// never the secret key.
import { Pool, workerCount } from './pool.js';

const $ = (sel) => document.querySelector(sel);
const API = new URL('api/', document.baseURI).href;
const TEST_HOOKS = new URLSearchParams(location.search).has('test-hooks');
const MAX_WORKERS = 4;
const UPLOAD_CONCURRENCY = 4;
const PUT_RETRIES = 3;
const POLL_MS = 1000;

const state = {
  models: [],
  model: null,
  images: [], // {id, file, name, url, features: Float32Array|null, error: string|null, el}
  nextImageId: 1,
  pool: null,
  running: false,
  cancelled: false,
  job: null, // {id, token}
  secret: null, // Uint8Array: stays in this page and its workers
  longTasks: [], // {start, ms} of main-thread tasks over 50 ms
  runWindow: [0, 0],
};

// ---------------------------------------------------------------- messages and helpers

function message(text, kind = 'error', key = null) {
  const box = $('#messages');
  if (key) for (const m of box.querySelectorAll(`[data-key="${key}"]`)) m.remove();
  const div = document.createElement('div');
  div.className = `msg ${kind}`;
  if (key) div.dataset.key = key;
  const span = document.createElement('span');
  span.textContent = text;
  const close = document.createElement('button');
  close.textContent = '\u00d7';
  close.title = 'dismiss';
  close.onclick = () => div.remove();
  div.append(span, close);
  box.append(div);
  return div;
}
function clearMessages(key) {
  for (const m of $('#messages').querySelectorAll(key ? `[data-key="${key}"]` : '.msg')) m.remove();
}

const fmtBytes = (b) =>
  b >= 1e9 ? `${(b / 1e9).toFixed(2)} GB` : b >= 1e6 ? `${(b / 1e6).toFixed(1)} MB` : `${(b / 1e3).toFixed(1)} kB`;
const fmtSecs = (s) => {
  if (!Number.isFinite(s) || s < 0) return '?';
  if (s < 90) return `${Math.round(s)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
// Lets the browser draw and handle input between chunks of main-thread work.
const yieldToBrowser = () => new Promise((r) => setTimeout(r, 0));

class ApiError extends Error {
  constructor(status, code, msg) {
    super(msg);
    this.status = status;
    this.code = code;
  }
}
class ServerDown extends Error {}

async function api(path, { method = 'GET', body, headers = {}, token, raw = false } = {}) {
  const h = { ...headers };
  if (token) h.Authorization = `Bearer ${token}`;
  if (body !== undefined && !(body instanceof Uint8Array) && !(body instanceof ArrayBuffer)) {
    h['Content-Type'] = 'application/json';
    body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(API + path, { method, body, headers: h, cache: 'no-store' });
  } catch (e) {
    throw new ServerDown(`cannot reach the evaluator server (${e.message})`);
  }
  if (!resp.ok) {
    let code = 'http_' + resp.status;
    let msg = `HTTP ${resp.status}`;
    try {
      const j = await resp.json();
      if (j && j.error) {
        code = j.error.code || code;
        msg = j.error.message || msg;
      }
    } catch (_) {
      /* not JSON */
    }
    if (resp.status >= 502 && resp.status <= 504) throw new ServerDown(`the evaluator server is unavailable (${msg})`);
    throw new ApiError(resp.status, code, msg);
  }
  return raw ? resp : resp.json();
}

// POST/PUT of bytes with upload progress (fetch has no upload progress events).
function sendBytes(method, path, bytes, { token, headers = {}, onProgress } = {}) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open(method, API + path);
    xhr.setRequestHeader('Content-Type', 'application/octet-stream');
    if (token) xhr.setRequestHeader('Authorization', `Bearer ${token}`);
    for (const [k, v] of Object.entries(headers)) xhr.setRequestHeader(k, v);
    if (onProgress) xhr.upload.onprogress = (e) => onProgress(e.loaded);
    xhr.onload = () => {
      let j = null;
      try {
        j = JSON.parse(xhr.responseText);
      } catch (_) {
        /* not JSON */
      }
      if (xhr.status >= 200 && xhr.status < 300) return resolve(j);
      if (xhr.status >= 502 && xhr.status <= 504) return reject(new ServerDown(`the evaluator server is unavailable (HTTP ${xhr.status})`));
      const err = j && j.error ? j.error : {};
      reject(new ApiError(xhr.status, err.code || `http_${xhr.status}`, err.message || `HTTP ${xhr.status}`));
    };
    xhr.onerror = () => reject(new ServerDown('cannot reach the evaluator server (network error during upload)'));
    xhr.onabort = () => reject(new Error('upload aborted'));
    xhr.send(bytes);
  });
}

async function sha256Hex(bytes) {
  const d = new Uint8Array(await crypto.subtle.digest('SHA-256', bytes));
  return Array.from(d, (b) => b.toString(16).padStart(2, '0')).join('');
}

// ---------------------------------------------------------------- progress display

function step(name, { value, max, detail, status } = {}) {
  const el = $(`#step-${name}`);
  const bar = el.querySelector('progress');
  if (max !== undefined) bar.max = max || 1;
  if (value !== undefined) bar.value = value;
  if (detail !== undefined) el.querySelector('.detail').textContent = detail;
  if (status) {
    el.classList.remove('active', 'done');
    if (status !== 'idle') el.classList.add(status);
  }
}
function resetSteps() {
  for (const n of ['keys', 'encrypt', 'upload', 'server', 'download', 'decrypt']) {
    step(n, { value: 0, max: 1, detail: '', status: 'idle' });
  }
}
function setRunState(s, detail = '') {
  const el = $('#run-status');
  el.dataset.state = s;
  el.textContent = detail;
}

// Throttles DOM updates of frequent progress events to one per animation frame.
function throttled(fn) {
  let queued = false;
  let args = null;
  return (...a) => {
    args = a;
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => {
      queued = false;
      fn(...args);
    });
  };
}

// ---------------------------------------------------------------- models

async function loadModels() {
  const pill = $('#server-status');
  try {
    await api('health');
    const { models } = await api('models');
    state.models = models || [];
    pill.textContent = 'server online';
    pill.className = 'pill ok';
    clearMessages('server');
  } catch (e) {
    pill.textContent = 'server down';
    pill.className = 'pill down';
    const m = message(`The evaluator server is down or unreachable: ${e.message}. `, 'error', 'server');
    const retry = document.createElement('button');
    retry.textContent = 'retry';
    retry.onclick = () => loadModels();
    m.firstChild.after(retry);
    return;
  }
  const sel = $('#model-select');
  const previous = sel.value;
  sel.innerHTML = '';
  for (const m of state.models) {
    const o = document.createElement('option');
    o.value = m.name;
    o.textContent = m.insecure_test_params ? `${m.name} (INSECURE test parameters)` : m.name;
    sel.append(o);
  }
  sel.disabled = state.models.length === 0 || state.running;
  if (!state.models.length) message('The server offers no models.', 'error', 'server');
  if (previous && state.models.some((m) => m.name === previous)) sel.value = previous;
  selectModel(sel.value);
}

function selectModel(name) {
  const m = state.models.find((x) => x.name === name) || null;
  const changedInput = !state.model || !m || JSON.stringify(state.model.input) !== JSON.stringify(m.input);
  state.model = m;
  $('#insecure-banner').hidden = !(m && m.insecure_test_params);
  if (m) {
    const i = m.input;
    $('#model-info').textContent =
      `${m.classes.length} classes; input ${i.channels}x${i.height}x${i.width}; ` +
      `up to ${m.max_batch} images per job; ${m.input_ciphertexts} ciphertexts ` +
      `(${fmtBytes(m.input_ciphertexts * m.input_ciphertext_bytes)} upload + ${fmtBytes(m.relin_key_bytes)} key)`;
  } else {
    $('#model-info').textContent = '';
  }
  if (changedInput) for (const img of state.images) preprocessImage(img);
  refreshControls();
}

// ---------------------------------------------------------------- images

function ensurePool() {
  if (!state.pool) state.pool = new Pool(workerCount(MAX_WORKERS));
  return state.pool;
}

async function addFiles(fileList) {
  const files = Array.from(fileList);
  for (let s = 0; s < files.length; s += 64) {
    addFileChunk(files.slice(s, s + 64));
    await yieldToBrowser();
  }
}

function addFileChunk(files) {
  if (!files.length) return;
  const frag = document.createDocumentFragment();
  for (const file of files) {
    const img = {
      id: state.nextImageId++,
      file,
      name: file.name || `image ${state.nextImageId}`,
      url: URL.createObjectURL(file),
      features: null,
      error: null,
      el: null,
      gen: 0,
    };
    state.images.push(img);
    img.el = thumbElement(img);
    frag.append(img.el);
    preprocessImage(img);
  }
  $('#thumbs').append(frag);
  refreshControls();
}

function thumbElement(img) {
  const div = document.createElement('div');
  div.className = 'thumb pending';
  div.dataset.name = img.name;
  const im = document.createElement('img');
  im.alt = img.name;
  im.src = img.url;
  im.onerror = () => im.removeAttribute('src');
  const name = document.createElement('div');
  name.className = 'name';
  name.textContent = img.name;
  name.title = img.name;
  const rm = document.createElement('button');
  rm.className = 'remove';
  rm.textContent = '\u00d7';
  rm.title = 'remove';
  rm.onclick = () => removeImage(img);
  div.append(im, name, rm);
  return div;
}

function removeImage(img) {
  if (state.running) return;
  state.images = state.images.filter((x) => x !== img);
  img.el.remove();
  URL.revokeObjectURL(img.url);
  refreshControls();
}

// Preprocessing (decode, resize, normalize) in a worker, so a bad file is reported at once.
async function preprocessImage(img) {
  if (!state.model) return;
  const gen = ++img.gen;
  img.features = null;
  img.error = null;
  img.el.className = 'thumb pending';
  try {
    const f = await ensurePool().run('preprocess', { file: img.file, inputSpec: JSON.stringify(state.model.input) });
    if (gen !== img.gen) return;
    img.features = f;
    img.el.className = 'thumb';
    img.el.title = '';
  } catch (e) {
    if (gen !== img.gen) return;
    img.error = e.message;
    img.el.className = 'thumb bad';
    img.el.title = `unreadable: ${e.message}`;
    const why = e.message.length > 120 ? `${e.message.slice(0, 117)}...` : e.message;
    message(`Cannot read "${img.name}" as a PNG or JPEG image; it is left out (${why}).`, 'error', `img-${img.id}`);
  }
  refreshControls();
}

function readyImages() {
  return state.images.filter((i) => i.features);
}

// Coalesced to one update per frame: with thousands of images, every preprocessing result
// would otherwise redo the whole count.
let refreshQueued = false;
function refreshControls() {
  if (refreshQueued) return;
  refreshQueued = true;
  requestAnimationFrame(() => {
    refreshQueued = false;
    refreshNow();
  });
}

let lastTooMany = null;
function refreshNow() {
  const m = state.model;
  const ready = readyImages().length;
  const pending = state.images.filter((i) => !i.features && !i.error).length;
  const bad = state.images.filter((i) => i.error).length;
  const parts = [`${state.images.length} image(s)`];
  if (pending) parts.push(`${pending} being read`);
  if (bad) parts.push(`${bad} unreadable`);
  $('#image-count').textContent = state.images.length ? parts.join(', ') : 'No images yet.';
  let tooMany = false;
  if (m) {
    const limit = Math.min(m.max_batch, Number.MAX_SAFE_INTEGER);
    tooMany = ready > limit;
    const text = tooMany
      ? `Too many images: ${ready} selected, but one job of model "${m.name}" takes at most ${limit}. Remove some images.`
      : null;
    if (text !== lastTooMany) {
      if (text) message(text, 'error', 'too-many');
      else clearMessages('too-many');
      lastTooMany = text;
    }
  }
  $('#run-button').disabled = state.running || !m || ready === 0 || pending > 0 || tooMany;
  $('#cancel-button').disabled = !state.running;
  $('#clear-button').disabled = state.running;
  $('#model-select').disabled = state.running || state.models.length === 0;
}

// ---------------------------------------------------------------- the run

function checkCancelled() {
  if (state.cancelled) throw new Error('cancelled');
}

async function run() {
  const model = state.model;
  const images = readyImages();
  if (!model || !images.length || state.running) return;
  if (images.length > model.max_batch) {
    message(`Too many images: ${images.length} > ${model.max_batch}.`, 'error', 'too-many');
    return;
  }
  state.running = true;
  state.cancelled = false;
  state.job = null;
  refreshControls();
  clearMessages('run');
  $('#progress').hidden = false;
  $('#results').hidden = true;
  $('#results-table tbody').innerHTML = '';
  resetSteps();
  setRunState('running');
  const pool = ensurePool();
  const t0 = performance.now();
  state.runWindow = [t0, Infinity];
  try {
    await api('health');
    const spec = JSON.stringify(model.params);
    const insecure = !!model.insecure_test_params;
    const fingerprint = model.params_fingerprint;
    const n = images.length;
    const F = model.input_ciphertexts;
    if (images[0].features.length !== F) {
      throw new Error(`the model expects ${F} features per image, preprocessing gave ${images[0].features.length}`);
    }

    // 1. Keys, in a worker; the secret goes to our other workers only.
    step('keys', { status: 'active', detail: 'generating keys in a worker...' });
    const kg = await pool.call(0, 'keygen', { spec, insecure, fingerprint });
    checkCancelled();
    state.secret = kg.secret;
    if (n > kg.slots) throw new Error(`${n} images do not fit in ${kg.slots} slots`);
    await Promise.all(
      pool.workers.map((_, i) => (i === 0 ? null : pool.call(i, 'setKey', { spec, insecure, fingerprint, secret: kg.secret }))),
    );
    step('keys', { detail: `keys in ${(kg.totalMs / 1000).toFixed(2)} s; uploading evaluation key (${fmtBytes(kg.relinKey.length)})` });
    const keyProgress = throttled((sent) => step('keys', { value: sent, max: kg.relinKey.length }));
    const { key_id } = await sendBytes('POST', `keys?model=${encodeURIComponent(model.name)}`, kg.relinKey, {
      onProgress: keyProgress,
    });
    step('keys', { value: 1, max: 1, status: 'done', detail: `keys in ${(kg.totalMs / 1000).toFixed(2)} s; evaluation key uploaded (${fmtBytes(kg.relinKey.length)})` });
    checkCancelled();

    // 2. The job.
    const job = await api('jobs', { method: 'POST', body: { model: model.name, key_id, batch: n } });
    state.job = { id: job.job_id, token: job.token };
    if (job.inputs !== F) throw new Error(`the server expects ${job.inputs} inputs, the model lists ${F}`);

    // 3. The batch to every worker, in chunks (short main-thread tasks).
    step('encrypt', { status: 'active', detail: 'packing images...' });
    await pool.all('newBatch', { features: F });
    const CHUNK = 128;
    for (let s = 0; s < n; s += CHUNK) {
      const chunk = images.slice(s, s + CHUNK).map((i) => i.features);
      await Promise.all(pool.workers.map((_, w) => pool.call(w, 'addImages', { images: chunk })));
      checkCancelled();
    }

    // 4. Encrypt and upload, streamed: at most a few ciphertexts wait in memory.
    await encryptAndUpload(pool, model, state.job, F);

    // 5. Run and wait.
    await api(`jobs/${state.job.id}/start`, { method: 'POST', token: state.job.token });
    await pool.all('newBatch', { features: F }); // drop the images from the workers
    const status = await waitForJob(state.job);
    if (status.state !== 'done') throw new Error(`the job ${status.state}${status.error ? `: ${status.error}` : ''}`);

    // 6. Download, decrypt, show.
    const result = await download(state.job);
    step('decrypt', { status: 'active', detail: `decrypting ${model.classes.length} logit ciphertexts...` });
    const probs = await pool.call(0, 'decrypt', { result, nImages: n, classes: model.classes.length }, [result]);
    step('decrypt', { value: 1, max: 1, status: 'done', detail: `${n} image(s)` });
    showResults(model, images, probs);
    api(`jobs/${state.job.id}`, { method: 'DELETE', token: state.job.token }).catch(() => {});
    const secs = (performance.now() - t0) / 1000;
    setRunState('done', `done in ${secs.toFixed(1)} s`);
    message(`Done: ${n} image(s) diagnosed in ${fmtSecs(secs)}.`, 'info', 'run');
  } catch (e) {
    setRunState('failed', e.message);
    if (state.cancelled) {
      message('Cancelled.', 'info', 'run');
    } else if (e instanceof ServerDown) {
      message(`The evaluator server is down or unreachable: ${e.message}.`, 'error', 'run');
      $('#server-status').textContent = 'server down';
      $('#server-status').className = 'pill down';
    } else if (e instanceof ApiError) {
      message(`The server refused the request: ${e.message} (${e.code}).`, 'error', 'run');
    } else {
      message(`The run failed: ${e.message}`, 'error', 'run');
    }
    if (state.job) api(`jobs/${state.job.id}`, { method: 'DELETE', token: state.job.token }).catch(() => {});
  } finally {
    state.running = false;
    state.runWindow[1] = performance.now();
    refreshControls();
  }
}

async function encryptAndUpload(pool, model, job, F) {
  const started = performance.now();
  let nextK = 0;
  let encrypted = 0;
  let uploaded = 0;
  let uploadedBytes = 0;
  let encryptedBytes = 0;
  const queue = []; // ciphertexts waiting for upload: {k, ct}
  const maxBuffered = pool.size + UPLOAD_CONCURRENCY;
  let failure = null;
  let waiters = []; // loops waiting for the queue to shrink or grow
  const notify = () => {
    const ws = waiters;
    waiters = [];
    for (const w of ws) w();
  };
  const waitChange = () => new Promise((r) => waiters.push(r));
  const estBytes = F * model.input_ciphertext_bytes;

  const show = throttled(() => {
    const s = (performance.now() - started) / 1000;
    step('encrypt', {
      value: encrypted,
      max: F,
      detail: `${encrypted}/${F} ciphertexts, ${(encrypted / s).toFixed(1)}/s, ${(encryptedBytes / 1e6 / s).toFixed(1)} MB/s, ${pool.size} worker(s)`,
    });
    step('upload', {
      value: uploadedBytes,
      max: estBytes,
      detail: `${uploaded}/${F} ciphertexts, ${fmtBytes(uploadedBytes)} of ~${fmtBytes(estBytes)}`,
    });
  });
  step('upload', { status: 'active' });

  const encryptLoop = async (w) => {
    while (!failure && !state.cancelled && nextK < F) {
      while (queue.length >= maxBuffered && !failure && !state.cancelled) await waitChange();
      if (failure || state.cancelled || nextK >= F) return;
      const k = nextK++;
      const ct = await pool.call(w, 'encrypt', { k });
      encrypted++;
      encryptedBytes += ct.length;
      queue.push({ k, ct });
      notify();
      show();
    }
  };

  const put = async ({ k, ct }) => {
    const checksum = await sha256Hex(ct);
    for (let attempt = 1; ; attempt++) {
      try {
        await sendBytes('PUT', `jobs/${job.id}/inputs/${k}`, ct, {
          token: job.token,
          headers: { 'X-Checksum-Sha256': checksum },
        });
        return;
      } catch (e) {
        if (attempt >= PUT_RETRIES || e instanceof ApiError || state.cancelled) throw e;
        await sleep(500 * attempt);
      }
    }
  };

  const uploadLoop = async () => {
    while (!failure && !state.cancelled) {
      if (!queue.length) {
        if (encrypted >= F && nextK >= F) return;
        await waitChange();
        continue;
      }
      const item = queue.shift();
      notify();
      await put(item);
      uploaded++;
      uploadedBytes += item.ct.length;
      show();
    }
  };

  const guard = async (p) => {
    try {
      await p;
    } catch (e) {
      failure = failure || e;
    } finally {
      notify();
    }
  };
  const ticker = setInterval(notify, 250); // also notices a cancel
  try {
    await Promise.all([
      ...pool.workers.map((_, w) => guard(encryptLoop(w))),
      ...Array.from({ length: UPLOAD_CONCURRENCY }, () => guard(uploadLoop())),
    ]);
  } finally {
    clearInterval(ticker);
  }
  if (failure) throw failure;
  checkCancelled();
  show();
  const secs = (performance.now() - started) / 1000;
  step('encrypt', {
    value: F,
    max: F,
    status: 'done',
    detail: `${F} ciphertexts in ${secs.toFixed(1)} s (${(F / secs).toFixed(1)}/s, ${(encryptedBytes / 1e6 / secs).toFixed(1)} MB/s), ${pool.size} worker(s)`,
  });
  const inputs = await api(`jobs/${job.id}/inputs`, { token: job.token });
  if (inputs.present !== inputs.total) {
    throw new Error(`the server holds ${inputs.present} of ${inputs.total} inputs (missing ${inputs.missing.slice(0, 10).join(', ')})`);
  }
  step('upload', { value: 1, max: 1, status: 'done', detail: `${F} ciphertexts, ${fmtBytes(uploadedBytes)}` });
}

async function waitForJob(job) {
  step('server', { status: 'active', detail: 'queued' });
  for (;;) {
    checkCancelled();
    const s = await api(`jobs/${job.id}`, { token: job.token });
    const eta = s.eta_s === null || s.eta_s === undefined ? '' : `, about ${fmtSecs(s.eta_s)} left`;
    step('server', {
      value: s.progress || 0,
      max: 1,
      detail: `${s.state}${s.stage ? ` (${s.stage})` : ''}: ${Math.round((s.progress || 0) * 100)}%${eta}`,
    });
    if (['done', 'failed', 'cancelled'].includes(s.state)) {
      if (s.state === 'done') step('server', { value: 1, max: 1, status: 'done', detail: 'done' });
      return s;
    }
    await sleep(POLL_MS);
  }
}

async function download(job) {
  step('download', { status: 'active', detail: 'downloading encrypted result...' });
  const resp = await api(`jobs/${job.id}/result`, { token: job.token, raw: true });
  const total = Number(resp.headers.get('Content-Length')) || 0;
  const reader = resp.body.getReader();
  const parts = [];
  let got = 0;
  const show = throttled(() =>
    step('download', { value: got, max: total || got, detail: `${fmtBytes(got)}${total ? ` of ${fmtBytes(total)}` : ''}` }),
  );
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    parts.push(value);
    got += value.length;
    show();
  }
  const out = new Uint8Array(got);
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  step('download', { value: 1, max: 1, status: 'done', detail: fmtBytes(got) });
  return out.buffer;
}

function showResults(model, images, probs) {
  const C = model.classes.length;
  const tbody = $('#results-table tbody');
  tbody.innerHTML = '';
  const show = Math.min(C, 5);
  images.forEach((img, b) => {
    const p = Array.from(probs.subarray(b * C, (b + 1) * C));
    const order = p.map((v, c) => [v, c]).sort((x, y) => y[0] - x[0]);
    const top = order[0][1];
    const tr = document.createElement('tr');
    tr.dataset.name = img.name;
    tr.dataset.class = model.classes[top];
    tr.dataset.classIndex = String(top);
    const tdImg = document.createElement('td');
    const im = document.createElement('img');
    im.src = img.url;
    im.alt = img.name;
    tdImg.append(im);
    const tdName = document.createElement('td');
    tdName.textContent = img.name;
    const tdCls = document.createElement('td');
    tdCls.className = 'cls';
    tdCls.textContent = `${model.classes[top]} (${(p[top] * 100).toFixed(1)}%)`;
    const tdBars = document.createElement('td');
    const bars = document.createElement('div');
    bars.className = 'bars';
    for (const [v, c] of order.slice(0, show)) {
      const label = document.createElement('span');
      label.textContent = model.classes[c];
      const bar = document.createElement('div');
      bar.className = c === top ? 'bar top' : 'bar';
      const fill = document.createElement('span');
      fill.style.width = `${(v * 100).toFixed(1)}%`;
      bar.append(fill);
      const pct = document.createElement('span');
      pct.textContent = `${(v * 100).toFixed(1)}%`;
      bars.append(label, bar, pct);
    }
    tdBars.append(bars);
    tr.append(tdImg, tdName, tdCls, tdBars);
    tbody.append(tr);
  });
  $('#results').hidden = false;
}

// ---------------------------------------------------------------- wiring

function wire() {
  $('#model-select').onchange = (e) => selectModel(e.target.value);
  $('#file-input').onchange = (e) => {
    addFiles(e.target.files);
    e.target.value = '';
  };
  const dz = $('#drop-zone');
  dz.ondragover = (e) => {
    e.preventDefault();
    dz.classList.add('over');
  };
  dz.ondragleave = () => dz.classList.remove('over');
  dz.ondrop = (e) => {
    e.preventDefault();
    dz.classList.remove('over');
    if (!state.running) addFiles(e.dataTransfer.files);
  };
  $('#run-button').onclick = () => run();
  $('#cancel-button').onclick = () => {
    state.cancelled = true;
    if (state.job) api(`jobs/${state.job.id}`, { method: 'DELETE', token: state.job.token }).catch(() => {});
  };
  $('#clear-button').onclick = () => {
    if (state.running) return;
    for (const img of state.images) {
      img.gen++; // results of preprocessing still under way are dropped
      URL.revokeObjectURL(img.url);
    }
    state.images = [];
    $('#thumbs').replaceChildren();
    clearMessages();
    lastTooMany = null;
    refreshControls();
  };
  if ('PerformanceObserver' in window) {
    try {
      new PerformanceObserver((list) => {
        for (const e of list.getEntries()) state.longTasks.push({ start: e.startTime, ms: Math.round(e.duration) });
      }).observe({ type: 'longtask', buffered: true });
    } catch (_) {
      /* longtask not supported */
    }
  }
  if (TEST_HOOKS) {
    // For the end-to-end test only (?test-hooks): lets the test read, inside this page, the
    // secret it must then look for in every request. Nothing here touches the network.
    window.__beaa = {
      secretKey: () => (state.secret ? Array.from(state.secret) : null),
      features: () => readyImages().map((i) => ({ name: i.name, features: Array.from(i.features) })),
      longTasks: () => state.longTasks.map((t) => t.ms),
      // Long main-thread tasks between the click on run and the results.
      runLongTasks: () => state.longTasks.filter((t) => t.start >= state.runWindow[0] && t.start <= state.runWindow[1]).map((t) => t.ms),
      workers: () => (state.pool ? state.pool.size : 0),
    };
  }
}

wire();
loadModels();
