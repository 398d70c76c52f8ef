// Measures the wasm client in headless Chromium (Debian's): key generation with the
// relinearization key, encryption and decryption, at a parameter preset; then the page's own
// Web Workers (web/worker.js via web/pool.js): keygen in a worker, and encryption throughput of
// a full batch (one image per slot, packed element-wise) with 1 and with several workers.
// Peak memory is the summed RSS of Chromium's processes, sampled every 100 ms. Main-thread tasks
// over 50 ms are reported overall and by phase (keygen, batch_fill - where this script makes
// the synthetic features on the main thread - and encrypt). Prints one JSON object on stdout,
// with the 1-, 5- and 15-minute load averages before and after. Build the package first
// (scripts/bench_wasm.sh does both).
//
//   node scripts/bench_wasm.mjs [--preset n32768] [--reps 5] [--workers 1,2] [--cts 64]
//                               [--features 3072]
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from './node/browser.mjs';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const arg = (name, dflt) => {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : dflt;
};
const preset = arg('--preset', 'n32768');
const reps = Number(arg('--reps', '5'));
const workerCounts = arg('--workers', '1,2').split(',').map(Number).filter((n) => n > 0);
const cts = Number(arg('--cts', '64'));
const features = Number(arg('--features', '3072'));

const page = `<!doctype html><meta charset="utf-8"><script type="module">
import init, { ClientKeys, presetSpec, specFingerprint } from './pkg/wasm_client.js';
window.run = async (preset, reps) => {
  await init();
  const med = (xs) => xs.slice().sort((a, b) => a - b)[Math.floor(xs.length / 2)];
  const t = () => performance.now();
  let t0 = t();
  const keys = new ClientKeys(preset);
  const secret_ms = t() - t0;
  t0 = t();
  const rlk = keys.relinKey();
  const relin_ms = t() - t0;
  const values = new Float64Array(keys.slots()).map((_, i) => Math.sin(i * 0.37));
  const enc = [], dec = [];
  let ct;
  for (let r = 0; r < reps; r++) { t0 = t(); ct = keys.encrypt(values); enc.push(t() - t0); }
  for (let r = 0; r < reps; r++) { t0 = t(); var back = keys.decrypt(ct); dec.push(t() - t0); }
  let err = 0;
  for (let i = 0; i < values.length; i++) err = Math.max(err, Math.abs(values[i] - back[i]));
  return { preset, slots: keys.slots(), keygen_secret_ms: secret_ms, keygen_relin_ms: relin_ms,
           keygen_total_ms: secret_ms + relin_ms, encrypt_ms: med(enc), decrypt_ms: med(dec),
           relin_key_bytes: rlk.length, ciphertext_bytes: ct.length, max_error: err,
           cross_origin_isolated: self.crossOriginIsolated, user_agent: navigator.userAgent };
};
// Encryption throughput through the page's workers: each worker holds the key (imported from
// the exported secret) and the whole batch; ciphertexts are handed out one at a time.
import { Pool } from './pool.js';
// Main-thread tasks over 50 ms, by phase (keygen, batch fill, encryption): each task is put in
// the phase during which it started.
const longTasks = [];
const phases = [];
const phase = (name) => phases.push({ name, start: performance.now() });
const observer = new PerformanceObserver((l) => { for (const e of l.getEntries()) longTasks.push(e); });
observer.observe({ type: 'longtask' });
window.runWorkers = async (preset, counts, cts, nFeatures) => {
  await init();
  longTasks.length = 0;
  phases.length = 0;
  phase('other');
  const spec = presetSpec(preset);
  const fingerprint = specFingerprint(spec, preset.startsWith('insecure'));
  const insecure = preset.startsWith('insecure');
  const out = { features_in_batch: nFeatures, ciphertexts_timed: cts, runs: [] };
  let secret = null;
  for (const w of counts) {
    const pool = new Pool(w);
    const t = () => performance.now();
    phase('keygen');
    let t0 = t();
    const kg = await pool.call(0, 'keygen', { spec, insecure, fingerprint });
    const keygenWallMs = t() - t0;
    secret = kg.secret;
    await Promise.all(pool.workers.map((_, i) => (i ? pool.call(i, 'setKey', { spec, insecure, fingerprint, secret }) : null)));
    const slots = kg.slots;
    // A full batch: one image per slot, nFeatures features each (sent in chunks, as the page does;
    // the synthetic features are made here on the main thread, 64 images per task).
    phase('batch_fill');
    await pool.all('newBatch', { features: nFeatures });
    const chunk = 64;
    t0 = t();
    for (let s = 0; s < slots; s += chunk) {
      const imgs = [];
      for (let b = s; b < Math.min(slots, s + chunk); b++) {
        const f = new Float32Array(nFeatures);
        for (let k = 0; k < nFeatures; k++) f[k] = Math.sin(b * 0.01 + k * 0.37);
        imgs.push(f);
      }
      await pool.all('addImages', { images: imgs });
    }
    const batchMs = t() - t0;
    let next = 0, bytes = 0, done = 0;
    const marks = []; // seconds since the start at every 256th ciphertext (steadiness over the run)
    phase('encrypt');
    t0 = t();
    await Promise.all(pool.workers.map(async (_, i) => {
      while (next < cts) {
        const k = next++;
        const ct = await pool.call(i, 'encrypt', { k: k % nFeatures });
        bytes += ct.length;
        if (++done % 256 === 0) marks.push(Math.round(t() - t0) / 1000);
      }
    }));
    const encMs = t() - t0;
    phase('other');
    out.runs.push({ workers: w, keygen_in_worker_ms: kg.totalMs, keygen_wall_ms: keygenWallMs,
                    batch_images: slots, batch_fill_ms: batchMs, encrypt_ms: encMs,
                    ciphertexts_per_s: cts / (encMs / 1000), mb_per_s: bytes / 1e6 / (encMs / 1000),
                    ciphertext_bytes: bytes / cts,
                    projected_s_for_features: nFeatures / (cts / (encMs / 1000)),
                    s_at_every_256th_ciphertext: marks });
    pool.terminate();
  }
  out.hardware_concurrency = navigator.hardwareConcurrency;
  // Main-thread tasks over 50 ms while the workers ran (the main thread only orchestrates).
  await new Promise((r) => setTimeout(r, 100));
  longTasks.push(...observer.takeRecords());
  out.main_thread_long_tasks = longTasks.length;
  out.main_thread_longest_task_ms = longTasks.length ? Math.max(...longTasks.map((e) => e.duration)) : 0;
  out.main_thread_longest_task_ms_by_phase = {};
  for (const e of longTasks) {
    const p = phases.filter((x) => x.start <= e.startTime).pop();
    const name = p ? p.name : 'other';
    out.main_thread_longest_task_ms_by_phase[name] = Math.max(e.duration, out.main_thread_longest_task_ms_by_phase[name] || 0);
  }
  return out;
};
window.ready = true;
</script>`;

