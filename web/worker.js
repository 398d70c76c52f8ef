// A Web Worker of the page: all heavy wasm work (preprocessing, key generation, encryption,
// decryption) happens here, never on the main thread. It talks only to the page that
// started it (postMessage); it makes no network request except loading the wasm package.
//
// Messages: {id, op, ...args} -> {id, ok: true, result} | {id, ok: false, error}.
import init, { Batch, ClientKeys, preprocessImage } from './pkg/wasm_client.js';

const ready = init();
let keys = null; // ClientKeys: the user's secret, in this worker's memory only
let batch = null; // Batch: preprocessed images, packed element-wise on demand

function dropKeys() {
  if (keys) keys.free();
  keys = null;
}
function dropBatch() {
  if (batch) batch.free();
  batch = null;
}

const ops = {
  // Decode + resize + normalize one image file (beaa_model::preprocess via wasm).
  async preprocess({ file, inputSpec }) {
    const bytes = new Uint8Array(await file.arrayBuffer());
    const features = preprocessImage(bytes, inputSpec);
    return { value: features, transfer: [features.buffer] };
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
  setKey({ spec, insecure, secret, fingerprint }) {
    dropKeys();
    keys = ClientKeys.importSecretForSpec(spec, insecure, secret);
    keys.checkFingerprint(fingerprint);
    return { value: keys.slots() };
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
  decrypt({ result, nImages, classes }) {
    if (!keys) throw new Error('worker has no key');
    const probs = keys.decryptProbabilities(new Uint8Array(result), nImages, classes);
    return { value: probs, transfer: [probs.buffer] };
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
