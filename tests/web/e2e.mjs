// End-to-end test of the web page against the real evaluator (`beaa serve`), in Debian's
// headless Chromium:
//   fixtures (beaa-fixtures: a small random model, synthetic PNG/JPEG images, plaintext
//   reference predictions) -> `beaa serve --insecure-test-params` on a free loopback port ->
//   the page adds the images, encrypts in workers, uploads, waits, downloads, decrypts ->
//   the predicted classes shown must equal the plaintext reference, and no request the page
//   sent may carry image bytes, preprocessed pixels or the secret key.
//
// Run by scripts/test.sh (stage web), which builds web/pkg, beaa and beaa-fixtures first:
//   node --import scripts/node/register.mjs tests/web/e2e.mjs
// Binaries come from ${CARGO_TARGET_DIR:-$BEAA_ROOT/target}/release/.
import test from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { launchChromium } from '../../scripts/node/browser.mjs';

const ROOT = process.env.BEAA_ROOT || path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const TARGET = path.resolve(ROOT, process.env.CARGO_TARGET_DIR || 'target');
const BEAA = path.join(TARGET, 'release', 'beaa');
const FIXTURES = path.join(TARGET, 'release', 'beaa-fixtures');
const RUN_TIMEOUT_MS = Number(process.env.BEAA_E2E_RUN_TIMEOUT_MS || 150_000);

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.unref();
    s.on('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => resolve(port));
    });
  });
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// True when `hay` contains `needle` (both Uint8Array/Buffer).
function contains(hay, needle) {
  return needle.length > 0 && Buffer.from(hay).indexOf(Buffer.from(needle)) >= 0;
}

// Windows of `len` bytes at `count` spread-out offsets of `bytes`, skipping `skip` bytes.
function windows(bytes, len, count, skip = 0) {
  const out = [];
  const span = bytes.length - skip - len;
  if (span < 0) return out;
  for (let i = 0; i < count; i++) {
    const off = skip + Math.floor((span * i) / Math.max(1, count - 1));
    out.push(Buffer.from(bytes.subarray(off, off + len)));
  }
  return out;
}

function f32le(values) {
  const b = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => b.writeFloatLE(v, i * 4));
  return b;
}
function f64le(values) {
  const b = Buffer.alloc(values.length * 8);
  values.forEach((v, i) => b.writeDoubleLE(v, i * 8));
  return b;
}