const types = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.html': 'text/html' };
const server = http.createServer((req, res) => {
  const url = new URL(req.url, 'http://x');
  if (url.pathname === '/bench.html') {
    res.writeHead(200, { 'content-type': 'text/html' });
    return res.end(page);
  }
  const file = path.join(root, 'web', path.normalize(url.pathname).replace(/^([/\\])+/, ''));
  if (!file.startsWith(path.join(root, 'web')) || !fs.existsSync(file)) {
    res.writeHead(404);
    return res.end();
  }
  res.writeHead(200, { 'content-type': types[path.extname(file)] || 'application/octet-stream' });
  fs.createReadStream(file).pipe(res);
});
await new Promise((r) => server.listen(0, '127.0.0.1', r));

// Summed RSS of this node process's descendants: Chromium's browser, renderer (where the
// workers live), GPU and utility processes.
function rssSampler() {
  const root = process.pid;
  const rssOf = () => {
    if (!root) return 0;
    const kids = new Map();
    for (const d of fs.readdirSync('/proc')) {
      if (!/^\d+$/.test(d)) continue;
      try {
        const stat = fs.readFileSync(`/proc/${d}/stat`, 'utf8');
        const ppid = Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
        if (!kids.has(ppid)) kids.set(ppid, []);
        kids.get(ppid).push(Number(d));
      } catch (_) { /* gone */ }
    }
    let total = 0;
    const stack = [root];
    while (stack.length) {
      const pid = stack.pop();
      try {
        const m = /VmRSS:\s+(\d+) kB/.exec(fs.readFileSync(`/proc/${pid}/status`, 'utf8'));
        if (m && pid !== root) total += Number(m[1]) * 1024;
      } catch (_) { /* gone */ }
      stack.push(...(kids.get(pid) || []));
    }
    return total;
  };
  let peak = 0;
  const timer = setInterval(() => { peak = Math.max(peak, rssOf()); }, 100);
  return {
    takePeak() { const p = Math.max(peak, rssOf()); peak = 0; return p; },
    stop() { clearInterval(timer); },
  };
}
const { port } = server.address();
const loadBefore = os.loadavg();
const browser = await launchChromium();
try {
  const p = await browser.newPage();
  await p.goto(`http://127.0.0.1:${port}/bench.html`);
  await p.waitForFunction(() => window.ready === true);
  const sampler = rssSampler();
  const result = await p.evaluate(([pr, n]) => window.run(pr, n), [preset, reps]);
  result.peak_rss_single_thread_bytes = sampler.takePeak();
  if (workerCounts.length) {
    const w0 = Date.now();
    result.workers = await p.evaluate(([pr, c, n, f]) => window.runWorkers(pr, c, n, f), [preset, workerCounts, cts, features]);
    result.workers.wall_s = (Date.now() - w0) / 1000;
    result.workers.peak_rss_bytes = sampler.takePeak();
  }
  sampler.stop();
  result.chromium = browser.version();
  result.loadavg_before = loadBefore;
  result.loadavg_after = os.loadavg();
  result.cpus = os.cpus().length;
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
  server.close();
}
