// Measures the wasm client in headless Chromium (Debian's): key generation with the
// relinearization key, encryption and decryption, at a parameter preset. Prints one JSON
// object on stdout. Build the package first (scripts/bench_wasm.sh does both).
//
//   node scripts/bench_wasm.mjs [--preset n32768] [--reps 5]
import http from 'node:http';
import fs from 'node:fs';
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

const page = `<!doctype html><meta charset="utf-8"><script type="module">
import init, { ClientKeys } from './pkg/wasm_client.js';
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
const { port } = server.address();
const browser = await launchChromium();
try {
  const p = await browser.newPage();
  await p.goto(`http://127.0.0.1:${port}/bench.html`);
  await p.waitForFunction(() => window.ready === true);
  const result = await p.evaluate(([pr, n]) => window.run(pr, n), [preset, reps]);
  result.chromium = browser.version();
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
  server.close();
}