test('page: encrypted diagnosis equals the plaintext reference; no pixels or secret on the wire', { timeout: 240_000 }, async (t) => {
  for (const [what, p] of [
    ['beaa', BEAA],
    ['beaa-fixtures', FIXTURES],
    ['web/pkg (wasm-pack build)', path.join(ROOT, 'web/pkg/wasm_client.js')],
  ]) {
    assert.ok(fs.existsSync(p), `${what} not found at ${p}: build it first (scripts/test.sh stage web does)`);
  }
  const help = spawnSync(BEAA, ['serve', '--help'], { encoding: 'utf8' });
  if (help.status !== 0) {
    console.log(`SKIP: ${BEAA} has no working \`serve\` subcommand yet (beaa serve --help failed); the end-to-end page test needs the real server`);
    t.skip('beaa serve is not available');
    return;
  }

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'beaa-e2e-'));
  t.after(() => fs.rmSync(tmp, { recursive: true, force: true }));
  const fx = path.join(tmp, 'fixtures');
  const made = spawnSync(FIXTURES, [fx], { encoding: 'utf8' });
  assert.equal(made.status, 0, `beaa-fixtures failed: ${made.stderr}`);
  const expected = JSON.parse(fs.readFileSync(path.join(fx, 'expected.json'), 'utf8'));
  const imagePaths = expected.images.map((i) => path.join(fx, 'images', i.file));
  const badPath = path.join(fx, 'images-bad', 'broken.png');

  // The real server, insecure test parameters, on a free loopback port.
  const port = await freePort();
  const base = `http://127.0.0.1:${port}`;
  const args = ['serve', '--addr', `127.0.0.1:${port}`, '--data-dir', path.join(tmp, 'data'), '--zoo', path.join(fx, 'zoo'), '--insecure-test-params'];
  if (help.stdout.includes('--web-dir')) args.push('--web-dir', path.join(ROOT, 'web'));
  const server = spawn(BEAA, args, { cwd: ROOT, stdio: ['ignore', 'pipe', 'pipe'] });
  let serverLog = '';
  server.stdout.on('data', (d) => (serverLog += d));
  server.stderr.on('data', (d) => (serverLog += d));
  let serverExited = null;
  server.on('exit', (code, sig) => (serverExited = `exit ${code ?? sig}`));
  t.after(async () => {
    if (serverExited === null) {
      server.kill('SIGTERM');
      await new Promise((r) => server.once('exit', r));
    }
  });
  const dumpServer = () => `\n--- server log (tail) ---\n${serverLog.slice(-4000)}`;

  // Wait until the model is planned and listed.
  let model = null;
  for (let i = 0; i < 600 && !model; i++) {
    assert.equal(serverExited, null, `beaa serve exited early (${serverExited})${dumpServer()}`);
    try {
      const r = await fetch(`${base}/api/models`);
      if (r.ok) model = (await r.json()).models.find((m) => m.name === expected.model) || null;
    } catch (_) {
      /* not listening yet */
    }
    if (!model) await sleep(100);
  }
  assert.ok(model, `the server never listed model ${expected.model}${dumpServer()}`);
  assert.equal(model.insecure_test_params, true);
  assert.deepEqual(model.input, expected.input, 'the server announces the fixture model input spec');

  const browser = await launchChromium();
  t.after(() => browser.close());
  const context = await browser.newContext();
  const page = await context.newPage();
  const requests = [];
  context.on('request', (r) => requests.push(r));
  const pageErrors = [];
  page.on('pageerror', (e) => pageErrors.push(String(e)));
  page.on('console', (m) => {
    if (m.type() === 'error') pageErrors.push(m.text());
  });

  await page.goto(`${base}/?test-hooks`);
  await page.waitForSelector(`#model-select option[value="${expected.model}"]`, { state: 'attached', timeout: 30_000 });
  await page.selectOption('#model-select', expected.model);
  assert.equal(await page.isVisible('#insecure-banner'), true, 'red banner for insecure test parameters');

  // More images than one job takes: a clear message, and no run.
  const png = fs.readFileSync(imagePaths.find((p) => p.endsWith('.png')));
  const many = Array.from({ length: model.max_batch + 1 }, (_, i) => ({ name: `many-${i}.png`, mimeType: 'image/png', buffer: png }));
  await page.setInputFiles('#file-input', many);
  await page.waitForFunction(() => !document.querySelector('.thumb.pending') && document.querySelectorAll('.thumb').length > 0, null, {
    timeout: 60_000,
  });
  const tooMany = `Too many images: ${model.max_batch + 1} selected`;
  await page.waitForFunction((t) => document.querySelector('#messages').textContent.includes(t), tooMany, { timeout: 10_000 });
  assert.match(await page.textContent('#messages'), new RegExp(`${tooMany}.*at most ${model.max_batch}`));
  assert.equal(await page.isDisabled('#run-button'), true, 'no run with too many images');
  await page.click('#clear-button');
  assert.equal(await page.locator('.thumb').count(), 0);
  const addLongTasks = await page.evaluate(() => window.__beaa.longTasks());

  // Add the images and one unreadable file.
  await page.setInputFiles('#file-input', [...imagePaths, badPath]);
  await page.waitForFunction(
    (n) => document.querySelectorAll('.thumb').length === n && !document.querySelector('.thumb.pending'),
    imagePaths.length + 1,
    { timeout: 30_000 },
  );
  assert.equal(await page.locator('.thumb.bad').count(), 1, 'the broken file is flagged');
  assert.equal(await page.locator('.thumb.bad').getAttribute('data-name'), 'broken.png');
  assert.match(await page.textContent('#messages'), /Cannot read "broken\.png"/);

  // Run.
  const t0 = Date.now();
  await page.click('#run-button');
  const progressText = () =>
    page.$$eval('.step', (els) => els.map((e) => `${e.querySelector('.label').textContent}: ${e.querySelector('.detail').textContent}`).join(' | '));
  try {
    await page.waitForFunction(() => ['done', 'failed'].includes(document.querySelector('#run-status').dataset.state), null, {
      timeout: RUN_TIMEOUT_MS,
    });
  } catch (e) {
    assert.fail(`the run did not finish in ${RUN_TIMEOUT_MS / 1000} s: ${await progressText()} | messages: ${await page.textContent('#messages')} | page errors: ${pageErrors.join(' | ')}${dumpServer()}`);
  }
  const runState = await page.getAttribute('#run-status', 'data-state');
  const runMsg = await page.textContent('#run-status');
  const messages = await page.textContent('#messages');
  assert.equal(runState, 'done', `run failed: ${runMsg} | messages: ${messages} | page errors: ${pageErrors.join(' | ')}${dumpServer()}`);
  const runSeconds = (Date.now() - t0) / 1000;

  // Predictions shown equal the plaintext reference.
  const rows = await page.$$eval('#results-table tbody tr', (trs) =>
    trs.map((tr) => ({ name: tr.dataset.name, cls: tr.dataset.class, text: tr.querySelector('td.cls').textContent })),
  );
  assert.equal(rows.length, expected.images.length, 'one result row per readable image');
  for (const img of expected.images) {
    const row = rows.find((r) => r.name === img.file);
    assert.ok(row, `no result row for ${img.file}`);
    assert.equal(row.cls, img.class, `${img.file}: page shows ${row.cls}, plaintext reference ${img.class} (margin ${img.margin})`);
    assert.ok(row.text.startsWith(img.class), `visible text names the class: ${row.text}`);
  }
  const distinct = new Set(expected.images.map((i) => i.class));
  assert.ok(distinct.size >= 2, 'the reference covers several classes');

  // The features the page computed equal the native preprocessing (same Rust code path).
  const pageFeatures = await page.evaluate(() => window.__beaa.features());
  for (const img of expected.images) {
    const pf = pageFeatures.find((f) => f.name === img.file);
    assert.ok(pf, `page has features of ${img.file}`);
    assert.equal(pf.features.length, img.features.length);
    const maxErr = Math.max(...pf.features.map((v, i) => Math.abs(v - img.features[i])));
    assert.ok(maxErr < 1e-6, `${img.file}: browser preprocessing differs from native by ${maxErr}`);
  }

  // What went over the network.
  const secret = Buffer.from(await page.evaluate(() => window.__beaa.secretKey()));
  assert.ok(secret.length > 40 + 128, 'the test hook exports the secret');
  const secretBody = secret.subarray(40); // after the 40-byte header (magic, kind, fingerprint)
  const needles = [];
  for (const w of windows(secretBody, 24, 16)) needles.push(['secret key', w]);
  for (const img of expected.images) {
    const file = fs.readFileSync(path.join(fx, 'images', img.file));
    needles.push([`${img.file} file bytes`, file]);
    for (const w of windows(file, 24, 8, 48)) needles.push([`${img.file} file bytes`, w]);
    for (const w of windows(f32le(img.features), 16, 8)) needles.push([`${img.file} f32 features`, w]);
    for (const w of windows(f64le(img.features), 24, 8)) needles.push([`${img.file} f64 features`, w]);
    needles.push([`${img.file} features as text`, Buffer.from(img.features.slice(0, 3).map(String).join(','))]);
  }
  // The search can fail: it finds a needle planted in a buffer.
  const planted = Buffer.concat([Buffer.alloc(1000, 7), needles[0][1], Buffer.alloc(10, 1)]);
  assert.ok(contains(planted, needles[0][1]));

  let putCount = 0;
  let keyPosts = 0;
  let jobPosts = 0;
  const bodies = [];
  for (const r of requests) {
    const url = new URL(r.url());
    assert.equal(url.origin, base, `request to another origin: ${r.url()}`);
    const body = r.postDataBuffer();
    const p = url.pathname;
    if (r.method() === 'PUT' && /^\/api\/jobs\/[^/]+\/inputs\/\d+$/.test(p)) {
      putCount++;
      assert.ok(body, `PUT ${p} body captured`);
      assert.equal(body.length, model.input_ciphertext_bytes, `PUT ${p} is one input ciphertext`);
    } else if (r.method() === 'POST' && p === '/api/keys') {
      keyPosts++;
      assert.equal(body.length, model.relin_key_bytes, 'the key upload is the relinearization key');
    } else if (r.method() === 'POST' && p === '/api/jobs') {
      jobPosts++;
      const j = JSON.parse(body.toString('utf8'));
      assert.deepEqual(Object.keys(j).sort(), ['batch', 'key_id', 'model']);
      assert.equal(j.batch, expected.images.length);
    } else {
      assert.ok(!body || body.length === 0, `unexpected body on ${r.method()} ${p} (${body && body.length} bytes)`);
    }
    if (body) bodies.push([`${r.method()} ${p}`, body]);
    // Headers (and URLs) carry nothing of the secret or the pixels either.
    const head = Buffer.from(JSON.stringify(r.headers()) + r.url());
    for (const [what, n] of needles) assert.ok(!contains(head, n), `${what} in the headers or URL of ${r.method()} ${p}`);
  }
  assert.equal(keyPosts, 1, 'one key upload');
  assert.equal(jobPosts, 1, 'one job');
  assert.ok(putCount >= model.input_ciphertexts, `${putCount} input uploads for ${model.input_ciphertexts} ciphertexts`);
  for (const [where, body] of bodies) {
    for (const [what, n] of needles) assert.ok(!contains(body, n), `${what} found in the body of ${where}`);
  }

  if (process.env.BEAA_E2E_SCREENSHOT) await page.screenshot({ path: process.env.BEAA_E2E_SCREENSHOT, fullPage: true });
  const runLongTasks = await page.evaluate(() => window.__beaa.runLongTasks());
  const workers = await page.evaluate(() => window.__beaa.workers());
  const fmtTasks = (ts) => (ts.length ? `max ${Math.max(...ts)} ms (${ts.length} over 50 ms)` : 'none over 50 ms');
  console.log(
    `e2e: ${expected.images.length} images, ${model.input_ciphertexts} ciphertexts, ${workers} workers, run ${runSeconds.toFixed(1)} s; ` +
      `${requests.length} requests checked (${bodies.length} with bodies, ${needles.length} needles); ` +
      `main-thread tasks while adding ${model.max_batch + 1} images: ${fmtTasks(addLongTasks)}; during the run: ${fmtTasks(runLongTasks)}`,
  );
  // The main thread only orchestrates (loose bound: this machine is shared).
  assert.ok(runLongTasks.every((ms) => ms <= 250), `main-thread task over 250 ms during the run: ${runLongTasks}`);
  assert.deepEqual(pageErrors.filter((e) => !/Failed to load resource/.test(e)), [], 'no page errors');

  // The server goes away: a new run says so clearly.
  server.kill('SIGTERM');
  await new Promise((r) => (serverExited === null ? server.once('exit', r) : r()));
  await page.click('#run-button');
  await page.waitForFunction(() => document.querySelector('#run-status').dataset.state === 'failed', null, { timeout: 20_000 });
  assert.match(await page.textContent('#messages'), /evaluator server is down or unreachable/);
});
