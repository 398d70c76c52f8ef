// Optional persistence of the secret key on this device ("remember key on this device", off
// by default): this browser's IndexedDB for this site, nothing else. The page never sends a
// stored key anywhere; it hands the bytes only to its own Web Workers, which import them with
// the server's parameter spec and check the parameter fingerprint (the key's header carries
// it, so a key of other parameters is refused).
//
// Database "beaa-keys":
//   keys: {fingerprint (hex, the key path), secret: Uint8Array (exportSecretLocal), saved}
//   jobs: {slot: "current" (the key path), id, token, model, fingerprint, names, created}
//         - the job under way, so that a reload can fetch and decrypt its result.
// The secret is stored as plain bytes in the browser profile (as any site data): anyone who
// can read this browser profile can read it. "Forget key" deletes the whole database.

const DB_NAME = 'beaa-keys';
const DB_VERSION = 1;

export function available() {
  try {
    return typeof indexedDB !== 'undefined' && indexedDB !== null;
  } catch (_) {
    return false; // e.g. storage disabled
  }
}

function open() {
  return new Promise((resolve, reject) => {
    const r = indexedDB.open(DB_NAME, DB_VERSION);
    r.onupgradeneeded = () => {
      const db = r.result;
      if (!db.objectStoreNames.contains('keys')) db.createObjectStore('keys', { keyPath: 'fingerprint' });
      if (!db.objectStoreNames.contains('jobs')) db.createObjectStore('jobs', { keyPath: 'slot' });
    };
    r.onsuccess = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.onblocked = () => reject(new Error('the key store is in use by another tab'));
  });
}

// Runs fn(store) in one transaction; resolves with the result of the request fn returns (if
// any) once the transaction has committed. The connection is closed afterwards, so that
// forget() is never blocked by this page.
async function withStore(name, mode, fn) {
  const db = await open();
  try {
    return await new Promise((resolve, reject) => {
      const tx = db.transaction(name, mode);
      let value;
      tx.oncomplete = () => resolve(value);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error || new Error('key store transaction aborted'));
      const r = fn(tx.objectStore(name));
      if (r) r.onsuccess = () => (value = r.result);
    });
  } finally {
    db.close();
  }
}

// True when the database exists (without creating it).
async function exists() {
  if (indexedDB.databases) {
    const dbs = await indexedDB.databases();
    return dbs.some((d) => d.name === DB_NAME);
  }
  return true;
}

export async function getKey(fingerprint) {
  if (!(await exists())) return null;
  const rec = await withStore('keys', 'readonly', (s) => s.get(fingerprint));
  return rec && rec.secret instanceof Uint8Array ? rec : null;
}

export async function putKey(fingerprint, secret) {
  await withStore('keys', 'readwrite', (s) => s.put({ fingerprint, secret: new Uint8Array(secret), saved: new Date().toISOString() }));
}

export async function listKeys() {
  if (!(await exists())) return [];
  const all = await withStore('keys', 'readonly', (s) => s.getAll());
  return all.map(({ fingerprint, saved }) => ({ fingerprint, saved }));
}

export async function getJob() {
  if (!(await exists())) return null;
  return (await withStore('jobs', 'readonly', (s) => s.get('current'))) || null;
}

export async function putJob(job) {
  await withStore('jobs', 'readwrite', (s) => s.put({ ...job, slot: 'current' }));
}

// Deletes the stored job record (only if it is job `id`, when given).
export async function deleteJob(id) {
  if (!(await exists())) return;
  await withStore('jobs', 'readwrite', (s) => {
    const g = s.get('current');
    g.onsuccess = () => {
      if (g.result && (id === undefined || g.result.id === id)) s.delete('current');
    };
    return null;
  });
}

// Deletes every stored key and job record (the whole database).
export function forget() {
  return new Promise((resolve, reject) => {
    const r = indexedDB.deleteDatabase(DB_NAME);
    r.onsuccess = () => resolve();
    r.onerror = () => reject(r.error);
    r.onblocked = () => reject(new Error('the key store is open in another tab; close it and try again'));
  });
}
