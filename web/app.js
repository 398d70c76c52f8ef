// The page's main thread: it only orchestrates. Preprocessing, key generation, encryption and
// decryption run in Web Workers (worker.js, wasm); this thread moves messages and bytes, talks
// to the evaluator API (evaluator/API.md) and draws. What goes to the network: the
// relinearization key, the job request {model, key_id, batch}, and ciphertexts. Never pixels,
// never the secret key (which, only if the user asks, is kept in this browser: keystore.js).
import { Pool, workerCount } from './pool.js';
import * as keystore from './keystore.js';

const $ = (sel) => document.querySelector(sel);
const API = new URL('api/', document.baseURI).href;
const TEST_HOOKS = new URLSearchParams(location.search).has('test-hooks');
const MAX_WORKERS = 4;
const UPLOAD_CONCURRENCY = 4;
const PUT_RETRIES = 3;
const POLL_MS = 1000;
const ADD_CHUNK = 512; // files recorded per main-thread task when adding
const PREPROCESS_CHUNK = 32; // files per preprocessing message to a worker
const THUMB_CHUNK = 16; // files per thumbnail message to a worker
const THUMB_PX = 80; // longer side of a thumbnail
const THUMBS_PER_PAGE = 120;
const RESULTS_PER_PAGE = 50;

const state = {
  models: [],
  loading: [],
  loadingTimer: null,
  model: null,
  images: [], // {id, file, name, features: Float32Array|null, error: string|null, el, gen, queued, removed}
  nextImageId: 1,
  thumbPage: 0,
  shownThumbs: [], // the images whose thumbnails are on the page shown
  results: null, // {model, entries: [{name, img}], probs, top, page}
  pool: null,
  running: false,
  rememberTouched: false, // the user set "remember key" in this page
  cancelled: false,
  job: null, // {id, token}
  secret: null, // Uint8Array: stays in this page and its workers
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
    const { models, loading } = await api('models');
    state.models = models || [];
    state.loading = loading || [];
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
  const names = state.models.map((m) => m.name).join('\n');
  // Rebuilt only when the list changed (a poll below must not close an open drop-down).
  if (sel.dataset.names !== names) {
    sel.dataset.names = names;
    sel.innerHTML = '';
    for (const m of state.models) {
      const o = document.createElement('option');
      o.value = m.name;
      o.textContent = m.insecure_test_params ? `${m.name} (INSECURE test parameters)` : m.name;
      sel.append(o);
    }
  }
  sel.disabled = state.models.length === 0 || state.running;
  // A freshly started server plans its models one after another: list them as they come.
  clearTimeout(state.loadingTimer);
  if (state.loading.length) {
    message(`The server is still preparing ${state.loading.join(', ')}; the list fills in as each is ready.`, 'info', 'loading');
    state.loadingTimer = setTimeout(() => loadModels(), 2000);
  } else {
    clearMessages('loading');
    if (!state.models.length) message('The server offers no models.', 'error', 'server');
  }
  if (previous && state.models.some((m) => m.name === previous)) sel.value = previous;
  selectModel(sel.value);
  resumeStoredJob();
}

// What the model was measured to be worth when it was exported (on its own validation
// images, not a promise about yours).
function validationText(m) {
  const v = m.validation;
  if (!v) return 'This model has no recorded validation result.';
  const pct = (x) => `${(100 * x).toFixed(1)}%`;
  const held = v.split === 'Group' ? 'images of patients it never saw' : 'held-out images';
  let text = `Validated on ${v.images} ${held}: accuracy ${pct(v.accuracy)}, ` +
    `balanced accuracy ${pct(v.balanced_accuracy)}`;
  if (m.classes.length <= 4) {
    text += ` (recall ${m.classes.map((c, k) => `${c} ${pct(v.per_class_recall[k])}`).join(', ')})`;
  }
  return `${text}.`;
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
  $('#model-validation').textContent = m ? validationText(m) : '';
  if (changedInput) queuePreprocess(state.images);
  refreshControls();
}

