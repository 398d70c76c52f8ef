// A Web Worker of the page: all heavy wasm work (preprocessing, key generation, encryption,
// decryption) happens here, never on the main thread. It talks only to the page that
// started it (postMessage); it makes no network request except loading the wasm package.
//
// Messages: {id, op, ...args} -> {id, ok: true, result} | {id, ok: false, error}.
import init, { Batch, ClientKeys, argmaxRows, batchLooksCorrupt, outsideCalibration, preprocessImage, softmaxRows } from './pkg/wasm_client.js';

const ready = init();
let keys = null; // ClientKeys: the user's secret, in this worker's memory only
let batch = null; // Batch: preprocessed images, packed element-wise on demand

// A small ImageBitmap of an image file's bytes (the browser's decoder, in this worker; display
// only - the features come from preprocessImage), at most `size` pixels on its longer side;
// null if the browser cannot decode it.
async function thumbnail(buffer, size) {
  let full = null;
  try {
    full = await createImageBitmap(new Blob([buffer]));
    const s = Math.min(1, size / Math.max(full.width, full.height));
    if (s === 1) {
      const b = full;
      full = null;
      return b;
    }
    const w = Math.max(1, Math.round(full.width * s));
    const h = Math.max(1, Math.round(full.height * s));
    return await createImageBitmap(full, { resizeWidth: w, resizeHeight: h, resizeQuality: 'medium' });
  } catch (_) {
    return null;
  } finally {
    if (full) full.close();
  }
}

function dropKeys() {
  if (keys) keys.free();
  keys = null;
}
function dropBatch() {
  if (batch) batch.free();
  batch = null;
}

const ops = {
  // Decode + resize + normalize images (beaa_model::preprocess via wasm, the training code
  // path). One message carries the bytes of several files (read by the page, transferred); an
  // unreadable file does not fail the others. With `thumbs`, also a thumbnail of each.
  async preprocess({ items, inputSpec, thumbs = [], thumbSize = 80 }) {
    const out = [];
    const transfer = [];
    for (let i = 0; i < items.length; i++) {
      const r = {};
      try {
        if (!items[i]) throw new Error('the file could not be read');
        const bytes = new Uint8Array(items[i]);
        const features = preprocessImage(bytes, inputSpec);
        r.features = features;
        transfer.push(features.buffer);
      } catch (err) {
        r.error = String((err && err.message) || err);
      }
      if (thumbs[i] && items[i]) {
        r.thumb = await thumbnail(items[i], thumbSize);
        if (r.thumb) transfer.push(r.thumb);
      }
      out.push(r);
    }
    return { value: out, transfer };
  },
  // Thumbnails only (images shown again after paging).
  async thumbs({ items, thumbSize = 80 }) {
    const out = [];
    for (const b of items) out.push(b ? await thumbnail(b, thumbSize) : null);
    return { value: out, transfer: out.filter(Boolean) };
  },
  // Fresh keys for the server's parameter spec; checks the fingerprint. Returns the secret
  // (for the page's other workers, same device) and the relinearization key (for the server).
  keygen({ spec, insecure, fingerprint }) {
    dropKeys();
    const t0 = performance.now();
    keys = ClientKeys.fromSpec(spec, insecure);
    keys.checkFingerprint(fingerprint);
    const secretMs = performance.now() - t0;
    const relinKey = keys.relinKey();
    const totalMs = performance.now() - t0;
    const secret = keys.exportSecretLocal();
    return {
      value: { secret, relinKey, slots: keys.slots(), secretMs, totalMs },
      transfer: [secret.buffer, relinKey.buffer],
    };
  },
  // A secret exported by keygen (another worker of this page, or this device's key store):
  // imported for the spec; its header must carry the same parameter fingerprint.
  setKey({ spec, insecure, secret, fingerprint }) {
    dropKeys();
    keys = ClientKeys.importSecretForSpec(spec, insecure, secret);
    keys.checkFingerprint(fingerprint);
    return { value: keys.slots() };
  },
  // setKey, then a fresh relinearization key for the server (a remembered key's next job).
  useKey({ spec, insecure, secret, fingerprint }) {
    const t0 = performance.now();
    ops.setKey({ spec, insecure, secret, fingerprint });
    const relinKey = keys.relinKey();
    return {
      value: { relinKey, slots: keys.slots(), totalMs: performance.now() - t0 },
      transfer: [relinKey.buffer],
    };
  },
  newBatch({ features }) {
    dropBatch();
    batch = new Batch(features);
    return { value: 0 };
  },
  addImages({ images }) {
    for (const f of images) batch.push(f);
    return { value: batch.len() };
  },
  // Input ciphertext k: feature k of every image (image b in slot b), seeded, top level.
  encrypt({ k }) {
    if (!keys || !batch) throw new Error('worker has no key or batch');
    const ct = keys.encryptFeature(batch, k);
    return { value: ct, transfer: [ct.buffer] };
  },
  // Probabilities, each image's class (argmax of its logits, the rule of `beaa predict`),
  // per image 1 when its logits leave the model's calibrated range
  // (`calibrated`: the model's logits_calibration_max_abs; null: no flags), and whether most
  // of the batch is flagged (it overflowed).
  decrypt({ result, nImages, classes, calibrated }) {
    if (!keys) throw new Error('worker has no key');
    const logits = keys.decryptLogits(new Uint8Array(result), nImages, classes);
    const probs = softmaxRows(logits, classes);
    const top = argmaxRows(logits, classes);
    const outside = calibrated ? outsideCalibration(logits, classes, calibrated) : new Uint8Array(nImages);
    const corrupt = batchLooksCorrupt(outside);
    return { value: { probs, top, outside, corrupt }, transfer: [probs.buffer, top.buffer, outside.buffer] };
  },
  reset() {
    dropKeys();
    dropBatch();
    return { value: true };
  },
};

self.onmessage = async (e) => {
  const { id, op, ...args } = e.data;
  try {
    await ready;
    const fn = ops[op];
    if (!fn) throw new Error(`unknown worker op ${op}`);
    const { value, transfer } = await fn(args);
    self.postMessage({ id, ok: true, result: value }, transfer || []);
  } catch (err) {
    self.postMessage({ id, ok: false, error: String((err && err.message) || err) });
  }
};