// ---------------------------------------------------------------- images
//
// Thousands of files (up to a full batch, 16384) keep every main-thread task short: adding
// only records the File handles (in chunks, yielding between them); the page reads the bytes
// asynchronously and hands them (transferred, not copied) to the workers, several files per
// message, where they are decoded and preprocessed (wasm) and, for the thumbnails shown,
// decoded by the browser into small ImageBitmaps (createImageBitmap in the worker). Thumbnails
// are a page of THUMBS_PER_PAGE at a time, drawn into canvases; counters and messages are
// redrawn at most once per frame.

function ensurePool() {
  if (!state.pool) state.pool = new Pool(workerCount(MAX_WORKERS));
  return state.pool;
}

async function addFiles(fileList) {
  const files = Array.from(fileList);
  const added = [];
  for (let s = 0; s < files.length; s += ADD_CHUNK) {
    for (const file of files.slice(s, s + ADD_CHUNK)) {
      const img = {
        id: state.nextImageId,
        file,
        name: file.name || `image ${state.nextImageId}`,
        features: null,
        error: null,
        el: null, // thumbnail element while on the page shown
        gen: 0,
        queued: false,
        removed: false,
      };
      state.nextImageId++;
      state.images.push(img);
      added.push(img);
    }
    refreshControls();
    if (s + ADD_CHUNK < files.length) await yieldToBrowser();
  }
  for (const img of added) {
    img.queued = true;
    prep.queue.push(img);
  }
  renderThumbsNow(); // before sending: the files of the page shown get their thumbnails with it
  refreshControls();
  pumpPreprocess();
}

// The bytes of some files, read asynchronously (an unreadable file gives null).
async function readFiles(imgs) {
  const r = await Promise.allSettled(imgs.map((img) => img.file.arrayBuffer()));
  return r.map((x) => (x.status === 'fulfilled' ? x.value : null));
}

function drawThumb(canvas, bitmap) {
  if (!bitmap) return;
  if (!canvas || !canvas.isConnected) {
    bitmap.close();
    return;
  }
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  canvas.getContext('bitmaprenderer').transferFromImageBitmap(bitmap);
}

// Thumbnails of images not being preprocessed, THUMB_CHUNK files per worker message;
// canvasOf(img) is where each goes (if still shown when it arrives).
async function requestThumbs(imgs, canvasOf) {
  const pool = ensurePool();
  for (let s = 0; s < imgs.length; s += THUMB_CHUNK) {
    const chunk = imgs.slice(s, s + THUMB_CHUNK).filter((img) => canvasOf(img));
    if (!chunk.length) continue;
    const items = await readFiles(chunk);
    let bitmaps;
    try {
      bitmaps = await pool.run('thumbs', { items, thumbSize: THUMB_PX }, items.filter(Boolean));
    } catch (_) {
      continue; // thumbnails are display only
    }
    chunk.forEach((img, j) => drawThumb(canvasOf(img), bitmaps[j]));
  }
}

function thumbClass(img) {
  return img.error ? 'thumb bad' : img.features ? 'thumb' : 'thumb pending';
}
function updateThumb(img) {
  if (!img.el) return;
  img.el.className = thumbClass(img);
  img.el.title = img.error ? `unreadable: ${img.error}` : '';
}

function thumbElement(img) {
  const div = document.createElement('div');
  div.dataset.name = img.name;
  const pic = document.createElement('canvas');
  pic.className = 'pic';
  pic.width = pic.height = 1;
  const name = document.createElement('div');
  name.className = 'name';
  name.textContent = img.name;
  name.title = img.name;
  const rm = document.createElement('button');
  rm.className = 'remove';
  rm.textContent = '\u00d7';
  rm.title = 'remove';
  rm.onclick = () => removeImage(img);
  div.append(pic, name, rm);
  img.el = div;
  updateThumb(img);
  return div;
}
const thumbCanvas = (img) => (img.el ? img.el.querySelector('canvas') : null);

// The page of thumbnails shown (state.thumbPage), built in one DocumentFragment.
let thumbsQueued = false;
function renderThumbs() {
  if (thumbsQueued) return;
  thumbsQueued = true;
  requestAnimationFrame(() => {
    thumbsQueued = false;
    renderThumbsNow();
  });
}
function renderThumbsNow() {
  const total = state.images.length;
  const pages = Math.max(1, Math.ceil(total / THUMBS_PER_PAGE));
  state.thumbPage = Math.min(Math.max(0, state.thumbPage), pages - 1);
  const start = state.thumbPage * THUMBS_PER_PAGE;
  const shown = state.images.slice(start, start + THUMBS_PER_PAGE);
  const keep = new Set(shown);
  for (const img of state.shownThumbs) if (!keep.has(img)) img.el = null;
  const frag = document.createDocumentFragment();
  const fresh = [];
  for (const img of shown) {
    if (!img.el) {
      thumbElement(img);
      if (!img.queued) fresh.push(img); // queued ones get theirs with the preprocessing
    }
    frag.append(img.el);
  }
  $('#thumbs').replaceChildren(frag);
  state.shownThumbs = shown;
  $('#thumbs-pager').hidden = total <= THUMBS_PER_PAGE;
  $('#thumbs-range').textContent = total ? `images ${start + 1}-${start + shown.length} of ${total}` : '';
  $('#thumbs-prev').disabled = state.thumbPage === 0;
  $('#thumbs-next').disabled = state.thumbPage >= pages - 1;
  if (fresh.length) requestThumbs(fresh, thumbCanvas);
}

function removeImage(img) {
  if (state.running) return;
  const i = state.images.indexOf(img);
  if (i < 0) return;
  state.images.splice(i, 1);
  img.removed = true;
  img.gen++; // a preprocessing result still under way is dropped
  img.el = null;
  renderThumbs();
  refreshControls();
}

// Preprocessing (decode, resize, normalize) in the workers, PREPROCESS_CHUNK files per
// message, one message per worker at a time and one worker fewer than there are (a core stays
// free for this thread: drawing and input); a bad file is reported at once.
const prep = { queue: [], inFlight: 0 };

function queuePreprocess(imgs) {
  for (const img of imgs) {
    img.gen++; // a result still under way for this image is dropped
    img.features = null;
    img.error = null;
    updateThumb(img);
    if (!img.queued) prep.queue.push(img);
    img.queued = true;
  }
  refreshControls();
  pumpPreprocess();
}

function pumpPreprocess() {
  if (!state.model) return;
  const pool = ensurePool();
  const parallel = Math.max(1, pool.size - 1);
  while (prep.inFlight < parallel && prep.queue.length) {
    const chunk = [];
    while (chunk.length < PREPROCESS_CHUNK && prep.queue.length) {
      const img = prep.queue.shift();
      img.queued = false;
      if (!img.removed && !img.features && !img.error) chunk.push(img);
    }
    if (!chunk.length) break;
    prep.inFlight++;
    preprocessChunk(pool, chunk).finally(() => {
      prep.inFlight--;
      refreshControls();
      pumpPreprocess();
    });
  }
}

async function preprocessChunk(pool, chunk) {
  const gens = chunk.map((img) => img.gen);
  const inputSpec = JSON.stringify(state.model.input);
  // Thumbnails for the images shown now (the canvases they go to, as of sending).
  const canvases = chunk.map(thumbCanvas);
  try {
    const items = await readFiles(chunk);
    const results = await pool.run(
      'preprocess',
      { items, inputSpec, thumbs: canvases.map(Boolean), thumbSize: THUMB_PX },
      items.filter(Boolean),
    );
    chunk.forEach((img, j) => {
      drawThumb(canvases[j], results[j].thumb);
      settle(img, gens[j], results[j]);
    });
  } catch (e) {
    chunk.forEach((img, j) => settle(img, gens[j], { error: e.message }));
  }
}

function settle(img, gen, r) {
  if (gen !== img.gen) return; // removed, cleared or re-queued since
  if (r && r.features) img.features = r.features;
  else img.error = (r && r.error) || 'no result';
  updateThumb(img);
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
let lastUnreadable = null;
function refreshNow() {
  const m = state.model;
  let ready = 0;
  let pending = 0;
  const bad = [];
  for (const i of state.images) {
    if (i.features) ready++;
    else if (i.error) bad.push(i);
    else pending++;
  }
  const parts = [`${state.images.length} image(s)`];
  if (pending) parts.push(`${pending} being read`);
  if (bad.length) parts.push(`${bad.length} unreadable`);
  $('#image-count').textContent = state.images.length ? parts.join(', ') : 'No images yet.';
  // One message for all unreadable files (not one per file).
  let unreadable = null;
  if (bad.length === 1) {
    const e = bad[0].error;
    const why = e.length > 120 ? `${e.slice(0, 117)}...` : e;
    unreadable = `Cannot read "${bad[0].name}" as a PNG or JPEG image; it is left out (${why}).`;
  } else if (bad.length > 1) {
    const names = bad.slice(0, 5).map((i) => `"${i.name}"`).join(', ');
    unreadable = `Cannot read ${bad.length} files as PNG or JPEG images; they are left out: ${names}${bad.length > 5 ? ', ...' : ''}.`;
  }
  if (unreadable !== lastUnreadable) {
    if (unreadable) message(unreadable, 'error', 'unreadable');
    else clearMessages('unreadable');
    lastUnreadable = unreadable;
  }
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

// ---------------------------------------------------------------- the key on this device
//
// Off by default: the secret lives in the workers' memory (and this page's) only. With
// "remember key on this device" it is also put in this browser's IndexedDB (keystore.js),
// reused for the next jobs of the same parameters, and the job under way is noted there so
// that a reload can fetch and decrypt its result. "Forget key" deletes all of it.

async function refreshKeyControls() {
  const box = $('#remember-key');
  const forget = $('#forget-key');
  const status = $('#key-status');
  if (!keystore.available()) {
    box.checked = false;
    box.disabled = true;
    forget.disabled = true;
    status.textContent = 'This browser offers no storage here: the key is kept in memory only.';
    return;
  }
  let keysStored = [];
  let job = null;
  try {
    keysStored = await keystore.listKeys();
    job = await keystore.getJob();
  } catch (e) {
    status.textContent = `The key store cannot be read (${e.message}).`;
    return;
  }
  if (keysStored.length && !state.rememberTouched) box.checked = true;
  forget.disabled = keysStored.length === 0 && !job;
  if (keysStored.length) {
    const when = keysStored.map((k) => k.saved).sort().pop();
    status.textContent =
      `${keysStored.length === 1 ? 'A key is' : `${keysStored.length} keys are`} stored in this browser only (saved ${new Date(when).toLocaleString()}), ` +
      'unencrypted, as site data of this page; it is never sent anywhere.';
  } else {
    status.textContent = box.checked
      ? 'The next key will be stored in this browser only (never sent anywhere).'
      : 'The secret key is kept in memory only and is gone when this page closes.';
  }
}

async function forgetKey() {
  try {
    await keystore.forget();
    $('#remember-key').checked = false;
    state.rememberTouched = true;
    message('The stored key (and any stored job) was deleted from this device.', 'info', 'key');
  } catch (e) {
    message(`Cannot delete the stored key: ${e.message}`, 'error', 'key');
  }
  refreshKeyControls();
}

// Keys for a run: the stored key of these parameters when remembering (else fresh ones, stored
// when remembering). Every worker gets the secret; returns {secret, relinKey, slots, totalMs, fromStore}.
async function keysForRun(pool, model, remember) {
  const spec = JSON.stringify(model.params);
  const insecure = !!model.insecure_test_params;
  const fingerprint = model.params_fingerprint;
  let kg;
  let fromStore = false;
  const rec = remember ? await keystore.getKey(fingerprint) : null;
  if (rec) {
    try {
      kg = await pool.call(0, 'useKey', { spec, insecure, fingerprint, secret: rec.secret });
    } catch (e) {
      throw new Error(`the stored key does not match the parameters of model "${model.name}" (${e.message}); use "forget key" to delete it`);
    }
    kg.secret = rec.secret;
    fromStore = true;
  } else {
    kg = await pool.call(0, 'keygen', { spec, insecure, fingerprint });
    if (remember) await keystore.putKey(fingerprint, kg.secret);
  }
  await Promise.all(
    pool.workers.map((_, i) => (i === 0 ? null : pool.call(i, 'setKey', { spec, insecure, fingerprint, secret: kg.secret }))),
  );
  return { ...kg, fromStore };
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
  const remember = $('#remember-key').checked && keystore.available();
  beginRun();
  const pool = ensurePool();
  const t0 = performance.now();
  let started = false; // the server has every input and runs the job
  try {
    await api('health');
    const n = images.length;
    const F = model.input_ciphertexts;
    if (images[0].features.length !== F) {
      throw new Error(`the model expects ${F} features per image, preprocessing gave ${images[0].features.length}`);
    }

    // 1. Keys, in a worker; the secret goes to our other workers only (and, when remembering,
    //    to this browser's IndexedDB).
    step('keys', { status: 'active', detail: remember ? 'looking for a stored key...' : 'generating keys in a worker...' });
    const kg = await keysForRun(pool, model, remember);
    checkCancelled();
    state.secret = kg.secret;
    if (remember) refreshKeyControls();
    if (n > kg.slots) throw new Error(`${n} images do not fit in ${kg.slots} slots`);
    const how = kg.fromStore ? `stored key loaded in ${(kg.totalMs / 1000).toFixed(2)} s` : `keys in ${(kg.totalMs / 1000).toFixed(2)} s`;
    step('keys', { detail: `${how}; uploading evaluation key (${fmtBytes(kg.relinKey.length)})` });
    const keyProgress = throttled((sent) => step('keys', { value: sent, max: kg.relinKey.length }));
    const { key_id } = await sendBytes('POST', `keys?model=${encodeURIComponent(model.name)}`, kg.relinKey, {
      onProgress: keyProgress,
    });
    step('keys', { value: 1, max: 1, status: 'done', detail: `${how}; evaluation key uploaded (${fmtBytes(kg.relinKey.length)})` });
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

    // 5. Run; when remembering, note the job on this device so that a reload can finish it.
    await api(`jobs/${state.job.id}/start`, { method: 'POST', token: state.job.token });
    started = true;
    if (remember) {
      await keystore.putJob({
        id: state.job.id,
        token: state.job.token,
        model: model.name,
        fingerprint: model.params_fingerprint,
        names: images.map((i) => i.name),
        created: new Date().toISOString(),
      });
    }
    await pool.all('newBatch', { features: F }); // drop the images from the workers

    // 6. Wait, download, decrypt, show.
    await finishJob(pool, model, state.job, images.map((i) => ({ name: i.name, img: i })));
    const secs = (performance.now() - t0) / 1000;
    setRunState('done', `done in ${secs.toFixed(1)} s`);
    message(`Done: ${n} image(s) diagnosed in ${fmtSecs(secs)}.`, 'info', 'run');
  } catch (e) {
    runFailed(e, remember && started);
  } finally {
    endRun();
  }
}

function beginRun() {
  state.running = true;
  state.cancelled = false;
  state.job = null;
  refreshControls();
  clearMessages('run');
  $('#progress').hidden = false;
  $('#results').hidden = true;
  $('#results-table tbody').replaceChildren();
  resetSteps();
  setRunState('running');
}

function endRun() {
  state.running = false;
  refreshControls();
  refreshKeyControls();
}

// keepStored: the job runs on the server and is noted on this device; when only the server
// went away it stays noted, for a reload to pick up.
function runFailed(e, keepStored) {
  setRunState('failed', e.message);
  const down = e instanceof ServerDown;
  if (state.cancelled) {
    message('Cancelled.', 'info', 'run');
  } else if (down) {
    const later = keepStored ? ' The job is noted on this device: reload this page when the server is back to fetch its result.' : '';
    message(`The evaluator server is down or unreachable: ${e.message}.${later}`, 'error', 'run');
    $('#server-status').textContent = 'server down';
    $('#server-status').className = 'pill down';
  } else if (e instanceof ApiError) {
    message(`The server refused the request: ${e.message} (${e.code}).`, 'error', 'run');
  } else {
    message(`The run failed: ${e.message}`, 'error', 'run');
  }
  if (!(keepStored && down)) {
    if (state.job) {
      api(`jobs/${state.job.id}`, { method: 'DELETE', token: state.job.token }).catch(() => {});
      keystore.deleteJob(state.job.id).catch(() => {});
    }
  }
}

// Waits for the job, downloads and decrypts its result in worker 0 (which holds the key),
// shows it, deletes the job on the server and its note on this device.
async function finishJob(pool, model, job, entries) {
  const status = await waitForJob(job);
  if (status.state !== 'done') throw new Error(`the job ${status.state}${status.error ? `: ${status.error}` : ''}`);
  const result = await download(job);
  step('decrypt', { status: 'active', detail: `decrypting ${model.classes.length} logit ciphertexts...` });
  const calibrated = model.logits_calibration_max_abs ?? null;
  const { probs, top, outside, corrupt } = await pool.call(0, 'decrypt', { result, nImages: entries.length, classes: model.classes.length, calibrated }, [result]);
  step('decrypt', { value: 1, max: 1, status: 'done', detail: `${entries.length} image(s)` });
  showResults(model, entries, probs, top, outside, corrupt);
  api(`jobs/${job.id}`, { method: 'DELETE', token: job.token }).catch(() => {});
  if (keystore.available()) await keystore.deleteJob(job.id).catch(() => {});
}

// On load: a job noted on this device (remembered key) is fetched and decrypted with the
// stored key. The images themselves are not stored: the results list the file names.
async function resumeStoredJob() {
  if (!keystore.available() || state.running) return;
  let rec;
  try {
    rec = await keystore.getJob();
  } catch (_) {
    return;
  }
  if (!rec) return;
  const model = state.models.find((m) => m.name === rec.model);
  // Still being prepared: the next poll of loadModels tries again.
  if (!model && state.loading.includes(rec.model)) return;
  if (!model || model.params_fingerprint !== rec.fingerprint) {
    message(
      `A job stored on this device (model "${rec.model}", ${rec.names.length} image(s)) cannot be finished now: the server ` +
        'does not offer that model with the same parameters. "Forget key" deletes the note (and the key).',
      'error',
      'resume',
    );
    return;
  }
  const keyRec = await keystore.getKey(rec.fingerprint);
  if (!keyRec) {
    await keystore.deleteJob(rec.id).catch(() => {});
    return;
  }
  beginRun();
  const t0 = performance.now();
  const job = { id: rec.id, token: rec.token };
  state.job = job;
  message(`Fetching the result of a job stored on this device (${rec.names.length} image(s), model "${model.name}").`, 'info', 'run');
  step('keys', { status: 'active', detail: 'loading the stored key...' });
  step('encrypt', { value: 1, max: 1, status: 'done', detail: 'before the reload' });
  step('upload', { value: 1, max: 1, status: 'done', detail: 'before the reload' });
  try {
    const pool = ensurePool();
    const spec = JSON.stringify(model.params);
    try {
      await pool.call(0, 'setKey', { spec, insecure: !!model.insecure_test_params, fingerprint: model.params_fingerprint, secret: keyRec.secret });
    } catch (e) {
      throw new Error(`the stored key does not match the parameters of model "${model.name}" (${e.message})`);
    }
    state.secret = keyRec.secret;
    step('keys', { value: 1, max: 1, status: 'done', detail: 'stored key' });
    await finishJob(pool, model, job, rec.names.map((name) => ({ name, img: null })));
    const secs = (performance.now() - t0) / 1000;
    setRunState('done', `stored job finished in ${secs.toFixed(1)} s`);
    message(`Done: the stored job's ${rec.names.length} image(s) decrypted on this device.`, 'info', 'run');
  } catch (e) {
    if (e instanceof ApiError && e.status === 404) {
      setRunState('failed', e.message);
      message('The job stored on this device is no longer on the server (deleted or expired); its note was removed.', 'error', 'run');
      await keystore.deleteJob(rec.id).catch(() => {});
    } else {
      runFailed(e, true);
    }
  } finally {
    endRun();
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

// The results: a summary per class, a CSV of all, and the table a page of RESULTS_PER_PAGE rows
// at a time (16384 rows of bars at once would be one long main-thread task).
// `top`: each image's class, from the worker (wasm `argmaxRows` over the logits).
function showResults(model, entries, probs, top, outside, corrupt) {
  const C = model.classes.length;
  const counts = new Array(C).fill(0);
  for (let b = 0; b < entries.length; b++) counts[top[b]]++;
  state.results = { model, entries, probs, top, outside, page: 0 };
  clearMessages('results');
  const flagged = outside.reduce((n, f) => n + f, 0);
  $('#results-summary').textContent =
    `${entries.length} image(s): ` +
    model.classes
      .map((c, i) => [c, counts[i]])
      .filter(([, k]) => k > 0)
      .map(([c, k]) => `${c} ${k}`)
      .join(', ');
  $('#results').dataset.outside = String(flagged);
  if (corrupt) {
    message(
      `${flagged} of ${entries.length} images have results far outside the model's range: the batch most likely overflowed ` +
        '(one extreme image garbles the whole encrypted batch). Do not use these results; submit the images in smaller batches to find the image.',
      'error',
      'results',
    );
  } else if (flagged > 0) {
    message(
      `${flagged} image(s) marked "unreliable": their results are far outside the range the model was calibrated on ` +
        '(unusual images, e.g. black borders or a small picture on a dark background). Their classes should not be trusted.',
      'error',
      'results',
    );
  }
  $('#results').dataset.count = String(entries.length);
  renderResultsPage();
  $('#results').hidden = false;
}

function renderResultsPage() {
  const r = state.results;
  if (!r) return;
  const { model, entries, probs, top } = r;
  const C = model.classes.length;
  const pages = Math.max(1, Math.ceil(entries.length / RESULTS_PER_PAGE));
  r.page = Math.min(Math.max(0, r.page), pages - 1);
  const start = r.page * RESULTS_PER_PAGE;
  const end = Math.min(entries.length, start + RESULTS_PER_PAGE);
  const show = Math.min(C, 5);
  const frag = document.createDocumentFragment();
  const pics = new Map(); // image -> the canvas of its row
  for (let b = start; b < end; b++) {
    const { name, img } = entries[b];
    const p = Array.from(probs.subarray(b * C, (b + 1) * C));
    const order = p.map((v, c) => [v, c]).sort((x, y) => y[0] - x[0]);
    const t = top[b];
    const tr = document.createElement('tr');
    tr.dataset.name = name;
    tr.dataset.class = model.classes[t];
    tr.dataset.classIndex = String(t);
    const unreliable = r.outside[b] === 1;
    if (unreliable) tr.dataset.outside = '1';
    const tdImg = document.createElement('td');
    if (img && !img.removed) {
      const pic = document.createElement('canvas');
      pic.className = 'pic';
      pic.width = pic.height = 1;
      tdImg.append(pic);
      pics.set(img, pic);
    }
    const tdName = document.createElement('td');
    tdName.textContent = name;
    const tdCls = document.createElement('td');
    tdCls.className = 'cls';
    tdCls.textContent = `${model.classes[t]} (${(p[t] * 100).toFixed(1)}%)${unreliable ? ' - unreliable' : ''}`;
    const tdBars = document.createElement('td');
    const bars = document.createElement('div');
    bars.className = 'bars';
    for (const [v, c] of order.slice(0, show)) {
      const label = document.createElement('span');
      label.textContent = model.classes[c];
      const bar = document.createElement('div');
      bar.className = c === t ? 'bar top' : 'bar';
      const fill = document.createElement('span');
      fill.style.width = `${(v * 100).toFixed(1)}%`;
      bar.append(fill);
      const pct = document.createElement('span');
      pct.textContent = `${(v * 100).toFixed(1)}%`;
      bars.append(label, bar, pct);
    }
    tdBars.append(bars);
    tr.append(tdImg, tdName, tdCls, tdBars);
    frag.append(tr);
  }
  $('#results-table tbody').replaceChildren(frag);
  $('#results-pager').hidden = entries.length <= RESULTS_PER_PAGE;
  $('#results-range').textContent = `results ${start + 1}-${end} of ${entries.length}`;
  $('#results-prev').disabled = r.page === 0;
  $('#results-next').disabled = r.page >= pages - 1;
  if (pics.size) requestThumbs([...pics.keys()], (img) => pics.get(img));
}

// All results as CSV (file, predicted class, one probability column per class); made on click,
// in chunks that yield to the browser.
async function downloadCsv() {
  const r = state.results;
  if (!r) return;
  const { model, entries, probs, top, outside } = r;
  const C = model.classes.length;
  const q = (s) => `"${String(s).replace(/"/g, '""')}"`;
  const parts = [[q('file'), q('predicted'), ...model.classes.map(q), q('unreliable')].join(',') + '\n'];
  for (let s = 0; s < entries.length; s += 2048) {
    const lines = [];
    for (let b = s; b < Math.min(entries.length, s + 2048); b++) {
      const p = [];
      for (let c = 0; c < C; c++) p.push(probs[b * C + c].toFixed(6));
      lines.push(`${q(entries[b].name)},${q(model.classes[top[b]])},${p.join(',')},${outside[b]}\n`);
    }
    parts.push(lines.join(''));
    await yieldToBrowser();
  }
  const url = URL.createObjectURL(new Blob(parts, { type: 'text/csv' }));
  const a = document.createElement('a');
  a.href = url;
  a.download = 'beaa-results.csv';
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
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
      img.removed = true;
      img.gen++; // results of preprocessing still under way are dropped
      img.el = null;
    }
    state.images = [];
    state.shownThumbs = [];
    state.thumbPage = 0;
    prep.queue = [];
    if (state.results) for (const e of state.results.entries) e.img = null;
    renderResultsPage();
    renderThumbsNow();
    clearMessages();
    lastTooMany = null;
    lastUnreadable = null;
    refreshControls();
  };
  $('#thumbs-prev').onclick = () => {
    state.thumbPage--;
    renderThumbsNow();
  };
  $('#thumbs-next').onclick = () => {
    state.thumbPage++;
    renderThumbsNow();
  };
  $('#results-prev').onclick = () => {
    state.results.page--;
    renderResultsPage();
  };
  $('#results-next').onclick = () => {
    state.results.page++;
    renderResultsPage();
  };
  $('#results-csv').onclick = () => downloadCsv();
  $('#remember-key').onchange = () => {
    state.rememberTouched = true;
    refreshKeyControls();
  };
  $('#forget-key').onclick = () => forgetKey();
  if (TEST_HOOKS) {
    // For the end-to-end test only (?test-hooks): lets the test read, inside this page, the
    // secret it must then look for in every request. Nothing here touches the network.
    window.__beaa = {
      secretKey: () => (state.secret ? Array.from(state.secret) : null),
      features: () => readyImages().map((i) => ({ name: i.name, features: Array.from(i.features) })),
      workers: () => (state.pool ? state.pool.size : 0),
    };
  }
}

wire();
refreshKeyControls();
loadModels();
